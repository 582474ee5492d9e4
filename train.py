r"""
Train a ResNet from scratch with one recipe, FFCV's ResNet-50 ImageNet recipe in plain PyTorch: SGD with momentum
and OneCycle, label smoothing, progressive resizing 160 -> 192 px, BlurPool, evaluation at 256 px with flip TTA,
AMP, channels_last and DDP. The defaults are the headline run: ResNet-50 on ImageNet-1k, 24 epochs, aiming at
FFCV's 75.6% top-1 (README 'Recipes'; --epochs picks another point of its table, --preset long aims at 78%).

One GPU, or the CPU (with no --data it downloads Imagenette, 10 ImageNet classes, to data/):
    python train.py --data /mnt/imagenet
Several GPUs on one machine, or two machines of 8 (the same line on each, --node_rank=1 on the second):
    torchrun --nproc_per_node=4 train.py --data /mnt/imagenet
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=10.0.0.1 --master_port=29500 \
        train.py --data /mnt/imagenet
A quick look on a laptop CPU:
    python train.py --arch resnet18 --img-size 128 --batch-size 64 --epochs 5

Writes last.pt, best.pt, log.jsonl, curves.png and model_summary.txt to --out. The same command again resumes,
also from inside an epoch: on SIGTERM (a spot reclaim) rank 0 checkpoints after the step and all exit with 75.
"""
import argparse
import importlib.util
import json
import math
import os
import random
import signal
import sys
import time
from contextlib import nullcontext
from functools import partial
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torchvision.transforms import v2

import data
from evaluate import accuracy
from model import (ARCHS, TTA, build_model, load_weights, read_checkpoint, save_checkpoint,
                   save_weights, write_summary)
from runtime import autocast_for, close_distributed, init_distributed, to_device

# Exit status, for restart loops (run_ec2.sh): resume after preempted (and after a crash that made progress), stop
# otherwise. Under torchrun the agent's own exit status does not carry these, so OUT/status holds the same word.
EXIT = dict(done=0, stopped=0, crashed=1, bad_input=2, diverged=3, preempted=75)  # 75: EX_TEMPFAIL, "try again"

# The flags that change what a checkpoint means: resuming with another value would corrupt the run.
# (--lr and --weight-decay live in the restored optimizer and schedule: a new value would be silently ignored.)
# --batch-size and --accum-steps may change: the global batch is the run's constant (accumulation()).
RESUME_MUST_MATCH = ("arch", "blurpool", "epochs", "img_size", "min_img_size", "subset", "seed", "warmup_pct", "lr",
                     "weight_decay")

# The defaults are FFCV's rn50 configs (ffcv-imagenet: 16 epochs 73.8%, 24 epochs 75.6%, 88 epochs 78.4% top-1 on
# 8 x A100); the presets change the length and, for long runs, add the regularization that long runs can use.
PRESETS = dict(
    default={},
    fast=dict(epochs=16),  # FFCV's shortest point: 73.8%, two thirds of the default's cost
    # torchvision's long ResNet-50 recipe mixes (mixup 0.2, cutmix 1.0) and averages the weights (EMA); mixing
    # costs accuracy in short runs (BENCHMARKS.md) and "tends to only help for 80+ epochs" (Imagenette's authors)
    long=dict(epochs=90, mixup=0.2, cutmix=1.0, ema=0.9999, warmup_pct=0.03),
    # a few minutes on a laptop's CPU: the 64 px ResNet-18 of README "Measured on Imagenette" at lr_finder.py's LR
    # (67.64% on Imagenette in 6.5 minutes on 2 cores); what `python train.py` runs where there is no GPU
    cpu=dict(arch="resnet18", img_size=64, batch_size=32, epochs=5, lr=0.194),
)
# the flags that shape the recipe: any of them on the command line, and no cpu preset is chosen for the user
RECIPE_FLAGS = ("--preset", "--arch", "--blurpool", "--no-blurpool", "--img-size", "--min-img-size", "--eval-size",
                "--batch-size", "--accum-steps", "--epochs", "--lr", "--warmup-pct", "--weight-decay", "--mixup",
                "--cutmix", "--ema", "--label-smoothing", "--subset", "--init-from",
                *("--" + name.replace("_", "-") for name in data.AUGMENTATIONS))


# -----------------------------------------------------------------------------
# flags: those of the step (train.py and lr_finder.py), then those of a whole run (train.py only)

def add_step_args(p):
    """The flags that shape one training step: the data and its augmentation, the network, the batch, the loss, the
    optimizer, the machine. lr_finder.py runs the same step, so it takes exactly these (and prints them back in the
    train.py command it suggests): a flag added here reaches both scripts."""
    flag = argparse.BooleanOptionalAction
    # data
    p.add_argument("--data", help=f"dataset root (README 'Data layouts'); default: $DATA_DIR, else Imagenette in "
                                  f"{data.DEFAULT_DATA}")
    p.add_argument("--preset", default="default", choices=list(PRESETS), help="24, 16 or 90 epochs (README); cpu: "
                   "minutes on a CPU, chosen where there is no GPU and no recipe flag is given")
    p.add_argument("--img-size", type=int, default=192, help="training crop side, px (the last epochs' size)")
    p.add_argument("--subset", type=float, default=1.0, help="train on this fraction of each class (0, 1]")
    p.add_argument("--workers", type=int, help="loader processes per GPU; default: cores/GPUs - 1")
    for name, aug in data.AUGMENTATIONS.items():  # each augmentation's flag, from its one entry there
        p.add_argument("--" + name.replace("_", "-"), dest=name, **aug["flag"])
    # model
    p.add_argument("--arch", default="resnet50", choices=list(ARCHS), help="network")
    p.add_argument("--blurpool", action=flag, default=True, help="blur before strided convs (Zhang 2019; FFCV)")
    p.add_argument("--init-from", metavar="PATH", help="weights to start from; fresh optimizer, schedule, epochs")
    # optimization
    p.add_argument("--batch-size", type=int, default=256, help="images per process per step (per GPU)")
    p.add_argument("--accum-steps", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="L2 on conv and fc weights (FFCV rn50)")
    p.add_argument("--decay-norm-bias", action=flag, default=False, help="also decay BatchNorm and biases")
    # regularization
    p.add_argument("--label-smoothing", type=float, default=0.1, help="Szegedy et al. 2016")
    p.add_argument("--mixup", type=float, default=0.0, help="mixup Beta alpha; 0 = off")
    p.add_argument("--cutmix", type=float, default=0.0, help="cutmix Beta alpha; 0 = off")
    # system
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu", "mps"], help="auto: cuda > mps > cpu")
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "fp32"], help="auto: bf16 if native")
    p.add_argument("--channels-last", action=flag, default=True, help="NHWC memory layout")
    p.add_argument("--seed", type=int, default=0, help="seeds init, data order, augmentation and mixing")
    p.add_argument("--out", help="output folder; default: runs/<the data's folder name>-<arch>")
    return p


def add_run_args(p):
    """The flags of a whole run: its length and schedule, evaluation, checkpoints and the dataset tools."""
    flag = argparse.BooleanOptionalAction
    g = p.add_argument_group("the run (train.py only)")
    g.add_argument("--epochs", type=int, default=24, help="epochs; OneCycle spans all of them")
    g.add_argument("--lr", type=float, help="peak LR; default 1.7 x global batch / 4096 (FFCV rn50)")
    g.add_argument("--warmup-pct", type=float, default=0.1, help="fraction of steps that OneCycle spends rising")
    g.add_argument("--min-img-size", type=int, help="progressive resizing from, px; default 5/6 of --img-size")
    g.add_argument("--eval-size", type=int, help="eval crop, px; default 4/3 of --img-size (FixRes, Touvron 2019)")
    g.add_argument("--tta", nargs="?", const="flip", default="flip", choices=TTA, help="evaluation: flip (each image "
                   "and its mirror image) or none; --tta alone is flip")
    g.add_argument("--no-tta", dest="tta", action="store_const", const="none", help="the same as --tta none (the "
                   "spelling of runs begun before --tta took a value, kept for their resumes)")
    g.add_argument("--mix-off-epoch", type=int, help="no mixup/cutmix from this epoch (0-based); default: last 10%%")
    g.add_argument("--ema", type=float, default=0.0, help="EMA decay per step, e.g. 0.9999; 0 = off")
    g.add_argument("--target-top1", type=float, help="stop once val top-1 (EMA's with --ema) reaches this, %%")
    g.add_argument("--compile", action=flag, default=False, help="torch.compile the step (minutes; faster on GPUs)")
    g.add_argument("--hourly-usd", type=float, help="the machine's price per hour, for costs in the log")
    g.add_argument("--tensorboard", action="store_true", help="also log to OUT/tb/ for TensorBoard (pip install "
                                                              "tensorboard)")
    g.add_argument("--resume", default="auto", help="auto (OUT/last.pt if present), none, or a checkpoint path")
    g.add_argument("--stop-epoch", type=int, help="stop after this many epochs, schedule unchanged")
    g.add_argument("--log-every", type=int, default=50, help="optimizer steps between progress lines")
    g.add_argument("--save-every-min", type=float, default=10, help="also checkpoint inside an epoch this often, min")
    g.add_argument("--keep-every", type=int, help="also keep OUT/epoch_NNN.pt every N epochs")
    g.add_argument("--check-data", action="store_true", help="scan --data (layout, counts, bad files) and exit")
    g.add_argument("--shrink", metavar="DIR", help="write a copy of --data with smaller train images there, exit")
    g.add_argument("--max-side", type=int, default=320, help="with --shrink: the side's most, px")
    g.add_argument("--shrink-by", default="shorter", choices=["shorter", "longer"], help="with --shrink: which side")
    return p


def at_least_one(p, args, names):
    for name in names:
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")


def check_step_args(p, args):
    """What argparse cannot check by type, reported as argparse reports (one line, exit 2)."""
    at_least_one(p, args, ("batch_size", "accum_steps", "img_size"))
    if not 0 < args.subset <= 1:
        p.error(f"--subset must be in (0, 1], got {args.subset}")
    if (args.workers or 0) < 0:
        p.error(f"--workers must be 0 or more, got {args.workers}")
    return args


def check_run_args(p, args):
    """The same for the run's flags; then the sizes that follow from --img-size."""
    at_least_one(p, args, ("epochs", "log_every", "min_img_size", "eval_size", "max_side", "keep_every", "stop_epoch"))
    for bad, message in ((args.save_every_min <= 0, f"--save-every-min must be above 0, got {args.save_every_min}"),
                         (not 0 < args.warmup_pct < 1, f"--warmup-pct must be in (0, 1), got {args.warmup_pct}"),
                         (not 0 <= args.ema < 1, f"--ema must be in [0, 1), got {args.ema}"),
                         ((args.min_img_size or 0) > args.img_size, f"--min-img-size {args.min_img_size} is above "
                          f"--img-size {args.img_size}; progressive resizing grows"),
                         (args.init_from and args.resume not in ("auto", "none"), "--init-from starts a new run; "
                          "--resume PATH continues one: give one of them")):
        if bad:
            p.error(message)
    if args.tensorboard:  # optional: imported only when asked for, and refused before any work when missing
        if importlib.util.find_spec("tensorboard") is None:
            p.error("--tensorboard needs the tensorboard package, which is not installed: pip install tensorboard "
                    "(run_ec2.sh setup installs it when TRAIN_ARGS ask for --tensorboard)")
    # FFCV's 160 -> 192 px, evaluated at 256: 5/6 and 4/3 of --img-size, in multiples of 16 px as FFCV's sizes are
    args.min_img_size = args.min_img_size or min(args.img_size, max(16, 16 * round(args.img_size * 5 / 96)))
    args.eval_size = args.eval_size or max(16, 16 * round(args.img_size / 12))
    return args


def with_preset(p, argv):
    """Parse argv over the --preset's defaults, so that `--preset long --epochs 120` is the long recipe in 120
    epochs; returns (args, the words that p does not know)."""
    p.set_defaults(**PRESETS[p.parse_known_args(argv)[0].preset])
    return p.parse_known_args(argv)


def parse_args(argv=None, cpu_preset=False):
    """The run's args. cpu_preset (train.py's own command line): with no GPU here and none of the recipe's flags given,
    the cpu preset, said in one line, instead of the ImageNet recipe that would take days on a CPU."""
    p = add_run_args(add_step_args(argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)))
    words = list(sys.argv[1:] if argv is None else argv)
    tool = any(w in ("--check-data", "--shrink") for w in words)
    if cpu_preset and not tool and not torch.cuda.is_available() and not any(w.split("=")[0] in RECIPE_FLAGS
                                                                             for w in words):
        words += ["--preset", "cpu"]
        print("no GPU here: the cpu preset, ResNet-18 at 64 px for 5 epochs (minutes, not the days the ImageNet "
              "recipe would take on a CPU); give --preset default, or any recipe flag, for the full recipe", flush=True)
    args, unknown = with_preset(p, words)
    if unknown:
        p.error(f"unrecognized arguments: {' '.join(unknown)}")
    # a run's folder is named after what it trains, so that an Imagenette quick start and an ImageNet run never share
    # one (auto-resume would find the other's last.pt)
    data_name = os.path.basename(os.path.normpath(args.data or data.default_root()))
    args.out = args.out or os.path.join("runs", f"{data_name}-{args.arch}")
    return check_run_args(p, check_step_args(p, args))


def flag_table():
    """README's table of flags, made from the parsers themselves (a test keeps the README equal to it): every flag of a
    step, which lr_finder.py takes too, then those of a whole run, which are train.py's alone."""
    rows = ["| flag | default | lr_finder.py | meaning |", "| --- | --- | --- | --- |"]
    for add, shared in ((add_step_args, "yes"), (add_run_args, "no")):
        for action in add(argparse.ArgumentParser(add_help=False))._actions:  # argparse lists no actions otherwise
            if isinstance(action, argparse.BooleanOptionalAction) or action.default is False:
                default = "on" if action.default else "off"
            else:
                default = "-" if action.default is None else str(action.default)
            flag = " / ".join(f"`{o}`" for o in action.option_strings)
            rows.append(f"| {flag} | {default} | {shared} | {(action.help or '').replace('%%', '%')} |")
    return "\n".join(rows)


def epoch_sizes(args):
    """Training crop per epoch. Progressive resizing as FFCV schedules it: --min-img-size up to 70% of the epochs,
    a linear ramp to --img-size until 85%, rounded to 16 px, then --img-size; small images early are cheap."""
    lo, hi, start, end = args.min_img_size, args.img_size, 0.70 * args.epochs, 0.85 * args.epochs
    sizes = []
    for epoch in range(args.epochs):
        t = min(1.0, max(0.0, (epoch - start) / max(end - start, 1e-9)))
        sizes.append(hi if t >= 1 else max(lo, min(hi, round((lo + t * (hi - lo)) / 16) * 16)))
    return sizes


# -----------------------------------------------------------------------------
# the pieces lr_finder.py reuses, so that the range test runs the exact training step

def make_datasets(args, root, img_size, eval_size=None):
    """(train set, val set, info) of --data with the step's augmentation (every flag of data.AUGMENTATIONS, as given);
    img_size: one size, or one per epoch."""
    augment = {name: getattr(args, name) for name in data.AUGMENTATIONS}
    return data.build_datasets(root, img_size, args.subset, args.seed, augment, eval_size=eval_size)


def make_model(args, num_classes, device):
    torch.manual_seed(args.seed)  # the same init on every rank
    model = build_model(args.arch, num_classes=num_classes, blurpool=args.blurpool).to(device)
    return model.to(memory_format=torch.channels_last) if args.channels_last else model


def make_optimizer(model, args, lr):
    """SGD with momentum; by default no weight decay on BatchNorm and bias (Jia et al. 2018): decaying them
    regularizes nothing useful, since the BN that follows every conv undoes a weight's scale anyway."""
    decay = [p for p in model.parameters() if p.ndim > 1 or args.decay_norm_bias]
    no_decay = [p for p in model.parameters() if p.ndim <= 1 and not args.decay_norm_bias]
    groups = [dict(params=decay, weight_decay=args.weight_decay), dict(params=no_decay, weight_decay=0.0)]
    return torch.optim.SGD(groups, lr=lr, momentum=0.9)


def make_scheduler(optimizer, args, peak_lr, steps_per_epoch):
    # Smith & Topin 2017: one cycle, LR up then down, momentum 0.95 -> 0.85 -> 0.95 (PyTorch's), stepped per optimizer
    # step; FFCV peaks at epoch 2 of 16-24. OneCycleLR divides by zero on a rise of 1 step: a tiny run rises 1.5.
    total = args.epochs * steps_per_epoch
    if total < 4:
        raise ValueError(f"{total} optimizer steps are too few for a cycle; raise --epochs or lower --batch-size")
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=peak_lr, total_steps=total, base_momentum=0.85,
                                               pct_start=max(args.warmup_pct, 1.5 / total), max_momentum=0.95)


def make_criterion(args):
    return nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)


def make_mixer(args, num_classes):
    """Mixup or cutmix, one of them per batch, on the device; None when both are off."""
    mixers = [v2.MixUp(alpha=args.mixup, num_classes=num_classes)] if args.mixup > 0 else []
    mixers += [v2.CutMix(alpha=args.cutmix, num_classes=num_classes)] if args.cutmix > 0 else []
    return v2.RandomChoice(mixers) if mixers else None


# An epoch's running sums, in this order (a checkpoint holds them summed over the ranks, progress.sums): the loss
# summed over micro-batches, the micro-batches, the top-1 hits and the images they count (unmixed micro-batches
# only), the mixed micro-batches. A new one: its name at the end here, and where forward_backward adds to it.
SUMS = ("loss", "micro_batches", "hits", "counted", "mixed")
SUM = {name: k for k, name in enumerate(SUMS)}


def forward_backward(model, x, y, criterion, ctx, scaler, accum_steps, sums=None):
    """One micro-batch under autocast, its loss scaled for fp16 and for accumulation; returns the loss. `sums`, the
    epoch's running sums (SUMS), gains this batch's: they stay on the device, so adding to them never waits for it."""
    with ctx:
        logits = model(x)
        loss = criterion(logits, y)
    scaler.scale(loss / accum_steps).backward()
    loss = loss.detach()
    if sums is not None:
        sums[SUM["loss"]] += loss
        sums[SUM["micro_batches"]] += 1
        if y.ndim == 1:
            sums[SUM["hits"]] += (logits.detach().argmax(1) == y).sum()
            sums[SUM["counted"]] += len(y)
        else:  # soft targets: mixup or cutmix mixed this batch, so it has no top-1 to count
            sums[SUM["mixed"]] += 1
    return loss


def optimizer_step(optimizer, scaler):
    scaler.step(optimizer)  # skips the step if fp16 gradients overflowed
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


# -----------------------------------------------------------------------------
# what the ranks agree on

def agreed(*flags, group=None):
    """Each flag True on every rank if it is True on any, so that all ranks act after the same step. The flags
    travel as a CPU tensor (over gloo: `group`, under NCCL): a CUDA tensor and .item() here would make the CPU wait
    for every step's kernels before it could queue the next one, on every step of every GPU run."""
    if not dist.is_initialized():
        return flags if len(flags) > 1 else flags[0]
    t = torch.tensor([float(f) for f in flags])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    out = tuple(v > 0 for v in t.tolist())
    return out if len(out) > 1 else out[0]


def global_sums(sums):
    """The epoch's running sums over all ranks (a collective: every rank calls it), as a list."""
    total = sums.clone()
    if dist.is_initialized():
        dist.all_reduce(total)
    return total.tolist()


def check_ranks_agree(model, device):
    """An invariant worth one all-gather at the end of a run: DDP must have kept every rank's weights identical.
    Returns the checksum."""
    flat = torch.cat([p.detach().flatten().double() for p in model.parameters()])
    sums = [torch.zeros(2, dtype=torch.float64, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(sums, torch.stack([flat.sum(), (flat * flat).sum()]))
    assert all(torch.equal(s, sums[0]) for s in sums), f"ranks' weights diverged: {sums}"
    return sums[0][0].item()


def broadcast0(obj):
    """Rank 0's picklable `obj` on every rank (itself when there is no process group)."""
    box = [obj]
    if dist.is_initialized():
        dist.broadcast_object_list(box, src=0)
    return box[0]


def load_shared(path, local, obj):
    """On every rank, the checkpoint that rank 0 read from `path` (`obj` there): each rank reads its own copy
    (`local`) when every rank has that very file (same size and mtime), else rank 0 sends its object to all, in one
    broadcast (nodes with disks of their own). Returns (checkpoint, the ranks that had no copy)."""
    if not dist.is_initialized():
        return obj, []
    stamp = broadcast0([os.stat(path).st_size, os.stat(path).st_mtime_ns] if dist.get_rank() == 0 else None)
    have = dist.get_rank() == 0 or (os.path.exists(local) and [os.stat(local).st_size, os.stat(local).st_mtime_ns]
                                     == stamp)
    has = [None] * dist.get_world_size()
    dist.all_gather_object(has, have)
    if all(has):
        return (obj if dist.get_rank() == 0 else read_checkpoint(local)), []
    return broadcast0(obj), [r for r, h in enumerate(has) if not h]


# -----------------------------------------------------------------------------
# the run's state: where it starts, what it saves (model.py states the checkpoint's format)

def find_resume(args, rank, print0):
    """(checkpoint dict, path) to resume from, or (None, None). Rank 0 decides and every rank follows: on nodes with
    disks of their own only node 0 has OUT/last.pt, and a rank without that very file gets rank 0's."""
    ckpt, decision, last = None, [None, None], os.path.join(args.out, "last.pt")  # rank 0's path, or its error
    if rank == 0:
        decision[0] = {"auto": last if os.path.exists(last) else None, "none": None}.get(args.resume, args.resume)
        try:
            ckpt = read_checkpoint(decision[0]) if decision[0] else None
            if ckpt is not None and "optimizer" not in ckpt:
                raise ValueError(f"--resume {decision[0]} is not a train.py checkpoint (no optimizer state); resume "
                                 f"from OUT/last.pt, or start a new run from its weights with --init-from")
        except (ValueError, FileNotFoundError) as e:
            decision = [None, str(e)]
        held = [f for f in ("last.pt", "best.pt", "log.jsonl") if os.path.exists(os.path.join(args.out, f))]
        if decision == [None, None] and held:  # a fresh run would overwrite that run's checkpoints and log
            decision[1] = (f"{args.out} holds a run already ({', '.join(held)}): a new run there would overwrite it; "
                           f"give the new run its own --out, or " + ("drop --resume none to continue that one"
                           if args.resume == "none" else "continue it from one of its checkpoints with --resume PATH"))
    path, error = broadcast0(decision)
    if error:
        raise ValueError(error)  # on every rank, so that none is left waiting
    mine = last if args.resume == "auto" else path  # this node's copy, if it has one
    ckpt, sent = load_shared(path, mine, ckpt) if path else (None, [])
    if sent:
        print0(f"ranks {sent} have no copy of {path} (another node's disk): they resume from rank 0's, sent to them")
    return ckpt, path


def accumulation(global_batch, batch, world, path):
    """A: the micro-batches of --batch-size each rank runs a step, so that a step holds the run's global batch on any
    number of ranks. A resume that cannot split it into whole micro-batches is refused, and says what would."""
    if global_batch % (batch * world) == 0:
        return global_batch // (batch * world)
    if global_batch % world:
        raise ValueError(f"{path} trained with {global_batch} images a step, which {world} ranks cannot share "
                         f"equally; resume on a number of GPUs that divides {global_batch // batch}")
    fits = max(b for b in range(1, batch + 1) if global_batch // world % b == 0)
    raise ValueError(f"{path} trained with {global_batch} images a step, which {world} ranks of --batch-size {batch} "
                     f"cannot split into whole micro-batches; resume with --batch-size {fits}")


def resume(r, ckpt, path):
    """Check that the checkpoint continues this very run, load every part of it, and say what changed. Returns
    the run's progress."""
    args, saved = r.args, ckpt["args"]
    if ckpt["classes"] != r.info["classes"]:
        raise ValueError(f"{path} was trained on other classes than --data has ({len(ckpt['classes'])} vs "
                         f"{len(r.info['classes'])}); point --data at the same dataset, or start a new run in a new "
                         f"--out")
    for name in RESUME_MUST_MATCH:
        if saved.get(name) != getattr(args, name):
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"{flag} is {getattr(args, name)} but {path} was trained with {saved.get(name)}; "
                             f"rerun with {flag} {saved.get(name)}, or start a new run in a new --out")
    parts = r.parts
    if ckpt["amp"] != r.amp:  # --amp auto resolves per GPU (bf16 on an A100, fp16 on a T4): fp16's scaler starts afresh
        r.print0(f"{path} trained in {ckpt['amp'] or 'bf16 or fp32'}, this run in {r.amp}: "
                 + ("a fresh loss scaler" if r.amp == "fp16" else "its loss scaler is not needed"))
        parts = {k: v for k, v in parts.items() if k != "scaler"}
    for name, part in parts.items():
        if part is not None and ckpt.get(name) is not None:
            part.load_state_dict(ckpt[name])
    torch.set_rng_state(ckpt["rng"]["torch"])
    random.setstate(ckpt["rng"]["python"])
    progress = ckpt["progress"]
    if (ckpt["world"], saved["batch_size"]) != (r.world, args.batch_size):
        unit = "GPUs" if torch.cuda.is_available() else "processes"
        r.print0(f"resuming on {r.world} {unit} instead of {ckpt['world']}: {r.accum} micro-batch"
                 f"{'es' * (r.accum > 1)} of {args.batch_size} per step on each, the same {ckpt['global_batch']:,} "
                 f"images per step" + (f"; BatchNorm now normalizes groups of {args.batch_size} images, not "
                                       f"{saved['batch_size']}" if args.batch_size != saved["batch_size"] else ""))
    changed = "".join(f"; --{k.replace('_', '-')} {v} -> {getattr(args, k)}" for k, v in saved.items()
                      if getattr(args, k, v) != v)
    r.print0(f"resumed from {path}: epoch {progress['epochs_done'] + 1}, step {progress['step']}/{r.steps_per_epoch}, "
             f"best top-1 {progress['best_top1']:.2f}%{changed}")
    return progress


def fresh_progress(epochs_done=0, best_top1=0.0):
    """Where a run stands at the start of an epoch (model.FIELDS says what each field means)."""
    return dict(epochs_done=epochs_done, step=0, best_top1=best_top1, sums=[0.0] * len(SUMS), lr_steps=[])


def recorded_argv(args):
    """The command line a checkpoint records: as given, and the cpu preset as if given where train.py chose it, so
    that a resume (run_ec2.sh replays this line) continues the same recipe."""
    given = sys.argv[1:]
    chosen = args.preset == "cpu" and not any(w.split("=")[0] == "--preset" for w in given)
    return given + (["--preset", "cpu"] if chosen else [])


def snapshot(r, progress, row=None):
    """Everything needed to resume, in one dict: all of model.FIELDS but its format, which save_checkpoint stamps
    (and refuses a field left out). Written by rank 0."""
    return dict({k: v.state_dict() if v is not None else None for k, v in r.parts.items()}, weights="model",
                progress=progress, world=r.world, global_batch=r.global_batch, amp=r.amp, args=vars(r.args),
                argv=recorded_argv(r.args), classes=r.info["classes"], class_names=r.info["names"], metrics=row,
                rng=dict(torch=torch.get_rng_state(), python=random.getstate()))


def save_epoch(r, ckpt, is_best):
    """Rank 0, after each epoch: last.pt, best.pt on a new best, epoch_NNN.pt every --keep-every epochs, log.jsonl
    and curves.png. SGD's momentum is as large as the weights, so only the newest epoch_NNN.pt keeps the state of
    the run; the one before it is slimmed to what evaluate.py, app.py and --init-from read."""
    out, done, every = r.args.out, ckpt["progress"]["epochs_done"], r.args.keep_every or 0
    kept = every and done % every == 0
    for name in ["last.pt"] + (["best.pt"] if is_best else []) + ([f"epoch_{done:03d}.pt"] if kept else []):
        save_checkpoint(ckpt, os.path.join(out, name))
    previous = os.path.join(out, f"epoch_{done - every:03d}.pt")
    if kept and os.path.exists(previous):
        save_weights(read_checkpoint(previous), previous)
    write_log(r.rows, os.path.join(out, "log.jsonl"))  # r.rows ends with this epoch's row, ckpt["metrics"]
    plot_curves(r.rows, os.path.join(out, "curves.png"))


# -----------------------------------------------------------------------------
# the epoch's metrics, its log and its curves

def epoch_metrics(r, sums):
    """A training epoch's metrics from its running sums over all ranks: the mean loss of its micro-batches, the
    top-1 of its unmixed images, whether any was mixed; then the val loss, top-1 and top-5 of the model, and the EMA's
    top-1, at --eval-size with --tta (evaluate.py's loop). Every rank evaluates the bare module: a DDP forward would
    need all ranks in step."""
    s, args = dict(zip(SUMS, global_sums(sums))), r.args
    metrics = dict(train_loss=s["loss"] / s["micro_batches"], mixed=s["mixed"] > 0,
                   train_top1=100 * s["hits"] / s["counted"] if s["counted"] else None,
                   **accuracy(r.model, r.val_loader, r.device, r.ctx, args.tta, args.channels_last))
    if r.ema is not None:
        metrics["ema_top1"] = accuracy(r.ema.module, r.val_loader, r.device, r.ctx, args.tta,
                                       args.channels_last)["val_top1"]
    return metrics


def read_log(path):
    """The rows of log.jsonl. A torn last line (a kill or a full disk mid-write, before rows were written whole) is
    skipped with a warning; a damaged line before it is bad input."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    rows = []
    for k, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except ValueError:
            if k + 1 < len(lines):
                raise ValueError(f"{path} line {k + 1} is not a JSON row: repair or remove that line") from None
            print(f"warning: {path}: its last line is torn (a write cut short); skipped, and the log is written "
                  f"whole again after this epoch", flush=True)
    return rows


def write_log(rows, path):
    """log.jsonl, whole: a temp file, then os.replace, so that a kill or a full disk leaves the previous log, never a
    torn row."""
    with open(path + ".tmp", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def trend(rows, epoch, top1, n=5):
    """Least-squares slope of val top-1 over the last n epochs of a run's log, points per epoch: still improving?"""
    points = {r["epoch"]: r["val_top1"] for r in rows if r["epoch"] < epoch} | {epoch: top1}
    xs = sorted(points)[-n:]
    mx, my = sum(xs) / len(xs), sum(points[x] for x in xs) / len(xs)
    return sum((x - mx) * (points[x] - my) for x in xs) / sum((x - mx) ** 2 for x in xs) if len(xs) > 1 else None


def fmt_time(seconds):
    return time.strftime("%H:%M:%S", time.gmtime(max(0, seconds))) if seconds < 86400 else f"{seconds / 86400:.1f}d"


def plot_curves(rows, png_path):
    """curves.png: loss, accuracy and the LR of every logged step, from the rows of log.jsonl."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ep, steps = [r["epoch"] + 1 for r in rows], [s for r in rows for s in r.get("lr_steps", [])]
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4))
    ax1.plot(ep, [r["train_loss"] for r in rows], "o-", label="train (label smoothed)")
    ax1.plot(ep, [r["val_loss"] for r in rows], "o-", label="val")
    for key, style, label in (("val_top1", "o-", "val top-1"), ("val_top5", "o-", "val top-5"),
                              ("train_top1", "o:", "train top-1 (unmixed batches)"), ("ema_top1", "o--", "EMA top-1")):
        if key in rows[-1]:
            ax2.plot(ep, [r.get(key) for r in rows], style, label=label)
    ax3.plot([s[0] for s in steps], [s[1] for s in steps], "-", color="tab:purple", label="LR (OneCycle)")
    ax1.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    ax2.set(xlabel="epoch", ylabel="accuracy (%)", title=f"best top-1 {max(r['val_top1'] for r in rows):.2f}%")
    ax3.set(xlabel="epoch", ylabel="learning rate", title="LR per logged step")
    for ax in (ax1, ax2, ax3):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


# -----------------------------------------------------------------------------
# the run: set up once, then one epoch after another

def setup(args):
    """Everything a run holds fixed, and where it starts: the processes, the data, the derived sizes (printed once),
    the network with its optimizer, schedule, loss and EMA, restored from a checkpoint when the run resumes. Returns
    the run, a namespace of what every epoch reads and the little it updates from epoch to epoch, and its progress."""
    started = time.time()  # the session's first step says how long a (re)start took before it trained
    ddp, rank, world, device = init_distributed(args.device)
    master = rank == 0
    print0 = partial(print, flush=True) if master else (lambda *a, **k: None)
    root = args.data or str(data.default_data() if master else data.default_root())
    if ddp and args.data is None:
        dist.barrier()  # the download, on rank 0
    sizes = epoch_sizes(args)
    train_set, val_set, info = make_datasets(args, root, sizes, args.eval_size)
    workers = data.default_workers(args.workers, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    ckpt, resume_path = find_resume(args, rank, print0)  # first: a resumed run keeps its global batch

    # derived values, printed once. The global batch is a constant of the run: resumed on other GPUs, or with another
    # --batch-size, each rank accumulates as many micro-batches a step as keep it (and --accum-steps is ignored)
    global_batch = ckpt["global_batch"] if ckpt else args.batch_size * world * args.accum_steps
    accum = accumulation(global_batch, args.batch_size, world, resume_path)
    steps_per_epoch = len(train_set) // global_batch  # the remainder of the epoch's order is dropped
    if steps_per_epoch == 0:
        raise ValueError(f"{len(train_set)} training images make no full step of {global_batch}: "
                         f"lower --batch-size or --accum-steps, or raise --subset")
    peak_lr = args.lr or 1.7 * global_batch / 4096  # FFCV rn50: 1.7 at 8 x 512 images (Goyal et al.'s 0.1 per 256)
    mix_off = args.mix_off_epoch if args.mix_off_epoch is not None else math.ceil(0.9 * args.epochs)
    amp, ctx, scaler = autocast_for(args.amp, device)
    loader = partial(data.make_loader, batch_size=args.batch_size, rank=rank, world=world, seed=args.seed,
                     workers=workers, pin_memory=device.type == "cuda", global_batch=global_batch)
    print0(f"data {root}: {len(train_set)} train / {len(val_set)} val images, {len(info['classes'])} classes")
    print0(f"{args.arch}{' + BlurPool' if args.blurpool else ''} on {world} x {device.type} ({amp}, channels_last="
           f"{args.channels_last}, compile={args.compile}, {workers} workers); {sizes[0]} -> {sizes[-1]} px, eval at "
           f"{args.eval_size} px{'' if args.tta == 'none' else f' with {args.tta} TTA'}; global batch {global_batch} = "
           f"{args.batch_size} x {world} ranks x {accum} accum; {steps_per_epoch} steps/epoch; peak lr {peak_lr:.4g}"
           + (f"; mixup/cutmix off from epoch {mix_off}" if args.mixup or args.cutmix else ""))
    os.makedirs(args.out, exist_ok=True)
    if master:
        print0(write_summary(os.path.join(args.out, "model_summary.txt"), args.arch, args.img_size,
                             len(info["classes"]), args.blurpool) + " (model_summary.txt)")

    # the network: `model` is the bare one (what checkpoints hold and evaluation runs), `step_model` what the step
    # runs (DDP's wrapper, compiled with --compile: on the first step of each image size). A run starts from a
    # checkpoint (a resume), given weights (--init-from), or nothing.
    model = make_model(args, len(info["classes"]), device)
    if args.init_from and ckpt is not None:
        print0(f"--init-from is for a new run: continuing {resume_path} instead")
    elif args.init_from and master:
        print0(load_weights(model, args.init_from, info["classes"]))  # under DDP the wrapper hands rank 0's weights on
    step_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if ddp else model
    step_model = torch.compile(step_model) if args.compile else step_model
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(args.ema), use_buffers=True) if args.ema else None
    optimizer = make_optimizer(model, args, peak_lr)
    scheduler = make_scheduler(optimizer, args, peak_lr, steps_per_epoch)
    r = SimpleNamespace(
        args=args, rank=rank, world=world, device=device, master=master, print0=print0, ddp=ddp, info=info,
        train_set=train_set, train_loader=loader(train_set, shuffle=True), val_loader=loader(val_set, shuffle=False),
        sizes=sizes, global_batch=global_batch, accum=accum, steps_per_epoch=steps_per_epoch, mix_off=mix_off,
        amp=amp, ctx=ctx, scaler=scaler, model=model, step_model=step_model, ema=ema, optimizer=optimizer,
        scheduler=scheduler, criterion=make_criterion(args), mixer=make_mixer(args, len(info["classes"])),
        parts=dict(model=model, ema=ema, optimizer=optimizer, scheduler=scheduler, scaler=scaler),
        stop_epoch=min(args.epochs, args.stop_epoch or args.epochs), started=started, stepped=False,
        group=dist.new_group(backend="gloo") if ddp and device.type == "cuda" else None,  # agreed() talks over it
        signals=[], bad_seen=set(), saved_at=time.time(), eval_s=0.0, best_top1=0.0, tb=None,
        rows=read_log(os.path.join(args.out, "log.jsonl")) if master else [])  # for the trend and the curves
    progress = resume(r, ckpt, resume_path) if ckpt else fresh_progress()
    r.best_top1 = progress["best_top1"]
    if args.tensorboard and master:  # at global steps; a resume drops what a stopped session logged after its save
        from torch.utils.tensorboard import SummaryWriter
        done = progress["epochs_done"] * steps_per_epoch + progress["step"]
        r.tb = SummaryWriter(os.path.join(args.out, "tb"), purge_step=done + 1 if ckpt is not None else None)
    # SIGTERM (a spot reclaim; torchrun forwards it): finish the step, checkpoint, exit with preempted
    signal.signal(signal.SIGTERM, lambda signum, frame: r.signals.append(signum))
    return r, progress


def train(args):
    """The run: epoch after epoch, each trained, evaluated and saved, until --epochs (done), --stop-epoch (stopped),
    --target-top1 (done) or a SIGTERM (preempted, with a checkpoint to continue from)."""
    r, progress = setup(args)
    for epoch in range(progress["epochs_done"], r.stop_epoch):
        # an epoch's running state, in one place. A resumed epoch continues from its checkpoint's step and sums; the
        # sums there are of all ranks, so rank 0 alone restores them (an older file may hold fewer: zeros follow)
        sums = (progress["sums"] + [0.0] * len(SUMS))[:len(SUMS)] if r.master else [0.0] * len(SUMS)
        e = SimpleNamespace(epoch=epoch, first=progress["step"], lr_steps=list(progress["lr_steps"]), bad=0,
                            started=time.time(), sums=torch.tensor(sums, device=r.device))
        if train_epoch(r, e) == "preempted":
            return "preempted"
        row = report_epoch(r, e)
        progress = fresh_progress(epoch + 1, r.best_top1)
        score = row.get("ema_top1", row["val_top1"])
        if args.target_top1 is not None and score >= args.target_top1 and epoch + 1 < args.epochs:
            saved_s = (args.epochs - epoch - 1) * row["epoch_s"]
            r.print0(f"reached top-1 {score:.2f}% >= --target-top1 {args.target_top1} after epoch {epoch + 1} of "
                     f"{args.epochs}: stopping, which saves about {fmt_time(saved_s)} of training"
                     + (f" (${saved_s / 3600 * args.hourly_usd:.2f} at ${args.hourly_usd}/h)" if args.hourly_usd
                        else ""))
            return "done"
        if agreed(bool(r.signals), group=r.group):  # a SIGTERM during evaluation: the epoch's checkpoint is saved
            return "preempted"
        if r.ddp:
            dist.barrier()  # nobody races ahead of a checkpoint
    if r.tb is not None:
        r.tb.close()
    if r.ddp:
        r.print0(f"weights identical on all {r.world} ranks (checksum {check_ranks_agree(r.model, r.device):.6f})")
    r.print0(f"best val top-1 {r.best_top1:.2f}%; checkpoints and curves.png in {args.out}")
    return "done" if r.stop_epoch == args.epochs else "stopped"


def train_epoch(r, e):
    """The epoch's optimizer steps from e.first on: each its micro-batches' forward and backward, then the update and
    the log line; a checkpoint inside the epoch when checkpoint_now says so. Returns "preempted" after a SIGTERM's."""
    args, loader = r.args, r.train_loader
    loader.sampler.set_epoch(e.epoch, start=e.first)  # the sampler skips the images of the steps done
    mixing = r.mixer is not None and e.epoch < r.mix_off
    r.step_model.train()  # (DDP's wrapper and the compiled module too; evaluation put the bare one in eval mode)
    for i, (images, labels, bad) in enumerate(loader, start=e.first * r.accum):
        step, j = divmod(i, r.accum)  # the optimizer step, and which of this rank's micro-batches of it this is
        last = j == r.accum - 1
        e.bad += data.report_bad(bad, r.train_set, r.bad_seen)  # unreadable files, replaced by class-mates
        x, y = to_device(images, labels, r.device, args.channels_last)
        if mixing:  # seeded by the micro-batch's index in the epoch, as the sampler laid the epoch out: the same
            # mix on any number of GPUs, and after a resume
            data.seed_cpu(data.seed_for(args.seed, e.epoch, loader.sampler.micro_index(step, j), "mix"))
            x, y = r.mixer(x, y)
        # forward and backward; DDP all-reduces the gradients on the step's last micro-batch only
        with r.step_model.no_sync() if r.ddp and not last else nullcontext():
            forward_backward(r.step_model, x, y, r.criterion, r.ctx, r.scaler, r.accum, e.sums)
        if not last:
            continue
        # update
        optimizer_step(r.optimizer, r.scaler)
        r.scheduler.step()
        if r.ema is not None:
            r.ema.update_parameters(r.model)
        if not r.stepped:  # run_ec2.sh's status reads this line: from launch to the first step
            r.stepped = True
            r.print0(f"first step at {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}, "
                     f"{time.time() - r.started:.0f} s after train.py started")
        # log: .item() waits for the device, so only every --log-every steps
        if (step + 1) % args.log_every == 0 or step + 1 == r.steps_per_epoch:
            log_step(r, e, step)
        if checkpoint_now(r, e, step):
            return "preempted"
    return None


def log_step(r, e, step):
    """The progress line of a step (loss, LR, images/s, ETA, memory) and TensorBoard's; the LR kept for the curves."""
    args, now, lr = r.args, time.time(), r.scheduler.get_last_lr()[0]
    avg = e.sums[SUM["loss"]].item() / e.sums[SUM["micro_batches"]].item()
    if not math.isfinite(avg):
        raise FloatingPointError(f"the training loss is {avg} at epoch {e.epoch + 1} step {step + 1}")
    e.lr_steps.append([e.epoch + (step + 1) / r.steps_per_epoch, lr])
    # ETA: this epoch's time per step so far, times the steps left to --stop-epoch, plus their evaluations
    step_s = (now - e.started) / (step + 1 - e.first)
    eta = step_s * ((r.stop_epoch - e.epoch) * r.steps_per_epoch - step - 1) + r.eval_s * (r.stop_epoch - e.epoch)
    mem = torch.cuda.max_memory_allocated(r.device) / 2**30 if r.device.type == "cuda" else 0.0
    r.print0(f"epoch {e.epoch + 1}/{args.epochs} step {step + 1}/{r.steps_per_epoch} {r.sizes[e.epoch]}px "
             f"loss {avg:.4f} lr {lr:.4g} img/s {r.global_batch / step_s:.0f} eta {fmt_time(eta)}"
             + (f" (${eta / 3600 * args.hourly_usd:.2f})" if args.hourly_usd else "")
             + (f" mem {mem:.1f}GiB" if mem else ""))
    if r.tb is not None:
        r.tb.add_scalar("train/loss", avg, e.epoch * r.steps_per_epoch + step + 1)
        r.tb.add_scalar("train/lr", lr, e.epoch * r.steps_per_epoch + step + 1)


def checkpoint_now(r, e, step):
    """Save now? After a SIGTERM (a preemption), or --save-every-min after the last save (rank 0's clock): a
    checkpoint inside the epoch, with its steps done and its running sums, so that a resume continues at the next step
    and logs the epoch as if never stopped. Not after the epoch's last step, where the epoch's own follows. All ranks
    ask together after every step, since all take part in the save's sums. Returns whether it was a preemption."""
    preempted, timed = agreed(bool(r.signals), r.master and time.time() - r.saved_at > 60 * r.args.save_every_min,
                              group=r.group)
    if not (preempted or timed) or step + 1 == r.steps_per_epoch:
        return False
    progress = dict(epochs_done=e.epoch, step=step + 1, best_top1=r.best_top1, sums=global_sums(e.sums),
                    lr_steps=e.lr_steps)
    if r.master:
        if not math.isfinite(progress["sums"][SUM["loss"]]):
            raise FloatingPointError(f"the training loss is not finite at epoch {e.epoch + 1}")
        path = os.path.join(r.args.out, "last.pt")
        save_checkpoint(snapshot(r, progress), path)
        print(f"saved {path} at epoch {e.epoch + 1} step {step + 1}" + (" (preempted)" if preempted else ""),
              flush=True)
        if r.tb is not None:
            r.tb.flush()
    r.saved_at = time.time()
    return preempted


def report_epoch(r, e):
    """The end of an epoch: its evaluation (every rank), its row of log.jsonl, its line, TensorBoard's points, and on
    rank 0 its checkpoints, log and curves. Returns the row."""
    args, train_s = r.args, time.time() - e.started
    metrics = epoch_metrics(r, e.sums)
    r.eval_s = time.time() - e.started - train_s  # for the next epochs' ETA
    row = dict(epoch=e.epoch, epochs=args.epochs, img_size=r.sizes[e.epoch], lr=r.scheduler.get_last_lr()[0],
               **metrics, img_per_s=r.global_batch * (r.steps_per_epoch - e.first) / train_s,
               epoch_s=time.time() - e.started, bad_images=e.bad, best_top1=max(r.best_top1, metrics["val_top1"]),
               lr_steps=e.lr_steps, trend=trend(r.rows, e.epoch, metrics["val_top1"]) if r.master else None)
    is_best, r.best_top1 = row["val_top1"] > r.best_top1, row["best_top1"]
    notes = [f"EMA top-1 {row['ema_top1']:.2f}%" if "ema_top1" in row else "", "a new best" if is_best else ""]
    train_top1 = "mixed" if row["train_top1"] is None else f"{row['train_top1']:.2f}%"
    r.print0(f"epoch {e.epoch + 1}/{args.epochs} done: train loss {row['train_loss']:.4f} top-1 {train_top1} | val "
             f"loss {row['val_loss']:.4f} top-1 {row['val_top1']:.2f}% top-5 {row['val_top5']:.2f}% "
             f"({row['val_n']} images)" + "".join(f", {n}" for n in notes if n)
             + (f"; trend {row['trend']:+.2f} points/epoch" if row["trend"] is not None else "")
             + f"; {fmt_time(row['epoch_s'])}, {row['img_per_s']:.0f} img/s"
             + (f"; {row['bad_images']} unreadable images replaced" if row["bad_images"] else ""))
    if r.tb is not None:
        for key in ("train_loss", "train_top1", "val_loss", "val_top1", "val_top5", "ema_top1", "img_per_s"):
            if row.get(key) is not None:
                r.tb.add_scalar(f"epoch/{key}", row[key], (e.epoch + 1) * r.steps_per_epoch)
        r.tb.flush()
    if r.master:
        r.rows.append(row)
        save_epoch(r, snapshot(r, fresh_progress(e.epoch + 1, r.best_top1), row), is_best)
        r.saved_at = time.time()
    return row


def finish(out, status, clean=True):
    """The one writer of OUT/status (rank 0); leave the process group; return the exit status."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        if status == "preempted":
            print("preempted: checkpoint saved; run the same command again to continue", flush=True)
        if out and os.path.isdir(out):
            with open(os.path.join(out, "status"), "w") as f:
                f.write(status + "\n")
    if clean:
        close_distributed()  # after an error the ranks may be out of step: then no barrier, just exit
    return EXIT[status]


def main(argv=None):
    args = parse_args(argv, cpu_preset=True)
    status, error, tool = "bad_input", None, args.check_data or args.shrink
    try:
        if tool:  # dataset tools, not training: no process group, and no OUT/status
            root, workers = args.data or str(data.default_data()), data.default_workers(args.workers)
            print(f"data {root}", flush=True)
            if args.check_data:
                return data.check_data(root, workers)
            return data.shrink_dataset(root, args.shrink, args.max_side, workers, args.shrink_by)
        status = train(args)
    except (ValueError, FileNotFoundError) as e:
        error = str(e)
    except torch.OutOfMemoryError:  # a config error, as the batch does not fit: not a crash to restart
        b, k = args.batch_size, args.accum_steps
        resuming = args.resume != "none" and os.path.exists(os.path.join(args.out, "last.pt"))
        error = f"out of memory with --batch-size {b} images per GPU at up to {args.img_size} px; " + (
            f"resume with --batch-size {max(1, b // 2)}: the run keeps its global batch, in twice the micro-batches"
            if resuming else f"keep the global batch with --batch-size {max(1, b // 2)} --accum-steps {2 * k}")
    except FloatingPointError as e:
        status, error = "diverged", f"{e}; last.pt holds the last good state: lower --lr (or --amp bf16/fp32) and rerun"
    except OSError as e:  # a full disk or a lost mount while saving: the previous checkpoint is intact
        status, error = "crashed", str(e)
    if error:
        print(f"train.py: error: {error}", file=sys.stderr, flush=True)
    sys.exit(finish(None if tool else args.out, status, clean=error is None))


if __name__ == "__main__":
    main()
