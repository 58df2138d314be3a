"""visiontune.files: the one CSV writer neutralises cells a spreadsheet would run as a
formula (OWASP's CSV injection: a leading single quote) and its readers give back exactly
what was written; a class named like a formula survives training, splits.csv and predict's
CSV output."""

from __future__ import annotations

import csv
from pathlib import Path

import visiontune as vt
from conftest import TINY, make_class_folders
from visiontune.bundle import load_bundle, run_splits
from visiontune.cli import main
from visiontune.files import read_csv, read_csv_dicts, write_csv

TRICKY = ["=SUM(A1:A9)", "+dog", "-cat", "@home", "'quoted", "''twice", "\tx", "plain", "-3.5", "+1e3", "", "a=b"]


def raw(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.reader(fh))


def test_formula_cells_get_one_quote_and_come_back_unchanged(tmp_path: Path) -> None:
    out = tmp_path / "t.csv"
    write_csv(out, ["label", "=head"], [[v, 1] for v in TRICKY])
    cells = [r[0] for r in raw(out)[1:]]
    assert raw(out)[0] == ["label", "'=head"]
    assert cells == ["'=SUM(A1:A9)", "'+dog", "'-cat", "'@home", "''quoted", "'''twice", "'\tx", "plain", "-3.5",
                     "+1e3", "", "a=b"]  # numbers are no formula; a real quote is kept behind the added one
    assert not any(c.startswith(("=", "+", "-", "@", "\t")) and c not in ("-3.5", "+1e3") for c in cells)
    assert [r[0] for r in read_csv(out)[1:]] == TRICKY
    assert [r["label"] for r in read_csv_dicts(out)] == TRICKY and "=head" in read_csv_dicts(out)[0]


def test_a_class_named_like_a_formula_trains_and_predicts_to_neutral_csv_cells(tmp_path: Path) -> None:
    data = make_class_folders(tmp_path / "data", {"red": 6, "green": 6})
    (data / "red").rename(data / "=red")
    (data / "green").rename(data / "@green")
    run = Path(vt.fit(data, **dict(TINY, strategy="feature-extract", epochs=1, output=str(tmp_path / "runs"))).run_dir)
    bundle = load_bundle(run)
    assert bundle.classes == ["=red", "@green"]
    assert {label for _, label, _ in run_splits(run, bundle.task)} == {"=red", "@green"}  # splits.csv read back
    assert {r[1] for r in raw(run / "splits.csv")[1:]} == {"'=red", "'@green"}
    assert main(["predict", str(run), str(data), "--output", str(tmp_path / "p.csv"), "--top-k", "2"]) == 0
    cells = [c for row in raw(tmp_path / "p.csv")[1:] for c in row[1:]]
    assert {c for c in cells if c.startswith("'")} == {"'=red", "'@green"}
    assert not any(c.startswith(("=", "@", "+")) for c in cells)
