"""bench.py end to end on the CPU, at toy sizes: every section runs, and its numbers hang together."""
import json
import sys

from conftest import ROOT, SAMPLES, needs_samples, run

pytestmark = needs_samples


def test_bench_measures_the_loader_the_step_and_projects(tmp_path):
    p = run([sys.executable, str(ROOT / "bench.py"), "--images", SAMPLES, "--passes", "2", "--loader-sizes", "128",
             "--shrink-side", "256", "--sizes", "32", "--batch-size", "4", "--steps", "2", "--workers", "1",
             "--hourly-usd", "2.5"], timeout=600)
    res = json.loads(p.stdout.strip().splitlines()[-1])
    loader = {r["px"]: r for r in res["loader"]}
    assert sorted(loader) == [32, 128, 160, 176, 192]  # --loader-sizes, --sizes and the fast preset's sizes
    assert res["loader_speedup_176"] == loader[176]["ours"] / loader[176]["standard"]
    # draft decoding and a uint8 pipeline beat ToTensor + Normalize on the full decode, and a shrunk copy beats both
    assert res["loader_speedup_176"] > 1.0
    assert loader[176]["ours_shrunk_256"] > loader[176]["ours"]
    assert {(r["amp"], r["channels_last"]) for r in res["steps"]} >= {("fp32", True), ("fp32", False)}
    assert res["train_vs_bare"]["train_py"] > 0 and res["train_vs_bare"]["bare"] > 0
    proj = res["projection"]
    assert proj["epochs"] == 24 and proj["usd"] == proj["hours"] * 2.5 and proj["hours"] > 0  # the default recipe
    assert set(proj["bottleneck"].values()) <= {"training step", "loader (CPU cores)"}
    assert "Projection, not a measurement" in p.stdout
