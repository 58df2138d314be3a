"""`visiontune serve`: JSON API (limits, bad uploads -> 4xx) and the page in headless Chromium."""

from __future__ import annotations

import io
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

import visiontune as vt
from conftest import TINY, make_class_folders, make_image

pytest.importorskip("fastapi")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("serve")
    data = make_class_folders(root / "data", {"red": 8, "green": 8})
    result = vt.fit(data, **dict(TINY, strategy="feature-extract", epochs=12, lr=5e-2, augment=False, output=str(root / "runs")))
    return Path(result.run_dir)


def test_api_predicts_and_rejects_bad_uploads_with_4xx(run: Path, tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from visiontune.deploy.serve import create_app

    client = TestClient(create_app(run, top_k=2, max_bytes=200_000), raise_server_exceptions=False)
    red = make_image(tmp_path / "red.png", (220, 40, 40), seed=5).read_bytes()
    r = client.post("/api/predict", files={"file": ("red.png", red, "image/png")})
    assert r.status_code == 200 and r.json()["predictions"][0]["label"] == "red"
    assert len(r.json()["predictions"]) == 2
    green = make_image(tmp_path / "green.png", (40, 200, 60), seed=6).read_bytes()
    r = client.post("/api/predict", files={"file": ("green.png", green, "image/png")})
    assert r.json()["predictions"][0]["label"] == "green"
    r = client.post("/api/predict", files={"file": ("notes.jpg", b"hello, not an image", "image/jpeg")})
    assert r.status_code == 415 and "not an image" in r.json()["detail"]
    r = client.post("/api/predict", files={"file": ("big.png", b"\0" * 300_000, "image/png")})
    assert r.status_code == 413
    r = client.post("/api/predict", files={"file": ("empty.png", b"", "image/png")})
    assert r.status_code == 415
    assert client.post("/api/predict").status_code == 422  # no file field: FastAPI's validation error
    assert "Drop an image" in client.get("/").text


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_page_in_headless_chromium_shows_the_right_label(run: Path, tmp_path: Path) -> None:
    browser_path = shutil.which("chromium")
    if browser_path is None:
        if os.environ.get("CI"):
            pytest.fail("CI must have chromium (.ci/run installs it)")
        pytest.skip("no chromium on this machine")
    playwright = pytest.importorskip("playwright.sync_api")
    import uvicorn

    from visiontune.deploy.serve import create_app

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(run), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    try:
        image = make_image(tmp_path / "upload_green.png", (40, 200, 60), seed=11)
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=browser_path, args=[
                "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"])
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{port}/")
            page.set_input_files("#file", str(image))
            page.wait_for_selector("tr.prediction", timeout=20_000)
            first = page.locator("tr.prediction").first.inner_text()
            assert first.split()[0] == "green", first
            page.set_input_files("#file", files=[{"name": "x.jpg", "mimeType": "image/jpeg",
                                                  "buffer": io.BytesIO(b"not an image").getvalue()}])
            page.wait_for_selector("#error", timeout=20_000)
            assert "not an image" in page.inner_text("#error")
            shot = Path(os.environ.get("VISIONTUNE_ARTIFACTS", tmp_path)) / "serve.png"
            shot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(shot))
            browser.close()
    finally:
        server.should_exit = True
        thread.join(timeout=10)
