"""data.py on real JPEGs: every layout, RGB conversion, subsets, samplers, and clear errors on odd layouts."""
import collections
import csv
import math
import os
from functools import partial

import pytest
import numpy as np
import torch
from torchvision import transforms as T
from PIL import Image

import data
from conftest import IMAGENETTE, SAMPLES, link_tree, needs_imagenette, needs_samples

pytestmark = needs_imagenette


def kaggle_tree(tmp_path, per_class=3):
    """The Kaggle ILSVRC download: ILSVRC/Data/CLS-LOC/{train/<wnid>, flat val/} and the CSVs beside ILSVRC/."""
    cls_loc = tmp_path / "ILSVRC" / "Data" / "CLS-LOC"
    link_tree(cls_loc, per_class, 0)
    for d in (cls_loc / "val").iterdir():
        d.rmdir()
    truth, n = [], 0
    for cls_dir in sorted((IMAGENETTE / "val").iterdir()):
        for f in sorted(cls_dir.iterdir())[:per_class]:
            n += 1
            image_id = f"ILSVRC2012_val_{n:08d}"
            (cls_loc / "val" / f"{image_id}.JPEG").symlink_to(f)
            truth.append((image_id, cls_dir.name))
    with open(tmp_path / "LOC_val_solution.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["ImageId", "PredictionString"])
        for image_id, wnid in reversed(truth):  # the real CSV is not sorted either
            w.writerow([image_id, f"{wnid} 10 20 100 200 {wnid} 5 5 50 50"])
    with open(tmp_path / "LOC_synset_mapping.txt", "w") as f:
        for cls_dir in sorted((IMAGENETTE / "train").iterdir()):
            f.write(f"{cls_dir.name} name of {cls_dir.name}, other name\n")
    return cls_loc, truth


def test_imagefolder_layout_real_imagenette():
    train_set, val_set, info = data.build_datasets(IMAGENETTE, 64)
    assert (len(train_set), len(val_set)) == (9469, 3925)
    assert info["classes"] == sorted(p.name for p in (IMAGENETTE / "train").iterdir())
    assert info["names"][:2] == ["tench", "English springer"]  # torchvision's names for the wnids
    counts = collections.Counter(label for _, label in val_set.samples)
    assert min(counts.values()) == 357 and max(counts.values()) == 419  # as ../shared/data/README.md says
    x, y, bad = val_set[(0, 0)]
    assert x.dtype == torch.uint8 and x.shape == (3, 64, 64) and y == 0 and bad == -1


@pytest.mark.parametrize("point_at", ["root", "cls-loc"])
def test_kaggle_layout_reads_csv_and_moves_nothing(tmp_path, point_at):
    cls_loc, truth = kaggle_tree(tmp_path)
    before = sorted(p.name for p in (cls_loc / "val").iterdir())
    root = tmp_path if point_at == "root" else cls_loc
    train_set, val_set, info = data.build_datasets(root, 64)
    assert len(train_set) == 30 and len(val_set) == 30
    index = {c: i for i, c in enumerate(info["classes"])}
    got = {p.split("/")[-1][:-5]: label for p, label in val_set.samples}
    assert got == {image_id: index[wnid] for image_id, wnid in truth}
    assert info["names"][0] == "name of n01440764"  # from LOC_synset_mapping.txt
    assert sorted(p.name for p in (cls_loc / "val").iterdir()) == before
    assert val_set[(0, 0)][0].shape == (3, 64, 64)


def test_grayscale_cmyk_and_png_named_jpeg_become_rgb(tmp_path):
    gray = next(p for p in sorted((IMAGENETTE / "val").rglob("*.JPEG")) if Image.open(p).mode == "L")
    src = Image.open(next((IMAGENETTE / "val").rglob("*.JPEG"))).convert("RGB")
    src.convert("CMYK").save(tmp_path / "cmyk.JPEG", format="JPEG")
    src.save(tmp_path / "png.JPEG", format="PNG")
    src.convert("P").save(tmp_path / "palette.JPEG", format="PNG")
    for path in (gray, tmp_path / "cmyk.JPEG", tmp_path / "png.JPEG", tmp_path / "palette.JPEG"):
        assert data.load_rgb(path).mode == "RGB"
        ds = data.ImageList([(str(path), 0)], partial(data.train_transform, sizes=(32,)), seed=0)
        assert ds[(0, 0)][0].shape == (3, 32, 32)


def test_eval_transform_resizes_then_center_crops():
    img = Image.new("RGB", (400, 300))
    assert data.eval_transform(224)(img).shape == (3, 224, 224)
    assert round(224 / data.EVAL_CROP_RATIO) == 256


def test_augmentation_is_a_function_of_seed_epoch_index():
    train_set, _, _ = data.build_datasets(IMAGENETTE, 64, subset=0.01, seed=3, augment=dict(trivial_augment=True))
    a, b, c = train_set[(5, 0)][0], train_set[(5, 0)][0], train_set[(5, 1)][0]
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_subset_is_stratified_and_seeded():
    full, _, _ = data.build_datasets(IMAGENETTE, 64)
    a, _, _ = data.build_datasets(IMAGENETTE, 64, subset=0.2, seed=1)
    b, _, _ = data.build_datasets(IMAGENETTE, 64, subset=0.2, seed=1)
    c, _, _ = data.build_datasets(IMAGENETTE, 64, subset=0.2, seed=2)
    assert a.samples == b.samples and a.samples != c.samples
    per_full = collections.Counter(label for _, label in full.samples)
    per_sub = collections.Counter(label for _, label in a.samples)
    assert all(per_sub[k] == round(0.2 * per_full[k]) for k in per_full)
    assert set(a.samples) <= set(full.samples)
    with pytest.raises(ValueError, match="--subset"):
        data.stratified_subset(full.samples, 0, 0)


@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
def test_eval_sampler_counts_every_image_exactly_once(world):
    n = 103
    seen = [i for r in range(world) for i, _ in data.ShardSampler(n, r, world)]
    assert sorted(seen) == list(range(n))


def steps_of(n, batch, global_batch, world, epoch=2, start=0):
    """{step: {rank: [micro-batches of indices]}} as the StepSamplers of `world` ranks hand them out."""
    out = {}
    for r in range(world):
        s = data.StepSampler(n, batch, global_batch, r, world, seed=5)
        s.set_epoch(epoch, start)
        items = [i for i, e in s]
        assert len(s) == len(items) and all(e == epoch for _, e in s)
        micro = [items[j:j + batch] for j in range(0, len(items), batch)]
        per_rank = global_batch // (batch * world)
        for m, indices in enumerate(micro):
            out.setdefault(start + m // per_rank, {}).setdefault(r, []).append(indices)
    return out


@pytest.mark.parametrize("world,batch", [(1, 8), (2, 8), (4, 4), (1, 16), (2, 4)])
def test_train_sampler_gives_each_step_the_same_images_on_any_number_of_ranks(world, batch):
    """An epoch is one permutation of (seed, epoch) cut into steps of the global batch (16 here), the remainder (101
    mod 16 = 5 images) dropped, not padded; with the same micro-batch size every rank count sees the same images in
    the same micro-batches (micro_batch, which knows nothing of ranks), rank r taking micro-batches r, r + W, ...
    A resume skips whole steps."""
    n, global_batch = 101, 16
    order = data.epoch_order(5, 2, n)
    steps = steps_of(n, batch, global_batch, world)
    assert sorted(steps) == list(range(n // global_batch))
    for step, ranks in steps.items():
        mine = [data.micro_batch(order, step, k, batch, global_batch) for k in range(global_batch // batch)]
        assert [mb for r in range(world) for mb in ranks[r]] == [mine[k] for r in range(world)
                                                                 for k in range(r, len(mine), world)]
        assert sorted(i for r in ranks for mb in ranks[r] for i in mb) == sorted(order[16 * step:16 * step + 16])
    seen = {i for ranks in steps.values() for r in ranks for mb in ranks[r] for i in mb}
    assert len(seen) == 96 and len(set(range(n)) - seen) == 5  # each image once; the 5 left over are dropped
    assert steps_of(n, batch, global_batch, world, start=4) == {s: v for s, v in steps.items() if s >= 4}
    assert data.epoch_order(5, 3, n) != order  # a new order each epoch


def test_clear_errors_on_odd_layouts(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        data.find_splits(tmp_path / "nope")
    with pytest.raises(ValueError, match="holds neither train/ and val/"):
        data.find_splits(tmp_path)
    cls_loc, _ = kaggle_tree(tmp_path / "k")
    (tmp_path / "k" / "LOC_val_solution.csv").unlink()
    with pytest.raises(ValueError, match="LOC_val_solution.csv is missing"):
        data.find_splits(cls_loc)
    root = link_tree(tmp_path / "m", 2, 2)
    (root / "val" / "n01440764").rename(root / "val" / "n00000000")
    with pytest.raises(ValueError, match="other class folders"):
        data.build_datasets(root, 64)
    (root / "train" / "n99999999").mkdir()
    (root / "val" / "n00000000").rename(root / "val" / "n01440764")
    with pytest.raises(ValueError, match="n99999999 holds no images"):
        data.build_datasets(root, 64)
    empty = tmp_path / "e"
    (empty / "train" / "a").mkdir(parents=True)
    (empty / "val" / "a").mkdir(parents=True)
    with pytest.raises(ValueError, match="no images"):
        data.build_datasets(empty, 64)


# -----------------------------------------------------------------------------
# the fast training crop: JPEG draft decoding

def psnr(a, b):
    mse = ((a.float() - b.float()) ** 2).mean().item()
    return 10 * math.log10(255 ** 2 / max(mse, 1e-10))


@needs_samples
@pytest.mark.parametrize("size", [128, 176])
def test_draft_crop_is_torchvisions_crop_at_the_same_quality(size):
    """Same RNG state -> the same crop box and flip as torchvision's RandomResizedCrop + RandomHorizontalFlip on the
    fully decoded image; the pixels differ only by the DCT-domain downscale (PSNR well above JPEG's own noise)."""
    reference = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.PILToTensor()])
    scores, reduced = [], 0
    for k, path in enumerate(sorted(SAMPLES.iterdir())[:40]):
        torch.manual_seed(k)
        ours = data.random_resized_crop(Image.open(path), size)
        torch.manual_seed(k)
        ref = reference(Image.open(path).convert("RGB"))
        assert ours.dtype == torch.uint8 and ours.shape == ref.shape == (3, size, size)
        scores.append(psnr(ours, ref))
        # which files were decoded at reduced scale: redo the draft on the same box
        torch.manual_seed(k)
        img = Image.open(path)
        top, left, h, w = T.RandomResizedCrop.get_params(img, (0.08, 1.0), (3 / 4, 4 / 3))
        full = img.size
        img.draft("RGB", (math.ceil(full[0] * size / w), math.ceil(full[1] * size / h)))
        reduced += img.size != full
        # the box keeps at least size px (or all it had): nothing is upscaled that torchvision would not upscale
        assert img.size[0] * w / full[0] >= min(size, w) - 1e-6 and img.size[1] * h / full[1] >= min(size, h) - 1e-6
    assert reduced >= {128: 8, 176: 2}[size], f"only {reduced} of 40 crops were decoded at reduced scale"
    assert np.median(scores) > 33 and min(scores) > 24, scores


@needs_samples
def test_draft_crop_handles_non_jpeg_and_grayscale(tmp_path):
    src = Image.open(sorted(SAMPLES.iterdir())[0])
    src.convert("L").save(tmp_path / "gray.JPEG")
    src.convert("RGB").save(tmp_path / "png.JPEG", format="PNG")
    src.convert("CMYK").save(tmp_path / "cmyk.JPEG", format="JPEG")
    for name in ("gray.JPEG", "png.JPEG", "cmyk.JPEG"):
        x = data.random_resized_crop(Image.open(tmp_path / name), 64)
        assert x.shape == (3, 64, 64) and x.dtype == torch.uint8


def test_train_sizes_follow_the_epoch():
    train_set, _, _ = data.build_datasets(IMAGENETTE, [32, 48, 64], subset=0.01)
    for epoch, size in enumerate([32, 48, 64, 64]):
        assert train_set[(0, epoch)][0].shape == (3, size, size)


# -----------------------------------------------------------------------------
# --shrink

def test_shrink_copies_the_layout_with_short_sides_capped(tmp_path):
    root = tmp_path / "src"
    link_tree(root, 2, 1)
    big = root / "train" / sorted(os.listdir(root / "train"))[0] / "big.JPEG"
    Image.open(next((IMAGENETTE / "val").rglob("*.JPEG"))).convert("RGB").resize((640, 480)).save(big)
    bad = root / "val" / sorted(os.listdir(root / "val"))[0] / "bad.JPEG"
    bad.write_bytes(b"not a jpeg")
    out = tmp_path / "small"
    counts = data.shrink_dataset(root, out, 120, workers=2)
    src_files = sorted(p.relative_to(root) for p in root.rglob("*.JPEG"))
    assert sorted(p.relative_to(out) for p in out.rglob("*.JPEG")) == src_files
    assert counts == dict(shrunk=2 * 10 + 1, copied=10 + 1)  # train/ shrunk; val/ copied as it is, the bad file too
    assert Image.open(out / big.relative_to(root)).size == (160, 120)
    assert all(min(Image.open(p).size) == 120 for p in (out / "train").rglob("*.JPEG"))
    assert all((out / p).read_bytes() == (root / p).read_bytes() for p in src_files if p.parts[0] == "val")
    assert (out / bad.relative_to(root)).read_bytes() == b"not a jpeg"
    assert data.shrink_dataset(root, out, 120, workers=1) == dict(kept=len(src_files))  # resumable: nothing redone
    train_set, val_set, info = data.build_datasets(out, 64)
    assert len(train_set) == 2 * 10 + 1 and info["classes"] == sorted(os.listdir(root / "train"))
    with pytest.raises(ValueError, match="inside --data"):
        data.shrink_dataset(root, root / "copy", 120, workers=1)


def test_windows_has_no_sessions_and_opens_no_folder(tmp_path, monkeypatch):
    """The CPU quick start on Windows: loader workers without os.setsid, and a checkpoint written where a folder
    cannot be opened to fsync the rename (Windows raises PermissionError). Simulated here; not tested on Windows."""
    import model
    monkeypatch.delattr(os, "setsid")
    data.own_session(0)
    real_open = os.open

    def windows_open(path, flags, *rest):
        if os.path.isdir(path):
            raise PermissionError(13, "Permission denied", path)
        return real_open(path, flags, *rest)

    monkeypatch.setattr(os, "open", windows_open)
    model.save_atomic({"w": torch.ones(3)}, tmp_path / "last.pt")
    assert torch.equal(torch.load(tmp_path / "last.pt", weights_only=True)["w"], torch.ones(3))


def test_the_mixing_seed_follows_the_layout_the_sampler_hands_over(tiny_data, tmp_path, monkeypatch, capfd):
    """train.py seeds each micro-batch's mixing by its index in the epoch, which the StepSampler that laid the epoch
    out hands over (micro_index): laid out another way (here each step's micro-batches in reverse), the images and
    their mixing seeds move together. train.py used to work the index out itself, from the layout of the day."""
    import train
    from conftest import run_here
    mixed, real = [], data.seed_for

    def recording(seed, epoch, index=0, stream=""):
        if stream == "mix":
            mixed.append(index)
        return real(seed, epoch, index, stream)

    monkeypatch.setattr(data, "seed_for", recording)
    monkeypatch.setattr(data.StepSampler, "micro_batches",
                        lambda self, step: range(self.per_step - 1 - self.rank, -1, -self.world))
    sampler = data.StepSampler(160, 16, 32, seed=0)
    order = data.epoch_order(0, 0, 160)
    assert [i for i, _ in sampler] == [i for s in range(5) for k in (1, 0)
                                       for i in data.micro_batch(order, s, k, 16, 32)]  # the images: in reverse
    run_here(train.main, ["--data", tiny_data, "--out", tmp_path / "run", "--arch", "resnet18", "--img-size", "32",
                          "--batch-size", "16", "--accum-steps", "2", "--epochs", "1", "--mixup", "0.2",
                          "--workers", "0", "--log-every", "5"], capfd)
    assert mixed == [2 * s + k for s in range(5) for k in (1, 0)]  # their mixing: the same reverse


@needs_imagenette
def test_seeding_the_cpu_alone_keeps_every_crop_bitwise():
    """ImageList seeds only the CPU generator for each image (data.seed_cpu): torch.manual_seed also seeded CUDA's,
    which where CUDA is not initialized costs a stack trace an image. The crops, flips and augmentations are what
    torch.manual_seed gave, bit for bit: the draws use the CPU generator alone."""
    train_set, _, _ = data.build_datasets(IMAGENETTE, [48, 64], subset=0.01, seed=5,
                                          augment=dict(trivial_augment=True, random_erase=0.5))
    for index, epoch in [(0, 0), (3, 1), (7, 1), (11, 0)]:
        path, _ = train_set.samples[index]
        torch.manual_seed(data.seed_for(5, epoch, index, "crop"))  # the way of before
        reference = train_set.transform(Image.open(path), epoch)
        assert torch.equal(train_set[(index, epoch)][0], reference), (index, epoch)
