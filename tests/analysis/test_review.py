"""`visiontune review --label`: labelling suggested images in the browser. The page in
headless Chromium (Playwright), for each task shape: Enter accepts the guess, a digit picks
a class (or toggles a label of a set; or is typed, for numbers and for class names that
are numbers), `s` skips, typed text is a label; every answer is in the CSV at once and
`train --csv` reads it. Answers merge with what the file holds when they are written; the
API refuses rows outside the file and bad files; labels that look like formulas are
neutralised; the server answers only the hosts it is told."""

from __future__ import annotations

import csv
import http.client
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import CHROMIUM_FLAGS, ServerProcess, chromium, make_class_folders, serve_in_thread
from visiontune.analysis.review import create_review_app
from visiontune.cli import build_parser
from visiontune.config import DataConfig
from visiontune.data.sources import load_items
from visiontune.errors import DataError


def suggestions(tmp_path: Path, label: str = "label", given: str = "green", guess: str = "red",
                extra: int = 0) -> Path:
    """A suggestions CSV over 4 (+ extra) images: the first labelled `given`, the others
    empty with the guess `guess`."""
    pool = make_class_folders(tmp_path / "pool", {"red": 2 + extra, "green": 2})
    files = sorted(pool.rglob("*.png"))
    out = tmp_path / "to_label.csv"
    with open(out, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", label, "prediction", "reason", "score"])
        w.writerow([files[0], given, given, "typical", "1"])  # labelled already: not shown
        for f in files[1:]:
            w.writerow([f, "", guess, "uncertain (0.5)", "0.5"])
    return out


def read(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


class Page:
    """The labelling page of `app` in headless Chromium; alerts are collected."""

    def __init__(self, playwright: Any, app: Any) -> None:
        self.port, self.server, self.thread = serve_in_thread(app)
        self.engine = playwright.sync_playwright().start()
        self.browser = self.engine.chromium.launch(executable_path=chromium(), args=CHROMIUM_FLAGS)
        self.page = self.browser.new_page()
        self.alerts: list[str] = []
        self.page.on("dialog", lambda d: (self.alerts.append(d.message), d.dismiss()))

    def open(self, of: int) -> None:
        self.page.goto(f"http://127.0.0.1:{self.port}/")
        self.at(1, of)

    def at(self, n: int, of: int) -> None:
        self.page.wait_for_function(f"document.getElementById('progress').textContent.startsWith('{n} of {of}')")

    def done(self) -> str:
        self.page.wait_for_selector("#done:not([hidden])")
        return self.page.inner_text("#done")

    def close(self) -> None:
        self.browser.close()
        self.engine.stop()
        self.server.should_exit = True
        self.thread.join(timeout=10)


def test_labelling_in_headless_chromium(tmp_path: Path) -> None:
    playwright = pytest.importorskip("playwright.sync_api")
    out = suggestions(tmp_path)
    web = Page(playwright, create_review_app(out, ["red", "green", "blue"]))
    try:
        web.open(3)
        web.page.wait_for_function("document.getElementById('image').naturalWidth > 0")  # the image is served
        web.page.keyboard.press("Enter")  # accept the guess (red)
        web.at(2, 3)
        web.page.keyboard.press("2")  # the second class: green
        web.at(3, 3)
        web.page.keyboard.press("s")  # skip
        assert "2 labelled, 1 skipped" in web.done()
        web.open(1)  # again: only the skipped image is left
        web.page.fill("#text", "+grey")  # a label the buttons do not have (and a spreadsheet would compute)
        web.page.keyboard.press("Enter")
        web.done()
    finally:
        web.close()
    rows = read(out)
    assert [r["label"] for r in rows] == ["green", "red", "green", "'+grey"]  # neutralised in the file
    assert [r["prediction"] for r in rows] == ["green", "red", "red", "red"]  # nothing else changed
    source = load_items(DataConfig(csv=str(out), valid_pct=0.0), min_classes=1)  # what train --csv reads
    assert sorted(it.label for it in source.items) == ["+grey", "green", "green", "red"]


def test_digit_keys_never_store_another_number(tmp_path: Path) -> None:
    """Numbers in a 'label' column read as class names under --task auto: the buttons are
    string-sorted (10, 2.5, 3, 7), so the digit 2 must not pick the second one (2.5): with
    class names that are numbers, digits are typed; pressing 2 and Enter stores 2. The help
    line says so, and skipping is Esc (an `s` is typed into the box: audit of issue 34, it
    was then stored as the label "s" while the help said "1-9: that class · s: skip")."""
    playwright = pytest.importorskip("playwright.sync_api")
    out = suggestions(tmp_path, given="10", guess="7", extra=1)
    with open(out, "a", newline="") as fh:
        csv.writer(fh).writerow([str(tmp_path / "labelled_elsewhere.png"), "2.5", "3", "", ""])
    web = Page(playwright, create_review_app(out))
    try:
        web.open(4)
        assert web.page.evaluate("SPEC.classes") == ["10", "2.5", "3", "7"] and not web.page.evaluate("SPEC.keys")
        help_line = web.page.inner_text("#help")
        assert "1-9" not in help_line and "digits are typed" in help_line and "Esc: skip" in help_line
        assert "s or Esc" not in help_line
        web.page.keyboard.press("2")
        web.page.keyboard.press("Enter")
        web.at(2, 4)
        web.page.keyboard.press("Enter")  # the guess, typed nothing
        web.at(3, 4)
        web.page.keyboard.press("s")  # typed: a class may hold an s
        assert web.page.input_value("#text") == "s"
        web.page.keyboard.press("Escape")  # skips
        web.at(4, 4)
        web.page.click("#skip")
        assert "2 labelled, 2 skipped" in web.done()
    finally:
        web.close()
    assert [r["label"] for r in read(out)][1:5] == ["2", "7", "", ""] and web.alerts == []


def test_classes_added_to_the_file_get_a_button(tmp_path: Path) -> None:
    """A class labelled in the file after the page started (a spreadsheet, another page)
    gets a button at the next answer, and after a reload: the buttons come with the queue
    (audit of issue 34: they were fixed at start-up, reload or not)."""
    playwright = pytest.importorskip("playwright.sync_api")
    out = suggestions(tmp_path, extra=1)
    web = Page(playwright, create_review_app(out))
    try:
        web.open(4)
        buttons = "[...document.querySelectorAll('#classes button')].map((b) => b.dataset.name)"
        assert web.page.evaluate(buttons) == ["green", "red"]
        with open(out, "a", newline="") as fh:
            csv.writer(fh).writerow([str(tmp_path / "elsewhere.png"), "purple", "", "", ""])
        web.page.keyboard.press("Enter")
        web.at(2, 4)
        assert web.page.evaluate(buttons) == ["green", "purple", "red"]
        web.page.keyboard.press("2")  # the second button: purple
        web.at(3, 4)
        web.open(2)  # a reload
        assert web.page.evaluate(buttons) == ["green", "purple", "red"]
    finally:
        web.close()
    assert [r["label"] for r in read(out)][1:3] == ["red", "purple"] and web.alerts == []


def test_a_set_with_no_label_is_an_answer_and_an_empty_cell_is_not(tmp_path: Path) -> None:
    """Label sets: toggling every label off and pressing Enter saves the empty set, written
    (none) (audit of issue 34: refused, so an image with none of the labels could never be
    recorded); a row left unanswered (skipped) stays an empty cell, which train --csv leaves
    out as not labelled yet (it trained as "no labels", though suggest says it trains on
    the rows filled in)."""
    playwright = pytest.importorskip("playwright.sync_api")
    out = suggestions(tmp_path, label="labels", given="green red", guess="red")
    web = Page(playwright, create_review_app(out))
    try:
        web.open(3)
        web.page.keyboard.press("2")  # red off: the set is empty
        assert "(none)" in web.page.inner_text("#chosen")
        web.page.keyboard.press("Enter")
        web.at(2, 3)
        web.page.keyboard.press("1")  # + green
        web.page.keyboard.press("Enter")
        web.at(3, 3)
        web.page.keyboard.press("s")  # skipped: unanswered
        web.done()
    finally:
        web.close()
    assert web.alerts == []
    assert [r["labels"] for r in read(out)] == ["green red", "(none)", "green red", ""]
    source = load_items(DataConfig(csv=str(out), valid_pct=0.0), min_classes=1)  # what train --csv reads
    labels = {Path(it.path).name: it.label for it in source.items}
    rows = read(out)
    assert labels == {Path(rows[0]["path"]).name: ("green", "red"), Path(rows[1]["path"]).name: (),
                      Path(rows[2]["path"]).name: ("green", "red")}
    assert any("not labelled yet" in why for _, why in source.excluded)
    assert source.task == "multi-label"


def test_numbers_are_typed_and_checked_with_task_regression(tmp_path: Path) -> None:
    """--task regression: no class buttons, the box holds the guess (Enter saves it), a
    typed number is saved as the number, text that is none is refused."""
    playwright = pytest.importorskip("playwright.sync_api")
    out = suggestions(tmp_path, given="1.5", guess="-0.123456789")
    web = Page(playwright, create_review_app(out, task="regression"))
    try:
        web.open(3)
        assert web.page.locator("#classes button").count() == 0
        assert web.page.input_value("#text") == "-0.123456789"
        web.page.keyboard.press("Enter")
        web.at(2, 3)
        web.page.fill("#text", "about 3")
        web.page.keyboard.press("Enter")
        web.page.wait_for_timeout(300)
        web.page.fill("#text", "")
        web.page.keyboard.type("42")  # the box has the focus
        web.page.keyboard.press("Enter")
        web.at(3, 3)
        web.page.keyboard.press("s")  # no number holds an s: it skips
        web.done()
    finally:
        web.close()
    assert len(web.alerts) == 1 and "is not a number" in web.alerts[0]
    assert [r["label"] for r in read(out)] == ["1.5", "-0.123456789", "42.0", ""]
    source = load_items(DataConfig(csv=str(out), task="regression", valid_pct=0.0), min_classes=1)
    assert sorted(it.label for it in source.items) == [-0.123456789, 1.5, 42.0]


def test_label_sets_are_toggled_and_saved_whole(tmp_path: Path) -> None:
    """A 'labels' column holds sets: the page starts from the guessed set, a digit toggles
    one label, Enter saves the set shown; typed text is a set too."""
    playwright = pytest.importorskip("playwright.sync_api")
    out = suggestions(tmp_path, label="labels", given="green red", guess="red")
    web = Page(playwright, create_review_app(out))
    try:
        web.open(3)
        assert web.page.evaluate("SPEC.classes") == ["green", "red"]
        web.page.keyboard.press("1")  # + green
        assert "green, red" in web.page.inner_text("#chosen")
        web.page.keyboard.press("Enter")
        web.at(2, 3)
        web.page.keyboard.press("Enter")  # the guessed set as it is
        web.at(3, 3)
        web.page.fill("#text", "blue green")
        web.page.keyboard.press("Enter")
        web.done()
    finally:
        web.close()
    assert [r["labels"] for r in read(out)] == ["green red", "green red", "red", "blue green"]
    source = load_items(DataConfig(csv=str(out), valid_pct=0.0), min_classes=1)
    assert sorted(it.label for it in source.items) == [("blue", "green"), ("green", "red"), ("green", "red"), ("red",)]


def test_answers_merge_with_what_the_file_holds_when_written(tmp_path: Path) -> None:
    """While the page is open, `suggest` rewrites the file (filled rows first, new rows
    appended) and a label is typed in a spreadsheet: the next answer keeps both, finds
    its row by path, and the new row is listed; an image labelled otherwise meanwhile is
    refused (409) and the file is left as it is."""
    from fastapi.testclient import TestClient

    out = suggestions(tmp_path, extra=2)
    client = TestClient(create_review_app(out))
    items = client.get("/api/queue").json()["items"]
    rows = [list(r.values()) for r in read(out)]
    newcomer = tmp_path / "pool" / "new.png"
    newcomer.write_bytes((tmp_path / "pool" / "red" / "red_000.png").read_bytes())
    rows[2][1] = "green"  # typed in a spreadsheet
    reordered = [rows[0], rows[2], rows[1], *rows[3:], [str(newcomer), "", "red", "typical", "1"]]
    with open(out, "w", newline="") as fh:
        csv.writer(fh).writerows([["path", "label", "prediction", "reason", "score"], *reordered])
    target = next(it for it in items if it["name"] == os.path.basename(rows[1][0]))
    assert client.post("/api/label", json={"id": target["id"], "label": "red"}).json()["ok"]
    now = {r["path"]: r["label"] for r in read(out)}
    assert now[rows[1][0]] == "red" and now[rows[2][0]] == "green" and now[str(newcomer)] == ""
    assert len(now) == len(rows) + 1
    assert "new.png" in [it["name"] for it in client.get("/api/queue").json()["items"]]
    spreadsheet = next(it for it in items if it["name"] == os.path.basename(rows[2][0]))
    before = out.read_bytes()
    answer = client.post("/api/label", json={"id": spreadsheet["id"], "label": "red"})
    assert answer.status_code == 409 and "was labelled 'green'" in answer.json()["detail"]
    assert out.read_bytes() == before


def test_the_api_serves_only_the_files_rows_and_refuses_bad_input(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    out = suggestions(tmp_path)
    client = TestClient(create_review_app(out))
    queue = client.get("/api/queue").json()
    ids = [i["id"] for i in queue["items"]]
    assert queue["classes"] == ["green", "red"] and ids == [1, 2, 3]
    assert client.get("/image/1").status_code == 200 and client.get("/image/0").status_code == 200
    assert client.get("/image/99").status_code == 404 and client.get("/image/-1").status_code == 404
    assert client.post("/api/label", json={"id": 1, "label": " "}).status_code == 400
    before = out.read_bytes()
    for bad, what in ((None, "not null"), (["red"], "not a list"), ({"a": 1}, "not an object"), (3, "not a number")):
        answer = client.post("/api/label", json={"id": 1, "label": bad})  # stored as 'None', "['red']"... before
        assert answer.status_code == 400 and what in answer.json()["detail"], (bad, answer.json())
    assert out.read_bytes() == before
    answer = client.post("/api/label", json={"id": 1, "label": "blue"}).json()
    assert answer["ok"] and answer["remaining"] == 2 and answer["spec"]["classes"] == ["blue", "green", "red"]
    assert read(out)[1]["label"] == "blue"
    other = tmp_path / "other.csv"
    other.write_text("file,class\na.png,red\n")
    with pytest.raises(DataError, match="not a suggestions CSV"):
        create_review_app(other)
    out.write_bytes(out.read_text().replace("green", "grün").encode("cp1252"))  # re-saved by Excel's plain "CSV"
    answer = client.get("/api/queue")  # a 500 before
    assert answer.status_code == 400 and "is not UTF-8" in answer.json()["detail"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _status(port: int, host: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/api/queue", headers={"Host": host})
    return conn.getresponse().status


def test_the_server_answers_only_the_hosts_it_is_told(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`visiontune review --label` (a real server process) answers requests addressed to
    this machine and to --allowed-host, and refuses others (a page of another site that
    reaches it through DNS rebinding sends its own name); serve has the same option, and
    --help says so."""
    out, port = suggestions(tmp_path), _free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-m", "visiontune", "review", "--label", str(out), "--port", str(port),
                             "--allowed-host", "labels.example"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 60
        while True:
            try:
                first = _status(port, f"127.0.0.1:{port}")
                break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.stdout else ""
                time.sleep(0.2)
        assert first == 200 and _status(port, f"localhost:{port}") == 200 and _status(port, f"[::1]:{port}") == 200
        assert _status(port, f"labels.example:{port}") == 200
        assert _status(port, f"attacker.example:{port}") == 400 and _status(port, "192.168.1.7") == 400
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    parser = build_parser()
    assert parser.parse_args(["serve", "RUN", "--allowed-host", "a", "--allowed-host", "b"]).allowed_host == ["a", "b"]
    for command in ("review", "serve"):
        with pytest.raises(SystemExit):
            parser.parse_args([command, "--help"])
        assert "--allowed-host NAME" in capsys.readouterr().out


def test_two_pages_on_one_file_lose_no_answer(tmp_path: Path) -> None:
    """Two `review --label` processes on one CSV answer different rows at the same moment:
    every answer is in the file (audit of issue 34: the check that nobody wrote the file
    and its replacement were two steps with no lock between processes; 193 of 200 answers
    landed)."""
    out, n = tmp_path / "many.csv", 300
    with open(out, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "prediction", "reason", "score"])
        w.writerows([f"img_{i:03d}.png", "", "red", "typical", "1"] for i in range(n))
    servers = [ServerProcess(["review", "--label", str(out)], tmp_path / f"page{k}.log") for k in range(2)]
    try:
        ids = [{it["name"]: it["id"] for it in server.request("GET", "/api/queue")[1]["items"]} for server in servers]
        answers: list[tuple[int, object]] = []

        def answer(k: int) -> None:
            for i in range(k, n, 2):
                name = f"img_{i:03d}.png"
                answers.append(servers[k].request("POST", "/api/label", {"id": ids[k][name], "label": f"c{i}"}))

        threads = [threading.Thread(target=answer, args=(k,)) for k in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        for server in servers:
            server.stop()
    assert all(status == 200 for status, _ in answers), [a for a in answers if a[0] != 200][:3]
    labels = {r["path"]: r["label"] for r in read(out)}
    lost = [p for p, label in labels.items() if label != f"c{int(p[4:7])}"]
    assert len(labels) == n and lost == [], f"{len(lost)} answers lost"
