"""Long runs that survive: SIGTERM at random points, kill -9 during a save, a full disk, bad JPEGs, NaN losses.
Real signals to real processes, on real JPEGs; the runs that only resume or only refuse run in this process."""
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import train
from conftest import (ELASTIC_ATOL, FAST, IMAGENETTE, ROOT, TWO_RANKS, assert_close_run, assert_same_weights,
                      error_line, final_state, free_port, link_tree, needs_imagenette, run, run_here, torchrun_cmd,
                      train_cmd)

pytestmark = needs_imagenette
def run_until(cmd, global_step, steps_per_epoch=10, env=None):
    """Start cmd, send SIGTERM once it has printed optimizer step `global_step` (1-based over the run), and
    return (exit status, stdout)."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    out, sent = [], None
    for line in p.stdout:
        out.append(line)
        m = re.match(r"epoch (\d+)/\d+ step (\d+)/", line)
        if m and sent is None and (int(m[1]) - 1) * steps_per_epoch + int(m[2]) >= global_step:
            p.send_signal(signal.SIGTERM)
            sent = time.time()
    code = p.wait(timeout=120)
    # a step, an evaluation or a save at most: well inside torchrun's 30 s and AWS's 2 minutes, even on a CPU
    assert sent is not None and time.time() - sent < 20, f"took {time.time() - sent:.0f} s to stop"
    return code, "".join(out)


def test_sigterm_at_three_random_points_then_resume_is_bitwise_identical(tiny_data, tmp_path, capfd):
    """Identical weights, not close ones: the data order, every augmentation and every mixup draw are seeded
    from (seed, epoch, index), and the checkpoint holds the exact optimizer, schedule, EMA and loss sums."""
    common = ["--data", tiny_data, *FAST]
    run_here(train.main, [*common, "--out", tmp_path / "full"], capfd)
    points = sorted(random.Random(7).sample(range(2, 19), 3))  # of 20 steps; mid-epoch ones among them
    out = tmp_path / "split"
    for point in points:
        code, log = run_until(train_cmd(*common, "--out", out), point)
        assert code == train.EXIT["preempted"] == 75, log
        assert (out / "status").read_text() == "preempted\n"
        assert "preempted: checkpoint saved" in log
    resumed = run_here(train.main, [*common, "--out", out], capfd)
    assert (out / "status").read_text() == "done\n"
    assert "resumed from" in resumed.stdout
    (a, log_a), (b, log_b) = final_state(tmp_path / "full"), final_state(out)
    assert_same_weights(a, b)
    def strip(rows):  # the times differ
        return [re.sub(r'"(img_per_s|epoch_s)": [0-9.e+-]+', "", r) for r in rows]
    assert strip(log_a) == strip(log_b)


def test_torchrun_two_ranks_interrupted_once(tiny_data, tmp_path, two_ranks):
    common = ["--data", tiny_data, *FAST, *TWO_RANKS]
    env = {"OMP_NUM_THREADS": "1"}
    out = tmp_path / "split"
    code, log = run_until(torchrun_cmd(2, *common, "--out", out), 6, env=env)
    assert code != 0 and (out / "status").read_text() == "preempted\n", log  # torchrun's own status is not 75
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["progress"]["epochs_done"] == 0 and 6 <= ckpt["progress"]["step"] < 10, "a mid-epoch checkpoint"
    run(torchrun_cmd(2, *common, "--out", out), env=env)
    assert_same_weights(final_state(two_ranks)[0], final_state(out)[0])


def test_a_run_continues_on_another_number_of_gpus(tiny_data, tmp_path, two_ranks, capfd):
    """Spot capacity changes: a run stopped on 2 ranks continues on 1, and one started on 1 rank (--accum-steps 2)
    continues on 2 with the same flags. The global batch (16) stays, so every step sees the images, crops, flips,
    mixing and BatchNorm groups of the uninterrupted 2-rank run; only the order of float sums differs (all-reduced
    gradients against accumulated ones), which moves no weight or EMA weight by more than ELASTIC_ATOL in fp32. A
    resume that cannot split the global batch into whole micro-batches is refused with one line, and last.pt stays
    as it was."""
    env = {"OMP_NUM_THREADS": "1"}
    common = ["--data", str(tiny_data), *FAST, *TWO_RANKS]
    down = tmp_path / "two_then_one"
    run_until(torchrun_cmd(2, *common, "--out", down), 6, env=env)
    assert torch.load(down / "last.pt", weights_only=True)["world"] == 2
    p = run_here(train.main, [*common, "--out", down], capfd)
    assert "resuming on 1 processes instead of 2: 2 micro-batches of 8 per step on each, the same 16 images per " \
           "step" in p.stdout and "global batch 16 = 8 x 1 ranks x 2 accum" in p.stdout
    assert_close_run(two_ranks, down, ELASTIC_ATOL)

    up = tmp_path / "one_then_two"
    code, _ = run_until(train_cmd(*common, "--accum-steps", "2", "--out", up), 14)
    assert code == 75
    before = (up / "last.pt").read_bytes()
    line = error_line(train.main, [*common, "--out", str(up), "--batch-size", "5"], capfd)
    assert "16 images a step, which 1 ranks of --batch-size 5 cannot split into whole micro-batches; resume with " \
           "--batch-size 4" in line
    with pytest.raises(ValueError, match="which 3 ranks cannot share equally; resume on a number of GPUs that div"):
        train.accumulation(16, 8, 3, "last.pt")
    assert (up / "last.pt").read_bytes() == before
    p = run(torchrun_cmd(2, *common, "--accum-steps", "2", "--out", up), env=env)
    assert "resuming on 2 processes instead of 1: 1 micro-batch of 8 per step on each" in p.stdout
    assert_close_run(two_ranks, up, ELASTIC_ATOL)


SAVER = """
import sys, torch, model
path, i = sys.argv[1], 0
while True:
    i += 1
    model.save_atomic({"version": i, "w": torch.full((4_000_000,), float(i))}, path)  # 16 MB a save
    print(i, flush=True)
"""


def test_kill_9_during_saves_never_tears_the_checkpoint(tmp_path):
    path = tmp_path / "last.pt"
    rng = random.Random(0)
    for trial in range(5):
        p = subprocess.Popen([sys.executable, "-c", SAVER, str(path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
        p.stdout.readline()  # at least one complete save
        time.sleep(rng.uniform(0.0, 0.5))
        p.kill()
        p.wait()
        ckpt = torch.load(path, weights_only=True)  # always a whole checkpoint, the last or the one before
        assert torch.equal(ckpt["w"], torch.full((4_000_000,), float(ckpt["version"])))


FULL_DISK = """
import resource, signal, sys, torch, model
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # writes past the limit fail with EFBIG, as on a full disk
model.save_atomic({"w": torch.zeros(10)}, sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
try:
    model.save_atomic({"w": torch.ones(1_000_000)}, sys.argv[1])
except OSError as e:
    print(e)
"""


def test_full_disk_keeps_the_previous_checkpoint_and_says_so(tmp_path):
    path = tmp_path / "last.pt"
    p = run([sys.executable, "-c", FULL_DISK, str(path)])
    assert "could not write" in p.stdout and "the previous one is intact" in p.stdout
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.zeros(10))
    assert not (tmp_path / "last.pt.tmp").exists()


def plant_bad_files(root):
    """Three broken files among the real JPEGs of train/: empty, truncated, and not an image at all."""
    classes = sorted((root / "train").iterdir())
    real = sorted((IMAGENETTE / "train" / classes[0].name).iterdir())[0].read_bytes()
    bad = [classes[0] / "zero.JPEG", classes[1] / "truncated.JPEG", classes[2] / "text.JPEG"]
    bad[0].write_bytes(b"")
    bad[1].write_bytes(real[: len(real) // 3])
    bad[2].write_text("this is not an image")
    return bad


def test_bad_images_are_replaced_named_once_and_counted(tmp_path, capfd):
    data_root = link_tree(tmp_path / "data", 16, 4)
    for cls in sorted((data_root / "train").iterdir())[:3]:
        sorted(cls.iterdir())[0].unlink()  # 157 real + 3 bad = 160 = 10 full batches: no file is dropped
    bad = plant_bad_files(data_root)
    real = sorted((data_root / "train").iterdir())[3]
    src = __import__("PIL.Image").Image.open(sorted(real.iterdir())[0]).convert("RGB")
    src.convert("CMYK").save(real / "cmyk.JPEG", format="JPEG")  # both occur in ImageNet; both train fine
    src.save(real / "png.JPEG", format="PNG")
    sorted(real.iterdir())[0].unlink()
    sorted(real.iterdir())[0].unlink()
    p = run_here(train.main, ["--data", data_root, "--out", tmp_path / "run", *FAST], capfd)
    for f in bad:
        assert p.stderr.count(str(f)) == 1, p.stderr  # named once over both epochs
    rows = [__import__("json").loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["bad_images"] for r in rows] == [3, 3]  # every epoch reads every file once (no batch is dropped)
    report = run_here(train.main, ["--data", data_root, "--check-data", "--workers", "2"], capfd).stdout
    assert "160 train images" in report and "3 unreadable files" in report
    assert all(f"unreadable: {f}" in report for f in bad)
    assert "1 CMYK" in report and "1 PNG named .JPEG" in report


def test_nan_loss_stops_with_a_clear_message(tiny_data, tmp_path, capfd):
    p = run_here(train.main, ["--data", tiny_data, "--out", tmp_path / "nan", *FAST, "--lr", "1e30"], capfd,
                 check=False)
    assert p.returncode == train.EXIT["diverged"] == 3, p.stderr
    assert "Traceback" not in p.stderr and "lower --lr" in p.stderr.splitlines()[-1]
    assert (tmp_path / "nan" / "status").read_text() == "diverged\n"
    assert not (tmp_path / "nan" / "last.pt").exists()  # nothing non-finite was saved


def test_resume_with_safe_flag_changes_is_allowed_and_logged(tiny_data, tmp_path, capfd):
    """...and a torn last line of log.jsonl (a kill or a full disk mid-append) no longer fails every later start as
    bad input: it is skipped with a warning and the log is written whole again. A fresh run (--resume none) in a
    folder that holds a run is refused, naming --out: it would overwrite that run's best.pt and last.pt."""
    out = tmp_path / "run"
    run_here(train.main, ["--data", tiny_data, "--out", out, *FAST, "--stop-epoch", "1"], capfd)
    with open(out / "log.jsonl", "a") as f:
        f.write('{"epoch": 1, "epochs": 2, "train_lo')  # torn
    p = run_here(train.main, ["--data", tiny_data, "--out", out, *FAST, "--mixup", "0", "--cutmix", "0", "--workers",
                              "0"], capfd)
    assert "--mixup 0.2 -> 0.0" in p.stdout and "--cutmix 1.0 -> 0.0" in p.stdout and "--workers 1 -> 0" in p.stdout
    assert "log.jsonl: its last line is torn" in p.stdout
    assert [json.loads(line)["epoch"] for line in (out / "log.jsonl").read_text().splitlines()] == [0, 1]
    before = {f: (out / f).read_bytes() for f in ("last.pt", "best.pt", "log.jsonl")}
    for flag, value in (("--lr", "0.5"), ("--arch", "resnet34")):  # (--batch-size may change: the elastic tests)
        line = error_line(train.main, ["--data", str(tiny_data), "--out", str(out), *FAST, flag, value], capfd)
        assert f"{flag} is {value} but" in line
    line = error_line(train.main, ["--data", str(tiny_data), "--out", str(out), *FAST, "--resume", "none"], capfd)
    assert f"{out} holds a run already (last.pt, best.pt, log.jsonl)" in line and "its own --out" in line
    assert {f: (out / f).read_bytes() for f in before} == before


@pytest.mark.chaos
def test_chaos_two_ranks_interrupted_four_times(tiny_data, tmp_path):
    """Slow, so not in the default run: `pytest -m chaos`. A 2-rank run over 3 epochs, interrupted with SIGTERM
    at 4 random points, ends with the same weights as an uninterrupted one."""
    common = ["--data", tiny_data, *FAST, "--batch-size", "8", "--epochs", "3"]
    env = {"OMP_NUM_THREADS": "1"}
    run(torchrun_cmd(2, *common, "--out", tmp_path / "full"), env=env)
    out = tmp_path / "chaos"
    for point in sorted(random.Random(11).sample(range(2, 29), 4)):
        code, log = run_until(torchrun_cmd(2, *common, "--out", out), point, env=env)
        assert (out / "status").read_text() == "preempted\n", log
    run(torchrun_cmd(2, *common, "--out", out), env=env)
    assert (out / "status").read_text() == "done\n"
    assert_same_weights(final_state(tmp_path / "full")[0], final_state(out)[0])


def test_timed_saves_bound_what_kill_9_loses(tiny_data, tmp_path, capfd):
    """--save-every-min writes mid-epoch checkpoints; after a kill -9 the same command resumes from one."""
    out = tmp_path / "run"
    cmd = train_cmd("--data", tiny_data, "--out", out, *FAST, "--save-every-min", "0.0001")
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in p.stdout:
        if re.match(r"saved .* at epoch 1 step [4-9]", line):
            p.kill()  # SIGKILL: no handler runs
            break
    p.wait()
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["progress"]["epochs_done"] == 0 and 4 <= ckpt["progress"]["step"] < 10
    resumed = run_here(train.main, cmd[2:], capfd)
    assert f"resumed from {out / 'last.pt'}: epoch 1, step {ckpt['progress']['step']}/10" in resumed.stdout
    assert (out / "status").read_text() == "done\n"


def test_two_nodes_with_disks_of_their_own_resume_together(tiny_data, tmp_path):
    """Two nodes on one machine, each with its own --out (on EC2 each node has its own disk, and only node 0 writes
    checkpoints). Stopped after epoch 1 of 2, the same commands again: rank 0 decides to resume and sends node 1
    its state, so both continue at epoch 2 instead of node 1 starting over and the collectives hanging."""
    port = free_port()

    def node(rank, *extra):
        return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={rank}",
                                 "--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={port}",
                                 str(ROOT / "train.py"), "--data", str(tiny_data), *FAST, "--batch-size", "8",
                                 "--out", str(tmp_path / f"node{rank}"), *extra],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})

    def both(*extra):
        procs = [node(0, *extra), node(1, *extra)]
        try:
            outs = [p.communicate(timeout=240)[0] for p in procs]
        except subprocess.TimeoutExpired:
            for p in procs:
                os.killpg(p.pid, signal.SIGKILL)  # torchrun and its ranks
            pytest.fail("the two nodes hung: " + "".join(p.communicate()[0][-1500:] for p in procs))
        assert [p.returncode for p in procs] == [0, 0], outs
        return outs

    both("--stop-epoch", "1")
    assert (tmp_path / "node0" / "last.pt").exists() and not (tmp_path / "node1" / "last.pt").exists()
    outs = both()
    assert "ranks [1] have no copy of" in outs[0] and "resumed from" in outs[0]
    rows = [json.loads(line) for line in (tmp_path / "node0" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1]  # epoch 2 once, after epoch 1: one schedule on both nodes
    assert (tmp_path / "node0" / "status").read_text() == "done\n"
    assert "weights identical on all 2 ranks" in outs[0]
