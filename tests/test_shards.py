"""shards.py through the real aws CLI against moto's S3 on 127.0.0.1, on real JPEGs in the Kaggle layout: prepare,
then stage, gives the source back file for file; interruptions resume; a damaged or missing shard is one line."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from PIL import Image

import shards as shards_py
import train
from conftest import BIN, ROOT, SAMPLES, aws, needs_samples, run, run_here

pytestmark = needs_samples
KAGGLE_EXTRAS = ("LOC_train_solution.csv", "LOC_sample_submission.csv",
                 "ILSVRC/Data/CLS-LOC/test/ILSVRC2012_test_1.JPEG",
                 "ILSVRC/Annotations/CLS-LOC/train/n01514859/n01514859_1.xml")


@pytest.fixture(scope="module")
def kaggle(tmp_path_factory):
    """The Kaggle download's layout with 24 real full-size JPEGs (3 classes x 6 train, 6 flat val) and its label
    files, a truncated JPEG among the training images, and what the loader never reads (test images, annotations,
    the train CSV)."""
    root = tmp_path_factory.mktemp("kaggle") / "imagenet"
    photos = sorted(SAMPLES.iterdir())
    wnids = ["n01440764", "n02102040", "n03000684"]
    cls = root / "ILSVRC" / "Data" / "CLS-LOC"
    for c, wnid in enumerate(wnids):
        (cls / "train" / wnid).mkdir(parents=True)
        for k in range(6):
            shutil.copy(photos[6 * c + k], cls / "train" / wnid / f"{wnid}_{k}.JPEG")
    (cls / "train" / wnids[0] / f"{wnids[0]}_0.JPEG").write_bytes(photos[0].read_bytes()[:5000])  # truncated
    (cls / "val").mkdir()
    rows = ["ImageId,PredictionString"]
    for k in range(6):
        shutil.copy(photos[20 + k], cls / "val" / f"ILSVRC2012_val_{k:08d}.JPEG")
        rows.append(f"ILSVRC2012_val_{k:08d},{wnids[k % 3]} 1 2 3 4")
    (root / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")
    (root / "LOC_synset_mapping.txt").write_text("".join(f"{w} name {w}\n" for w in wnids))
    for extra in KAGGLE_EXTRAS:
        (root / extra).parent.mkdir(parents=True, exist_ok=True)
        (root / extra).write_bytes(photos[30].read_bytes() if extra.endswith("JPEG") else b"not for the loader")
    return root


def tree(root):
    """{path: sha256} of every file under root, but the stager's own marks."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*")
            if p.is_file() and ".shards" not in p.parts}


def shards(*args, env, check=True):
    return run([sys.executable, str(ROOT / "shards.py"), *map(str, args)],
               env={**env, "PATH": f"{BIN}:{os.environ['PATH']}"}, check=check, timeout=300)


def pack(*args, env, capfd=None, check=True):
    """`shards.py pack` in this process (a real one imports torch, for the check: 5 s); its aws CLI calls are real."""
    with pytest.MonkeyPatch.context() as m:
        for k, v in {**env, "PATH": f"{BIN}:{os.environ['PATH']}"}.items():
            m.setenv(k, v)
        m.setattr(shards_py, "AWS", env.get("AWS", "aws"))
        return run_here(shards_py.main, ["pack", *args], capfd, check)


@pytest.fixture(scope="module")
def packed(kaggle, moto):
    """The tree in S3, packed into shards of about 1 MB (3 of them) by `prepare`'s command."""
    aws(moto, "s3", "mb", "s3://shards-test")
    aws(moto, "s3", "sync", str(kaggle), "s3://shards-test/imagenet")

    def source():  # every object of the source, with its ETag and time: what prepare must never touch
        listing = aws(moto, "s3api", "list-objects-v2", "--bucket", "shards-test", "--prefix", "imagenet/").stdout
        return {o["Key"]: (o["ETag"], o["LastModified"]) for o in json.loads(listing)["Contents"]
                if not o["Key"].startswith("imagenet/shards/")}

    before = source()
    p = pack("s3://shards-test/imagenet", "s3://shards-test/imagenet/shards", "--shard-mb", "1", "--workers", "1",
             env=moto)
    assert source() == before and len(before) == 30  # nothing of the source deleted, changed or added
    manifest = json.loads(aws(moto, "s3", "cp", "s3://shards-test/imagenet/shards/manifest.json", "-").stdout)
    return manifest, p.stdout


def test_prepare_then_stage_gives_the_source_back_file_for_file(kaggle, packed, moto, tmp_path, capfd):
    """Every image of train/ and val/ and both label files, byte for byte, and nothing else; the decode check ran
    once, at prepare, and named the truncated JPEG; train.py --check-data accepts the staged tree."""
    manifest, log = packed
    expected = {rel: h for rel, h in tree(kaggle).items() if rel not in KAGGLE_EXTRAS}
    assert len(expected) == 3 * 6 + 6 + 2 and manifest["files"] == len(expected) and len(manifest["shards"]) == 3
    assert manifest["unreadable"][0].startswith("ILSVRC/Data/CLS-LOC/train/n01440764/n01440764_0.JPEG (")
    assert "in 3 shards of about 0.001 GB" in log
    out = tmp_path / "staged"
    p = shards("unpack", "s3://shards-test/imagenet/shards", out, "--jobs", "3", env=moto)
    assert "MB/s, ETA" in p.stdout and "checked against their sha256" in p.stdout
    assert tree(out) == expected
    report = run_here(train.main, ["--data", out, "--check-data", "--workers", "1"], capfd).stdout
    assert "Kaggle ILSVRC" in report and "18 train images" in report and "1 unreadable files" in report


def test_a_zip_packs_as_its_tree_and_shrinks_the_training_images(kaggle, packed, moto, tmp_path):
    """The Kaggle zip, found in S3 and read in place, holds for prepare what its tree does; --shrink shrinks only the
    training images (the truncated one stays as it was, named by the check)."""
    zipped = tmp_path / "imagenet-object-localization-challenge.zip"
    with zipfile.ZipFile(zipped, "w") as z:
        for p in sorted(kaggle.rglob("*")):
            if p.is_file():
                z.write(p, str(p.relative_to(kaggle)))
    assert [f[:2] for f in shards_py.list_source(str(zipped))] == [f[:2] for f in shards_py.list_source(str(kaggle))]
    aws(moto, "s3", "cp", str(zipped), "s3://shards-test/zipped/")
    pack("s3://shards-test/zipped", "s3://shards-test/zipped/shards", "--shrink", "100", "--shrink-by", "longer",
         "--workers", "1", env=moto)
    out = tmp_path / "small"
    shards("unpack", "s3://shards-test/zipped/shards", out, env=moto)
    staged, source = tree(out), tree(kaggle)
    assert sorted(staged) == sorted(rel for rel in source if rel not in KAGGLE_EXTRAS)
    for rel, digest in staged.items():
        if "/train/" in rel and not rel.endswith("n01440764_0.JPEG"):
            assert max(Image.open(out / rel).size) == 100 and digest != source[rel], rel
        else:
            assert digest == source[rel], rel
    small = json.loads(aws(moto, "s3", "cp", "s3://shards-test/zipped/shards/manifest.json", "-").stdout)
    assert small["shrink"] == {"side": 100, "by": "longer"} and small["bytes"] < packed[0]["bytes"] / 3
    assert len(small["unreadable"]) == 1


FAILING_AWS = """#!/bin/sh
# the real aws, but that the upload of shard-00001.tar fails: prepare is interrupted there
if [ "$1 $2" = "s3 cp" ]; then case "$3" in *shard-00001.tar) echo "upload failed" >&2; exit 1 ;; esac; fi
exec {aws} "$@"
"""


def test_an_interrupted_prepare_resumes_and_finishes(kaggle, packed, moto, tmp_path, capfd):
    stand_in = tmp_path / "aws"
    stand_in.write_text(FAILING_AWS.format(aws=Path(BIN) / "aws"))
    stand_in.chmod(0o755)
    dest = "s3://shards-test/again/shards"
    p = pack(kaggle, dest, "--shard-mb", "1", "--workers", "1", env={**moto, "AWS": str(stand_in)}, capfd=capfd,
             check=False)
    assert p.returncode == 2 and "shards.py: error: aws s3 cp" in p.stderr.strip().splitlines()[-1]
    assert aws(moto, "s3", "ls", f"{dest}/manifest.json", check=False).returncode != 0  # not committed
    p = pack(kaggle, dest, "--shard-mb", "1", "--workers", "1", env=moto, capfd=capfd)
    assert "1 already there" in p.stdout
    got = json.loads(aws(moto, "s3", "cp", f"{dest}/manifest.json", "-").stdout)
    assert [s["sha256"] for s in got["shards"]] == [s["sha256"] for s in packed[0]["shards"]]


def test_a_damaged_or_missing_shard_is_one_line_and_staging_resumes(kaggle, packed, moto, tmp_path):
    """A shard whose bytes changed in S3 fails its sha256: one line names it and the fix, its own files are removed
    and the other shards stay extracted; restored, the same command extracts that shard alone. A missing one is
    named too."""
    manifest, _ = packed
    prefix = "s3://shards-test/imagenet/shards"
    victim = manifest["shards"][1]["name"]
    original = tmp_path / "original.tar"
    aws(moto, "s3", "cp", f"{prefix}/{victim}", str(original))
    damaged = bytearray(original.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    (tmp_path / "damaged.tar").write_bytes(bytes(damaged))
    aws(moto, "s3", "cp", str(tmp_path / "damaged.tar"), f"{prefix}/{victim}")
    out = tmp_path / "staged"
    p = shards("unpack", prefix, out, env=moto, check=False)
    line = p.stderr.strip().splitlines()[-1]
    assert p.returncode == 2 and f"{prefix}/{victim} does not match its sha256" in line and "prepare" in line
    theirs = {rel for rel, _ in manifest["shards"][1]["files"]}
    assert not theirs & set(tree(out)) and len(tree(out)) == manifest["files"] - len(theirs)
    aws(moto, "s3", "cp", str(original), f"{prefix}/{victim}")
    p = shards("unpack", prefix, out, env=moto)
    assert "1 to extract" in p.stdout and tree(out) == {r: h for r, h in tree(kaggle).items() if r not in KAGGLE_EXTRAS}
    aws(moto, "s3", "rm", f"{prefix}/{victim}")
    p = shards("unpack", prefix, tmp_path / "fresh", env=moto, check=False)
    assert p.returncode == 2 and f"{prefix}/{victim} is missing from S3" in p.stderr.strip().splitlines()[-1]
    aws(moto, "s3", "cp", str(original), f"{prefix}/{victim}")  # as it was, for the other tests


def test_run_ec2_data_stages_the_shards_it_finds_beside_s3_data(kaggle, packed, moto, tmp_path):
    """`./run_ec2.sh data` finds the shards from S3_DATA alone and stages them (here onto the root volume: a stand-in
    lsblk lists no instance store), marking the wait in OUT/timeline.jsonl."""
    lsblk = tmp_path / "lsblk"
    lsblk.write_text("#!/bin/sh\nexit 0\n")
    lsblk.chmod(0o755)
    env = {**moto, "S3_DATA": "s3://shards-test/imagenet", "DATA_DIR": str(tmp_path / "data"), "LSBLK": str(lsblk),
           "OUT": str(tmp_path / "out"), "PATH": f"{BIN}:{os.environ['PATH']}", "IMDS_URL": "http://127.0.0.1:9"}
    p = run([str(ROOT / "run_ec2.sh"), "data"], env=env, timeout=300)
    assert "no instance store on this instance: DATA_DIR stays on the root volume" in p.stderr
    assert f"staging s3://shards-test/imagenet/shards (0 GB) into {tmp_path / 'data'}" in p.stderr
    assert tree(tmp_path / "data") == {r: h for r, h in tree(kaggle).items() if r not in KAGGLE_EXTRAS}
    events = [json.loads(line)["event"] for line in (tmp_path / "out" / "timeline.jsonl").read_text().splitlines()]
    assert events == ["data_start", "data_end"]


def put_manifest(moto, prefix, manifest):
    subprocess.run([str(Path(BIN) / "aws"), "s3", "cp", "-", f"{prefix}/manifest.json"], input=json.dumps(manifest),
                   text=True, check=True, env={**os.environ, **moto})


def test_a_crafted_manifest_or_zip_never_reaches_outside_the_folder(packed, moto, tmp_path):
    """A manifest's file names were joined to DATA_DIR unchecked: a shard failing its sha256 removed '../victim' and
    an absolute path, and a shard named with '..' wrote its done-mark outside the folder; pack took a zip entry
    'train/../../x.jpg'. Now every name is checked before anything is touched, and refused with one line."""
    manifest, _ = packed
    good = manifest["shards"][0]
    outside, absolute = tmp_path / "victim.txt", tmp_path / "elsewhere" / "abs.txt"
    absolute.parent.mkdir()
    for f in (outside, absolute):
        f.write_text("somebody's file")
    root = tmp_path / "data"
    root.mkdir()
    prefix = "s3://shards-test/crafted/shards"
    aws(moto, "s3", "cp", f"s3://shards-test/imagenet/shards/{good['name']}", f"{prefix}/{good['name']}")
    for files, name, said in (([["../victim.txt", 1]], good["name"], "'../victim.txt', a '..'"),
                              ([[str(absolute), 1]], good["name"], "an absolute path"),
                              ([["notes/x.txt", 1]], good["name"], "outside train/, val/ and the label files"),
                              (good["files"], "../../outside.tar", "not shard-NNNNN.tar")):
        put_manifest(moto, prefix, dict(version=1, files=1, bytes=1, shards=[
            dict(name=name, bytes=good["bytes"], sha256="0" * 64, files=files)]))  # a sha256 that fails
        p = shards("unpack", prefix, root, env=moto, check=False)
        assert p.returncode == 2 and said in p.stderr.strip().splitlines()[-1], p.stderr
        assert "refused before touching anything" in p.stderr and list(root.iterdir()) == []
    assert outside.read_text() == absolute.read_text() == "somebody's file"
    assert not (tmp_path / "outside.tar").exists()
    zipped = tmp_path / "crafted.zip"
    with zipfile.ZipFile(zipped, "w") as z:
        z.writestr("train/n0/a.JPEG", b"x")
        z.writestr("train/../../x.jpg", b"x")
    p = pack(zipped, "s3://shards-test/crafted-zip/shards", "--workers", "1", env=moto, check=False)
    assert p.returncode == 2 and "'train/../../x.jpg', a '..', '.' or empty part" in p.stderr.strip().splitlines()[-1]


def test_a_done_mark_counts_only_for_its_own_shard_and_prefix(packed, moto, tmp_path):
    """unpack skipped a shard when a mark of its name existed: staging prefix q into a folder staged from prefix p
    extracted nothing and still said 'checked against their sha256'. A mark now holds the shard's sha256 and its
    prefix; one that says otherwise is staged again."""
    manifest, _ = packed
    p_prefix, q_prefix = "s3://shards-test/imagenet/shards", "s3://shards-test/other/shards"
    other = manifest["shards"][1]  # q's one shard: p's second one, under the name of p's first
    aws(moto, "s3", "cp", f"{p_prefix}/{other['name']}", f"{q_prefix}/shard-00000.tar")
    put_manifest(moto, q_prefix, dict(version=1, files=len(other["files"]), bytes=other["bytes"],
                                      shards=[dict(other, name="shard-00000.tar")]))
    root = tmp_path / "data"
    assert "3 to extract" in shards("unpack", p_prefix, root, env=moto).stdout
    assert "0 to extract" in shards("unpack", p_prefix, root, env=moto).stdout  # done, and said so
    assert "1 to extract" in shards("unpack", q_prefix, root, env=moto).stdout  # shard-00000.tar is another here
    assert (root / ".shards" / "shard-00000.tar").read_text() == f"{other['sha256']} {q_prefix}\n"
    (root / ".shards" / "shard-00000.tar").write_text(f"{other['sha256']}\n")  # a mark from before the prefix
    assert "1 to extract" in shards("unpack", q_prefix, root, env=moto).stdout
