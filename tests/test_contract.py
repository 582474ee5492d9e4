"""The contracts between the scripts: the checkpoint format (model.py) and the checkpoints written before it changed,
the step's flags shared by train.py and lr_finder.py, and the one default of the loader's workers."""
import io
import json
import subprocess
import sys
import tarfile

import pytest
import torch

import data
import evaluate
import lr_finder
import model as M
import train
from conftest import ROOT, run, run_here
from test_survive import run_until

# the last commit that wrote checkpoint format 1 (no "format" key, the progress at the top level, app.py's
# "ema_weights"): its code, taken from git, writes the old files that today's code must still resume and load
FORMAT_1 = "3e90219"
TINY = ["--arch", "resnet18", "--img-size", "32", "--batch-size", "16", "--workers", "1", "--log-every", "1",
        "--epochs", "3", "--ema", "0.9", "--keep-every", "1"]


@pytest.fixture(scope="module")
def format_1(tiny_data, tmp_path_factory):
    """Every kind of checkpoint as the code of format 1 wrote it, from a run of that code interrupted by SIGTERM in
    its third epoch: a mid-epoch last.pt, a slimmed epoch_001.pt, a whole epoch_002.pt, and an exported Space's
    model.pt (with the EMA weights); and the last.pt of the same run, uninterrupted, under that code."""
    tmp = tmp_path_factory.mktemp("format1")
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", FORMAT_1], capture_output=True)
    if archive.returncode != 0:
        pytest.skip(f"needs the git history with commit {FORMAT_1}, the code of checkpoint format 1: "
                    f"{archive.stderr.decode().strip()[:200]}")
    tarfile.open(fileobj=io.BytesIO(archive.stdout)).extractall(tmp / "code", filter="data")
    old = [sys.executable, str(tmp / "code" / "train.py"), "--data", str(tiny_data), *TINY]
    run(old + ["--out", str(tmp / "full")])
    code, log = run_until(old + ["--out", str(tmp / "run")], 24)  # SIGTERM after epoch 3's 4th step
    assert code == 75 and "saved" in log and "(preempted)" in log, log
    run([sys.executable, str(tmp / "code" / "app.py"), "--checkpoint", str(tmp / "run" / "epoch_002.pt"), "--ema",
         "--export-space", str(tmp / "space"), "--num-examples", "1"],
        env={"GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_DISABLE_TELEMETRY": "1"})
    return tmp


def test_format_1_files_are_what_the_upgrade_reads(format_1):
    """The fixture really holds format 1: what upgrade_1_to_2 was written for."""
    mid = torch.load(format_1 / "run" / "last.pt", weights_only=True)
    slim = torch.load(format_1 / "run" / "epoch_001.pt", weights_only=True)
    space = torch.load(format_1 / "space" / "model.pt", weights_only=True)
    assert "format" not in mid and mid["epoch"] == 2 and 4 <= mid["step"] < 10 and "optimizer" in mid
    assert "format" not in slim and "epoch" in slim and "optimizer" not in slim
    assert space["ema_weights"] is True and "epoch" not in space


def test_a_format_1_mid_epoch_checkpoint_resumes_as_the_old_code_would_have_continued(tiny_data, format_1, tmp_path,
                                                                                     capfd):
    """Today's train.py resumes the old last.pt at its step and ends with the same weights as the old code's
    uninterrupted run, bitwise; the epoch's running sums carry over, so its log row matches too."""
    out = tmp_path / "run"
    subprocess.run(["cp", "-r", str(format_1 / "run"), str(out)], check=True)
    step = torch.load(out / "last.pt", weights_only=True)["step"]  # 4 or 5: where SIGTERM caught the old run
    p = run_here(train.main, ["--data", tiny_data, *TINY, "--out", out], capfd)
    assert f"resumed from {out / 'last.pt'}: epoch 3, step {step}/10" in p.stdout
    assert (out / "status").read_text() == "done\n"
    new, old = M.read_checkpoint(out / "last.pt"), M.read_checkpoint(format_1 / "full" / "last.pt")
    assert new["format"] == M.FORMAT and new["progress"]["epochs_done"] == old["progress"]["epochs_done"] == 3
    for part in ("model", "ema"):
        for k in old[part]:
            assert torch.equal(new[part][k], old[part][k]), f"{part}.{k} differs"
    last = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()][-1]
    expected = [json.loads(line) for line in (format_1 / "full" / "log.jsonl").read_text().splitlines()][-1]
    assert last["epoch"] == 2 and last["train_loss"] == pytest.approx(expected["train_loss"], rel=1e-6)
    assert last["train_top1"] == expected["train_top1"]
    assert last["val_top1"] == expected["val_top1"] and last["ema_top1"] == expected["ema_top1"]


def test_a_format_1_slimmed_epoch_file_and_space_model_load(format_1, capsys):
    """evaluate.py reads the old slimmed epoch_001.pt, its weights and its EMA's, and gets the old log's top-1; the
    old Space's model.pt loads as the EMA weights it holds."""
    rows = [json.loads(line) for line in (format_1 / "run" / "log.jsonl").read_text().splitlines()]
    for ema, key in ((False, "val_top1"), (True, "ema_top1")):
        evaluate.run(evaluate.parse_args(["--checkpoint", str(format_1 / "run" / "epoch_001.pt"), "--workers", "0",
                                          "--out", str(format_1 / f"eval{ema}")] + (["--ema"] if ema else [])))
        result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert (result["n"], result["img_size"], result["tta"]) == (80, 48, "flip")
        assert result["top1"] == pytest.approx(rows[0][key])
    space, info = M.load_checkpoint(format_1 / "space" / "model.pt")
    ema, _ = M.load_checkpoint(format_1 / "run" / "epoch_002.pt", ema=True)
    assert info["ema"] and info["arch"] == "resnet18" and info["eval_size"] == 48 and len(info["names"]) == 10
    for k, v in ema.state_dict().items():
        assert torch.equal(space.state_dict()[k], v), k


def test_the_format_is_stated_once_and_checked(tmp_path):
    """A writer cannot add a key that model.py does not state; a file of a newer format is refused with one line
    that says to update; a bare state_dict reads as a checkpoint with weights only."""
    with pytest.raises(AssertionError, match="not in the checkpoint format"):
        M.save_checkpoint({"model": {}, "notes": "a field nobody documented"}, tmp_path / "x.pt")
    M.save_atomic({"format": M.FORMAT + 1, "model": M.resnet18(num_classes=2).state_dict()}, tmp_path / "new.pt")
    with pytest.raises(ValueError, match=f"has format {M.FORMAT + 1}, newer than this code reads"):
        M.read_checkpoint(tmp_path / "new.pt")
    torch.save(M.resnet18(num_classes=2).state_dict(), tmp_path / "bare.pt")
    bare = M.read_checkpoint(tmp_path / "bare.pt")
    assert bare["format"] == M.FORMAT and bare["args"] == {} and "optimizer" not in bare
    assert "fc.weight" in bare["model"]
    assert len(M.UPGRADES) == M.FORMAT - 1


def test_a_new_step_flag_reaches_the_lr_test_and_its_command_with_no_second_edit(tiny_data, tmp_path, monkeypatch,
                                                                                capsys):
    """A flag added to train.add_step_args (here a made-up --color-jitter) is taken by lr_finder.py, reaches the
    datasets it trains on (through train.make_datasets, as train.py's do), and is copied into the train.py command
    it prints."""
    add_step_args, make_datasets, seen = train.add_step_args, train.make_datasets, []

    def with_a_new_flag(p):
        add_step_args(p).add_argument("--color-jitter", type=float, default=0.0, help="a new augmentation")
        return p

    def recording(args, *rest, **kw):
        seen.append(args.color_jitter)
        return make_datasets(args, *rest, **kw)

    monkeypatch.setattr(train, "add_step_args", with_a_new_flag)
    monkeypatch.setattr(train, "make_datasets", recording)
    lr_finder.main(["--data", str(tiny_data), "--arch", "resnet18", "--img-size", "32", "--batch-size", "16",
                    "--iters", "10", "--workers", "0", "--device", "cpu", "--out", str(tmp_path),
                    "--color-jitter", "0.4"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert seen == [0.4] and " --color-jitter 0.4 " in result["command"]
    assert train.parse_args(["--color-jitter", "0.4"]).color_jitter == 0.4  # and train.py takes it too


def test_one_default_for_the_loader_workers(tiny_data, capfd):
    """--check-data without --workers uses data.default_workers(), as training and evaluation do."""
    p = run_here(train.main, ["--data", tiny_data, "--check-data"], capfd)
    assert f"decoding every file with {data.default_workers()} processes" in p.stdout
