"""
The LR range test (Smith 2015, "Cyclical Learning Rates for Training Neural Networks", as fastai and
torch-lr-finder run it): train for --iters steps while the LR grows exponentially from --start-lr to --end-lr,
smooth the loss, stop once it blows up, and suggest the peak LR for train.py's OneCycle.

It runs train.py's exact step from the run's own initial weights: the same model and seed, data, augmentation,
mixing, loss with label smoothing, SGD (no weight decay on norm and bias), AMP and channels_last. It takes the
flags of train.py that shape a step (data, model, batch, regularization, system); the flags of a whole run
(--epochs, --resume, --ema, --eval-size, ...) are not accepted here.

    python lr_finder.py                                          # ResNet-50 on the default data (Imagenette)
    python lr_finder.py --data /mnt/imagenet --batch-size 256    # on one GPU, even on a multi-GPU machine
    python lr_finder.py --arch resnet18 --img-size 64 --batch-size 32 --device cpu

The suggestion: the LR where the smoothed loss has risen 10% above its lowest value so far, divided by 1.5
(RISE, DIVISOR). A network trained from scratch often shows no clear descent in a short test: its loss stays flat and
then climbs, so "steepest descent" lands on noise; where the climb starts is the information the test has. The
rule and its constants were picked on a sweep of real short runs (BENCHMARKS.md "Picking the LR").

Writes OUT/lr_finder_<arch>_<size>px_b<batch>.png (the loss, the rise the rule reads, the suggestion) and a .json
beside it with the whole curve; prints a ready-to-paste train.py command with the peak LR scaled to the planned
global batch (--run-batch-size x --run-gpus), then one JSON line with the numbers.
"""
import argparse
import itertools
import json
import math
import os
import sys

import numpy as np
import torch

import data
import train
from model import load_weights
from runtime import autocast_for, pick_device, to_device

RISE, DIVISOR = 0.1, 1.5  # the rule's constants, picked on the sweep; see suggest()
# step flags that the printed command does not copy: it names the data and the batch itself, and the test's machine,
# workers and output folder are not the run's; every other step flag that differs from its default is copied
NOT_COPIED = ("data", "preset", "batch_size", "accum_steps", "workers", "device", "out")


def make_parser():
    p = train.add_step_args(argparse.ArgumentParser(description=__doc__, allow_abbrev=False,
                                                    formatter_class=argparse.RawDescriptionHelpFormatter))
    g = p.add_argument_group("LR range test")
    g.add_argument("--start-lr", type=float, default=1e-7, help="first LR")
    g.add_argument("--end-lr", type=float, default=10.0, help="last LR, if the loss has not diverged before")
    g.add_argument("--iters", type=int, default=100, help="optimizer steps of the test")
    g.add_argument("--smooth", type=float, default=0.05, help="EMA weight of each new loss (torch-lr-finder's)")
    g.add_argument("--diverge", type=float, default=5.0, help="stop when the smoothed loss exceeds this x its best")
    g.add_argument("--run-batch-size", type=int, default=None, help="per-GPU batch of the planned run; "
                                                                   "default: --batch-size")
    g.add_argument("--run-gpus", type=int, default=None, help="GPUs of the planned run; default: the GPUs visible")
    p.set_defaults(out="runs/lr_finder")
    return p


def parse_args(argv=None):
    p = make_parser()
    args, unknown = train.with_preset(p, argv)
    # a flag of a whole run would be silently ignored by a range test: refused by name instead
    run_parser = train.add_run_args(argparse.ArgumentParser(allow_abbrev=False, add_help=False))
    not_run = run_parser.parse_known_args(unknown)[1]
    for arg in unknown:
        if arg.startswith("--") and arg not in not_run:
            p.error(f"{arg.split('=')[0]} is a flag of a whole training run, which a range test does not use; "
                    f"give it to the train.py command this test prints")
    if unknown:
        p.error(f"unrecognized arguments: {' '.join(unknown)}")
    train.check_step_args(p, args)
    if not 0 < args.start_lr < args.end_lr:
        p.error(f"need 0 < --start-lr < --end-lr, got {args.start_lr} and {args.end_lr}")
    if args.iters < 10:
        p.error(f"--iters must be at least 10 to smooth and judge a curve, got {args.iters}")
    if not 0 <= args.smooth < 1:
        p.error(f"--smooth must be in [0, 1), got {args.smooth}")
    if args.diverge <= 1:
        p.error(f"--diverge must be above 1, got {args.diverge}")
    if min(args.run_batch_size or 1, args.run_gpus or 1) < 1:
        p.error("--run-batch-size and --run-gpus must be at least 1")
    return args


def lr_schedule(start, end, iters):
    """The LR of step i: start x (end/start)^(i/(iters-1)), from start to end inclusive."""
    return [start * (end / start) ** (i / (iters - 1)) for i in range(iters)]


def range_test(step, lrs, smooth=0.05, diverge=5.0):
    """Run step(lr) -> raw loss for each LR until the smoothed loss exceeds `diverge` x its best.

    The smoothed loss is s_0 = l_0, s_i = smooth x l_i + (1 - smooth) x s_{i-1}, as torch-lr-finder does.
    """
    hist = dict(lr=[], raw=[], loss=[], diverged=False)
    best = math.inf
    for i, lr in enumerate(lrs):
        raw = step(lr)
        if not math.isfinite(raw):
            if i == 0:
                raise ValueError(f"the loss is {raw} at the first step, at LR {lr:.3g}: the model or data is broken "
                                 f"(check --amp fp32 and the images), not the LR")
            hist["diverged"] = True
            break
        s = raw if i == 0 else smooth * raw + (1 - smooth) * hist["loss"][-1]
        best = min(best, s)
        hist["lr"].append(lr), hist["raw"].append(raw), hist["loss"].append(s)
        if s > diverge * best:
            hist["diverged"] = True
            break
    return hist


# -----------------------------------------------------------------------------
# reading the curve: the rule, and the candidates it was measured against (BENCHMARKS.md)

def warmup_steps(n, skip=10):
    """How many of a curve's n first steps only start the smoothing (it begins at the first batch's loss, noise and
    all), as torch-lr-finder skips them: `skip`, or none on a test too short for that."""
    return skip if n >= 5 * skip else 0


def rise_point(losses, rise=RISE):
    """Index of the first step whose smoothed loss is `rise` (a fraction) above the lowest loss before it (the
    smoothing's first steps not counted), or None if the curve never climbs that far."""
    lowest, skip = math.inf, warmup_steps(len(losses))
    for i, s in enumerate(losses):
        if s > (1 + rise) * lowest:
            return i
        lowest = min(lowest, s) if i >= skip else lowest
    return None


def steepest(lrs, losses, skip_start=10, skip_end=5):
    """The old rule: steepest descent (d loss / d log LR most negative) on the way down to the minimum, ends trimmed
    as torch-lr-finder trims them."""
    losses = np.asarray(losses)
    if len(losses) < skip_start + skip_end + 3:
        skip_start, skip_end = 0, 0
    lo, hi = skip_start, len(losses) - skip_end
    lowest = lo + int(np.argmin(losses[lo:hi]))
    descent = losses[lo:lowest + 1]
    return lo + int(np.gradient(descent)[:-1].argmin()) if len(descent) >= 3 else lowest


def valley(losses):
    """fastai's 'valley', as its docs describe it: the longest stretch over which the loss keeps falling (a longest
    decreasing subsequence), and the point halfway down it."""
    n = len(losses)
    length, start_of = [1] * n, list(range(n))
    for i in range(n):
        for j in range(i):
            if losses[i] < losses[j] and length[j] + 1 > length[i]:
                length[i], start_of[i] = length[j] + 1, start_of[j]
    end = int(np.argmax(length))
    return start_of[end] + (end - start_of[end]) // 2


def candidates(hist):
    """Every rule's LR on one curve (None where a rule finds nothing)."""
    lrs, losses = hist["lr"], hist["loss"]
    lowest = int(np.argmin(losses))
    out = dict(steepest=lrs[steepest(lrs, losses)], min_loss=lrs[lowest], min_loss_div10=lrs[lowest] / 10,
               valley=lrs[valley(losses)])
    for rise in (0.02, 0.05, 0.1, 0.2, 0.5):
        i = rise_point(losses, rise)
        out[f"rise{rise:g}"] = lrs[i] if i is not None else None
    return out


def suggest(hist, rise=RISE, divisor=DIVISOR):
    """The suggestion: the LR where the smoothed loss first rises `rise` above its lowest value so far, / divisor.
    When the loss never climbs that far (the test ended first), the lowest-loss LR / divisor, and says so."""
    losses = hist["loss"]
    i = rise_point(losses, rise)
    found, i = i is not None, i if i is not None else int(np.argmin(losses))
    skip = warmup_steps(len(losses)) if i > warmup_steps(len(losses)) else 0  # rise_point's lowest, not noise
    return dict(suggested_lr=hist["lr"][i] / divisor, rise_idx=i, rise_found=found,
                lowest_idx=skip + int(np.argmin(losses[skip:i + 1])),
                steepest_lr=hist["lr"][steepest(hist["lr"], losses)])


def plot(hist, marks, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    lrs, losses = hist["lr"], hist["loss"]
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.plot(lrs, hist["raw"], color="tab:blue", alpha=0.3, lw=1, label="loss per step")
    ax.plot(lrs, losses, color="tab:blue", lw=2.5, label="smoothed loss")
    lo, hi = marks["lowest_idx"], marks["rise_idx"]
    # the band the rule reasons from: from the lowest loss so far to where the loss has climbed RISE above it
    ax.axvspan(lrs[lo], lrs[hi], color="tab:orange", alpha=0.15,
               label=f"lowest loss -> {RISE:.0%} above it" if marks["rise_found"] else "lowest loss")
    ax.axhline((1 + RISE) * losses[lo], color="tab:orange", ls=":", lw=1)
    ax.axvline(marks["suggested_lr"], color="tab:red", ls="--", lw=1.5,
               label=f"suggested peak LR: {marks['suggested_lr']:.3g}")
    ax.axvline(marks["steepest_lr"], color="0.5", ls=":", lw=1,
               label=f"old rule (steepest descent): {marks['steepest_lr']:.2g}")
    ax.set_xscale("log")
    # keep the divergence from squashing the part of the curve that matters
    low, high = min(losses), max(losses[: max(1, len(losses) * 9 // 10)])
    ax.set_ylim(low - 0.05 * (high - low), high + 0.15 * (high - low))
    ax.set(xlabel="learning rate (log scale)", ylabel="training loss", title=title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cycle(loader, iters):
    """Batches forever, saying so when the data is shorter than the test."""
    epoch = 0
    while True:
        loader.sampler.set_epoch(epoch)
        yield from loader
        epoch += 1
        print(f"the data gave only {len(loader) * epoch} batches for {iters} steps: cycling through it again "
              f"(epoch {epoch})", flush=True)


def run_command(args, root, run_lr, gpus, run_bs):
    """The train.py command of the planned run: its launcher, --preset, every step flag that differs from
    train.py's defaults for that preset (the flags come from train.add_step_args, so a new one is copied with no
    edit here), the batch, and the scaled LR."""
    names = vars(train.add_step_args(argparse.ArgumentParser()).parse_args([]))  # the step flags, by dest
    defaults = vars(train.with_preset(train.add_step_args(argparse.ArgumentParser()), ["--preset", args.preset])[0])
    flags = [f"--data {root}"]  # always: the run trains on the data the test measured
    flags += [f"--preset {args.preset}"] if args.preset != "default" else []
    for name in names:
        value, flag = getattr(args, name), "--" + name.replace("_", "-")
        if name in NOT_COPIED or value == defaults[name]:
            continue
        flags.append(flag if value is True else f"--no-{flag[2:]}" if value is False else f"{flag} {value}")
    flags += [f"--batch-size {run_bs}"] + ([f"--accum-steps {args.accum_steps}"] if args.accum_steps > 1 else [])
    launch = f"torchrun --nproc_per_node={gpus} train.py" if gpus > 1 else "python train.py"
    return " ".join([launch, *flags, f"--lr {run_lr:.3g}"])


def find_lr(args):
    device = pick_device(args.device)
    if torch.cuda.device_count() > 1:
        print(f"{torch.cuda.device_count()} GPUs visible: the test runs on one; the command below scales its LR "
              f"to the global batch of all of them", flush=True)
    root = args.data if args.data is not None else str(data.default_data())
    print(f"data {root}" + ("" if args.data else " (no --data: $DATA_DIR, else Imagenette)"), flush=True)
    train_set, _, info = train.make_datasets(args, root, args.img_size)
    loader = data.make_loader(train_set, args.batch_size, True, seed=args.seed, workers=data.default_workers(
        args.workers), pin_memory=device.type == "cuda")
    if len(loader) == 0:
        raise ValueError(f"{len(train_set)} training images make no batch of {args.batch_size}: lower --batch-size")
    num_classes = len(info["classes"])
    amp, ctx, scaler = autocast_for(args.amp, device)
    model = train.make_model(args, num_classes, device).train()  # the run's own initial weights (same seed)
    if args.init_from:  # the LR of a fine-tuning phase: the test starts from the weights that phase starts from
        print(load_weights(model, args.init_from, info["classes"]), flush=True)
    optimizer = train.make_optimizer(model, args, args.start_lr)
    criterion = train.make_criterion(args)
    mixer = train.make_mixer(args, num_classes)
    print(f"LR range test: {args.arch} at {args.img_size} px, batch {args.batch_size} x {args.accum_steps} accum, "
          f"{amp} on {device.type}; LR {args.start_lr:g} -> {args.end_lr:g} over {args.iters} steps", flush=True)
    batches, log_every, done = cycle(loader, args.iters), max(1, args.iters // 10), 0

    def step(lr):
        nonlocal done
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = 0.0
        for _ in range(args.accum_steps):
            images, labels, _ = next(batches)
            x, y = to_device(images, labels, device, args.channels_last)
            if mixer is not None:
                x, y = mixer(x, y)
            loss += train.forward_backward(model, x, y, criterion, ctx, scaler, args.accum_steps).item()
        train.optimizer_step(optimizer, scaler)
        done += 1
        if done % log_every == 0:
            print(f"step {done}/{args.iters} lr {lr:.3g} loss {loss / args.accum_steps:.4f}", flush=True)
        return loss / args.accum_steps

    hist = range_test(step, lr_schedule(args.start_lr, args.end_lr, args.iters), args.smooth, args.diverge)
    if len(hist["loss"]) < 5:
        raise ValueError(f"the loss diverged after {len(hist['loss'])} steps: lower --start-lr")
    marks = suggest(hist)
    os.makedirs(args.out, exist_ok=True)
    base = os.path.join(args.out, f"lr_finder_{args.arch}_{args.img_size}px_b{args.batch_size * args.accum_steps}")
    stem = base
    for k in itertools.count(2):  # an earlier test's plot and curve stay: this one takes the next free name
        if not os.path.exists(stem + ".png"):
            break
        stem = f"{base}_{k}"
    if stem != base:
        print(f"{base}.png is an earlier test's: this one is {stem}.png", flush=True)
    plot(hist, marks, stem + ".png", f"LR range test: {args.arch}, {args.img_size} px, batch {args.batch_size}, {amp}")
    with open(stem + ".json", "w") as f:
        json.dump(dict(hist, marks=marks, candidates=candidates(hist), args=vars(args)), f)

    # scale the suggested peak to the planned run's global batch (the linear scaling rule, Goyal et al. 2017)
    test_batch = args.batch_size * args.accum_steps
    run_bs = args.run_batch_size or args.batch_size
    gpus = args.run_gpus or max(1, torch.cuda.device_count())
    run_global = run_bs * gpus * args.accum_steps
    run_lr = marks["suggested_lr"] * run_global / test_batch
    command = run_command(args, root, run_lr, gpus, run_bs)
    print(f"{'stopped early: the loss diverged' if hist['diverged'] else 'ran all steps'} after {len(hist['lr'])}; "
          f"plot in {stem}.png")
    print(f"the smoothed loss is lowest at LR {hist['lr'][marks['lowest_idx']]:.3g} and "
          + (f"{RISE:.0%} above that at {hist['lr'][marks['rise_idx']]:.3g}" if marks["rise_found"] else
             "never climbs 10% above it (raise --end-lr to see where it does)")
          + f": suggested peak LR {marks['suggested_lr']:.3g} at batch {test_batch}; for a global batch of "
            f"{run_global}:")
    print(command)
    print(json.dumps(dict(suggested_lr=marks["suggested_lr"], rule=f"first {RISE:.0%} rise / {DIVISOR:g}",
                          rise_found=marks["rise_found"], steepest_lr=marks["steepest_lr"], run_lr=run_lr,
                          command=command, test_batch=test_batch, run_global_batch=run_global,
                          steps=len(hist["lr"]), diverged=hist["diverged"], plot=stem + ".png")), flush=True)


def main(argv=None):
    args = parse_args(argv)
    try:
        find_lr(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"lr_finder.py: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
