"""`visiontune review RUN`: what interpret flagged, reviewed in headless Chromium; the
decisions land in RUN/review/ in the formats `train --relabel/--exclude` read, and a
retrain uses them. The user's files are never touched."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import pytest

import visiontune as vt
from conftest import CHROMIUM_FLAGS, COLORS, TINY, chromium, make_class_folders, make_image, serve_in_thread
from visiontune.analysis.run_review import create_run_review_app
from visiontune.cli import main


def _digests(root: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def test_relabel_by_keyboard_and_exclude_then_a_retrain_uses_them(tmp_path: Path) -> None:
    browser_path = chromium()
    playwright = pytest.importorskip("playwright.sync_api")
    data = make_class_folders(tmp_path / "data", {"red": 12, "green": 12})
    for i in range(2):  # red images filed as green
        make_image(data / "green" / f"oops_{i}.png", COLORS["red"], seed=500 + i)
    before = _digests(data)
    opts = dict(TINY, strategy="feature-extract", epochs=2, output=str(tmp_path / "runs"))
    run = Path(vt.fit(data, **opts).run_dir)
    port, server, thread = serve_in_thread(create_run_review_app(run, device="cpu"))  # interpret runs first
    try:
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=browser_path, args=CHROMIUM_FLAGS)
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{port}/")
            page.wait_for_function("queue.length > 2 && document.getElementById('progress').textContent"
                                   ".startsWith('1 of ')")
            total = page.evaluate("queue.length")
            page.wait_for_function("document.getElementById('image').naturalWidth > 0")
            page.wait_for_function("document.getElementById('cam').naturalWidth > 0")  # the Grad-CAM is served
            first, given = page.evaluate("[queue[0].path, queue[0].label]")
            assert "given: " + given in page.inner_text("#labels") and page.inner_text("#reasons")
            new = "red" if given == "green" else "green"
            page.keyboard.press(str(["green", "red"].index(new) + 1))  # relabel by its class key
            page.wait_for_function("document.getElementById('progress').textContent.startsWith('2 of ')")
            second = page.evaluate("queue[1].path")
            page.keyboard.press("x")  # exclude
            page.wait_for_function("document.getElementById('progress').textContent.startsWith('3 of ')")
            page.goto(f"http://127.0.0.1:{port}/")  # again: the decided images are not shown
            page.wait_for_function(f"document.getElementById('progress').textContent.startsWith('1 of {total - 2}')")
            browser.close()
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    with open(run / "review" / "corrections.csv", newline="") as fh:
        assert list(csv.DictReader(fh)) == [{"path": first, "label": new}]
    assert (run / "review" / "exclude.txt").read_text().splitlines() == [second]
    assert _digests(data) == before  # the user's files are untouched

    again = Path(vt.fit(data, **opts, relabel=str(run / "review" / "corrections.csv"),
                        exclude=str(run / "review" / "exclude.txt")).run_dir)
    with open(again / "splits.csv", newline="") as fh:
        rows = {r["path"]: r["label"] for r in csv.DictReader(fh)}
    assert rows[first] == new and second not in rows and len(rows) == 25


def test_review_needs_a_run_or_a_label_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["review"]) == 2
    assert "give a run directory (review RUN [DATA]) or --label CSV" in capsys.readouterr().err
    assert main(["review", str(tmp_path)]) == 2
    assert "no model at" in capsys.readouterr().err
