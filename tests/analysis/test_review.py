"""`visiontune review --label`: labelling suggested images in the browser. The page in
headless Chromium (Playwright): Enter accepts the guess, a digit picks a class, `s` skips,
typed text is a label; every answer is in the CSV at once and `train --csv` reads it.
The API refuses rows outside the file and bad files."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from conftest import CHROMIUM_FLAGS, chromium, make_class_folders, serve_in_thread
from visiontune.analysis.review import create_review_app
from visiontune.config import DataConfig
from visiontune.data.sources import load_items
from visiontune.errors import DataError


def suggestions(tmp_path: Path) -> Path:
    pool = make_class_folders(tmp_path / "pool", {"red": 2, "green": 2})
    files = sorted(pool.rglob("*.png"))
    out = tmp_path / "to_label.csv"
    with open(out, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "prediction", "reason", "score"])
        w.writerow([files[0], "green", "green", "typical", "1"])  # labelled already: not shown
        for f in files[1:]:
            w.writerow([f, "", "red", "uncertain (0.5)", "0.5"])
    return out


def read(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_labelling_in_headless_chromium(tmp_path: Path) -> None:
    browser_path = chromium()
    playwright = pytest.importorskip("playwright.sync_api")
    out = suggestions(tmp_path)
    port, server, thread = serve_in_thread(create_review_app(out, ["red", "green", "blue"]))
    try:
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=browser_path, args=CHROMIUM_FLAGS)
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{port}/")
            page.wait_for_function("document.getElementById('progress').textContent.startsWith('1 of 3')")
            page.wait_for_function("document.getElementById('image').naturalWidth > 0")  # the image is served
            page.keyboard.press("Enter")  # accept the guess (red)
            page.wait_for_function("document.getElementById('progress').textContent.startsWith('2 of 3')")
            page.keyboard.press("2")  # the second class: green
            page.wait_for_function("document.getElementById('progress').textContent.startsWith('3 of 3')")
            page.keyboard.press("s")  # skip
            page.wait_for_selector("#done:not([hidden])")
            assert "2 labelled, 1 skipped" in page.inner_text("#done")
            page.goto(f"http://127.0.0.1:{port}/")  # again: only the skipped image is left
            page.wait_for_function("document.getElementById('progress').textContent.startsWith('1 of 1')")
            page.fill("#text", "grey")  # a label the buttons do not have
            page.keyboard.press("Enter")
            page.wait_for_selector("#done:not([hidden])")
            browser.close()
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    rows = read(out)
    assert [r["label"] for r in rows] == ["green", "red", "green", "grey"]
    assert [r["prediction"] for r in rows] == ["green", "red", "red", "red"]  # nothing else changed
    source = load_items(DataConfig(csv=str(out), valid_pct=0.0), min_classes=1)  # what train --csv reads
    assert sorted(it.label for it in source.items) == ["green", "green", "grey", "red"]


def test_the_api_serves_only_the_files_rows_and_refuses_bad_input(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    out = suggestions(tmp_path)
    client = TestClient(create_review_app(out))
    queue = client.get("/api/queue").json()
    assert queue["classes"] == ["green", "red"] and [i["row"] for i in queue["items"]] == [2, 3, 4]
    assert client.get("/image/2").status_code == 200
    assert client.get("/image/0").status_code == 404 and client.get("/image/99").status_code == 404
    assert client.post("/api/label", json={"row": 2, "label": " "}).status_code == 400
    assert client.post("/api/label", json={"row": 2, "label": "blue"}).json() == {"ok": True, "remaining": 2}
    assert read(out)[1]["label"] == "blue"
    other = tmp_path / "other.csv"
    other.write_text("file,class\na.png,red\n")
    with pytest.raises(DataError, match="not a suggestions CSV"):
        create_review_app(other)
