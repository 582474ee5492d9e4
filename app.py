"""
A web page for a trained ResNet: upload a photo, or click an example, and see the photo, its top-5 classes and,
for any of them, where the network looked (Grad-CAM, the same function gradcam.py uses).

    python app.py                                          # the newest runs/*/best.pt on http://127.0.0.1:7860
    python app.py --checkpoint runs/long/best.pt --ema --examples /mnt/imagenet
    python app.py --host 0.0.0.0 --share                   # reachable from the network, plus a gradio.live link
    python app.py --export-space space/                    # a folder that runs as a Hugging Face Space on its own
    python app.py --checkpoint runs/r50/best.pt --export-space space/ --push you/resnet50-demo   # ... upload it

With no --checkpoint it serves model.pt beside app.py (an exported Space) or the newest runs/*/best.pt, and says
which; with none, the page shows torchvision's pretrained ResNet-50 (downloaded once) and says so; with no internet
either, it stops with one line that says how to get a checkpoint. It never serves untrained weights. --push needs an
explicit --checkpoint. An exported Space holds model.pt and examples/ beside app.py, which app.py then serves.
"""
import argparse
import json
import os
import re
import shutil
import sys
import time
import warnings

import torch
from PIL import Image

import data
import gradcam
from model import build_model, load_checkpoint, newest_checkpoint, normalize, read_checkpoint, save_weights
from runtime import pick_device

HERE = os.path.dirname(os.path.abspath(__file__))
SPACE_CHECKPOINT = os.path.join(HERE, "model.pt")      # what --export-space writes beside app.py
SPACE_EXAMPLES = os.path.join(HERE, "examples")
MIN_SIDE = 32  # px: below this a photo holds too little for a 224 px network to see
# what an exported Space copies beside model.pt: app.py and the modules it imports, directly or through each other
# (tests/test_app.py runs an exported Space alone, so a module missing here fails there)
SPACE_MODULES = ("app", "data", "evaluate", "gradcam", "model", "runtime")


# -----------------------------------------------------------------------------
# the model and the examples

def load_model(path, ema, device):
    """(model in eval mode, class names, eval size, a line saying what the model is, the checkpoint's info: its
    class folders and args, empty for torchvision's weights). path None: there is no checkpoint to serve."""
    if path is not None:
        model, meta = load_checkpoint(path, ema=ema)
        ema = meta["ema"]  # an exported Space's model.pt may hold the EMA weights without --ema
        top1 = (meta["metrics"] or {}).get("ema_top1" if ema else "val_top1")
        about = (f"{meta['arch']}{' (EMA weights)' if ema else ''} from `{os.path.basename(path)}`"
                 + (f" (val top-1 {top1:.1f}%)" if top1 is not None else "")
                 # one forward a photo, for speed: the run's TTA would double it
                 + (f"; without the run's {meta['tta']} TTA here (one forward a photo, for speed), so confidences "
                    f"can differ a little from evaluate.py's" if meta["tta"] != "none" else ""))
        return model.to(device), meta["names"], meta["eval_size"], about, meta
    from torchvision.models import ResNet50_Weights
    weights = ResNet50_Weights.IMAGENET1K_V2
    try:
        sd = weights.get_state_dict(progress=False)
    except Exception as e:  # no internet, a proxy, a full disk: nothing to show but a way out
        raise FileNotFoundError(f"no checkpoint (no --checkpoint, no model.pt beside app.py, no runs/*/best.pt), "
                                f"and torchvision's pretrained ResNet-50 could not be downloaded "
                                f"({type(e).__name__}); train one with `python train.py`, or pass --checkpoint PATH"
                                ) from None
    model = build_model("resnet50")
    model.load_state_dict(sd)  # model.py's keys are torchvision's
    about = (f"torchvision's pretrained ResNet-50 ({weights.name}), since there is no checkpoint here "
             f"(runs/*/best.pt): not a model you trained")
    return model.eval().to(device), list(weights.meta["categories"]), 224, about, {}


def pick_examples(folder, n=8):
    """Up to n images from a folder of images, or from the val split of a dataset root, one class after another."""
    if not folder or not os.path.isdir(folder) or n == 0:
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
    """(the photo, uint8 (3, S, S) crop, top-5 [(name, prob, index)], Grad-CAM overlay of the top class,
    milliseconds, the photo's original mode)."""
    t0 = time.perf_counter()
    img, mode = read_photo(path)
    x = data.eval_transform(size)(img)
    cam, logits = gradcam.gradcam(model, normalize(x[None].to(device)), None)  # one forward: top-5 and the map
    top_p, top_i = logits.float().softmax(1)[0].topk(min(5, logits.shape[1]))
    top5 = [(names[i], p, i) for p, i in zip(top_p.tolist(), top_i.tolist())]
    return img, x, top5, paint(x, cam), 1000 * (time.perf_counter() - t0), mode


def paint(x, cam, display=320):
    """The (1, h, w) map laid over the uint8 (3, H, W) crop, both upsampled to at least `display` px a side (the
    crop of a 64 or 128 px model would be a thumbnail on the page): (D, D', 3) uint8."""
    scale = max(1.0, display / min(x.shape[-2:]))
    size = [round(scale * s) for s in x.shape[-2:]]
    big = gradcam.upsample(x.float(), size).round().clamp(0, 255).byte()  # the 3 channels as a batch of maps
    heat = gradcam.upsample(cam, size)[0].cpu().numpy()
    return gradcam.overlay(big.permute(1, 2, 0).numpy(), heat)


def explain(model, x, cls, device):
    """Grad-CAM overlay of class `cls` on the crop x, for another class of the top-5."""
    cam, _ = gradcam.gradcam(model, normalize(x[None].to(device)), torch.tensor([cls], device=device))
    return paint(x, cam)


# -----------------------------------------------------------------------------
# the page

def caption(path, classes=(), names=()):
    """An example's caption: its class's name when it lies in one of the run's class folders (a dataset's val
    split), else its file name without the extension and the "NN " that orders exported examples."""
    folder = os.path.basename(os.path.dirname(path))
    if folder in classes:
        return names[list(classes).index(folder)]
    return re.sub(r"^\d\d ", "", os.path.splitext(os.path.basename(path))[0])


def build_page(model, names, size, device, about, examples, classes=()):
    """Upload (a file that our code, not Gradio's, decodes: a bomb or a non-image gets our message) or click an
    example thumbnail; the photo, its top-5 and the Grad-CAM map of the class picked."""
    import gradio as gr

    def show(path):
        try:
            img, x, top5, overlay, ms, mode = classify(model, names, size, device, path)
        except ValueError as e:
            return {top5_box: None, cam: None, pick: gr.update(choices=[], value=None), state: None, photo: None,
                    status: f"**Cannot classify this:** {e}"}
        preview = img.copy()
        preview.thumbnail((768, 768))  # the page shows the photo, not its megapixels
        choices = [f"{n} ({i})" for n, _, i in top5]
        return {top5_box: {f"{n} ({i})": p for n, p, i in top5}, cam: overlay,
                pick: gr.update(choices=choices, value=choices[0]), state: (x, [i for _, _, i in top5]),
                photo: preview, status: f"Top class **{top5[0][0]}** at {top5[0][1]:.1%}; {ms:.0f} ms for the top-5 "
                                        f"and Grad-CAM on {device.type}"
                                        + (f" (a {mode} image, converted to RGB)." if mode != "RGB" else ".")}

    def on_example(evt: gr.SelectData):
        return show(examples[evt.index])  # a path of our own list: the page never names a file to read

    def on_pick(choice, picked):
        if picked is None or choice is None:
            return {cam: gr.update()}
        x, indices = picked
        cls = indices[[f"{names[i]} ({i})" for i in indices].index(choice)]
        return {cam: explain(model, x, cls, device)}

    with gr.Blocks(title="ResNet: top-5 and Grad-CAM") as page:
        gr.Markdown(f"# What does the network see?\nModel: {about}. Upload a photo or click an example: the page "
                    f"shows the five most likely classes and, for the one you pick, the regions that raised its "
                    f"score (Grad-CAM).")
        with gr.Row():
            with gr.Column():
                upload = gr.File(label="Photo (JPEG, PNG, WebP)", file_types=["image"], type="filepath")
                button = gr.Button("Classify", variant="primary")
                photo = gr.Image(label="The photo", type="pil", interactive=False, height=320, elem_id="photo")
                gallery = gr.Gallery(value=[(p, caption(p, classes, names)) for p in examples],
                                     label="Examples: click one", columns=4, height="auto", allow_preview=False,
                                     elem_id="examples", visible=bool(examples))
            with gr.Column():
                status = gr.Markdown("Upload a photo, or click an example.", elem_id="status")
                top5_box = gr.Label(num_top_classes=5, label="Top-5", elem_id="top5")
                pick = gr.Radio(choices=[], label="Grad-CAM for", elem_id="pick")
                cam = gr.Image(label="Grad-CAM (red: what raised the class's score most)", type="numpy",
                               interactive=False, elem_id="cam")
        state = gr.State(None)
        # a handler returns a dict keyed by the components it updates; this list is the order of /classify's answer
        outputs = [top5_box, cam, pick, status, state, photo]
        # Gradio runs one event at a time by default (concurrency_limit=1): Grad-CAM's hooks are not thread-safe
        button.click(show, inputs=[upload], outputs=outputs, api_name="classify")
        upload.change(show, inputs=[upload], outputs=outputs, api_name=False)  # an upload or a clear
        gallery.select(on_example, inputs=None, outputs=outputs, api_name=False)
        pick.input(on_pick, inputs=[pick, state], outputs=[cam], api_name=False)
    return page


# -----------------------------------------------------------------------------
# a Hugging Face Space in one command

SPACE_FILES = ".space_files"  # beside an export: the files it wrote, one a line, which alone --push uploads


def export_space(out, checkpoint, ema, examples, num_examples):
    """--export-space: a folder that runs as a Space (sdk gradio) with nothing else beside it. Returns its files (the
    ones it wrote: a folder of yours beside them stays out of the Space, and a folder with files it did not write is
    refused, so that nothing of yours is overwritten or published)."""
    listed = os.path.join(out, SPACE_FILES)
    if os.path.isdir(out) and os.listdir(out) and not os.path.exists(listed):
        raise ValueError(f"{out} holds files that --export-space did not write: export into a new or empty folder")
    before = set(open(listed).read().split("\n")) - {""} if os.path.exists(listed) else set()
    _, meta = load_checkpoint(checkpoint, ema=ema)  # the names, the eval size and the run's records, checked
    os.makedirs(os.path.join(out, "examples"), exist_ok=True)
    files = []

    def copy(src, name):
        shutil.copyfile(src, os.path.join(out, name))
        files.append(name)

    for name in SPACE_MODULES:
        copy(os.path.join(HERE, f"{name}.py"), f"{name}.py")
    copy(os.path.join(HERE, "LICENSE"), "LICENSE")  # the code's, MIT
    save_weights(read_checkpoint(checkpoint), os.path.join(out, "model.pt"), only="ema" if ema else "model")
    files.append("model.pt")
    classes = meta["classes"] or []
    for k, path in enumerate(pick_examples(examples or meta["args"].get("data"), num_examples)):
        img, _ = read_photo(path)
        img.thumbnail((512, 512))  # a copy small enough for the Space's repository
        name = f"examples/{k:02d} {caption(path, classes, meta['names']).replace('/', '-')}.jpg"
        img.save(os.path.join(out, name), quality=90)
        files.append(name)
    with open(os.path.join(out, "requirements.txt"), "w") as f:  # Spaces install gradio at sdk_version themselves
        f.write("--extra-index-url https://download.pytorch.org/whl/cpu\ntorch\ntorchvision\nnumpy\npillow\n"
                "matplotlib\n")
    files.append("requirements.txt")
    run_dir = os.path.dirname(os.path.abspath(checkpoint))
    if os.path.exists(os.path.join(run_dir, "curves.png")):
        copy(os.path.join(run_dir, "curves.png"), "curves.png")
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write(model_card(meta, ema, checkpoint, "curves.png" in files))
    files.append("README.md")
    for name in before - set(files):  # an earlier export's own files that this one did not write again
        if os.path.isfile(os.path.join(out, name)):
            os.remove(os.path.join(out, name))
    with open(listed, "w") as f:
        f.write("\n".join(sorted(files)) + "\n")
    return sorted(files)


def model_card(meta, ema, checkpoint, curves):
    """The Space's README: its front matter (sdk gradio, app_file) and a model card from the run's own records."""
    import gradio as gr
    saved = meta["args"]
    log = os.path.join(os.path.dirname(os.path.abspath(checkpoint)), "log.jsonl")
    rows = []
    for line in open(log) if os.path.exists(log) else []:
        try:
            rows.append(json.loads(line))
        except ValueError:  # a torn last line (train.py writes rows whole since, and skips such a line)
            pass
    key = "ema_top1" if ema and rows and "ema_top1" in rows[-1] else "val_top1"
    best = max(rows, key=lambda r: r[key]) if rows else None
    argv = meta["argv"]
    command = ("python train.py " + " ".join(argv)) if argv is not None else "(not recorded in this checkpoint)"
    data_name = os.path.basename(os.path.normpath(saved["data"])) if saved.get("data") else "the default data"
    lines = ["---", f"title: {meta['arch']} from scratch", "sdk: gradio", f"sdk_version: {gr.__version__}",
             "app_file: app.py", "pinned: false", "license: mit", "---", "",
             f"# {meta['arch']}, trained from scratch", "",
             "Upload a photo: the page shows the five most likely classes and, for each, where the network looked "
             "(Grad-CAM).", "", "| | |", "| --- | --- |", f"| network | {meta['arch']}"
             f"{' + BlurPool' if saved.get('blurpool') else ''} |",
             f"| data | {data_name}, {len(meta['names'])} classes |",
             f"| epochs | {rows[-1]['epoch'] + 1 if rows else '?'} of {saved.get('epochs', '?')} |",
             f"| weights | {'the EMA of the weights' if ema else 'the weights'} of `{os.path.basename(checkpoint)}` |"]
    if best is not None:
        lines += [f"| val top-1 | {best[key]:.2f}% (epoch {best['epoch'] + 1}{', EMA' if key == 'ema_top1' else ''}) |",
                  f"| val top-5 | {best['val_top5']:.2f}% |",
                  f"| evaluation | {meta['eval_size']} px{', flip TTA' if meta['tta'] == 'flip' else ''} |"]
    lines += ["", "Trained with:", "", "```", command, "```", ""]
    if curves:
        lines += ["![loss, accuracy and learning rate per epoch](curves.png)", ""]
    lines += ["## Licence", "", "The code (app.py and the modules beside it) is under the MIT licence. The weights in "
              "model.pt were trained on " + (f"{data_name}, " if saved.get("data") else "") + "images from ImageNet, "
              "and come under ImageNet's terms of access: non-commercial research and education.", ""]
    return "\n".join(lines)


def push_space(folder, repo_id, files):
    """--push USER/NAME: create the Space if needed and commit the files the export wrote (nothing else of the
    folder), with huggingface_hub (gradio's)."""
    from huggingface_hub import CommitOperationAdd, HfApi
    api = HfApi()
    try:
        api.create_repo(repo_id, repo_type="space", space_sdk="gradio", exist_ok=True)
        api.create_commit(repo_id, [CommitOperationAdd(path_in_repo=f, path_or_fileobj=os.path.join(folder, f))
                                    for f in files], repo_type="space", commit_message="app.py --export-space")
    except Exception as e:  # no token, no network, a name taken: the Hub's own words, on one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(f"could not push {folder} to the Space {repo_id} ({type(e).__name__}: {first}); log in with "
                         f"`hf auth login` or set HF_TOKEN, and check the name") from None
    return f"{api.endpoint}/spaces/{repo_id}"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="train.py checkpoint; default model.pt beside app.py (a Space), "
                                                      "else the newest runs/*/best.pt, else torchvision's pretrained "
                                                      "ResNet-50")
    p.add_argument("--ema", action="store_true", help="serve (or export) the checkpoint's EMA weights")
    p.add_argument("--examples", default=os.environ.get("APP_EXAMPLES"), help="a folder of images, or a dataset "
                   "root (its val split); default: $APP_EXAMPLES, examples/ beside app.py (a Space) or beside the "
                   "checkpoint (run_ec2.sh results), else the checkpoint's --data")
    p.add_argument("--num-examples", type=int, default=8, help="how many examples, one class after another")
    # Hugging Face Spaces set GRADIO_SERVER_NAME=0.0.0.0; elsewhere the page is private to this machine
    p.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"), help="address to listen on")
    p.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)), help="port")
    p.add_argument("--share", action="store_true", help="also a public gradio.live link (72 h)")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu", "mps"])
    p.add_argument("--export-space", default=None, metavar="DIR", help="write a folder that runs as a Hugging Face "
                   "Space (app, modules, weights-only model.pt, examples, requirements, model card), and exit")
    p.add_argument("--push", default=None, metavar="USER/NAME", help="with --export-space: upload it to this Space")
    args = p.parse_args(argv)
    if args.num_examples < 0:
        p.error(f"--num-examples must be 0 or more, got {args.num_examples}")
    if args.push and not args.export_space:
        p.error("--push uploads what --export-space writes: give both")
    if args.push and args.push.count("/") != 1:
        p.error(f"--push takes USER/NAME, got {args.push}")
    if args.push and not args.checkpoint:  # never the newest run, published by accident
        p.error("--push needs an explicit --checkpoint: say which model to publish")
    return args


def main(argv=None):
    args = parse_args(argv)
    path = args.checkpoint or (SPACE_CHECKPOINT if os.path.exists(SPACE_CHECKPOINT) else newest_checkpoint())
    if path and not args.checkpoint and path != SPACE_CHECKPOINT:
        print(f"no --checkpoint: the newest run's, {path}", flush=True)
    try:
        if args.export_space:
            files = export_space(args.export_space, path, args.ema, args.examples, args.num_examples)
            print(f"wrote {args.export_space}: {', '.join(files)}", flush=True)
            if args.push:
                print(f"pushed to {push_space(args.export_space, args.push, files)}", flush=True)
            return
        device = pick_device(args.device)
        model, names, size, about, info = load_model(path, args.ema, device)
    except (ValueError, FileNotFoundError) as e:
        print(f"app.py: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    trained_on = info.get("args", {}).get("data")
    beside = os.path.join(os.path.dirname(os.path.abspath(path)), "examples") if path else None  # run_ec2.sh results
    folder = args.examples or next((f for f in (SPACE_EXAMPLES, beside) if f and os.path.isdir(f)), None) \
        or trained_on or data.default_root()
    examples = pick_examples(folder, args.num_examples)
    print(f"{about}; {len(examples)} examples from {folder if examples else 'nowhere (no data found)'}", flush=True)
    # no allowed_paths: the example images reach the page through Gradio's cache, so no folder of ours is served
    page = build_page(model, names, size, device, about, examples, info.get("classes") or ())
    page.launch(server_name=args.host, server_port=args.port, share=args.share)


if __name__ == "__main__":
    main()
