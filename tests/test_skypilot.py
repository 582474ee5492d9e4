"""skypilot.yaml, the task file for a run on several nodes: what it promises (read with PyYAML, and with SkyPilot's
own parser where SkyPilot is installed), and its setup and run blocks run as written, as nodes on this machine (the
SKYPILOT_* variables for 127.0.0.1, moto's S3, real shards of real JPEGs, an IMDSv2 stand-in per node for its spot
notice). No traffic leaves 127.0.0.1."""
import http.server
import json
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone

import pytest
import yaml

import train
from conftest import (BIN, ELASTIC_ATOL, FAST, PREEMPTIBLE, ROOT, TWO_RANKS, Answers, assert_close_run, aws, fake_venv,
                      free_port, needs_imagenette, write_trainer)

TASK = ROOT / "skypilot.yaml"


def recover_exit():
    """run_ec2.sh's RECOVER_EXIT, the exit status that asks the launcher for a recovery."""
    return int(re.search(r"^RECOVER_EXIT=(\d+)", (ROOT / "run_ec2.sh").read_text(), re.M)[1])


def test_the_task_file_says_what_the_readme_promises():
    task = yaml.safe_load(TASK.read_text())
    res = task["resources"]
    assert task["num_nodes"] >= 2 and res["use_spot"] is True and res["network_tier"] == "best"
    assert set(res["accelerators"]) == {"A100:8", "H100:8", "A10G:4"} and res["disk_size"] >= 100
    # recovered on a preemption (always) and on node 0's "recover me" alone, which is train.py's preempted
    recovery = res["job_recovery"]
    assert recovery["recover_on_exit_codes"] == [recover_exit()] == [train.EXIT["preempted"]]
    assert recovery["max_restarts_on_errors"] == 0
    assert not set(train.EXIT.values()) - {0, 1, 2, 3, recover_exit()}  # no other code of train.py recovers
    # the instance-side steps are run_ec2.sh's, the same commands a launched instance runs
    steps = re.findall(r"\./run_ec2\.sh (\w+)", task["setup"] + task["run"])
    assert steps == ["data", "setup", "data", "restore", "node"]
    assert {"S3_DATA", "S3_RUNS", "RUN", "TRAIN_ARGS", "BUDGET_USD"} <= set(task["envs"])
    for name in ("SKYPILOT_NUM_NODES", "SKYPILOT_NODE_RANK", "SKYPILOT_NUM_GPUS_PER_NODE", "SKYPILOT_NODE_IPS"):
        assert name in task["run"]


def test_skypilots_own_parser_reads_the_task_file():
    sky = pytest.importorskip("sky", reason="skypilot is not installed here (it is the laptop's, never a "
                                            "requirement): its own parser is not run; the PyYAML test above is")
    task = sky.Task.from_yaml(str(TASK))
    assert task.num_nodes == 2 and len(task.resources) == 3
    assert all(r.use_spot and r.job_recovery["recover_on_exit_codes"] == [recover_exit()] for r in task.resources)


class Instance(Answers):
    """One node's IMDSv2: a token from PUT, then its id, type, market, region and launch time, and its spot notice
    once the test sets server.notice."""

    def do_PUT(self):
        self.reply(200, b"TOKEN")

    def do_GET(self):
        s = self.server
        if self.headers.get("X-aws-ec2-metadata-token") != "TOKEN":
            return self.reply(401, b"")
        answers = {"meta-data/instance-id": s.id, "meta-data/instance-type": "g5.12xlarge",
                   "meta-data/instance-life-cycle": "spot", "meta-data/placement/region": "us-east-1",
                   "dynamic/instance-identity/document": json.dumps({"instanceId": s.id, "pendingTime": s.launched})}
        if s.notice:
            answers["meta-data/spot/instance-action"] = '{"action": "terminate", "time": "2026-12-06T05:00:00Z"}'
        path = self.path.removeprefix("/latest/")
        self.reply(200, answers[path].encode()) if path in answers else self.reply(404, b"")


@pytest.fixture
def instances():
    """make(id): a node's IMDS on a free port, launched now; its URL and the server (set .notice to reclaim it)."""
    servers = []

    def make(instance_id):
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Instance)
        server.id, server.notice = instance_id, False
        server.launched = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}", server

    yield make
    for server in servers:
        server.shutdown()


def node(block, where, rank, nodes, gpus, moto, **settings):
    """A block of skypilot.yaml, as written, in bash from the repository's root as SkyPilot runs it on node `rank`
    of `nodes` (all at 127.0.0.1): the task's envs, then `settings` as `sky jobs launch --env` would give them; the
    node's own disks under `where` (its OUT, DATA_DIR and venv)."""
    task = yaml.safe_load(TASK.read_text())
    env = {**os.environ, **moto, "PATH": f"{BIN}:{os.environ['PATH']}", **task["envs"],
           "SKYPILOT_NUM_NODES": str(nodes), "SKYPILOT_NODE_RANK": str(rank), "SKYPILOT_NUM_GPUS_PER_NODE": str(gpus),
           "SKYPILOT_NODE_IPS": "\n".join(["127.0.0.1"] * nodes),
           "DATA_DIR": str(where / "data"), "VENV": str(fake_venv(where / "venv")), "NEEDED": "python3 aws",
           "MIN_SHM_GB": "0", "IMDS_URL": "http://127.0.0.1:9", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           # no disk of this machine is looked at, let alone formatted (FORMAT_STORE=1 is the task's)
           "LSBLK": "true", "SUDO": "", "WIPEFS": "false", "MKFS": "false", "MDADM": "false", "MOUNT": "false",
           **{k: str(v) for k, v in settings.items()}}
    env["OUT"] = str(where / "runs" / env["RUN"])  # the default on a node, under this node's own folder
    return subprocess.Popen(["bash", "-c", task[block]], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def finish(procs, timeout=240):
    """Wait for the nodes; (exit statuses, outputs), None for a node still running at the timeout. Every process
    group is killed on the way out."""
    deadline, timed_out = time.time() + timeout, False
    while any(p.poll() is None for p in procs) and not timed_out:
        timed_out = time.time() > deadline
        time.sleep(0.2)
    codes = [p.poll() for p in procs]
    for p in procs:
        try:
            os.killpg(p.pid, 9)
        except ProcessLookupError:
            pass
    return codes, [p.communicate()[0] for p in procs]


@pytest.fixture(scope="module")
def shards(moto, tiny_data):
    """The tiny dataset as prepare makes it: tar shards (of about 1 MB) beside S3_DATA, in moto's S3."""
    aws(moto, "s3", "mb", "s3://sky-data")
    subprocess.run([sys.executable, str(ROOT / "shards.py"), "pack", str(tiny_data), "s3://sky-data/imagenet/shards",
                    "--shard-mb", "1", "--workers", "1"], check=True, capture_output=True,
                   env={**os.environ, **moto, "PATH": f"{BIN}:{os.environ['PATH']}"})
    return "s3://sky-data/imagenet"


@needs_imagenette
def test_two_nodes_one_reclaimed_then_recovered_on_one_node_end_as_the_uninterrupted_run(
        tmp_path, moto, shards, two_ranks, instances):
    """The task's setup and run blocks on two nodes (one process each: a global batch of 16). Node 1 gets a spot
    notice at step 6: its watcher stops its trainer, every rank checkpoints, node 0 backs the run up and exits 75,
    node 1 exits 0. As SkyPilot does on 75, the blocks run again on a new cluster, here one node of one process, with
    nothing local: it restores the run from S3 and continues on 1 process what 2 began. The run in S3 then ends where
    the uninterrupted 2-rank run ends, within the elastic resume's tolerance, each epoch logged once, the
    preemption's checkpoint continued from its very step."""
    aws(moto, "s3", "mb", "s3://sky-runs")
    run = dict(S3_DATA=shards, S3_RUNS="s3://sky-runs", RUN="sky-test", FINISH=0, SPOT_POLL_S=0.2,
               TRAIN_ARGS=shlex.join([*FAST, *TWO_RANKS]), MASTER_PORT=free_port())
    imds, reclaimed = instances("i-node1")
    first = [node("setup", tmp_path / f"node{r}", r, 2, 1, moto, **run) for r in (0, 1)]
    codes, outs = finish(first, timeout=120)
    assert codes == [0, 0], outs
    assert len(list((tmp_path / "node1" / "data" / "train").glob("*/*.JPEG"))) == 160  # its own copy
    log0 = tmp_path / "node0" / "runs" / "sky-test" / "train.log"
    procs = [node("run", tmp_path / "node0", 0, 2, 1, moto, **run),
             node("run", tmp_path / "node1", 1, 2, 1, moto, **run, IMDS_URL=imds)]
    deadline = time.time() + 180
    while not re.search(r"^epoch 1/2 step 6/10", log0.read_text() if log0.exists() else "", re.M):
        assert time.time() < deadline and all(p.poll() is None for p in procs), finish(procs, 1)
        time.sleep(0.2)
    reclaimed.notice = True  # node 1's instance is about to go
    codes, outs = finish(procs)
    assert codes == [recover_exit(), 0], outs
    assert "spot interruption notice" in (tmp_path / "node1" / "runs" / "sky-test" / "watch-spot.log").read_text()
    saved = json.loads(aws(moto, "s3", "cp", "s3://sky-runs/sky-test/ended.json", "-").stdout)
    assert saved["status"] == "preempted" and saved["exit"] == recover_exit(), saved
    step = int(re.findall(r"saved \S+ at epoch 1 step (\d+) \(preempted\)", log0.read_text())[-1])
    assert 6 <= step < 10

    # SkyPilot's recovery: a new cluster of 1 node with 1 GPU, nothing local
    new = tmp_path / "recovered"
    codes, outs = finish([node("setup", new, 0, 1, 1, moto, **run)], timeout=120)
    assert codes == [0], outs
    codes, outs = finish([node("run", new, 0, 1, 1, moto, **run)])
    assert codes == [0], outs
    log = (new / "runs" / "sky-test" / "train.log").read_text()
    assert f"epoch 1, step {step}/10" in log and "resuming on 1 processes instead of 2" in log
    aws(moto, "s3", "sync", "s3://sky-runs/sky-test", str(tmp_path / "s3"))
    assert [json.loads(r)["epoch"] for r in (tmp_path / "s3" / "log.jsonl").read_text().splitlines()] == [0, 1]
    assert json.loads((tmp_path / "s3" / "ended.json").read_text())["status"] == "done"
    assert_close_run(two_ranks, tmp_path / "s3", ELASTIC_ATOL)


def test_the_budget_counts_every_node_and_cluster_and_ends_the_job(tmp_path, moto, instances):
    """SkyPilot has no spending cap: BUDGET_USD counts in the run's spent.json, which travels through S3. An earlier
    cluster spent $9 of $10; on this one node 0 counts both nodes ($1,800 an hour a node: $1 a second) and stops the
    trainer within seconds, which ends the job (exit 0, not 75), its entry in S3 saying 2 nodes. A cluster started
    after that (a recovery, or a new launch) starts no trainer on any node: each decides from the same spent.json."""
    aws(moto, "s3", "mb", "s3://sky-money")
    (tmp_path / "earlier").mkdir()
    (tmp_path / "earlier" / "spent.json").write_text(json.dumps({"i-earlier": dict(hours=1, hourly_usd=9, usd=9)}))
    aws(moto, "s3", "cp", str(tmp_path / "earlier" / "spent.json"), "s3://sky-money/money/spent.json")
    run = dict(S3_DATA="s3://sky-money/data", S3_RUNS="s3://sky-money", RUN="money", BUDGET_USD=10, HOURLY_USD=1800,
               FINISH=0, BUDGET_POLL_S=0.2, TRAIN_CMD=write_trainer(tmp_path, PREEMPTIBLE))
    imds, _ = instances("i-node0")
    codes, outs = finish([node("run", tmp_path / "node0", 0, 2, 1, moto, **run, IMDS_URL=imds)], timeout=60)
    assert codes == [0], outs
    assert "budget reached" in (tmp_path / "node0" / "runs" / "money" / "train.log").read_text()
    spent = json.loads(aws(moto, "s3", "cp", "s3://sky-money/money/spent.json", "-").stdout)
    assert spent["i-node0"]["nodes"] == 2 and spent["i-node0"]["hourly_usd"] == 3600
    assert sum(v["usd"] for v in spent.values()) >= 10
    ended = json.loads(aws(moto, "s3", "cp", "s3://sky-money/money/ended.json", "-").stdout)
    assert ended["status"] == "stopped" and ended["exit"] == 0

    later = [node("run", tmp_path / f"later{r}", r, 2, 1, moto, **run, IMDS_URL=instances(f"i-later{r}")[0])
             for r in (0, 1)]
    codes, outs = finish(later, timeout=60)
    assert codes == [0, 0], outs
    for r in (0, 1):
        assert "not starting: $" in outs[r] and "of BUDGET_USD=$10 spent" in outs[r]
        assert not (tmp_path / f"later{r}" / "runs" / "money" / "trainer.pid").exists()


def test_a_launched_instance_finds_torchrun_in_setups_venv(tmp_path):
    """On a launched instance the trainer's torchrun is the venv's: the AMI has no PyTorch, and the service's PATH
    has no venv. The restart loop ran a bare `torchrun`, which that PATH does not have: every run crashed at once."""
    venv = fake_venv(tmp_path / "venv")
    (venv / "bin" / "torchrun").write_text(f'#!/bin/sh\necho "$@" > {tmp_path / "ran"}\n'
                                           'out=$(echo "$@" | sed "s/.*--out \\([^ ]*\\).*/\\1/")\n'
                                           'echo done > "$out/status"\n')
    (venv / "bin" / "torchrun").chmod(0o755)
    env = {**os.environ, "PATH": "/usr/bin:/bin", "VENV": str(venv), "OUT": str(tmp_path / "out"),
           "FOREGROUND": "1", "IMDS_URL": "http://127.0.0.1:9", "AWS": "true"}
    p = subprocess.run([str(ROOT / "run_ec2.sh"), "train", "--epochs", "1"], env=env, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0 and (tmp_path / "out" / "status").read_text() == "done\n", p.stderr
    assert "--nproc_per_node=1" in (tmp_path / "ran").read_text()
