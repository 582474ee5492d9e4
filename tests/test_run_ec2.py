"""run_ec2.sh driven as users run it: shellcheck, DRY_RUN output, the restart loop, the spot watcher against a
local IMDSv2 stand-in, and backup/restore through the real aws CLI against a local S3 (moto). No traffic leaves
127.0.0.1."""
import http.server
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from conftest import BIN, PREEMPTIBLE, ROOT, Answers, aws, boto, fake_venv, write_trainer

SCRIPT = str(ROOT / "run_ec2.sh")


def sh(args, env=None, check=True, timeout=120, script=SCRIPT):
    full = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RESTART_DELAY_S": "0",
            "SESSION": "pytest-no-such-session", "IMDS_URL": "http://127.0.0.1:9", **(env or {})}  # only 127.0.0.1
    p = subprocess.run([str(script), *args], capture_output=True, text=True, env=full, timeout=timeout)
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


SUBCOMMANDS = ["setup", "prepare", "data", "train", "backup", "watch-spot", "budget", "watchdog", "end", "bench",
               "check", "list", "curves", "finish", "results", "restore", "node",
               "status", "stop", "launch", "resume", "ssh", "logs", "status-remote", "terminate", "tunnel"]


@pytest.mark.parametrize("sub", SUBCOMMANDS)
def test_each_subcommand_has_its_own_help(sub):
    """`./run_ec2.sh SUB --help` is SUB's own line, not the header (which names every subcommand anyway)."""
    p = sh([sub, "--help"])
    first = p.stdout.splitlines()[0]
    assert re.match(rf"([a-z| -]+ \| )?{re.escape(sub)}\b", first) and "Every setting" not in p.stdout, first


def test_help_says_what_ends_an_instance_and_how_to_keep_it():
    p = sh(["--help"])
    assert all(sub in p.stdout for sub in ("launch", "train", "end")) and "Every setting is an environment" in p.stdout
    assert "What ends a launched instance" in p.stdout and "KEEP_ALIVE=1 at launch keeps it up" in p.stdout


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
# a stand-in for torchrun + train.py: on its k-th run it writes the k-th word of SEQUENCE to OUT/status; a word
# ending in + first writes OUT/last.pt anew (the run made progress), and "error" lines go to stderr like train.py's
import os, sys, time
out = sys.argv[sys.argv.index("--out") + 1]
os.makedirs(out, exist_ok=True)
runs = os.path.join(out, "runs")
k = len(open(runs).read().split()) if os.path.exists(runs) else 0
open(runs, "a").write(f"{k} ")
status = os.environ["SEQUENCE"].split()[k]
if status.endswith("+"):
    status = status[:-1]
    time.sleep(1.1)  # a new mtime
    open(os.path.join(out, "last.pt"), "a").write(f"step {k}\\n")
if status == "crashed":
    print("torch.OutOfMemoryError: CUDA out of memory (a stand-in)", file=sys.stderr)
open(os.path.join(out, "status"), "w").write(status + "\\n")
sys.exit({"done": 0, "preempted": 75, "crashed": 1, "bad_input": 2, "diverged": 3}[status])
"""


@pytest.mark.parametrize("sequence,code,runs", [("preempted preempted done", 0, 3), ("bad_input done", 2, 1),
                                                ("crashed+ diverged done", 3, 2), ("crashed+ crashed+ done", 0, 3),
                                                ("crashed done", 1, 1), ("preempted crashed done", 1, 2)])
def test_restart_loop(tmp_path, sequence, code, runs):
    """Restarts after a preemption, and after a crash only when last.pt moved on since that start: a crash that
    made no progress (CUDA out of memory, a broken driver) would fail the same way on every paid restart."""
    trainer = tmp_path / "trainer.py"
    trainer.write_text(STAND_IN)
    trainer.chmod(0o755)
    out = tmp_path / "out"
    p = sh(["train", "--epochs", "2"], {"TRAIN_CMD": str(trainer), "FOREGROUND": "1", "OUT": str(out),
                                        "SEQUENCE": sequence}, check=False)
    assert p.returncode == code, p.stderr
    assert len((out / "runs").read_text().split()) == runs  # restarted exactly runs - 1 times
    if code == 1:  # stopped, with the error line of the log
        assert "no progress since its start" in p.stderr and "CUDA out of memory (a stand-in)" in p.stderr


def pid_line(pid):
    """What run_ec2.sh's pid files hold: the pid, its start time (field 22 of /proc/PID/stat) and this boot's id, so
    that a pid file that came back from S3 (another instance's) or outlived its process names nothing to signal."""
    start = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    return f"{pid} {start} {Path('/proc/sys/kernel/random/boot_id').read_text().strip()}\n"


class IMDS(Answers):
    """IMDSv2 on 127.0.0.1: a token from PUT, then 404 for the spot notice until `notice_at`, then 200; the
    instance identity document with its launch time `pending` (ISO 8601, UTC)."""
    notice_at, seen, pending = 0.0, [], "2026-11-22T03:00:00Z"

    def do_PUT(self):
        assert self.path == "/latest/api/token" and self.headers["X-aws-ec2-metadata-token-ttl-seconds"]
        self.reply(200, b"TOKEN123")

    def do_GET(self):
        IMDS.seen.append((self.path, self.headers.get("X-aws-ec2-metadata-token")))
        if self.headers.get("X-aws-ec2-metadata-token") != "TOKEN123":
            return self.reply(401, b"")
        if self.path == "/latest/meta-data/spot/instance-action" and time.time() >= IMDS.notice_at:
            return self.reply(200, b'{"action": "terminate", "time": "2026-11-22T05:00:00Z"}')
        if self.path == "/latest/meta-data/instance-id":
            return self.reply(200, b"i-0123")
        if self.path == "/latest/dynamic/instance-identity/document":
            doc = {"instanceId": "i-0123", "instanceType": "p5.4xlarge", "pendingTime": IMDS.pending}
            return self.reply(200, json.dumps(doc, indent=2).encode())
        self.reply(404, b"")


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
    (out / "trainer.pid").write_text(pid_line(trainer.pid))  # as the restart loop writes it
    threading.Thread(target=trainer.wait, daemon=True).start()  # reap it, as the restart loop's shell would
    try:
        p = sh(["watch-spot"], {"IMDS_URL": f"http://127.0.0.1:{server.server_port}", "SPOT_POLL_S": "0.2",
                                "OUT": str(out), "S3_RUNS": "s3://runs/ec2", "PATH": recording_aws(tmp_path)},
               timeout=60)
        assert trainer.wait(timeout=10) == 75 and got.read_text() == "yes"
        assert "spot interruption notice" in p.stderr
        assert len(IMDS.seen) >= 3 and all(token == "TOKEN123" for _, token in IMDS.seen)  # token first, always
    finally:
        trainer.kill()
        server.shutdown()


def test_backup_and_restore_round_trip_through_local_s3(tmp_path, moto):
    env = {**moto, "S3_RUNS": "s3://backup-runs/ec2"}
    aws(moto, "s3", "mb", "s3://backup-runs")
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
    sh(["train"], {**env, "OUT": str(second), "TRAIN_CMD": str(trainer), "FOREGROUND": "1", "SEQUENCE": "done"})
    assert (second / "last.pt").read_bytes() == blob
    assert (second / "log.jsonl").read_text() == '{"epoch": 0}\n'


# -----------------------------------------------------------------------------
# EC2, part 2: the defects that wasted money, the budget guard, and launch

def recording_aws(tmp_path):
    """A PATH whose `aws` records every call to tmp_path/aws.log and succeeds (for tests that need no S3)."""
    d = tmp_path / "recbin"
    d.mkdir(exist_ok=True)
    (d / "aws").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "aws.log"}\nexit 0\n')
    (d / "aws").chmod(0o755)
    return f"{d}:{BIN}:{os.environ['PATH']}"


@pytest.fixture
def imds():
    """The IMDSv2 stand-in on a free port; no spot notice unless a test sets IMDS.notice_at."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), IMDS)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    IMDS.notice_at, IMDS.seen = time.time() + 3600, []
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def test_train_starts_the_spot_watcher_and_the_preemption_checkpoint_reaches_s3(tmp_path, moto, imds):
    """The README's old line started watch-spot without S3_RUNS, so the checkpoint written on the spot notice never
    reached S3. Now `train` starts the backup and the watcher itself, with the same settings."""
    aws(moto, "s3", "mb", "s3://spot-runs")
    IMDS.notice_at = time.time() + 4
    out = tmp_path / "run-spot"
    p = sh(["train"], {**moto, "FOREGROUND": "1", "OUT": str(out), "S3_RUNS": "s3://spot-runs/ec2",
                       "TRAIN_CMD": write_trainer(tmp_path, PREEMPTIBLE), "IMDS_URL": imds, "SPOT_POLL_S": "0.2"},
           check=False, timeout=90)
    assert p.returncode == 0, p.stderr
    assert (out / "got_sigterm").read_text() == "yes" and "not restarting" in p.stderr
    got = aws(moto, "s3", "cp", "s3://spot-runs/ec2/run-spot/last.pt", "-").stdout
    assert got == "the checkpoint written on SIGTERM"
    assert "spot interruption notice" in (out / "watch-spot.log").read_text()


def test_watch_spot_refuses_to_start_without_s3_runs(tmp_path):
    p = sh(["watch-spot"], {"OUT": str(tmp_path), "S3_RUNS": "", "IMDS_URL": "http://127.0.0.1:9"}, check=False,
           timeout=20)
    assert p.returncode == 2 and "watch-spot needs S3_RUNS" in p.stderr.strip().splitlines()[-1]


def test_a_running_tmux_server_does_not_lose_the_settings(tmp_path):
    """A tmux server that already runs gives a new session its own environment, not the caller's: every setting
    must reach it explicitly. Not on its command line, though, where `ps` and tmux show an AWS key: in a file only
    the user may read, read once and removed."""
    if not shutil.which("tmux"):
        pytest.skip("tmux is not installed (.ci/run installs it)")
    sock = tempfile.mkdtemp(prefix="tmux-")  # a short path: tmux's socket name has a length limit
    base = {k: v for k, v in os.environ.items() if k != "TMUX"}
    server_env = {"PATH": "/usr/bin:/bin", "TMUX_TMPDIR": sock, "HOME": str(tmp_path)}
    subprocess.run(["tmux", "new-session", "-d", "-s", "users-own", "sleep 300"], env=server_env, check=True)
    recorder = write_trainer(tmp_path, """#!/usr/bin/env python3
import json, os, sys, time
out = sys.argv[sys.argv.index("--out") + 1]
os.makedirs(out, exist_ok=True)
json.dump(dict(argv=sys.argv[1:], env={k: os.environ.get(k) for k in ("DATA_DIR", "HOURLY_USD", "S3_DATA",
                                                                      "AWS_SECRET_ACCESS_KEY")}),
          open(os.path.join(out, "seen.json"), "w"))
time.sleep(2)  # while the test looks at the session's command
open(os.path.join(out, "status"), "w").write("done\\n")
""")
    out = tmp_path / "out"
    try:
        env = {**base, "PATH": f"{BIN}:{os.environ['PATH']}", "TMUX_TMPDIR": sock, "SESSION": "pytest-settings",
               "TRAIN_CMD": recorder, "OUT": str(out), "DATA_DIR": str(tmp_path / "data"), "HOURLY_USD": "3.5",
               "S3_DATA": "s3://bucket/imagenet", "S3_RUNS": "", "RESTART_DELAY_S": "0",
               "AWS_SECRET_ACCESS_KEY": "secret-not-on-a-command-line", "TMPDIR": str(tmp_path)}
        p = subprocess.run([SCRIPT, "train", "--epochs", "3"], capture_output=True, text=True, env=env, timeout=60)
        assert p.returncode == 0 and "training in tmux session 'pytest-settings'" in p.stderr, p.stderr
        for _ in range(150):
            if (out / "seen.json").exists():
                break
            time.sleep(0.2)
        seen = json.loads((out / "seen.json").read_text())
        assert seen["env"] == {"DATA_DIR": str(tmp_path / "data"), "HOURLY_USD": "3.5", "S3_DATA": "s3://bucket/imagenet",
                               "AWS_SECRET_ACCESS_KEY": "secret-not-on-a-command-line"}
        panes = subprocess.run(["tmux", "list-panes", "-a", "-F", "#{pane_start_command}"], env=server_env,
                               capture_output=True, text=True).stdout
        assert "run_ec2.sh train" in panes and "secret-not-on-a-command-line" not in panes, panes
        assert not list(tmp_path.glob("run_ec2-settings.*"))  # read once, and removed
        assert seen["argv"][seen["argv"].index("--out") + 1] == str(out) and "--epochs" in seen["argv"]
    finally:
        subprocess.run(["tmux", "kill-server"], env=server_env)
        shutil.rmtree(sock, ignore_errors=True)


def test_a_data_dir_under_a_root_owned_mnt_gets_sudo_and_chown():
    """On Ubuntu and the DLAMI /mnt belongs to root: `data` creates DATA_DIR with sudo and gives it to the user.
    Run as an unprivileged user (nobody) in DRY_RUN, so the test needs no sudo; as root, no sudo is used."""
    if os.geteuid() != 0:
        pytest.skip("needs root, to run the script as another user")
    base = Path(tempfile.mkdtemp(prefix="mnt-test-"))
    try:
        base.chmod(0o755)
        (base / "mnt").mkdir(mode=0o755)  # like /mnt: root's, others may not write
        shutil.copy(SCRIPT, base / "run_ec2.sh")  # where user nobody may read it
        fake = base / "bin"
        fake.mkdir(mode=0o755)
        (fake / "aws").write_text("#!/bin/sh\nexit 0\n")
        (fake / "aws").chmod(0o755)
        env = {"PATH": f"{fake}:/usr/bin:/bin", "HOME": str(base), "DRY_RUN": "1", "S3_DATA": "s3://b/imagenet",
               "DATA_DIR": str(base / "mnt" / "imagenet"), "OUT": str(base / "out")}
        as_nobody = subprocess.run([str(base / "run_ec2.sh"), "data"], capture_output=True, text=True, env=env,
                                   user=65534, group=65534, timeout=60)
        assert as_nobody.returncode == 0, as_nobody.stderr
        assert f"+ sudo mkdir -p {base}/mnt/imagenet" in as_nobody.stdout
        assert f"+ sudo chown 65534:65534 {base}/mnt/imagenet" in as_nobody.stdout
        as_root = subprocess.run([str(base / "run_ec2.sh"), "data"], capture_output=True, text=True, env=env,
                                 timeout=60)
        assert f"+ mkdir -p {base}/mnt/imagenet" in as_root.stdout and "sudo" not in as_root.stdout
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_status_counts_the_instance_since_launch_as_the_bill_does(tmp_path, imds):
    """Not the seconds of the training epochs: the instance's whole time since launch (IMDS), with the projection
    to the last epoch; uptime when there is no metadata service."""
    IMDS.pending = (datetime.now(timezone.utc) - timedelta(hours=2)).strftime("%Y-%m-%dT%H:%M:%SZ")
    out = tmp_path / "out"
    out.mkdir()
    (out / "log.jsonl").write_text(json.dumps(dict(epoch=0, epochs=10, epoch_s=60, val_top1=30.0)) + "\n")
    p = sh(["status"], {"IMDS_URL": imds, "OUT": str(out), "HOURLY_USD": "4"})
    assert "has run 2.00" in p.stdout and "(from IMDS): $8.00 at $4/h" in p.stdout, p.stdout
    assert "projected $8.60 to the last epoch (9 left at 1.0 min each)" in p.stdout  # 2 h + 9 min, at $4/h
    p = sh(["status"], {"IMDS_URL": "http://127.0.0.1:9", "OUT": str(out), "HOURLY_USD": "4"})
    assert "(from uptime)" in p.stdout


def test_the_budget_warns_stops_cleanly_and_a_higher_one_continues(tmp_path, imds):
    """BUDGET_USD: a warning in the log once the projection passes it, then at the budget SIGTERM (the trainer
    checkpoints), the backup and status `stopped`; the same command with a higher budget continues."""
    IMDS.pending = (datetime.now(timezone.utc) - timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    out = tmp_path / "out"
    path = recording_aws(tmp_path)
    env = {"FOREGROUND": "1", "OUT": str(out), "S3_RUNS": "s3://runs/ec2", "IMDS_URL": imds, "PATH": path,
           "HOURLY_USD": "360", "BUDGET_USD": "361", "BUDGET_POLL_S": "0.3", "SPOT_POLL_S": "0.3",
           "TRAIN_CMD": write_trainer(tmp_path, PREEMPTIBLE)}  # $360 spent at launch + $0.10/s: ~10 s to go
    p = sh(["train"], env, check=False, timeout=90)
    assert p.returncode == 0, p.stderr
    log = (out / "train.log").read_text()
    assert "warning: the projected cost to the last epoch" in log and "budget reached" in log
    assert (out / "got_sigterm").read_text() == "yes" and (out / "status").read_text() == "stopped\n"
    assert re.search(rf"s3 sync {tmp_path}/\.backup-out\.\w+ s3://runs/ec2/out", (tmp_path / "aws.log").read_text())
    # backed up after the stop (a snapshot of OUT's files, hard-linked beside it)
    again = sh(["train"], env, check=False, timeout=30)  # the same budget: it does not start
    assert again.returncode == 0 and "not starting" in again.stderr and (out / "status").read_text() == "stopped\n"
    os.remove(out / "got_sigterm")
    more = sh(["train"], {**env, "BUDGET_USD": "5000", "TRAIN_CMD": write_trainer(tmp_path, STAND_IN),
                          "SEQUENCE": "done"}, check=False, timeout=60)
    assert more.returncode == 0 and (out / "status").read_text() == "done\n", more.stderr


def test_the_runs_spending_survives_every_count_at_once_and_a_run_it_cannot_count_starts_no_trainer(tmp_path, imds):
    """The restart loop, the budget guard and `status` all count the money at once, each rewriting OUT/spent.json.
    Through one shared temp file they used to tear it: the loop's check before a start then read no spending and
    started a trainer past the budget, and every later count failed, so the guard guarded nothing and the earlier
    instances' dollars were lost. Now the counts take turns; a spent.json that is not JSON stops the start, saying
    so."""
    IMDS.pending = (datetime.now(timezone.utc) - timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    out = tmp_path / "out"
    out.mkdir()
    earlier = {"i-earlier": {"hours": 2.0, "hourly_usd": 4.0, "usd": 8.0}}
    (out / "spent.json").write_text(json.dumps(earlier))
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "OUT": str(out), "IMDS_URL": imds, "HOURLY_USD": "3"}
    counts = ("for i in 1 2 3 4 5 6; do ./run_ec2.sh status >/dev/null || echo \"status exited $?\" >&2; done")
    workers = [subprocess.Popen(["bash", "-c", counts], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
               for _ in range(6)]
    said = "".join(w.communicate(timeout=120)[1] for w in workers)
    assert "Traceback" not in said and "exited" not in said, said
    record = json.loads((out / "spent.json").read_text())
    assert record["i-earlier"] == earlier["i-earlier"] and 2.9 < record["i-0123"]["usd"] < 3.5, record
    # a spent.json that is not JSON (torn by the old code, say): no trainer starts unguarded, and the line says why
    (out / "spent.json").write_text(json.dumps(earlier) + "}")
    p = sh(["train"], {"FOREGROUND": "1", "OUT": str(out), "IMDS_URL": imds, "PATH": recording_aws(tmp_path),
                       "S3_RUNS": "s3://runs/ec2", "HOURLY_USD": "3", "BUDGET_USD": "100", "BUDGET_POLL_S": "0.3",
                       "TRAIN_CMD": write_trainer(tmp_path, PREEMPTIBLE)}, check=False, timeout=60)
    assert p.returncode == 2 and not (out / "last.pt").exists() and "Traceback" not in p.stderr, p.stderr
    assert f"{out / 'spent.json'} is not JSON" in p.stderr and "not starting" in p.stderr, p.stderr
    assert (out / "status").read_text() == "bad_input\n"


def test_bench_on_a_fresh_instance_says_where_its_jpegs_come_from(tmp_path, tiny_data, monkeypatch):
    """bench.py with no flags on a fresh clone, where there is no ../shared: one line naming --data and DATA_DIR;
    with --data it times that dataset's own JPEGs; its projection covers every GPU the machine has."""
    clone = tmp_path / "clone"
    clone.mkdir()
    for script in [*ROOT.glob("*.py"), *ROOT.glob("*.json")]:
        shutil.copy(script, clone / script.name)
    env = {k: v for k, v in os.environ.items() if k != "DATA_DIR"}
    p = subprocess.run([sys.executable, str(clone / "bench.py")], capture_output=True, text=True, cwd=clone,
                       env=env, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert "pass --data" in p.stderr.strip().splitlines()[-1] and "DATA_DIR" in p.stderr
    import bench
    import torch
    files = bench.find_images(None, str(tiny_data))
    assert len(files) == 100 and len({Path(f).parent.name for f in files}) == 10
    assert all(Path(f).exists() for f in files)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert bench.machine_gpus(torch.device("cuda")) == 8 and bench.machine_gpus(torch.device("cpu")) == 1


def git_repo_of_the_working_tree(dst):
    """A clone of this repository: this working tree's scripts, committed in a local repo (what launch ships)."""
    dst.mkdir()
    for path in [*ROOT.glob("*.py"), ROOT / "run_ec2.sh", ROOT / "requirements.txt", ROOT / "ec2_instances.json"]:
        shutil.copy(path, dst / path.name)
    git = ["git", "-C", str(dst), "-c", "user.name=test", "-c", "user.email=test@example.com"]
    for args in (["init", "-q"], ["add", "."], ["commit", "-q", "-m", "the scripts"]):
        subprocess.run(git + args, check=True, capture_output=True)
    return dst


def test_launch_dry_run_prints_every_aws_call_and_the_user_data(tmp_path):
    env = {"DRY_RUN": "1", "INSTANCE_TYPE": "g6e.xlarge", "KEY_NAME": "mykey", "S3_DATA": "s3://data/imagenet",
           "S3_RUNS": "s3://runs/ec2", "MY_IP": "198.51.100.7",
           "STATE_DIR": str(tmp_path / "state"), "RUN": "run1"}
    p = sh(["launch"], env)
    calls = p.stderr
    for call in ("aws ssm get-parameter --name /aws/service/deeplearning/ami/", "aws iam create-role",
                 "aws iam put-role-policy", "aws iam create-instance-profile", "aws ec2 create-security-group",
                 "CidrIp=198.51.100.7/32", "aws ec2 run-instances --image-id ami-DRYRUN --instance-type g6e.xlarge",
                 "MarketType=spot", "VolumeSize=400,VolumeType=gp3", "--- user-data ---", "resnet-run.service"):
        assert call in calls, call
    assert not (tmp_path / "state").exists() or not list((tmp_path / "state").iterdir())
    p = sh(["launch"], {**env, "INSTANCE_TYPE": ""}, check=False)
    assert p.returncode == 2 and "set INSTANCE_TYPE" in p.stderr


RECORDER = """#!/usr/bin/env python3
# a stand-in trainer that records its command line and ends the run
import json, os, sys
out = sys.argv[sys.argv.index("--out") + 1]
os.makedirs(out, exist_ok=True)
json.dump(sys.argv[1:], open(os.path.join(out, "seen.json"), "w"))
open(os.path.join(out, "status"), "w").write("done\\n")
"""


def test_a_reclaimed_run_continues_on_another_instance_type_with_its_flags_and_its_budget(tmp_path, moto, imds):
    """p4d reclaimed, continue on a g5.12xlarge: `resume` launches the new type at its own price; there, `train`
    restores the run from S3 and continues it with the flags of its checkpoint's command line (a flag given again
    wins), and the money counts both instances against BUDGET_USD (spent.json, which travels with the run)."""
    import model
    aws(moto, "s3", "mb", "s3://elastic-runs")
    first = tmp_path / "first" / "r50"
    first.mkdir(parents=True)
    argv = ["--data", "/mnt/imagenet", "--epochs", "16", "--batch-size", "128", "--hourly-usd", "21.96"]
    model.save_checkpoint(dict(model.OPTIONAL, model={}, argv=argv), first / "last.pt")
    (first / "spent.json").write_text(json.dumps({"i-first": dict(hours=1.5, hourly_usd=20.0, usd=30.0)}))
    aws(moto, "s3", "sync", str(first), "s3://elastic-runs/ec2/r50")
    env = {"DRY_RUN": "1", "INSTANCE_TYPE": "g5.12xlarge", "HOURLY_USD": "5.672", "KEY_NAME": "k", "RUN": "r50",
           "S3_DATA": "s3://data/imagenet", "S3_RUNS": "s3://elastic-runs/ec2",
           "MY_IP": "198.51.100.7", "STATE_DIR": str(tmp_path / "state"), "BUDGET_USD": "100"}
    p = sh(["resume"], env)
    assert "--instance-type g5.12xlarge" in p.stderr and "HOURLY_USD=5.672" in p.stderr and "BUDGET_USD=100" in p.stderr
    # the new instance, an hour after its launch
    IMDS.pending = (datetime.now(timezone.utc) - timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    out = tmp_path / "second" / "r50"
    env = {**moto, "FOREGROUND": "1", "OUT": str(out), "S3_RUNS": "s3://elastic-runs/ec2", "IMDS_URL": imds,
           "TRAIN_CMD": write_trainer(tmp_path, RECORDER), "HOURLY_USD": "5.672", "BUDGET_USD": "100",
           "VENV": str(Path(sys.executable).parent.parent), "DATA_DIR": str(tmp_path / "data")}
    p = sh(["train", "--batch-size", "64"], env, timeout=90)
    assert "the run's flags from" in p.stderr and "given again: --batch-size 64" in p.stderr
    seen = json.loads((out / "seen.json").read_text())
    assert seen[seen.index("--epochs") + 1] == "16" and "/mnt/imagenet" not in seen and "21.96" not in seen  # this
    # instance's data and price, not the old one's (TRAIN_CMD stands in for "torchrun train.py --data DATA_DIR ...")
    assert seen[len(seen) - 1 - seen[::-1].index("--batch-size") + 1] == "64"  # the last --batch-size wins
    status = sh(["status"], env).stdout
    mine, total = map(float, re.search(r"\$([0-9.]+) at \$5.672/h; the run, with its earlier instances "
                                       r"\(spent.json\): \$([0-9.]+)", status).groups())
    assert mine == pytest.approx(5.67, abs=0.05) and total == pytest.approx(30 + mine, abs=0.011), status
    assert set(json.loads((out / "spent.json").read_text())) == {"i-first", "i-0123"}


def test_tunnel_reaches_the_demo_and_tensorboard_over_ssh_only(tmp_path):
    """app.py and TensorBoard listen on the instance's 127.0.0.1 and only SSH is open: `tunnel` forwards local ports
    to them over SSH; the security group is not touched (launch opens port 22 alone)."""
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "r50.instance").write_text("i-0abc\n")
    env = {"DRY_RUN": "1", "STATE_DIR": str(tmp_path / "state"), "RUN": "r50", "KEY_FILE": "/k.pem"}
    p = sh(["tunnel"], env)
    assert ("+ ssh -i /k.pem -o StrictHostKeyChecking=accept-new -o ExitOnForwardFailure=yes -N -L "
            "7860:127.0.0.1:7860 -L 6006:127.0.0.1:6006 ubuntu@203.0.113.1") in p.stdout
    assert "-L 8080:127.0.0.1:8080 " in sh(["tunnel", "8080"], env).stdout
    p = sh(["tunnel", "http"], env, check=False)
    assert p.returncode == 2 and "tunnel takes port numbers" in p.stderr
    assert "authorize-security-group-ingress" not in p.stderr + p.stdout


def test_tunnel_starts_what_it_forwards_to(tmp_path):
    """Nothing started app.py or TensorBoard on a launched instance, and Ubuntu 24.04 has no `python`: tunnel first
    starts, over SSH, the venv's app.py on the run's best.pt where nothing listens on 7860, and says TensorBoard needs
    --tensorboard; where both listen already, it starts nothing. (ssh runs the command here, in a stand-in home.)"""
    home, bin_ = tmp_path / "instance", tmp_path / "bin"
    (home / "resnet" / "runs" / "r50").mkdir(parents=True)
    (home / "resnet" / "runs" / "r50" / "best.pt").write_text("weights")
    (home / "resnet" / ".venv" / "bin").mkdir(parents=True)
    (home / "resnet" / ".venv" / "bin" / "python").write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/started\n')
    bin_.mkdir()
    (bin_ / "ssh").write_text(f'#!/bin/sh\ncase "$*" in *" -N "*) exit 0 ;; esac\n'
                              f'eval "last=\\${{$#}}"\ncd {home} && HOME={home} bash -c "$last"\n')
    (bin_ / "ss").write_text('#!/bin/sh\ncat "$LISTENING" 2>/dev/null\n')
    for f in [*bin_.iterdir(), home / "resnet" / ".venv" / "bin" / "python"]:
        f.chmod(0o755)
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "r50.instance").write_text("i-0abc\n")
    stub, _ = stub_aws(tmp_path, '*describe-instances*) echo 203.0.113.1 ;;')
    env = {"AWS": stub, "STATE_DIR": str(tmp_path / "state"), "RUN": "r50", "KEY_FILE": "/k.pem",
           "PATH": f"{bin_}:{BIN}:{os.environ['PATH']}", "LISTENING": str(tmp_path / "listening")}
    p = sh(["tunnel"], env)
    for _ in range(50):
        if (tmp_path / "started").exists():
            break
        time.sleep(0.1)
    started = (tmp_path / "started").read_text().split()
    assert started == ["app.py", "--checkpoint", "runs/r50/best.pt", "--port", "7860"]
    assert "started app.py on runs/r50/best.pt" in p.stdout and "no TensorBoard: train with --tensorboard" in p.stdout
    (tmp_path / "started").unlink()
    (tmp_path / "listening").write_text("".join(f"LISTEN 0 128 127.0.0.1:{port} 0.0.0.0:*\n" for port in (7860, 6006)))
    p = sh(["tunnel"], env)
    assert p.stdout == "" and not (tmp_path / "started").exists() and "forwarding 7860 6006" in p.stderr


def test_setup_checks_the_commands_it_needs(tmp_path, imds):
    """Elsewhere a missing command stops setup with one line that names the fix; on an instance (IMDS answers) it
    is installed, with the privileged command through SUDO and APT_GET (here only printed: DRY_RUN)."""
    env = {"NEEDED": "git no-such-tool aws", "AWS": "/bin/false", "PATH": "/usr/bin:/bin", "DRY_RUN": "1",
           "VENV": str(tmp_path / "venv")}
    p = sh(["setup"], env, check=False)
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1] == (
        "run_ec2.sh: error: missing: no-such-tool aws; install them (on Debian or Ubuntu: sudo apt-get install -y "
        "no-such-tool; pip install awscli), then run setup again")
    p = sh(["setup"], {**env, "IMDS_URL": imds, "TRAIN_ARGS": "--epochs 16 --tensorboard"})
    assert "+ sudo apt-get install -y -q no-such-tool" in p.stdout
    assert f"+ {tmp_path}/venv/bin/pip install -q awscli" in p.stdout
    assert f"+ {tmp_path}/venv/bin/pip install -q tensorboard" in p.stdout


def test_the_default_run_is_named_after_the_data_and_the_network(tmp_path):
    """As train.py names its folder: an Imagenette try-out and the ImageNet run never share a folder in S3."""
    env = {"DRY_RUN": "1", "INSTANCE_TYPE": "g6e.xlarge", "KEY_NAME": "k", "S3_DATA": "s3://data/imagenet-1k",
           "S3_RUNS": "s3://runs/ec2", "MY_IP": "198.51.100.7",
           "STATE_DIR": str(tmp_path / "state"), "TRAIN_ARGS": "--arch resnet18 --epochs 16"}
    p = sh(["launch"], env)
    assert "Value=resnet-ec2-imagenet-1k-resnet18" in p.stderr and "/resnet/runs/imagenet-1k-resnet18" in p.stderr
    assert "Value=resnet-ec2-imagenet-1k-resnet50" in sh(["launch"], {**env, "TRAIN_ARGS": ""}).stderr


# -----------------------------------------------------------------------------
# EC2, part 3: the instance store, with stand-ins for every disk command; no test names a real device

DISK_TOOLS = r"""#!/usr/bin/env python3
# stand-ins for lsblk, wipefs, mkfs.ext4, mdadm and mount: they read the disks from STORE (name:bytes:mountpoint, a
# space between disks; a name ending in * carries a signature, one ending in + a partition), and log every call
import os, sys
tool, args = os.path.basename(sys.argv[0]), sys.argv[1:]
open(os.environ["DISK_LOG"], "a").write(" ".join([tool, *args]) + "\n")
disks = [d.split(":") for d in os.environ.get("STORE", "").split()]
plain = lambda name: name.rstrip("*+")
if tool == "lsblk" and "-P" in args:
    print('NAME="nvme0n1" MODEL="Amazon Elastic Block Store" SIZE="107374182400" MOUNTPOINT="/" TYPE="disk"')
    for name, size, mp in disks:
        print(f'NAME="{plain(name)}" MODEL="Amazon EC2 NVMe Instance Storage" SIZE="{size}" MOUNTPOINT="{mp}" '
              'TYPE="disk"')
elif tool == "lsblk":
    name = args[-1].split("/")[-1]
    disk = next(d for d in disks if plain(d[0]) == name)
    print(disk[2] if "MOUNTPOINT" in args else plain(disk[0]))
    if "NAME" in args and disk[0].endswith("+"):
        print(plain(disk[0]) + "p1")
elif tool == "wipefs":
    name = args[-1].split("/")[-1]
    if any(d[0] == name + "*" for d in disks):
        print(f"DEVICE OFFSET TYPE UUID LABEL\n{name} 0x438 ext4 1234 somebody-else")
"""


@pytest.fixture(scope="module")
def two_manifests(moto):
    """Shards in S3 whose manifests say full-size ImageNet (147 GB) and a shrunk copy (60 GB)."""
    aws(moto, "s3", "mb", "s3://disk-test")
    for name, gb in (("shards", 147), ("shards-shorter320", 60)):
        subprocess.run([str(Path(BIN) / "aws"), "s3", "cp", "-", f"s3://disk-test/imagenet/{name}/manifest.json"],
                       input=json.dumps({"bytes": gb * 10**9, "shards": []}), text=True, check=True,
                       env={**os.environ, **moto})


@pytest.fixture
def disk_tools(tmp_path, moto, two_manifests):
    """The stand-ins on their own paths, and the settings that point run_ec2.sh at them and at the manifests."""
    d = tmp_path / "disk-bin"
    d.mkdir()
    for tool in ("lsblk", "wipefs", "mkfs.ext4", "mdadm", "mount"):
        (d / tool).write_text(DISK_TOOLS)
        (d / tool).chmod(0o755)
    return {**moto, "LSBLK": str(d / "lsblk"), "WIPEFS": str(d / "wipefs"), "MKFS": str(d / "mkfs.ext4"),
            "MDADM": str(d / "mdadm"), "MOUNT": str(d / "mount"), "SUDO": "", "DISK_LOG": str(tmp_path / "disk.log"),
            "FSTAB": str(tmp_path / "fstab"), "S3_DATA": "s3://disk-test/imagenet", "DATA_DIR": str(tmp_path / "data"),
            "SHARDS": "s3://disk-test/imagenet/shards",  # asked for full size (SHRINK= at prepare)
            "OUT": str(tmp_path / "out"), "DRY_RUN": "1"}


@pytest.mark.parametrize("store,fmt,expected", [
    ("nvme1n1:1000000000000:", "1", ["mkfs.ext4 -q -L resnet-data /dev/nvme1n1", "mount -o noatime /dev/nvme1n1 {data}",
                                     "append to {fstab}: LABEL=resnet-data {data} ext4 defaults,noatime,nofail 0 2",
                                     "shards.py unpack s3://disk-test/imagenet/shards {data}"]),
    ("nvme1n1:1000000000000: nvme2n1:1000000000000:", "1",
     ["mdadm --create /dev/md/resnet-data --level=0 --raid-devices=2 /dev/nvme1n1 /dev/nvme2n1 --run",
      "mkfs.ext4 -q -L resnet-data /dev/md/resnet-data", "(/dev/nvme1n1 /dev/nvme2n1, RAID 0) formatted and mounted"]),
    ("", "1", ["no instance store on this instance: DATA_DIR stays on the root volume",
               "shards.py unpack s3://disk-test/imagenet/shards"]),
    ("nvme1n1:125000000000:", "1", ["staging s3://disk-test/imagenet/shards-shorter320 (60 GB)",
                                    "mkfs.ext4 -q -L resnet-data /dev/nvme1n1"]),  # g4dn.xlarge: the shrunk copy
    ("nvme1n1:3800000000000:/opt/dlami/nvme", "1",
     ["mkdir -p /opt/dlami/nvme/imagenet", "ln -s /opt/dlami/nvme/imagenet {data}", "mounted at /opt/dlami/nvme"]),
    ("nvme1n1:1000000000000:", "0",
     ["only launch's user-data formats it (FORMAT_STORE=1): DATA_DIR stays on the root"]),
])
def test_data_puts_the_shards_on_the_instance_store(disk_tools, store, fmt, expected, tmp_path):
    """One device is formatted and mounted at DATA_DIR (and in fstab, nofail); several are striped; none, or a hand
    run of data, leaves DATA_DIR on the root volume and formats nothing; a store too small for full-size ImageNet
    gets the shrunk copy; a store the AMI mounted is used as it is. (DRY_RUN: the commands are shown.)"""
    p = sh(["data"], {**disk_tools, "STORE": store, "FORMAT_STORE": fmt})
    shown = p.stdout + p.stderr
    for line in expected:
        assert line.format(data=tmp_path / "data", fstab=tmp_path / "fstab") in shown, shown
    calls = (tmp_path / "disk.log").read_text() if (tmp_path / "disk.log").exists() else ""
    assert "mkfs" not in calls and "mount " not in calls and "mdadm" not in calls  # DRY_RUN ran none of them
    if fmt == "0" or not store:
        assert "mkfs" not in shown and "mdadm" not in shown


def test_data_stages_the_shards_prepare_makes_by_default(disk_tools):
    """prepare shrinks by default (to a 320 px shorter side: it cost no measurable top-1), and data stages those
    first, even where the full-size ones would fit."""
    env = {k: v for k, v in disk_tools.items() if k != "SHARDS"}
    p = sh(["data"], {**env, "STORE": "nvme1n1:1000000000000:", "FORMAT_STORE": "1"})
    assert "staging s3://disk-test/imagenet/shards-shorter320 (60 GB)" in p.stderr


def test_a_disk_with_a_signature_is_never_formatted(disk_tools, tmp_path):
    """A device that carries anything (a filesystem, a partition table, a RAID or LVM member) is refused with one
    line, even with FORMAT_STORE=1 and not in DRY_RUN; and nothing is mounted over a non-empty DATA_DIR."""
    env = {**disk_tools, "DRY_RUN": "0", "FORMAT_STORE": "1"}
    for store, expected in (("nvme1n1:1000000000000: nvme2n1*:1000000000000:", "/dev/nvme2n1 carries a signature"),
                            ("nvme1n1+:1000000000000:", "/dev/nvme1n1 carries a signature (wipefs -n /dev/nvme1n1 "
                                                        "lists it) or partitions")):
        p = sh(["data"], {**env, "STORE": store}, check=False)
        assert p.returncode == 2 and expected in p.stderr.strip().splitlines()[-1], p.stderr
        calls = (tmp_path / "disk.log").read_text().splitlines()
        assert not [c for c in calls if c.split()[0] in ("mkfs.ext4", "mdadm", "mount")]
    (tmp_path / "data").mkdir(exist_ok=True)
    (tmp_path / "data" / "notes.txt").write_text("the user's")
    p = sh(["data"], {**env, "STORE": "nvme1n1:1000000000000:"}, check=False)
    assert p.returncode == 2 and "is not empty: the instance store is not mounted over it" in p.stderr
    assert (tmp_path / "data" / "notes.txt").read_text() == "the user's"


def test_launch_without_an_instance_store_asks_for_a_faster_gp3(tmp_path, clone):
    """A type with no instance store keeps the data on its root volume: launch asks gp3 for its EBS link's baseline
    throughput and IOPS, and says what that adds an hour. (EC2 answers c6i.4xlarge's facts, as DescribeInstanceTypes
    gives them: no store, 625 MB/s, 20,000 IOPS; the CLI's arguments are read.)"""
    stub, log = stub_aws(tmp_path, '*describe-instance-types*) printf "16\\tNone\\t625\\t20000\\n" ;;')
    env = {"AWS": stub, "INSTANCE_TYPE": "c6i.4xlarge", "KEY_NAME": "k", "S3_DATA": "s3://no-shards/imagenet",
           "S3_RUNS": "s3://runs/ec2", "MY_IP": "198.51.100.7",
           "STATE_DIR": str(tmp_path / "state"), "RUN": "gp3", "HOURLY_USD": "0.68", "CHECK": "0"}
    p = sh(["launch"], env, script=clone)
    assert "c6i.4xlarge has no instance store: the root volume gets gp3's 625 MB/s and 16000 IOPS" in p.stderr
    run_instances = [line for line in log.read_text().splitlines() if "run-instances" in line][0]
    assert "Ebs={VolumeSize=400,VolumeType=gp3,Throughput=625,Iops=16000,DeleteOnTermination=true}" in run_instances
    assert "which adds $0.116/h" in p.stderr  # ((625 - 125) MB/s x $0.04 + (16000 - 3000) IOPS x $0.005) / 730 h


def test_status_counts_the_wait_from_launch_to_the_first_step(tmp_path, imds):
    """Boot, setup, data (alongside setup) and the first step, from OUT/timeline.jsonl (kept with the run, so a
    reboot or a reclaim keeps it) and train.py's "first step at" line."""
    now = time.time()
    IMDS.pending = datetime.fromtimestamp(now - 600, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    out = tmp_path / "out"
    out.mkdir()
    moments = dict(setup_start=540, data_start=540, setup_end=420, data_end=360, train_start=355)
    (out / "timeline.jsonl").write_text("".join(json.dumps({"event": e, "t": round(now - ago)}) + "\n"
                                                for e, ago in moments.items()))
    first = datetime.fromtimestamp(now - 300, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    (out / "train.log").write_text(f"first step at {first}, 40 s after train.py started\n")
    p = sh(["status"], {"IMDS_URL": imds, "OUT": str(out), "HOURLY_USD": "4"})
    assert ("launch to first step: 5.0 min (boot 1.0 min, setup 2.0 min, data 3.0 min (alongside setup), first "
            "step 1.0 min after both)") in p.stdout, p.stdout


def test_prepare_launches_a_cpu_instance_that_may_write_the_shards_alone(tmp_path):
    """PREPARE=1 launch: a role that reads S3_DATA and writes its shards' prefix alone (multipart uploads too), an
    instance that runs prepare and terminates itself on shutdown; the training role stays read-only on S3_DATA."""
    env = {"DRY_RUN": "1", "PREPARE": "1", "INSTANCE_TYPE": "c7i.4xlarge", "KEY_NAME": "k",
           "S3_DATA": "s3://data/imagenet", "MY_IP": "198.51.100.7",
           "STATE_DIR": str(tmp_path / "state")}
    p = sh(["launch"], env)

    def policy(role):
        pattern = rf"put-role-policy --role-name {role} --policy-name {role}-s3 --policy-document (\{{.*?\n\]\}})"
        doc = re.search(pattern, p.stderr, re.S)
        return {s["Sid"]: (s["Action"], s["Resource"]) for s in json.loads(doc.group(1))["Statement"]}

    grants = policy("resnet-ec2-prepare-imagenet")  # one role a dataset
    assert grants["WriteShards"] == (["s3:PutObject", "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts"],
                                     "arn:aws:s3:::data/imagenet/shards-shorter320/*")
    assert grants["ReadData"] == ("s3:GetObject", "arn:aws:s3:::data/imagenet/*")
    writes = [r for a, r in grants.values() for a in ([a] if isinstance(a, str) else a) if a == "s3:PutObject"]
    assert writes == ["arn:aws:s3:::data/imagenet/shards-shorter320/*"]
    assert "--instance-initiated-shutdown-behavior terminate" in p.stderr and "PREPARE=1" in p.stderr
    assert "Name=resnet-ec2-prepare-imagenet" in p.stderr and "VolumeSize=250" in p.stderr
    p = sh(["launch"], {**env, "PREPARE": "0", "S3_RUNS": "s3://runs/ec2", "INSTANCE_TYPE": "g6e.xlarge"})
    training = policy("resnet-ec2-imagenet-resnet50")  # one role a run
    assert {a for a, _ in training.values() for a in ([a] if isinstance(a, str) else a)} == \
        {"s3:ListBucket", "s3:GetObject", "s3:PutObject"}
    assert training["ReadWriteRun"][1] == "arn:aws:s3:::runs/ec2/imagenet-resnet50/*"  # the only write: the run's own


# -----------------------------------------------------------------------------
# EC2, part 4: under faults. However an instance's work ends, the end step (the final backup and ended.json, why it
# ended) and a shutdown follow; no run loses or mixes its data. SHUTDOWN is conftest's stand-in, always.

@pytest.fixture(scope="module")
def instance_repo(tmp_path_factory):
    return git_repo_of_the_working_tree(tmp_path_factory.mktemp("instance") / "repo")


@pytest.fixture(scope="module")
def service_buckets(moto):
    for bucket in ("s3://svc-data", "s3://svc-runs"):
        aws(moto, "s3", "mb", bucket)


@pytest.fixture(scope="module")
def code_url(moto, service_buckets, instance_repo):
    """What launch ships: a git archive of a clone's commit, in S3 (the service cases' own, not the working tree's)."""
    archive = subprocess.run(["git", "-C", str(instance_repo), "archive", "--format=tar.gz", "HEAD"],
                             capture_output=True, check=True).stdout
    subprocess.run([str(Path(BIN) / "aws"), "s3", "cp", "-", "s3://svc-runs/code/instance.tar.gz"], input=archive,
                   check=True, env={**os.environ, **moto})
    return "s3://svc-runs/code/instance.tar.gz"


def service(tmp_path, moto, repo, launch=None, **extra):
    """launch's user-data for run svc-<the test's folder> (made by DRY_RUN=1 launch with `launch`'s settings), run here
    as the instance would run it at its first boot (BOOT_ROOT, a systemctl that records), then its service once, as
    systemd would, with the settings `extra` appended to its env file (stand-ins: a trainer, a GPU, a venv; repo: the
    code's URL in S3). Returns (the service's process, the shutdown stand-in's calls, ended.json from S3 or None)."""
    home, boot, fake = tmp_path / "home", tmp_path / "boot", tmp_path / "instance-bin"
    fake.mkdir()
    (fake / "systemctl").write_text("#!/bin/sh\nexit 0\n")
    (fake / "nvidia-smi").write_text('#!/bin/sh\necho "GPU 0: NVIDIA L40S (UUID: GPU-0)"\n')
    for f in fake.iterdir():
        f.chmod(0o755)
    settings = {"DRY_RUN": "1", "INSTANCE_TYPE": "g6e.xlarge", "KEY_NAME": "k", "S3_DATA": "s3://svc-data/imagenet",
                "S3_RUNS": "s3://svc-runs/ec2", "MY_IP": "198.51.100.7",
                "RUN": f"svc-{tmp_path.name}",
                "STATE_DIR": str(tmp_path / "state"), "REMOTE_USER": "root", "REMOTE_HOME": str(home),
                "DATA_DIR": str(tmp_path / "data"), "HOURLY_USD": "2", **(launch or {})}
    p = sh(["launch"], settings)
    user_data = p.stderr.split("--- user-data ---\n")[1].split("\n--- end of user-data ---")[0]
    subprocess.run(["bash", "-c", user_data], check=True,
                   env={**os.environ, "BOOT_ROOT": str(boot), "SYSTEMCTL": str(fake / "systemctl")})
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / ".run_ec2_data_done").touch()  # staged (a test of data failing removes this)
    env = {**moto, "CODE_URL": repo, "VENV": str(fake_venv(tmp_path / "venv")),
           "PATH": f"{fake}:{BIN}:{os.environ['PATH']}",
           "SUDO": "", "JOURNAL": "echo the journal's last line", "RESTART_DELAY_S": "0", "MIN_SHM_GB": "0",
           "IMDS_URL": "http://127.0.0.1:9", **extra}
    with open(boot / "etc/resnet-run.env", "a") as f:
        f.writelines(f"{k}={shlex.quote(v)}\n" for k, v in env.items())
    shutdowns = tmp_path / "shutdown.log"
    p = subprocess.run([str(boot / "usr/local/bin/resnet-run")], capture_output=True, text=True, timeout=120,
                       env={**{k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "TMUX")},
                            "SHUTDOWN_LOG": str(shutdowns)})
    calls = shutdowns.read_text().splitlines() if shutdowns.exists() else []
    where = "s3://svc-data/imagenet/shards-shorter320" if settings.get("PREPARE") == "1" else \
        f"s3://svc-runs/ec2/{settings['RUN']}"
    got = s3_object(moto, f"{where}/ended.json", remove=True)  # the next prepare's record is its own
    return p, calls, json.loads(got) if got is not None else None


def s3_object(moto, url, remove=False):
    """An object's bytes from moto's S3, or None, through boto3 in this process (the CLI costs a second a call)."""
    import boto3
    bucket, key = url[len("s3://"):].split("/", 1)
    s3 = boto3.client("s3", endpoint_url=moto["AWS_ENDPOINT_URL"], region_name="us-east-1",
                      aws_access_key_id="test", aws_secret_access_key="test")
    try:
        body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    except s3.exceptions.NoSuchKey:
        return None
    if remove:
        s3.delete_object(Bucket=bucket, Key=key)
    return body


STOPPER = """#!/usr/bin/env python3
# a stand-in trainer whose user runs ./run_ec2.sh stop on the instance while it trains; on SIGTERM it checkpoints
import os, signal, subprocess, sys, time
out = sys.argv[sys.argv.index("--out") + 1]
def stop(*a):
    open(os.path.join(out, "last.pt"), "w").write("the checkpoint written on SIGTERM")
    open(os.path.join(out, "status"), "w").write("preempted\\n")
    sys.exit(75)
signal.signal(signal.SIGTERM, stop)
time.sleep(0.5)  # the loop has written its pid file
subprocess.run([os.path.join(os.environ["REPO"], "run_ec2.sh"), "stop"])  # the clone, where the user is
time.sleep(60)
"""

HANGS = """#!/usr/bin/env python3
# a stand-in trainer that logs a step, then hangs (a stuck NCCL call) and ignores SIGTERM
import signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("epoch 1/3 step 1/10 loss 2.3", flush=True)
time.sleep(120)
"""


@pytest.mark.parametrize("case", ["done, KEEP_ALIVE=1", "bad_input", "diverged", "crashed, no progress",
                                  "MAX_RESTARTS", "hung", "the budget", "a user's stop", "a spot notice",
                                  "the code does not arrive", "setup fails", "data fails", "MAX_HOURS passed",
                                  "prepare: the code does not arrive", "prepare: its time limit"])
def test_every_end_of_a_launched_instance_backs_up_says_why_and_shuts_down(case, tmp_path, moto, imds,
                                                                           service_buckets, code_url):
    """Every way the work of a launched instance ends leads to the end step, then a shutdown: the final backup,
    ended.json in S3 saying why (the loop's word, or the stage that failed, and the journal's last lines), then
    `shutdown now` (the instance terminates on shutdown), after the lifetime scheduled at its start; with
    KEEP_ALIVE=1 it stays up. Before, only prepare had an EXIT trap, set after its clone of the code."""
    trainer = write_trainer(tmp_path, STAND_IN)
    launch, extra, expect = {}, {"TRAIN_CMD": trainer}, {}
    if case == "done, KEEP_ALIVE=1":
        launch, extra["SEQUENCE"], expect = {"KEEP_ALIVE": "1"}, "done+", dict(status="done", stage="train")
    elif case in ("bad_input", "diverged"):
        extra["SEQUENCE"], expect = case, dict(status=case, stage="train")
    elif case == "crashed, no progress":
        extra["SEQUENCE"], expect = "crashed", dict(status="crashed", stage="train", why="no progress")
    elif case == "MAX_RESTARTS":
        extra.update(SEQUENCE="preempted+ preempted+ preempted+", MAX_RESTARTS="1")
        expect = dict(status="preempted", why="giving up after 1 restarts")
    elif case == "hung":
        extra.update(TRAIN_CMD=write_trainer(tmp_path, HANGS), HANG_S="1", HANG_POLL_S="0.2", KILL_WAIT_S="1")
        expect = dict(status="hung", why="no progress")
    elif case == "the budget":  # the run's earlier instances spent it all: a new one does not start training
        run = tmp_path / "earlier"
        run.mkdir()
        (run / "last.pt").write_text("a checkpoint")
        (run / "spent.json").write_text(json.dumps({"i-earlier": dict(hours=5, hourly_usd=2, usd=10)}))
        aws(moto, "s3", "sync", str(run), f"s3://svc-runs/ec2/svc-{tmp_path.name}")
        launch = {"BUDGET_USD": "8"}
        expect = dict(status="stopped", why="BUDGET_USD=$8 spent")
    elif case == "a user's stop":
        extra["TRAIN_CMD"], expect = write_trainer(tmp_path, STOPPER), dict(status="stopped", why="run_ec2.sh stop")
    elif case == "a spot notice":
        IMDS.notice_at = 0  # already given when the loop starts: no trainer is started (the mid-run notice: above)
        extra.update(TRAIN_CMD=write_trainer(tmp_path, PREEMPTIBLE), IMDS_URL=imds, SPOT_POLL_S="0.2")
        expect = dict(status="preempted", why="spot interruption")
    elif case in ("the code does not arrive", "prepare: the code does not arrive"):
        launch, extra["CODE_URL"] = {"PREPARE": "1" if "prepare" in case else "0"}, "s3://svc-runs/code/missing.tar.gz"
        expect = dict(status="failed", stage="code")
    elif case == "setup fails":
        extra["NEEDED"], expect = "git no-such-tool", dict(status="failed", stage="setup")
    elif case == "data fails":
        (tmp_path / "data-elsewhere").mkdir()
        extra["DATA_DIR"], launch = str(tmp_path / "data-elsewhere"), {"S3_DATA": "s3://no-such-bucket/imagenet"}
        expect = dict(status="failed", stage="data")
    elif case == "MAX_HOURS passed":
        extra["DEADLINE"], expect = "1", dict(status="failed", stage="lifetime")
    elif case == "prepare: its time limit":
        aws(moto, "s3", "cp", str(ROOT / "LICENSE"), "s3://svc-data/imagenet/train/n0/a.JPEG")
        launch, extra["PREPARE_HOURS"] = {"PREPARE": "1"}, "0.0003"  # about 1 s
        extra["AWS"] = write_trainer(tmp_path, f"#!/bin/sh\ncase \"$*\" in *manifest.json*) sleep 30 ;; esac\n"
                                               f'exec {BIN}/aws "$@"\n')  # an S3 that never answers prepare
        expect = dict(status="failed", stage="prepare", why="its time limit passed")
    p, shutdowns, ended = service(tmp_path, moto, code_url, launch, **extra)
    assert ended is not None, p.stderr[-3000:]
    assert ended["status"] == expect["status"] and ended.get("stage", "train") == expect.get("stage", "train"), ended
    assert expect.get("why", "") in ended["why"], ended
    if expect.get("stage", "train") in ("train", "data", "setup"):  # the code ran the end step (not before the clone)
        assert ended["backup"] in ("ok", "none: S3_RUNS is not set") or "prepare" in case, ended
        assert ended["journal"] == ["the journal's last line"]
    keep = case.startswith("done, KEEP_ALIVE")
    assert ("now" in shutdowns) != keep and shutdowns[-1:] == (shutdowns[:1] if keep else ["now"]), \
        (shutdowns, p.stderr[-2000:])
    if case != "MAX_HOURS passed":  # the lifetime was scheduled first (MAX_HOURS: 72 h, or the budget's hours + 1)
        assert shutdowns[0].startswith("+"), shutdowns
    if keep:  # ... and its finish step failed (the stand-in trainer writes no best.pt): said, and the end went on
        assert ended["keep_alive"] and "KEEP_ALIVE=1: the instance stays up" in p.stderr
        assert ended["finish"] == {"ok": False, "failed": ["no best.pt"], "seconds": 0}, ended


def test_a_user_data_that_fails_before_its_service_shuts_the_instance_down(tmp_path):
    """A failure in the user-data itself (before systemd runs the service) would leave the instance idle at full
    price: its EXIT trap shuts it down, unless KEEP_ALIVE=1."""
    env = {"DRY_RUN": "1", "INSTANCE_TYPE": "g6e.xlarge", "KEY_NAME": "k", "S3_DATA": "s3://d/imagenet",
           "S3_RUNS": "s3://r/ec2", "MY_IP": "198.51.100.7",
           "STATE_DIR": str(tmp_path / "state"), "HOURLY_USD": "2"}
    for keep, expected in (("0", ["now"]), ("1", [])):
        p = sh(["launch"], {**env, "KEEP_ALIVE": keep})
        user_data = p.stderr.split("--- user-data ---\n")[1].split("\n--- end of user-data ---")[0]
        log = tmp_path / f"shutdown-{keep}.log"
        run = subprocess.run(["bash", "-c", user_data], capture_output=True, text=True,
                             env={**os.environ, "BOOT_ROOT": str(tmp_path / f"boot{keep}"), "SYSTEMCTL": "false",
                                  "SHUTDOWN_LOG": str(log)})
        assert run.returncode != 0 and "failed before its service started" in run.stderr
        assert (log.read_text().splitlines() if log.exists() else []) == expected


def test_the_backup_survives_a_failed_sync_and_status_says_when_the_last_good_one_was(tmp_path):
    """An S3 outage longer than the CLI's retries (or AccessDenied) made one `aws s3 sync` fail, and the backup
    helper died of it (set -e): nothing was backed up from then on, silently. Now it says so, tries again at the next
    round, and keeps the time of the last good backup, which status shows."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "last.pt").write_text("a checkpoint")
    failing, calls = tmp_path / "s3-is-down", tmp_path / "aws.log"
    fake = tmp_path / "aws"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n'
                    f'if [ -e {failing} ]; then echo "An error occurred (AccessDenied)" >&2; exit 1; fi\n')
    fake.chmod(0o755)
    failing.touch()
    loop = subprocess.Popen(["sleep", "60"])  # stands in for the restart loop: the backup runs while it does
    (out / "loop.pid").write_text(pid_line(loop.pid))
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "OUT": str(out), "S3_RUNS": "s3://runs/ec2",
           "AWS": str(fake), "BACKUP_MIN": "0"}
    helper = subprocess.Popen([SCRIPT, "backup"], stderr=subprocess.PIPE, text=True, env=env)
    try:
        for _ in range(200):
            if calls.exists() and len(calls.read_text().splitlines()) >= 3:
                break
            time.sleep(0.05)
        assert helper.poll() is None  # three failed syncs, and still running
        status = sh(["status"], {"OUT": str(out), "S3_RUNS": "s3://runs/ec2", "AWS": str(fake)}).stdout
        assert "last good backup to s3://runs/ec2: never" in status
        failing.unlink()  # S3 is back
        for _ in range(200):
            if (out / "backup.ok").exists():
                break
            time.sleep(0.05)
        assert (out / "backup.ok").exists()
        status = sh(["status"], {"OUT": str(out), "S3_RUNS": "s3://runs/ec2", "AWS": str(fake)}).stdout
        assert "last good backup to s3://runs/ec2: 0 min ago" in status
    finally:
        loop.kill()
        loop.wait()
    assert helper.wait(timeout=20) == 0  # the loop is gone: it syncs once more and stops
    assert "backup to s3://runs/ec2 failed at" in helper.stderr.read()


SWAPPING_AWS = """#!/usr/bin/env python3
# a stand-in for `aws s3 sync SRC DEST` that uploads last.pt as the CLI's multipart upload does, reopening the file by
# name for each part, while train.py replaces it between the two parts (os.replace, as a timed save does)
import os, sys
src = sys.argv[3]
with open(os.path.join(src, "last.pt"), "rb") as f:
    first = f.read(5)
new = os.path.join(os.environ["OUT"], "last.pt.tmp")
open(new, "wb").write(b"NEWER-checkpoint-2222")
os.replace(new, os.path.join(os.environ["OUT"], "last.pt"))
with open(os.path.join(src, "last.pt"), "rb") as f:
    f.seek(5)
    rest = f.read()
open(os.environ["UPLOADED"], "wb").write(first + rest)
"""


def test_a_checkpoint_replaced_mid_upload_reaches_s3_whole(tmp_path):
    """The CLI's multipart upload opens last.pt again for each part: a timed save that replaced it mid-upload put
    parts of two checkpoints into one S3 object. The backup now syncs hard links to OUT's files, taken before the sync,
    so the object is the old checkpoint whole (the new one goes up at the next round)."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "last.pt").write_bytes(b"OLDER-checkpoint-1111")
    env = {"OUT": str(out), "S3_RUNS": "s3://runs/ec2", "AWS": write_trainer(tmp_path, SWAPPING_AWS),
           "UPLOADED": str(tmp_path / "uploaded")}
    sh(["backup"], env)
    assert (tmp_path / "uploaded").read_bytes() == b"OLDER-checkpoint-1111"  # not b"OLDER-checkpoint-2222"
    assert (out / "last.pt").read_bytes() == b"NEWER-checkpoint-2222"  # train.py's new file, untouched
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".backup")] == []  # its links, gone


def test_a_pid_file_from_elsewhere_names_nothing_to_signal(tmp_path, imds):
    """trainer.pid and loop.pid come back from S3 with the run, written on another instance: their pids are some
    other program here. stop, the spot watcher and status used to signal or trust them; now a pid counts only when
    its start time and this boot's id match."""
    bystander = subprocess.Popen(["sleep", "60"])  # a process of somebody else's that has the pid in the file
    out = tmp_path / "out"
    out.mkdir()
    try:
        line = pid_line(bystander.pid).split()
        for stale in (f"{bystander.pid}\n",  # written before pids had stamps
                      f"{line[0]} {line[1]} another-boot\n", f"{line[0]} 1 {line[2]}\n"):  # another boot, process
            for name in ("trainer.pid", "loop.pid"):
                (out / name).write_text(stale)
            p = sh(["stop"], {"OUT": str(out)})
            assert "nothing to stop" in p.stderr and not (out / "stop_request").exists()
            assert "trainer: not running" in sh(["status"], {"OUT": str(out)}).stdout
            IMDS.notice_at = 0  # a spot notice: the watcher stops the trainer, if there is one
            sh(["watch-spot"], {"OUT": str(out), "IMDS_URL": imds, "S3_RUNS": "s3://runs/ec2",
                                "PATH": recording_aws(tmp_path)}, timeout=30)
            assert bystander.poll() is None, stale  # never signalled
    finally:
        bystander.kill()
        bystander.wait()


def test_the_budget_guard_survives_a_torn_log_and_kills_a_trainer_that_ignores_sigterm(tmp_path):
    """A torn last line of log.jsonl (a kill mid-write) made costs fail, which ended the guard (set -e): the run went
    on unguarded. And a trainer that ignored SIGTERM was waited on for 300 s, then left running. Now the line is
    skipped and, KILL_WAIT_S after SIGTERM, the trainer and everything below it get SIGKILL."""
    out = tmp_path / "out"
    out.mkdir()
    row = json.dumps(dict(epoch=0, epochs=10, epoch_s=600, val_top1=12.5))
    (out / "log.jsonl").write_text(row + "\n" + row[:20])  # torn
    (out / "spent.json").write_text(json.dumps({"i-earlier": dict(hours=10, hourly_usd=2, usd=20)}))
    deaf = subprocess.Popen([sys.executable, "-c", "import signal, subprocess, time\n"
                             "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                             "subprocess.Popen(['sleep', '60'])\n"  # a rank of its own
                             "time.sleep(60)\n"])
    time.sleep(0.3)
    (out / "trainer.pid").write_text(pid_line(deaf.pid))
    threading.Thread(target=deaf.wait, daemon=True).start()
    try:
        p = sh(["budget"], {"OUT": str(out), "HOURLY_USD": "2", "BUDGET_USD": "15", "KILL_WAIT_S": "1",
                            "IMDS_URL": "http://127.0.0.1:9"}, timeout=30)
        assert "budget reached" in p.stderr and "SIGKILL to it and its processes" in p.stderr
        assert deaf.wait(timeout=5) == -9
        status = sh(["status"], {"OUT": str(out), "HOURLY_USD": "2"}).stdout
        assert "epoch 1: val top-1 12.50%" in status  # the whole rows, the torn one skipped
    finally:
        deaf.kill()
        subprocess.run(["pkill", "-f", "sleep 60"], capture_output=True)


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    """run_ec2.sh in a clone with nothing uncommitted: what launch ships (the working tree may hold changes)."""
    return git_repo_of_the_working_tree(tmp_path_factory.mktemp("clone") / "resnet") / "run_ec2.sh"


def stub_aws(tmp_path, answers=""):
    """An aws CLI that answers what launch asks, as EC2 would (an AMI, a type's disks, nothing existing yet, an
    instance id), plus `answers` (sh case arms, tried first), and records every call, one a line, in tmp_path/aws.log.
    For what moto does not do (spot prices, errors, client tokens), and where a launch need not cost seconds of moto."""
    log = tmp_path / "aws.log"
    stub = tmp_path / "stub-bin" / "aws"
    stub.parent.mkdir(exist_ok=True)
    stub.write_text(f'#!/bin/sh\necho "$*" | tr "\\n" " " >> {log}\necho >> {log}\ncase "$*" in\n{answers}\n'
                    '*get-parameter*) echo ami-0123 ;;\n'
                    '*describe-instance-types*) printf "4\\t250\\t125\\t3000\\n" ;;\n'
                    '*"s3 cp - "*) cat > /dev/null ;;\n'
                    '*get-role*|*get-instance-profile*|*describe-security-groups*) exit 254 ;;\n'
                    '*create-security-group*) echo sg-0123 ;;\n*run-instances*) echo i-0abc ;;\nesac\nexit 0\n')
    stub.chmod(0o755)
    return str(stub), log


def test_a_budget_needs_a_price_and_launch_always_finds_one(tmp_path, clone):
    """With BUDGET_USD set and no HOURLY_USD the guard exited at its start and training ran unguarded, saying so only
    in train.log. Now train refuses, and launch always counts a price: HOURLY_USD, else EC2's current spot price (the
    dearest zone's), else ec2_instances.json's on-demand one (us-east-1's: another REGION is warned); it refuses a
    BUDGET_USD it cannot count against, and records the price it used."""
    p = sh(["train"], {"OUT": str(tmp_path / "out"), "BUDGET_USD": "40", "FOREGROUND": "1"}, check=False)
    assert p.returncode == 2 and "BUDGET_USD=40 needs the instance's price" in p.stderr.strip().splitlines()[-1]
    spot, log = stub_aws(tmp_path, '*describe-spot-price-history*) printf "0.512\\t0.61\\t0.588\\n" ;;')
    env = {"AWS": spot, "INSTANCE_TYPE": "g6e.xlarge", "KEY_NAME": "k", "S3_DATA": "s3://d/imagenet",
           "S3_RUNS": "s3://r/ec2", "MY_IP": "198.51.100.7",
           "STATE_DIR": str(tmp_path / "state"), "RUN": "priced", "BUDGET_USD": "10", "AMI_PARAM": "/x", "CHECK": "0"}
    p = sh(["launch"], env, script=clone)
    assert "the price counted: $0.61/h (EC2's current spot price in us-east-1 (its dearest zone))" in p.stderr
    assert "HOURLY_USD=0.61" in (tmp_path / "state" / "priced.instance").read_text()
    user_data = [line for line in log.read_text().splitlines() if "run-instances" in line][0]
    assert "HOURLY_USD=0.61" in user_data and "MAX_HOURS=17.4" in user_data  # $10 / $0.61 + 1 h: before 72 h
    p = sh(["launch"], {**env, "SPOT": "0", "RUN": "priced2"}, script=clone)
    assert "the price counted: $1.861/h (ec2_instances.json's on-demand price)" in p.stderr
    p = sh(["launch"], {**env, "SPOT": "0", "RUN": "priced3", "REGION": "eu-west-1"}, script=clone)
    assert "warning: 1.861 $/h is ec2_instances.json's on-demand price in us-east-1, not in eu-west-1" in p.stderr
    p = sh(["launch"], {**env, "SPOT": "0", "RUN": "priced4", "INSTANCE_TYPE": "x9.unknown"}, check=False, script=clone)
    assert p.returncode == 2 and "no price known for x9.unknown, and BUDGET_USD needs one: set HOURLY_USD" in p.stderr


def test_status_says_which_helper_is_no_longer_running(tmp_path):
    """The backup, the spot watcher, the budget guard and the watchdog run beside the loop; one that died (it did,
    silently, on a failed sync or a torn log line) is named by status."""
    out = tmp_path / "out"
    out.mkdir()
    loop, gone = subprocess.Popen(["sleep", "60"]), subprocess.Popen(["true"])
    gone.wait()
    try:
        (out / "loop.pid").write_text(pid_line(loop.pid))
        (out / "backup.pid").write_text(pid_line(loop.pid))  # alive
        (out / "budget.pid").write_text(f"{gone.pid} 1 {pid_line(loop.pid).split()[2]}\n")  # dead
        status = sh(["status"], {"OUT": str(out)}).stdout
        assert "warning: the budget helper is no longer running" in status and "the backup helper" not in status
    finally:
        loop.kill()
        loop.wait()


FAILS = """*run-instances*)
    echo call >> "$0.log"
    code=$(echo "$FAILS" | awk -v n="$(wc -l < "$0.log")" '{print $n}')
    if [ "$code" = timeout ]; then echo "Read timeout on endpoint URL" >&2; exit 255; fi
    if [ -n "$code" ]; then
        echo "An error occurred ($code) when calling the RunInstances operation: (a stand-in)" >&2; exit 254
    fi
    echo i-0abc ;;"""


def test_launch_tells_a_quota_from_capacity_and_retries_with_one_client_token(tmp_path, clone):
    """run-instances was retried six times whatever the error, without a client token: a quota error six times, and
    an ambiguous failure (a timeout after EC2 started the instance) could start a second instance nobody recorded.
    Now a quota or an unsupported configuration stops at once with its code and the fix; no capacity moves on to the
    type's next zone, with a client token of its own; a lost answer is retried in the same zone with the same token
    (moto does not enforce tokens, nor tell zones' capacity apart: a stand-in answers, its arguments are checked)."""
    offered = '*describe-instance-type-offerings*) printf "us-east-1a\\tus-east-1b\\n" ;;'
    stub, log = stub_aws(tmp_path, FAILS + "\n" + offered)
    env = {"AWS": stub, "INSTANCE_TYPE": "g5.xlarge", "KEY_NAME": "k", "S3_DATA": "s3://d/x", "S3_RUNS": "s3://r/ec2",
           "MY_IP": "198.51.100.7", "STATE_DIR": str(tmp_path / "state"), "LAUNCH_RETRY_S": "0", "HOURLY_USD": "1",
           "CHECK": "0"}
    for fails, code in (("VcpuLimitExceeded", "VcpuLimitExceeded: g5.xlarge needs more vCPUs"),
                        ("Unsupported", "Unsupported: g5.xlarge cannot be launched so in us-east-1")):
        p = sh(["launch"], {**env, "RUN": "quota", "FAILS": fails}, check=False, script=clone)
        assert p.returncode == 2 and code in p.stderr.strip().splitlines()[-1], p.stderr
        assert log.read_text().count("ec2 run-instances") == 1  # not retried, not in another zone
        log.unlink()
        Path(stub + ".log").unlink()
    p = sh(["launch"], {**env, "RUN": "flaky", "FAILS": "InsufficientInstanceCapacity timeout"}, script=clone)
    tries = [line for line in log.read_text().splitlines() if "ec2 run-instances" in line]
    tokens = [re.search(r"--client-token (\S+)", line).group(1) for line in tries]
    zones = [re.search(r"AvailabilityZone=(\S+)", line).group(1) for line in tries]
    assert zones == ["us-east-1a", "us-east-1b", "us-east-1b"], tries  # no capacity in a; no answer, then b
    assert tokens[0] != tokens[1] == tokens[2]  # a token of its own for each zone, reused by that zone's retry
    assert "InsufficientInstanceCapacity in us-east-1a: trying the next zone" in p.stderr
    assert "no answer in us-east-1b (try 1 of 6)" in p.stderr
    assert (tmp_path / "state" / "flaky.instance").read_text().startswith("i-0abc\n")


def test_launching_one_run_never_changes_another_runs_access(tmp_path):
    """Every launch rewrote the policy of the one shared role: a second run with another S3_RUNS took write access
    away from the first, whose next backup then failed. Each run now has a role of its own, named after it."""
    env = {"DRY_RUN": "1", "INSTANCE_TYPE": "g6e.xlarge", "KEY_NAME": "k", "S3_DATA": "s3://d/imagenet",
           "MY_IP": "198.51.100.7", "STATE_DIR": str(tmp_path / "state"),
           "HOURLY_USD": "2"}
    first = sh(["launch"], {**env, "RUN": "first", "S3_RUNS": "s3://a/runs"}).stderr
    second = sh(["launch"], {**env, "RUN": "second", "S3_RUNS": "s3://b/other"}).stderr
    assert re.findall(r"put-role-policy --role-name (\S+)", first) == ["resnet-ec2-first"]
    assert re.findall(r"put-role-policy --role-name (\S+)", second) == ["resnet-ec2-second"]
    assert "arn:aws:s3:::b/other/second/*" in second and "a/runs" not in second
    assert "Name=resnet-ec2-second" in second  # its instance profile


def test_remote_commands_quote_every_setting(tmp_path):
    """The remote commands of logs and status-remote quote every setting they carry, so a RUN is a name, never shell
    code. (The code reaches the instance through S3, so there is no REPO_URL to carry a token any more.)"""
    env = {"DRY_RUN": "1", "STATE_DIR": str(tmp_path / "state"), "KEY_FILE": "/k.pem", "S3_RUNS": "s3://r/ec2"}
    run = "x; touch pwned"
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / f"{run}.instance").write_text("i-0abc\n")
    for sub in ("logs", "status-remote"):
        p = sh([sub], {**env, "RUN": run}, check=False)
        assert r"x\;\ touch\ pwned" in p.stdout and "x; touch" not in p.stdout, p.stdout

# -----------------------------------------------------------------------------
# EC2, part 5: the journey's edges (tests/test_journey.py follows the README's walk-through itself)

PARTIAL_EC2 = """#!/bin/sh
# moto, but for what it does not do as EC2 does: Service Quotas (a quota of QUOTA vCPUs) and the zones that offer a
# type (none for NOWHERE_TYPE)
case "$*" in
    *service-quotas*) echo "$QUOTA" ; exit 0 ;;
    *describe-instance-type-offerings*"$NOWHERE_TYPE"*) exit 0 ;;
esac
exec "$REAL_AWS" "$@"
"""


def test_check_names_what_would_stop_a_launch(tmp_path, moto):
    """`check` (which launch runs first, before anything is paid for) reads the vCPU quota of the type's class and
    market less what runs, the zones that offer the type, the key pair and the buckets' region: each failure one line
    with its fix, the quota's with its name, code and the value to ask for. moto has no Service Quotas nor realistic
    zone offerings: a stand-in answers those and hands the rest to moto."""
    ec2, s3 = boto(moto, "ec2"), boto(moto, "s3")
    ec2.create_key_pair(KeyName="checked")
    s3.create_bucket(Bucket="check-here")
    s3.create_bucket(Bucket="check-far", CreateBucketConfiguration={"LocationConstraint": "eu-west-1"})
    running = ec2.run_instances(ImageId=ec2.describe_images()["Images"][0]["ImageId"], InstanceType="g5.2xlarge",
                                MinCount=1, MaxCount=1)["Instances"][0]["InstanceId"]  # 8 on-demand G vCPUs in use
    env = {**moto, "AWS": write_trainer(tmp_path, PARTIAL_EC2), "REAL_AWS": str(Path(BIN) / "aws"),
           "INSTANCE_TYPE": "g5.xlarge", "SPOT": "0", "QUOTA": "12.0", "NOWHERE_TYPE": "none",
           "KEY_NAME": "checked", "S3_DATA": "s3://check-here/imagenet", "S3_RUNS": "s3://check-here/runs"}
    try:
        p = sh(["check"], env)
        assert "check: nothing in the way of g5.xlarge (on-demand) in us-east-1" in p.stderr
        assert "g5.xlarge needs 4 of 'Running On-Demand G and VT instances' (L-DB2E81BA): 12, 8 in use" in p.stderr
        p = sh(["check"], {**env, "QUOTA": "10.0"}, check=False)  # 8 in use of 10: 4 more do not fit
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 2 and "1 thing would stop this launch" in lines[-1], p.stderr
        assert ("the on-demand vCPU quota 'Running On-Demand G and VT instances' (L-DB2E81BA) in us-east-1 is 10 with "
                "8 in use, and g5.xlarge needs 4: ask for 12") in p.stderr and "--desired-value 12" in p.stderr
        p = sh(["check"], {**env, "QUOTA": "0.0", "SPOT": "1", "NOWHERE_TYPE": "g5.xlarge", "KEY_NAME": "missing",
                           "S3_RUNS": "s3://check-far/runs"}, check=False)
        lines = [line for line in p.stderr.splitlines() if line.startswith("run_ec2.sh: check:")]
        assert p.returncode == 2 and len(lines) == 4, p.stderr
        assert "spot vCPU quota 'All G and VT Spot Instance Requests' (L-3819A6DF) in us-east-1 is 0 with 0 in use" \
            in lines[0] and "spot and on-demand quotas are separate" in lines[0]  # the on-demand 8 do not count
        assert "g5.xlarge is offered in no zone of us-east-1" in lines[1]
        assert "no key pair missing in us-east-1: aws ec2 create-key-pair --key-name missing" in lines[2]
        assert "the bucket check-far is in eu-west-1, REGION is us-east-1: set REGION=eu-west-1" in lines[3]
    finally:
        ec2.terminate_instances(InstanceIds=[running])


def test_prepare_from_kaggle_checks_the_token_before_anything_is_paid_for(tmp_path):
    """PREPARE=1 FROM_KAGGLE=1 launch asks the Kaggle CLI first, here: no CLI, no token, a refused token, the rules not
    accepted, each one line naming the fix, and nothing of AWS asked (DRY_RUN would print it)."""
    kaggle = tmp_path / "kaggle"
    env = {"DRY_RUN": "1", "PREPARE": "1", "FROM_KAGGLE": "1", "INSTANCE_TYPE": "c7i.4xlarge", "KEY_NAME": "k",
           "S3_DATA": "s3://d/imagenet", "MY_IP": "198.51.100.7", "STATE_DIR": str(tmp_path / "state"),
           "HOME": str(tmp_path), "KAGGLE": str(kaggle)}
    for answer, said in (("", "needs the Kaggle CLI here, to check your token first: pip install kaggle"),
                         ("echo 'OSError: Could not find kaggle.json. Make sure it is located in ~/.kaggle' >&2",
                          "no Kaggle token: on kaggle.com, Settings -> API -> Create New Token"),
                         ("echo '401 - Unauthorized' >&2", "Kaggle refuses the token in"),
                         ("echo '403 - Forbidden' >&2", "accept them at https://www.kaggle.com/competitions/"
                                                        "imagenet-object-localization-challenge/rules")):
        if answer:
            kaggle.write_text(f"#!/bin/sh\n{answer}\nexit 1\n")
            kaggle.chmod(0o755)
        p = sh(["launch"], env, check=False)
        assert p.returncode == 2 and said in p.stderr.strip().splitlines()[-1], p.stderr
        assert "+ aws" not in p.stderr.replace("+ aws ec2 describe-instances --filters Name=tag:run", "")


def test_launch_refuses_uncommitted_changes_and_results_never_write_into_another_run(tmp_path, clone):
    """The instance trains the commit launch ships: a checkout with uncommitted changes is refused before anything is
    made, naming git stash or a commit. And `results` never writes into a runs/RUN that holds something else (a run
    trained here, say)."""
    repo = tmp_path / "dirty"
    shutil.copytree(clone.parent, repo)
    (repo / "train.py").write_text((repo / "train.py").read_text() + "\n# an edit\n")
    p = sh(["launch"], {"INSTANCE_TYPE": "g5.xlarge", "KEY_NAME": "k", "S3_DATA": "s3://d/x", "S3_RUNS": "s3://r/ec2",
                        "AWS": "/bin/false"}, check=False, script=repo / "run_ec2.sh")
    assert p.returncode == 2
    last = p.stderr.strip().splitlines()[-1]
    assert "changes that are not committed (git status): commit them or git stash them" in last
    (repo / "runs" / "r50").mkdir(parents=True)
    (repo / "runs" / "r50" / "best.pt").write_text("a run trained here")
    p = sh(["results"], {"RUN": "r50", "S3_RUNS": "s3://r/ec2", "AWS": "/bin/false"}, check=False,
           script=repo / "run_ec2.sh")
    assert p.returncode == 2 and "holds something else than the run s3://r/ec2/r50" in p.stderr
    assert (repo / "runs" / "r50" / "best.pt").read_text() == "a run trained here"
