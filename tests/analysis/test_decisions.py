"""RUN/review/: one append-only decision log, and the files `train --relabel/--exclude`
read derived from it. A record torn by a crash is dropped and the next one starts on its
own line; two pages on one run keep each other's decisions; a run folder from before the
log (exclude.txt one path a line, a path with a comma) is read and rewritten in the one
format --exclude reads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import make_class_folders, make_image
from visiontune.analysis.decisions import Decisions
from visiontune.config import DataConfig
from visiontune.data.sources import load_items
from visiontune.errors import DataError
from visiontune.files import read_csv


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "review" / "decisions.jsonl").read_text().splitlines()]


def test_a_torn_last_record_is_dropped_and_the_next_starts_on_its_own_line(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    log = tmp_path / "review" / "decisions.jsonl"
    log.parent.mkdir()
    log.write_text('{"path": "a.png", "decision": "exclude", "label": ""}\n'
                   '{"path": "b.png", "decision": "relabel", "label": "red"}\n{"path": "c.png", "deci')
    with caplog.at_level("WARNING"):
        decisions = Decisions(tmp_path)
    assert "cut off while written" in caplog.text
    assert read_csv(tmp_path / "review" / "exclude.txt") == [["path"], ["a.png"]]
    assert read_csv(tmp_path / "review" / "corrections.csv") == [["path", "label"], ["b.png", "red"]]
    decisions.record("c.png", "keep")
    assert [r["path"] for r in records(tmp_path)] == ["a.png", "b.png", "c.png"]
    assert read_csv(tmp_path / "review" / "kept.txt") == [["path"], ["c.png"]]
    log.write_text(log.read_text() + "not json\n")
    with pytest.raises(DataError, match=r"decisions.jsonl:4 is not a review decision") as error:
        Decisions(tmp_path)
    # the advice works (audit of issue 34: "remove the file to start the review over" did not:
    # the derived files were read back into a new log)
    assert f"remove the folder {tmp_path / 'review'}" in str(error.value)
    shutil.rmtree(tmp_path / "review")
    assert Decisions(tmp_path).latest() == {} and not (tmp_path / "review" / "decisions.jsonl").exists()


def test_hand_edits_of_the_files_are_taken_into_the_log(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A row added by hand to corrections.csv or exclude.txt (a label changed too) is a
    decision, taken into the log at the next decision, with a warning; a row removed by
    hand comes back with a warning saying to change the decision on the page (audit of
    issue 34: the next decision rewrote the files from the log and hand edits were lost)."""
    decisions = Decisions(tmp_path)
    decisions.record("a.png", "relabel", "red")
    decisions.record("b.png", "exclude")
    decisions.record("g.png", "relabel", "green")
    review = tmp_path / "review"
    with open(review / "corrections.csv", "a") as fh:
        fh.write("c.png,blue\n")
    (review / "corrections.csv").write_text((review / "corrections.csv").read_text().replace("g.png,green",
                                                                                           "g.png,red"))
    (review / "exclude.txt").write_text('path\n"d, e.png"\n')  # b.png removed, d added (as a CSV, by hand)
    with caplog.at_level("WARNING"):
        Decisions(tmp_path).record("f.png", "keep")  # another page (process) on the run
    assert read_csv(review / "corrections.csv") == [["path", "label"], ["a.png", "red"], ["c.png", "blue"],
                                                    ["g.png", "red"]]
    assert sorted(read_csv(review / "exclude.txt")[1:]) == [["b.png"], ["d, e.png"]]
    assert {r["path"]: (r["decision"], r["label"]) for r in records(tmp_path)} == {
        "a.png": ("relabel", "red"), "b.png": ("exclude", ""), "c.png": ("relabel", "blue"),
        "d, e.png": ("exclude", ""), "f.png": ("keep", ""), "g.png": ("relabel", "red")}
    assert "taken as decisions" in caplog.text and "relabel c.png blue" in caplog.text
    assert "removed by hand from exclude.txt come back (e.g. b.png)" in caplog.text
    assert "change the decision on the review page" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        decisions.record("h.png", "keep")  # nothing edited since: no warning, nothing taken
    assert caplog.text == "" and len(records(tmp_path)) == 8


def test_two_pages_on_one_run_keep_each_others_decisions(tmp_path: Path) -> None:
    """Each page held what it read at its start and rewrote the files from it: the other
    page's decisions were lost at its next write."""
    first, second = Decisions(tmp_path), Decisions(tmp_path)
    first.record("a.png", "relabel", "red")
    second.record("b.png", "exclude")
    second.record("a.png", "relabel", "green")  # a later decision on an image replaces the earlier one
    first.record("c.png", "keep")
    assert read_csv(tmp_path / "review" / "corrections.csv") == [["path", "label"], ["a.png", "green"]]
    assert read_csv(tmp_path / "review" / "exclude.txt") == [["path"], ["b.png"]]
    assert read_csv(tmp_path / "review" / "kept.txt") == [["path"], ["c.png"]]


def test_a_run_folder_from_before_the_log_is_read_and_its_excludes_work(tmp_path: Path) -> None:
    data = make_class_folders(tmp_path / "data", {"red": 4, "green": 4})
    comma = make_image(data / "red" / "x, y.png", (220, 40, 40), seed=7)
    review = tmp_path / "run" / "review"
    review.mkdir(parents=True)
    (review / "corrections.csv").write_text(f"path,label\n{data / 'red' / 'red_000.png'},green\n")
    (review / "exclude.txt").write_text(f"{comma}\n")  # as the page wrote it before: one path a line
    (review / "kept.txt").write_text(f"{data / 'green' / 'green_000.png'}\n")
    Decisions(tmp_path / "run")
    assert [(r["path"], r["decision"]) for r in records(tmp_path / "run")] == [
        (str(data / "red" / "red_000.png"), "relabel"), (str(comma), "exclude"),
        (str(data / "green" / "green_000.png"), "keep")]
    source = load_items(DataConfig(path=str(data), valid_pct=0.25, relabel=str(review / "corrections.csv"),
                                   exclude=str(review / "exclude.txt")))
    labels = {it.path: it.label for it in source.items}
    assert str(comma) not in labels and labels[str(data / "red" / "red_000.png")] == "green"
