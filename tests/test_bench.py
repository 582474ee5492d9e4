"""bench.py: the measurements end to end on the CPU at toy sizes, and the cost projection against its sources:
AWS's instance facts as moto ships them, the price snapshot in ../shared, and the README's table."""
import gzip
import json
import re
import sys
from pathlib import Path

import pytest

import bench
import train
from conftest import ROOT, SAMPLES, SHARED, needs_samples, run


@needs_samples
def test_bench_measures_the_loader_the_step_and_projects(tmp_path):
    images = tmp_path / "images"  # 30 of the full-size photos: the ratios hold, in a third of the time
    images.mkdir()
    for f in sorted(SAMPLES.iterdir())[:30]:
        (images / f.name).symlink_to(f)
    p = run([sys.executable, str(ROOT / "bench.py"), "--images", images, "--passes", "1", "--loader-sizes", "128",
             "--shrink-side", "256", "--sizes", "32", "--batch-size", "4", "--steps", "2", "--workers", "1",
             "--instance", "g5.xlarge", "--hourly-usd", "2.5"], timeout=600)
    res = json.loads(p.stdout.strip().splitlines()[-1])
    loader = {r["px"]: r for r in res["loader"]}
    assert sorted(loader) == [32, 128, 160, 176, 192]  # --loader-sizes, --sizes and the default preset's sizes
    assert res["loader_speedup_176"] == loader[176]["ours"] / loader[176]["standard"]
    # draft decoding and a uint8 pipeline beat ToTensor + Normalize on the full decode, and a shrunk copy beats both
    assert res["loader_speedup_176"] > 1.0
    assert loader[176]["ours_shrunk_256"] > loader[176]["ours"]
    assert res["eval_loader_per_core"] > 0 and res["forward_per_step"] > 1  # a forward is cheaper than a step
    assert {(r["amp"], r["channels_last"]) for r in res["steps"]} >= {("fp32", True), ("fp32", False)}
    assert res["train_vs_bare"]["train_py"] > 0 and res["train_vs_bare"]["bare"] > 0
    proj = res["projection"]
    assert proj["epochs"] == 24 and proj["usd"] == pytest.approx(proj["hours"] * 2.5)  # the default recipe
    assert proj["measured"] == ["eval", "eval_loader", "gpu", "loader"] and proj["bottleneck"] in ("GPU", "loader")
    assert "Projection, not a measurement" in p.stdout and "on g5.xlarge, from the rates measured here" in p.stdout


def test_instance_facts_are_aws_describe_instance_types_as_moto_ships_it():
    """vCPUs, RAM, GPUs, instance store, the baseline network (all cards) and EBS link of every row."""
    moto = pytest.importorskip("moto")
    path = Path(moto.__file__).parent / "ec2" / "resources" / "instance_types.json.gz"
    aws = json.load(gzip.open(path))
    for name, inst in bench.INSTANCES.items():
        t = aws[name]
        gpus = t["GpuInfo"]["Gpus"][0]
        disks = t["InstanceStorageInfo"]["Disks"][0]
        assert (inst["vcpus"], inst["ram_gib"] * 1024, inst["gpus"], inst["gpu"]) == \
            (t["VCpuInfo"]["DefaultVCpus"], t["MemoryInfo"]["SizeInMiB"], gpus["Count"], gpus["Name"]), name
        assert inst["store"] == (disks["Count"], disks["SizeInGB"]), name
        assert inst["net_gbps"] == sum(c["BaselineBandwidthInGbps"] for c in t["NetworkInfo"]["NetworkCards"]), name
        assert inst["net_peak_gbps"] == sum(c["PeakBandwidthInGbps"] for c in t["NetworkInfo"]["NetworkCards"]), name
        assert inst["ebs_mbps"] == t["EbsInfo"]["EbsOptimizedInfo"]["BaselineThroughputInMBps"], name
        assert t["VCpuInfo"]["DefaultThreadsPerCore"] == 2  # a vCPU is a hyperthread: bench.VCPU


PRICES = SHARED.parent / "ec2-prices.md"


@pytest.mark.skipif(not PRICES.is_file(), reason=f"the price snapshot is not at {PRICES}")
def test_prices_are_the_snapshots():
    """On-demand and spot prices equal ../shared/ec2-prices.md, which cites the catalog's commit; a price the
    snapshot lacks is empty here too, and a list price is marked as one."""
    rows = {}
    for line in PRICES.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 9 and cells[0] in bench.INSTANCES:
            rows[cells[0]] = cells
    assert sorted(rows) == sorted(bench.INSTANCES)
    for name, inst in bench.INSTANCES.items():
        on_demand, spot = rows[name][7], rows[name][8]
        assert float(on_demand.split()[0]) == inst["on_demand"] and ("(list)" in on_demand) == bool(
            inst.get("list_price")), name
        if inst["spot"] is None:
            assert spot == inst["no_spot"], name
        else:
            low, high = re.match(r"([0-9.]+)-([0-9.]+)", spot).groups()
            assert (float(low), float(high)) == inst["spot"], name
    assert "2c3d7ea7d76bf84cf80d382e946c1609571485fd" in PRICES.read_text()


def test_the_readme_tables_are_what_bench_prints(capsys):
    """Updating a price is one edit in bench.py and `python bench.py --project-only` pasted into the README: its two
    tables, the cost and the staging, each a row an instance."""
    bench.main(["--project-only"])
    *tables, pick = capsys.readouterr().out.strip().split("\n\n")
    readme = (ROOT / "README.md").read_text()
    assert len(tables) == 2 and pick in readme, "README's recommendation is not the table's: paste bench.py's line"
    for table, name in zip(tables, ("cost", "staging")):
        assert table in readme, f"README.md's {name} table is stale: paste `python bench.py --project-only` into it"
        assert len(table.splitlines()) == 2 + len(bench.INSTANCES)
    bench.main(["--project-only", "--instance", "p4d.24xlarge"])
    rows = capsys.readouterr().out.strip().splitlines()
    assert [r for r in rows if r.startswith("| p4d.24xlarge |")] == [r for t in tables for r in t.splitlines()
                                                                     if r.startswith("| p4d.24xlarge |")]
    assert len(rows) == 7  # the two tables' headers and p4d's row in each


def test_the_recommendation_follows_its_rule_and_the_headers_the_presets():
    """The README recommends by a stated rule, from the table: for the default recipe, the cheapest row at spot (by the
    top of its spot range) among the projections (not an "at least" row, not a row without a spot price), and the
    fastest row. And the table's headers say the presets' epochs and sizes, not numbers written in."""
    default = train.parse_args([])
    rows = {n: bench.project(i, default) for n, i in bench.INSTANCES.items()}
    fair = {n: p for n, p in rows.items() if p["gpu_known"] and p["usd_spot"]}
    cheapest = min(fair, key=lambda n: fair[n]["usd_spot"][1])
    fastest = min(rows, key=lambda n: (round(rows[n]["hours"], 1), rows[n]["usd"]))
    line = bench.recommendation()
    assert f"**{cheapest}** at spot, the cheapest" in line and f"**{fastest}**, the fastest" in line
    assert "g4dn.xlarge" not in line  # an "at least" row is never the pick
    header = bench.cost_table().splitlines()[0]
    sizes = train.epoch_sizes(default)
    assert f"at {min(sizes)} / {max(sizes)} px" in header and f"default ({default.epochs} epochs)" in header
    assert f"`--preset fast` ({train.parse_args(['--preset', 'fast']).epochs} epochs)" in header


def test_the_projection_is_the_formula():
    """project() against the formula written out here: a GPU-bound instance (many cores, its data on an instance
    store that holds it) trains each epoch at the GPUs' rate at that epoch's size, evaluates at the GPUs' forward
    rate, and waits once for boot, the staging (beside setup) and the first step; a GPU without a published rate
    gives a lower bound; without the shards, the first step waits for today's zip."""
    inst = dict(gpus=2, gpu="A10G", vcpus=4000, ram_gib=10_000, store=(2, 1000), net_gbps=100, net_peak_gbps=100,
                ebs_mbps=1000, on_demand=3.0, spot=(1.0, 2.0))
    args = train.parse_args(["--preset", "fast"])
    proj = bench.project(inst, args)
    per_gpu = 638 * bench.SCALING
    sizes = train.epoch_sizes(args)
    train_s = sum(bench.IMAGENET_TRAIN / (2 * per_gpu * (224 / s) ** 2) for s in sizes)
    eval_s = args.epochs * bench.IMAGENET_VAL / (2 * per_gpu * bench.FORWARD_PER_STEP * (224 / 256) ** 2 / 2)
    gb = (bench.IMAGENET_TRAIN * 42 + bench.IMAGENET_VAL * 110) / 1e6  # prepare's default: the shrunk copy
    staging = gb * 1000 / min(100 * 1000 / 8, bench.STAGE_JOBS * bench.STREAM_MBPS,
                              4000 * bench.VCPU * bench.EXTRACT_MBPS["shrunk"], 2 * bench.NVME_MBPS) / 60
    first = bench.BOOT_MIN + max(bench.SETUP_MIN, staging) + bench.FIRST_STEP_MIN
    hours = (train_s + eval_s) / 3600 + first / 60
    assert proj["hours"] == pytest.approx(hours, rel=1e-9) and proj["bottleneck"] == "GPU" and proj["kind"] == "shrunk"
    assert proj["usd"] == pytest.approx(3 * hours) and proj["usd_spot"] == pytest.approx([hours, 2 * hours])
    zipped = bench.project(inst, args, shards=False)
    assert zipped["first_step_min"] > 3 * proj["first_step_min"]  # the zip copied, unzipped and checked
    t4 = bench.project(bench.INSTANCES["g4dn.xlarge"], args)
    assert not t4["gpu_known"] and t4["bottleneck"] in ("loader", "disk")


@needs_samples
def test_bench_measures_packing_and_extracting_shards(capsys):
    """The rates behind run_ec2.sh prepare's and data's projections, per core, on the real JPEGs: the shrunk shard
    is much smaller, and its images are all there after extraction (extract_stream checks the names)."""
    bench.main(["--images", str(SAMPLES), "--shards-only", "--device", "cpu"])
    rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["shards"]
    assert [r["kind"] for r in rows] == ["full size", "shrunk to a 320 px shorter side"]
    assert all(r["files"] == 100 and r["pack_files_s"] > 0 and r["extract_mb_s"] > 0 for r in rows)
    assert rows[1]["shard_mb"] < rows[0]["shard_mb"] / 1.5
