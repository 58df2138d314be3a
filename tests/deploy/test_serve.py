"""`visiontune serve`: JSON API (limits, bad uploads -> 4xx) and the page in headless Chromium."""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path

import pytest

import visiontune as vt
from conftest import TINY, make_class_folders, make_image, page_with_answer, serve_in_thread

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


def test_page_in_headless_chromium_shows_the_right_label(run: Path, tmp_path: Path) -> None:
    from visiontune.deploy.serve import create_app

    port, server, thread = serve_in_thread(create_app(run))
    try:
        image = make_image(tmp_path / "upload_green.png", (40, 200, 60), seed=11)
        with page_with_answer(port, image, "serve.png", tmp_path) as page:
            first = page.locator("tr.prediction").first.inner_text()
            assert first.split()[0] == "green", first
            page.set_input_files("#file", files=[{"name": "x.jpg", "mimeType": "image/jpeg",
                                                  "buffer": io.BytesIO(b"not an image").getvalue()}])
            page.wait_for_selector("#error", timeout=20_000)
            assert "not an image" in page.inner_text("#error")
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_a_huge_image_announced_in_a_small_file_is_refused_before_decoding(run: Path, tmp_path: Path) -> None:
    from fastapi.testclient import TestClient
    from PIL import Image

    from visiontune.deploy.serve import create_app

    bomb = tmp_path / "bomb.png"
    Image.new("1", (12000, 12000)).save(bomb, optimize=True)  # ~17 KB on disk, 144 megapixels
    assert bomb.stat().st_size < 100_000
    client = TestClient(create_app(run), raise_server_exceptions=False)
    r = client.post("/api/predict", files={"file": ("bomb.png", bomb.read_bytes(), "image/png")})
    assert r.status_code == 413 and "144.0 megapixels" in r.json()["detail"]


def test_an_oversized_upload_is_refused_from_its_headers_without_reading_it(run: Path) -> None:
    import asyncio

    from visiontune.deploy.serve import create_app

    app, sent, reads = create_app(run, max_bytes=1000), [], []

    head = (b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n'
            b"Content-Type: image/png\r\n\r\n")

    async def receive():  # a well-formed multipart upload that never ends
        reads.append(1)
        return {"type": "http.request", "body": head if len(reads) == 1 else b"x" * 100, "more_body": True}

    async def send(message):
        sent.append(message)

    form = (b"content-type", b"multipart/form-data; boundary=xyz")
    scope = {"type": "http", "http_version": "1.1", "method": "POST", "path": "/api/predict", "raw_path": b"/api/predict",
             "root_path": "", "scheme": "http", "query_string": b"", "server": ("127.0.0.1", 80),
             "client": ("127.0.0.1", 5000), "headers": [form, (b"content-length", b"10000000")]}
    asyncio.run(app(scope, receive, send))
    assert sent[0]["status"] == 413 and reads == []  # not one byte read
    chunked, sent[:] = {**scope, "headers": [form, (b"transfer-encoding", b"chunked")]}, []
    asyncio.run(app(chunked, receive, send))
    assert sent[0]["status"] == 413 and len(sent) == 2  # the application's own answer is dropped
    assert len(reads) * 100 <= 1000 + 64 * 1024 + 300  # cut off at the limit


def test_inference_does_not_block_the_page_and_concurrent_requests_are_batched(
        run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import httpx

    from visiontune.deploy import serve

    batches: list[int] = []
    real = serve.BatchPredictor._predict

    def slow(self, x):
        batches.append(len(x))
        time.sleep(1.0)  # a slow model
        return real(self, x)

    monkeypatch.setattr(serve.BatchPredictor, "_predict", slow)
    port, server, thread = serve_in_thread(serve.create_app(run))
    red = make_image(tmp_path / "red.png", (220, 40, 40), seed=5).read_bytes()
    url = f"http://127.0.0.1:{port}"
    try:
        results: list[int] = []

        def post() -> None:
            results.append(httpx.post(f"{url}/api/predict", files={"file": ("r.png", red, "image/png")},
                                      timeout=30).status_code)

        posts = [threading.Thread(target=post) for _ in range(5)]
        started = time.perf_counter()
        for t in posts:
            t.start()
            time.sleep(0.02)
        time.sleep(0.3)  # the first batch is in the model now
        page_started = time.perf_counter()
        assert httpx.get(url, timeout=30).status_code == 200
        page_seconds = time.perf_counter() - page_started
        for t in posts:
            t.join()
        total = time.perf_counter() - started
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    assert results == [200] * 5
    assert page_seconds < 0.5  # the page does not wait for the model
    assert len(batches) <= 3 and sum(batches) == 5 and total < 3.5  # not five 1 s runs one after another


def test_an_image_pil_takes_for_a_decompression_bomb_is_413_not_415(run: Path, tmp_path: Path) -> None:
    """Past PIL's own limit (2 x 89.5 megapixels) PIL raises DecompressionBombError itself, even
    when --max-pixels allows more: too large, not "not an image"."""
    from fastapi.testclient import TestClient
    from PIL import Image

    from visiontune.deploy.serve import create_app

    bomb = tmp_path / "bomb.png"
    Image.new("1", (15000, 15000)).save(bomb, optimize=True)  # 225 megapixels
    client = TestClient(create_app(run, max_pixels=10**9), raise_server_exceptions=False)
    r = client.post("/api/predict", files={"file": ("bomb.png", bomb.read_bytes(), "image/png")})
    assert r.status_code == 413 and "too large an image" in r.json()["detail"]


def test_decodes_and_the_backlog_are_bounded_and_a_full_server_answers_503(
        run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import httpx

    from visiontune.deploy import serve

    decoding, most = [0], [0]
    real_load, lock = serve.load_rgb, threading.Lock()

    def slow_load(*args, **kwargs):  # a slow decoder, counted
        with lock:
            decoding[0] += 1
            most[0] = max(most[0], decoding[0])
        time.sleep(0.3)
        try:
            return real_load(*args, **kwargs)
        finally:
            with lock:
                decoding[0] -= 1

    monkeypatch.setattr(serve, "load_rgb", slow_load)
    port, server, thread = serve_in_thread(serve.create_app(run, max_pending=4, max_decodes=2))
    red = make_image(tmp_path / "red.png", (220, 40, 40), seed=5).read_bytes()
    answers: list[httpx.Response] = []
    try:
        def post() -> None:
            answers.append(httpx.post(f"http://127.0.0.1:{port}/api/predict",
                                      files={"file": ("r.png", red, "image/png")}, timeout=30))

        posts = [threading.Thread(target=post) for _ in range(10)]
        for t in posts:
            t.start()
        for t in posts:
            t.join()
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    codes = sorted(r.status_code for r in answers)
    assert most[0] == 2  # never more than max_decodes images decoded at once
    assert codes.count(200) >= 4 and codes.count(503) >= 1 and set(codes) == {200, 503}, codes
    busy = next(r for r in answers if r.status_code == 503)
    assert busy.headers["retry-after"] == "1" and "busy" in busy.json()["detail"]


def test_serving_an_exported_file_is_one_error_line_before_it_says_it_serves(run: Path, tmp_path: Path,
                                                                            capsys: pytest.CaptureFixture) -> None:
    """Audit of issue 34: `serve RUN/model.onnx` printed "serving ... on http://..." and then
    a SafetensorError traceback; serve needs the run's weights."""
    from visiontune.cli import main

    exported = tmp_path / "model.onnx"
    exported.write_bytes(b"\x08\x07\x12\x0bnot safetensors at all" * 10)
    assert main(["serve", str(exported), "--port", "1"]) == 2
    out, err = capsys.readouterr()
    assert "serving" not in out and "is not a safetensors file of a visiontune run" in err and "Traceback" not in err
