"""app.py as people use it: the real server in a subprocess, called over HTTP by gradio_client with real JPEGs
and every kind of bad file, and driven in a real browser (Debian's chromium through playwright)."""
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
import zlib

import pytest
from PIL import Image

from conftest import ROOT, SAMPLES, needs_samples, run, train_cmd

pytestmark = needs_samples
GRADIO_ENV = {"GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_DISABLE_TELEMETRY": "1", "PYTHONUNBUFFERED": "1",
              "no_proxy": "127.0.0.1,localhost", "NO_PROXY": "127.0.0.1,localhost"}
CHROMIUM = "/usr/bin/chromium"
SAMPLES_FIRST = "n01514859_hen.JPEG"  # the first of the 8 examples app.py picks from the 100 samples


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def checkpoint(tiny_data, tmp_path_factory):
    """A real train.py checkpoint of a ResNet-50 (one epoch on 160 imagenette images) that evaluates at 224 px,
    so the latency measured below is that of the full-size network."""
    out = tmp_path_factory.mktemp("apprun")
    run(train_cmd("--data", tiny_data, "--out", out, "--arch", "resnet50", "--img-size", "64", "--eval-size", "224",
                  "--batch-size", "16", "--epochs", "1", "--workers", "1"), timeout=600)
    return out / "last.pt"


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    """app.py serving the checkpoint, with examples from the 100 real ImageNet samples; its URL."""
    port = free_port()
    log = open(tmp_path_factory.mktemp("applog") / "app.log", "w+")
    proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--checkpoint", str(checkpoint), "--examples",
                             str(SAMPLES), "--port", str(port)], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, **GRADIO_ENV})
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 180
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
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


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
            assert im.size == (224, 224)
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


def test_no_checkpoint_and_no_internet_fails_with_one_line(tmp_path):
    env = {**GRADIO_ENV, "TORCH_HOME": str(tmp_path / "torch"),
           **{k: "http://127.0.0.1:9" for k in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY")}}
    p = run([sys.executable, str(ROOT / "app.py"), "--port", str(free_port())], check=False, cwd=tmp_path, env=env,
            timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    line = p.stderr.strip().splitlines()[-1]
    assert "no checkpoint at runs/default/best.pt" in line and "could not be downloaded" in line
    assert "python train.py" in line
    p = run([sys.executable, str(ROOT / "app.py"), "--checkpoint", str(tmp_path / "nope.pt")], check=False,
            cwd=tmp_path, env=env, timeout=120)
    assert p.returncode == 2 and "does not exist" in p.stderr.strip().splitlines()[-1]


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"no browser at {CHROMIUM} (apt-get install -y chromium)")
def test_in_a_real_browser(server, client, tmp_path):
    """Chromium loads the page, uploads a JPEG, clicks Classify, reads the top-5, picks another class and reads
    the new map; the screenshot goes to tmp_path, and to $APP_SCREENSHOT when set (docs/app.png)."""
    from playwright.sync_api import sync_playwright
    jpeg = sorted(SAMPLES.iterdir())[2]
    expected = classify(client, jpeg)[0]["label"]
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu",
                                                                    "--disable-dev-shm-usage", "--no-proxy-server"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(server, wait_until="domcontentloaded")  # not "networkidle": the page asks for web fonts
            page.get_by_text("What does the network see?").wait_for(timeout=60_000)
            page.get_by_text(SAMPLES_FIRST).first.wait_for(timeout=10_000)  # the examples, from --examples
            page.locator("input[type=file]").first.set_input_files(str(jpeg))
            page.get_by_role("button", name="Classify").click()
            page.wait_for_function("document.querySelector('#status').innerText.includes('Top class')",
                                   timeout=60_000)
            top = page.locator("#top5").inner_text()
            assert expected in top, top
            first_map = page.locator("#cam img").get_attribute("src")
            page.locator("#pick label").nth(1).click()  # the second class of the top-5
            page.wait_for_function(f"document.querySelector('#cam img') && "
                                   f"document.querySelector('#cam img').src !== {json.dumps(first_map)}",
                                   timeout=60_000)
            page.wait_for_timeout(1500)  # let the new map fade in before the screenshot
            shot = tmp_path / "app.png"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert Image.open(shot).size[0] == 1280
    if os.environ.get("APP_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["APP_SCREENSHOT"])
