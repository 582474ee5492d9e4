"""
Grad-CAM (Selvaraju et al. 2017) in plain PyTorch: where the network looked when it chose a class. The gradients
of a class logit, averaged over space, weight the activations of the last convolutional stage; ReLU, upsample,
normalize to [0, 1].

    python gradcam.py --worst 32          # the 32 most confident mistakes of the newest runs/*/best.pt
    python gradcam.py --best 16           # the 16 most confident correct predictions, for contrast
    python gradcam.py --image photo.jpg [--class 207]

--worst and --best read OUT/predictions.csv from evaluate.py when it was made from the same checkpoint, data, eval
size, TTA and EMA choice (its predictions.json says), and otherwise run the evaluation again, saying why. They
write to --out (default: eval/ beside the checkpoint): worst_gradcam.png (image | map of the predicted class |
map of the true class), worst_plain.png, worst.csv and worst.html, which shows every case. --image writes
image_gradcam.png and prints the top-5.
"""
import argparse
import csv
import html
import json
import math
import os
import sys
import textwrap

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import data
import evaluate
from model import normalize
from runtime import pick_device


def gradcam(model, x, classes, layer=None):
    """Grad-CAM maps (B, h, w) in [0, 1] at the layer's resolution, and the logits (B, C).

    x: (B, 3, H, W) normalized input; classes: (B,) the class whose logit each map explains, or None for each
    image's top class (one forward pass serves both the prediction and its map); layer: default the last stage
    (layer4, 7x7 at 224 px). The model must be in eval mode, so the samples of a batch do not interact.
    """
    layer = layer if layer is not None else model.layer4
    store = {}

    def keep_grad(grad):
        store["grad"] = grad                                           # (B, K, h, w)

    def keep(module, inputs, output):
        store["act"] = output                                          # (B, K, h, w)
        output.register_hook(keep_grad)

    handle = layer.register_forward_hook(keep)
    try:
        with torch.enable_grad():
            logits = model(x)
            classes = logits.argmax(1) if classes is None else classes
            model.zero_grad(set_to_none=True)
            logits.gather(1, classes[:, None]).sum().backward()
    finally:
        handle.remove()
    weights = store["grad"].mean((2, 3), keepdim=True)                  # (B, K, 1, 1): spatial mean of gradients
    cam = F.relu((weights * store["act"]).sum(1))                       # (B, h, w)
    cam = cam - cam.amin((1, 2), keepdim=True)
    cam = cam / (cam.amax((1, 2), keepdim=True) + 1e-7)
    return cam.detach(), logits.detach()


def upsample(cam, size):
    """(B, h, w) -> (B, H, W), bilinear."""
    return F.interpolate(cam[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def overlay(image, cam, alpha=0.45):
    """uint8 (H, W, 3) image and a [0, 1] map of the same size -> uint8 (H, W, 3) with the map in 'jet'."""
    import matplotlib
    heat = matplotlib.colormaps["jet"](cam)[..., :3] * 255
    return (image * (1 - alpha) + heat * alpha).astype(np.uint8)


def explain(model, images, classes_a, classes_b, device):
    """For uint8 (B, 3, H, W) images: (numpy images, overlays for classes_a, overlays for classes_b)."""
    x = normalize(images.to(device))
    size = images.shape[-2:]
    cam_a = upsample(gradcam(model, x, torch.as_tensor(classes_a, device=device))[0], size).cpu().numpy()
    cam_b = upsample(gradcam(model, x, torch.as_tensor(classes_b, device=device))[0], size).cpu().numpy()
    imgs = images.permute(0, 2, 3, 1).numpy()
    return imgs, [overlay(i, c) for i, c in zip(imgs, cam_a)], [overlay(i, c) for i, c in zip(imgs, cam_b)]


# -----------------------------------------------------------------------------
# which cases

def read_predictions(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def stale(out, settings):
    """Why OUT/predictions.csv cannot stand for an evaluation with `settings`, or None when it can."""
    path = os.path.join(out, "predictions.json")
    if not os.path.exists(os.path.join(out, "predictions.csv")) or not os.path.exists(path):
        return f"there is no {os.path.join(out, 'predictions.csv')} with its predictions.json"
    with open(path) as f:
        made = json.load(f)
    differ = [k for k in settings if made.get(k) != settings[k]]
    return None if not differ else "predictions.csv was made with another " + ", ".join(
        f"{k} ({made.get(k)}, now {settings[k]})" for k in differ)


def predictions(args, model, meta, root, settings, device, out):
    """The rows of OUT/predictions.csv when they were made with these settings, else of a fresh evaluation."""
    path = os.path.join(out, "predictions.csv")
    why = stale(out, settings)
    if why is None:
        print(f"reading {path}", flush=True)
        return read_predictions(path)
    print(f"{why}: evaluating {args.checkpoint} first", flush=True)
    img_size = settings["img_size"]
    _, val_set, _ = data.build_datasets(root, img_size, eval_size=img_size, resize_size=args.resize_size)
    top_i, top_p, labels, _ = evaluate.evaluate_all(model, val_set, args, settings["tta"], device)
    evaluate.write_reports(out, val_set.samples, meta["names"], top_i, top_p, labels, settings)
    return read_predictions(path)


def select(rows, n, wrong):
    """The n most confident wrong (or right) predictions, most confident first; ties keep dataset order."""
    chosen = [r for r in rows if r["correct"] == ("0" if wrong else "1")]
    return sorted(chosen, key=lambda r: -float(r["confidence"]))[:n]


# -----------------------------------------------------------------------------
# rendering

def caption(row, width=26):
    text = f"true: {row['true_name']} / predicted: {row['pred_name']} (p={float(row['confidence']):.2f})"
    return "\n".join(textwrap.wrap(text, width))


def render(rows, imgs, over_pred, over_true, out, stem, wrong):
    """Everything --worst/--best write: the grid with maps, the grid without, a strip per case, a CSV, a page."""
    draw_grid(rows, imgs, over_pred, over_true, os.path.join(out, f"{stem}_gradcam.png"), wrong)
    draw_plain(rows, imgs, os.path.join(out, f"{stem}_plain.png"), wrong)
    write_cases(rows, imgs, over_pred, over_true, out, stem, wrong)


def draw_grid(rows, imgs, over_pred, over_true, path, wrong):
    """Each case as image | map of the predicted class | map of the true class (the first two for --best)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cols = 4                                            # cases per grid row: about 1900 px wide at dpi 100
    grid_rows = math.ceil(len(rows) / cols)
    panels = ("image", "predicted class", "true class") if wrong else ("image", "predicted (= true) class", None)
    per = 3 if wrong else 2
    fig, axes = plt.subplots(grid_rows, cols * per, figsize=(cols * per * 1.6, grid_rows * 2.3 + 0.8), squeeze=False)
    fig.subplots_adjust(left=0.01, right=0.99, top=1 - 0.9 / (grid_rows * 2.3 + 0.8), wspace=0.06, hspace=0.75)
    for ax in axes.flat:
        ax.axis("off")
    for k, row in enumerate(rows):
        r, c = divmod(k, cols)
        cells = (imgs[k], over_pred[k], over_true[k])[:per]
        for j, (img, label) in enumerate(zip(cells, panels)):
            ax = axes[r, c * per + j]
            ax.imshow(img)
            ax.set_title(label, fontsize=7, color="0.35", pad=2)
        axes[r, c * per].text(0, 1.18, caption(row, 14 * per), transform=axes[r, c * per].transAxes, fontsize=8,
                              va="bottom", ha="left", color="darkred" if wrong else "darkgreen")
    sm = matplotlib.cm.ScalarMappable(cmap="jet", norm=matplotlib.colors.Normalize(0, 1))
    cbar = fig.colorbar(sm, ax=axes, orientation="horizontal", fraction=0.02, pad=0.02, aspect=60)
    cbar.set_label("Grad-CAM: how much each region raised that class's score (0 = not at all, 1 = most)")
    fig.suptitle(f"{len(rows)} most confident {'mistakes' if wrong else 'correct predictions'}", fontsize=13)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def draw_plain(rows, imgs, path, wrong):
    """The same cases without maps, captions only."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cols = 8
    fig, axes = plt.subplots(math.ceil(len(rows) / cols), cols, figsize=(cols * 2.2, math.ceil(len(rows) / cols) * 2.8),
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for k, row in enumerate(rows):
        ax = axes.flat[k]
        ax.imshow(imgs[k])
        ax.set_title(caption(row, 28), fontsize=8, color="darkred" if wrong else "darkgreen")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_cases(rows, imgs, over_pred, over_true, out, stem, wrong):
    """One strip per case in OUT/<stem>_cases/, <stem>.csv, and <stem>.html that shows them all."""
    os.makedirs(os.path.join(out, f"{stem}_cases"), exist_ok=True)
    for k in range(len(rows)):
        strip = np.concatenate([imgs[k], over_pred[k]] + ([over_true[k]] if wrong else []), axis=1)
        Image.fromarray(strip).save(os.path.join(out, f"{stem}_cases", f"{k:03d}.png"))
    fields = ["rank", "path", "true", "true_name", "pred", "pred_name", "confidence", "top5", "top5_prob"]
    with open(os.path.join(out, f"{stem}.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows({**row, "rank": k + 1} for k, row in enumerate(rows))
    head = "image | predicted class | true class" if wrong else "image | predicted class"
    items = "\n".join(
        f'<figure><img src="{stem}_cases/{k:03d}.png" alt="case {k + 1}"><figcaption><b>{k + 1}.</b> '
        f'true: {html.escape(r["true_name"])} / predicted: {html.escape(r["pred_name"])} '
        f'(p={float(r["confidence"]):.2f})<br><small>{html.escape(r["path"])}</small></figcaption></figure>'
        for k, r in enumerate(rows))
    with open(os.path.join(out, f"{stem}.html"), "w") as f:
        f.write(f"""<!doctype html><html><head><meta charset="utf-8"><title>Grad-CAM: {stem}</title>
<style>body{{font-family:sans-serif;margin:2em;background:#fafafa}} figure{{display:inline-block;margin:1em;
vertical-align:top;max-width:720px}} img{{width:100%;border:1px solid #ccc}} figcaption{{font-size:14px}}</style>
</head><body><h1>{len(rows)} most confident {'mistakes' if wrong else 'correct predictions'}</h1>
<p>Each strip: {head}. Red in the maps marks what raised that class's score most (Grad-CAM).</p>
<p><img src="{stem}_gradcam.png" alt="grid" style="max-width:100%"></p>
{items}
</body></html>
""")


def explain_one(args, model, meta, img_size, device, out):
    """--image: the top-5 and the map of --class (default: the top class)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    try:
        image = data.eval_transform(img_size, args.resize_size)(data.load_rgb(args.image))
    except (OSError, ValueError) as e:
        raise ValueError(f"--image {args.image} cannot be read as an image: {e}") from None
    names = meta["names"]
    with torch.no_grad():
        probs = model(normalize(image[None].to(device))).float().softmax(1)[0]
    top_p, top_i = probs.topk(min(5, len(probs)))
    cls = args.class_ if args.class_ is not None else top_i[0].item()
    if not 0 <= cls < len(names):
        raise ValueError(f"--class must be in [0, {len(names) - 1}], got {cls}")
    imgs, over, _ = explain(model, image[None], [cls], [cls], device)
    for p, i in zip(top_p.tolist(), top_i.tolist()):
        print(f"{p:7.2%}  {i:4d}  {names[i]}")
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(13, 4.2), gridspec_kw=dict(width_ratios=[1, 1, 1.2]))
    a.imshow(imgs[0]), a.set_title(os.path.basename(args.image), fontsize=9), a.axis("off")
    b.imshow(over[0]), b.set_title(f"Grad-CAM for {names[cls]}", fontsize=9), b.axis("off")
    c.barh(range(len(top_i))[::-1], top_p.tolist(), color="tab:blue")
    c.set_yticks(range(len(top_i))[::-1], [textwrap.shorten(names[i], 28) for i in top_i.tolist()], fontsize=9)
    c.set(xlim=(0, 1), xlabel="probability", title="top-5")
    fig.tight_layout()
    path = os.path.join(out, "image_gradcam.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"wrote {path}")


def parse_args(argv=None):
    p = evaluate.add_common_args(argparse.ArgumentParser(description=__doc__,
                                                         formatter_class=argparse.RawDescriptionHelpFormatter))
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--worst", type=int, default=None, help="the N most confident misclassifications (default 32)")
    mode.add_argument("--best", type=int, default=None, help="the N most confident correct predictions")
    mode.add_argument("--image", default=None, help="one image file")
    p.add_argument("--class", dest="class_", type=int, default=None, help="with --image: the class to explain")
    args = p.parse_args(argv)
    if args.worst is None and args.best is None and args.image is None:
        args.worst = 32
    if min(args.worst or 1, args.best or 1) < 1:
        p.error("--worst and --best take a count of at least 1")
    if args.class_ is not None and args.image is None:
        p.error("--class goes with --image")
    return args


def run(args):
    device = pick_device(args.device)
    if args.image:  # the user's image is read first: nothing is loaded or downloaded for a file that is not one
        try:
            data.load_rgb(args.image)
        except (OSError, ValueError) as e:
            raise ValueError(f"--image {args.image} cannot be read as an image: {e}") from None
    model, meta, root, settings = evaluate.load_model(args, device, with_data=not args.image)
    img_size = settings["img_size"]
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "eval")
    os.makedirs(out, exist_ok=True)
    if args.image:
        return explain_one(args, model, meta, img_size, device, out)
    wrong = args.worst is not None
    rows = select(predictions(args, model, meta, root, settings, device, out), args.worst or args.best, wrong)
    if not rows:
        raise ValueError(f"no {'misclassified' if wrong else 'correctly classified'} images in {out}/predictions.csv")
    tf = data.eval_transform(img_size, args.resize_size)
    images = torch.stack([tf(data.load_rgb(r["path"])) for r in rows])
    pred, true = [int(r["pred"]) for r in rows], [int(r["true"]) for r in rows]
    imgs, over_pred, over_true = [], [], []
    for s in range(0, len(rows), 16):                   # small batches: Grad-CAM keeps activations and gradients
        a, b, c = explain(model, images[s:s + 16], pred[s:s + 16], true[s:s + 16], device)
        imgs += list(a)
        over_pred += b
        over_true += c
    stem = "worst" if wrong else "best"
    render(rows, imgs, over_pred, over_true, out, stem, wrong)
    print(f"wrote {stem}_gradcam.png, {stem}_plain.png, {stem}.csv and {stem}.html ({len(rows)} cases) to {out}")


def main(argv=None):
    args = parse_args(argv)
    try:
        run(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"gradcam.py: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
