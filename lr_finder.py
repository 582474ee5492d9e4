"""
The LR range test (Smith 2015, "Cyclical Learning Rates for Training Neural Networks", in the variant of fastai
and torch-lr-finder): train for --iters steps while the LR grows exponentially from --start-lr to --end-lr,
smooth the loss, stop once it blows up, and suggest the peak LR for train.py's OneCycle.

It runs train.py's exact step: the same model, data, augmentation and mixing, loss with label smoothing, SGD
(no weight decay on norm and bias), AMP and channels_last. All of train.py's flags work here too.

    python lr_finder.py                                          # ResNet-50 on the default data (Imagenette)
    python lr_finder.py --data /mnt/imagenet --batch-size 256    # on one GPU, even on a multi-GPU machine
    python lr_finder.py --arch resnet18 --img-size 64 --batch-size 64 --iters 60 --device cpu

Writes OUT/lr_finder.png (loss against LR, both markers) and prints a ready-to-paste train.py command with the
peak LR scaled to the run's global batch (--run-batch-size x --run-gpus), then one JSON line with the numbers.
"""
import json
import math
import os
import sys

import numpy as np
import torch
import torch.nn as nn

import data
import train


def parse_args(argv=None):
    p = train.make_parser(__doc__)
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
    args = train.parse_args(argv, p)
    if not 0 < args.start_lr < args.end_lr:
        p.error(f"need 0 < --start-lr < --end-lr, got {args.start_lr} and {args.end_lr}")
    if args.iters < 10:
        p.error(f"--iters must be at least 10 to smooth and judge a curve, got {args.iters}")
    if not 0 <= args.smooth < 1:
        p.error(f"--smooth must be in [0, 1), got {args.smooth}")
    if args.diverge <= 1:
        p.error(f"--diverge must be above 1, got {args.diverge}")
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


def suggest(hist, skip_start=10, skip_end=5):
    """Two markers on the smoothed curve, its ends trimmed as torch-lr-finder does: the LR of minimum loss divided
    by 10 (fastai's rule of thumb), and the LR of steepest descent (d loss / d log LR most negative), searched only
    on the way down to that minimum. torch-lr-finder searches the whole curve, and so can pick the fall that comes
    after the loss has blown up, when a dead network settles back to the uniform guess."""
    lrs, losses = hist["lr"], np.array(hist["loss"])
    if len(losses) < skip_start + skip_end + 3:
        skip_start, skip_end = 0, 0
    lo, hi = skip_start, len(losses) - skip_end
    lowest = lo + int(np.argmin(losses[lo:hi]))
    descent = losses[lo:lowest + 1]
    # the LRs are evenly spaced in log; the minimum itself, with its one-sided difference, is no candidate
    steepest = lo + int(np.gradient(descent)[:-1].argmin()) if len(descent) >= 3 else lowest
    return dict(suggested_lr=lrs[steepest], steepest_idx=steepest, min_loss_lr=lrs[lowest],
                min_loss_lr_div10=lrs[lowest] / 10)


def plot(hist, marks, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    lrs, losses = hist["lr"], hist["loss"]
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.plot(lrs, hist["raw"], color="tab:blue", alpha=0.3, lw=1, label="loss per step")
    ax.plot(lrs, losses, color="tab:blue", lw=2.5, label="smoothed loss")
    s, m = marks["steepest_idx"], marks["min_loss_lr_div10"]
    ax.axvline(lrs[s], color="tab:red", ls="--", lw=1.5)
    ax.plot(lrs[s], losses[s], "o", color="tab:red", ms=9,
            label=f"steepest descent: {lrs[s]:.2g} (suggested)")
    ax.axvline(m, color="tab:green", ls=":", lw=1.5, label=f"min-loss LR / 10: {m:.2g}")
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


def find_lr(args):
    device = train.pick_device(args.device)
    if torch.cuda.device_count() > 1:
        print(f"{torch.cuda.device_count()} GPUs visible: the test runs on one; the command below scales its LR "
              f"to the global batch of all of them", flush=True)
    root = args.data if args.data is not None else data.default_data()
    train_set, _, info = data.build_datasets(root, args.img_size, args.subset, args.seed,
                                             args.trivial_augment, args.random_erase)
    workers = data.default_workers(args.workers)
    loader = data.make_loader(train_set, args.batch_size, True, seed=args.seed, workers=workers,
                              pin_memory=device.type == "cuda")
    if len(loader) == 0:
        raise ValueError(f"{len(train_set)} training images make no batch of {args.batch_size}: lower --batch-size")
    num_classes = len(info["classes"])
    amp, ctx, scaler = train.autocast_for(args.amp, device)
    model = train.make_model(args, num_classes, device).train()
    optimizer = train.make_optimizer(model, args, args.start_lr)
    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    mixer = train.make_mixer(args, num_classes)
    print(f"LR range test: {args.arch} at {args.img_size} px, batch {args.batch_size} x {args.accum_steps} accum, "
          f"{amp} on {device.type}; LR {args.start_lr:g} -> {args.end_lr:g} over {args.iters} steps", flush=True)

    batches = cycle(loader, args.iters)
    log_every = max(1, args.iters // 10)

    def step(lr):
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = 0.0
        for micro in range(args.accum_steps):
            images, labels, _ = next(batches)
            x, y = train.to_device(images, labels, device, args.channels_last)
            if mixer is not None:
                x, y = mixer(x, y)
            loss += train.forward_backward(model, x, y, criterion, ctx, scaler, args.accum_steps).item()
        train.optimizer_step(optimizer, scaler)
        loss /= args.accum_steps
        step.i += 1
        if step.i % log_every == 0:
            print(f"step {step.i}/{args.iters} lr {lr:.3g} loss {loss:.4f}", flush=True)
        return loss
    step.i = 0

    hist = range_test(step, lr_schedule(args.start_lr, args.end_lr, args.iters), args.smooth, args.diverge)
    if len(hist["loss"]) < 5:
        raise ValueError(f"the loss diverged after {len(hist['loss'])} steps: lower --start-lr")
    marks = suggest(hist)
    os.makedirs(args.out, exist_ok=True)
    png = os.path.join(args.out, "lr_finder.png")
    plot(hist, marks, png, f"LR range test: {args.arch}, {args.img_size} px, batch {args.batch_size}, {amp}")

    # scale the suggested peak to the planned run's global batch (the linear scaling rule, Goyal et al. 2017)
    test_batch = args.batch_size * args.accum_steps
    run_bs = args.run_batch_size or args.batch_size
    gpus = args.run_gpus or max(1, torch.cuda.device_count())
    run_lr = marks["suggested_lr"] * run_bs * gpus * args.accum_steps / test_batch
    launch = f"torchrun --nproc_per_node={gpus} train.py" if gpus > 1 else "python train.py"
    flags = [f"--data {root}" if args.data else "", f"--arch {args.arch}", f"--img-size {args.img_size}",
             f"--batch-size {run_bs}", f"--accum-steps {args.accum_steps}" if args.accum_steps > 1 else "",
             f"--label-smoothing {args.label_smoothing}", f"--lr {run_lr:.3g}"]
    command = " ".join([launch] + [f for f in flags if f])
    print(f"{'stopped early: the loss diverged' if hist['diverged'] else 'ran all steps'} after {len(hist['lr'])}; "
          f"plot in {png}")
    print(f"steepest descent at LR {marks['suggested_lr']:.3g}, minimum loss at {marks['min_loss_lr']:.3g} "
          f"(/10 = {marks['min_loss_lr_div10']:.3g}); for a global batch of {run_bs * gpus * args.accum_steps}:")
    print(command)
    print(json.dumps(dict(suggested_lr=marks["suggested_lr"], min_loss_lr=marks["min_loss_lr"],
                          min_loss_lr_div10=marks["min_loss_lr_div10"], run_lr=run_lr, command=command,
                          test_batch=test_batch, run_global_batch=run_bs * gpus * args.accum_steps,
                          steps=len(hist["lr"]), diverged=hist["diverged"], plot=png)), flush=True)


def main(argv=None):
    args = parse_args(argv)
    try:
        find_lr(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"lr_finder.py: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
