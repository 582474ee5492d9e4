"""lr_finder.py against torch-lr-finder, and on real images as users run it."""
import copy
import json
import shlex
import sys

import pytest
import torch
import torch.nn as nn

import lr_finder
import train
from conftest import ROOT, run


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
])
def test_bad_flags_one_line(flags, expected, tmp_path):
    p = run([sys.executable, str(ROOT / "lr_finder.py"), "--out", str(tmp_path), *flags], check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr and expected in p.stderr.splitlines()[-1]


def test_real_images_plot_suggestion_and_printed_command(tiny_data, tmp_path):
    """Real imagenette JPEGs (160 of them, cycled), ResNet-18 at 64 px, 40 steps."""
    out = tmp_path / "lr"
    p = run([sys.executable, str(ROOT / "lr_finder.py"), "--data", str(tiny_data), "--arch", "resnet18",
             "--img-size", "64", "--batch-size", "16", "--iters", "40", "--start-lr", "1e-5", "--end-lr", "10",
             "--workers", "1", "--out", str(out), "--run-batch-size", "64", "--run-gpus", "4"], timeout=600)
    result = json.loads(p.stdout.strip().splitlines()[-1])
    assert (out / "lr_finder_resnet18_64px_b16.png").stat().st_size > 20_000
    assert 1e-3 <= result["suggested_lr"] <= 3, result
    assert result["run_global_batch"] == 256
    assert result["run_lr"] == pytest.approx(result["suggested_lr"] * 256 / 16, rel=1e-9)
    command = p.stdout.strip().splitlines()[-2]
    assert command == result["command"] and command.startswith("torchrun --nproc_per_node=4 train.py")
    # the printed command runs: here on one CPU process, one short epoch
    argv = shlex.split(command)[shlex.split(command).index("train.py") + 1:]
    run([sys.executable, str(ROOT / "train.py"), *argv, "--epochs", "1", "--batch-size", "16",
         "--workers", "1", "--out", str(tmp_path / "train")], timeout=600)
    assert (tmp_path / "train" / "last.pt").exists()


def test_small_data_cycles_and_says_so(tiny_data, tmp_path):
    p = run([sys.executable, str(ROOT / "lr_finder.py"), "--data", str(tiny_data), "--arch", "resnet18",
             "--img-size", "32", "--batch-size", "16", "--iters", "25", "--workers", "0", "--out", str(tmp_path)])
    assert "the data gave only 10 batches for 25 steps: cycling" in p.stdout
    assert json.loads(p.stdout.strip().splitlines()[-1])["steps"] >= 10
