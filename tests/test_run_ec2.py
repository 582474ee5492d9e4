"""run_ec2.sh driven as users run it: shellcheck, DRY_RUN output, the restart loop, the spot watcher against a
local IMDSv2 stand-in, and backup/restore through the real aws CLI against a local S3 (moto). No traffic leaves
127.0.0.1."""
import http.server
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import ROOT

SCRIPT = str(ROOT / "run_ec2.sh")
BIN = str(Path(sys.executable).parent)  # the venv's aws and moto_server come first on PATH


def sh(args, env=None, check=True, timeout=120):
    full = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RESTART_DELAY_S": "0",
            "SESSION": "pytest-no-such-session", **(env or {})}
    p = subprocess.run([SCRIPT, *args], capture_output=True, text=True, env=full, timeout=timeout)
    if check:
        assert p.returncode == 0, p.stdout + p.stderr
    return p


@pytest.fixture
def fake_bin(tmp_path):
    """A fake nvidia-smi that lists 3 GPUs, and a fake aws that lists nothing."""
    d = tmp_path / "bin"
    d.mkdir()
    gpus = 'for i in 0 1 2; do echo "GPU $i: NVIDIA H100 80GB HBM3 (UUID: GPU-$i)"; done'
    (d / "nvidia-smi").write_text(f"#!/bin/sh\n{gpus}\n")
    (d / "aws").write_text("#!/bin/sh\nexit 0\n")
    for f in d.iterdir():
        f.chmod(0o755)
    return {"PATH": f"{d}:{BIN}:{os.environ['PATH']}"}


def test_shellcheck_clean():
    if not shutil.which("shellcheck"):
        pytest.skip("shellcheck is not installed (.ci/run installs Debian's shellcheck)")
    p = subprocess.run(["shellcheck", SCRIPT], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout


@pytest.mark.parametrize("sub", ["", "setup", "data", "train", "backup", "watch-spot", "status", "stop"])
def test_help(sub):
    p = sh([sub, "--help"] if sub else ["--help"])
    assert (sub or "run_ec2.sh") in p.stdout


def test_dry_run_each_subcommand(fake_bin, tmp_path):
    env = {**fake_bin, "DRY_RUN": "1", "OUT": str(tmp_path / "out"), "DATA_DIR": str(tmp_path / "imagenet"),
           "S3_DATA": "s3://bucket/imagenet-1k", "S3_RUNS": "s3://bucket/runs", "VENV": str(tmp_path / "venv")}
    setup = sh(["setup"], env)
    assert f"+ python3 -m venv {tmp_path / 'venv'}" in setup.stdout and "GPUs: 3" in setup.stderr
    data = sh(["data"], env).stdout
    assert f"+ aws s3 sync s3://bucket/imagenet-1k {tmp_path / 'imagenet'}" in data and "--check-data" in data
    train = sh(["train", "--epochs", "16"], env).stdout
    assert f"+ aws s3 sync s3://bucket/runs/out {tmp_path / 'out'}" in train  # no local checkpoint: restore first
    assert f"+ torchrun --nproc_per_node=3 {ROOT / 'train.py'} --data {tmp_path / 'imagenet'}" in train
    assert "--epochs 16" in train and ("+ tmux new-session" in train or "+ nohup" in train)
    backup = sh(["backup"], env).stdout
    assert f"+ aws s3 sync {tmp_path / 'out'} s3://bucket/runs/out" in backup
    assert "trainer: not running" in sh(["status"], env).stdout
    assert sh(["bogus"], env, check=False).returncode == 2


STAND_IN = """#!/usr/bin/env python3
# a stand-in for torchrun + train.py: on its k-th run it writes the k-th word of SEQUENCE to OUT/status
import os, sys
out = sys.argv[sys.argv.index("--out") + 1]
os.makedirs(out, exist_ok=True)
runs = os.path.join(out, "runs")
k = len(open(runs).read().split()) if os.path.exists(runs) else 0
open(runs, "a").write(f"{k} ")
status = os.environ["SEQUENCE"].split()[k]
open(os.path.join(out, "status"), "w").write(status + "\\n")
sys.exit({"done": 0, "preempted": 75, "crashed": 1, "bad_input": 2, "diverged": 3}[status])
"""


@pytest.mark.parametrize("sequence,code,runs", [("preempted preempted done", 0, 3), ("bad_input done", 2, 1),
                                                ("crashed diverged done", 3, 2)])
def test_restart_loop(tmp_path, sequence, code, runs):
    trainer = tmp_path / "trainer.py"
    trainer.write_text(STAND_IN)
    trainer.chmod(0o755)
    out = tmp_path / "out"
    p = sh(["train", "--epochs", "2"], {"TRAIN_CMD": str(trainer), "FOREGROUND": "1", "OUT": str(out),
                                        "SEQUENCE": sequence}, check=False)
    assert p.returncode == code, p.stderr
    assert len((out / "runs").read_text().split()) == runs  # restarted exactly runs - 1 times


class IMDS(http.server.BaseHTTPRequestHandler):
    """IMDSv2 on 127.0.0.1: a token from PUT, then 404 for the spot notice until `notice_at`, then 200."""
    notice_at, seen = 0.0, []

    def do_PUT(self):
        assert self.path == "/latest/api/token" and self.headers["X-aws-ec2-metadata-token-ttl-seconds"]
        self.reply(200, b"TOKEN123")

    def do_GET(self):
        IMDS.seen.append((self.path, self.headers.get("X-aws-ec2-metadata-token")))
        if self.headers.get("X-aws-ec2-metadata-token") != "TOKEN123":
            return self.reply(401, b"")
        if self.path == "/latest/meta-data/spot/instance-action" and time.time() >= IMDS.notice_at:
            return self.reply(200, b'{"action": "terminate", "time": "2026-11-22T05:00:00Z"}')
        self.reply(404, b"")

    def reply(self, code, body):
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_watch_spot_sends_sigterm_to_the_trainer(tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), IMDS)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    IMDS.notice_at, IMDS.seen = time.time() + 1.5, []
    out = tmp_path / "out"
    out.mkdir()
    got = tmp_path / "got_sigterm"
    trainer = subprocess.Popen([sys.executable, "-c", (
        "import signal, sys, time\n"
        f"signal.signal(signal.SIGTERM, lambda *a: (open({str(got)!r}, 'w').write('yes'), sys.exit(75)))\n"
        "time.sleep(60)\n")])
    (out / "trainer.pid").write_text(str(trainer.pid))
    threading.Thread(target=trainer.wait, daemon=True).start()  # reap it, as the restart loop's shell would
    try:
        p = sh(["watch-spot"], {"IMDS_URL": f"http://127.0.0.1:{server.server_port}", "SPOT_POLL_S": "0.2",
                                "OUT": str(out)}, timeout=60)
        assert trainer.wait(timeout=10) == 75 and got.read_text() == "yes"
        assert "spot interruption notice" in p.stderr
        assert len(IMDS.seen) >= 3 and all(token == "TOKEN123" for _, token in IMDS.seen)  # token first, always
    finally:
        trainer.kill()
        server.shutdown()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_backup_and_restore_round_trip_through_local_s3(tmp_path):
    moto = Path(BIN) / "moto_server"
    if not moto.exists() or not (Path(BIN) / "aws").exists():
        pytest.skip("moto[server] and awscli are test dependencies (requirements-dev.txt)")
    port = free_port()
    server = subprocess.Popen([str(moto), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "S3_RUNS": "s3://runs/ec2"}
    try:
        aws = [str(Path(BIN) / "aws")]
        for _ in range(50):
            ok = subprocess.run(aws + ["s3", "mb", "s3://runs"], env={**os.environ, **env}, capture_output=True)
            if ok.returncode == 0:
                break
            time.sleep(0.2)
        assert ok.returncode == 0, ok.stderr
        first = tmp_path / "first" / "run1"
        first.mkdir(parents=True)
        blob = os.urandom(3_000_000)
        (first / "last.pt").write_bytes(blob)
        (first / "log.jsonl").write_text('{"epoch": 0}\n')
        sh(["backup"], {**env, "OUT": str(first)})  # no trainer running: one sync
        # a new spot instance: an empty OUT of the same name, and `train` pulls the checkpoint first
        second = tmp_path / "second" / "run1"
        trainer = tmp_path / "trainer.py"
        trainer.write_text(STAND_IN)
        trainer.chmod(0o755)
        sh(["train"], {**env, "OUT": str(second), "TRAIN_CMD": str(trainer), "FOREGROUND": "1",
                       "SEQUENCE": "done"})
        assert (second / "last.pt").read_bytes() == blob
        assert (second / "log.jsonl").read_text() == '{"epoch": 0}\n'
    finally:
        server.kill()
