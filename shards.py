"""
ImageNet as uncompressed tar shards of about 1 GB in S3, made once, then staged onto a GPU instance's fastest disk in
minutes. run_ec2.sh's `prepare` and `data` run it; it needs the aws CLI.

    python shards.py pack s3://my-bucket/imagenet-1k s3://my-bucket/imagenet-1k/shards        # the Kaggle zip or a tree
    python shards.py pack ~/imagenet s3://my-bucket/imagenet-1k/shards --shrink 320            # from a laptop's copy
    python shards.py unpack s3://my-bucket/imagenet-1k/shards /mnt/imagenet                    # on the GPU instance

pack takes the train and val images and the label files the loader reads (LOC_val_solution.csv,
LOC_synset_mapping.txt), not the test images nor the annotations, in their own layout. It decodes every image once
(the check train.py --check-data makes, here once per dataset rather than on every GPU instance) and can shrink the
training images on the way (train.py --shrink's code). After each shard it writes the shard's entry of the manifest
(its files, their sizes, its sha256) to DEST/parts/, so an interrupted pack resumes at the first shard without one;
DEST/manifest.json comes last, the commit point. It never writes outside DEST, and never deletes anything in S3.

unpack streams the shards from S3 straight into extraction, several at a time, checks each against its sha256 on
the way, and shows MB/s and an ETA. A shard already extracted is skipped on a restart; a missing or damaged one is
named, with the fix, and only the files it lists are removed. unpack needs nothing but Python's standard library: it
runs before setup has made the virtual environment.
"""
import argparse
import concurrent.futures
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import zipfile

SHARD_BYTES = 10**9  # a shard holds about this much of the source's files (less when shrunk)
LABEL_FILES = ("LOC_val_solution.csv", "LOC_synset_mapping.txt")  # at the Kaggle download's top
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")  # data.IMG_EXTENSIONS
AWS = os.environ.get("AWS", "aws")


class ShardError(Exception):
    """A problem with one shard or the manifest, said in one line with its fix."""


def aws(*args, stdin=None, check=True):
    p = subprocess.run([AWS, *args], input=stdin, capture_output=True)
    if check and p.returncode != 0:
        raise ShardError(f"aws {' '.join(args[:3])} failed: {p.stderr.decode().strip().splitlines()[-1:]}")
    return p


def s3_get(url):
    """An object's bytes, or None where there is none."""
    p = aws("s3", "cp", url, "-", "--only-show-errors", check=False)
    return p.stdout if p.returncode == 0 else None


def s3_put(url, body=None, path=None):
    if path is not None:
        aws("s3", "cp", path, url, "--only-show-errors")
    else:
        aws("s3", "cp", "-", url, "--only-show-errors", stdin=body)


def s3_names(prefix):
    """The names of the objects right under prefix/."""
    p = aws("s3", "ls", prefix.rstrip("/") + "/", check=False)
    return [line.split()[-1] for line in p.stdout.decode().splitlines() if line and not line.split()[-1].endswith("/")]


# -----------------------------------------------------------------------------
# pack

def unsafe(rel):
    """Why a file's name, as a manifest or a zip gives it, must not be used, or None: an absolute path, a '..', an
    empty or '.' part, or a backslash could write or delete outside the folder it is staged into."""
    parts = rel.split("/")
    if rel.startswith("/") or "\\" in rel or re.match(r"^[A-Za-z]:", rel):
        return "an absolute path"
    if any(part in ("", ".", "..") for part in parts):
        return "a '..', '.' or empty part"
    return None


def check_names(names, where):
    """Every name of a manifest or a zip safe, before anything is read, written or removed; else one line."""
    for rel in names:
        why = unsafe(rel)
        if why:
            raise ShardError(f"{where} names {rel!r}, {why}: refused before touching anything; pack the shards anew "
                             f"from a trusted copy (./run_ec2.sh prepare)")


def wanted(rel):
    """Whether a file of the source goes into the shards: the images of train/ and val/ (ImageFolder, or the Kaggle
    layout's ILSVRC/Data/CLS-LOC/) and the two label files; not test/, not Annotations/, nothing else."""
    parts = rel.split("/")
    if rel in LABEL_FILES:
        return True
    if parts[:3] == ["ILSVRC", "Data", "CLS-LOC"]:
        parts = parts[3:]
    return len(parts) >= 2 and parts[0] in ("train", "val") and rel.lower().endswith(IMAGE_EXTENSIONS)


def list_source(src):
    """[(path in the dataset, size, how to read it)] of the files that go in, sorted, from a folder or a zip."""
    if os.path.isdir(src):
        found = []
        for d, _, names in os.walk(src):
            for name in names:
                path = os.path.join(d, name)
                rel = os.path.relpath(path, src).replace(os.sep, "/")
                if wanted(rel):
                    found.append((rel, os.path.getsize(path), ("file", path)))
        return sorted(found)
    with zipfile.ZipFile(src) as z:  # the Kaggle download, read in place: no second copy on the disk
        check_names([i.filename.rstrip("/") for i in z.infolist()], src)
        top = os.path.commonprefix([i.filename for i in z.infolist()]).split("/")[0] + "/"
        cut = len(top) if all(i.filename.startswith(top) for i in z.infolist()) and top != "/" else 0
        return sorted((i.filename[cut:], i.file_size, ("zip", src, i.filename)) for i in z.infolist()
                      if not i.is_dir() and wanted(i.filename[cut:]))


def plan(files, shard_bytes=SHARD_BYTES):
    """The shards: consecutive files of the sorted list, about shard_bytes of them each. Depends on the source
    alone, so that an interrupted pack finds the same shards again."""
    shards, current, size = [], [], 0
    for f in files:
        if current and size + f[1] > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(f)
        size += f[1]
    return shards + ([current] if current else [])


ZIPS = {}  # a worker's open zips: the Kaggle zip's index of 1.3 M entries is read once, not once a file


def read(source):
    if source[0] == "file":
        with open(source[1], "rb") as f:
            return f.read()
    if source[1] not in ZIPS:
        ZIPS[source[1]] = zipfile.ZipFile(source[1])
    return ZIPS[source[1]].read(source[2])


def prepare_file(job):
    """One file, in a worker process: its bytes, decoded once (the check), the training images shrunk if asked.
    Returns (path, bytes, kind or None, the decoder's error or None)."""
    import data  # Pillow and the shrinking code: pack only (unpack runs before the venv exists)
    rel, source, side, by = job
    raw = read(source)
    if not rel.lower().endswith(IMAGE_EXTENSIONS):
        return rel, raw, None, None
    kind, error = data.inspect_bytes(raw, rel)
    train = "/train/" in f"/{rel}"
    small = data.shrink_bytes(raw, side, by) if side and train and not error else None
    return rel, raw if small is None else small, kind, error


def tar_member(rel, body):
    info = tarfile.TarInfo(rel)
    info.size, info.mode, info.mtime = len(body), 0o644, 0  # the same bytes for the same files, whenever packed
    return info


def write_shard(path, packed):
    """The tar of `packed` (prepare_file's (rel, body, kind, error), in order) at `path`; returns its manifest entry
    but the name: bytes, sha256, the files listed, the kinds of image and the unreadable ones."""
    digest, listed, kinds, bad = hashlib.sha256(), [], {}, []
    with open(path, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for rel, body, kind, error in packed:
            tar.addfile(tar_member(rel, body), io.BytesIO(body))
            listed.append([rel, len(body)])
            if kind:
                kinds[kind] = kinds.get(kind, 0) + 1
            bad += [f"{rel} ({error})"] if error else []
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return dict(bytes=os.path.getsize(path), sha256=digest.hexdigest(), files=listed, kinds=kinds, unreadable=bad)


def pack(src, dest, side=None, by="shorter", workers=None, scratch=None, shard_bytes=SHARD_BYTES):
    """The shards of `src` (a folder, a zip, or the s3:// prefix of either) under `dest` (s3://...), resuming."""
    import multiprocessing
    dest = dest.rstrip("/")
    if s3_get(f"{dest}/manifest.json") is not None:
        print(f"{dest}/manifest.json exists: the shards are complete, nothing to do")
        return json.loads(s3_get(f"{dest}/manifest.json"))
    scratch = scratch or tempfile.mkdtemp(prefix="shards-")
    src = fetch_source(src, dest, scratch)
    files = list_source(src)
    if not all(any(f"/{split}/" in f"/{rel}" for rel, _, _ in files) for split in ("train", "val")):
        raise ShardError(f"{src} holds no train/ and val/ images (ImageFolder or the Kaggle layout); see README "
                         f"'Data layouts'")
    shards = plan(files, shard_bytes)
    done = {name[:-len(".json")] for name in s3_names(f"{dest}/parts") if name.endswith(".json")}
    total = sum(size for _, size, _ in files)
    shrunk = f", the training images shrunk to a {by} side of {side} px" if side else ""
    print(f"{src}: {len(files)} files, {total / 1e9:.1f} GB, in {len(shards)} shards of about "
          f"{shard_bytes / 1e9:.3g} GB to {dest}{shrunk}" + (f"; {len(done)} already there" if done else ""),
          flush=True)
    t0, packed, upload, entries = time.time(), 0, None, {}
    with multiprocessing.Pool(workers) as pool:
        for k, shard in enumerate(shards):
            name = f"shard-{k:05d}.tar"
            if name in done:
                continue
            path, jobs = os.path.join(scratch, name), [(rel, source, side, by) for rel, _, source in shard]
            entry = entries[name] = dict(name=name, **write_shard(path, pool.imap(prepare_file, jobs, chunksize=16)))
            bad = entry["unreadable"]
            if upload is not None:
                upload.join()  # one upload at a time, while the next shard packs
                if upload.error:
                    raise upload.error
            upload = Upload(dest, path, entry)
            packed += sum(size for _, size, _ in shard)
            rate = packed / (time.time() - t0)
            print(f"{k + 1}/{len(shards)} shards packed, {rate / 1e6:.0f} MB/s of source, ETA "
                  f"{(total - packed) / rate / 60:.0f} min" + (f"; unreadable: {', '.join(bad)}" if bad else ""),
                  flush=True)
    if upload is not None:
        upload.join()
        if upload.error:
            raise upload.error
    entries = [entries.get(f"shard-{k:05d}.tar") or json.loads(s3_get(f"{dest}/parts/shard-{k:05d}.tar.json"))
               for k in range(len(shards))]  # those of an earlier, interrupted pack from S3
    kinds = {}
    for e in entries:
        for kind, n in e["kinds"].items():
            kinds[kind] = kinds.get(kind, 0) + n
    manifest = dict(version=1, shards=[{k: e[k] for k in ("name", "bytes", "sha256", "files")} for e in entries],
                    files=sum(len(e["files"]) for e in entries), bytes=sum(e["bytes"] for e in entries),
                    shrink=dict(side=side, by=by) if side else None, kinds=kinds,
                    unreadable=[b for e in entries for b in e["unreadable"]])
    s3_put(f"{dest}/manifest.json", json.dumps(manifest).encode())  # the commit point: the shards are complete
    print(f"{dest}/manifest.json: {manifest['files']} files in {len(entries)} shards, {manifest['bytes'] / 1e9:.1f} "
          f"GB; kinds: {kinds}; {len(manifest['unreadable'])} unreadable (training replaces them)", flush=True)
    return manifest


class Upload(threading.Thread):
    """A shard to S3, then its part of the manifest; the local copy is removed after."""

    def __init__(self, dest, path, entry):
        super().__init__(daemon=True)
        self.dest, self.path, self.entry, self.error = dest, path, entry, None
        self.start()

    def run(self):
        try:
            s3_put(f"{self.dest}/{self.entry['name']}", path=self.path)
            s3_put(f"{self.dest}/parts/{self.entry['name']}.json", json.dumps(self.entry).encode())
            os.remove(self.path)
        except ShardError as e:
            self.error = e


def fetch_source(src, dest, scratch):
    """A local folder or zip of the source: src itself, or, for s3://, the zip found there, or the tree, copied
    into scratch (never the shards' own prefix)."""
    if not src.startswith("s3://"):
        if not os.path.exists(src):
            raise ShardError(f"{src} does not exist; pass the dataset's folder, its Kaggle zip, or its s3:// prefix")
        return src
    src = src.rstrip("/")
    if dest == src or dest.startswith(src + "/") and not dest[len(src) + 1:].startswith("shards"):
        raise ShardError(f"the shards' prefix {dest} would mix with the source {src}: use {src}/shards")
    zips = [name for name in s3_names(src) if name.endswith(".zip")]
    if zips:
        local = os.path.join(scratch, zips[0])
        print(f"copying {src}/{zips[0]} to {local} ...", flush=True)
        aws("s3", "cp", f"{src}/{zips[0]}", local, "--only-show-errors")
        return local
    local = os.path.join(scratch, "source")
    print(f"copying the tree {src} to {local} ...", flush=True)
    aws("s3", "sync", src, local, "--only-show-errors", "--exclude", "shards*", "--exclude", "*/test/*",
        "--exclude", "*Annotations*")
    return local


# -----------------------------------------------------------------------------
# unpack

class Hashing(io.RawIOBase):
    """A stream that hashes what is read from it."""

    def __init__(self, stream):
        self.stream, self.digest, self.read_bytes = stream, hashlib.sha256(), 0

    def readable(self):
        return True

    def readinto(self, buffer):
        n = self.stream.readinto(buffer)
        self.digest.update(memoryview(buffer)[:n])
        self.read_bytes += n
        return n


def remove_listed(entry, root):
    """A failed shard's own files, the ones the manifest lists for it, and nothing else of the folder."""
    for rel, _ in entry["files"]:
        path = os.path.join(root, rel)
        if os.path.isfile(path):
            os.remove(path)


def extract_stream(raw, entry, root):
    """The tar read from the binary stream `raw` into `root`, the files its manifest entry lists and nothing else;
    returns the sha256 of every byte read."""
    stream, listed = Hashing(raw), {rel for rel, _ in entry["files"]}
    with tarfile.open(fileobj=io.BufferedReader(stream, 1 << 20), mode="r|") as tar:
        for member in tar:
            if member.name not in listed or not member.isfile():
                raise ShardError(f"{entry['name']} holds {member.name}, which its manifest does not list")
            tar.extract(member, root, filter="data")
    while stream.read(1 << 20):  # the tar's padding, into the hash too
        pass
    return stream.digest.hexdigest()


def extract(url, entry, root):
    """Stream one shard from S3 into `root`, checking its sha256; its files stay only if it matches."""
    fix = f"delete parts/{entry['name']}.json beside it and run ./run_ec2.sh prepare again, which packs it anew"
    proc = subprocess.Popen([AWS, "s3", "cp", url, "-", "--only-show-errors"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        digest = extract_stream(proc.stdout, entry, root)
    except (tarfile.TarError, OSError, ShardError) as e:
        proc.kill()
        remove_listed(entry, root)
        if isinstance(e, OSError) and e.errno == 28:  # ENOSPC
            raise ShardError(f"the disk of {root} is full while extracting {entry['name']}; free space or use the "
                             f"shrunk shards (./run_ec2.sh prepare with SHRINK)") from None
        error = proc.stderr.read().decode().strip()
        proc.wait()
        if "does not exist" in error or "404" in error or "NoSuchKey" in error:
            raise ShardError(f"{url} is missing from S3 though the manifest lists it; {fix}") from None
        raise ShardError(f"{url} cannot be read as a tar ({e}); {fix}") from None
    error = proc.stderr.read().decode().strip()
    if proc.wait() != 0:
        remove_listed(entry, root)
        raise ShardError(f"{url} could not be read from S3 ({error.splitlines()[-1:]}); check S3_DATA and the "
                         f"instance's role, then run ./run_ec2.sh data again")
    if digest != entry["sha256"]:
        remove_listed(entry, root)
        raise ShardError(f"{url} does not match its sha256 in the manifest: the object was damaged or replaced; {fix}")
    return entry["bytes"]


def read_mark(path):
    """[sha256, prefix] that a done shard's mark holds ([sha256] in marks written before they held the prefix)."""
    try:
        with open(path) as f:
            return f.read().split()
    except FileNotFoundError:
        return None


def unpack(src, root, jobs=8):
    """Every shard of the manifest under `src` into `root`, `jobs` at a time; those already extracted skipped."""
    src = src.rstrip("/")
    raw = s3_get(f"{src}/manifest.json")
    if raw is None:
        raise ShardError(f"no {src}/manifest.json: the shards are not there, or their pack did not finish; run "
                         f"./run_ec2.sh prepare (it resumes)")
    manifest = json.loads(raw)
    for e in manifest["shards"]:  # every name checked before anything is touched: a shard's, then its files'
        if not re.fullmatch(r"shard-[0-9]+\.tar", e["name"]):
            raise ShardError(f"{src}/manifest.json names a shard {e['name']!r}, not shard-NNNNN.tar: refused before "
                             f"touching anything; pack the shards anew from a trusted copy (./run_ec2.sh prepare)")
        check_names([rel for rel, _ in e["files"]], f"{src}/manifest.json ({e['name']})")
        bad = [rel for rel, _ in e["files"] if not wanted(rel)]
        if bad:
            raise ShardError(f"{src}/manifest.json ({e['name']}) names {bad[0]!r}, outside train/, val/ and the label "
                             f"files: refused before touching anything; pack the shards anew (./run_ec2.sh prepare)")
    marks = os.path.join(root, ".shards")
    os.makedirs(marks, exist_ok=True)
    free = shutil.disk_usage(root).free
    # a shard is done when its mark holds this manifest's sha256 of it and this prefix: a folder staged from other
    # shards (another prefix, a pack made anew) has marks of the same names that say otherwise, and is staged again
    todo = [e for e in manifest["shards"] if read_mark(os.path.join(marks, e["name"])) != [e["sha256"], src]]
    need = sum(e["bytes"] for e in todo)
    if need > free:
        raise ShardError(f"{root} has {free / 1e9:.0f} GB free, the shards need {need / 1e9:.0f} GB: use a larger "
                         f"disk or the shrunk shards")
    print(f"{src}: {len(manifest['shards'])} shards, {manifest['bytes'] / 1e9:.1f} GB; {len(todo)} to extract into "
          f"{root}, {jobs} at a time", flush=True)
    t0, got, errors = time.time(), 0, []
    with concurrent.futures.ProcessPoolExecutor(jobs) as pool:
        running = {pool.submit(extract, f"{src}/{e['name']}", e, root): e for e in todo}
        for future in concurrent.futures.as_completed(running):
            entry = running[future]
            try:
                got += future.result()
            except ShardError as e:  # the others go on: a restart then redoes this one alone
                errors.append(str(e))
                continue
            with open(os.path.join(marks, entry["name"]), "w") as f:  # extracted and checked: skipped on a restart
                f.write(f"{entry['sha256']} {src}\n")
            rate = got / max(time.time() - t0, 1e-9)
            print(f"{entry['name']}: {len(os.listdir(marks))}/{len(manifest['shards'])} shards, "
                  f"{rate / 1e6:.0f} MB/s, ETA {(need - got) / rate / 60:.1f} min", flush=True)
    if errors:
        raise ShardError(errors[0] + (f" ({len(errors) - 1} more shards failed)" if len(errors) > 1 else ""))
    print(f"{root}: {manifest['files']} files from {len(manifest['shards'])} shards, checked against their sha256",
          flush=True)
    return manifest


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("pack", help="the source into shards in S3")
    a.add_argument("src", help="a dataset folder, its Kaggle zip, or the s3:// prefix of either")
    a.add_argument("dest", help="s3:// prefix of the shards, e.g. S3_DATA/shards")
    a.add_argument("--shrink", type=int, metavar="PX", help="shrink the training images to this side, px")
    a.add_argument("--shrink-by", default="shorter", choices=["shorter", "longer"], help="which side --shrink caps")
    a.add_argument("--workers", type=int, default=os.cpu_count(), help="processes that read, check and shrink")
    a.add_argument("--scratch", help="a local folder for the source's copy and a shard at a time; default: a temp")
    a.add_argument("--shard-mb", type=float, default=SHARD_BYTES / 1e6, help="MB of the source a shard holds")
    b = sub.add_parser("unpack", help="the shards onto a local folder")
    b.add_argument("src", help="s3:// prefix of the shards")
    b.add_argument("root", help="the folder to extract into (train.py --data)")
    b.add_argument("--jobs", type=int, default=8, help="shards at a time")
    args = p.parse_args(argv)
    try:
        if args.command == "pack":
            pack(args.src, args.dest, args.shrink, args.shrink_by, args.workers, args.scratch, int(args.shard_mb * 1e6))
        else:
            unpack(args.src, args.root, args.jobs)
    except ShardError as e:
        print(f"shards.py: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
