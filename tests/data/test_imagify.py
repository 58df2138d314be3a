"""Time series -> images: the math on hand-computed cases, bad rows, windows, and training."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import visiontune as vt
from visiontune.cli import main
from visiontune.data.imagify import gramian_field, imagify, paa, recurrence_plot, rescale, series_to_image


def test_gasf_and_gadf_by_hand() -> None:
    x = np.array([-1.0, 0.0, 1.0])  # phi = (pi, pi/2, 0)
    gasf = gramian_field(x, "gasf")  # cos(phi_i + phi_j)
    gadf = gramian_field(x, "gadf")  # sin(phi_i - phi_j)
    assert gasf == pytest.approx(np.array([[1, 0, -1], [0, -1, 0], [-1, 0, 1]]), abs=1e-12)
    assert gadf == pytest.approx(np.array([[0, 1, 0], [-1, 0, 1], [0, -1, 0]]), abs=1e-12)
    y = np.array([0.5, -0.5])
    a, b = math.acos(0.5), math.acos(-0.5)
    assert gramian_field(y, "gasf")[0, 1] == pytest.approx(math.cos(a + b))
    assert gramian_field(y, "gadf")[1, 0] == pytest.approx(math.sin(b - a))
    assert recurrence_plot(x) == pytest.approx(np.array([[0, 0.5, 1], [0.5, 0, 0.5], [1, 0.5, 0]]))


def test_paa_and_rescale() -> None:
    assert paa(np.arange(6.0), 3) == pytest.approx([0.5, 2.5, 4.5])
    assert paa(np.arange(5.0), 2) == pytest.approx([0.8, 3.2])  # fractional segments of 2.5 points
    assert paa(np.array([0.0, 1.0]), 3) == pytest.approx([0.0, 0.5, 1.0])  # shorter: interpolated
    assert rescale(np.array([2.0, 4.0, 3.0])) == pytest.approx([-1.0, 1.0, 0.0])
    img = series_to_image(np.sin(np.linspace(0, 6, 100)), "gasf", 16)
    assert img.shape == (16, 16) and img.dtype == np.uint8 and (img == img.T).all()  # GASF is symmetric


def _write(path: Path, rows: list[list[object]]) -> Path:
    with open(path, "w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    return path


def test_bad_rows_are_reported_and_skipped(tmp_path: Path) -> None:
    good = list(np.sin(np.linspace(0, 3, 20)))
    table = _write(tmp_path / "t.csv", [
        ["label"] + [f"t{i}" for i in range(20)],
        ["a"] + good,
        ["a"] + good[:5] + ["nan"] + good[6:],
        ["b"] + [1.0] * 20,
        ["b"] + good[:4] + [""] * 16,  # ragged row: only 4 points
        ["b"] + [-v for v in good],
    ])
    report = imagify(table, tmp_path / "out", kind="gasf", size=16)
    assert report.written == {"a": 1, "b": 1}
    reasons = dict(report.skipped)
    assert "NaN" in reasons["row000003"] and "constant" in reasons["row000004"] and "too short" in reasons["row000005"]
    assert Image.open(next((tmp_path / "out" / "a").glob("*.png"))).size == (16, 16)


def test_windows_of_a_long_series(tmp_path: Path) -> None:
    t = np.arange(200)
    rows = [["time", "value", "label"]] + [[i, math.sin(i / 5), "up" if i < 100 else "down"] for i in t]
    report = imagify(_write(tmp_path / "long.csv", rows), tmp_path / "w", value_col="value", window=50, stride=25,
                     size=32)
    assert sum(report.written.values()) == 7  # starts 0, 25, ..., 150
    assert report.written == {"up": 4, "down": 3}  # window 75..124 is 25 up + 25 down: a tie goes to the first


def test_missing_label_column_is_a_clear_error(tmp_path: Path) -> None:
    table = _write(tmp_path / "t.csv", [["y", "a", "b"], ["x", 1, 2]])
    with pytest.raises(vt.DataError, match="--csv-label-col"):
        imagify(table, tmp_path / "o")


@pytest.mark.slow
def test_sine_vs_square_waves_train_well_above_chance(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rows = [["label"] + [f"t{i}" for i in range(128)]]
    for i in range(40):
        t = np.linspace(0, 2 * np.pi * rng.uniform(2, 5), 128) + rng.uniform(0, 6)
        sine = np.sin(t) + rng.normal(0, 0.3, 128)
        square = np.sign(np.sin(t)) + rng.normal(0, 0.3, 128)
        rows.append(["sine", *sine] if i % 2 == 0 else ["square", *square])
    table = _write(tmp_path / "waves.csv", rows)
    assert main(["imagify", str(table), "--kind", "gadf", "--output", str(tmp_path / "img"), "--size", "64"]) == 0
    result = vt.fit(tmp_path / "img", strategy="feature-extract", epochs=8, image_size=64, valid_pct=0.3,
                    output=str(tmp_path / "runs"), progress=False, num_workers=0, patience=0)
    assert result.metrics["accuracy"] >= 0.8  # chance is 0.5


def _recordings_table(path: Path, recordings: int = 6, points: int = 300) -> Path:
    rows = [["recording", "value", "activity"]]
    for r in range(recordings):
        label = "walk" if r % 2 == 0 else "sit"
        for i in range(points):
            v = math.sin(i / (3 if label == "walk" else 11)) + 0.01 * r
            rows.append([f"rec{r}", v, label])
    return _write(path, rows)


def test_windows_of_one_recording_stay_in_one_split_and_one_fold(tmp_path: Path, tiny: dict) -> None:
    """Overlapping windows of a recording must not land in train and valid (leakage):
    imagify writes each window's recording to groups.csv, and splits keep groups whole."""
    from visiontune.config import DataConfig
    from visiontune.data.sources import load_items
    from visiontune.data.splits import fold_indices

    report = imagify(_recordings_table(tmp_path / "rec.csv"), tmp_path / "img", value_col="value",
                     label_col="activity", group_col="recording", window=60, stride=30, size=16)
    assert sum(report.written.values()) == 6 * 9  # starts 0, 30, ..., 240 inside each recording of 300
    groups = dict(csv.reader(open(tmp_path / "img" / "groups.csv")))
    assert groups.pop("path") == "group" and set(groups.values()) == {f"rec{r}" for r in range(6)}
    source = load_items(DataConfig(path=str(tmp_path / "img"), valid_pct=0.34), seed=3)
    split_of: dict[str, set[str]] = {}
    for it in source.items:
        split_of.setdefault(it.group, set()).add(it.split)
    assert all(len(s) == 1 for s in split_of.values()) and {"train", "valid"} == set().union(*split_of.values())
    for held in fold_indices(source.items, 3, seed=0):
        held_groups = {source.items[i].group for i in held}
        assert not held_groups & {it.group for j, it in enumerate(source.items) if j not in set(held)}


def test_one_long_series_is_grouped_in_blocks_whose_windows_do_not_overlap(tmp_path: Path) -> None:
    rows = [["value", "label"]] + [[math.sin(i / 4), "a" if (i // 400) % 2 else "b"] for i in range(2000)]
    imagify(_write(tmp_path / "long.csv", rows), tmp_path / "img", value_col="value", window=20, stride=10, size=8)
    spans: dict[str, list[tuple[int, int]]] = {}
    for path, group in list(csv.reader(open(tmp_path / "img" / "groups.csv")))[1:]:
        start = int(Path(path).stem.rsplit("_w", 1)[1])
        spans.setdefault(group, []).append((start, start + 20))
    assert len(spans) == 10  # blocks of 10 windows' length (200 points)
    ranges = sorted((min(a for a, _ in s), max(b for _, b in s)) for s in spans.values())
    assert all(end <= nxt for (_, end), (nxt, _) in zip(ranges, ranges[1:]))  # no two groups overlap


def test_labels_cannot_escape_the_output_folder_or_hide(tmp_path: Path) -> None:
    from visiontune.data.imagify import safe_folder_name

    assert safe_folder_name("..") == "__" and safe_folder_name(".hidden") == "_hidden"
    assert safe_folder_name("../../etc") == "___.._etc" and safe_folder_name("a/b") == "a_b"
    good = list(np.sin(np.linspace(0, 3, 20)))
    table = _write(tmp_path / "t.csv", [["label"] + [f"t{i}" for i in range(20)], ["..", *good], [".x", *good]])
    imagify(table, tmp_path / "out", size=8)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["__", "_x", "groups.csv"]
    assert not (tmp_path / "x").exists()
    clash = _write(tmp_path / "c.csv", [["label"] + [f"t{i}" for i in range(20)], ["a/b", *good], ["a_b", *good]])
    with pytest.raises(vt.DataError, match="would share the folder"):
        imagify(clash, tmp_path / "out2", size=8)
