"""
What this project's GPU paths do, measured in one run on a lent GPU machine (BENCHMARKS.md "GPU"), with the data
that tools/gpu_data.py copies into gpu_data/ beside the code:

    python tools/gpu_check.py --out $OUT                                 # on the GPU: about 7 minutes
    python tools/gpu_check.py --out /tmp/gc --device cpu --tiny --data D  # every step in seconds on a CPU (a test)

The steps, in order of value, each with its own time limit, and started only while the run's --budget-s allows it:
1. versions (python, torch, torchvision, CUDA, cuDNN, the card as nvidia-smi names it); a failed import stops the
   run with one line;
2. the bare training step (bench.py --steps-only): bf16 channels_last at 128-224 px, compiled at 176, fp16 at 224;
   images/s and peak memory;
3. train.py end to end on Imagenette at --img-size 128 --eval-size 128 --tta none, the default recipe otherwise:
   5 epochs, its steady images/s against the bare step at 128 px, each epoch's overhead, top-1 (20 epochs last,
   if the budget allows);
4. the loader (bench.py --loader-only) on the full-size JPEGs and on the training copy, per core and in a
   DataLoader of train.py's workers, and whether it feeds the step at each size;
5. the paths users hit: torchrun over NCCL stopped by SIGTERM mid-epoch and resumed; an epoch in fp16 (its loss
   and the loss scaler's scale); --compile with progressive resizing (recompiles, and what they cost); a real CUDA
   out-of-memory error (torch.cuda.set_per_process_memory_fraction): status bad_input and its one line;
6. JPEG decoding on the GPU (torchvision's nvJPEG path; TorchCodec's too where it is installed), batched and one by
   one, against one CPU core; measured only.

Every figure goes to OUT/results.json as it comes, so a run stopped at its limit still returns what it measured,
and every line of every process to OUT/log.txt. A step past its limit is killed with every process it started
(DataLoader workers run in sessions of their own: they are found by a mark in their environment), and said.
"""
import argparse
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable

# the settings of a run on a GPU, and of --tiny (the same steps on a CPU in seconds)
# (step_calls: bench.py --steps-only calls, each (precisions, sizes, --compile))
FULL = dict(arch="resnet50", step_calls=[(["bf16"], [128, 160, 176, 192, 224], "off"), (["bf16"], [176], "on"),
                                         (["fp16"], [224], "off")],
            batch=256, steps=30, img=128, epochs=[5, 20], log_every=3, workers=None,
            loader_sets=["full", "training_copy"], loader_sizes=[128, 160, 176, 192, 224], passes=2, oom_fraction=0.02,
            decode_n=512)
TINY = dict(arch="resnet18", step_calls=[(["bf16", "fp16"], [32], "off")], batch=8, steps=2, img=32, epochs=[1],
            log_every=1, workers=1, loader_sets=["training_copy"], loader_sizes=[32], passes=1, oom_fraction=None,
            decode_n=16)


class Run:
    """The run's output folder, its results (saved whole after every figure), its log, and its clock."""

    def __init__(self, out, budget_s):
        self.out, self.results, self.budget_s, self.t0 = out, {}, budget_s, time.time()
        out.mkdir(parents=True, exist_ok=True)
        self.log = open(out / "log.txt", "a", buffering=1)

    def left(self):
        return self.budget_s - (time.time() - self.t0)

    def say(self, line):
        print(line, flush=True)
        self.log.write(line + "\n")

    def save(self, key, value):
        self.results[key] = value
        tmp = self.out / "results.json.tmp"
        tmp.write_text(json.dumps(self.results, indent=1))
        tmp.replace(self.out / "results.json")

    def fits(self, step, limit):
        """Whether a step of `limit` seconds fits in what is left of --budget-s; if not, it is said and saved."""
        if self.left() >= limit:
            return True
        self.save(step, dict(skipped=f"{self.left():.0f} s left of --budget-s {self.budget_s}, the step's limit "
                                     f"is {limit} s"))
        self.say(f"gpu_check: {step}: skipped, {self.left():.0f} s left of the budget")
        return False

    def run(self, step, cmd, limit, env=None, on_line=None):
        """cmd as a process with `limit` seconds; (exit status or None past the limit, its output). on_line(line,
        process) sees each line as it comes. Whatever it started is killed on the way out."""
        mark = f"{step}-{uuid.uuid4().hex[:8]}"
        self.say(f"gpu_check: {step}: {' '.join(map(str, cmd))}")
        p = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, start_new_session=True,
                             env={**os.environ, "PYTHONUNBUFFERED": "1", "GPU_CHECK_STEP": mark, **(env or {})})
        lines, expired = [], []
        timer = threading.Timer(limit, lambda: (expired.append(True), kill_marked(mark)))
        timer.start()
        try:
            for line in p.stdout:
                lines.append(line)
                self.log.write(line)
                if on_line:
                    on_line(line, p)
            p.wait()
        finally:
            timer.cancel()
            kill_marked(mark)  # what it left behind
        if expired:
            self.say(f"gpu_check: {step}: past its limit of {limit} s: stopped")
        return None if expired else p.returncode, "".join(lines)


def kill_marked(mark):
    """SIGKILL every process whose environment holds this step's mark (its children, and DataLoader workers in
    sessions of their own)."""
    needle = f"GPU_CHECK_STEP={mark}".encode()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            if needle in (d / "environ").read_bytes().split(b"\0"):
                os.kill(int(d.name), signal.SIGKILL)
        except (OSError, PermissionError):
            pass


def last_json(output):
    """The last line of output that is a JSON object, or None."""
    for line in reversed(output.strip().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                pass
    return None


def versions(run, device):
    code, out = run.run("versions", [PY, "-c", (
        "import json, platform, sys\n"
        "try:\n"
        "    import torch, torchvision\n"
        "except Exception as e:\n"
        "    print(f'gpu_check: the device cannot import torch or torchvision: {e}'); sys.exit(1)\n"
        "cuda = torch.cuda.is_available()\n"
        "print(json.dumps(dict(python=platform.python_version(), torch=torch.__version__,\n"
        "    torchvision=torchvision.__version__, cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),\n"
        "    device=torch.cuda.get_device_name() if cuda else 'cpu', cuda_available=cuda,\n"
        "    cores=len(__import__('os').sched_getaffinity(0)))))\n")], 60)
    found = last_json(out)
    if code != 0 or found is None:
        run.say(out.strip().splitlines()[-1] if out.strip() else "gpu_check: versions: no answer")
        sys.exit(1)
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True) if device == "cuda" else None
    found["nvidia_smi"] = smi.stdout.strip() if smi and smi.returncode == 0 else None
    if device == "cuda" and not found["cuda_available"]:
        run.say("gpu_check: torch sees no GPU here: run it with --device cpu --tiny, or on the GPU machine")
        sys.exit(1)
    run.save("versions", found)
    run.say(f"gpu_check: {found}")
    return found


def steps(run, s, device):
    """The bare step's rows, from bench.py --steps-only calls (s["step_calls"]): channels_last, in the precisions at
    the sizes each call names, eager or (--compile on) compiled too."""
    rows = []
    for amps, sizes, comp in s["step_calls"]:
        name = f"steps_{'_'.join(amps)}_compile_{comp}"
        if not run.fits(name, 150):
            continue
        code, out = run.run(name, [
            PY, "bench.py", "--steps-only", "--device", device, "--arch", s["arch"], "--sizes", *sizes,
            "--batch-size", s["batch"], "--steps", s["steps"], "--amps", *amps, "--layouts", "nhwc", "--compile",
            comp], 150)
        found = last_json(out)
        rows += [r for r in (found or {}).get("steps", []) if not (comp == "on" and not r["compile"])]
        run.save("steps", rows)
    return rows


def train_py(run, s, device, data, work, epochs, bare):
    """train.py on Imagenette for `epochs`: its log rows, the steady images/s of its progress lines after the first
    epoch against the bare step at the same size, and each epoch's time beyond its training steps."""
    out = work / f"train_{epochs}"
    limit = 60 + 25 * epochs if device == "cuda" else 120
    if not run.fits(f"train_{epochs}", limit):
        return None
    cmd = [PY, "train.py", "--data", data, "--arch", s["arch"], "--img-size", s["img"], "--eval-size", s["img"],
           "--tta", "none", "--epochs", epochs, "--log-every", s["log_every"], "--out", out, "--device", device]
    if s["workers"]:
        cmd += ["--workers", s["workers"], "--batch-size", s["batch"]]
    code, text = run.run(f"train_{epochs}", cmd, limit)
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()] if (out / "log.jsonl").exists() \
        else []
    layout = re.search(r"global batch (\d+) = .*?; (\d+) steps/epoch", text)
    steady = [int(m[2]) for m in re.finditer(r"^epoch (\d+)/\d+ step \d+/\d+ \d+px .* img/s (\d+)", text, re.M)
              if int(m[1]) > 1]
    result = dict(exit=code, epochs=epochs, top1=[r["val_top1"] for r in rows], top5=[r["val_top5"] for r in rows],
                  img_size=[r["img_size"] for r in rows], epoch_s=[r["epoch_s"] for r in rows],
                  img_per_s=[r["img_per_s"] for r in rows], steady_img_per_s=statistics.median(steady) if steady
                  else None)
    if layout:
        images = int(layout[1]) * int(layout[2])
        result["overhead_s"] = [r["epoch_s"] - images / r["img_per_s"] for r in rows]  # eval, saves, autotuning
    if bare and result["steady_img_per_s"]:
        result["bare_img_per_s"], result["of_bare"] = bare, result["steady_img_per_s"] / bare
    run.save(f"train_{epochs}", result)
    return result


def loader(run, s, device, data, steps_rows):
    """The loader's rates per core and in a DataLoader of train.py's workers, on the full-size JPEGs and on the
    training copy, and whether the workers' per-core rate at each size covers the step's."""
    found = {}
    for name in s["loader_sets"]:
        source = ["--images", data.parent / "full"] if name == "full" else ["--data", data]
        if not run.fits(f"loader_{name}", 120):
            continue
        cmd = [PY, "bench.py", "--loader-only", "--device", device, *source, "--loader-sizes", *s["loader_sizes"],
               "--shrink-side", "--passes", s["passes"]]
        if s["workers"]:
            cmd += ["--workers", s["workers"]]
        code, out = run.run(f"loader_{name}", cmd, 120)
        result = last_json(out)
        if result:
            workers = result["dataloader"]["workers"]
            rate = {r["px"]: r["img_s"] for r in steps_rows if r["amp"] == "bf16" and not r["compile"]}
            result["fed"] = {r["px"]: dict(workers_img_s=r["ours"] * workers, step_img_s=rate.get(r["px"]),
                                           fed=rate.get(r["px"]) is None or r["ours"] * workers >= rate[r["px"]])
                             for r in result["loader"]}
        found[name] = result or dict(exit=code)
        run.save("loader", found)


def sigterm_resume(run, s, device, data, work):
    """torchrun (NCCL on a GPU, gloo on a CPU) with one process, SIGTERM at the middle of the first epoch, then the
    same command: status preempted within seconds, then done from the checkpoint's step."""
    if not run.fits("sigterm_resume", 180):
        return
    out = work / "sigterm"
    cmd = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "train.py", "--data", data,
           "--arch", s["arch"], "--img-size", s["img"], "--epochs", 2, "--log-every", 1, "--out", out,
           "--device", device] + (["--workers", s["workers"], "--batch-size", s["batch"]] if s["workers"] else [])
    sent = {}

    def stop_midway(line, p):
        m = re.match(r"epoch 1/2 step (\d+)/(\d+)", line)
        if m and not sent and int(m[1]) >= int(m[2]) // 2:
            p.send_signal(signal.SIGTERM)  # torchrun passes it on to its rank
            sent["t"], sent["step"] = time.time(), int(m[1])

    first, _ = run.run("sigterm_resume_1", cmd, 90, on_line=stop_midway)
    stopped_s = time.time() - sent["t"] if sent else None
    status1 = (out / "status").read_text().strip() if (out / "status").exists() else None
    second, text = run.run("sigterm_resume_2", cmd, 90)
    resumed = re.search(r"resumed from \S+: epoch 1, step (\d+)/", text)
    run.save("sigterm_resume", dict(sigterm_at_step=sent.get("step"), stop_s=stopped_s, exit_1=first, status_1=status1,
                                    exit_2=second, status_2=(out / "status").read_text().strip()
                                    if (out / "status").exists() else None,
                                    resumed_at_step=int(resumed[1]) if resumed else None))


def fp16_epoch(run, s, device, data, work):
    """One epoch with --amp fp16: its losses finite, and the loss scaler's scale in last.pt."""
    if not run.fits("fp16_epoch", 120):
        return
    out = work / "fp16"
    cmd = [PY, "train.py", "--data", data, "--arch", s["arch"], "--img-size", s["img"], "--epochs", 1, "--amp",
           "fp16", "--log-every", s["log_every"], "--out", out, "--device", device]
    if s["workers"]:
        cmd += ["--workers", s["workers"], "--batch-size", s["batch"]]
    code, text = run.run("fp16_epoch", cmd, 120)
    losses = [float(m[1]) for m in re.finditer(r" loss ([0-9.naninf]+) lr", text)]
    scale = subprocess.run([PY, "-c", "import sys, torch; c = torch.load(sys.argv[1], weights_only=True); "
                            "print((c.get('scaler') or {}).get('scale'))", out / "last.pt"],
                           capture_output=True, text=True).stdout.strip() if (out / "last.pt").exists() else None
    run.save("fp16_epoch", dict(exit=code, losses=losses, all_finite=all(math.isfinite(v) for v in losses),
                                scaler_scale=scale))


def compile_resizing(run, s, device, data, work):
    """--compile through progressive resizing (3 sizes over 3 epochs): dynamo's recompiles, and the epochs' times."""
    if device != "cuda":
        run.save("compile_resizing", dict(skipped="on the CPU, inductor's compile alone takes minutes"))
        return
    if not run.fits("compile_resizing", 200):
        return
    out = work / "compile"
    code, text = run.run("compile_resizing", [
        PY, "train.py", "--data", data, "--arch", s["arch"], "--img-size", s["img"], "--min-img-size", s["img"] - 32,
        "--epochs", 3, "--compile", "--log-every", s["log_every"], "--out", out, "--device", device], 200,
        env={"TORCH_LOGS": "recompiles"})
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()] if (out / "log.jsonl").exists() \
        else []
    run.save("compile_resizing", dict(exit=code, recompiles=len(re.findall(r"Recompiling function", text)),
                                      img_size=[r["img_size"] for r in rows], epoch_s=[r["epoch_s"] for r in rows],
                                      img_per_s=[r["img_per_s"] for r in rows]))


def out_of_memory(run, s, device, data, work):
    """A real CUDA out-of-memory error, the process held to a sliver of the GPU: status bad_input, one line."""
    if device != "cuda" or not s["oom_fraction"]:
        run.save("out_of_memory", dict(skipped="CUDA only"))
        return
    if not run.fits("out_of_memory", 90):
        return
    out = work / "oom"
    args = ["--data", str(data), "--arch", s["arch"], "--img-size", "224", "--epochs", "1", "--out", str(out)]
    code, text = run.run("out_of_memory", [PY, "-c", (
        "import sys, torch\n"
        f"torch.cuda.set_per_process_memory_fraction({s['oom_fraction']})\n"
        "sys.argv = ['train.py'] + sys.argv[1:]\n"
        "import train\n"
        "train.main()\n"), *args], 90)
    line = next((x for x in text.splitlines() if x.startswith("train.py: error: out of memory")), None)
    run.save("out_of_memory", dict(exit=code, status=(out / "status").read_text().strip()
                                   if (out / "status").exists() else None, line=line))


DECODE = r"""
import json, sys, time, zipfile
import torch, torchvision
from torchvision.io import decode_jpeg
full, copy, n, device = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
import pathlib
sets = {"full": [pathlib.Path(f).read_bytes() for f in sorted(pathlib.Path(full).iterdir())]}
with zipfile.ZipFile(copy) as z:
    sets["training_copy"] = [z.read(i) for i in [i for i in z.namelist() if i.startswith("train/")][:n]]
decoders = {"torchvision": lambda xs, dev: decode_jpeg(xs, device=dev)}
try:
    from torchcodec.decoders import decode_jpeg as codec
    decoders["torchcodec"] = lambda xs, dev: codec(xs, device=dev)
except ImportError:
    pass
def sync():
    if device == "cuda":
        torch.cuda.synchronize()  # nvJPEG's hardware path has overwritten buffers still in use without it
def rate(fn, xs, batched):
    fn(xs[:2], device) if batched else fn(xs[0], device)  # warm-up: nvJPEG's handles
    sync(); t0 = time.perf_counter()
    if batched:
        out = fn(xs, device)
    else:
        out = []
        for x in xs:
            sync(); out.append(fn(x, device))
    sync()
    return len(xs) / (time.perf_counter() - t0), out
torch.set_num_threads(1)
result = {}
for name, raw in sets.items():
    xs = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in raw]
    t0 = time.perf_counter(); ref = [decode_jpeg(x) for x in xs]; cpu_rate = len(xs) / (time.perf_counter() - t0)
    row = dict(images=len(xs), cpu_one_core=cpu_rate)
    for dname, fn in decoders.items():
        for batched in (True, False):
            try:
                r, out = rate(fn, xs, batched)
                diff = max((o.cpu().int() - c.int()).abs().float().mean().item() for o, c in zip(out, ref))
                row[f"{dname}_{'batched' if batched else 'one_by_one'}"] = dict(img_s=r, mean_abs_diff_to_cpu=diff)
            except Exception as e:
                row[f"{dname}_{'batched' if batched else 'one_by_one'}"] = dict(error=str(e)[:300])
    result[name] = row
print(json.dumps(dict(torchvision=torchvision.__version__, device=device, decode=result)))
"""


def gpu_decode(run, s, device, data):
    """JPEG decoding on the GPU against one CPU core, batched and one by one, on both sets; measured only."""
    if not run.fits("gpu_decode", 90):
        return
    code, out = run.run("gpu_decode", [PY, "-c", DECODE, data.parent / "full", data.parent / "imagenette.zip",
                                       s["decode_n"], device], 90)
    run.save("gpu_decode", last_json(out) or dict(exit=code))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="results.json and log.txt go here ($OUT on the device)")
    p.add_argument("--data", default=str(ROOT / "gpu_data"), help="tools/gpu_data.py's folder")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--tiny", action="store_true", help="tiny settings: ResNet-18 at 32 px, one epoch (the CPU test)")
    p.add_argument("--budget-s", type=float, default=450, help="no step starts that its limit would take past this")
    args = p.parse_args(argv)
    s, run = TINY if args.tiny else FULL, Run(Path(args.out), args.budget_s)
    source = Path(args.data)
    if not (source / "imagenette.zip").exists() or not (source / "full").is_dir():
        sys.exit(f"gpu_check.py: error: no {source}/imagenette.zip and full/: make them with tools/gpu_data.py")
    versions(run, args.device)
    work = Path(tempfile.mkdtemp(prefix="gpu_check-"))
    with zipfile.ZipFile(source / "imagenette.zip") as z:  # onto local disk: train.py reads a folder
        z.extractall(work / "imagenette")
    data = work / "imagenette"
    (work / "full").symlink_to((source / "full").resolve())  # beside it, as in gpu_data/
    (work / "imagenette.zip").symlink_to((source / "imagenette.zip").resolve())
    rows = steps(run, s, args.device)
    bare = next((r["img_s"] for r in rows if r["px"] == s["img"] and r["amp"] == "bf16" and not r["compile"]), None)
    train_py(run, s, args.device, data, work, s["epochs"][0], bare)
    loader(run, s, args.device, data, rows)
    sigterm_resume(run, s, args.device, data, work)
    fp16_epoch(run, s, args.device, data, work)
    out_of_memory(run, s, args.device, data, work)
    compile_resizing(run, s, args.device, data, work)
    gpu_decode(run, s, args.device, data)
    for epochs in s["epochs"][1:]:
        train_py(run, s, args.device, data, work, epochs, bare)
    run.say(f"gpu_check: done in {time.time() - run.t0:.0f} s; {run.out / 'results.json'}")


if __name__ == "__main__":
    main()
