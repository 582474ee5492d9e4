"""
What a ResNet-50 run costs, measured in one run: the loader against torchvision's standard pipeline, the
training step in every precision and layout, train.py against a bare loop, and a projection to dollars.
Prints tables, then one JSON line (loader_speedup_176 is ours / standard images/s per core at 176 px).

    python bench.py --data /mnt/imagenet                           # this machine, its GPUs, a few minutes
    python bench.py --data /mnt/imagenet --hourly-usd 4.1          # and the dollars (./run_ec2.sh bench does this)
    python bench.py --images ../shared/data/imagenet-samples --device cpu

1. Loader, per worker core (one process, one thread), on 100 real full-size training JPEGs of --data (default
   $DATA_DIR, which run_ec2.sh sets), or the JPEGs of --images: torchvision's
   standard training pipeline (RandomResizedCrop, flip, ToTensor, Normalize on PIL images) against ours
   (data.random_resized_crop: draft JPEG decoding, one resize of the crop box, uint8), and ours again on a copy
   shrunk to a shorter side of --shrink-side px (train.py --shrink). Then both in a DataLoader of --workers.
2. Training step, synthetic input on the device: ResNet-50 forward + loss + backward + SGD, fp32 against bf16
   (fp16 where the GPU has no bf16), channels_last on and off, torch.compile on and off; and the whole of
   train.py (a subprocess on the JPEGs) against the bare loop.
3. Projection: hours and dollars for --preset (default: the default recipe) on ImageNet-1k (1,281,167 training
   images, 50,000 val) on all the GPUs of this machine (--gpus), whose price --hourly-usd is. Each epoch runs at
   the slower of the GPU step rate and the loader rate (per-core rate x the cores left after one per GPU
   process), at that epoch's image size; the slower one is named as the bottleneck.
"""
import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn as nn
from PIL import Image
from torchvision import transforms as T

import data
from model import build_model
from runtime import autocast_for, pick_device
from train import PRESETS, epoch_sizes
from train import parse_args as train_args

HERE = os.path.dirname(os.path.abspath(__file__))
IMAGENET_TRAIN, IMAGENET_VAL = 1_281_167, 50_000


# -----------------------------------------------------------------------------
# 1. the loader

def standard_pipeline(path, size):
    """torchvision's ImageNet reference training transform, on a PIL image, as most notebooks write it."""
    tf = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(),
                    T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    with open(path, "rb") as f:
        return tf(Image.open(f).convert("RGB"))


def our_pipeline(path, size):
    return data.random_resized_crop(Image.open(path), size)


def eval_pipeline(path, size):
    """The evaluation's: a full decode, the shorter side resized to size / 0.875, a center crop, uint8."""
    return data.eval_transform(size)(data.load_rgb(path))


def per_core_rate(fn, files, size, passes):
    """images/s of one pipeline in this process, on one thread, after one warm pass over 10 files."""
    for path in files[:10]:
        fn(path, size)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    for _ in range(passes):
        for path in files:
            fn(path, size)
    return passes * len(files) / (time.perf_counter() - t0)


class Files(torch.utils.data.Dataset):
    """The JPEGs, repeated, for a DataLoader: item i -> pipeline(files[i % n], size)."""

    def __init__(self, files, fn, size, n):
        self.files, self.fn, self.size, self.n = files, fn, size, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.fn(self.files[i % len(self.files)], self.size)


def loader_rate(fn, files, size, workers, batch, n):
    """images/s out of a DataLoader of `workers` processes (pinned memory where a GPU is), after its first batch."""
    loader = torch.utils.data.DataLoader(Files(files, fn, size, n), batch_size=batch, num_workers=workers,
                                         pin_memory=torch.cuda.is_available(),
                                         prefetch_factor=2 if workers else None)
    it = iter(loader)
    next(it)
    t0, count = time.perf_counter(), 0
    for x in it:
        count += len(x)
    return count / (time.perf_counter() - t0)


# -----------------------------------------------------------------------------
# 2. the training step

def bare_loop(arch, size, batch, amp, channels_last, compiled, device, steps, warmup=3):
    """(img/s, peak GiB) of forward + loss + backward + SGD on one synthetic batch that never leaves the device; the
    peak is the GPU memory allocated at most (None on the CPU)."""
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = build_model(arch, num_classes=1000).to(device, memory_format=fmt).train()
    step_model = torch.compile(model) if compiled else model
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    _, ctx, scaler = autocast_for(amp, device)
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, 1000, (batch,), device=device)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)

    def step():
        with ctx:
            loss = loss_fn(step_model(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):  # compilation and cuDNN's autotuning happen here
        step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    rate = batch * steps / (time.perf_counter() - t0)
    return rate, torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


@torch.no_grad()
def forward_rate(arch, size, batch, amp, device, steps):
    """img/s of evaluation forwards (channels_last, no grad): what the per-epoch validation costs."""
    model = build_model(arch).to(device, memory_format=torch.channels_last).eval()
    _, ctx, _ = autocast_for(amp, device)
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    with ctx:
        model(x)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            model(x)
        sync(device)
    return batch * steps / (time.perf_counter() - t0)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def image_folder(files, root, per_class):
    """An ImageFolder of symlinks: one class per file, `per_class` links to it in train/, one in val/."""
    for k, path in enumerate(files):
        for split, n in (("train", per_class), ("val", 1)):
            d = os.path.join(root, split, f"c{k:03d}")
            os.makedirs(d, exist_ok=True)
            for j in range(n):
                os.symlink(os.path.abspath(path), os.path.join(d, f"{j}.JPEG"))
    return root


def train_script(arch, size, batch, amp, device, workers, root):
    """img/s of train.py's second epoch (process start, compile warm-up and evaluation not counted)."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, os.path.join(HERE, "train.py"), "--data", root, "--arch", arch, "--img-size", str(size),
               "--min-img-size", str(size), "--batch-size", str(batch), "--amp", amp, "--epochs", "2",
               "--device", device.type, "--out", out, "--log-every", "1000", "--workers", str(workers)]
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            raise RuntimeError(f"train.py failed:\n{p.stderr[-2000:]}")
        with open(os.path.join(out, "log.jsonl")) as f:
            return [json.loads(line) for line in f][-1]["img_per_s"]


# -----------------------------------------------------------------------------
# 3. the projection: one table of EC2 facts, prices and published rates, and one function for every projection

# The instances: their facts and prices, in the one file that run_ec2.sh reads too (launch's price for the budget);
# its "prices_source" and "facts_source" say where each figure comes from.
def read_instances(path=os.path.join(HERE, "ec2_instances.json")):
    with open(path) as f:
        rows = json.load(f)["instances"]
    return {name: dict(row, store=tuple(row["store"]), spot=tuple(row["spot"]) if row["spot"] else None)
            for name, row in rows.items()}


INSTANCES = read_instances()
# Published ResNet-50 training rates, images/s per GPU, mixed precision, 224 px, plain PyTorch. MLPerf's stacks (GPU
# JPEG decoding, fused kernels: about 7,160 on an H100, 1,850 on an L40S) are a ceiling, not what train.py does.
GPU_RATES = {
    "A100": dict(one=2470, eight=2078, source="NVIDIA DeepLearningExamples resnet50v1.5 (pytorch-21.03), A100 80 GB"),
    "H100": dict(one=2616, source="Lambda deeplearning-benchmark, pytorch-train-throughput-fp16.csv: 2,616-2,800 "
                                  "on one H100 SXM; the low end"),
    "A10G": dict(one=638, source="Lambda, the same file: the A10, the A10G's sibling"),
    "L40S": dict(one=1146, source="Lambda, the same file: the RTX 6000 Ada, the L40S's die"),
    "T4": None,  # no published training rate found
}
SCALING = 2078 / 2470  # a GPU's rate among 8 against alone (DeepLearningExamples' A100s), assumed for the other GPUs

# Measured here, VM-B (2-core AMD EPYC Zen 4, one thread a core), torch 2.14.1, 2026-12-03: the mean of two runs of
# `python bench.py --images ../shared/data/imagenet-samples --loader-sizes 192 176 160 --shrink-side 320 --passes 10
#  --sizes 128 --batch-size 32 --steps 5 --workers 1`, which differed by up to 17% (BENCHMARKS.md "What will it cost?")
LOADER_PER_CORE = dict(full={160: 474.5, 176: 449.8, 192: 392.1},    # images/s of one core, our training crop, on
                       shrunk={160: 695.1, 176: 668.5, 192: 631.2})  # the 100 full-size JPEGs and at a 320 px side
EVAL_PER_CORE = 310.5   # images/s of one core: the evaluation's full decode, resize to 292 px, center crop to 256
FORWARD_PER_STEP = 3.4  # ResNet-50's forward pass against its training step, images/s, 128 px, bf16: the lower of the
                        # two runs (3.40, 4.41), carried over to GPUs as the eval's speed
VCPU = 0.6  # an EC2 vCPU is one hyperthread (2 threads a core); assumed: two threads of one core decode 1.2x what
            # one does alone, so a vCPU counts as 0.6 of a VM-B core
JPEG_KB = dict(full=110, shrunk=42)  # mean file, KB: 900 full-size ImageNet JPEGs, and at a 320 px shorter side, q90
IMAGENET_TRAIN, IMAGENET_VAL, VAL_KB = 1_281_167, 50_000, 110  # the val images stay full size in a shrunk copy
GP3_MBPS = 125  # a gp3 volume as launch made it before the shards: its included 125 MB/s, reads and writes together
# The way to the first step before the shards (run_ec2.sh data without them): the 155 GB Kaggle zip copied onto the
# gp3 root volume, unzipped there, then --check-data decodes every file once.
ZIP_GB = 155
# With the shards (run_ec2.sh prepare, once): data streams them from S3 onto the instance store while setup runs.
# MB/s of shards one core checks (sha256) and extracts into a folder, measured here (VM-B, 2026-12-03: the median of
# the warm runs of `python bench.py --images ../shared/data/imagenet-samples --shards-only`, BENCHMARKS.md); the
# aws CLI's own streaming is not in it
EXTRACT_MBPS = dict(full=275, shrunk=179)
NVME_MBPS = 1000     # assumed: an instance store disk writes about 1 GB/s (AWS publishes no per-type figure)
STAGE_JOBS, STREAM_MBPS = 8, 100  # run_ec2.sh's STAGE_JOBS shards at a time; assumed: one `aws s3 cp ... -` stream
# Assumed, not measured: launch to the instance running our user-data; setup (a venv on the AMI's CUDA torch, the
# requirements); the first step after both (train.py's start, the dataset scan, cuDNN's first kernels)
BOOT_MIN, SETUP_MIN, FIRST_STEP_MIN = 2, 2, 1


def gpu_rate(inst, size):
    """One GPU's published training images/s at `size` px among the instance's GPUs (None: none is published),
    carried from 224 px by the ratio of pixels."""
    spec = GPU_RATES.get(inst["gpu"])
    if spec is None:
        return None
    per_gpu = spec.get("eight", spec["one"] * SCALING) if inst["gpus"] > 1 else spec["one"]
    return per_gpu * (224 / size) ** 2


def fits_in_cache(inst, gb):
    """Whether the page cache can hold `gb` of files beside the processes' own memory (a quarter of the RAM)."""
    return gb <= 0.75 * inst["ram_gib"] * 1.074


def data_gb(kind):
    return (IMAGENET_TRAIN * JPEG_KB[kind] + IMAGENET_VAL * VAL_KB) / 1e6


STAGED = "shrunk"  # the JPEGs run_ec2.sh data stages: the copy prepare makes by default (SHRINK=320)


def on_store(inst, kind):
    """Whether the shards of `kind` fit this instance's store, where run_ec2.sh data stages them (else the root
    volume)."""
    store_gb = inst["store"][0] * inst["store"][1] if inst.get("store") else 0
    return data_gb(kind) < 0.9 * store_gb


def staging_minutes(inst, kind, peak=False):
    """Minutes to stream the shards from S3 onto the instance store: the data over the slowest of the network
    (baseline, or peak), the S3 streams, the cores that check and extract it, and the disks that take it. Returns
    (minutes, bound)."""
    rates = {"network": (inst["net_peak_gbps"] if peak else inst["net_gbps"]) * 1000 / 8,
             "S3 streams": STAGE_JOBS * STREAM_MBPS,
             "cores": inst["vcpus"] * inst.get("vcpu", VCPU) * EXTRACT_MBPS[kind],
             "disk": NVME_MBPS * inst["store"][0]}
    bound = min(rates, key=rates.get)
    return data_gb(kind) * 1000 / rates[bound] / 60, bound


def first_step_minutes(inst, kind, decode_per_core=None, shards=True):
    """Minutes from launch to the first step, paid again at every start and restart: boot, then setup and the data
    side by side, then the first step. With the shards (run_ec2.sh prepare) the data is their staging. Without them it
    is the zip: copied at the slower of the network and the volume; unzipped through the volume, which reads the zip
    unless the page cache still holds it, and writes the images; then every file decoded once by --check-data, or
    read, when the volume is the slower and the cache does not hold them."""
    if shards and on_store(inst, kind):
        return BOOT_MIN + max(SETUP_MIN, staging_minutes(inst, kind)[0]) + FIRST_STEP_MIN
    net_mbps = inst["net_gbps"] * 1000 / 8
    train_gb = IMAGENET_TRAIN * JPEG_KB["full"] / 1e6
    copy = ZIP_GB * 1000 / min(net_mbps, GP3_MBPS)
    unzip = ((0 if fits_in_cache(inst, ZIP_GB) else ZIP_GB) + train_gb) * 1000 / GP3_MBPS
    decode = (inst["vcpus"] - 1) * inst.get("vcpu", VCPU) * (decode_per_core or EVAL_PER_CORE)  # a full decode
    read = 0 if fits_in_cache(inst, train_gb) else train_gb * 1000 / GP3_MBPS
    check = max((IMAGENET_TRAIN + IMAGENET_VAL) / decode, read)
    return BOOT_MIN + SETUP_MIN + (copy + unzip + check) / 60 + FIRST_STEP_MIN


def disk_rate(inst, kind, shards=True):
    """Images/s the data's disk reads: the instance store's NVMe, or a gp3 volume (raised to the EBS link's baseline
    by launch, where an instance has no store, since the shards)."""
    if shards and on_store(inst, kind):
        return NVME_MBPS * inst["store"][0] * 1000 / JPEG_KB[kind]
    mbps = min(1000, inst["ebs_mbps"]) if shards else GP3_MBPS
    return mbps * 1000 / JPEG_KB[kind]


def project(inst, preset, kind=None, measured=None, shards=True):
    """Hours and dollars of --preset `preset` (train.py's args) on ImageNet-1k on one instance (a row of INSTANCES,
    or this machine as bench.py measured it), from the published rates, or from `measured` where it has them:
    {"gpu": {px: a GPU's training img/s}, "eval": a GPU's forward img/s at the eval size, "loader": {px: img/s of one
    core}, "eval_loader": img/s of one core}. kind: the training JPEGs, "full" or "shrunk" (default: STAGED,
    what run_ec2.sh data stages). shards: the data staged from prepare's shards (else today's zip).

    Each epoch trains at the slowest of the GPUs (GPUs x a GPU's rate at that epoch's size), the loader (the vCPUs
    left to workers x a core's rate x VCPU) and the disk (its MB/s / the JPEGs' size, for the first epoch, and for
    every epoch when the data does not fit the page cache), then evaluates the 50,000 val images at the slower of the
    GPUs' forward pass (halved by flip TTA) and the val loader; the time to the first step is added once."""
    measured, kind = measured or {}, kind or STAGED
    cores = (inst["vcpus"] - inst["gpus"]) * inst.get("vcpu", VCPU)  # a vCPU per GPU runs its training process
    cached = fits_in_cache(inst, data_gb(kind))
    disk = disk_rate(inst, kind, shards)
    per_core = measured.get("loader", LOADER_PER_CORE[kind])
    eval_core = measured.get("eval_loader", EVAL_PER_CORE)
    train_s, eval_s, bound = 0.0, 0.0, {}
    for epoch, size in enumerate(epoch_sizes(preset)):
        gpu = measured["gpu"][size] if "gpu" in measured else gpu_rate(inst, size)
        rates = {"GPU": inst["gpus"] * gpu if gpu else math.inf, "loader": cores * per_core[size],
                 "disk": disk if epoch == 0 or not cached else math.inf}
        slowest = min(rates, key=rates.get)
        bound[slowest] = bound.get(slowest, 0.0) + IMAGENET_TRAIN / rates[slowest]
        train_s += IMAGENET_TRAIN / rates[slowest]
        forward = measured.get("eval") or (gpu_rate(inst, preset.eval_size) or math.inf) * FORWARD_PER_STEP
        eval_s += IMAGENET_VAL / min(inst["gpus"] * forward / (2 if preset.tta else 1), cores * eval_core)
    first = first_step_minutes(inst, kind, eval_core, shards)
    hours = (train_s + eval_s) / 3600 + first / 60
    spot = inst.get("spot")
    return dict(preset=preset.preset, epochs=preset.epochs, kind=kind, hours=hours, train_h=train_s / 3600,
                eval_h=eval_s / 3600, first_step_min=first, cached=cached, usd=hours * inst["on_demand"],
                usd_spot=[hours * spot[0], hours * spot[1]] if spot else None,
                bottleneck=max(bound, key=bound.get), gpu_known=gpu_rate(inst, 224) is not None or "gpu" in measured,
                measured=sorted(measured))


def money(usd):
    return f"${usd:,.0f}" if usd >= 100 else f"${usd:.2f}"


def cost_table(names=None, measured=None, kind=None):
    """The README's cost table, as markdown: the facts, both presets' projected hours and dollars, the bottleneck. The
    headers come from the presets: their epochs, and the default's smallest and largest training size."""
    fast, default = train_args(["--preset", "fast"]), train_args([])
    lo, hi = min(epoch_sizes(default)), max(epoch_sizes(default))
    lines = [f"| instance | GPUs | vCPUs | on-demand $/h | spot $/h | a GPU's img/s at {lo} / {hi} px | loader img/s "
             f"at {lo} / {hi} px | first step | `--preset fast` ({fast.epochs} epochs) | default ({default.epochs} "
             f"epochs) | bound by |",
             "| --- | --- | ---: | ---: | --- | --- | --- | ---: | --- | --- | --- |"]
    for name in names or INSTANCES:
        inst = INSTANCES[name]
        row_kind = kind or STAGED  # the JPEGs run_ec2.sh data stages there
        gpu = [measured["gpu"][s] if measured else gpu_rate(inst, s) for s in (lo, hi)]
        cores = (inst["vcpus"] - inst["gpus"]) * inst.get("vcpu", VCPU)
        per_core = (measured or {}).get("loader", LOADER_PER_CORE[row_kind])
        cells = []
        for preset in (fast, default):
            p = project(inst, preset, row_kind, measured)
            lead = "" if p["gpu_known"] else "at least "
            spot = f", spot {money(p['usd_spot'][0])}-{money(p['usd_spot'][1])}" if p["usd_spot"] else ""
            cells.append(f"{lead}{p['hours']:.1f} h: {lead}{money(p['usd'])}{spot}")
        price = f"{inst['on_demand']:.3f}".rstrip("0").rstrip(".") + (" (list)" if inst.get("list_price") else "")
        spot = f"{inst['spot'][0]:.2f}-{inst['spot'][1]:.2f}" if inst["spot"] else f"({inst['no_spot']})"
        rates = "none published" if gpu[0] is None else f"{gpu[0]:,.0f} / {gpu[1]:,.0f}"
        bound = p["bottleneck"] if p["gpu_known"] else "loader, at least (no GPU rate)"
        lines.append(f"| {name} | {inst['gpus']} x {inst['gpu']} | {inst['vcpus']} | {price} | {spot} | {rates} | "
                     f"{cores * per_core[lo]:,.0f} / {cores * per_core[hi]:,.0f} ({row_kind}) | "
                     f"{p['first_step_min']:.0f} min | "
                     f"{cells[0]} | {cells[1]} | {bound} |")
    return "\n".join(lines)


def recommendation(names=None):
    """The README's pick, by a rule applied to the cost table: for the default recipe, the cheapest row at spot among
    those that are projections (a GPU rate is published and a spot price is in the snapshot; not an "at least" row),
    by the top of its spot range; and the fastest row, the cheaper on-demand where hours tie."""
    default = train_args([])
    rows = {name: project(INSTANCES[name], default) for name in names or INSTANCES}
    cheap = min((n for n, p in rows.items() if p["gpu_known"] and p["usd_spot"]), key=lambda n: rows[n]["usd_spot"][1])
    fast = min(rows, key=lambda n: (round(rows[n]["hours"], 1), rows[n]["usd"]))
    c, f = rows[cheap], rows[fast]
    spot = f", spot {money(f['usd_spot'][0])}-{money(f['usd_spot'][1])}" if f["usd_spot"] else ""
    return (f"Recommended, by the rule below the table: **{cheap}** at spot, the cheapest ({c['hours']:.1f} h, "
            f"{money(c['usd_spot'][0])}-{money(c['usd_spot'][1])} projected), or **{fast}**, the fastest "
            f"({f['hours']:.1f} h, {money(f['usd'])} on-demand{spot} projected).")


def staging_table(names=None):
    """Projected minutes to stage ImageNet's shards (run_ec2.sh data), full size and shrunk, at the network's baseline
    and at its peak; then from the first byte read from S3 to the first step with prepare's default (the shrunk
    copy; setup alongside), and launch to the first step without the shards (the zip)."""
    lines = ["| instance | instance store | network Gbit/s, baseline / peak | full size (147 GB): min, baseline / peak "
             "| shrunk (60 GB): min, baseline / peak | first byte to first step, min | no shards: launch to first "
             "step, min |", "| --- | --- | --- | --- | --- | ---: | ---: |"]
    for name in names or INSTANCES:
        inst = INSTANCES[name]
        cells = []
        for kind in ("full", "shrunk"):
            if not on_store(inst, kind):
                cells.append("does not fit: the root volume")
                continue
            (base, bound), (peak, _) = staging_minutes(inst, kind), staging_minutes(inst, kind, peak=True)
            cells.append(f"{base:.1f} / {peak:.1f} ({bound})")
        base = staging_minutes(inst, "shrunk")[0]
        lines.append(f"| {name} | {inst['store'][0]} x {inst['store'][1]:,} GB | {inst['net_gbps']:g} / "
                     f"{inst['net_peak_gbps']:g} | {cells[0]} | {cells[1]} | "
                     f"{max(SETUP_MIN, base) + FIRST_STEP_MIN:.1f} | "
                     f"{first_step_minutes(inst, 'full', shards=False):.0f} |")
    return "\n".join(lines)


# -----------------------------------------------------------------------------

def table(title, header, rows):
    print(f"\n{title}\n" + " | ".join(header))
    for r in rows:
        print(" | ".join(f"{v:.1f}" if isinstance(v, float) else str(v) for v in r), flush=True)


def find_images(images, root, n=100):
    """Real JPEGs to time: the files of --images, else n training images of --data spread over its classes."""
    if images:
        files = sorted(os.path.join(images, f) for f in os.listdir(images) if f.lower().endswith((".jpeg", ".jpg")))
    elif root:
        train_dir = data.find_splits(root)[0]
        samples = data.scan_folder(train_dir)[1]
        files = [samples[round(k * len(samples) / n)][0] for k in range(min(n, len(samples)))]
    else:
        raise ValueError("no JPEGs to measure: pass --data /path/to/imagenet (or set DATA_DIR, as run_ec2.sh does), "
                         "or --images with a folder of real full-size JPEGs")
    if not files:
        raise ValueError(f"no .JPEG files in {images or root}; pass --data or --images with real full-size JPEGs")
    return files


def measure_loader(files, sizes, shrink_sides, passes, workers, batch, n, tmp, eval_size):
    """Section 1: per-core images/s of the standard pipeline, ours, and ours on shrunk copies; the evaluation's at
    eval_size; then both training pipelines in a DataLoader of `workers` processes at 176 px. Returns (rows per size,
    the evaluation's per-core rate, DataLoader row)."""
    small = {side: [os.path.join(tmp, str(side), os.path.basename(f)) for f in files] for side in shrink_sides}
    for side, copies in small.items():
        for src, dst in zip(files, copies):
            data.shrink_image((src, dst, side, "shorter"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rows = []
    for size in sizes:
        std = per_core_rate(standard_pipeline, files, size, passes)
        ours = per_core_rate(our_pipeline, files, size, passes)
        row = dict(px=size, standard=std, ours=ours, speedup=ours / std)
        for side, copies in small.items():
            row[f"ours_shrunk_{side}"] = per_core_rate(our_pipeline, copies, size, passes)
        rows.append(row)
    table(f"Loader, images/s per core, {len(files)} real JPEGs x {passes} passes; ratios to the standard pipeline "
          f"in brackets", ["px", "torchvision standard", "ours"] + [f"ours, shrunk to {side} px" for side in small],
          [[r["px"], r["standard"], f"{r['ours']:.1f} ({r['speedup']:.2f}x)"] +
           [f"{r[f'ours_shrunk_{side}']:.1f} ({r[f'ours_shrunk_{side}'] / r['standard']:.2f}x)" for side in small]
           for r in rows])
    evaluation = per_core_rate(eval_pipeline, files, eval_size, passes)
    print(f"\nEvaluation, images/s per core: {evaluation:.1f} (full decode, resize to {round(eval_size / 0.875)}, "
          f"center crop {eval_size})")
    dl = dict(px=176, workers=workers, batch=batch, standard=loader_rate(standard_pipeline, files, 176, workers,
                                                                         batch, n),
              ours=loader_rate(our_pipeline, files, 176, workers, batch, n))
    table(f"DataLoader, {workers} worker processes, batch {batch}, 176 px, {n} images", ["pipeline", "images/s",
          "per worker"], [(k, dl[k], dl[k] / workers) for k in ("standard", "ours")])
    torch.set_num_threads(threads)
    return rows, evaluation, dl


def measure_shards(files, tmp, side=320):
    """run_ec2.sh prepare's and data's work per core, on the JPEGs: packing (read, decode once, shrink the training
    images to `side` or not) and extracting a shard (sha256 and tar into a folder), files/s and MB/s of one process."""
    import shards
    rows = []
    for label, shrink in (("full size", None), (f"shrunk to a {side} px shorter side", side)):
        jobs = [(f"train/n0/{os.path.basename(f)}", ("file", f), shrink, "shorter") for f in files]
        t0 = time.perf_counter()
        packed = [shards.prepare_file(job) for job in jobs]
        pack_s = time.perf_counter() - t0
        tar_path, tree = os.path.join(tmp, f"shard-{side if shrink else 0}.tar"), os.path.join(tmp, "tree")
        entry = dict(name="shard", **shards.write_shard(tar_path, packed))
        shutil.rmtree(tree, ignore_errors=True)
        t0 = time.perf_counter()
        with open(tar_path, "rb") as f:
            shards.extract_stream(f, entry, tree)
        extract_s = time.perf_counter() - t0
        source_mb = sum(os.path.getsize(f) for f in files) / 1e6
        tar_mb = os.path.getsize(tar_path) / 1e6
        rows.append(dict(kind=label, files=len(files), pack_files_s=len(files) / pack_s, pack_mb_s=source_mb / pack_s,
                         shard_mb=tar_mb, extract_files_s=len(files) / extract_s, extract_mb_s=tar_mb / extract_s))
    table("Shards, one process: packing (read, decode once, shrink) and extracting (sha256, tar to a folder)",
          ["JPEGs", "pack files/s", "pack MB/s of source", "shard MB", "extract files/s", "extract MB/s"],
          [(r["kind"], r["pack_files_s"], r["pack_mb_s"], r["shard_mb"], r["extract_files_s"], r["extract_mb_s"])
           for r in rows])
    return rows


def measure_steps(arch, sizes, batch, steps, amp, low, compile_mode, device, amps=None, layouts=("nhwc", "nchw")):
    """Section 2: the bare training step in every precision (`amps`, default fp32 and `low`) and layout (and
    compiled: "on" adds `amp` NHWC compiled, "all" compiles every row too), images/s and peak GPU memory."""
    if amps is None:
        amps = ["fp32", low] if device.type == "cuda" or amp != "fp32" else ["fp32"]
        if len(amps) == 1:
            print(f"\n(no {low} rows: this CPU has no native {low}, which ran 11-17x slower than fp32 on one "
                  f"without it; see BENCHMARKS.md)")
    combos = [(a, layout == "nhwc", False) for a in amps for layout in layouts]
    if compile_mode == "on":
        combos.append((amp, True, True))
    elif compile_mode == "all":
        combos += [(a, cl, True) for a, cl, _ in list(combos)]
    rows = []
    for size in sizes:
        for a, cl, comp in combos:
            rate, peak = bare_loop(arch, size, batch, a, cl, comp, device, steps)
            rows.append(dict(arch=arch, px=size, amp=a, channels_last=cl, compile=comp, img_s=rate, peak_gib=peak))
            if comp:
                torch._dynamo.reset()  # a fresh compile for each model
    table(f"Training step, {arch}, synthetic batch {batch} on {device.type}, images/s",
          ["px", "amp", "layout", "compile", "images/s", "peak GiB"],
          [(r["px"], r["amp"], "NHWC" if r["channels_last"] else "NCHW", r["compile"], r["img_s"],
            "-" if r["peak_gib"] is None else r["peak_gib"]) for r in rows])
    return rows


def measure_train_py(arch, files, size, amp, batch, workers, bare, device, tmp):
    """train.py itself on the JPEGs (10 steps an epoch) against the bare eager loop at the same size."""
    root = image_folder(files, os.path.join(tmp, "folder"), math.ceil(10 * batch / len(files)))
    script = train_script(arch, size, batch, amp, device, workers, root)
    versus = dict(px=size, amp=amp, train_py=script, bare=bare, ratio=script / bare, workers=workers)
    table("train.py (real JPEGs, loader, normalization, OneCycle, logging) against the bare loop",
          ["px", "amp", "train.py images/s", "bare images/s", "ratio"],
          [(size, amp, script, bare, f"{versus['ratio']:.2f}")])
    return versus


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--project-only", action="store_true", help="print the projected cost table (README) from the "
                   "published rates and exit, measuring nothing; with --instance, that instance's row")
    p.add_argument("--instance", help=f"the EC2 instance to project for ({', '.join(INSTANCES)}); after measuring, "
                   f"with this machine's rates in place of the published ones (./run_ec2.sh bench passes its own)")
    p.add_argument("--shards-only", action="store_true", help="measure only packing and extracting shards per core "
                                                              "(run_ec2.sh prepare and data) on the JPEGs, and exit")
    p.add_argument("--steps-only", action="store_true", help="measure only the training step (--sizes, --amps, "
                   "--layouts, --compile), print its table and one JSON line, and exit")
    p.add_argument("--loader-only", action="store_true", help="measure only the loader (--loader-sizes, "
                   "--shrink-side, --workers) on the JPEGs, print its tables and one JSON line, and exit")
    p.add_argument("--kind", choices=["full", "shrunk"], help="the training JPEGs to project with: full size, or a "
                   "copy at a 320 px shorter side (train.py --shrink); default: what run_ec2.sh data stages there")
    p.add_argument("--data", default=os.environ.get("DATA_DIR"), help="a dataset root whose training JPEGs to time "
                                                                      "(100 of them); default: $DATA_DIR")
    p.add_argument("--images", default=None, help="instead: a folder of real full-size JPEGs")
    p.add_argument("--loader-sizes", nargs="+", type=int, default=[224, 176, 128], help="px")
    p.add_argument("--shrink-side", nargs="*", type=int, default=[256, 320],
                   help="shorter sides of shrunk copies to measure too, px")
    p.add_argument("--passes", type=int, default=3, help="times over the JPEGs per per-core measurement")
    p.add_argument("--workers", type=int, default=None, help="DataLoader processes; default: cores - 1")
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--sizes", nargs="+", type=int, default=None, help="training-step px; default: 128 on the "
                                                                      "CPU, 160 176 192 224 on a GPU")
    p.add_argument("--batch-size", type=int, default=None, help="default: 32 on the CPU, 256 on a GPU")
    p.add_argument("--steps", type=int, default=None, help="timed steps; default: 3 on the CPU, 30 on a GPU")
    p.add_argument("--amps", nargs="+", choices=["fp32", "bf16", "fp16"], default=None,
                   help="the step's precisions; default: fp32 and the GPU's low precision (bf16, else fp16)")
    p.add_argument("--layouts", nargs="+", choices=["nhwc", "nchw"], default=["nhwc", "nchw"],
                   help="the step's memory layouts: channels_last (nhwc) and contiguous (nchw)")
    p.add_argument("--compile", default=None, choices=["off", "on", "all"],
                   help="on: also the low-precision NHWC step compiled; all: every step compiled too; "
                        "default: off on the CPU, on on a GPU")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--preset", default="default", choices=list(PRESETS), help="recipe to project")
    p.add_argument("--hourly-usd", type=float, default=None, help="this machine's price per hour, for dollars; "
                   "default with --instance: its on-demand price")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.instance and args.instance not in INSTANCES:
        if args.project_only:
            print(f"bench.py: error: --instance {args.instance} is not in bench.py's table; pick one of "
                  f"{', '.join(INSTANCES)}", file=sys.stderr)
            sys.exit(2)
        print(f"{args.instance} is not in bench.py's table (no price, no facts): projecting for this machine")
        args.instance = None
    if args.project_only:
        names = [args.instance] if args.instance else None
        print(cost_table(names, kind=args.kind) + "\n\n" + staging_table(names)
              + ("" if names else "\n\n" + recommendation()))
        return
    try:
        device = pick_device(args.device)
        files = [] if args.steps_only else find_images(args.images, args.data)  # the step needs no JPEGs
    except (ValueError, FileNotFoundError) as e:
        print(f"bench.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    if args.shards_only:
        tmp = tempfile.mkdtemp()
        try:
            print(json.dumps(dict(shards=measure_shards(files, tmp))))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return
    gpu = device.type == "cuda"
    sizes = args.sizes or ([160, 176, 192, 224] if gpu else [128])
    batch = args.batch_size or (256 if gpu else 32)
    steps = args.steps or (30 if gpu else 3)
    workers = data.default_workers(args.workers)
    amp = autocast_for("auto", device)[0]  # what train.py would use here: bf16/fp16 on GPUs, fp32 on most CPUs
    low = "fp16" if gpu and not torch.cuda.is_bf16_supported() else "bf16"  # the low precision to set against fp32
    versions = dict(device=torch.cuda.get_device_name() if gpu else "cpu", torch=torch.__version__)
    if args.steps_only:
        rows = measure_steps(args.arch, sizes, batch, steps, amp, low, args.compile or "off", device, args.amps,
                             args.layouts)
        print(json.dumps(dict(**versions, batch=batch, steps=rows)))
        return
    preset = train_args(["--preset", args.preset])
    preset_sizes = sorted(set(epoch_sizes(preset)))
    tmp = tempfile.mkdtemp()
    if args.loader_only:
        try:
            rows, eval_core, dl = measure_loader(files, sorted(set(args.loader_sizes), reverse=True), args.shrink_side,
                                                 args.passes, workers, batch, max(20 * batch, 1000) if gpu else 640,
                                                 tmp, preset.eval_size)
            print(json.dumps(dict(**versions, cores=len(os.sched_getaffinity(0)), files=len(files), loader=rows,
                                  eval_loader_per_core=eval_core, dataloader=dl)))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return
    try:
        loader_sizes = sorted(set(args.loader_sizes) | set(preset_sizes) | set(sizes), reverse=True)
        loader_rows, eval_core, dl = measure_loader(files, loader_sizes, args.shrink_side, args.passes, workers,
                                                    batch, max(20 * batch, 1000) if gpu else 640, tmp,
                                                    preset.eval_size)
        step_rows = measure_steps(args.arch, sizes, batch, steps, amp, low, args.compile or ("on" if gpu else "off"),
                                  device)
        best = {}
        for r in step_rows:
            best[r["px"]] = max(best.get(r["px"], 0), r["img_s"])
        bare = next(r["img_s"] for r in step_rows if (r["px"], r["amp"], r["channels_last"], r["compile"]) ==
                    (sizes[0], amp, True, False))
        versus = measure_train_py(args.arch, files, sizes[0], amp, batch, workers, bare, device, tmp)
        forward_step = forward_rate(args.arch, sizes[0], batch, amp, device, steps) / bare  # eval's speed, relatively
        print(f"\nForward pass against the training step at {sizes[0]} px, {amp}: {forward_step:.2f}x the images/s")

        # 3. the projection, with what was measured here in place of the published rates
        measured = dict(gpu={s: best[s] if s in best else interpolate(best, s) for s in preset_sizes},
                        eval=forward_rate(args.arch, preset.eval_size, batch, amp, device, steps),
                        loader={r["px"]: r["ours" if args.kind != "shrunk" else "ours_shrunk_320"]
                                for r in loader_rows},
                        eval_loader=eval_core)
        if args.instance:
            inst = INSTANCES[args.instance]
        else:  # this machine: its cores as measured (no hyperthread factor), its GPUs, the price given
            inst = dict(gpus=machine_gpus(device), gpu=None, vcpus=len(os.sched_getaffinity(0)), vcpu=1.0,
                        ram_gib=os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30,
                        net_gbps=10, on_demand=args.hourly_usd or 0.0, spot=None)
        if args.hourly_usd:
            inst = {**inst, "on_demand": args.hourly_usd}
        proj = project(inst, preset, args.kind or "full", measured)
        where = args.instance or f"this machine ({inst['gpus']} x {device.type}, {inst['vcpus']} cores)"
        print(f"\nProjection, not a measurement: --preset {preset.preset} ({preset.epochs} epochs) on ImageNet-1k on "
              f"{where}, from the rates measured here ({', '.join(proj['measured'])}; prices, disk and the time to "
              f"the first step from bench.py's table): {proj['hours']:.2f} h"
              + (f", ${proj['usd']:.2f} at ${inst['on_demand']}/h" if inst["on_demand"] else
                 " (pass --hourly-usd for dollars)") + f"; bound by the {proj['bottleneck']}")
        speed176 = next((r["speedup"] for r in loader_rows if r["px"] == 176), None)
        print(json.dumps(dict(**versions, cores=inst["vcpus"], gpus=inst["gpus"], loader_speedup_176=speed176,
                              loader=loader_rows, eval_loader_per_core=eval_core, dataloader=dl, steps=step_rows,
                              train_vs_bare=versus, forward_per_step=forward_step, eval_img_s=measured["eval"],
                              projection=proj)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def machine_gpus(device):
    """The GPUs of this machine: the projection is for the whole machine, since --hourly-usd buys all of them."""
    return torch.cuda.device_count() if device.type == "cuda" else 1


def interpolate(rates, size):
    """A step rate at an unmeasured size: the nearest measured one, scaled by pixels (cost ~ H x W)."""
    near = min(rates, key=lambda s: abs(s - size))
    return rates[near] * (near / size) ** 2


if __name__ == "__main__":
    main()
