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


def test_the_format_is_one_table_that_every_writer_follows(tiny_data, tmp_path, capfd, monkeypatch):
    """model.FIELDS is the format: train.py's checkpoint holds exactly its fields, a weights-only file exactly its
    "file" group (no state of the run: about half the size), and a writer that leaves a field out, or adds one the
    table lacks, stops at its save, so that a new field in the table that no writer fills fails at once instead of
    vanishing. A file of a newer format is refused with one line that says to update; a bare state_dict reads as a
    checkpoint with weights only."""
    out = tmp_path / "run"
    run_here(train.main, ["--data", tiny_data, "--out", out, "--arch", "resnet18", "--img-size", "32", "--batch-size",
                          "16", "--workers", "0", "--epochs", "2", "--stop-epoch", "1"], capfd)
    whole = torch.load(out / "last.pt", weights_only=True)
    assert set(whole) == set(M.FIELDS)
    M.save_weights(M.read_checkpoint(out / "last.pt"), tmp_path / "slim.pt")
    slim = torch.load(tmp_path / "slim.pt", weights_only=True)
    assert set(slim) == {k for k, (group, _, _) in M.FIELDS.items() if group == "file"}
    assert (tmp_path / "slim.pt").stat().st_size < 0.6 * (out / "last.pt").stat().st_size  # no momentum in it
    assert M.load_checkpoint(tmp_path / "slim.pt")[1]["arch"] == "resnet18"  # what readers need is in the file group
    with pytest.raises(AssertionError, match=r"unknown \['notes'\]"):
        M.save_checkpoint({**whole, "notes": "a field nobody put in the table"}, tmp_path / "x.pt")
    with pytest.raises(AssertionError, match=r"missing \[\] of the file's, \['rng'\] of the run's"):
        M.save_checkpoint({k: v for k, v in whole.items() if k != "rng"}, tmp_path / "x.pt")
    monkeypatch.setitem(M.FIELDS, "seen_images", ("run", None, "int: a field added to the table, no writer yet"))
    monkeypatch.setattr(M, "KEYS", set(M.FIELDS))
    with pytest.raises(AssertionError, match=r"\['seen_images'\] of the run's"):  # at its first save, not silently
        run_here(train.main, ["--data", tiny_data, "--out", tmp_path / "again", "--arch", "resnet18", "--img-size",
                              "32", "--batch-size", "16", "--workers", "0", "--epochs", "2", "--stop-epoch", "1"],
                 capfd)
    M.save_atomic({"format": M.FORMAT + 1, "model": M.resnet18(num_classes=2).state_dict()}, tmp_path / "new.pt")
    with pytest.raises(ValueError, match=f"has format {M.FORMAT + 1}, newer than this code reads"):
        M.read_checkpoint(tmp_path / "new.pt")
    torch.save(M.resnet18(num_classes=2).state_dict(), tmp_path / "bare.pt")
    bare = M.read_checkpoint(tmp_path / "bare.pt")
    assert bare["format"] == M.FORMAT and bare["args"] == {} and "optimizer" not in bare
    assert "fc.weight" in bare["model"]
    assert len(M.UPGRADES) == M.FORMAT - 1


def test_a_new_augmentation_is_one_entry_and_reaches_the_images_of_both_scripts(tiny_data, tmp_path, monkeypatch,
                                                                                 capsys):
    """A new augmentation is one entry of data.AUGMENTATIONS (here a made-up --invert): its flag is taken by train.py
    and lr_finder.py, its value reaches the transform of the images both train on (no second edit: make_datasets
    hands every entry's flag over), and lr_finder.py copies it into the train.py command it prints. Before, the flag
    was recorded in a wrapper while build_datasets never heard of it."""
    import torchvision.transforms.v2.functional as F
    made = []

    def build(on):  # the transform: inverts the image, and records that it was made for this value
        made.append(on)
        return (lambda x: F.invert(x)) if on else None

    monkeypatch.setitem(data.AUGMENTATIONS, "invert", dict(flag=dict(action="store_true", help="invert the colours"),
                                                           build=build))
    args = train.parse_args(["--data", str(tiny_data), "--invert", "--img-size", "32", "--seed", "3"])
    inverted, _, _ = train.make_datasets(args, str(tiny_data), 32)
    plain, _, _ = train.make_datasets(train.parse_args(["--data", str(tiny_data), "--img-size", "32", "--seed", "3"]),
                                      str(tiny_data), 32)
    assert made == [True, False]
    assert torch.equal(inverted[(0, 0)][0], 255 - plain[(0, 0)][0])  # the same crop, through the new transform
    lr_finder.main(["--data", str(tiny_data), "--arch", "resnet18", "--img-size", "32", "--batch-size", "16",
                    "--iters", "10", "--workers", "0", "--device", "cpu", "--out", str(tmp_path), "--invert"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert made[-1] is True and " --invert " in result["command"] + " "


def test_one_default_for_the_loader_workers(tiny_data, capfd):
    """--check-data without --workers uses data.default_workers(), as training and evaluation do."""
    p = run_here(train.main, ["--data", tiny_data, "--check-data"], capfd)
    assert f"decoding every file with {data.default_workers()} processes" in p.stdout
