"""app.py as people use it: the real server in a subprocess, called over HTTP by gradio_client with real JPEGs
and every kind of bad file, and driven in a real browser (Debian's chromium through playwright)."""
import base64
import contextlib
import http.server
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import urllib.request
import zlib

import pytest
from PIL import Image

import train
from conftest import ROOT, SAMPLES, Answers, error_line, free_port, needs_samples, run, run_here

pytestmark = needs_samples
GRADIO_ENV = {"GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_DISABLE_TELEMETRY": "1", "PYTHONUNBUFFERED": "1",
              "no_proxy": "127.0.0.1,localhost", "NO_PROXY": "127.0.0.1,localhost"}
CHROMIUM = "/usr/bin/chromium"
SAMPLES_FIRST = "n01514859_hen.JPEG"  # the first of the 8 examples app.py picks from the 100 samples


@pytest.fixture(scope="module")
def checkpoint(tiny_data, tmp_path_factory):
    """A real train.py checkpoint of a ResNet-50 (one epoch on 160 imagenette images) that evaluates at 224 px,
    so the latency measured below is that of the full-size network."""
    out = tmp_path_factory.mktemp("apprun")
    run_here(train.main, ["--data", tiny_data, "--out", out, "--arch", "resnet50", "--img-size", "64", "--eval-size",
                          "224", "--batch-size", "16", "--epochs", "1", "--workers", "1"])
    return out / "last.pt"


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    """A folder of examples as users have them: 12 real ImageNet photos, and a private notes.txt beside them."""
    folder = tmp_path_factory.mktemp("examples")
    for f in sorted(SAMPLES.iterdir())[:12]:
        shutil.copyfile(f, folder / f.name)
    (folder / "notes.txt").write_text("my AWS keys, say")
    return folder


@contextlib.contextmanager
def serving(argv, cwd, log_path, env=None):
    """A real app.py server process on a free port, up and answering HTTP; yields its URL."""
    port = free_port()
    log = open(log_path, "w+")
    proc = subprocess.Popen([sys.executable, *map(str, argv), "--port", str(port)], cwd=cwd, stdout=log,
                            stderr=subprocess.STDOUT, env=env or {**os.environ, **GRADIO_ENV})
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 180
    try:
        while True:
            try:
                urllib.request.build_opener(urllib.request.ProxyHandler({})).open(url, timeout=5)
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    log.seek(0)
                    pytest.fail(f"app.py did not come up on {url}:\n{log.read()[-3000:]}")
                time.sleep(1)
        yield url
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def server(checkpoint, examples, tmp_path_factory):
    """app.py serving the checkpoint, with examples from a folder of real ImageNet photos; its URL."""
    with serving([ROOT / "app.py", "--checkpoint", checkpoint, "--examples", examples], ROOT,
                 tmp_path_factory.mktemp("applog") / "app.log") as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    from gradio_client import Client
    return Client(server, verbose=False)


def classify(client, path):
    """(label dict, overlay path, status markdown) for one file, through the page's /classify endpoint."""
    from gradio_client import handle_file
    result = client.predict(handle_file(str(path)) if path is not None else None, api_name="/classify")
    label, overlay, _, status = result[:4]
    return label, overlay, status


def test_the_map_is_shown_large_whatever_the_models_size():
    """A 64 px model's crop and map come out at 320 px a side, not as a thumbnail; a larger crop keeps its size."""
    import numpy as np
    import torch
    import app
    x = torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8)
    shown = app.paint(x, torch.rand(1, 2, 2))
    assert shown.shape == (320, 320, 3) and shown.dtype == np.uint8
    assert app.paint(torch.zeros(3, 384, 384, dtype=torch.uint8), torch.rand(1, 12, 12)).shape == (384, 384, 3)


def test_example_captions_name_the_class():
    """An example from a dataset's class folder is captioned with its class's name; any other by its file name."""
    import app
    classes, names = ["n01440764", "n02102040"], ["tench", "English springer"]
    assert app.caption("/d/val/n02102040/ILSVRC2012_val_00004650.JPEG", classes, names) == "English springer"
    assert app.caption("/photos/my dog.jpg", classes, names) == "my dog"
    assert app.caption("/space/examples/03 chain saw.jpg") == "chain saw"


def test_real_jpegs_get_a_top5_an_overlay_and_a_latency(client):
    ms = []
    for path in sorted(SAMPLES.iterdir())[:3]:
        label, overlay, status = classify(client, path)
        probs = [c["confidence"] for c in label["confidences"]]
        assert len(probs) == 5 and probs == sorted(probs, reverse=True)
        assert 0 < sum(probs) <= 1 + 1e-6  # 5 of 10 classes
        assert label["label"] == label["confidences"][0]["label"]
        assert re.fullmatch(r".+ \(\d\)", label["label"])  # "name (index)": a name from the checkpoint
        with Image.open(overlay) as im:
            assert im.size == (320, 320)  # the 224 px crop, shown at the page's 320 px
            assert len(set(im.convert("RGB").get_flattened_data())) > 100  # a photo under a heat map, not a flat image
        assert "Top class" in status
        ms.append(float(re.search(r"(\d+) ms for the top-5 and Grad-CAM", status).group(1)))
    # ResNet-50 at 224 px: the prediction and the Grad-CAM (a forward and a backward) on this machine's CPU
    assert sorted(ms)[1] < 1000, ms


def png_claiming(width, height):
    """A small PNG file whose header claims width x height pixels: what a decompression bomb looks like."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
        chunk(b"IEND", b"")


def test_bad_files_get_a_clear_message_and_the_server_keeps_serving(client, tmp_path):
    jpeg = sorted(SAMPLES.iterdir())[0]
    (tmp_path / "notes.jpg").write_text("this is not an image")
    (tmp_path / "cut.jpg").write_bytes(jpeg.read_bytes()[:6000])
    (tmp_path / "bomb.png").write_bytes(png_claiming(20000, 20000))
    Image.new("RGB", (8, 8), "red").save(tmp_path / "tiny.png")
    cases = {"notes.jpg": "is not an image", "cut.jpg": "is damaged or truncated", "bomb.png": "too large",
             "tiny.png": "only 8x8 px"}
    for name, expected in cases.items():
        label, overlay, status = classify(client, tmp_path / name)
        assert "Cannot classify this" in status and expected in status, (name, status)
        assert overlay is None and not label
    _, _, status = classify(client, None)
    assert "Upload a photo" in status
    # and after all that, a real photo still works
    assert "Top class" in classify(client, jpeg)[2]


def test_rgba_palette_grayscale_and_cmyk_are_converted(client, tmp_path):
    src = Image.open(sorted(SAMPLES.iterdir())[1]).convert("RGB")
    rgba = src.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(tmp_path / "rgba.png")
    src.convert("P").save(tmp_path / "palette.png")
    src.convert("L").save(tmp_path / "gray.jpg")
    src.convert("CMYK").save(tmp_path / "cmyk.jpg")
    for name, mode in (("rgba.png", "RGBA"), ("palette.png", "P"), ("gray.jpg", "L"), ("cmyk.jpg", "CMYK")):
        label, overlay, status = classify(client, tmp_path / name)
        assert len(label["confidences"]) == 5 and overlay is not None
        assert f"a {mode} image, converted to RGB" in status, status


def test_examples_span_the_classes_of_a_folder_or_a_dataset(tmp_path):
    import app
    picked = app.pick_examples(str(SAMPLES), 8)
    assert len(picked) == 8 and os.path.basename(picked[0]) == SAMPLES_FIRST
    assert len({os.path.basename(p).split("_")[0] for p in picked}) == 8  # 8 different classes
    assert app.pick_examples(str(tmp_path / "missing"), 8) == []
    from conftest import IMAGENETTE
    if IMAGENETTE.is_dir():  # a dataset root: its val split, one image of each class
        picked = app.pick_examples(str(IMAGENETTE), 20)
        assert len(picked) == 10 and all("/val/" in p for p in picked)


def test_no_checkpoint_and_no_internet_fails_with_one_line(tmp_path, capsys):
    env = {**GRADIO_ENV, "TORCH_HOME": str(tmp_path / "torch"),
           **{k: "http://127.0.0.1:9" for k in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY")}}
    p = run([sys.executable, str(ROOT / "app.py"), "--port", str(free_port())], check=False, cwd=tmp_path, env=env,
            timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    line = p.stderr.strip().splitlines()[-1]
    assert "no checkpoint (no --checkpoint, no model.pt beside app.py, no runs/*/best.pt)" in line
    assert "could not be downloaded" in line
    assert "python train.py" in line
    import app
    assert "does not exist" in error_line(app.main, ["--checkpoint", str(tmp_path / "nope.pt")], capsys)


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"no browser at {CHROMIUM} (apt-get install -y chromium)")
def test_in_a_real_browser(server, client, examples, tmp_path):
    """Chromium loads the page, uploads a JPEG, clicks Classify, sees the photo and the top-5, picks another class
    and sees the new map, then clicks an example thumbnail; the screenshot goes to tmp_path, and to
    $APP_SCREENSHOT when set (docs/app.png)."""
    from playwright.sync_api import sync_playwright
    jpeg = sorted(SAMPLES.iterdir())[2]
    expected = classify(client, jpeg)[0]["label"]
    third_example = sorted(examples.glob("*.JPEG"))[3]  # the examples are files 0, 1, 3, 4, ... of the 12
    expected_example = classify(client, third_example)[0]["label"]
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu",
                                                                    "--disable-dev-shm-usage", "--no-proxy-server"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1100})
            page.goto(server, wait_until="domcontentloaded")  # not "networkidle": the page asks for web fonts
            page.get_by_text("What does the network see?").wait_for(timeout=60_000)
            page.wait_for_function("document.querySelectorAll('#examples img').length == 8", timeout=30_000)
            page.locator("input[type=file]").first.set_input_files(str(jpeg))
            page.get_by_role("button", name="Classify").click()
            page.wait_for_function("document.querySelector('#status').innerText.includes('Top class')",
                                   timeout=60_000)
            assert expected in page.locator("#top5").inner_text()
            page.locator("#photo img").first.wait_for(timeout=30_000)  # the photo itself, as our code decoded it
            first_map = page.locator("#cam img").get_attribute("src")
            page.locator("#pick label").nth(1).click()  # the second class of the top-5
            page.wait_for_function(f"document.querySelector('#cam img') && "
                                   f"document.querySelector('#cam img').src !== {json.dumps(first_map)}",
                                   timeout=60_000)
            page.locator("#examples img").nth(2).click()  # an example thumbnail
            page.wait_for_function(f"document.querySelector('#top5').innerText.includes({json.dumps(expected_example)})"
                                   f" && document.querySelector('#status').innerText.includes('Top class')",
                                   timeout=60_000)
            page.wait_for_timeout(1500)  # let the new map fade in before the screenshot
            shot = tmp_path / "app.png"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert Image.open(shot).size[0] == 1280
    if os.environ.get("APP_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["APP_SCREENSHOT"])


def test_only_the_examples_reach_the_page_not_the_folder_beside_them(server, examples):
    """The example photos go through Gradio's cache; no folder of ours is served: a notes.txt beside them, the
    examples' own paths and the repository's files are all refused."""
    import urllib.error
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    for path in (examples / "notes.txt", examples / SAMPLES_FIRST, ROOT / "app.py"):
        for route in ("gradio_api/file=", "file="):
            with pytest.raises(urllib.error.HTTPError) as refused:
                opener.open(server + route + str(path), timeout=10)
            assert refused.value.code in (403, 404), (route, path)
    config = json.loads(opener.open(server + "config", timeout=10).read())
    gallery = next(c for c in config["components"] if c.get("props", {}).get("elem_id") == "examples")
    urls = [item["image"]["url"] for item in gallery["props"]["value"]]
    assert len(urls) == 8 and all(str(examples) not in u for u in urls)
    assert all(opener.open(u, timeout=10).status == 200 for u in urls)  # the thumbnails themselves are served


def test_the_exported_space_runs_alone_and_classifies_a_photo(checkpoint, examples, tmp_path, capfd):
    """--export-space writes a folder that needs nothing of the repository: copied alone into an empty directory
    it starts, shows its examples, and classifies a real photo."""
    out = tmp_path / "space"
    import app
    p = run_here(app.main, ["--checkpoint", checkpoint, "--examples", examples, "--num-examples", "4",
                            "--export-space", out], capfd)
    assert "wrote" in p.stdout
    names = {str(f.relative_to(out)) for f in out.rglob("*") if f.is_file()}
    assert {"app.py", "model.py", "data.py", "gradcam.py", "evaluate.py", "runtime.py", "model.pt",
            "requirements.txt", "README.md", "curves.png", "LICENSE"} <= names
    assert len([n for n in names if n.startswith("examples/")]) == 4
    card = (out / "README.md").read_text()
    assert card.startswith("---\ntitle: resnet50") and "\nsdk: gradio\n" in card and "\napp_file: app.py\n" in card
    assert "| val top-1 |" in card and "python train.py --data" in card and "](curves.png)" in card
    assert "\nlicense: mit\n" in card and "under ImageNet's terms of access" in card
    import torch
    weights = torch.load(out / "model.pt", weights_only=True)
    assert "optimizer" not in weights and weights["args"]["eval_size"] == 224 and len(weights["class_names"]) == 10
    assert "torch" in (out / "requirements.txt").read_text().split()
    alone = tmp_path / "empty" / "space"
    shutil.copytree(out, alone)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "APP_EXAMPLES")}
    with serving([alone / "app.py"], alone, tmp_path / "space.log", env={**env, **GRADIO_ENV}) as url:
        from gradio_client import Client
        label, overlay, status = classify(Client(url, verbose=False), sorted(SAMPLES.iterdir())[5])
        assert len(label["confidences"]) == 5 and "Top class" in status and overlay is not None
    log = (tmp_path / "space.log").read_text()
    assert "from `model.pt`" in log and f"4 examples from {alone / 'examples'}" in log


class FakeHub(Answers):
    """The Hub's HTTP API as huggingface_hub uses it to create a Space and commit files to it, on 127.0.0.1: it
    records what it receives and answers that every file is a regular (not LFS) upload."""
    created, files, tokens, unknown = [], {}, set(), []

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        FakeHub.tokens.add(self.headers.get("Authorization"))
        if self.path == "/api/validate-yaml":  # the client checks the README's front matter first
            return self.answer({"errors": [], "warnings": []})
        if self.path == "/api/repos/create":
            FakeHub.created.append(json.loads(body))
            return self.answer({"url": f"http://{self.headers['Host']}/spaces/someone/resnet-demo"})
        if re.fullmatch(r"/api/spaces/someone/resnet-demo/preupload/main", self.path):
            files = json.loads(body)["files"]
            return self.answer({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                         for f in files]})
        if re.fullmatch(r"/api/spaces/someone/resnet-demo/commit/main", self.path):
            for line in body.decode().splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    FakeHub.files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            return self.answer({"commitUrl": f"http://{self.headers['Host']}/spaces/someone/resnet-demo/commit/"
                                            + "0" * 40, "commitOid": "0" * 40})
        FakeHub.unknown.append(("POST", self.path))
        self.answer({"error": "not in the stand-in"}, 404)

    def do_GET(self):
        FakeHub.unknown.append(("GET", self.path))
        self.answer({"error": "not in the stand-in"}, 404)

    def answer(self, obj, code=200):
        self.reply(code, json.dumps(obj).encode(), "application/json")


def test_push_uploads_the_space_to_the_hub(checkpoint, examples, tmp_path, capfd):
    """--push USER/NAME creates the Space (sdk gradio) and commits the files the export wrote, through HF_ENDPOINT to
    a stand-in of the Hub on 127.0.0.1: no traffic leaves this machine. It used to upload the whole folder: a file of
    the user's beside the export was published. An export into a folder with files it did not write is refused."""
    import app
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("private")
    line = error_line(app.main, ["--checkpoint", str(checkpoint), "--export-space", str(mine)], capfd)
    assert f"{mine} holds files that --export-space did not write" in line and (mine / "notes.txt").exists()
    out = tmp_path / "space"
    run_here(app.main, ["--checkpoint", checkpoint, "--examples", examples, "--num-examples", "3", "--export-space",
                        out], capfd)
    (out / "notes.txt").write_text("private")  # the user's, beside an export; the next one writes 2 examples, not 3
    hub = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    threading.Thread(target=hub.serve_forever, daemon=True).start()
    FakeHub.created, FakeHub.files, FakeHub.tokens, FakeHub.unknown = [], {}, set(), []
    try:
        p = run([sys.executable, str(ROOT / "app.py"), "--checkpoint", str(checkpoint), "--examples", str(examples),
                 "--num-examples", "2", "--export-space", str(out), "--push", "someone/resnet-demo"],
                env={**GRADIO_ENV, "HF_ENDPOINT": f"http://127.0.0.1:{hub.server_port}", "HF_TOKEN": "hf_test_token",
                     "HF_HUB_DISABLE_XET": "1"})
        assert f"pushed to http://127.0.0.1:{hub.server_port}/spaces/someone/resnet-demo" in p.stdout, p.stdout
    finally:
        hub.shutdown()
    assert FakeHub.created and FakeHub.created[0]["type"] == "space" and FakeHub.created[0]["sdk"] == "gradio"
    assert FakeHub.tokens == {"Bearer hf_test_token"}
    local = {str(f.relative_to(out)): f.read_bytes() for f in out.rglob("*") if f.is_file()
             and f.name not in ("notes.txt", ".space_files")}
    assert FakeHub.files == local, sorted(set(FakeHub.files) ^ set(local))
    assert len([f for f in local if f.startswith("examples/")]) == 2  # the earlier export's third example: removed
    assert (out / "notes.txt").read_text() == "private" and "notes.txt" not in FakeHub.files
    p = run([sys.executable, str(ROOT / "app.py"), "--checkpoint", str(checkpoint), "--export-space",
             str(tmp_path / "again"), "--push", "someone/resnet-demo"],
            env={**GRADIO_ENV, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_TOKEN": "x"}, check=False, timeout=300)
    assert p.returncode == 2 and "could not push" in p.stderr.strip().splitlines()[-1] and "Traceback" not in p.stderr


def test_ema_weights_are_served_when_asked_for(tiny_data, tmp_path, checkpoint, capsys):
    import torch
    import app
    out = tmp_path / "ema"
    run_here(train.main, ["--data", tiny_data, "--out", out, "--arch", "resnet18", "--img-size", "32", "--batch-size",
                          "16", "--epochs", "1", "--workers", "1", "--ema", "0.5"], capsys)
    ckpt = torch.load(out / "last.pt", weights_only=True)
    model, _, _, about, _ = app.load_model(str(out / "last.pt"), True, torch.device("cpu"))
    ema = {k[len("module."):]: v for k, v in ckpt["ema"].items() if k.startswith("module.")}
    assert all(torch.equal(model.state_dict()[k], v) for k, v in ema.items()) and "(EMA weights)" in about
    assert "without the run's flip TTA here (one forward a photo, for speed)" in about  # said, not silently ignored
    assert not torch.equal(model.state_dict()["fc.weight"], ckpt["model"]["fc.weight"])
    assert "holds no EMA weights" in error_line(app.main, ["--checkpoint", str(checkpoint), "--ema"], capsys)


def test_push_needs_an_explicit_checkpoint(capsys):
    """The newest run is never published by accident: --push names its checkpoint."""
    import app
    line = error_line(app.main, ["--export-space", "space", "--push", "someone/demo"], capsys)
    assert "--push needs an explicit --checkpoint" in line
