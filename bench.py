"""
What train.py's own machinery costs: its measured training img/s against a bare forward/backward/SGD loop on
the same model, batch, dtype and memory layout, side by side in one run. Prints a table and a final JSON line.

    python bench.py                                  # CPU: ResNet-18/50 at 64/128/224 px, fp32/bf16, NCHW/NHWC
    python bench.py --archs resnet50 --sizes 224 --device cuda --batch-size 256

train.py runs as a real subprocess on real JPEGs (symlinks to enough of --data for --steps steps an epoch, and
2 val images a class) for two epochs; its second epoch's img/s is compared, so process start, warm-up and
evaluation are not counted.
The bare loop feeds one synthetic batch that never leaves the device: no loader, no normalization, no mixing,
no logging. The ratio train.py / bare is what the data pipeline and the script's bookkeeping cost.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn as nn

from data import find_splits, scan_folder
from model import build_model
from train import autocast_for, pick_device

HERE = os.path.dirname(os.path.abspath(__file__))


def bare_loop(arch, size, batch, amp, channels_last, device, steps):
    """img/s of forward + loss + backward + SGD step on a fixed synthetic batch, after one warm-up step."""
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = build_model(arch, num_classes=10).to(device, memory_format=fmt).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    _, ctx, scaler = autocast_for(amp, device)
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (batch,), device=device)
    loss_fn = nn.CrossEntropyLoss()

    def step():
        with ctx:
            loss = loss_fn(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - t0)


def link_subset(src, dst, per_class):
    """A small ImageFolder of symlinks to real JPEGs: `per_class` train and 2 val images per class, so that
    train.py's epochs are a few steps and its evaluation is short."""
    from data import find_splits, scan_folder
    train_dir, _, _, _ = find_splits(src)
    classes, samples = scan_folder(train_dir)
    for label, name in enumerate(classes):
        files = [path for path, lab in samples if lab == label]
        for split, chosen in (("train", files[:per_class]), ("val", files[-2:])):
            os.makedirs(os.path.join(dst, split, name), exist_ok=True)
            for f in chosen:
                os.symlink(os.path.abspath(f), os.path.join(dst, split, name, os.path.basename(f)))
    return len(classes)


def train_script(arch, size, batch, amp, channels_last, device, data_root):
    """img/s of train.py's second epoch on `data_root`."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, os.path.join(HERE, "train.py"), "--data", data_root, "--arch", arch,
               "--img-size", str(size), "--batch-size", str(batch), "--amp", amp, "--epochs", "2",
               "--device", device.type, "--out", out, "--log-every", "1000",
               "--channels-last" if channels_last else "--no-channels-last"]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        with open(os.path.join(out, "log.jsonl")) as f:
            return [json.loads(line) for line in f][-1]["img_per_s"]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=os.path.join(HERE, "..", "shared", "data", "imagenette-224"),
                   help="dataset root for train.py's runs")
    p.add_argument("--archs", nargs="+", default=["resnet18", "resnet50"])
    p.add_argument("--sizes", nargs="+", type=int, default=[64, 128, 224], help="px")
    p.add_argument("--amps", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16", "fp16"])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=4, help="timed steps per measurement")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu", "mps"])
    p.add_argument("--max-bf16-gflop", type=float, default=60,
                   help="skip low-precision rows above this many GFLOP per step on the CPU (no bf16 hardware: slow)")
    args = p.parse_args()
    device = pick_device(args.device)
    tmp = tempfile.TemporaryDirectory()
    n_classes = len(scan_folder(find_splits(args.data)[0])[0])
    per_class = -(-args.steps * args.batch_size // n_classes)  # enough for --steps full steps an epoch
    link_subset(args.data, tmp.name, per_class)
    gflop = {"resnet18": 1.82, "resnet34": 3.67, "resnet50": 4.11, "resnet101": 7.83, "resnet152": 11.56}

    print(f"{'arch':10} {'px':>4} {'amp':5} {'layout':6} {'bare img/s':>10} {'train.py img/s':>14} {'ratio':>6}")
    rows = []
    for arch in args.archs:
        for size in args.sizes:
            for amp in args.amps:
                for cl in ([True, False] if amp == "fp32" else [True]):
                    step_gflop = 3 * gflop.get(arch, 4.11) * (size / 224) ** 2 * args.batch_size
                    if amp != "fp32" and device.type == "cpu" and step_gflop > args.max_bf16_gflop:
                        continue
                    bare = bare_loop(arch, size, args.batch_size, amp, cl, device, args.steps)
                    script = train_script(arch, size, args.batch_size, amp, cl, device, tmp.name)
                    row = dict(arch=arch, px=size, amp=amp, channels_last=cl, bare=bare, train=script,
                               ratio=script / bare)
                    rows.append(row)
                    print(f"{arch:10} {size:>4} {amp:5} {'NHWC' if cl else 'NCHW':6} {bare:>10.1f} {script:>14.1f} "
                          f"{script / bare:>6.2f}", flush=True)
    print(json.dumps(dict(device=str(device), batch_size=args.batch_size, threads=torch.get_num_threads(),
                          rows=rows)))


if __name__ == "__main__":
    main()
