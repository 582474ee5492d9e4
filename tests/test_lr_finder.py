"""lr_finder.py against torch-lr-finder, and on real images as users run it."""
import copy
import json
import math
import shlex
import sys

import pytest
import torch
import torch.nn as nn

import lr_finder
import train
from conftest import ROOT, error_line, link_tree, needs_imagenette, run, run_here


def test_lr_schedule_is_exponential_from_start_to_end():
    lrs = lr_finder.lr_schedule(1e-7, 10, 100)
    assert lrs[0] == pytest.approx(1e-7) and lrs[-1] == pytest.approx(10)
    ratios = [b / a for a, b in zip(lrs, lrs[1:])]
    assert max(ratios) == pytest.approx(min(ratios))


def test_matches_torch_lr_finder_on_real_images(tiny_data):
    """The same init, the same batches in the same order, the same SGD and loss: torch-lr-finder's LR sequence
    and smoothed loss curve are ours. Both run the same fp32 ops on the CPU in the same order, so the losses
    agree to float32 rounding; rel 1e-5 leaves room for the summation order of .item() on accumulated losses."""
    torch_lr_finder = pytest.importorskip("torch_lr_finder")
    args = lr_finder.parse_args(["--data", str(tiny_data), "--arch", "resnet18", "--img-size", "32",
                                 "--batch-size", "16", "--mixup", "0", "--cutmix", "0", "--device", "cpu",
                                 "--start-lr", "1e-4", "--end-lr", "10", "--iters", "30"])
    train_set, _, info = train.data.build_datasets(tiny_data, 32, seed=0)
    loader = train.data.make_loader(train_set, 16, True, workers=0)
    batches = [train.to_device(x, y, torch.device("cpu"), True) for x, y, _ in loader]  # 10 batches, cycled
    device, criterion = torch.device("cpu"), nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    model = train.make_model(args, 10, device)
    ref_model = copy.deepcopy(model)

    # ours: the same step lr_finder.py runs
    _, ctx, scaler = train.autocast_for("fp32", device)
    opt = train.make_optimizer(model, args, args.start_lr)
    it = iter(batches * 3)

    def step(lr):
        for g in opt.param_groups:
            g["lr"] = lr
        x, y = next(it)
        loss = train.forward_backward(model, x, y, criterion, ctx, scaler, 1).item()
        train.optimizer_step(opt, scaler)
        return loss
    ours = lr_finder.range_test(step, lr_finder.lr_schedule(1e-4, 10, 30), smooth=0.05, diverge=5)

    # the reference
    ref_opt = train.make_optimizer(ref_model, args, 1e-4)
    xs, ys = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    ref_loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xs, ys), batch_size=16)
    finder = torch_lr_finder.LRFinder(ref_model, ref_opt, criterion, device="cpu")
    finder.range_test(ref_loader, start_lr=1e-4, end_lr=10, num_iter=30, smooth_f=0.05, diverge_th=5)
    ref = finder.history

    assert len(ours["lr"]) == len(ref["lr"]) >= 10
    assert ours["lr"] == pytest.approx(ref["lr"], rel=1e-12)
    assert ours["loss"] == pytest.approx(ref["loss"], rel=1e-5)
    # diverged: torch-lr-finder stops once the smoothed loss passes 5x its best, which may be at the last step
    assert ours["diverged"] == (len(ref["lr"]) < 30 or ref["loss"][-1] > 5 * min(ref["loss"]))
    # the suggestion: torch-lr-finder's steepest point (np.gradient over the curve trimmed by 10 and 5) where it
    # lies before the minimum; we do not look past the minimum (see lr_finder.suggest)
    window = ref["loss"][10:len(ref["loss"]) - 5]
    lowest = int(torch.tensor(window).argmin())
    grads = torch.tensor(window[:lowest + 1])
    if len(grads) >= 3:
        ref_idx = 10 + int(torch.gradient(grads)[0][:-1].argmin())
        assert lr_finder.steepest(ours["lr"], ours["loss"]) == ref_idx


def test_suggestion_ignores_the_fall_after_divergence():
    # down from 2.3 to 1.0, up to 3.0 (diverged, but under 5x), then down again as a dead network settles
    curve = [2.3] * 10 + [2.3 - 0.13 * i for i in range(11)] + [1.0 + 0.4 * i for i in range(6)] + \
            [3.0 - 0.3 * i for i in range(5)] + [1.8] * 5
    lrs = lr_finder.lr_schedule(1e-5, 10, len(curve))
    assert 10 <= lr_finder.steepest(lrs, curve) <= 20
    assert lr_finder.candidates(dict(lr=lrs, loss=curve))["min_loss"] == lrs[20]


def test_stops_on_divergence_and_on_nan_at_start():
    losses = iter([2.0, 1.9, 1.8, 3.0, 50.0, 500.0, 5000.0])
    hist = lr_finder.range_test(lambda lr: next(losses), lr_finder.lr_schedule(1e-3, 1, 7), smooth=0.5, diverge=5)
    assert hist["diverged"] and len(hist["loss"]) < 7
    with pytest.raises(ValueError, match="loss is nan at the first step"):
        lr_finder.range_test(lambda lr: float("nan"), [1e-3, 1e-2])


@pytest.mark.parametrize("flags,expected", [
    (["--start-lr", "1", "--end-lr", "0.1"], "need 0 < --start-lr < --end-lr"),
    (["--iters", "3"], "--iters must be at least 10"),
    # the flags of a whole run would be silently ignored by a range test: refused instead
    (["--epochs", "5"], "--epochs is a flag of a whole training run"),
    (["--resume", "none"], "--resume is a flag of a whole training run"),
    (["--ema", "0.999"], "--ema is a flag of a whole training run"),
    (["--tta"], "--tta is a flag of a whole training run"),
    (["--eval-size", "256"], "--eval-size is a flag of a whole training run"),
    (["--stop-epoch", "1"], "--stop-epoch is a flag of a whole training run"),
    (["--save-every-min", "5"], "--save-every-min is a flag of a whole training run"),
    (["--check-data"], "--check-data is a flag of a whole training run"),
    (["--shrink", "/tmp/x"], "--shrink is a flag of a whole training run"),
    (["--epoch", "5"], "unrecognized arguments: --epoch 5"),  # no abbreviations either
])
def test_bad_flags_one_line(flags, expected, tmp_path, capsys):
    assert expected in error_line(lr_finder.main, ["--out", str(tmp_path), *flags], capsys)


def test_bad_flags_in_a_real_process(tmp_path):
    p = run([sys.executable, str(ROOT / "lr_finder.py"), "--out", str(tmp_path), "--epochs", "5"], check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "--epochs is a flag of a whole training run" in p.stderr.splitlines()[-1]


def test_real_images_plot_suggestion_and_printed_command(tiny_data, tmp_path, capfd):
    """Real imagenette JPEGs (160 of them, cycled), ResNet-18 at 64 px, 40 steps."""
    out = tmp_path / "lr"
    p = run_here(lr_finder.main, ["--data", tiny_data, "--arch", "resnet18", "--img-size", "64", "--batch-size", "16",
                                  "--iters", "40", "--start-lr", "1e-5", "--end-lr", "10", "--workers", "1",
                                  "--out", out, "--run-batch-size", "64", "--run-gpus", "4"], capfd)
    result = json.loads(p.stdout.strip().splitlines()[-1])
    assert (out / "lr_finder_resnet18_64px_b16.png").stat().st_size > 20_000
    assert 1e-3 <= result["suggested_lr"] <= 3, result
    assert result["run_global_batch"] == 256
    assert result["run_lr"] == pytest.approx(result["suggested_lr"] * 256 / 16, rel=1e-9)
    command = p.stdout.strip().splitlines()[-2]
    assert command == result["command"] and command.startswith("torchrun --nproc_per_node=4 train.py")
    # the printed command runs: here on one CPU process, one short epoch
    argv = shlex.split(command)[shlex.split(command).index("train.py") + 1:]
    run_here(train.main, [*argv, "--epochs", "1", "--batch-size", "16", "--workers", "1", "--out", tmp_path / "train"],
             capfd)
    assert (tmp_path / "train" / "last.pt").exists()


def test_small_data_cycles_and_says_so(tiny_data, tmp_path, capfd):
    p = run_here(lr_finder.main, ["--data", tiny_data, "--arch", "resnet18", "--img-size", "32", "--batch-size", "16",
                                  "--iters", "25", "--workers", "0", "--out", tmp_path], capfd)
    assert "the data gave only 10 batches for 25 steps: cycling" in p.stdout
    assert json.loads(p.stdout.strip().splitlines()[-1])["steps"] >= 10


def curve_hist(losses, start=1e-7, end=10):
    return dict(lr=lr_finder.lr_schedule(start, end, len(losses)), loss=list(losses))


def test_the_rule_on_curves_with_a_known_answer():
    """Three recorded shapes. Flat, then climbing (a network from scratch): the LR where the climb passes the rise
    the rule reads, not the noise at the start. A clear valley: past its bottom, where it climbs. A noisy flat
    curve, smoothed as the test smooths it: its wiggles are no climb."""
    rise, div = lr_finder.RISE, lr_finder.DIVISOR
    flat_then_up = [2.30] * 60 + [2.30 * 1.02 ** k for k in range(1, 41)]
    marks = lr_finder.suggest(curve_hist(flat_then_up))
    first = next(i for i, s in enumerate(flat_then_up) if s > (1 + rise) * 2.30)
    assert marks["rise_found"] and marks["rise_idx"] == first
    assert marks["suggested_lr"] == pytest.approx(curve_hist(flat_then_up)["lr"][first] / div)
    assert lr_finder.steepest(curve_hist(flat_then_up)["lr"], flat_then_up) < 20 < first  # the old rule: noise
    valley = [2.3 - 0.026 * k for k in range(50)] + [1.0 + 0.05 * k for k in range(50)]
    marks = lr_finder.suggest(curve_hist(valley))
    assert 50 < marks["rise_idx"] < 60 and marks["lowest_idx"] == 50
    torch.manual_seed(0)
    raw = (2.3 * (1 + 0.04 * torch.randn(70))).tolist() + [2.3 * 1.05 ** k for k in range(1, 31)]  # 4% noise
    steps = iter(raw)
    hist = lr_finder.range_test(lambda lr: next(steps), lr_finder.lr_schedule(1e-7, 10, 100), smooth=0.05, diverge=5)
    marks = lr_finder.suggest(hist)
    assert marks["rise_idx"] >= 70, "a wiggle of the smoothed noise is taken for the climb"
    never = lr_finder.suggest(curve_hist([2.3 - 0.01 * k for k in range(100)]))  # still falling at the end
    assert not never["rise_found"] and never["suggested_lr"] == pytest.approx(curve_hist([0] * 100)["lr"][-1] / div)


SWEEP = json.loads((ROOT / "tests" / "data" / "lr_sweep.json").read_text())


@pytest.mark.parametrize("setting", sorted(SWEEP["settings"]))
def test_on_the_sweeps_real_curves_the_rule_lands_in_the_best_band_and_beats_the_old_one(setting):
    """Recorded real data (BENCHMARKS.md "Picking the LR"): one setting's range test on Imagenette, and the final
    top-1 of short runs at peak LRs in x2 steps. The rule's LR lies in the best band (the LRs within 1.5 points of
    the best, widened by half a grid step, sqrt 2, each side), and the run at the rule's LR beat the run at the old
    rule's."""
    rec = SWEEP["settings"][setting]
    best = max(rec["top1_by_lr"].values())
    band = sorted(float(lr) for lr, top1 in rec["top1_by_lr"].items() if top1 >= best - 1.5)
    marks = lr_finder.suggest(rec["curve"])
    assert marks["rise_found"] and band[0] / 2 ** 0.5 <= marks["suggested_lr"] <= band[-1] * 2 ** 0.5, (marks, band)
    (new_lr, new_top1), (old_lr, old_top1) = rec["at_rule"]["new"], rec["at_rule"]["old"]
    assert marks["suggested_lr"] == pytest.approx(new_lr, rel=5e-3)  # the run was at this code's suggestion
    assert marks["steepest_lr"] == pytest.approx(old_lr, rel=5e-2)
    assert new_top1 > old_top1


@needs_imagenette
def test_the_suggestion_trains_on_real_images(tmp_path, capfd):
    """Real images, end to end as a user runs it: the range test on 1,000 Imagenette photos (ResNet-18, 32 px,
    batch 32), then six epochs at its suggestion: no divergence, and well above chance (10%) on 200 held-out
    photos. (At this size the rule's LR does not reliably beat the old rule's: see BENCHMARKS.md.)"""
    data_root = link_tree(tmp_path / "data", 100, 20)
    common = ["--data", str(data_root), "--arch", "resnet18", "--img-size", "32", "--batch-size", "32",
              "--workers", "1"]
    p = run_here(lr_finder.main, [*common, "--out", tmp_path / "lr"], capfd)
    result = json.loads(p.stdout.strip().splitlines()[-1])
    assert result["rise_found"]
    out = tmp_path / "run"
    run_here(train.main, [*common, "--epochs", "6", "--lr", result["suggested_lr"], "--out", out, "--log-every", "100"],
             capfd)
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["train_loss"]) for r in rows) and (out / "status").read_text() == "done\n"
    assert rows[-1]["val_top1"] >= 25, (result, rows[-1])


def test_the_printed_command_is_the_run_that_was_meant():
    """--preset and every recipe flag that differs from train.py's defaults for that preset, the planned batch and
    the LR scaled to the planned global batch; and the command parses as train.py's."""
    args = lr_finder.parse_args(["--preset", "long", "--arch", "resnet18", "--img-size", "128", "--batch-size", "32",
                                 "--label-smoothing", "0.2", "--no-blurpool", "--weight-decay", "5e-5"])
    command = lr_finder.run_command(args, "/mnt/imagenet", 0.8, gpus=8, run_bs=256)
    assert command == ("torchrun --nproc_per_node=8 train.py --data /mnt/imagenet --preset long --img-size 128 "
                       "--arch resnet18 --no-blurpool --weight-decay 5e-05 --label-smoothing 0.2 --batch-size 256 "
                       "--lr 0.8")
    parsed = train.parse_args(shlex.split(command)[shlex.split(command).index("train.py") + 1:])
    assert (parsed.mixup, parsed.cutmix, parsed.epochs, parsed.blurpool) == (0.2, 1.0, 90, False)
    plain = lr_finder.parse_args(["--data", "/mnt/imagenet"])
    assert lr_finder.run_command(plain, "/mnt/imagenet", 0.1, gpus=1, run_bs=256) == \
        "python train.py --data /mnt/imagenet --batch-size 256 --lr 0.1"


def test_the_lr_test_says_its_data_keeps_earlier_plots_and_starts_from_init_from(tiny_data, tmp_path, monkeypatch,
                                                                                capsys):
    """With no --data it runs on $DATA_DIR when that is set (run_ec2.sh sets it to the instance's ImageNet), says so,
    and the command it prints trains on that data; a second test keeps the first one's plot and says where its own
    went; --init-from starts the test from those weights (the LR of a fine-tuning phase) and is in the command."""
    monkeypatch.setenv("DATA_DIR", str(tiny_data))
    common = ["--arch", "resnet18", "--img-size", "32", "--batch-size", "16", "--iters", "10", "--workers", "0",
              "--device", "cpu", "--out", str(tmp_path)]
    lr_finder.main(common)
    out = capsys.readouterr().out
    assert f"data {tiny_data} (no --data: $DATA_DIR, else Imagenette)" in out
    assert json.loads(out.strip().splitlines()[-1])["command"].startswith(f"python train.py --data {tiny_data} ")
    tv = tmp_path / "tv.pth"
    torch.save(train.build_model("resnet18", num_classes=10).state_dict(), tv)
    lr_finder.main(common + ["--init-from", str(tv)])
    out = capsys.readouterr().out
    first, second = tmp_path / "lr_finder_resnet18_32px_b16", tmp_path / "lr_finder_resnet18_32px_b16_2"
    assert f"{first}.png is an earlier test's: this one is {second}.png" in out
    assert f"initialized from the weights of {tv}" in out
    assert f" --init-from {tv} " in json.loads(out.strip().splitlines()[-1])["command"]
    curves = [json.loads(open(f"{stem}.json").read())["raw"] for stem in (first, second)]
    assert curves[0][0] != curves[1][0]  # the second test started from the given weights, not the run's own init
