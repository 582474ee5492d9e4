"""
Exact evaluation of a checkpoint: top-1 and top-5 over every validation image, each counted once, on one
device or under torchrun; a predictions CSV, a per-class report with the top confusions, a confusion matrix.

    python evaluate.py                                            # the newest runs/*/best.pt, as the run evaluated
    python evaluate.py --checkpoint runs/imagenet-resnet50/best.pt --data /mnt/imagenet --img-size 224 --tta none
    torchrun --nproc_per_node=4 evaluate.py --data /mnt/imagenet --ema
    python evaluate.py --checkpoint resnet50.pth --arch resnet50 --data /mnt/imagenet   # a torchvision state_dict

By default it evaluates the way the run did: at the checkpoint's eval size and with its flip TTA, so a bare
`python evaluate.py` agrees with the training log. --img-size above the training size evaluates at a higher
resolution ("FixRes", Touvron et al. 2019: train low, test high). Writes to --out (default: eval/ beside the
checkpoint): predictions.csv (and predictions.json, what it was made from), per_class.csv (top-1, top-5,
precision, recall, F1), confusions.csv and confusion.png, then prints one JSON line with top1, top5, the macro
and weighted precision/recall/F1, n, img/s and the settings.
"""
import argparse
import csv
import json
import math
import os
import sys
import time

import torch
import torch.distributed as dist

import data
from model import TTA, load_checkpoint, newest_checkpoint
from runtime import autocast_for, close_distributed, init_distributed, to_device


def add_common_args(p):
    """The flags evaluate.py and gradcam.py share."""
    p.add_argument("--checkpoint", help="train.py checkpoint or a torchvision state_dict (then give --arch); "
                                        "default: the newest runs/*/best.pt")
    p.add_argument("--arch", default=None, help="network of a bare state_dict; read from our checkpoints")
    p.add_argument("--data", default=None, help="dataset root; default: the checkpoint's --data, else Imagenette")
    p.add_argument("--img-size", type=int, default=None, help="eval crop, px; default: the run's --eval-size")
    p.add_argument("--resize-size", type=int, default=None, help="resize before the crop, px; default size/0.875")
    p.add_argument("--tta", default=None, choices=TTA, help="flip: average with the mirror image; "
                                                                          "default: as the run evaluated")
    p.add_argument("--ema", action="store_true", help="use the checkpoint's EMA weights")
    p.add_argument("--batch-size", type=int, default=100, help="images per step per process")
    p.add_argument("--workers", type=int, default=None, help="loader processes; default: cores - 1")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu", "mps"])
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "fp32"], help="autocast dtype")
    p.add_argument("--out", default=None, help="output folder; default: eval/ beside the checkpoint")
    return p


def pick_checkpoint(args):
    """--checkpoint, or the newest runs/*/best.pt, said so; the path goes into args for the reports."""
    if args.checkpoint is None:
        args.checkpoint = newest_checkpoint()
        if args.checkpoint is None:
            raise FileNotFoundError("no --checkpoint given and no runs/*/best.pt here: train one with train.py, or "
                                    "pass --checkpoint PATH")
        print(f"no --checkpoint: the newest run's, {args.checkpoint}", flush=True)
    return args.checkpoint


def load_model(args, device, with_data=True):
    """(model on device, checkpoint info, data root, settings): the settings say how to evaluate, the given flags
    over the way the run evaluated, and what predictions.csv is made from (gradcam.py compares them). with_data
    False (one image of the user's): the default data is named, never downloaded."""
    model, meta = load_checkpoint(pick_checkpoint(args), arch=args.arch, ema=args.ema)
    root = str(args.data or meta["args"].get("data") or (data.default_data() if with_data else data.default_root()))
    if with_data:
        print(f"data {root}", flush=True)
    img_size = args.img_size or meta["eval_size"]
    path = os.path.abspath(args.checkpoint)
    settings = dict(checkpoint=path, checkpoint_mtime_ns=os.stat(path).st_mtime_ns, data=os.path.abspath(root),
                    img_size=img_size, resize_size=args.resize_size or round(img_size / data.EVAL_CROP_RATIO),
                    tta=args.tta or meta["tta"], ema=args.ema)
    return model.to(device).eval(), meta, root, settings


# -----------------------------------------------------------------------------
# the one evaluation loop, and what train.py's log and this script's reports make of it

@torch.no_grad()
def log_probabilities(model, loader, device, ctx, tta="none", channels_last=True):
    """For each batch of the loader: (log-probabilities (B, C), float32, and labels (B,)), on the device.

    tta (model.TTA, the one spelling of every script and checkpoint; a new mode is one more branch here): "flip",
    the log of the mean of the probabilities of each image and its mirror image (FFCV's lr_tta), taken with
    logaddexp so that a confident class cannot round to log(0). train.py's log (accuracy) and this script's reports
    (predict) both read their top-1, top-5 and loss off these, so they agree by construction."""
    model.eval()
    for images, labels, _ in loader:
        x, y = to_device(images, labels, device, channels_last)
        with ctx:
            logits = model(x)
            mirrored = model(x.flip(3)) if tta == "flip" else None
        logp = logits.float().log_softmax(1)
        if tta == "flip":
            logp = torch.logaddexp(logp, mirrored.float().log_softmax(1)) - math.log(2)
        yield logp, y


def hits(top_i, labels):
    """(top-1 hits, top-5 hits), one bool per image, from each image's top-5 class indices (B, 5)."""
    match = top_i == labels[:, None]
    return match[:, 0], match.any(1)


def accuracy(model, loader, device, ctx, tta="none", channels_last=True):
    """Exact top-1/top-5 and the loss over the whole val set (train.py's log): every rank runs its shard (the
    indices rank, rank + world, ...: each image once) and the counts are all-reduced."""
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top-1 hits, top-5 hits, images
    for logp, y in log_probabilities(model, loader, device, ctx, tta, channels_last):
        top1, top5 = hits(logp.topk(min(5, logp.shape[1]), dim=1).indices, y)
        loss = -logp.gather(1, y[:, None]).sum()  # the NLL of the prediction, the averaged one with tta
        totals += torch.stack([loss.double(), top1.sum().double(), top5.sum().double(),
                               torch.tensor(len(y), dtype=torch.float64, device=device)])
    if dist.is_initialized():
        dist.all_reduce(totals)
    loss, top1, top5, n = totals.tolist()
    return dict(val_loss=loss / n, val_top1=100 * top1 / n, val_top5=100 * top5 / n, val_n=int(n))


def predict(model, loader, device, ctx, tta="none"):
    """Top-5 (class indices, probabilities) and labels for the loader's images, in its order, with progress."""
    top_i, top_p, labels = [], [], []
    t0, done, total, correct = time.time(), 0, len(loader.sampler), 0
    for step, (logp, y) in enumerate(log_probabilities(model, loader, device, ctx, tta)):
        p, i = logp.topk(min(5, logp.shape[1]), dim=1)
        top_i.append(i.cpu()), top_p.append(p.exp().cpu()), labels.append(y.cpu())
        done, correct = done + len(y), correct + hits(top_i[-1], labels[-1])[0].sum().item()
        if (step + 1) % 20 == 0 and (not dist.is_initialized() or dist.get_rank() == 0):
            ips = done / (time.time() - t0)
            print(f"{done}/{total} images on this rank, {ips:.0f} img/s, ETA {(total - done) / ips:.0f}s, "
                  f"top-1 so far {100 * correct / done:.2f}%", flush=True)
    return torch.cat(top_i), torch.cat(top_p), torch.cat(labels)


def evaluate_all(model, val_set, args, tta, device, rank=0, world=1):
    """Every rank predicts its shard (indices rank, rank + world, ...); rank 0 gets all rows in dataset order."""
    _, ctx, _ = autocast_for(args.amp, device)
    workers = data.default_workers(args.workers)
    loader = data.make_loader(val_set, args.batch_size, False, rank, world, workers=workers,
                              pin_memory=device.type == "cuda")
    t0 = time.time()
    top_i, top_p, labels = predict(model, loader, device, ctx, tta)
    index = torch.arange(rank, len(val_set), world)
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, (index, top_i, top_p, labels))
        index, top_i, top_p, labels = (torch.cat(t) for t in zip(*parts))
    order = index.argsort()
    assert torch.equal(index[order], torch.arange(len(val_set))), "every image must be counted exactly once"
    return top_i[order], top_p[order], labels[order], time.time() - t0


def write_reports(out, samples, names, top_i, top_p, labels, settings):
    """predictions.csv (+ predictions.json: the settings it was made with), per_class.csv, confusions.csv and
    confusion.png; returns (the confusion pairs, the macro and weighted precision/recall/F1)."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "predictions.json"), "w") as f:
        json.dump(settings, f)
    with open(os.path.join(out, "predictions.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "true", "true_name", "pred", "pred_name", "confidence", "correct", "top5", "top5_prob"])
        for (path, _), i, p, y in zip(samples, top_i.tolist(), top_p.tolist(), labels.tolist()):
            w.writerow([path, y, names[y], i[0], names[i[0]], f"{p[0]:.6f}", int(i[0] == y),
                        " ".join(map(str, i)), " ".join(f"{v:.6f}" for v in p)])
    k = len(names)
    confusion = torch.zeros(k, k, dtype=torch.long)  # rows: true class, columns: predicted
    confusion.index_put_((labels, top_i[:, 0]), torch.ones(len(labels), dtype=torch.long), accumulate=True)
    top5_hits = hits(top_i, labels)[1]
    # the classification report: precision = hits / predicted as c, recall = hits / truly c (= top-1 of the class),
    # F1 their harmonic mean; 0 where a denominator is 0 (scikit-learn's zero_division=0)
    right, support, predicted = confusion.diag().double(), confusion.sum(1).double(), confusion.sum(0).double()
    precision, recall = right / predicted.clamp(min=1), right / support.clamp(min=1)
    f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
    with open(os.path.join(out, "per_class.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["class", "name", "n", "top1", "top5", "precision", "recall", "f1"])
        for c in range(k):
            n = int(support[c])
            top5 = top5_hits[labels == c].float().mean().item() if n else float("nan")
            w.writerow([c, names[c], n, f"{100 * recall[c].item():.2f}", f"{100 * top5:.2f}",
                        f"{precision[c].item():.6f}", f"{recall[c].item():.6f}", f"{f1[c].item():.6f}"])
    weights = support / support.sum()
    report = {f"{avg}_{name}": (v.mean() if avg == "macro" else (v * weights).sum()).item()
              for avg in ("macro", "weighted") for name, v in (("precision", precision), ("recall", recall),
                                                                ("f1", f1))}
    off = confusion.clone().fill_diagonal_(0)
    pairs = [(t, p, off[t, p].item()) for t, p in zip(*torch.nonzero(off, as_tuple=True))]
    pairs = sorted(pairs, key=lambda x: -x[2])
    with open(os.path.join(out, "confusions.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["true", "true_name", "pred", "pred_name", "count"])
        w.writerows([int(t), names[t], int(p), names[p], n] for t, p, n in pairs)
    if k <= 100:
        plot_confusion(confusion, names, os.path.join(out, "confusion.png"))
    return pairs, report


def plot_confusion(confusion, names, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    k = len(names)
    rates = confusion.float() / confusion.sum(1, keepdim=True).clamp(min=1)
    size = max(6, min(20, 0.22 * k + 4))
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    im = ax.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    if k <= 40:
        labels = [n[:18] for n in names]
        ax.set_xticks(range(k), labels, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(k), labels, fontsize=8)
        for t in range(k):
            for p in range(k):
                if confusion[t, p] > 0:
                    ax.text(p, t, int(confusion[t, p]), ha="center", va="center", fontsize=7,
                            color="white" if rates[t, p] > 0.5 else "black")
    ax.set(xlabel="predicted", ylabel="true", title=f"confusion matrix ({int(confusion.sum())} images)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv=None):
    p = add_common_args(argparse.ArgumentParser(description=__doc__,
                                                formatter_class=argparse.RawDescriptionHelpFormatter))
    args = p.parse_args(argv)
    for name in ("img_size", "resize_size", "batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    return args


def run(args):
    ddp, rank, world, device = init_distributed(args.device)
    model, meta, root, settings = load_model(args, device)
    model, img_size = model.to(memory_format=torch.channels_last), settings["img_size"]
    _, val_set, info = data.build_datasets(root, img_size, eval_size=img_size, resize_size=args.resize_size)
    if meta["classes"] and meta["classes"] != info["classes"]:
        raise ValueError(f"{args.checkpoint} was trained on other classes than {root} holds; pass the --data it "
                         f"was trained on")
    if model.fc.out_features != len(info["classes"]):
        raise ValueError(f"{args.checkpoint} predicts {model.fc.out_features} classes but {root} has "
                         f"{len(info['classes'])}; pass a matching --data")
    names = meta["names"]
    top_i, top_p, labels, seconds = evaluate_all(model, val_set, args, settings["tta"], device, rank, world)
    if rank == 0:
        out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "eval")
        pairs, report = write_reports(out, val_set.samples, names, top_i, top_p, labels, settings)
        n, (top1, top5) = len(labels), hits(top_i, labels)
        result = dict(top1=100 * top1.sum().item() / n, top5=100 * top5.sum().item() / n, **report, n=n,
                      img_per_s=n / seconds, checkpoint=args.checkpoint, arch=meta["arch"], data=str(root),
                      img_size=img_size, resize_size=settings["resize_size"], tta=settings["tta"], ema=args.ema,
                      world=world, out=out)
        print("top confusions: " + ", ".join(f"{names[t]} -> {names[p]} ({c})" for t, p, c in pairs[:5]))
        print(f"top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  on {n} images, {result['img_per_s']:.0f} "
              f"img/s; reports in {out}")
        print(json.dumps(result), flush=True)
    close_distributed()


def main(argv=None):
    args = parse_args(argv)
    try:
        run(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"evaluate.py: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
