"""tools/gpu_check.py, the run prepared for a lent GPU, kept from rotting while it waits: its every step with --tiny
settings on the CPU, on a small copy made by tools/gpu_data.py from the real images."""
import json
import subprocess
import sys

import pytest

from conftest import ROOT, needs_imagenette, needs_samples


def script(name, *args, timeout=150):
    return subprocess.run([sys.executable, str(ROOT / "tools" / name), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


@needs_imagenette
@needs_samples
def test_the_gpu_check_runs_every_step_clean_on_the_cpu(tmp_path):
    """The data step refuses a copy past its budget; then every step runs on the CPU, each figure in results.json:
    the step rates, train.py end to end, the loader and whether it feeds the step, torchrun stopped by SIGTERM
    mid-epoch and resumed at the step it saved, an fp16 epoch and its scaler, JPEG decoding (on the CPU here, equal
    to the reference), and the CUDA-only steps said to be skipped."""
    refused = script("gpu_data.py", "--out", tmp_path / "big", "--per-class", "2", "--full", "2", "--budget-mib", "1")
    assert refused.returncode != 0 and "passes --budget-mib 1" in refused.stderr
    made = script("gpu_data.py", "--out", tmp_path / "data", "--per-class", "6", "--full", "4")
    assert made.returncode == 0 and "146 px, q70" in made.stdout, made.stderr
    p = script("gpu_check.py", "--out", tmp_path / "out", "--device", "cpu", "--tiny", "--data", tmp_path / "data")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    r = json.loads((tmp_path / "out" / "results.json").read_text())
    assert r["versions"]["device"] == "cpu" and r["versions"]["torch"]
    assert {row["amp"] for row in r["steps"]} == {"bf16", "fp16"} and all(row["img_s"] > 0 for row in r["steps"])
    train = r["train_1"]
    assert train["exit"] == 0 and len(train["top1"]) == 1 and train["overhead_s"][0] > 0
    loader = r["loader"]["training_copy"]  # (and "full", the same code on the full-size JPEGs, on the GPU)
    assert loader["loader"][0]["ours"] > 0 and loader["fed"]["32"]["step_img_s"] > 0
    stop = r["sigterm_resume"]
    assert stop["status_1"] == "preempted" and stop["status_2"] == "done" and stop["stop_s"] < 20
    assert stop["resumed_at_step"] in (stop["sigterm_at_step"], stop["sigterm_at_step"] + 1)
    assert r["fp16_epoch"]["all_finite"] and float(r["fp16_epoch"]["scaler_scale"]) > 0
    decode = r["gpu_decode"]["decode"]
    assert decode["full"]["torchvision_batched"]["mean_abs_diff_to_cpu"] == 0
    assert decode["training_copy"]["images"] == 16
    assert "skipped" in r["out_of_memory"] and "skipped" in r["compile_resizing"]
    assert "gpu_check: done" in (tmp_path / "out" / "log.txt").read_text()


def test_a_run_past_its_budget_skips_and_says_so(tmp_path):
    """--budget-s bounds the run: a step whose limit does not fit is skipped, said in results.json, not started.
    Without the data, one line says how to make it."""
    p = script("gpu_check.py", "--out", tmp_path / "out", "--device", "cpu", "--tiny", "--data", tmp_path / "none")
    assert p.returncode != 0 and "make them with tools/gpu_data.py" in p.stderr
    if not (ROOT.parent / "shared" / "data" / "imagenette-224").is_dir():
        pytest.skip("no ../shared/data to copy from")
    script("gpu_data.py", "--out", tmp_path / "data", "--per-class", "1", "--full", "1")
    p = script("gpu_check.py", "--out", tmp_path / "out", "--device", "cpu", "--tiny", "--data", tmp_path / "data",
               "--budget-s", "30")
    r = json.loads((tmp_path / "out" / "results.json").read_text())
    assert p.returncode == 0 and "skipped" in r["train_1"] and "s left of --budget-s 30" in r["train_1"]["skipped"]
