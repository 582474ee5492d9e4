r"""
Train a ResNet from scratch with one recipe: SGD with momentum, OneCycle, label smoothing, mixup/cutmix,
AMP, channels_last and DDP. The defaults are the headline run: ResNet-50 on ImageNet-1k.

One GPU, or the CPU (with no --data it downloads Imagenette, 10 ImageNet classes, to data/):
    python train.py
    python train.py --data /mnt/imagenet
Several GPUs on one machine:
    torchrun --nproc_per_node=4 train.py --data /mnt/imagenet
Two machines of 8 GPUs (run the same line on each, with --node_rank=1 on the second):
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=10.0.0.1 --master_port=29500 \
        train.py --data /mnt/imagenet
The fast preset (about 20 epochs; see README 'Recipes'), e.g. with torch.compile:
    torchrun --nproc_per_node=8 train.py --data /mnt/imagenet --preset fast --compile
A quick look on a laptop CPU:
    python train.py --arch resnet18 --img-size 128 --batch-size 64 --epochs 5

Writes to --out: last.pt (every epoch), best.pt (best val top-1), log.jsonl (one line per epoch), curves.png.
Running the same command again resumes from last.pt (--resume auto), also from inside an epoch: on SIGTERM (a
spot reclaim) every rank finishes its step, rank 0 checkpoints, and all exit with 75; last.pt is also written
every --save-every-min minutes. Exit status (and the same word in OUT/status): 0 done, 75 preempted,
1 crashed, 2 bad input (a flag, the data, a checkpoint), 3 diverged (NaN loss), each with a one-line message.
"""
import argparse
import itertools
import json
import math
import os
import random
import signal
import sys
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torchvision.transforms import v2

import data
from model import ARCHS, build_model, normalize, read_checkpoint

# The flags that change what a checkpoint means: resuming with another value would corrupt the run.
# (--lr and --weight-decay live in the restored optimizer and schedule: a new value would be silently ignored.)
RESUME_MUST_MATCH = ("arch", "blurpool", "epochs", "batch_size", "accum_steps", "img_size", "subset", "seed",
                     "warmup_pct", "lr", "weight_decay")

NEW_FLAG_DEFAULTS = dict(blurpool=False)  # what checkpoints from before a flag existed were trained with

# --preset fast: FFCV's ResNet-50 recipe (ffcv-imagenet rn50 configs: 16 epochs 73.8%, 24 epochs 75.6% top-1 on
# 8 x A100) in our loop: progressive resizing 160 -> 192 px, evaluation at 256 px with flip TTA, BlurPool, label
# smoothing 0.1, weight decay 1e-4 off BatchNorm, no mixup/cutmix, and the LR peak at about 2 epochs. 20 epochs
# aims at 75% (linear between FFCV's 16 and 24). Every value can still be overridden by its own flag.
PRESETS = dict(
    default={},
    fast=dict(epochs=20, img_size=192, min_img_size=160, eval_size=256, tta=True, blurpool=True, mixup=0.0,
              cutmix=0.0, weight_decay=1e-4, warmup_pct=0.1),
)


def make_parser(doc=__doc__):
    """train.py's flags; lr_finder.py adds its own to the same parser, so both scripts read data and model alike."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    # data
    p.add_argument("--data", default=None, help="dataset root (see README 'Data layouts'); default: Imagenette in "
                                               f"{data.DEFAULT_DATA}, downloaded when missing")
    p.add_argument("--preset", default="default", choices=list(PRESETS),
                   help="a set of defaults: default (the headline run) or fast (~20 epochs, README 'Recipes')")
    p.add_argument("--img-size", type=int, default=224, help="training crop side, px (the last epochs' size with "
                                                             "--min-img-size)")
    p.add_argument("--min-img-size", type=int, default=None, help="progressive resizing (FFCV): train at this size "
                   "for 70%% of the epochs, then ramp to --img-size by 85%%, in steps of 16 px; default: off")
    p.add_argument("--eval-size", type=int, default=None, help="eval crop, px, after a resize to size/0.875; above "
                   "the training size is FixRes (Touvron et al. 2019); default: --img-size")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=False,
                   help="evaluate on each image and its mirror image, averaging the probabilities")
    p.add_argument("--subset", type=float, default=1.0, help="train on this fraction of each class (0, 1]")
    p.add_argument("--workers", type=int, default=None, help="loader processes per GPU; default: cores/GPUs - 1")
    p.add_argument("--trivial-augment", action="store_true", help="add TrivialAugmentWide (Mueller & Hutter 2021)")
    p.add_argument("--random-erase", type=float, default=0.0, help="probability of RandomErasing per image")
    # model
    p.add_argument("--arch", default="resnet50", choices=list(ARCHS), help="network")
    p.add_argument("--blurpool", action=argparse.BooleanOptionalAction, default=False,
                   help="blur before every strided conv of the blocks (Zhang 2019; FFCV, Composer)")
    # optimization
    p.add_argument("--epochs", type=int, default=40, help="epochs; OneCycle spans all of them")
    p.add_argument("--batch-size", type=int, default=256, help="images per process per step (per GPU)")
    p.add_argument("--accum-steps", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, default=None, help="peak LR; default 0.4 x global batch / 256 (linear scaling)")
    p.add_argument("--warmup-pct", type=float, default=0.25, help="fraction of steps that OneCycle spends rising")
    p.add_argument("--weight-decay", type=float, default=5e-5, help="L2 on conv and fc weights")
    p.add_argument("--decay-norm-bias", action=argparse.BooleanOptionalAction, default=False,
                   help="also decay BatchNorm weights and biases (off: Jia et al. 2018, FFCV, torchvision's recipe)")
    # regularization
    p.add_argument("--label-smoothing", type=float, default=0.1, help="Szegedy et al. 2016")
    p.add_argument("--mixup", type=float, default=0.1, help="mixup Beta alpha; 0 = off")
    p.add_argument("--cutmix", type=float, default=1.0, help="cutmix Beta alpha; 0 = off")
    p.add_argument("--mix-off-epoch", type=int, default=None, help="no mixup/cutmix from this epoch (0-based) on; "
                                                                   "default: the last 10%% of epochs are clean")
    p.add_argument("--ema", type=float, default=0.0, help="EMA decay per step, e.g. 0.9998; 0 = off")
    # system
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu", "mps"], help="auto: cuda > mps > cpu")
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="autocast dtype; auto: bf16 where supported, fp16 on older GPUs, else fp32")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True, help="NHWC memory layout")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile the training step's model (minutes to compile; faster steps on GPUs)")
    p.add_argument("--seed", type=int, default=0, help="seeds init, data order, augmentation and mixing")
    # I/O
    p.add_argument("--out", default="runs/default", help="output folder")
    p.add_argument("--resume", default="auto", help="auto (OUT/last.pt if present), none, or a checkpoint path")
    p.add_argument("--stop-epoch", type=int, default=None, help="stop after this many epochs, schedule unchanged; "
                                                                "rerun the same command to go on")
    p.add_argument("--log-every", type=int, default=50, help="optimizer steps between progress lines")
    p.add_argument("--save-every-min", type=float, default=10, help="also checkpoint inside an epoch this often, "
                                                                    "minutes, so a kill -9 loses at most that")
    p.add_argument("--check-data", action="store_true", help="scan --data (layout, counts, unreadable files), "
                                                            "report, and exit")
    p.add_argument("--shrink", default=None, metavar="DIR", help="write a copy of --data to DIR whose training images "
                   "have a shorter side of at most --max-side px (faster decoding; BENCHMARKS.md), and exit")
    p.add_argument("--max-side", type=int, default=320, help="with --shrink: the shorter side, px")
    return p


def check_args(p, args):
    """What argparse cannot check by type alone, reported the argparse way (one line, exit status 2)."""
    if args.save_every_min <= 0:
        p.error(f"--save-every-min must be above 0, got {args.save_every_min}")
    for name in ("epochs", "batch_size", "accum_steps", "img_size", "log_every", "min_img_size", "eval_size",
                 "max_side"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.min_img_size is not None and args.min_img_size > args.img_size:
        p.error(f"--min-img-size {args.min_img_size} is above --img-size {args.img_size}; progressive resizing grows")
    if not 0 < args.subset <= 1:
        p.error(f"--subset must be in (0, 1], got {args.subset}")
    if not 0 < args.warmup_pct < 1:
        p.error(f"--warmup-pct must be in (0, 1), got {args.warmup_pct}")
    if not 0 <= args.ema < 1:
        p.error(f"--ema must be in [0, 1), got {args.ema}")
    if args.workers is not None and args.workers < 0:
        p.error(f"--workers must be 0 or more, got {args.workers}")
    return args


def parse_args(argv=None, p=None):
    """Flags on top of the --preset's defaults, so `--preset fast --epochs 16` is the fast recipe in 16 epochs."""
    p = p or make_parser()
    preset = p.parse_known_args(argv)[0].preset
    p.set_defaults(**PRESETS[preset])
    return check_args(p, p.parse_args(argv))


def epoch_sizes(args):
    """Training crop per epoch. Progressive resizing as FFCV schedules it: --min-img-size up to 70% of the epochs,
    a linear ramp to --img-size until 85%, rounded to 16 px, then --img-size; small images early are cheap."""
    if args.min_img_size is None:
        return [args.img_size] * args.epochs
    lo, hi, start, end = args.min_img_size, args.img_size, 0.70 * args.epochs, 0.85 * args.epochs
    sizes = []
    for epoch in range(args.epochs):
        t = min(1.0, max(0.0, (epoch - start) / max(end - start, 1e-9)))
        sizes.append(hi if t >= 1 else max(lo, min(hi, round((lo + t * (hi - lo)) / 16) * 16)))
    return sizes


# -----------------------------------------------------------------------------
# the pieces lr_finder.py reuses, so its test runs the exact training step

def pick_device(name, local_rank=0):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda, but torch sees no CUDA GPU; use --device cpu or check nvidia-smi")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    if name == "mps" and not torch.backends.mps.is_available():
        raise ValueError("--device mps, but this torch has no MPS backend; use --device cpu")
    return torch.device(name)


def autocast_for(amp, device):
    """AMP as data: (amp name, autocast context, GradScaler). The scaler is only on for fp16."""
    if amp == "auto":
        if device.type == "cuda":
            amp = "bf16" if torch.cuda.is_bf16_supported() else "fp16"  # fp16 on T4/V100
        elif device.type == "cpu":
            amp = "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"  # bf16 is slow without AVX512
        else:
            amp = "fp16"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[amp]
    ctx = torch.autocast(device.type, dtype=dtype, enabled=amp != "fp32")
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    return amp, ctx, scaler


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
    # Smith & Topin 2017: one cycle, LR up then down, momentum 0.95 -> 0.85 -> 0.95 (PyTorch's defaults);
    # pct_start 0.25 is fastai's fit_one_cycle default. Stepped once per optimizer step.
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=peak_lr, total_steps=args.epochs * steps_per_epoch,
                                               pct_start=args.warmup_pct, base_momentum=0.85, max_momentum=0.95)


def make_mixer(args, num_classes):
    """Mixup or cutmix, one of them per batch, on the device; None when both are off."""
    mixers = [v2.MixUp(alpha=args.mixup, num_classes=num_classes)] if args.mixup > 0 else []
    mixers += [v2.CutMix(alpha=args.cutmix, num_classes=num_classes)] if args.cutmix > 0 else []
    return v2.RandomChoice(mixers) if mixers else None


def to_device(images, labels, device, channels_last):
    """uint8 batch from the loader -> normalized float on the device, in the training memory layout."""
    images = images.to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return normalize(images), labels.to(device, non_blocking=True)


def forward_backward(model, x, y, criterion, ctx, scaler, accum_steps):
    """One micro-batch: forward under autocast, backward of the loss scaled for fp16 and accumulation."""
    with ctx:
        loss = criterion(model(x), y)
    scaler.scale(loss / accum_steps).backward()
    return loss.detach()


def optimizer_step(optimizer, scaler):
    scaler.step(optimizer)  # skips the step if fp16 gradients overflowed
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


# -----------------------------------------------------------------------------
# evaluation, checkpoints, plots

def probabilities(model, x, tta=False):
    """Softmax probabilities; tta: their mean over each image and its mirror image (FFCV's lr_tta)."""
    probs = model(x).float().softmax(1)
    return (probs + model(x.flip(3)).float().softmax(1)) / 2 if tta else probs


@torch.no_grad()
def evaluate(model, loader, device, ctx, channels_last, tta=False):
    """Exact top-1/top-5 over the whole val set: every rank runs its shard, the counts are all-reduced.
    tta: the mean of the probabilities of each image and its mirror image (FFCV's lr_tta)."""
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top-1 hits, top-5 hits, images
    for images, labels, _ in loader:
        x, y = to_device(images, labels, device, channels_last)
        with ctx:  # with tta, the log of the mean probability: cross_entropy of it is the averaged prediction's NLL
            logits = probabilities(model, x, tta=True).log() if tta else model(x)
        hits = logits.topk(min(5, logits.shape[1]), dim=1).indices == y[:, None]  # (B, 5)
        loss = F.cross_entropy(logits.float(), y, reduction="sum")
        totals += torch.stack([loss, hits[:, 0].sum(), hits.any(1).sum(), torch.tensor(len(y), device=device)]).double()
    if dist.is_initialized():
        dist.all_reduce(totals)
    loss, top1, top5, n = totals.tolist()
    return dict(val_loss=loss / n, val_top1=100 * top1 / n, val_top5=100 * top5 / n, val_n=int(n))


def save_atomic(obj, path):
    """Write to a temp file, fsync, then os.replace: `path` is always a whole checkpoint, old or new."""
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # a full disk surfaces as either, depending on where torch.save was
        if os.path.exists(tmp):
            os.remove(tmp)
        kept = "the previous one is intact" if os.path.exists(path) else "there was none before"
        raise OSError(f"could not write {path} ({str(e).splitlines()[0]}); {kept}. Free disk space and run the same "
                      f"command again to resume") from None
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)  # make the rename itself durable
    finally:
        os.close(fd)


def check_resume(saved, args, saved_classes, classes, path):
    """Refuse a resume that would silently change the run; say which flag differs and what to do."""
    if saved_classes != classes:
        raise ValueError(f"{path} was trained on other classes than --data has ({len(saved_classes)} vs "
                         f"{len(classes)}); point --data at the same dataset, or use --resume none with a new --out")
    for name in RESUME_MUST_MATCH:
        if saved.get(name, NEW_FLAG_DEFAULTS.get(name)) != getattr(args, name):
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"{flag} is {getattr(args, name)} but {path} was trained with {saved.get(name)}; "
                             f"rerun with {flag} {saved.get(name)}, or start afresh with --resume none and a new --out")


def plot_curves(log_path, png_path):
    """OUT/curves.png: loss and accuracy against epoch, from log.jsonl."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    with open(log_path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    ep = [r["epoch"] + 1 for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot(ep, [r["train_loss"] for r in rows], "o-", label="train (smoothed, mixed targets)")
    ax1.plot(ep, [r["val_loss"] for r in rows], "o-", label="val")
    ax1.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    ax2.plot(ep, [r["val_top1"] for r in rows], "o-", label="val top-1")
    ax2.plot(ep, [r["val_top5"] for r in rows], "o-", label="val top-5")
    if "ema_top1" in rows[-1]:
        ax2.plot(ep, [r.get("ema_top1") for r in rows], "o--", label="EMA top-1")
    ax2.set(xlabel="epoch", ylabel="accuracy (%)", title=f"best top-1 {max(r['val_top1'] for r in rows):.2f}%")
    for ax in (ax1, ax2):
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


def fmt_time(seconds):
    return time.strftime("%H:%M:%S", time.gmtime(max(0, seconds))) if seconds < 86400 else f"{seconds / 86400:.1f}d"


# -----------------------------------------------------------------------------

def init_distributed(device_name):
    """DDP when torchrun set RANK, else one plain process: (ddp, rank, world, device)."""
    ddp = "RANK" in os.environ
    rank, local_rank, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")) if ddp else (0, 0, 1)
    device = pick_device(device_name, local_rank)
    if ddp:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return ddp, rank, world, device


def train(args):
    ddp, rank, world, device = init_distributed(args.device)
    local_rank = device.index or 0
    master = rank == 0

    def print0(*a):
        if master:
            print(*a, flush=True)

    # data
    root = args.data
    if root is None:
        if master:
            data.default_data()
        if ddp:
            dist.barrier()
        root = data.DEFAULT_DATA
    if args.check_data:
        data.check_data(root, args.workers or os.cpu_count() or 1)
        return 0
    if args.shrink:
        data.shrink_dataset(root, args.shrink, args.max_side, args.workers or os.cpu_count() or 1)
        return 0
    sizes = epoch_sizes(args)
    train_set, val_set, info = data.build_datasets(root, sizes, args.subset, args.seed, args.trivial_augment,
                                                   args.random_erase, eval_size=args.eval_size)
    classes, num_classes = info["classes"], len(info["classes"])
    workers = data.default_workers(args.workers, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    pin = device.type == "cuda"
    train_loader = data.make_loader(train_set, args.batch_size, True, rank, world, args.seed, workers, pin)
    val_loader = data.make_loader(val_set, args.batch_size, False, rank, world, args.seed, workers, pin)

    # derived values, printed once
    global_batch = args.batch_size * world * args.accum_steps
    steps_per_epoch = len(train_loader) // args.accum_steps
    if steps_per_epoch == 0:
        raise ValueError(f"{len(train_set)} training images make no full step of {global_batch}: "
                         f"lower --batch-size or --accum-steps, or raise --subset")
    peak_lr = args.lr if args.lr is not None else 0.4 * global_batch / 256  # Goyal et al. 2017 linear scaling
    mix_off = args.mix_off_epoch if args.mix_off_epoch is not None else math.ceil(0.9 * args.epochs)
    amp, ctx, scaler = autocast_for(args.amp, device)
    print0(f"data {root}: {len(train_set)} train / {len(val_set)} val images, {num_classes} classes")
    px = f"{sizes[0]} -> {sizes[-1]}" if sizes[0] != sizes[-1] else f"{sizes[0]}"
    print0(f"{args.arch}{' + BlurPool' if args.blurpool else ''} on {world} x {device.type} ({amp}, channels_last="
           f"{args.channels_last}, compile={args.compile}, {workers} workers); {px} px, eval at "
           f"{args.eval_size or sizes[-1]} px{' with flip TTA' if args.tta else ''}; "
           f"global batch {global_batch} = {args.batch_size} x {world} ranks x {args.accum_steps} accum; "
           f"{steps_per_epoch} steps/epoch; peak lr {peak_lr:.4g}; mixup/cutmix off from epoch {mix_off}")

    # model, optimizer, schedule, loss, EMA
    model = make_model(args, num_classes, device)
    raw_model = model  # the bare module: what checkpoints hold and what evaluation runs
    optimizer = make_optimizer(model, args, peak_lr)
    scheduler = make_scheduler(optimizer, args, peak_lr, steps_per_epoch)
    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    mixer = make_mixer(args, num_classes)
    ema = AveragedModel(raw_model, multi_avg_fn=get_ema_multi_avg_fn(args.ema), use_buffers=True) if args.ema else None
    if ddp:
        model = DDP(model, device_ids=[local_rank] if device.type == "cuda" else None)
    step_model = torch.compile(model) if args.compile else model  # compiles on the first step of each image size
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels once per size

    # resume: from an epoch boundary or from inside an epoch (a preemption or a timed save)
    os.makedirs(args.out, exist_ok=True)
    last_path, best_path = os.path.join(args.out, "last.pt"), os.path.join(args.out, "best.pt")
    log_path = os.path.join(args.out, "log.jsonl")
    resume = {"auto": last_path if os.path.exists(last_path) else None, "none": None}.get(args.resume, args.resume)
    start_epoch, start_step, best_top1, loss_sum, mixed_batches = 0, 0, 0.0, 0.0, 0
    if resume:
        ckpt = read_checkpoint(resume)
        if not isinstance(ckpt, dict) or "optimizer" not in ckpt:
            raise ValueError(f"--resume {resume} is not a train.py checkpoint (no optimizer state); "
                             f"resume from OUT/last.pt, or use --resume none")
        check_resume(ckpt["args"], args, ckpt["classes"], classes, resume)
        if ckpt["world"] != world:
            raise ValueError(f"{resume} was trained on {ckpt['world']} processes, this run has {world}; the global "
                             f"batch and the schedule depend on it: relaunch with --nproc_per_node {ckpt['world']}")
        changed = {k: (v, getattr(args, k)) for k, v in ckpt["args"].items() if getattr(args, k, v) != v}
        raw_model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        if ema is not None and ckpt.get("ema") is not None:
            ema.load_state_dict(ckpt["ema"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        random.setstate(ckpt["rng"]["python"])
        start_epoch, start_step, best_top1 = ckpt["epoch"], ckpt["step"], ckpt["best_top1"]
        loss_sum, mixed_batches = ckpt["loss_sum"], ckpt["mixed_batches"]
        print0(f"resumed from {resume}: epoch {start_epoch + 1}, step {start_step}/{steps_per_epoch}, best top-1 "
               f"{best_top1:.2f}%" + "".join(f"; --{k.replace('_', '-')} {a} -> {b}" for k, (a, b) in changed.items()))
        del ckpt

    def checkpoint(epoch, step, row=None):
        """Everything needed to resume, in one dict. step = optimizer steps done in `epoch` (0: it has not begun)."""
        return dict(model=raw_model.state_dict(), ema=ema.state_dict() if ema else None,
                    optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(), scaler=scaler.state_dict(),
                    epoch=epoch, step=step, loss_sum=float(loss_sum), mixed_batches=int(mixed_batches),
                    best_top1=best_top1, world=world, args=vars(args), classes=classes, class_names=info["names"],
                    metrics=row, rng=dict(torch=torch.get_rng_state(), python=random.getstate()))

    # SIGTERM (a spot reclaim; torchrun forwards it): finish the step, checkpoint, exit with PREEMPTED
    stop = [False]
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.__setitem__(0, True))

    def should_stop():
        if ddp:  # every rank must stop after the same step, whichever got the signal first
            flag = torch.tensor([float(stop[0])], device=device if device.type == "cuda" else "cpu")
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            return flag.item() > 0
        return stop[0]

    stop_epoch = min(args.epochs, args.stop_epoch or args.epochs)
    eval_s, t_saved, bad_seen = 0.0, time.time(), set()  # last eval's duration for the ETA; last save; named files
    for epoch in range(start_epoch, stop_epoch):
        first = start_step if epoch == start_epoch else 0  # optimizer steps of this epoch already done
        if first == 0:
            loss_sum, mixed_batches = 0.0, 0
        train_loader.sampler.set_epoch(epoch, start=first * args.batch_size * args.accum_steps)
        mixing = mixer is not None and epoch < mix_off
        model.train()
        loss_sum, bad_count = torch.tensor(loss_sum, device=device), 0
        t_epoch = time.time()
        batches = itertools.islice(train_loader, (steps_per_epoch - first) * args.accum_steps)  # drop a ragged end
        for i, (images, labels, bad) in enumerate(batches, start=first * args.accum_steps):
            step, micro = divmod(i, args.accum_steps)
            last_micro = micro == args.accum_steps - 1
            for b in bad[bad >= 0].tolist():  # unreadable files, replaced by a class-mate in the loader
                bad_count += 1
                if b not in bad_seen:
                    bad_seen.add(b)
                    print(f"warning: unreadable image {train_set.samples[b][0]}, replaced by another of its class",
                          file=sys.stderr, flush=True)
            x, y = to_device(images, labels, device, args.channels_last)
            if mixing:
                # seeded per (seed, epoch, batch, rank): the same mix on resume, whatever happened before
                torch.manual_seed(((args.seed * 100_003 + epoch) * 1_000_003 + i) * 1024 + rank)
                x, y = mixer(x, y)
                mixed_batches += y.ndim == 2  # soft targets: this batch really was mixed
            # forward/backward/update; DDP all-reduces gradients only on the last micro-batch
            with model.no_sync() if ddp and not last_micro else nullcontext():
                loss_sum += forward_backward(step_model, x, y, criterion, ctx, scaler, args.accum_steps)
            if not last_micro:
                continue
            optimizer_step(optimizer, scaler)
            scheduler.step()
            if ema is not None:
                ema.update_parameters(raw_model)

            # log; .item() syncs with the device, so only every --log-every steps
            if (step + 1) % args.log_every == 0 or step + 1 == steps_per_epoch:
                now, avg = time.time(), loss_sum.item() / (i + 1)
                if not math.isfinite(avg):
                    raise FloatingPointError(f"the training loss is {avg} at epoch {epoch + 1} step {step + 1}")
                step_s = (now - t_epoch) / (step + 1 - first)
                eta = step_s * ((stop_epoch - epoch) * steps_per_epoch - step - 1) + eval_s * (stop_epoch - epoch)
                mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
                print0(f"epoch {epoch + 1}/{args.epochs} step {step + 1}/{steps_per_epoch} {sizes[epoch]}px "
                       f"loss {avg:.4f} lr {scheduler.get_last_lr()[0]:.4g} img/s {global_batch / step_s:.0f} "
                       f"eta {fmt_time(eta)}"
                       + (f" mem {mem:.1f}GiB" if mem else ""))

            # a preemption, or --save-every-min: a mid-epoch checkpoint (not after the last step: the epoch's own)
            preempted = should_stop()
            timed = master and time.time() - t_saved > 60 * args.save_every_min
            if (preempted or timed) and step + 1 < steps_per_epoch:
                if master:
                    if not math.isfinite(loss_sum.item()):
                        raise FloatingPointError(f"the training loss is not finite at epoch {epoch + 1}")
                    save_atomic(checkpoint(epoch, step + 1), last_path)
                    print0(f"saved {last_path} at epoch {epoch + 1} step {step + 1}"
                           + (" (preempted)" if preempted else ""))
                t_saved = time.time()
            if preempted and step + 1 < steps_per_epoch:  # after the last step, the epoch's checkpoint comes first
                return finish(ddp, args.out, "preempted", print0)
        train_s = time.time() - t_epoch

        # eval: on every rank, the bare module (a DDP forward would need all ranks in step)
        train_loss = loss_sum / (steps_per_epoch * args.accum_steps)
        if ddp:
            dist.all_reduce(train_loss)
            train_loss /= world
        if not math.isfinite(train_loss.item()):
            raise FloatingPointError(f"the training loss is {train_loss.item()} at the end of epoch {epoch + 1}")
        t_eval = time.time()
        metrics = evaluate(raw_model, val_loader, device, ctx, args.channels_last, args.tta)
        if ema is not None:
            ema_metrics = evaluate(ema.module, val_loader, device, ctx, args.channels_last, args.tta)
            metrics["ema_top1"] = ema_metrics["val_top1"]
        eval_s = time.time() - t_eval
        is_best = metrics["val_top1"] > best_top1
        best_top1 = max(best_top1, metrics["val_top1"])
        row = dict(epoch=epoch, img_size=sizes[epoch], lr=scheduler.get_last_lr()[0], train_loss=train_loss.item(),
                   **metrics,
                   img_per_s=global_batch * (steps_per_epoch - first) / train_s, epoch_s=time.time() - t_epoch,
                   mixed=mixed_batches > 0, bad_images=bad_count, best_top1=best_top1)
        print0(f"epoch {epoch + 1}/{args.epochs} done: train loss {row['train_loss']:.4f} val loss "
               f"{row['val_loss']:.4f} top-1 {row['val_top1']:.2f}% top-5 {row['val_top5']:.2f}% "
               f"({row['val_n']} images) in {fmt_time(row['epoch_s'])}, {row['img_per_s']:.0f} img/s"
               + (f"; {bad_count} unreadable images replaced" if bad_count else ""))

        # checkpoint and log, on rank 0
        if master:
            ckpt = checkpoint(epoch + 1, 0, row)
            save_atomic(ckpt, last_path)
            if is_best:
                save_atomic(ckpt, best_path)
            with open(log_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            plot_curves(log_path, os.path.join(args.out, "curves.png"))
            t_saved = time.time()
        if should_stop():  # a SIGTERM during evaluation: the epoch's checkpoint is already written
            return finish(ddp, args.out, "preempted", print0)
        if ddp:
            dist.barrier()  # nobody races ahead of a checkpoint

    if ddp:
        # an invariant worth one all-gather: DDP must have kept every rank's weights identical
        flat = torch.cat([p.detach().flatten().double() for p in raw_model.parameters()])
        sums = [torch.zeros(2, dtype=torch.float64, device=device) for _ in range(world)]
        dist.all_gather(sums, torch.stack([flat.sum(), (flat * flat).sum()]))
        assert all(torch.equal(s, sums[0]) for s in sums), f"ranks' weights diverged: {sums}"
        print0(f"weights identical on all {world} ranks (checksum {sums[0][0].item():.6f})")
    print0(f"best val top-1 {best_top1:.2f}%; checkpoints and curves.png in {args.out}")
    return finish(ddp, args.out, "done" if stop_epoch == args.epochs else "stopped", print0)


# Exit status, for restart loops (run_ec2.sh): resume after PREEMPTED (and after a crash), stop otherwise.
# Under torchrun the agent's own exit status does not carry these, so OUT/status holds the same word too.
EXIT = dict(done=0, stopped=0, crashed=1, bad_input=2, diverged=3, preempted=75)  # 75: EX_TEMPFAIL, "try again"


def finish(ddp, out, status, print0):
    """Write OUT/status (rank 0), leave the process group cleanly, return the exit status."""
    if print0 is not None:
        if status == "preempted":
            print0("preempted: checkpoint saved; run the same command again to continue")
        if not ddp or dist.get_rank() == 0:
            with open(os.path.join(out, "status"), "w") as f:
                f.write(status + "\n")
    if ddp and dist.is_initialized():
        dist.barrier()  # gloo can abort at exit without it
        dist.destroy_process_group()
    return EXIT[status]


def main(argv=None):
    args = parse_args(argv)
    try:
        sys.exit(train(args))
    except (ValueError, FileNotFoundError) as e:
        print(f"train.py: error: {e}", file=sys.stderr, flush=True)
        code = EXIT["bad_input"]
    except FloatingPointError as e:
        print(f"train.py: error: {e}; last.pt holds the last good state: lower --lr (or use --amp bf16/fp32) and "
              f"rerun", file=sys.stderr, flush=True)
        code = EXIT["diverged"]
    except OSError as e:  # a full disk or a lost mount while saving: the previous checkpoint is intact
        print(f"train.py: error: {e}", file=sys.stderr, flush=True)
        code = EXIT["crashed"]
    if os.path.isdir(args.out):
        with open(os.path.join(args.out, "status"), "w") as f:
            f.write({2: "bad_input", 3: "diverged"}.get(code, "crashed") + "\n")
    sys.exit(code)


if __name__ == "__main__":
    main()
