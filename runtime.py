"""
What several scripts need to run a network, on the ground floor beside model.py and data.py, and nothing else:
pick the device (train.py, lr_finder.py, evaluate.py, gradcam.py, app.py, bench.py), AMP as data (train.py,
lr_finder.py, evaluate.py, bench.py), start and end the process group (train.py, evaluate.py), and move a uint8
batch onto the device (train.py, lr_finder.py, evaluate.py). A helper that one script alone uses lives in that
script. It imports model.py only, for the normalization.
"""
import os

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


def to_device(images, labels, device, channels_last=True):
    """uint8 batch from the loader -> normalized float on the device, in the training memory layout."""
    images = images.to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return normalize(images), labels.to(device, non_blocking=True)
