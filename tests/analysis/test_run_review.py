"""`visiontune review RUN`: what interpret flagged, reviewed in headless Chromium, for each
task shape; the decisions land in RUN/review/ in the formats `train --relabel/--exclude`
read, and a retrain (or what it reads) uses the label intended. The user's files are never
touched; a crash between decision files loses nothing; Grad-CAMs follow the image, not its
place in the list; DATA is what the page lists."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

import visiontune as vt
from conftest import (
    CHROMIUM_FLAGS,
    COLORS,
    TINY,
    ServerProcess,
    chromium,
    make_class_folders,
    make_image,
    make_multilabel_data,
    serve_in_thread,
)
from visiontune.analysis.run_review import create_run_review_app
from visiontune.cli import main
from visiontune.config import DataConfig
from visiontune.data.sources import load_items
from visiontune.errors import DataError


def _digests(root: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def colour_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    """Red and green folders with two red images filed as green (one of them named with a
    comma), a run on them, and interpret's views."""
    tmp = tmp_path_factory.mktemp("colours")
    data = make_class_folders(tmp / "data", {"red": 12, "green": 12})
    for i, name in enumerate(("oops_0.png", "oops, 1.png")):
        make_image(data / "green" / name, COLORS["red"], seed=500 + i)
    opts = dict(TINY, strategy="feature-extract", epochs=2, output=str(tmp / "runs"))
    run = Path(vt.fit(data, **opts).run_dir)
    vt.interpret(run, device="cpu")
    return data, run, opts


def _copy(run: Path, tmp_path: Path) -> Path:
    """The run in a folder of the test's own (its review/ starts empty)."""
    return Path(shutil.copytree(run, tmp_path / run.name))


class Browser:
    """A headless Chromium page on the app, and the steps the tests take on it."""

    def __init__(self, playwright: Any, app: Any) -> None:
        self.port, self.server, self.thread = serve_in_thread(app)
        self.engine = playwright.sync_playwright().start()
        self.browser = self.engine.chromium.launch(executable_path=chromium(), args=CHROMIUM_FLAGS)
        self.page = self.browser.new_page()
        self.page.on("dialog", lambda d: (self.alerts.append(d.message), d.dismiss()))
        self.alerts: list[str] = []

    def open(self) -> Any:
        self.page.goto(f"http://127.0.0.1:{self.port}/")
        self.page.wait_for_function("queue.length > 0 && document.getElementById('progress').textContent"
                                    ".startsWith('1 of ')")
        return self.page.evaluate("queue")

    def at(self, n: int, of: int | None = None) -> None:
        """Wait until the page shows case `n` (of `of`)."""
        prefix = f"{n} of {'' if of is None else of}"
        self.page.wait_for_function(f"document.getElementById('progress').textContent.startsWith('{prefix}')")

    def close(self) -> None:
        self.browser.close()
        self.engine.stop()
        self.server.should_exit = True
        self.thread.join(timeout=10)


def test_single_label_by_keyboard_then_a_retrain_uses_it(colour_run: tuple, tmp_path: Path) -> None:
    """Enter takes the model's class, a digit another one, x excludes (a path with a comma:
    exclude.txt is the CSV --exclude reads); a retrain uses all three."""
    playwright = pytest.importorskip("playwright.sync_api")
    data, run, opts = colour_run
    run, before = _copy(run, tmp_path), _digests(data)
    web = Browser(playwright, create_run_review_app(run, device="cpu"))
    try:
        queue = web.open()
        web.page.wait_for_function("document.getElementById('image').naturalWidth > 0")
        web.page.wait_for_function("document.getElementById('cam').naturalWidth > 0")  # the Grad-CAM is served
        assert "given: " + queue[0]["label"] in web.page.inner_text("#labels") and web.page.inner_text("#reasons")
        comma = next(i for i, it in enumerate(queue) if it["name"] == "oops, 1.png")  # flagged: a red image
        first, by_model = [i for i, it in enumerate(queue) if i != comma and it["suggested"]][:2]
        new = "red" if queue[first]["label"] == "green" else "green"
        for i in range(max(comma, first, by_model) + 1):
            key = {comma: "x", first: str(["green", "red"].index(new) + 1), by_model: "Enter"}.get(i, "s")
            web.page.keyboard.press(key)  # exclude; relabel by its class key; the model's class; skip
            web.at(i + 2)
        web.open()  # again: the decided images are not shown
        web.at(1, len(queue) - 3)
    finally:
        web.close()
    corrections = {r["path"]: r["label"] for r in _rows(run / "review" / "corrections.csv")}
    first, by_model, model_label = queue[first], queue[by_model], queue[by_model]["suggested"]
    assert corrections[first["path"]] == new
    assert corrections.get(by_model["path"], by_model["label"]) == model_label  # its own label again: a keep
    excluded = queue[comma]["path"]
    assert _rows(run / "review" / "exclude.txt") == [{"path": excluded}]
    assert _digests(data) == before  # the user's files are untouched

    again = Path(vt.fit(data, **opts, relabel=str(run / "review" / "corrections.csv"),
                        exclude=str(run / "review" / "exclude.txt")).run_dir)
    rows = {r["path"]: r["label"] for r in _rows(again / "splits.csv")}
    assert rows[first["path"]] == new and rows[by_model["path"]] == model_label
    assert excluded not in rows and len(rows) == 25


@pytest.fixture(scope="module")
def label_set_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Label sets (blue, green, red squares) and a run on them."""
    tmp = tmp_path_factory.mktemp("sets")
    data = make_multilabel_data(tmp / "ml", n=36)
    run = Path(vt.fit(data, csv="labels.csv", **dict(TINY, strategy="feature-extract", epochs=2,
                                                       output=str(tmp / "runs"))).run_dir)
    vt.interpret(run, device="cpu")
    return data, run


def test_multi_label_enter_writes_the_resulting_set_and_digits_toggle(label_set_run: tuple, tmp_path: Path) -> None:
    """A label set's suggestion is the given set with the suspected changes applied: Enter
    writes that set (not "+dog -cat"), a digit toggles one label of the set shown, and
    what train --relabel reads is the set the page showed."""
    playwright = pytest.importorskip("playwright.sync_api")
    data, run = label_set_run
    run = _copy(run, tmp_path)
    web = Browser(playwright, create_run_review_app(run, device="cpu"))
    try:
        queue = web.open()
        n = next(i for i, it in enumerate(queue) if it["suggested"] is not None and it["suggested"] != it["given"])
        for _ in range(n):
            web.page.keyboard.press("s")
        web.at(n + 1)
        assert "(+" in web.page.inner_text("#labels") or "(-" in web.page.inner_text("#labels")  # the changes shown
        web.page.keyboard.press("Enter")  # the suggested set
        web.at(n + 2)
        toggled = queue[n + 1]
        start = set(toggled["suggested"] if toggled["suggested"] is not None else toggled["given"])
        web.page.keyboard.press("1")  # blue (classes: blue, green, red) in or out of the set shown
        assert "new: " in web.page.inner_text("#chosen")
        web.page.keyboard.press("Enter")
        web.at(n + 3)
    finally:
        web.close()
    assert web.alerts == []
    want = {queue[n]["path"]: tuple(sorted(queue[n]["suggested"])), toggled["path"]: tuple(sorted(start ^ {"blue"}))}
    want = {p: s for p, s in want.items() if s != tuple(next(it["given"] for it in queue if it["path"] == p))}
    corrections = {r["path"]: r["label"] for r in _rows(run / "review" / "corrections.csv")}
    assert corrections == {p: " ".join(s) for p, s in want.items()} and want
    assert not any(label.startswith(("+", "-", "'")) for label in corrections.values())
    source = load_items(DataConfig(path=str(data), csv="labels.csv", relabel=str(run / "review" / "corrections.csv")))
    labels = {it.path: it.label for it in source.items}
    assert all(labels[p] == s for p, s in want.items())  # what train --relabel trains on


def make_numbers(root: Path, n: int = 30) -> Path:
    """root/images/*.png whose brightness grows with a target in -5..5, root/targets.csv."""
    rng = np.random.default_rng(0)
    rows = [["path", "age"]]
    for i in range(n):
        value = round(float(rng.uniform(-5, 5)), 2)
        arr = np.clip(np.full((40, 40, 3), 128 + 22 * value) + rng.normal(0, 6, (40, 40, 3)), 0, 255)
        (root / "images").mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr.astype(np.uint8)).save(root / "images" / f"img_{i:03d}.png")
        rows.append([f"images/img_{i:03d}.png", str(value)])
    with open(root / "targets.csv", "w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    return root


def test_regression_enter_keeps_every_digit_and_typed_numbers_are_numbers(tmp_path: Path) -> None:
    """A number is typed, not chosen: no class button; Enter saves the model's number with
    every digit (not rounded to 4); digits typed are the number (3 is 3.0, not a class);
    text that is no number is refused; train --relabel reads each one."""
    playwright = pytest.importorskip("playwright.sync_api")
    data = make_numbers(tmp_path / "reg")
    rows = list(csv.reader(open(data / "targets.csv", newline="")))
    rows[1][1] = str(20 - 3 * float(rows[1][1]))  # a target far from what its image shows: a suspect
    with open(data / "targets.csv", "w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    run = Path(vt.fit(data, csv="targets.csv", task="regression",
                      **dict(TINY, strategy="feature-extract", epochs=2, output=str(tmp_path / "runs"))).run_dir)
    web = Browser(playwright, create_run_review_app(run, device="cpu"))
    try:
        queue = web.open()
        assert web.page.locator("#classes button").count() == 0 and web.page.is_visible("#text")
        first = queue[0]
        # its evidence reads as a residual, not as probabilities (audit of issue 34: "p(given) 3.06, p(0.66) -0.07")
        assert first["name"] == "img_000.png" and first["reasons"][0].startswith("suspect target #1: the model says ")
        assert "residual" in first["reasons"][0] and not any("p(" in r for it in queue for r in it["reasons"])
        assert first["suggested"] is not None and web.page.input_value("#text") == first["suggested"]
        web.page.keyboard.press("Enter")  # the model's number
        web.at(2)
        web.page.fill("#text", "")
        web.page.keyboard.type("3")  # the box has the focus: a digit is part of the number
        web.page.keyboard.press("Enter")
        web.at(3)
        web.page.fill("#text", "about 2")
        web.page.keyboard.press("Enter")
        web.page.wait_for_function("document.getElementById('progress').textContent.startsWith('3 of ')")
        web.page.wait_for_timeout(300)
        web.page.fill("#text", "-2.5")
        web.page.keyboard.press("Enter")
        web.at(4)
    finally:
        web.close()
    assert len(web.alerts) == 1 and "is not a number" in web.alerts[0]
    corrections = {r["path"]: r["label"] for r in _rows(run / "review" / "corrections.csv")}
    assert corrections == {first["path"]: first["suggested"], queue[1]["path"]: "3.0", queue[2]["path"]: "-2.5"}
    assert float(first["suggested"]) != round(float(first["suggested"]), 4)  # more digits than the old page kept
    source = load_items(DataConfig(path=str(data), csv="targets.csv", task="regression",
                                   relabel=str(run / "review" / "corrections.csv")))
    labels = {it.path: it.label for it in source.items}
    assert labels[first["path"]] == float(first["suggested"])
    assert labels[queue[1]["path"]] == 3.0 and labels[queue[2]["path"]] == -2.5


def test_a_decision_interrupted_between_its_files_is_whole_at_the_next_start(colour_run: tuple,
                                                                           tmp_path: Path) -> None:
    """The first image is relabelled, then excluded while exclude.txt cannot be written (a
    folder stands in its place: the write fails after corrections.csv was rewritten). The
    decision is not lost: the next start derives the files from the log, the image is
    excluded and no longer relabelled."""
    from fastapi.testclient import TestClient

    data, run, _ = colour_run
    run = _copy(run, tmp_path)
    client = TestClient(create_run_review_app(run, device="cpu"))
    first = client.get("/api/queue").json()["items"][0]
    other = "red" if first["label"] == "green" else "green"
    assert client.post("/api/decide", json={"index": first["index"], "action": "relabel", "label": other}).json()
    (run / "review" / "exclude.txt").unlink()
    (run / "review" / "exclude.txt").mkdir()  # the next write of exclude.txt fails
    answer = client.post("/api/decide", json={"index": first["index"], "action": "exclude"})
    assert answer.status_code == 500 and "could not be written" in answer.json()["detail"]
    (run / "review" / "exclude.txt").rmdir()
    create_run_review_app(run, device="cpu")  # the page started again
    assert _rows(run / "review" / "exclude.txt") == [{"path": first["path"]}]
    assert _rows(run / "review" / "corrections.csv") == []
    source = load_items(DataConfig(path=str(data), relabel=str(run / "review" / "corrections.csv"),
                                   exclude=str(run / "review" / "exclude.txt")))
    assert first["path"] not in {it.path for it in source.items}


def test_data_is_what_the_page_lists(colour_run: tuple, tmp_path: Path) -> None:
    """review RUN DATA lists DATA's images: interpret runs on DATA, though the run's own
    views exist; and on the run's own images again when DATA is left out."""
    from fastapi.testclient import TestClient

    _, run, _ = colour_run
    run = _copy(run, tmp_path)
    own = [it["path"] for it in TestClient(create_run_review_app(run, device="cpu")).get("/api/queue").json()["items"]]
    other = make_class_folders(tmp_path / "other", {"red": 6, "green": 6}, start_seed=900)
    items = TestClient(create_run_review_app(run, str(other), device="cpu")).get("/api/queue").json()["items"]
    assert len(items) == 12 and all(it["path"].startswith(str(other)) for it in items)
    assert json.loads((run / "interpret" / "source.json").read_text()) == {"data": str(other.resolve()),
                                                                         "folder": os.getcwd()}
    again = TestClient(create_run_review_app(run, device="cpu")).get("/api/queue").json()["items"]
    assert [it["path"] for it in again] == own


def test_grad_cams_follow_the_image_not_its_place_in_the_list(colour_run: tuple, tmp_path: Path) -> None:
    """After interpret runs again (on other images), the Grad-CAM shown for the first place
    in the list is the map of the image now there, not the one made for the image there
    before."""
    from fastapi.testclient import TestClient

    _, run, _ = colour_run
    run = _copy(run, tmp_path)
    own = TestClient(create_run_review_app(run, device="cpu"))
    own_first, own_cam = own.get("/api/queue").json()["items"][0]["path"], own.get("/cam/0").content
    other = make_class_folders(tmp_path / "other", {"red": 6, "green": 6}, start_seed=900)
    vt.interpret(run, other, device="cpu")
    theirs = TestClient(create_run_review_app(run, str(other), device="cpu"))
    assert theirs.get("/api/queue").json()["items"][0]["path"] != own_first
    cam = theirs.get("/cam/0").content
    shutil.rmtree(run / "review" / "gradcam")
    assert cam == theirs.get("/cam/0").content != own_cam  # made for this image, not found by its place


def test_review_needs_a_run_or_a_label_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["review"]) == 2
    assert "give a run directory (review RUN [DATA]) or --label CSV" in capsys.readouterr().err
    assert main(["review", str(tmp_path)]) == 2
    assert "no model at" in capsys.readouterr().err


def _log_matches_files(review: Path) -> bool:
    """Whether corrections.csv, exclude.txt and kept.txt say what decisions.jsonl says."""
    state = {}
    for line in (review / "decisions.jsonl").read_text().splitlines():
        record = json.loads(line)
        state[record["path"]] = (record["decision"], record["label"])
    corrections = {r["path"]: r["label"] for r in _rows(review / "corrections.csv")}
    return (corrections == {p: lb for p, (d, lb) in state.items() if d == "relabel"}
            and {r["path"] for r in _rows(review / "exclude.txt")} == {p for p, (d, _) in state.items() if d == "exclude"}
            and {r["path"] for r in _rows(review / "kept.txt")} == {p for p, (d, _) in state.items() if d == "keep"})


def test_two_pages_in_two_processes_keep_the_files_equal_to_the_log(colour_run: tuple, tmp_path: Path) -> None:
    """Two `review RUN` processes on one run decide at the same moment, again and again:
    after each pair, the files train reads say what the log says (audit of issue 34: the
    lock was per process, and in 21 of 200 races a file fell behind the log)."""
    _, run, _ = colour_run
    run = _copy(run, tmp_path)
    servers = [ServerProcess(["review", str(run)], tmp_path / f"page{k}.log") for k in range(2)]
    try:
        n = len(servers[0].request("GET", "/api/queue")[1]["items"])
        rng, behind = np.random.default_rng(1), 0

        def decide(server: ServerProcess, body: dict, barrier: threading.Barrier, answers: list[int]) -> None:
            barrier.wait()
            answers.append(server.request("POST", "/api/decide", body)[0])

        for _ in range(100):
            barrier, answers = threading.Barrier(2), []
            bodies = [{"index": int(i), "action": str(rng.choice(["keep", "exclude", "relabel"])),
                       "label": str(rng.choice(["red", "green"]))} for i in rng.choice(n, 2, replace=False)]
            threads = [threading.Thread(target=decide, args=(servers[k], bodies[k], barrier, answers))
                       for k in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert answers == [200, 200]
            behind += not _log_matches_files(run / "review")
    finally:
        for server in servers:
            server.stop()
    assert behind == 0, f"the files fell behind the log after {behind} of 100 pairs of decisions"


def test_the_page_lists_the_flagged_images_from_any_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run trained and interpreted in one folder with relative paths, reviewed from
    another folder: the page lists what interpret flagged and serves the images (audit of
    issue 34: the views' relative paths were read from the current folder: it listed
    nothing)."""
    from fastapi.testclient import TestClient

    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    make_class_folders(work / "data", {"red": 10, "green": 10})
    make_image(work / "data" / "green" / "oops.png", COLORS["red"], seed=700)
    elsewhere.mkdir()
    monkeypatch.chdir(work)
    run = Path(vt.fit("data", **dict(TINY, strategy="feature-extract", epochs=2, output="runs")).run_dir).resolve()
    vt.interpret(run, device="cpu")
    here = [it["path"] for it in TestClient(create_run_review_app(run, device="cpu")).get("/api/queue").json()["items"]]
    monkeypatch.chdir(elsewhere)
    client = TestClient(create_run_review_app(run, device="cpu"))
    items = client.get("/api/queue").json()["items"]
    assert items and [it["path"] for it in items] == here
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in here)
    assert client.get(f"/image/{items[0]['index']}").status_code == 200
    assert client.post("/api/decide", json={"index": items[0]["index"], "action": "exclude"}).json()["ok"]
    monkeypatch.chdir(work)
    source = load_items(DataConfig(path="data", exclude=str(run / "review" / "exclude.txt")))
    assert items[0]["path"] not in {os.path.abspath(it.path) for it in source.items}


def test_the_api_refuses_labels_that_are_not_a_class_of_the_run(colour_run: tuple, tmp_path: Path) -> None:
    """null, a list, an object, a class the run lacks: 400 naming what was wrong, nothing
    recorded (audit of issue 34: null was stored as the class "None", a list as its repr,
    any class was accepted)."""
    from fastapi.testclient import TestClient

    _, run, _ = colour_run
    run = _copy(run, tmp_path)
    client = TestClient(create_run_review_app(run, device="cpu"))
    index = client.get("/api/queue").json()["items"][0]["index"]
    for label, what in ((None, "not null"), (["red"], "not a list"), ({"a": 1}, "not an object"), (1, "not a number"),
                        ("blue", "blue is not a class of this run")):
        answer = client.post("/api/decide", json={"index": index, "action": "relabel", "label": label})
        assert answer.status_code == 400 and what in answer.json()["detail"], (label, answer.json())
    assert not (run / "review" / "decisions.jsonl").exists() or not (run / "review" / "decisions.jsonl").read_text()


def test_an_old_diff_style_correction_is_read_as_the_set_it_leads_to(label_set_run: tuple, tmp_path: Path) -> None:
    """A run folder from before the decision log, whose corrections.csv holds a label
    set's changes ("+blue -green", as older review pages wrote them): the log records the
    set they lead to, which is what train --relabel reads; a change list for an image whose
    given set is unknown is refused, naming the file (audit of issue 34: imported and
    trained as the classes "+blue" and "-green", silently)."""
    data, run = label_set_run
    run = _copy(run, tmp_path)
    rows = _rows(run / "splits.csv")
    image = next(r for r in rows if "green" in r["label"].split() and "blue" not in r["label"].split())
    want = " ".join(sorted((set(image["label"].split()) | {"blue"}) - {"green"}))
    (run / "review").mkdir()
    (run / "review" / "corrections.csv").write_text(f"path,label\n{image['path']},+blue -green\n")
    create_run_review_app(run, device="cpu")
    log = [json.loads(line) for line in (run / "review" / "decisions.jsonl").read_text().splitlines()]
    assert [(r["path"], r["decision"], r["label"]) for r in log] == [(image["path"], "relabel", want or "(none)")]
    source = load_items(DataConfig(path=str(data), csv="labels.csv", relabel=str(run / "review" / "corrections.csv")))
    assert {it.path: it.label for it in source.items}[image["path"]] == tuple(want.split())
    other = _copy(run, tmp_path / "other")
    shutil.rmtree(other / "review")
    (other / "review").mkdir()
    (other / "review" / "corrections.csv").write_text("path,label\nsomewhere/else.png,+blue\n")
    with pytest.raises(DataError, match=r"corrections.csv: somewhere/else.png: '\+blue' is a list of changes"):
        create_run_review_app(other, device="cpu")


def test_with_numeric_class_names_the_help_says_what_the_keys_do(tmp_path: Path) -> None:
    """Class names that are numbers: digit keys pick no class (a 1 would pick the first
    button, not "1"), and the help line says so instead of "1-9: that class" (audit of
    issue 34)."""
    playwright = pytest.importorskip("playwright.sync_api")
    data = make_class_folders(tmp_path / "data", {"red": 10, "green": 10})
    (data / "red").rename(data / "10")
    (data / "green").rename(data / "2")
    run = Path(vt.fit(data, **dict(TINY, strategy="feature-extract", epochs=2, output=str(tmp_path / "runs"))).run_dir)
    web = Browser(playwright, create_run_review_app(run, device="cpu"))
    try:
        queue = web.open()
        help_line = web.page.inner_text("p.muted")
        assert "1-9" not in help_line and "digit keys pick none" in help_line and "a button: that class" in help_line
        web.page.keyboard.press("1")
        web.page.wait_for_timeout(300)
        web.at(1, len(queue))  # nothing picked
        web.page.click("#classes button >> nth=1")  # the button: "2"
        web.at(2, len(queue))
    finally:
        web.close()
    assert web.alerts == []
    label = _rows(run / "review" / "corrections.csv") or _rows(run / "review" / "kept.txt")
    assert label[0]["path"] == queue[0]["path"]
