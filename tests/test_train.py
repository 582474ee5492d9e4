"""train.py as users run it: real processes on real JPEGs, checked against torch's own references."""
import json
import os
import re
import shutil
import sys

import pytest
import torch

import evaluate
import train
from conftest import (IMAGENETTE, ROOT, assert_same_weights, error_line, needs_imagenette, run, run_here,
                      torchrun_cmd, train_cmd)

# small and fast: ResNet-18 at 32 px, batches of 16, on 160 real training images (10 steps per epoch)
FAST = ["--arch", "resnet18", "--img-size", "32", "--batch-size", "16", "--workers", "1", "--log-every", "1"]


def read_log(out):
    with open(out / "log.jsonl") as f:
        return [json.loads(line) for line in f]


def test_onecycle_lr_follows_torch_reference_every_step(tiny_data, tmp_path, capfd):
    out = tmp_path / "run"
    p = run_here(train.main, ["--data", tiny_data, "--out", out, "--epochs", "2", "--mix-off-epoch", "1", "--mixup",
                              "0.1", "--cutmix", "1.0", *FAST], capfd)
    printed = [float(v) for v in re.findall(r" lr ([0-9.e+-]+) ", p.stdout)]
    steps_per_epoch = 160 // 16
    assert len(printed) == 2 * steps_per_epoch
    # an independent OneCycleLR with the recipe's numbers: FFCV's 1.7 x 16 / 4096 (linear scaling), 10% warm-up
    sgd = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0, momentum=0.9)
    ref = torch.optim.lr_scheduler.OneCycleLR(sgd, max_lr=1.7 * 16 / 4096, total_steps=2 * steps_per_epoch,
                                              pct_start=0.1, base_momentum=0.85, max_momentum=0.95)
    expected = []
    for _ in range(2 * steps_per_epoch):
        sgd.step()
        ref.step()
        expected.append(ref.get_last_lr()[0])
    assert printed == pytest.approx(expected, rel=1e-3)  # printed with 4 significant digits
    rows = read_log(out)
    assert [r["lr"] for r in rows] == pytest.approx([expected[steps_per_epoch - 1], expected[-1]], rel=1e-12)
    # log.jsonl has what the plots and other scripts read; mixing stopped at --mix-off-epoch
    for key in ("epoch", "lr", "train_loss", "val_loss", "val_top1", "val_top5", "img_per_s", "epoch_s"):
        assert key in rows[0]
    assert [r["mixed"] for r in rows] == [True, False]
    assert rows[0]["train_top1"] is None and rows[1]["train_top1"] is not None  # only unmixed batches count
    assert rows[0]["val_n"] == 80  # every validation image, once
    assert (out / "curves.png").stat().st_size > 10_000
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["progress"]["epochs_done"] == 2 and ckpt["args"]["arch"] == "resnet18" and len(ckpt["classes"]) == 10
    assert (out / "best.pt").exists()


def test_mixup_cutmix_targets_sum_to_one():
    args = train.parse_args(["--mixup", "0.2", "--cutmix", "1.0"])
    mixer = train.make_mixer(args, num_classes=10)
    torch.manual_seed(0)
    x, y = torch.randn(32, 3, 16, 16), torch.randint(0, 10, (32,))
    soft = 0
    for _ in range(20):  # RandomChoice picks mixup or cutmix
        xm, ym = mixer(x, y)
        assert ym.shape == (32, 10) and xm.shape == x.shape
        torch.testing.assert_close(ym.sum(1), torch.ones(32))
        # a Beta(0.2) draw can land within float rounding of 1, and a cutmix box can be empty: then no row mixes
        soft += bool((ym.max(1).values < 1 - 1e-6).any())
    assert soft >= 10
    assert train.make_mixer(train.parse_args(["--mixup", "0", "--cutmix", "0"]), 10) is None


def scalars(out):
    """TensorBoard's scalars in OUT/tb, as TensorBoard reads them (a resume's purge_step applied): {tag: [(step,
    value)]}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
            if tag != "epoch/img_per_s"}  # a speed: the one curve two runs of the same steps need not share


def test_resume_equals_uninterrupted_run_bitwise(tiny_data, tmp_path):
    """2 epochs in one go == 1 epoch, stop, resume to 2. Mixup, cutmix and EMA are on, and the worker count
    changes on resume: augmentation and mixing are seeded from (seed, epoch, index), not from process state.
    TensorBoard's curves (--tensorboard) are the same too, each step once, even when a resume from an older
    checkpoint runs steps again that a session had logged."""
    pytest.importorskip("tensorboard")
    common = ["--data", tiny_data, "--epochs", "2", "--ema", "0.9", "--mixup", "0.2", "--cutmix", "1.0", *FAST,
              "--tensorboard", "--log-every", "3"]
    run(train_cmd(*common, "--out", tmp_path / "full", "--workers", "2"))
    run(train_cmd(*common, "--out", tmp_path / "split", "--workers", "0", "--stop-epoch", "1"))
    shutil.copy(tmp_path / "split" / "last.pt", tmp_path / "after_epoch_1.pt")
    p = run(train_cmd(*common, "--out", tmp_path / "split", "--workers", "1"))
    assert "resumed from" in p.stdout and "epoch 1/2" not in p.stdout.split("resumed from")[1]
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "last.pt", weights_only=True)
    assert_same_weights(a, b)
    assert a["scheduler"]["last_epoch"] == 20
    ra, rb = read_log(tmp_path / "full"), read_log(tmp_path / "split")
    assert [r["train_loss"] for r in ra] == [r["train_loss"] for r in rb]
    assert [r["val_top1"] for r in ra] == [r["val_top1"] for r in rb]
    full = scalars(tmp_path / "full")
    assert [s for s, _ in full["train/loss"]] == [3, 6, 9, 10, 13, 16, 19, 20]  # every 3 steps and an epoch's last
    assert [s for s, _ in full["epoch/val_top1"]] == [10, 20] and scalars(tmp_path / "split") == full
    run(train_cmd(*common, "--out", tmp_path / "split", "--resume", tmp_path / "after_epoch_1.pt"))  # epoch 2 again
    assert scalars(tmp_path / "split") == full


def test_tensorboard_without_its_package_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if it were not installed
    line = error_line(train.main, ["--tensorboard", "--out", str(tmp_path / "x")], capsys)
    assert "--tensorboard needs the tensorboard package" in line and "pip install tensorboard" in line


def test_the_run_folder_is_named_after_the_data_and_the_network(monkeypatch):
    """The quick start (Imagenette) and the ImageNet run that follows get folders of their own, so that auto-resume
    never finds the other one's last.pt; $DATA_DIR is the default data of every script."""
    monkeypatch.delenv("DATA_DIR", raising=False)
    assert train.parse_args([]).out == os.path.join("runs", "imagenette2-160-resnet50")
    assert train.parse_args(["--data", "/mnt/imagenet/", "--arch", "resnet18"]).out == os.path.join(
        "runs", "imagenet-resnet18")
    monkeypatch.setenv("DATA_DIR", "/data/imagenet-1k")
    assert train.parse_args([]).out == os.path.join("runs", "imagenet-1k-resnet50")
    assert train.parse_args(["--out", "x"]).out == "x"


def test_no_gpu_and_no_recipe_flag_runs_the_cpu_preset_and_records_it(monkeypatch, capsys):
    """`python train.py` on a machine without a GPU ran the ImageNet recipe (ResNet-50, 192 px, batch 256, 24 epochs:
    days on a CPU). With no recipe flag it now runs the cpu preset and says so in one line; the checkpoint's command
    line records `--preset cpu` as if given, so a resume (run_ec2.sh replays it) keeps the recipe; any recipe flag,
    and every GPU, keep the defaults."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(sys, "argv", ["train.py", "--data", "/x"])
    args = train.parse_args(None, cpu_preset=True)
    assert (args.preset, args.arch, args.img_size, args.batch_size, args.epochs, args.lr) == \
        ("cpu", "resnet18", 64, 32, 5, 0.194)
    assert "no GPU here: the cpu preset" in capsys.readouterr().out
    assert train.recorded_argv(args) == ["--data", "/x", "--preset", "cpu"]
    for given in (["--epochs", "3"], ["--arch=resnet50"], ["--preset", "default"]):
        monkeypatch.setattr(sys, "argv", ["train.py", *given])
        assert train.parse_args(None, cpu_preset=True).preset != "cpu" and "cpu preset" not in capsys.readouterr().out
    assert train.parse_args(["--data", "/x"]).preset == "default"  # as a library (bench.py, tests): the recipe
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(sys, "argv", ["train.py"])
    assert train.parse_args(None, cpu_preset=True).arch == "resnet50"


def test_the_readme_flag_table_is_the_parsers(capsys):
    """README's table of flags is made from the parsers (train.flag_table): a flag added, renamed or re-defaulted
    shows there, and the column that says which flags lr_finder.py takes is its parser's own answer."""
    import lr_finder
    assert train.flag_table() in (ROOT / "README.md").read_text(), "README's flag table is stale: paste flag_table()"
    for row in train.flag_table().splitlines()[2:]:
        flag, shared = row.split(" | ")[0].strip("| `").split("`")[0], row.split(" | ")[2]
        value = {"--data": "/x", "--preset": "fast", "--arch": "resnet18", "--device": "cpu", "--amp": "bf16",
                 "--tta": "flip", "--resume": "none", "--shrink-by": "longer"}.get(flag, "1")
        takes_a_value = not any(s in row for s in ("| on |", "| off |"))
        p = run_here(lr_finder.main, [flag, value] if takes_a_value else [flag], capsys, check=False) \
            if shared == "no" else None
        if p is not None:
            assert p.returncode == 2 and "is a flag of a whole training run" in p.stderr, (flag, p.stderr[-500:])


def test_torchrun_two_ranks_matches_one_process(tiny_data, tmp_path):
    """2 ranks x 8 images == 1 process x 16 images: the same images per step, with the same augmentation.
    Only BatchNorm differs: each rank normalizes with the statistics of its own 8 images, not of all 16,
    so the losses agree closely but not bitwise."""
    # the recipe this comparison was calibrated on (mixing, the old LR): without mixing, BatchNorm's per-rank
    # statistics of 8 images move the loss of this barely trained 32 px network by about 4%, with it by under 1%
    common = ["--data", tiny_data, "--epochs", "2", *FAST, "--mixup", "0.1", "--cutmix", "1.0", "--lr", "0.025",
              "--no-blurpool", "--weight-decay", "5e-5", "--warmup-pct", "0.25"]
    p = run(torchrun_cmd(2, *common, "--batch-size", "8", "--out", tmp_path / "ddp"), env={"OMP_NUM_THREADS": "1"})
    assert "weights identical on all 2 ranks" in p.stdout
    assert "global batch 16 = 8 x 2 ranks x 1 accum" in p.stdout
    run(train_cmd(*common, "--batch-size", "16", "--out", tmp_path / "one"))
    ddp, one = read_log(tmp_path / "ddp"), read_log(tmp_path / "one")
    assert [r["val_n"] for r in ddp] == [80, 80]  # each val image counted once across the ranks
    for r2, r1 in zip(ddp, one):
        assert r2["lr"] == pytest.approx(r1["lr"], rel=1e-12)
        assert r2["train_loss"] == pytest.approx(r1["train_loss"], rel=0.03)
    # and the checkpoint of a 2-rank run holds bare keys that load anywhere
    ckpt = torch.load(tmp_path / "ddp" / "last.pt", weights_only=True)
    assert ckpt["world"] == 2 and all(not k.startswith("module.") for k in ckpt["model"])


def test_gradient_accumulation_keeps_the_global_batch(tiny_data, tmp_path, capfd):
    p = run_here(train.main, ["--data", tiny_data, "--out", tmp_path / "acc", "--epochs", "1", *FAST,
                              "--batch-size", "8", "--accum-steps", "2"], capfd)
    assert "global batch 16 = 8 x 1 ranks x 2 accum; 10 steps/epoch" in p.stdout
    assert len(re.findall(r"step \d+/10 ", p.stdout)) == 10


@needs_imagenette
def test_learns_real_images(tmp_path):
    """ResNet-18 at 64 px on 30% of real Imagenette for 2 epochs (all 3,925 val images, no TTA): well above the 10%
    of chance (38.6% when this test was sized, VM-B, 2026-12-03)."""
    out = tmp_path / "learn"
    run(train_cmd("--data", IMAGENETTE, "--out", out, "--arch", "resnet18", "--img-size", "64", "--no-tta",
                  "--batch-size", "64", "--epochs", "2", "--workers", "2", "--log-every", "50", "--subset", "0.3"),
        timeout=900)
    rows = read_log(out)
    assert rows[-1]["val_n"] == 3925
    assert rows[-1]["val_top1"] > 30, rows


def one_line_error(p):
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr, p.stderr
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    return lines[-1]


@pytest.mark.parametrize("flags,expected", [
    (["--data", "/does/not/exist"], "is not a folder"),
    (["--subset", "0"], "--subset must be in (0, 1]"),
    (["--epochs", "-3"], "--epochs must be at least 1"),
    (["--arch", "resnet51"], "invalid choice: 'resnet51'"),
    (["--min-img-size", "256"], "--min-img-size 256 is above --img-size 192"),
    (["--eval-size", "0"], "--eval-size must be at least 1"),
    (["--preset", "faster"], "invalid choice: 'faster'"),
])
def test_bad_input_gets_one_clear_line(tmp_path, flags, expected, capsys):
    assert expected in error_line(train.main, ["--out", str(tmp_path / "x"), *flags], capsys)


def test_bad_input_in_a_real_process(tmp_path):
    """The same as a user sees it: exit status 2, one line, no traceback."""
    p = run(train_cmd("--out", tmp_path / "x", "--data", "/does/not/exist"), check=False, timeout=120)
    assert "is not a folder" in one_line_error(p)


def test_no_network_for_default_data_says_pass_data(tmp_path, capfd, monkeypatch):
    # a proxy on a closed local port stands in for "no network", wherever this runs
    for k in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(k, "http://127.0.0.1:9")
    monkeypatch.delenv("DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    p = run_here(train.main, ["--out", tmp_path / "x"], capfd, check=False)
    line = one_line_error(p)
    assert "could not download Imagenette" in line and "pass --data" in line
    assert "downloading Imagenette" in p.stdout


def test_resume_with_another_arch_is_refused(tiny_data, tmp_path, capsys):
    out = tmp_path / "run"
    run_here(train.main, ["--data", tiny_data, "--out", out, "--epochs", "2", "--stop-epoch", "1", *FAST], capsys)
    before = (out / "last.pt").read_bytes()
    common = ["--data", str(tiny_data), "--out", str(out), *FAST]
    line = error_line(train.main, [*common, "--epochs", "2", "--arch", "resnet34"], capsys)
    assert "--arch is resnet34 but" in line and "a new run in a new --out" in line  # (--resume none in it is refused)
    assert "--epochs is 3 but" in error_line(train.main, [*common, "--epochs", "3"], capsys)
    assert (out / "last.pt").read_bytes() == before  # nothing already written is lost


def test_resume_from_unsafe_or_foreign_checkpoint_is_refused(tiny_data, tmp_path, capfd):
    import pickle

    from test_model import Exploit
    evil, bare = tmp_path / "evil.pt", tmp_path / "bare.pt"
    with open(evil, "wb") as f:
        pickle.dump({"model": Exploit()}, f)
    torch.save(train.build_model("resnet18", num_classes=10).state_dict(), bare)
    for path, expected in ((evil, "cannot be loaded safely"), (bare, "is not a train.py checkpoint"),
                           (tmp_path / "missing.pt", "does not exist")):
        p = run_here(train.main, ["--data", tiny_data, "--out", tmp_path / "x", *FAST, "--resume", path], capfd,
                     check=False)
        assert expected in one_line_error(p)
        assert "this ran at load time" not in p.stdout


def test_epoch_sizes_ramp_like_ffcv():
    """The default recipe: 160 px for 70% of the epochs, a ramp in 16 px steps until 85%, then 192 (FFCV's shape);
    the sizes follow --img-size, and --min-img-size at --img-size turns the ramp off."""
    args = train.parse_args([])
    assert (args.epochs, args.img_size, args.min_img_size, args.eval_size, args.blurpool, args.tta) == \
        (24, 192, 160, 256, True, "flip")
    assert (args.mixup, args.cutmix, args.ema, args.weight_decay, args.warmup_pct) == (0, 0, 0, 1e-4, 0.1)
    assert train.epoch_sizes(args) == [160] * 18 + [176] * 2 + [192] * 4
    assert train.epoch_sizes(train.parse_args(["--preset", "fast"])) == [160] * 12 + [176] + [192] * 3
    long = train.parse_args(["--preset", "long"])
    assert (long.epochs, long.mixup, long.cutmix, long.ema) == (90, 0.2, 1.0, 0.9999)
    small = train.parse_args(["--img-size", "128", "--epochs", "5"])
    assert (small.min_img_size, small.eval_size, train.epoch_sizes(small)) == (112, 176, [112] * 4 + [128])
    assert train.epoch_sizes(train.parse_args(["--epochs", "5", "--min-img-size", "192"])) == [192] * 5  # off
    assert train.parse_args(["--preset", "long", "--mixup", "0.1"]).mixup == 0.1  # a flag beats the preset


def test_fast_recipe_runs_and_its_eval_matches_evaluate_py(tiny_data, tmp_path, capfd):
    """Progressive resizing, BlurPool, FixRes and flip TTA in one small run; train.py's last top-1 equals what
    evaluate.py reports for the same checkpoint, which re-reads its eval size and BlurPool from the checkpoint."""
    out = tmp_path / "fast"
    run_here(train.main, ["--data", tiny_data, "--out", out, *FAST, "--preset", "fast", "--epochs", "4",
                          "--min-img-size", "32", "--img-size", "64", "--eval-size", "80"], capfd)
    rows = read_log(out)
    assert [r["img_size"] for r in rows] == [32, 32, 32, 48]
    p = run_here(evaluate.main, ["--checkpoint", out / "last.pt", "--tta", "flip", "--workers", "1",
                                 "--out", tmp_path / "eval"], capfd)
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert res["img_size"] == 80 and res["n"] == rows[-1]["val_n"]
    assert res["top1"] == pytest.approx(rows[-1]["val_top1"]) and res["top5"] == pytest.approx(rows[-1]["val_top5"])


def test_shrink_mode_writes_a_smaller_copy_that_trains(tiny_data, tmp_path, capfd):
    p = run_here(train.main, ["--data", tiny_data, "--shrink", tmp_path / "small", "--max-side", "96", "--workers",
                              "2"], capfd)
    assert "160 shrunk, 80 copied as they were" in p.stdout and f"train with --data {tmp_path / 'small'}" in p.stdout
    run_here(train.main, ["--data", tmp_path / "small", "--out", tmp_path / "run", "--epochs", "1", *FAST], capfd)
    assert read_log(tmp_path / "run")[-1]["val_n"] == 80


def out_of_memory(*args, **kwargs):  # what a 16 GB T4 says to 256 images of 224 px
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (a stand-in for the GPU)")


def test_out_of_memory_is_a_bad_input_with_flags_that_keep_the_global_batch(tiny_data, tmp_path, capfd,
                                                                           monkeypatch):
    """Not a crash to restart but a config error (status bad_input, the restart loop stops), with one line that
    names the per-GPU batch and the flags that keep the global batch. The OOM itself is raised by a stand-in for
    the step: this machine has no GPU to run out of."""
    out = tmp_path / "oom"
    step = train.forward_backward
    monkeypatch.setattr(train, "forward_backward", out_of_memory)
    line = one_line_error(run_here(train.main, ["--data", tiny_data, "--out", out, *FAST], capfd, check=False))
    assert "out of memory with --batch-size 16" in line and "--batch-size 8 --accum-steps 2" in line
    assert (out / "status").read_text() == "bad_input\n"
    # resuming (on a GPU with less memory, say): the run's global batch stays, so a smaller --batch-size is enough
    monkeypatch.setattr(train, "forward_backward", step)
    run_here(train.main, ["--data", tiny_data, "--out", out, *FAST, "--epochs", "2", "--stop-epoch", "1"], capfd)
    monkeypatch.setattr(train, "forward_backward", out_of_memory)
    p = run_here(train.main, ["--data", tiny_data, "--out", out, *FAST, "--epochs", "2"], capfd, check=False)
    assert "resume with --batch-size 8: the run keeps its global batch" in one_line_error(p)


def test_init_from_runs_the_phased_plan_with_a_fresh_optimizer(tiny_data, tmp_path, capfd):
    """The students' plan: train on a stratified 50% subset, fine-tune from those weights at a lower LR, then
    train on all of the data; each phase starts from the last one's weights with its own optimizer, schedule and
    epochs. A checkpoint of other classes keeps its body and gets a fresh head, and a torchvision state_dict works."""
    common = ["--data", tiny_data, *FAST, "--epochs", "1"]
    run_here(train.main, [*common, "--subset", "0.5", "--out", tmp_path / "p1"], capfd)
    p = run_here(train.main, [*common, "--subset", "0.5", "--lr", "1e-9", "--init-from", tmp_path / "p1" / "last.pt",
                              "--out", tmp_path / "p2"], capfd)
    assert f"initialized from the weights of {tmp_path / 'p1' / 'last.pt'}" in p.stdout
    p1, p2 = (torch.load(tmp_path / d / "last.pt", weights_only=True) for d in ("p1", "p2"))
    # an LR of 1e-9: the weights are p1's (a fresh init would be far off), the schedule and epochs p2's own
    torch.testing.assert_close(p2["model"]["conv1.weight"], p1["model"]["conv1.weight"], atol=1e-6, rtol=0)
    fresh = train.make_model(train.parse_args(["--arch", "resnet18"]), 10, torch.device("cpu"))
    assert not torch.allclose(fresh.conv1.weight, p1["model"]["conv1.weight"].float(), atol=1e-3)
    assert p2["progress"]["epochs_done"] == 1 and p2["scheduler"]["last_epoch"] == 5 == p1["scheduler"]["last_epoch"]
    run_here(train.main, [*common, "--init-from", tmp_path / "p2" / "best.pt", "--out", tmp_path / "p3"], capfd)
    assert read_log(tmp_path / "p3")[-1]["val_n"] == 80
    # other classes: 5 of the 10 folders
    five = tmp_path / "five"
    for split in ("train", "val"):
        for cls in sorted((tiny_data / split).iterdir())[:5]:
            (five / split).mkdir(parents=True, exist_ok=True)
            (five / split / cls.name).symlink_to(cls)
    p = run_here(train.main, ["--data", five, *FAST, "--epochs", "1", "--init-from", tmp_path / "p1" / "last.pt",
                              "--out", tmp_path / "five_run"], capfd)
    assert "its head predicts 10 other classes than the 5 of the data, so the fc layer starts afresh" in p.stdout
    tv = tmp_path / "tv.pth"
    torch.save(train.build_model("resnet18", num_classes=10).state_dict(), tv)
    p = run_here(train.main, [*common, "--init-from", tv, "--out", tmp_path / "tv_run"], capfd)
    assert "initialized from the weights of" in p.stdout and "starts afresh" not in p.stdout
    # a run to continue is continued, --init-from or not; and --resume keeps its strict meaning
    p = run_here(train.main, [*common, "--subset", "0.5", "--init-from", tv, "--out", tmp_path / "p1"], capfd)
    assert "--init-from is for a new run: continuing" in p.stdout
    argv = [*map(str, common), "--init-from", str(tv), "--out", str(tmp_path / "p1"), "--subset", "0.5",
            "--epochs", "2"]
    assert "--epochs is 2 but" in error_line(train.main, argv, capfd)


def test_keep_every_target_top1_summary_and_the_log(tiny_data, tmp_path, capfd):
    """--keep-every keeps epoch_NNN.pt (only the newest with the optimizer state); the log has train top-1, the
    LR of each logged step and the trend; model_summary.txt; then --target-top1 stops early and says what it saved."""
    out = tmp_path / "run"
    p = run_here(train.main, ["--data", tiny_data, "--out", out, *FAST, "--epochs", "3", "--log-every", "2",
                              "--keep-every", "1"], capfd)
    kept = {e: torch.load(out / f"epoch_{e:03d}.pt", weights_only=True) for e in (1, 2, 3)}
    assert "optimizer" in kept[3] and all("optimizer" not in kept[e] and "model" in kept[e] for e in (1, 2))
    assert (out / "epoch_001.pt").stat().st_size < 0.75 * (out / "epoch_003.pt").stat().st_size
    assert "resnet18: 11,181,642 parameters" in p.stdout
    assert "total" in (out / "model_summary.txt").read_text()
    rows = read_log(out)
    assert all(0 <= r["train_top1"] <= 100 for r in rows)  # no mixing: every batch counts
    printed = [float(v) for v in re.findall(r" lr ([0-9.e+-]+) ", p.stdout)]
    logged = [lr for r in rows for _, lr in r["lr_steps"]]
    assert logged == pytest.approx(printed, rel=1e-3) and len(logged) == 3 * 5  # steps 2, 4, 6, 8, 10
    assert rows[0]["lr_steps"][0][0] == pytest.approx(0.2)  # epoch 1, step 2 of 10
    import numpy as np
    top1 = [r["val_top1"] for r in rows]
    assert rows[0]["trend"] is None and rows[2]["trend"] == pytest.approx(np.polyfit([0, 1, 2], top1, 1)[0])
    assert f"trend {rows[2]['trend']:+.2f} points/epoch" in p.stdout
    line = [line for line in p.stdout.splitlines() if line.startswith("epoch 1/3 done")][0]  # train, val, best
    assert f"train loss {rows[0]['train_loss']:.4f} top-1 {rows[0]['train_top1']:.2f}% | val loss" in line
    assert line.count("a new best") == 1 and "EMA" not in line
    from PIL import Image
    assert Image.open(out / "curves.png").size[0] > 1500  # three panels: loss, accuracy, LR
    # --target-top1: reached after the first epoch, with the time (and money) it saved
    p = run_here(train.main, ["--data", tiny_data, "--out", tmp_path / "target", *FAST, "--epochs", "3", "--ema",
                              "0.5", "--target-top1", "1", "--hourly-usd", "3"], capfd)
    rows = read_log(tmp_path / "target")
    assert len(rows) == 1 and (tmp_path / "target" / "status").read_text() == "done\n"
    assert f"EMA top-1 {rows[0]['ema_top1']:.2f}%, a new best" in p.stdout
    line = [line for line in p.stdout.splitlines() if line.startswith("reached")][0]
    assert f"reached top-1 {rows[0]['ema_top1']:.2f}% >= --target-top1 1.0 after epoch 1 of 3" in line
    assert "saves about 00:0" in line and "at $3.0/h)" in line
    assert torch.load(tmp_path / "target" / "last.pt", weights_only=True)["progress"]["epochs_done"] == 1
