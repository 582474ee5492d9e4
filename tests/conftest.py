"""Shared fixtures: the real images in ../shared/data, small dataset trees built from them, and a runner."""
import contextlib
import http.server
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
# Gradio (app.py, gradio_client) and the Hugging Face hub send no usage reports from tests
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# No test may ever shut down the machine it runs on: every path of run_ec2.sh that ends an instance (its launched
# service, its user-data) calls $SHUTDOWN, which for every test and every process it starts is this stand-in: it
# records its arguments in $SHUTDOWN_LOG (a test sets it to read them) and does nothing else.
STAND_INS = Path(tempfile.mkdtemp(prefix="stand-ins-"))
(STAND_INS / "shutdown").write_text('#!/bin/sh\necho "$@" >> "${SHUTDOWN_LOG:-/dev/null}"\n')
(STAND_INS / "shutdown").chmod(0o755)
os.environ["SHUTDOWN"] = str(STAND_INS / "shutdown")
SHARED = ROOT.parent / "shared" / "data"
IMAGENETTE = SHARED / "imagenette-224"
SAMPLES = SHARED / "imagenet-samples"

needs_imagenette = pytest.mark.skipif(not IMAGENETTE.is_dir(), reason=f"real data not found at {IMAGENETTE}")
needs_samples = pytest.mark.skipif(not SAMPLES.is_dir(), reason=f"real data not found at {SAMPLES}")


def link_tree(dst, per_class_train, per_class_val):
    """An ImageFolder tree of symlinks to the first N real JPEGs of each imagenette class."""
    for split, n in (("train", per_class_train), ("val", per_class_val)):
        for cls_dir in sorted((IMAGENETTE / split).iterdir()):
            out = dst / split / cls_dir.name
            out.mkdir(parents=True)
            for f in sorted(cls_dir.iterdir())[:n]:
                (out / f.name).symlink_to(f)
    return dst


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """10 classes, 16 train and 8 val real images each: fast enough to train on in a test."""
    if not IMAGENETTE.is_dir():
        pytest.skip(f"real data not found at {IMAGENETTE}")
    return link_tree(tmp_path_factory.mktemp("tiny"), 16, 8)


def run(args, timeout=600, env=None, cwd=ROOT, check=True):
    """Run a real process; return CompletedProcess with text output. Fails the test with its output on error."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    p = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=cwd)
    if check and p.returncode != 0:
        pytest.fail(f"{' '.join(map(str, args))} exited {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def train_cmd(*args):
    return [sys.executable, str(ROOT / "train.py"), *map(str, args)]


def torchrun_cmd(nproc, *args, script="train.py"):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            str(ROOT / script), *map(str, args)]


def run_here(main, args, capfd=None, check=True):
    """A script's main(args) in this process, as a real process of it would run (its sys.argv, its output, its exit
    status, the SIGTERM handler given back), without its seconds of start-up: importing torch in a fresh process
    costs about 5 s here. Tests about the process itself (signals, torchrun) run a real one. Without capfd (in a
    fixture of wider scope) only this process's own prints are returned, not those of its workers."""
    args = [str(a) for a in args]
    if capfd:
        capfd.readouterr()
    out, err = io.StringIO(), io.StringIO()
    argv, handler, code = sys.argv, signal.getsignal(signal.SIGTERM), 0
    sys.argv = [f"{main.__module__}.py", *args]
    try:
        with contextlib.ExitStack() as stack:
            if not capfd:
                stack.enter_context(contextlib.redirect_stdout(out))
                stack.enter_context(contextlib.redirect_stderr(err))
            main(args)
    except SystemExit as e:
        code = e.code or 0
    finally:
        sys.argv = argv
        signal.signal(signal.SIGTERM, handler)
    out, err = capfd.readouterr() if capfd else (out.getvalue(), err.getvalue())
    if check and code != 0:
        pytest.fail(f"{main.__module__}.py {' '.join(args)} exited {code}\n{out[-3000:]}\n{err[-3000:]}")
    return subprocess.CompletedProcess(args, code, out, err)


def error_line(main, argv, capture, code=2):
    """The one line a script's main(argv), run here (run_here), printed on its way out with `code` (argparse's errors
    and the scripts' own both exit so), with no traceback; capture: capsys or capfd."""
    p = run_here(main, argv, capture, check=False)
    assert p.returncode == code and "Traceback" not in p.stderr, p.stderr
    return [line for line in p.stderr.splitlines() if line.strip()][-1]


def assert_same_weights(a, b):
    """Two checkpoints' weights, EMA, momentum and schedule, equal bit for bit."""
    import torch
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys(), part
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k} differs"
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"]


BIN = str(Path(sys.executable).parent)  # the venv's aws and moto_server


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fake_venv(d):
    """A venv whose python is this one and whose pip only records what setup asks of it (run_ec2.sh's setup, with no
    installs)."""
    (d / "bin").mkdir(parents=True, exist_ok=True)
    (d / "bin" / "python").write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    (d / "bin" / "pip").write_text(f'#!/bin/sh\necho "$@" >> {d / "pip.log"}\n')
    for f in (d / "bin").iterdir():
        f.chmod(0o755)
    return d


PREEMPTIBLE = """#!/usr/bin/env python3
# a stand-in trainer that checkpoints every 0.2 s and, on SIGTERM, writes its preemption checkpoint and exits 75;
# it reports epoch 1 of 10 at 10 minutes an epoch in log.jsonl (for the cost projection)
import json, os, signal, sys, time
out = sys.argv[sys.argv.index("--out") + 1]
os.makedirs(out, exist_ok=True)
row = dict(epoch=0, epochs=10, epoch_s=600, val_top1=12.5)
open(os.path.join(out, "log.jsonl"), "w").write(json.dumps(row) + "\\n")
def stop(*a):
    open(os.path.join(out, "last.pt"), "w").write("the checkpoint written on SIGTERM")
    open(os.path.join(out, "status"), "w").write("preempted\\n")
    open(os.path.join(out, "got_sigterm"), "w").write("yes")
    sys.exit(75)
signal.signal(signal.SIGTERM, stop)
for k in range(300):
    open(os.path.join(out, "last.pt"), "w").write(f"step {k}")
    time.sleep(0.2)
open(os.path.join(out, "status"), "w").write("done\\n")
"""


def write_trainer(tmp_path, text):
    trainer = tmp_path / "trainer.py"
    trainer.write_text(text)
    trainer.chmod(0o755)
    return str(trainer)


class Answers(http.server.BaseHTTPRequestHandler):
    """A local HTTP stand-in (IMDS, the Hub): reply(code, body, content_type), and no log lines."""

    def reply(self, code, body, content_type=None):
        self.send_response(code)
        if content_type:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def aws(env, *args, check=True):
    """The real aws CLI, pointed by env at moto's server: nothing leaves 127.0.0.1."""
    p = subprocess.run([str(Path(BIN) / "aws"), *args], capture_output=True, text=True, env={**os.environ, **env})
    assert not check or p.returncode == 0, p.stderr
    return p


def boto(moto_env, service):
    """A boto3 client of moto's server, for a test's own look at AWS: in this process, without the second that each
    start of the aws CLI costs (the scripts under test use the CLI, as users do)."""
    import boto3
    return boto3.client(service, endpoint_url=moto_env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                        aws_access_key_id="test", aws_secret_access_key="test")


@pytest.fixture(scope="session")
def moto():
    """A local S3/EC2/IAM/SSM (moto's server) on 127.0.0.1, and the environment that points the aws CLI at it."""
    if not (Path(BIN) / "moto_server").exists() or not (Path(BIN) / "aws").exists():
        pytest.skip("moto[server] and awscli are test dependencies (requirements-dev.txt)")
    port = free_port()
    server = subprocess.Popen([str(Path(BIN) / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "REGION": "us-east-1"}
    for _ in range(100):
        if aws(env, "s3", "ls", check=False).returncode == 0:
            break
        time.sleep(0.2)
    yield env
    server.kill()


# -----------------------------------------------------------------------------
# the multi-rank runs (test_survive.py, test_skypilot.py): one uninterrupted reference, run once a session

FAST = ["--arch", "resnet18", "--img-size", "32", "--batch-size", "16", "--workers", "1", "--log-every", "1",
        "--epochs", "2", "--ema", "0.9", "--mixup", "0.2", "--cutmix", "1.0"]
TWO_RANKS = ["--batch-size", "8", "--amp", "fp32", "--mix-off-epoch", "1"]  # bf16 would amplify the sums' order


@pytest.fixture(scope="session")
def two_ranks(tiny_data, tmp_path_factory):
    """The reference of the multi-rank tests: an uninterrupted run on 2 ranks of --batch-size 8 (a global batch of
    16, 10 steps an epoch), with mixup, cutmix (the first epoch) and EMA on, in fp32."""
    out = tmp_path_factory.mktemp("two_ranks") / "full"
    run(torchrun_cmd(2, "--data", tiny_data, *FAST, *TWO_RANKS, "--out", out), env={"OMP_NUM_THREADS": "1"})
    return out


def final_state(out):
    ckpt = torch.load(out / "last.pt", weights_only=True)
    return ckpt, [line for line in (out / "log.jsonl").read_text().splitlines()]


def assert_close_run(reference, out, atol):
    """The same run up to the order of float sums: weights and EMA within atol, the same schedule; BatchNorm's
    running statistics may differ (each process keeps its own), so they are not compared; the log's train loss and
    top-1 of every epoch within float error."""
    a, b = final_state(reference)[0], final_state(out)[0]
    for part in ("model", "ema"):
        for k, v in a[part].items():
            if "running_" not in k and "num_batches" not in k and v.is_floating_point():
                torch.testing.assert_close(b[part][k], v, atol=atol, rtol=0, msg=f"{part}.{k}")
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"] and a["global_batch"] == b["global_batch"]
    rows_a, rows_b = ([json.loads(line) for line in log] for log in (final_state(reference)[1], final_state(out)[1]))
    assert [r["train_loss"] for r in rows_b] == pytest.approx([r["train_loss"] for r in rows_a], rel=1e-3)
    assert [r["mixed"] for r in rows_b] == [r["mixed"] for r in rows_a] == [True, False]
    assert rows_a[0]["train_top1"] is None and rows_b[0]["train_top1"] is None  # every batch of epoch 1 was mixed
    assert rows_b[1]["train_top1"] == pytest.approx(rows_a[1]["train_top1"], abs=100 / 160)  # one argmax may flip


ELASTIC_ATOL = 2e-4  # the largest difference measured, fp32 after 20 steps: 1.2e-7 (2 ranks -> 1), 4.3e-5 (1 -> 2)
