"""
The data that tools/gpu_check.py takes to a lent GPU machine. That machine has no network, and the working tree that
travels to it may hold 64 MiB in all, the code included, so the data is chosen by measuring:

- full/: 30 of the full-size ImageNet JPEGs of ../shared/data/imagenet-samples (the loader's and nvJPEG's rates);
- imagenette.zip (stored, not compressed: one file instead of 13,394), holding
  - val/: Imagenette's whole validation split at the evaluation's resize, a 146 px shorter side, quality 70:
    train.py's evaluation at --eval-size 128 resizes to 146 (a no-op here) and crops its 128 px center, as on the
    originals (only the resampling filter and the JPEG coding differ);
  - train/: its whole training split, shrunk to a 128 px shorter side at quality 65 (from Imagenette's 224 px
    squares): a smaller side and a lower quality, rather than a subset.
TorchCodec's wheel (torchcodec 0.17.0 for Python 3.12, +cu130, 10 MB) would take a sixth of the 64 MiB: it stays
behind, and gpu_check.py decodes on the GPU with torchvision's nvJPEG path (its own GPU decode step says so).

    python tools/gpu_data.py                      # into gpu_data/ (git-ignored), then says what the tree weighs

It refuses to write a copy that, with the working tree, passes --budget-mib.
"""
import argparse
import json
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import data  # noqa: E402  (the repository's, from tools/)


def tree_bytes():
    """The bytes of the working tree that travels to the device: git's files, and the untracked ones it does not
    ignore (the device tool's rule)."""
    names = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "-co", "--exclude-standard"],
                           capture_output=True, check=True).stdout.decode().split("\0")
    return sum((ROOT / n).stat().st_size for n in names if n and (ROOT / n).is_file())


def shrunk(src, side, quality):
    """One JPEG's bytes, shrunk to a `side` px shorter side at `quality` (as they are where it is that small)."""
    raw = src.read_bytes()
    small = data.shrink_bytes(raw, side, quality=quality) if side else None
    return raw if small is None else small


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shared", default=str(ROOT.parent / "shared" / "data"), help="../shared/data")
    p.add_argument("--out", default=str(ROOT / "gpu_data"))
    p.add_argument("--full", type=int, default=30, help="full-size JPEGs")
    p.add_argument("--train-side", type=int, default=128)
    p.add_argument("--train-quality", type=int, default=65)
    p.add_argument("--val-side", type=int, default=146, help="the evaluation's resize at --eval-size 128")
    p.add_argument("--val-quality", type=int, default=70)
    p.add_argument("--per-class", type=int, default=None, help="at most this many images a class and split (tests)")
    p.add_argument("--budget-mib", type=float, default=64.0, help="the working tree and this copy together")
    args = p.parse_args(argv)
    shared, out = Path(args.shared), Path(args.out)
    samples, nette = shared / "imagenet-samples", shared / "imagenette-224"
    if not samples.is_dir() or not nette.is_dir():
        sys.exit(f"gpu_data.py: error: no {samples} or {nette}: run it beside ../shared (README 'Quick start')")
    if out.exists() and any(out.iterdir()):
        sys.exit(f"gpu_data.py: error: {out} is not empty: remove it first (it is this script's copy), or pick --out")
    sizes = dict(full=0, train=0, val=0)
    (out / "full").mkdir(parents=True, exist_ok=True)
    for f in sorted(samples.iterdir())[:args.full]:
        sizes["full"] += (out / "full" / f.name).write_bytes(f.read_bytes())
    with zipfile.ZipFile(out / "imagenette.zip.tmp", "w", zipfile.ZIP_STORED) as z:
        for split, side, quality in (("train", args.train_side, args.train_quality),
                                     ("val", args.val_side, args.val_quality)):
            for cls in sorted((nette / split).iterdir()):
                for f in sorted(cls.iterdir())[:args.per_class]:
                    jpeg = shrunk(f, side, quality)
                    z.writestr(f"{split}/{cls.name}/{f.name}", jpeg)
                    sizes[split] += len(jpeg)
    (out / "imagenette.zip.tmp").replace(out / "imagenette.zip")
    sizes["zip"] = (out / "imagenette.zip").stat().st_size
    record = dict(vars(args), bytes=sizes, tree_bytes=tree_bytes())
    (out / "manifest.json").write_text(json.dumps(record, indent=1))
    total = (sizes["full"] + sizes["zip"] + record["tree_bytes"]) / 2**20
    print(f"gpu_data.py: {out}: full {sizes['full'] / 2**20:.1f} MiB; train {sizes['train'] / 2**20:.1f} MiB "
          f"({args.train_side} px, q{args.train_quality}) and val {sizes['val'] / 2**20:.1f} MiB ({args.val_side} px, "
          f"q{args.val_quality}) in imagenette.zip, {sizes['zip'] / 2**20:.1f} MiB; with the working tree "
          f"({record['tree_bytes'] / 2**20:.1f} MiB): {total:.1f} MiB of {args.budget_mib:.0f}")
    if total > args.budget_mib:
        sys.exit(f"gpu_data.py: error: {total:.1f} MiB passes --budget-mib {args.budget_mib:.0f}: lower "
                 f"--train-side or --train-quality (and remove {out})")


if __name__ == "__main__":
    main()
