"""data.py on real JPEGs: every layout, RGB conversion, subsets, samplers, and clear errors on odd layouts."""
import collections
import csv

import pytest
import torch
from PIL import Image

import data
from conftest import IMAGENETTE, link_tree, needs_imagenette

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
        ds = data.ImageList([(str(path), 0)], data.train_transform(32), seed=0)
        assert ds[(0, 0)][0].shape == (3, 32, 32)


def test_eval_transform_resizes_then_center_crops():
    img = Image.new("RGB", (400, 300))
    assert data.eval_transform(224)(img).shape == (3, 224, 224)
    assert round(224 / data.EVAL_CROP_RATIO) == 256


def test_augmentation_is_a_function_of_seed_epoch_index():
    train_set, _, _ = data.build_datasets(IMAGENETTE, 64, subset=0.01, seed=3, trivial_augment=True)
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
    seen = [i for r in range(world) for i, _ in data.ShardSampler(n, r, world, shuffle=False)]
    assert sorted(seen) == list(range(n))


@pytest.mark.parametrize("world", [1, 2, 3])
def test_train_sampler_shards_pads_and_resumes(world):
    n = 101
    shards = []
    for r in range(world):
        s = data.ShardSampler(n, r, world, shuffle=True, seed=5)
        s.set_epoch(2)
        shards.append([i for i, e in s])
        assert len(s) == len(shards[-1]) == -(-n // world)
        s.set_epoch(2, start=7)  # resuming inside the epoch skips what was already trained on
        assert [i for i, _ in s] == shards[-1][7:]
    assert set().union(*shards) == set(range(n))
    s = data.ShardSampler(n, 0, world, seed=5)
    s.set_epoch(3)
    assert [i for i, _ in s] != shards[0]


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
