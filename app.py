"""
A web page for a trained ResNet: upload a photo, or pick an example, and see the top-5 classes and, for any of
them, where the network looked (Grad-CAM, the same function gradcam.py uses).

    python app.py                                          # the default run's best.pt on http://127.0.0.1:7860
    python app.py --checkpoint runs/fast/best.pt --examples /mnt/imagenet
    python app.py --host 0.0.0.0 --share                   # reachable from the network, plus a gradio.live link

With no checkpoint at the default path, the page shows torchvision's pretrained ResNet-50 (downloaded once) and
says so; with no internet either, it stops with one line that says how to get a checkpoint. It never serves
untrained weights. The same file runs unchanged as a Hugging Face Space (README "The demo").
"""
import argparse
import os
import sys
import time
import warnings

import torch
from PIL import Image

import data
import gradcam
from model import build_model, load_checkpoint, normalize
from train import pick_device

DEFAULT_CHECKPOINT = "runs/default/best.pt"
MIN_SIDE = 32  # px: below this a photo holds too little for a 224 px network to see


# -----------------------------------------------------------------------------
# the model and the examples

def load_model(path, explicit, device):
    """(model in eval mode, class names, eval size, a line saying what the model is, its training data or None)."""
    if os.path.exists(path) or explicit:
        model, meta = load_checkpoint(path)
        names = meta.get("class_names") or meta.get("classes") or [str(i) for i in range(model.fc.out_features)]
        saved = meta.get("args") or {}
        size = saved.get("eval_size") or saved.get("img_size") or 224
        top1 = (meta.get("metrics") or {}).get("val_top1")
        about = f"{meta['arch']} from `{path}`" + (f" (val top-1 {top1:.1f}%)" if top1 is not None else "")
        return model.to(device), names, size, about, saved.get("data")
    from torchvision.models import ResNet50_Weights
    weights = ResNet50_Weights.IMAGENET1K_V2
    try:
        sd = weights.get_state_dict(progress=False)
    except Exception as e:  # no internet, a proxy, a full disk: nothing to show but a way out
        raise FileNotFoundError(f"no checkpoint at {path}, and torchvision's pretrained ResNet-50 could not be "
                                f"downloaded ({type(e).__name__}); train one with `python train.py` (or copy a "
                                f"best.pt there), or pass --checkpoint PATH") from None
    model = build_model("resnet50")
    model.load_state_dict(sd)  # model.py's keys are torchvision's
    about = (f"torchvision's pretrained ResNet-50 ({weights.name}), since there is no checkpoint at `{path}`: "
             f"not a model you trained")
    return model.eval().to(device), list(weights.meta["categories"]), 224, about, None


def pick_examples(folder, n=8):
    """Up to n images from a folder of images, or from the val split of a dataset root, one class after another."""
    if not folder or not os.path.isdir(folder):
        return []
    try:
        train_dir, val_dir, val_csv, _ = data.find_splits(folder)
        classes, _ = data.scan_folder(train_dir)
        samples = data.scan_folder(val_dir, classes)[1] if val_csv is None else \
            data.read_val_csv(val_dir, val_csv, classes)
    except ValueError:  # not a dataset root: a plain folder of images
        files = sorted(f for f in os.listdir(folder) if f.lower().endswith(data.IMG_EXTENSIONS))
        samples = [(os.path.join(folder, f), k) for k, f in enumerate(files)]
    by_class = {}
    for path, label in samples:
        by_class.setdefault(label, path)  # the first image of every class
    labels = sorted(by_class)
    step = max(1, len(labels) / n)
    return [os.path.abspath(by_class[labels[int(k * step)]]) for k in range(min(n, len(labels)))]


# -----------------------------------------------------------------------------
# one photo

def read_photo(path):
    """(PIL RGB image, its original mode), or a ValueError whose text the page shows."""
    if not path:
        raise ValueError("Upload a photo, or pick one of the examples, first.")
    name = os.path.basename(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # refuse above PIL's 89 megapixels
            img = Image.open(path)
            img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ValueError(f"{name} is too large to decode safely (over {Image.MAX_IMAGE_PIXELS / 1e6:.0f} megapixels); "
                         f"resize it and upload it again.") from None
    except Image.UnidentifiedImageError:
        raise ValueError(f"{name} is not an image that Pillow can read; upload a JPEG, PNG or WebP photo.") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"{name} is damaged or truncated ({e}); upload another copy of it.") from None
    if min(img.size) < MIN_SIDE:
        raise ValueError(f"{name} is only {img.size[0]}x{img.size[1]} px; the network needs a photo of at least "
                         f"{MIN_SIDE} px a side.")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, img.convert("RGBA")).convert("RGB"), img.mode  # transparent -> white
    return img.convert("RGB"), img.mode  # grayscale, palette, CMYK


def classify(model, names, size, device, path):
    """(uint8 (3, S, S) crop, top-5 [(name, prob, index)], Grad-CAM overlay of the top class, milliseconds, the
    photo's original mode)."""
    t0 = time.perf_counter()
    img, mode = read_photo(path)
    x = data.eval_transform(size)(img)
    cam, logits = gradcam.gradcam(model, normalize(x[None].to(device)), None)  # one forward: top-5 and the map
    top_p, top_i = logits.float().softmax(1)[0].topk(min(5, logits.shape[1]))
    top5 = [(names[i], p, i) for p, i in zip(top_p.tolist(), top_i.tolist())]
    return x, top5, paint(x, cam), 1000 * (time.perf_counter() - t0), mode


def paint(x, cam):
    """The (1, h, w) map, upsampled and laid over the uint8 (3, H, W) crop: (H, W, 3) uint8."""
    heat = gradcam.upsample(cam, x.shape[-2:])[0].cpu().numpy()
    return gradcam.overlay(x.permute(1, 2, 0).numpy(), heat)


def explain(model, x, cls, device):
    """Grad-CAM overlay of class `cls` on the crop x, for another class of the top-5."""
    cam, _ = gradcam.gradcam(model, normalize(x[None].to(device)), torch.tensor([cls], device=device))
    return paint(x, cam)


# -----------------------------------------------------------------------------
# the page

def build_page(model, names, size, device, about, examples):
    import gradio as gr

    def on_submit(path):
        try:
            x, top5, overlay, ms, mode = classify(model, names, size, device, path)
        except ValueError as e:
            return None, None, gr.update(choices=[], value=None), f"**Cannot classify this:** {e}", None
        label = {f"{n} ({i})": p for n, p, i in top5}
        choices = [f"{n} ({i})" for n, _, i in top5]
        status = (f"Top class **{top5[0][0]}** at {top5[0][1]:.1%}; {ms:.0f} ms for the top-5 and Grad-CAM on "
                  f"{device.type}" + (f" (a {mode} image, converted to RGB)." if mode != "RGB" else "."))
        return label, overlay, gr.update(choices=choices, value=choices[0]), status, (x, [i for _, _, i in top5])

    def on_pick(choice, state):
        if state is None or choice is None:
            return gr.update()
        x, indices = state
        cls = indices[[f"{names[i]} ({i})" for i in indices].index(choice)]
        return explain(model, x, cls, device)

    with gr.Blocks(title="ResNet: top-5 and Grad-CAM") as page:
        gr.Markdown(f"# What does the network see?\nModel: {about}. Upload a photo: the page shows the five most "
                    f"likely classes and, for the one you pick, the regions that raised its score (Grad-CAM).")
        with gr.Row():
            with gr.Column():
                photo = gr.File(label="Photo (JPEG, PNG, WebP)", file_types=["image"], type="filepath")
                button = gr.Button("Classify", variant="primary")
                if examples:
                    gr.Examples(examples=[[p] for p in examples], inputs=[photo], label="Examples from your data")
            with gr.Column():
                status = gr.Markdown("Upload a photo, or pick an example.", elem_id="status")
                top5 = gr.Label(num_top_classes=5, label="Top-5", elem_id="top5")
                pick = gr.Radio(choices=[], label="Grad-CAM for", elem_id="pick")
                cam = gr.Image(label="Grad-CAM (red: what raised the class's score most)", type="numpy",
                               elem_id="cam")
        state = gr.State(None)
        outputs = [top5, cam, pick, status, state]
        # Gradio runs one event at a time by default (concurrency_limit=1): Grad-CAM's hooks are not thread-safe
        button.click(on_submit, inputs=[photo], outputs=outputs, api_name="classify")
        photo.change(on_submit, inputs=[photo], outputs=outputs, api_name=False)  # an upload, an example, a clear
        pick.input(on_pick, inputs=[pick, state], outputs=[cam], api_name=False)
    return page


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help=f"train.py checkpoint; default {DEFAULT_CHECKPOINT}, else "
                                                      f"torchvision's pretrained ResNet-50")
    p.add_argument("--examples", default=os.environ.get("APP_EXAMPLES"), help="a folder of images, or a dataset "
                   "root (its val split); default: $APP_EXAMPLES, else the checkpoint's --data")
    p.add_argument("--num-examples", type=int, default=8, help="how many examples, one class after another")
    # Hugging Face Spaces set GRADIO_SERVER_NAME=0.0.0.0; elsewhere the page is private to this machine
    p.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"), help="address to listen on")
    p.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)), help="port")
    p.add_argument("--share", action="store_true", help="also a public gradio.live link (72 h)")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu", "mps"])
    args = p.parse_args(argv)
    if args.num_examples < 0:
        p.error(f"--num-examples must be 0 or more, got {args.num_examples}")
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        device = pick_device(args.device)
        model, names, size, about, trained_on = load_model(args.checkpoint or DEFAULT_CHECKPOINT,
                                                           args.checkpoint is not None, device)
    except (ValueError, FileNotFoundError) as e:
        print(f"app.py: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    folder = args.examples or trained_on or data.DEFAULT_DATA
    examples = pick_examples(folder, args.num_examples)
    print(f"{about}; {len(examples)} examples from {folder if examples else 'nowhere (no data found)'}", flush=True)
    page = build_page(model, names, size, device, about, examples)
    page.launch(server_name=args.host, server_port=args.port, share=args.share,
                allowed_paths=[os.path.dirname(p) for p in examples])


if __name__ == "__main__":
    main()
