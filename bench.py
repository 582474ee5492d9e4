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
    """img/s of forward + loss + backward + SGD on one synthetic batch that never leaves the device."""
    torch.manual_seed(0)
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
    return batch * steps / (time.perf_counter() - t0)


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
# 3. the projection

def project(step_rate, per_core, eval_rate, args, gpus, cores, hourly_usd):
    """Hours and dollars of a run of `args` (train.py's flags). step_rate / per_core: {size: img/s} of one GPU /
    one core; eval_rate: forward img/s at the eval size."""
    epochs, seconds, bound = [], 0.0, {}
    for size in epoch_sizes(args):
        gpu, loader = gpus * step_rate[size], (cores - gpus) * per_core[size]  # a core per GPU runs its process
        rate = min(gpu, loader)
        bound[size] = "training step" if gpu <= loader else "loader (CPU cores)"
        epoch_s = IMAGENET_TRAIN / rate + IMAGENET_VAL * (2 if args.tta else 1) / (gpus * eval_rate)
        epochs.append(epoch_s)
        seconds += epoch_s
    hours = seconds / 3600
    return dict(preset=args.preset, epochs=len(epochs), gpus=gpus, cores=cores, first_epoch_min=epochs[0] / 60,
                last_epoch_min=epochs[-1] / 60, hours=hours, hourly_usd=hourly_usd,
                usd=None if hourly_usd is None else hours * hourly_usd, bottleneck=bound)


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


def measure_loader(files, sizes, shrink_sides, passes, workers, batch, n, tmp):
    """Section 1: per-core images/s of the standard pipeline, ours, and ours on shrunk copies; then both in a
    DataLoader of `workers` processes at 176 px. Returns (rows per size, DataLoader row)."""
    small = {side: [os.path.join(tmp, str(side), os.path.basename(f)) for f in files] for side in shrink_sides}
    for side, copies in small.items():
        for src, dst in zip(files, copies):
            data.shrink_image((src, dst, side))
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
    dl = dict(px=176, workers=workers, batch=batch, standard=loader_rate(standard_pipeline, files, 176, workers,
                                                                         batch, n),
              ours=loader_rate(our_pipeline, files, 176, workers, batch, n))
    table(f"DataLoader, {workers} worker processes, batch {batch}, 176 px, {n} images", ["pipeline", "images/s",
          "per worker"], [(k, dl[k], dl[k] / workers) for k in ("standard", "ours")])
    torch.set_num_threads(threads)
    return rows, dl


def measure_steps(arch, sizes, batch, steps, amp, low, compile_mode, device):
    """Section 2: the bare training step in every precision and layout (and compiled), images/s."""
    amps = ["fp32", low] if device.type == "cuda" or amp != "fp32" else ["fp32"]
    if len(amps) == 1:
        print(f"\n(no {low} rows: this CPU has no native {low}, which ran 11-17x slower than fp32 on one "
              f"without it; see BENCHMARKS.md)")
    combos = [(a, cl, False) for a in amps for cl in (True, False)]
    if compile_mode == "on":
        combos.append((amp, True, True))
    elif compile_mode == "all":
        combos += [(a, cl, True) for a, cl, _ in list(combos)]
    rows = []
    for size in sizes:
        for a, cl, comp in combos:
            rate = bare_loop(arch, size, batch, a, cl, comp, device, steps)
            rows.append(dict(arch=arch, px=size, amp=a, channels_last=cl, compile=comp, img_s=rate))
            if comp:
                torch._dynamo.reset()  # a fresh compile for each model
    table(f"Training step, {arch}, synthetic batch {batch} on {device.type}, images/s",
          ["px", "amp", "layout", "compile", "images/s"],
          [(r["px"], r["amp"], "NHWC" if r["channels_last"] else "NCHW", r["compile"], r["img_s"]) for r in rows])
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


def report_projection(proj, step_rate, per_core, eval_rate, eval_size, preset_sizes, device, hourly_usd):
    gpu_rates = ", ".join(f"{s} px {step_rate[s]:.0f}" for s in preset_sizes)
    core_rates = ", ".join(f"{s} px {per_core[s]:.0f}" for s in preset_sizes)
    dollars = f", ${proj['usd']:.2f} at ${hourly_usd}/h" if proj["usd"] is not None else \
        " (pass --hourly-usd for dollars)"
    print(f"\nProjection, not a measurement: --preset {proj['preset']} on ImageNet-1k, {proj['epochs']} epochs on "
          f"{proj['gpus']} x {device.type} at the measured step rates ({gpu_rates} img/s) and a loader of "
          f"{proj['cores'] - proj['gpus']} cores x ({core_rates} img/s per core), eval {eval_rate:.0f} img/s at "
          f"{eval_size} px: epochs of {proj['first_epoch_min']:.1f} to {proj['last_epoch_min']:.1f} min, "
          f"{proj['hours']:.2f} h{dollars}; bottleneck: "
          + ", ".join(f"{s} px {b}" for s, b in proj["bottleneck"].items()))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
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
    p.add_argument("--compile", default=None, choices=["off", "on", "all"],
                   help="on: also the low-precision NHWC step compiled; all: every step compiled too; "
                        "default: off on the CPU, on on a GPU")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--preset", default="default", choices=list(PRESETS), help="recipe to project")
    p.add_argument("--gpus", type=int, default=None, help="GPUs to project for (step rate x GPUs); default: the "
                                                          "GPUs this machine has")
    p.add_argument("--cores", type=int, default=None, help="CPU cores to project for; default: this machine's")
    p.add_argument("--hourly-usd", type=float, default=None, help="price of the whole machine per hour, for dollars")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        files = find_images(args.images, args.data)
        device = pick_device(args.device)
    except (ValueError, FileNotFoundError) as e:
        print(f"bench.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    gpu = device.type == "cuda"
    sizes = args.sizes or ([160, 176, 192, 224] if gpu else [128])
    batch = args.batch_size or (256 if gpu else 32)
    steps = args.steps or (30 if gpu else 3)
    workers = data.default_workers(args.workers)
    cores = args.cores or len(os.sched_getaffinity(0))
    gpus = args.gpus or machine_gpus(device)
    amp = autocast_for("auto", device)[0]  # what train.py would use here: bf16/fp16 on GPUs, fp32 on most CPUs
    low = "fp16" if gpu and not torch.cuda.is_bf16_supported() else "bf16"  # the low precision to set against fp32
    preset = train_args(["--preset", args.preset])
    preset_sizes = sorted(set(epoch_sizes(preset)))
    tmp = tempfile.mkdtemp()
    try:
        loader_sizes = sorted(set(args.loader_sizes) | set(preset_sizes) | set(sizes), reverse=True)
        loader_rows, dl = measure_loader(files, loader_sizes, args.shrink_side, args.passes, workers, batch,
                                         max(20 * batch, 1000) if gpu else 640, tmp)
        per_core = {r["px"]: r["ours"] for r in loader_rows}
        step_rows = measure_steps(args.arch, sizes, batch, steps, amp, low, args.compile or ("on" if gpu else "off"),
                                  device)
        best = {}
        for r in step_rows:
            best[r["px"]] = max(best.get(r["px"], 0), r["img_s"])
        bare = next(r["img_s"] for r in step_rows if (r["px"], r["amp"], r["channels_last"], r["compile"]) ==
                    (sizes[0], amp, True, False))
        versus = measure_train_py(args.arch, files, sizes[0], amp, batch, workers, bare, device, tmp)

        # 3. the projection
        eval_rate = forward_rate(args.arch, preset.eval_size, batch, amp, device, steps)
        step_rate = {s: best[s] if s in best else interpolate(best, s) for s in preset_sizes}
        proj = project(step_rate, per_core, eval_rate, preset, gpus, cores, args.hourly_usd)
        report_projection(proj, step_rate, per_core, eval_rate, preset.eval_size, preset_sizes, device,
                          args.hourly_usd)
        speed176 = next((r["speedup"] for r in loader_rows if r["px"] == 176), None)
        print(json.dumps(dict(device=torch.cuda.get_device_name() if gpu else "cpu", torch=torch.__version__,
                              cores=cores, gpus=gpus, loader_speedup_176=speed176, loader=loader_rows, dataloader=dl,
                              steps=step_rows, train_vs_bare=versus, eval_img_s=eval_rate, projection=proj)))
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
