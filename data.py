"""
Turns `--data` into datasets and loaders, for every layout users have on disk:

    ROOT/train/<class>/*.JPEG and ROOT/val/<class>/*.JPEG       ImageFolder layout (imagenette, most ImageNet copies)
    ROOT/ILSVRC/Data/CLS-LOC/{train,val} + ROOT/LOC_val_solution.csv   the Kaggle ILSVRC download: a flat val/,
                                                                       labels read from the CSV, no file moved
    ROOT = .../ILSVRC/Data/CLS-LOC                                     the same, pointed at CLS-LOC itself

The class index is the sorted folder name, which for wnids is the standard ImageNet-1k order.
Loaders hand out uint8 images; train.py normalizes them on the device (model.normalize). The training crop
decodes JPEGs at reduced scale where its box allows (random_resized_crop); --shrink writes a smaller copy.
Augmentation randomness is a pure function of (seed, epoch, image index), and the images of each step a function
of (seed, epoch, step) (StepSampler), so a run gives the same images whatever the number of workers or ranks, and a
resumed run, on as many GPUs or on others, sees exactly what an uninterrupted one would.
"""
import csv
import hashlib
import io
import math
import os
import random
import shutil
import sys
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms as T
from torchvision.transforms import v2

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
DEFAULT_DATA = "data/imagenette2-160"
UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)  # what PIL raises on a bad file
EVAL_CROP_RATIO = 0.875  # resize to img_size / 0.875, then center crop: 256 -> 224, the standard ImageNet eval


def seed_cpu(seed):
    """Seed the CPU generator, the one every draw of the data and the mixing uses. torch.manual_seed would seed
    CUDA's too, and where CUDA is not initialized (a CPU, every DataLoader worker) it queues that seeding, formatting
    a stack trace each call: a tenth of the loader's time when called for every image (BENCHMARKS.md)."""
    torch.random.default_generator.manual_seed(seed)


def seed_for(seed, epoch, index=0, stream=""):
    """The seed of one random draw of the run: the data order (stream "order"), one image's crop ("crop"), one
    batch's mixing ("mix<rank>"). A hash of all four, so a draw depends on nothing but them: not on the worker or
    rank that makes it, nor on whether the run was resumed. 63 bits, which torch.manual_seed always accepts."""
    key = f"{seed},{epoch},{index},{stream}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


# -----------------------------------------------------------------------------
# where the images are

def default_root():
    """The data of every script given no --data: $DATA_DIR when it is set (run_ec2.sh sets it to the instance's
    ImageNet), else Imagenette at 160 px in data/ (10 ImageNet classes, about 100 MB)."""
    return Path(os.environ.get("DATA_DIR") or DEFAULT_DATA)


def default_data():
    """default_root(), with Imagenette downloaded first when that is the one and it is not there yet."""
    path = default_root()
    if str(path) == DEFAULT_DATA and not (path / "train").is_dir():
        from torchvision.datasets import Imagenette
        print(f"no --data given: downloading Imagenette (160 px, 10 ImageNet classes, ~100 MB) to {path} ...")
        try:
            Imagenette(str(path.parent), size="160px", download=True)
        except Exception as e:
            raise FileNotFoundError(f"could not download Imagenette ({type(e).__name__}: {e}); "
                                    f"pass --data /path/to/imagenet instead") from None
    return path


def find_splits(root):
    """Return (train_dir, val_dir, val_csv or None, synset_mapping_file or None) for any supported layout."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"--data {root} is not a folder; pass the dataset root that holds train/ and val/")
    for base in (root / "ILSVRC" / "Data" / "CLS-LOC", root):
        if (base / "train").is_dir() and (base / "val").is_dir():
            break
    else:
        raise ValueError(f"--data {root} holds neither train/ and val/ nor ILSVRC/Data/CLS-LOC/{{train,val}}; "
                         f"see 'Data layouts' in README.md")
    # the Kaggle files sit beside ILSVRC/, three levels above CLS-LOC
    kaggle_root = base.parent.parent.parent
    mapping = kaggle_root / "LOC_synset_mapping.txt"
    mapping = mapping if mapping.is_file() else None
    val_dir = base / "val"
    if any(e.is_dir() for e in os.scandir(val_dir)):
        return base / "train", val_dir, None, mapping
    val_csv = kaggle_root / "LOC_val_solution.csv"
    if not val_csv.is_file():
        raise ValueError(f"{val_dir} is flat (no class folders) but {val_csv} is missing; "
                         f"put the Kaggle LOC_val_solution.csv there, or sort val/ into class folders")
    return base / "train", val_dir, val_csv, mapping


def scan_folder(folder, classes=None):
    """ImageFolder scan: (sorted class names, [(path, label)]). Given `classes`, the folders must be those."""
    found = sorted(e.name for e in os.scandir(folder) if e.is_dir())
    if classes is not None and found != classes:
        extra, missing = sorted(set(found) - set(classes)), sorted(set(classes) - set(found))
        raise ValueError(f"{folder} has other class folders than train/: extra {extra[:3]}, missing {missing[:3]}")
    if not found:
        raise ValueError(f"{folder} has no class folders; expected {folder}/<class>/<image>.JPEG")
    samples = []
    for label, name in enumerate(found):
        files = sorted(e.path for e in os.scandir(os.path.join(folder, name))
                       if e.is_file() and e.name.lower().endswith(IMG_EXTENSIONS))
        samples += [(f, label) for f in files]
    if not samples:
        raise ValueError(f"{folder} has class folders but no images ({', '.join(IMG_EXTENSIONS)})")
    empty = sorted(set(found) - {found[label] for _, label in samples})
    if empty:
        raise ValueError(f"{folder}/{empty[0]} holds no images ({len(empty)} empty class folders); "
                         f"fill or remove them, since the class index is the sorted folder list")
    return found, samples


def read_val_csv(val_dir, val_csv, classes):
    """Kaggle validation labels: rows of `ImageId,PredictionString`; the label is the first wnid of the string."""
    index = {c: i for i, c in enumerate(classes)}
    samples = []
    with open(val_csv, newline="") as f:
        for row in csv.DictReader(f):
            wnid = row["PredictionString"].split()[0]
            if wnid not in index:
                raise ValueError(f"{val_csv} labels {row['ImageId']} as {wnid}, which is no class folder of train/")
            samples.append((os.path.join(val_dir, row["ImageId"] + ".JPEG"), index[wnid]))
    missing = [p for p, _ in samples[:50] if not os.path.isfile(p)]
    if missing:
        raise ValueError(f"{val_csv} names images that are not in {val_dir}, e.g. {missing[0]}")
    return sorted(samples)


def class_names(classes, mapping_file=None):
    """Human-readable names: from Kaggle's LOC_synset_mapping.txt, else torchvision's lists, else the folder names."""
    if mapping_file is not None:
        with open(mapping_file) as f:
            names = dict(line.strip().split(" ", 1) for line in f if line.strip())
        return [names.get(c, c).split(",")[0] for c in classes]
    if len(classes) == 1000 and all(c.startswith("n") and c[1:].isdigit() for c in classes):
        from torchvision.models import ResNet50_Weights  # its 1000 categories are in sorted-wnid order
        return list(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])
    from torchvision.datasets.imagenette import Imagenette
    known = Imagenette._WNID_TO_CLASS
    return [known[c][0] if c in known else c for c in classes]


def stratified_subset(samples, fraction, seed):
    """The same `fraction` of every class (at least one image each), chosen by `seed` alone."""
    if not 0 < fraction <= 1:
        raise ValueError(f"--subset must be in (0, 1], got {fraction}")
    if fraction == 1:
        return samples
    by_class = {}
    for i, (_, label) in enumerate(samples):
        by_class.setdefault(label, []).append(i)
    rng, keep = random.Random(seed), []
    for label in sorted(by_class):
        idx = by_class[label]
        rng.shuffle(idx)
        keep += idx[:max(1, round(fraction * len(idx)))]
    return [samples[i] for i in sorted(keep)]


# -----------------------------------------------------------------------------
# images and transforms

def load_rgb(path):
    """Every image becomes RGB: ImageNet has grayscale, CMYK, and PNGs named .JPEG (PIL sniffs the content)."""
    with open(path, "rb") as f:
        img = Image.open(f)
        return img.convert("RGB")


def random_resized_crop(img, size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision's RandomResizedCrop and a horizontal flip, on a PIL image that is opened but not yet decoded.

    The crop box is drawn exactly as torchvision draws it, on the full-size image. A JPEG is then decoded at the
    smallest DCT scale (1/2, 1/4 or 1/8: libjpeg's, through Pillow's `draft`) that still leaves the box at least
    `size` px on each side, so nothing is ever upscaled that was not upscaled before, and one antialiased resize
    of the box gives the crop. On the 100 ImageNet samples (mostly 500x375), 43% of the crops at 128 px, 18% at
    160, 10% at 176 and 1% at 224 are decoded at reduced scale; the rest of the gain is the uint8 path (no float
    tensors, no normalization on the CPU) and one resize of the box instead of a crop and a resize.
    """
    top, left, h, w = T.RandomResizedCrop.get_params(img, scale, ratio)  # torch's RNG, seeded by ImageList
    full_w, full_h = img.size
    img.draft("RGB", (math.ceil(full_w * size / w), math.ceil(full_h * size / h)))  # no-op unless JPEG
    sx, sy = img.size[0] / full_w, img.size[1] / full_h
    box = (left * sx, top * sy, (left + w) * sx, (top + h) * sy)
    img = (img if img.mode == "RGB" else img.convert("RGB")).resize((size, size), Image.BILINEAR, box=box)
    if torch.rand(1) < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)  # uint8 (3, size, size)


def train_transform(img, epoch, sizes, extra=None):
    """The training image of `epoch`: a random crop at sizes[epoch] px (progressive resizing), then `extra`
    (TrivialAugment, random erasing) if any, uint8."""
    x = random_resized_crop(img, sizes[min(epoch, len(sizes) - 1)])
    return extra(x) if extra is not None else x


def eval_transform(img_size, resize_size=None):
    """The standard evaluation, pixel for pixel torchvision's: resize the shorter side, center crop, uint8."""
    resize_size = resize_size or round(img_size / EVAL_CROP_RATIO)
    return v2.Compose([v2.Resize(resize_size, antialias=True), v2.CenterCrop(img_size), v2.PILToTensor()])


def eval_image(img, epoch, tf):
    return tf(img.convert("RGB"))


class ImageList(Dataset):
    """A list of (path, label). Items are asked for as (index, epoch) by ShardSampler and come back as
    (uint8 image, label, bad) where bad is -1, or the index of an unreadable file that was replaced.
    `transform(img, epoch)` gets the image opened but not decoded, so that it can decode a JPEG at reduced scale.

    For training, the transform's randomness is seeded from (seed, epoch, index): the image a step sees does not
    depend on which worker or rank loads it, nor on whether the run was resumed.
    An unreadable, truncated or empty file is replaced by the next readable image of the same class, so one bad
    JPEG among a million does not stop a run; the loop names it once and counts it.
    """

    def __init__(self, samples, transform, seed=None):
        self.samples, self.transform, self.seed = samples, transform, seed
        self.by_class = {}
        for i, (_, label) in enumerate(samples):
            self.by_class.setdefault(label, []).append(i)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, item):
        index, epoch = item
        path, label = self.samples[index]
        if self.seed is not None:
            seed_cpu(seed_for(self.seed, epoch, index, "crop"))
        try:
            return self.transform(Image.open(path), epoch), label, -1
        except UNREADABLE:
            pass
        mates = self.by_class[label]
        start = mates.index(index)
        for k in range(1, min(len(mates), 20)):  # the next class-mates in turn
            try:
                mate = self.samples[mates[(start + k) % len(mates)]][0]
                return self.transform(Image.open(mate), epoch), label, index
            except UNREADABLE:
                continue
        raise RuntimeError(f"{path} and the images after it in its class are unreadable; run train.py --check-data")


def report_bad(bad, dataset, seen):
    """Name each unreadable file of a batch (`bad`: the loader's indices, -1 for none) once per run on stderr;
    returns how many the batch had (each was replaced by a class-mate, so the run goes on)."""
    indices = bad[bad >= 0].tolist()
    for b in sorted(set(indices) - seen):
        print(f"warning: unreadable image {dataset.samples[b][0]}, replaced by another of its class", file=sys.stderr,
              flush=True)
    seen.update(indices)
    return len(indices)


def epoch_order(seed, epoch, n):
    """The order of an epoch's n training images: a permutation seeded by (seed, epoch) alone."""
    g = torch.Generator().manual_seed(seed_for(seed, epoch, stream="order"))
    return torch.randperm(n, generator=g).tolist()


def micro_batch(order, step, k, batch, global_batch):
    """The image indices of micro-batch k of optimizer step `step`: the step takes the next `global_batch` images of
    the epoch's order, cut into micro-batches of `batch`. Nothing here depends on the number of ranks."""
    start = step * global_batch + k * batch
    return order[start:start + batch]


class StepSampler(Sampler):
    """This rank's (index, epoch) items of one training epoch, whatever the number of ranks W.

    An epoch is epoch_order() cut into steps of the global batch G, its remainder (n mod G images) dropped; step s
    has G / b micro-batches of b images (micro_batch), and rank r loads the micro-batches k = r, r + W, r + 2W, ...,
    A = G / (b W) of them a step. So with the same b a step sees the same images, in the same micro-batches (the
    same BatchNorm groups), on any W: a run stopped on 8 GPUs continues on 4. `start` skips the steps done."""

    def __init__(self, n, batch, global_batch, rank=0, world=1, seed=0):
        assert global_batch % (batch * world) == 0, f"a global batch of {global_batch} is no whole number of " \
                                                    f"micro-batches of {batch} on each of {world} ranks"
        self.n, self.batch, self.global_batch, self.seed = n, batch, global_batch, seed
        self.rank, self.world = rank, world
        self.steps, self.per_step = n // global_batch, global_batch // batch  # steps an epoch, micro-batches a step
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch, start=0):
        self.epoch, self.start = epoch, start

    def __len__(self):
        return (self.steps - self.start) * (self.per_step // self.world) * self.batch

    def micro_batches(self, step):
        """The micro-batches of `step` this rank loads, in the order it loads them, each by its index k in the step
        (its images: micro_batch(order, step, k, ...)). The one statement of the layout: __iter__ follows it, and so
        does micro_index, by which train.py seeds a micro-batch's mixing without working the layout out itself."""
        return range(self.rank, self.per_step, self.world)

    def micro_index(self, step, j):
        """The index in the epoch of the j-th micro-batch this rank loads in `step`: the same micro-batch, the same
        index, on any number of ranks."""
        return step * self.per_step + self.micro_batches(step)[j]

    def __iter__(self):
        order = epoch_order(self.seed, self.epoch, self.n)
        for step in range(self.start, self.steps):
            for k in self.micro_batches(step):
                yield from ((i, self.epoch) for i in micro_batch(order, step, k, self.batch, self.global_batch))


class ShardSampler(Sampler):
    """Evaluation: this rank's indices rank, rank + world, ..., in order, with no padding, so that the ranks together
    count every image exactly once."""

    def __init__(self, n, rank=0, world=1):
        self.n, self.rank, self.world = n, rank, world

    def __len__(self):
        return len(range(self.rank, self.n, self.world))

    def __iter__(self):
        return iter([(i, 0) for i in range(self.rank, self.n, self.world)])


# -----------------------------------------------------------------------------
# datasets and loaders

# The augmentations a training step may add after the crop and flip, in the order they apply: each is a flag of
# train.py and lr_finder.py (train.add_step_args adds them from here; flag: its argparse arguments) and the transform
# built from the flag's value (None: off). A new augmentation is one entry here, nothing else.
AUGMENTATIONS = dict(
    trivial_augment=dict(flag=dict(action="store_true", help="add TrivialAugmentWide (Mueller & Hutter 2021)"),
                         build=lambda on: v2.TrivialAugmentWide() if on else None),
    random_erase=dict(flag=dict(type=float, default=0.0, help="probability of RandomErasing per image"),
                      build=lambda p: v2.RandomErasing(p=p, value=0) if p > 0 else None),
)


def build_datasets(root, img_size, subset=1.0, seed=0, augment=None, eval_size=None, resize_size=None):
    """Return (train_set, val_set, info) where info has 'classes' (folder names) and 'names' (readable names).
    img_size is the training crop, or a list of one per epoch (progressive resizing); augment: {name: value} of
    AUGMENTATIONS (a name left out is off)."""
    train_dir, val_dir, val_csv, mapping = find_splits(root)
    classes, train_samples = scan_folder(train_dir)
    if val_csv is None:
        _, val_samples = scan_folder(val_dir, classes)
    else:
        val_samples = read_val_csv(val_dir, val_csv, classes)
    train_samples = stratified_subset(train_samples, subset, seed)
    sizes = tuple(img_size) if isinstance(img_size, (list, tuple)) else (img_size,)
    built = (AUGMENTATIONS[name]["build"]((augment or {})[name]) for name in AUGMENTATIONS if name in (augment or {}))
    extra = [t for t in built if t is not None]
    train_tf = partial(train_transform, sizes=sizes, extra=v2.Compose(extra) if extra else None)
    val_tf = partial(eval_image, tf=eval_transform(eval_size or sizes[-1], resize_size))
    train_set, val_set = ImageList(train_samples, train_tf, seed=seed), ImageList(val_samples, val_tf)
    return train_set, val_set, dict(classes=classes, names=class_names(classes, mapping))


def inspect_bytes(raw, name):
    """(kind, error) of one image file's bytes, decoded fully as training would: its mode ("RGB", "L", "CMYK", ...)
    or "PNG named .JPEG", and None; or None and what the decoder said."""
    try:
        img = Image.open(io.BytesIO(raw))
        img.load()
    except UNREADABLE as e:
        return None, f"{type(e).__name__}: {e}"
    return "PNG named .JPEG" if img.format != "JPEG" and name.lower().endswith((".jpg", ".jpeg")) else img.mode, None


def inspect_image(path):
    with open(path, "rb") as f:
        return inspect_bytes(f.read(), path)


def check_data(root, workers):
    """--check-data: the layout found, image counts per split and class, and every file decoded once."""
    import multiprocessing
    import time
    train_dir, val_dir, val_csv, mapping = find_splits(root)
    classes, train = scan_folder(train_dir)
    val = scan_folder(val_dir, classes)[1] if val_csv is None else read_val_csv(val_dir, val_csv, classes)
    layout = "ImageFolder (train/<class>, val/<class>)" if val_csv is None else f"Kaggle ILSVRC (labels: {val_csv})"
    counts = [0] * len(classes)
    for _, label in train:
        counts[label] += 1
    print(f"{root}: {layout}; {len(classes)} classes; {len(train)} train images ({min(counts)} to {max(counts)} a "
          f"class), {len(val)} val images; decoding every file with {workers} processes ...", flush=True)
    paths = [p for p, _ in train + val]
    found, bad, t0 = {}, [], time.time()
    with multiprocessing.Pool(workers) as pool:
        for k, (path, (kind, err)) in enumerate(zip(paths, pool.imap(inspect_image, paths, chunksize=64))):
            if err:
                bad.append(path)
                print(f"unreadable: {path} ({err})", flush=True)
            else:
                found[kind] = found.get(kind, 0) + 1
            if (k + 1) % 20000 == 0:
                ips = (k + 1) / (time.time() - t0)
                eta = (len(paths) - k - 1) / ips
                print(f"{k + 1}/{len(paths)} files, {ips:.0f} files/s, ETA {eta:.0f}s", flush=True)
    print("kinds: " + ", ".join(f"{n} {kind}" for kind, n in sorted(found.items(), key=lambda x: -x[1])))
    print("grayscale, CMYK and PNG files are converted to RGB when loaded; " + (
        f"{len(bad)} unreadable files would each be replaced by a class-mate during training" if bad else
        "no unreadable files"), flush=True)
    return dict(classes=len(classes), train=len(train), val=len(val), kinds=found, unreadable=len(bad))


def shrink_bytes(raw, side, by="shorter", quality=90):
    """The image in `raw` (a file's bytes) as a JPEG whose shorter (or longer) side is at most `side` px, at quality
    90 as FFCV stores ImageNet (or `quality`); None where it is that small already, or unreadable (training replaces
    those)."""
    try:
        img = Image.open(io.BytesIO(raw))
        w, h = img.size
        scale = side / (min(w, h) if by == "shorter" else max(w, h))
        if scale >= 1:
            return None
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        img.draft("RGB", size)  # decode at a reduced scale where the JPEG allows: shrinking a million files is slow
        out = io.BytesIO()
        img.convert("RGB").resize(size, Image.LANCZOS).save(out, format="JPEG", quality=quality)
        return out.getvalue()
    except UNREADABLE:
        return None


def shrink_image(job):
    """One file of --shrink (src, dst, side or None, by): shrink_bytes' JPEG, or the file as it is."""
    src, dst, side, by = job
    if os.path.exists(dst):
        return "kept"  # done by an earlier, interrupted --shrink
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    with open(src, "rb") as f:
        raw = f.read()
    small = shrink_bytes(raw, side, by) if side is not None else None
    with open(dst + ".tmp", "wb") as f:
        f.write(raw if small is None else small)
    os.replace(dst + ".tmp", dst)
    return "copied" if small is None else "shrunk"


def shrink_dataset(root, out, max_side, workers, by="shorter"):
    """--shrink: a copy of the dataset whose training images have a shorter (or, by="longer", a longer) side of at most
    max_side px, in the same layout (the Kaggle CSV files too). Decoding then costs less on every epoch; an interrupted
    run picks up where it was. Validation images are copied as they are, so that evaluation at a high resolution
    (FixRes) loses nothing."""
    import multiprocessing
    import time
    root, out = Path(root).resolve(), Path(out).resolve()
    if out == root or root in out.parents:
        raise ValueError(f"--shrink {out} is inside --data {root}; write the copy somewhere else")
    train_dir, val_dir, val_csv, mapping = find_splits(root)
    files = [(Path(d, f), side) for split, side in ((train_dir, max_side), (val_dir, None))
             for d, _, names in os.walk(split) for f in sorted(names) if f.lower().endswith(IMG_EXTENSIONS)]
    for extra in (val_csv, mapping):
        if extra is not None:
            (out / extra.relative_to(root)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(extra, out / extra.relative_to(root))
    jobs = [(str(f), str(out / f.relative_to(root)), side, by) for f, side in files]
    print(f"shrinking the training images of {root} to a {by} side of at most {max_side} px, and copying the "
          f"validation images, to {out} ({len(jobs)} files, {workers} processes) ...", flush=True)
    counts, t0 = {}, time.time()
    with multiprocessing.Pool(workers) as pool:
        for k, result in enumerate(pool.imap(shrink_image, jobs, chunksize=64)):
            counts[result] = counts.get(result, 0) + 1
            if (k + 1) % 20000 == 0:
                ips = (k + 1) / (time.time() - t0)
                print(f"{k + 1}/{len(jobs)} files, {ips:.0f} files/s, ETA {(len(jobs) - k - 1) / ips:.0f}s", flush=True)
    print(f"{out}: {counts.get('shrunk', 0)} shrunk, {counts.get('copied', 0)} copied as they were, "
          f"{counts.get('kept', 0)} kept from an earlier run; train with --data {out}", flush=True)
    return counts


def default_workers(requested=None, procs_per_machine=1):
    """--workers, or every core this process may use, shared among the GPUs' processes, less one for each process
    itself. JPEG decoding is the bottleneck of a GPU run, so the loader gets all the cores there are."""
    if requested is not None:
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 2
    return max(1, cores // procs_per_machine - 1)


def own_session(worker_id):
    """torchrun stops a rank with os.killpg: in a session of their own, loader workers keep serving while the rank
    finishes its step and checkpoints. A direct signal still ends them, and they exit when the rank is gone.
    Windows has no sessions (nor torchrun's killpg): there the workers stay as they are."""
    if hasattr(os, "setsid"):
        os.setsid()


def make_loader(dataset, batch_size, shuffle, rank=0, world=1, seed=0, workers=4, pin_memory=False,
                global_batch=None):
    """Training (shuffle): the StepSampler's micro-batches of batch_size, steps of global_batch (default: one
    micro-batch per rank). Evaluation: this rank's shard, in order."""
    sampler = StepSampler(len(dataset), batch_size, global_batch or batch_size * world, rank, world, seed) \
        if shuffle else ShardSampler(len(dataset), rank, world)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, pin_memory=pin_memory,
                      persistent_workers=workers > 0, worker_init_fn=own_session,
                      prefetch_factor=2 if workers > 0 else None)  # batches ready per worker
