"""
The small runtime pieces that every script needs, on the ground floor beside model.py and data.py: pick the
device, AMP as data, start and end the process group, move a uint8 batch onto the device, and the flip-TTA
probabilities. It imports model.py only (for the normalization); nothing here knows about training.
"""
import os
import time

import torch
import torch.distributed as dist

from model import normalize


def pick_device(name, local_rank=0):
    """'auto' is cuda > mps > cpu; an unavailable device is a one-line ValueError."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda, but torch sees no CUDA GPU; use --device cpu or check nvidia-smi")
        torch.cuda.set_device(local_rank)
        torch.backends.cudnn.benchmark = True  # fixed shapes: cuDNN picks its fastest kernels once per size
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
            # bf16 autocast ran 11-17x slower than fp32 on a CPU without AVX-512 BF16 (BENCHMARKS.md)
            amp = "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"
        else:
            amp = "fp16"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[amp]
    ctx = torch.autocast(device.type, dtype=dtype, enabled=amp != "fp32")
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    return amp, ctx, scaler


def init_distributed(device_name):
    """DDP when torchrun set RANK, else one plain process: (ddp, rank, world, device)."""
    ddp = "RANK" in os.environ
    rank, local_rank, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")) if ddp else (0, 0, 1)
    device = pick_device(device_name, local_rank)
    if ddp:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return ddp, rank, world, device


def close_distributed():
    if dist.is_initialized():
        dist.barrier()  # gloo can abort at exit ("terminate called without an active exception") without it
        dist.destroy_process_group()


def fmt_time(seconds):
    return time.strftime("%H:%M:%S", time.gmtime(max(0, seconds))) if seconds < 86400 else f"{seconds / 86400:.1f}d"


def to_device(images, labels, device, channels_last=True):
    """uint8 batch from the loader -> normalized float on the device, in the training memory layout."""
    images = images.to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return normalize(images), labels.to(device, non_blocking=True)


def probabilities(model, x, tta=False):
    """Softmax probabilities; tta: their mean over each image and its mirror image (FFCV's lr_tta)."""
    probs = model(x).float().softmax(1)
    return (probs + model(x.flip(3)).float().softmax(1)) / 2 if tta else probs


def agreed(flag, group=None):
    """True on every rank if `flag` is True on any, so that all stop after the same step. The flag travels as a CPU
    tensor (over gloo: `group`, under NCCL): a CUDA tensor and .item() here would make the CPU wait for every step's
    kernels before it could queue the next one, on every step of every GPU run."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([float(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t.item() > 0


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


def load_shared(path, local, obj, read):
    """On every rank, the object that rank 0 read from `path` (`obj` there): each rank reads its own copy (`local`)
    when every rank has that very file (same size and mtime), else rank 0 sends its object to all, in one broadcast.
    Returns (object, the ranks that had no copy)."""
    if not dist.is_initialized():
        return obj, []
    stamp = broadcast0([os.stat(path).st_size, os.stat(path).st_mtime_ns] if dist.get_rank() == 0 else None)
    have = dist.get_rank() == 0 or (os.path.exists(local) and [os.stat(local).st_size, os.stat(local).st_mtime_ns]
                                     == stamp)
    has = [None] * dist.get_world_size()
    dist.all_gather_object(has, have)
    if all(has):
        return (obj if dist.get_rank() == 0 else read(local)), []
    return broadcast0(obj), [r for r, h in enumerate(has) if not h]
