"""evaluate.py against plain torchvision code, and gradcam.py against pytorch-grad-cam, on real images."""
import csv
import json
import os
import shutil
import sys
import time

import pytest
import torch
import torchvision
from torchvision import transforms as T

import evaluate
import gradcam
import train
from conftest import ROOT, SAMPLES, error_line, link_tree, needs_imagenette, run, run_here, torchrun_cmd

pytestmark = needs_imagenette


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny real checkpoint: ResNet-18 at 64 px, 2 epochs on 300 imagenette images; 89 val images, an odd
    count, so that 2 ranks get shards of different sizes."""
    root = tmp_path_factory.mktemp("evalrun")
    data_root = link_tree(root / "data", 30, 9)
    first = sorted((data_root / "val" / "n01440764").iterdir())[0]
    first.unlink()
    run_here(train.main, ["--data", data_root, "--arch", "resnet18", "--img-size", "64", "--batch-size", "30",
                          "--epochs", "2", "--workers", "1", "--ema", "0.9", "--eval-size", "64", "--no-tta",
                          "--no-blurpool", "--out", root / "run"])
    return data_root, root / "run" / "last.pt"


def torchvision_reference(data_root, ckpt_path, size=64, resize=73, flip=False):
    """top-1 / top-5 hit counts computed with nothing of ours: ImageFolder, ToTensor, Normalize, torchvision's
    resnet18 with the checkpoint's state_dict."""
    sd = torch.load(ckpt_path, weights_only=True)["model"]
    net = torchvision.models.resnet18(num_classes=10)
    net.load_state_dict(sd)
    net.eval()
    tf = T.Compose([T.Resize(resize), T.CenterCrop(size), T.ToTensor(),
                    T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    ds = torchvision.datasets.ImageFolder(str(data_root / "val"), tf)
    top1 = top5 = 0
    with torch.no_grad():
        for x, y in torch.utils.data.DataLoader(ds, batch_size=50):
            p = net(x).softmax(1)
            if flip:
                p = (p + net(x.flip(3)).softmax(1)) / 2
            t5 = p.topk(5, 1).indices
            top1 += (t5[:, 0] == y).sum().item()
            top5 += (t5 == y[:, None]).any(1).sum().item()
    return top1, top5, len(ds)


def last_json(stdout):
    return json.loads(stdout.strip().splitlines()[-1])


def test_evaluate_equals_plain_torchvision_one_process_and_two_ranks(trained, tmp_path):
    data_root, ckpt = trained
    top1, top5, n = torchvision_reference(data_root, ckpt)
    assert n == 89
    one = last_json(run([sys.executable, str(ROOT / "evaluate.py"), "--checkpoint", str(ckpt),
                         "--out", str(tmp_path / "one"), "--workers", "1"]).stdout)
    assert (one["n"], one["top1"], one["top5"]) == (89, 100 * top1 / 89, 100 * top5 / 89)
    p = run(torchrun_cmd(2, "--checkpoint", ckpt, "--out", tmp_path / "two", "--workers", "0", script="evaluate.py"),
            env={"OMP_NUM_THREADS": "1"})
    two = last_json(p.stdout)
    assert two["world"] == 2 and (two["n"], two["top1"], two["top5"]) == (one["n"], one["top1"], one["top5"])
    # the predictions files are the same, row for row
    assert (tmp_path / "one" / "predictions.csv").read_text() == (tmp_path / "two" / "predictions.csv").read_text()


def test_evaluate_reports_tta_and_ema(trained, tmp_path, capfd):
    data_root, ckpt = trained
    top1, top5, _ = torchvision_reference(data_root, ckpt, flip=True)
    res = last_json(run_here(evaluate.main, ["--checkpoint", ckpt, "--tta", "flip", "--out", tmp_path], capfd).stdout)
    assert (res["top1"], res["top5"]) == (100 * top1 / 89, 100 * top5 / 89) and res["tta"] == "flip"
    rows = list(csv.DictReader(open(tmp_path / "predictions.csv")))
    assert len(rows) == 89 and set(rows[0]) >= {"path", "true", "pred", "confidence", "top5"}
    assert sum(int(r["correct"]) for r in rows) == top1
    per_class = list(csv.DictReader(open(tmp_path / "per_class.csv")))
    assert sum(int(r["n"]) for r in per_class) == 89 and per_class[0]["n"] == "8"
    confusions = list(csv.DictReader(open(tmp_path / "confusions.csv")))
    assert sum(int(r["count"]) for r in confusions) == 89 - top1
    assert (tmp_path / "confusion.png").stat().st_size > 10_000
    ema = last_json(run_here(evaluate.main, ["--checkpoint", ckpt, "--ema", "--out", tmp_path / "ema"], capfd).stdout)
    assert ema["ema"] is True and ema["n"] == 89


def test_evaluate_bare_torchvision_state_dict_and_bad_input(trained, tmp_path, capfd):
    data_root, ckpt = trained
    sd = torch.load(ckpt, weights_only=True)["model"]
    torch.save(sd, tmp_path / "tv.pth")
    res = last_json(run_here(evaluate.main, ["--checkpoint", tmp_path / "tv.pth", "--arch", "resnet18", "--data",
                                             data_root, "--img-size", "64", "--out", tmp_path / "tv"], capfd).stdout)
    top1, _, _ = torchvision_reference(data_root, ckpt)
    assert res["top1"] == 100 * top1 / 89
    for argv, expected in ((["--checkpoint", str(tmp_path / "tv.pth"), "--data", str(data_root)], "--arch"),
                           (["--checkpoint", str(tmp_path / "nope.pt")], "does not exist"),
                           (["--checkpoint", str(ckpt), "--data", str(SAMPLES)], "neither train/ and val/"),
                           # PyTorch's own text said "Re-running with weights_only=False will likely succeed": wrong
                           # for a file that is no checkpoint at all, and an invitation to an unsafe load
                           (["--checkpoint", str(ROOT / "README.md")], "README.md is not a PyTorch checkpoint")):
        p = run_here(evaluate.main, argv, capfd, check=False)
        assert p.returncode == 2 and "Traceback" not in p.stderr and expected in p.stderr.splitlines()[-1]
        assert "weights_only=False" not in p.stderr
    import app
    line = error_line(app.main, ["--checkpoint", str(ROOT / "README.md")], capfd)
    assert "README.md is not a PyTorch checkpoint" in line and "weights_only=False" not in line


def test_gradcam_reads_the_image_before_anything_else(trained, tmp_path, capfd, monkeypatch):
    """gradcam.py --image with a file that is no image started downloading Imagenette (the default data) before it
    looked at the image; now the image is read first, and the data is never asked for."""
    import data
    monkeypatch.setattr(data, "default_data", lambda: pytest.fail("--image must not fetch the default data"))
    bare = tmp_path / "tv.pth"  # a torchvision state_dict: no --data of its own, so the default data was fetched
    torch.save(torch.load(trained[1], weights_only=True)["model"], bare)
    line = error_line(gradcam.main, ["--checkpoint", str(bare), "--arch", "resnet18", "--image",
                                     str(ROOT / "README.md")], capfd)
    assert line.startswith("gradcam.py: error: --image") and "cannot be read as an image" in line


def test_gradcam_matches_pytorch_grad_cam(trained):
    """The same model, input, target layer (layer4) and class. pytorch-grad-cam computes in numpy float32 from
    the same activations and gradients, and normalizes with (x - min) / (max + 1e-7) where we use
    (x - min) / (max - min + 1e-7) after taking the min off: identical after its min subtraction. Both run the
    same float32 forward and backward, so the maps agree to float32 rounding: atol 1e-5 on a [0, 1] map."""
    pgc = pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.image import scale_cam_image
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    import model as M
    net, _ = M.load_checkpoint(trained[1])
    x = M.normalize(torch.stack([gradcam.data.eval_transform(64)(gradcam.data.load_rgb(p))
                                 for p in sorted(SAMPLES.iterdir())[:4]]))
    classes = torch.tensor([0, 3, 7, 9])
    ours, _ = gradcam.gradcam(net, x, classes)
    assert ours.shape == (4, 2, 2)  # 64 px in, 2x2 at layer4
    ref_cam = pgc.GradCAM(model=net, target_layers=[net.layer4])
    ref_cam(input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in classes])
    acts = ref_cam.activations_and_grads.activations[0].numpy()
    grads = ref_cam.activations_and_grads.gradients[0].numpy()
    raw = ref_cam.get_cam_image(x, net.layer4, None, acts, grads)          # before resizing
    ref = scale_cam_image(raw.clip(min=0))                                 # relu, then its min/max scaling
    torch.testing.assert_close(ours, torch.from_numpy(ref), atol=1e-5, rtol=0)
    # and at a real resolution: 224 px, a 7x7 map
    x224 = M.normalize(gradcam.data.eval_transform(224)(gradcam.data.load_rgb(sorted(SAMPLES.iterdir())[0]))[None])
    ours224, _ = gradcam.gradcam(net, x224, torch.tensor([2]))
    ref_cam(input_tensor=x224, targets=[ClassifierOutputTarget(2)])
    acts = ref_cam.activations_and_grads.activations[0].numpy()
    grads = ref_cam.activations_and_grads.gradients[0].numpy()
    ref224 = scale_cam_image(ref_cam.get_cam_image(x224, net.layer4, None, acts, grads).clip(min=0))
    assert ours224.shape == (1, 7, 7)
    torch.testing.assert_close(ours224, torch.from_numpy(ref224), atol=1e-5, rtol=0)


def test_gradcam_worst_rows_images_and_csv_equals_recompute(trained, tmp_path, capfd):
    data_root, ckpt = trained
    gc = [sys.executable, str(ROOT / "gradcam.py"), "--checkpoint", str(ckpt)]

    def here(*flags):
        return run_here(gradcam.main, ["--checkpoint", ckpt, *flags], capfd)
    # fresh: no predictions.csv yet, so it evaluates first
    p = here("--worst", "6", "--out", tmp_path / "fresh", "--workers", "0")
    assert "evaluating" in p.stdout
    # from evaluate.py's CSV
    run_here(evaluate.main, ["--checkpoint", ckpt, "--out", tmp_path / "csv"], capfd)
    p = here("--worst", "6", "--out", tmp_path / "csv")
    assert "reading" in p.stdout
    fresh = (tmp_path / "fresh" / "worst.csv").read_text()
    assert fresh == (tmp_path / "csv" / "worst.csv").read_text()
    rows = list(csv.DictReader(open(tmp_path / "csv" / "worst.csv")))
    preds = list(csv.DictReader(open(tmp_path / "csv" / "predictions.csv")))
    wrong = sorted((float(r["confidence"]) for r in preds if r["true"] != r["pred"]), reverse=True)
    assert len(rows) == 6 and [float(r["confidence"]) for r in rows] == wrong[:6]
    assert all(r["true"] != r["pred"] for r in rows)
    for name in ("worst_gradcam.png", "worst_plain.png"):
        assert (tmp_path / "csv" / name).stat().st_size > 50_000
    assert len(os.listdir(tmp_path / "csv" / "worst_cases")) == 6
    page = (tmp_path / "csv" / "worst.html").read_text()
    assert page.count("<figure>") == 6 and "worst_cases/005.png" in page
    # --best: correct ones; --image: one file with its top-5
    here("--best", "3", "--out", tmp_path / "csv")
    assert all(r["true"] == r["pred"] for r in csv.DictReader(open(tmp_path / "csv" / "best.csv")))
    p = here("--image", sorted(SAMPLES.iterdir())[0], "--class", "4", "--out", tmp_path / "one")
    assert len([line for line in p.stdout.splitlines() if "%" in line]) == 5
    assert (tmp_path / "one" / "image_gradcam.png").exists()
    not_image = tmp_path / "notes.JPEG"
    not_image.write_text("not a JPEG")
    p = run([*gc, "--image", str(not_image), "--out", str(tmp_path / "one")], check=False)  # a real process
    assert p.returncode == 2 and "cannot be read as an image" in p.stderr and "Traceback" not in p.stderr


def test_classification_report_matches_scikit_learn(trained, tmp_path, capfd):
    """per_class.csv's precision, recall and F1, and the JSON line's macro and weighted means, against
    scikit-learn's (a test-only dependency) on the same predictions."""
    metrics = pytest.importorskip("sklearn.metrics")
    _, ckpt = trained
    res = last_json(run_here(evaluate.main, ["--checkpoint", ckpt, "--out", tmp_path], capfd).stdout)
    rows = list(csv.DictReader(open(tmp_path / "predictions.csv")))
    y, pred = [int(r["true"]) for r in rows], [int(r["pred"]) for r in rows]
    p, r, f, n = metrics.precision_recall_fscore_support(y, pred, labels=list(range(10)), zero_division=0)
    per_class = list(csv.DictReader(open(tmp_path / "per_class.csv")))
    for c, row in enumerate(per_class):
        assert float(row["precision"]) == pytest.approx(p[c], abs=1e-6)
        assert float(row["recall"]) == pytest.approx(r[c], abs=1e-6) and int(row["n"]) == n[c]
        assert float(row["f1"]) == pytest.approx(f[c], abs=1e-6)
    for avg in ("macro", "weighted"):
        ref = metrics.precision_recall_fscore_support(y, pred, labels=list(range(10)), average=avg, zero_division=0)
        assert [res[f"{avg}_{k}"] for k in ("precision", "recall", "f1")] == pytest.approx(ref[:3], abs=1e-9)


def test_a_bare_evaluate_agrees_with_the_training_log(tmp_path, capfd):
    """train.py's defaults evaluate at 4/3 of the training size with flip TTA; `python evaluate.py` with nothing
    but the checkpoint does the same, so its top-1 is the log's."""
    data_root = link_tree(tmp_path / "data", 16, 5)
    out = tmp_path / "run"
    run_here(train.main, ["--data", data_root, "--arch", "resnet18", "--img-size", "64", "--batch-size", "16",
                          "--epochs", "1", "--workers", "1", "--out", out], capfd)
    logged = json.loads((out / "log.jsonl").read_text().splitlines()[-1])
    res = last_json(run_here(evaluate.main, ["--checkpoint", out / "last.pt", "--workers", "1"], capfd).stdout)
    assert (res["img_size"], res["tta"]) == (80, "flip")
    assert res["top1"] == pytest.approx(logged["val_top1"]) and res["top5"] == pytest.approx(logged["val_top5"])


def test_gradcam_reuses_predictions_only_from_the_same_evaluation(trained, tmp_path, capsys):
    """predictions.csv stands in for an evaluation only when it came from the same checkpoint, data, size, TTA and
    EMA choice (predictions.json says); otherwise gradcam.py evaluates again and says which setting differs. (Both
    scripts run in this process: their start-up is what the other tests time.)"""
    _, ckpt = trained
    base = ["--checkpoint", str(ckpt), "--out", str(tmp_path), "--workers", "0"]

    def gc(*flags):
        gradcam.main([*base, "--worst", "2", *flags])
        return capsys.readouterr().out

    evaluate.main(base)
    assert "reading" in gc()
    for flags, why in ((["--img-size", "96"], "img_size (64, now 96)"), (["--tta", "flip"], "tta (none, now flip)"),
                       (["--ema"], "ema (False, now True)")):
        out = gc(*flags)
        assert f"predictions.csv was made with another {why}" in out and "evaluating" in out, out
        assert "evaluating" in gc()  # the last run rewrote it with its own settings: back to the run's, evaluated again
    assert "reading" in gc()
    os.utime(ckpt)  # a newer checkpoint at the same path
    assert "another checkpoint_mtime_ns" in gc()


def test_without_a_checkpoint_the_newest_run_is_taken_and_named(trained, tmp_path, monkeypatch, capsys):
    """evaluate.py and gradcam.py given no --checkpoint take the newest runs/*/best.pt and say which, and which data;
    with none, one line says how to get one."""
    _, ckpt = trained
    for name, age in (("old", 100), ("new", 0)):
        (tmp_path / "runs" / name).mkdir(parents=True)
        shutil.copy(ckpt, tmp_path / "runs" / name / "best.pt")
        os.utime(tmp_path / "runs" / name / "best.pt", (time.time() - age, time.time() - age))
    monkeypatch.chdir(tmp_path)
    evaluate.main(["--workers", "0"])
    out = capsys.readouterr().out
    assert f"no --checkpoint: the newest run's, {os.path.join('runs', 'new', 'best.pt')}" in out
    assert f"data {trained[0]}" in out and (tmp_path / "runs" / "new" / "eval" / "predictions.csv").exists()
    gradcam.main(["--worst", "2", "--workers", "0"])
    assert "the newest run's" in capsys.readouterr().out and (tmp_path / "runs" / "new" / "eval" / "worst.csv").exists()
    monkeypatch.chdir(tmp_path / "runs")
    assert "no --checkpoint given and no runs/*/best.pt here" in error_line(evaluate.main, [], capsys)
