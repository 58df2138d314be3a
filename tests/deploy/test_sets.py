"""Calibration and prediction sets end to end (issue 36, items 1-2): a trained run keeps its
fitted temperature and held-out scores; predict --coverage writes the set in the line, the CSV
and the JSON for every task shape; --abstain says "not sure"; evaluate reports ECE, NLL
before and after, and coverage; the exported ONNX outputs the calibrated probabilities that
predict gives; a run without held-out scores is refused with a reason."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

import visiontune as vt
from conftest import TINY, make_class_folders, make_multilabel_data
from tasks.test_regression import make_regression_data
from visiontune.bundle import load_bundle
from visiontune.cli import main
from visiontune.deploy.export import export
from visiontune.errors import ConfigError
from visiontune.rundir import RunDir


@pytest.fixture(scope="module")
def colour_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("sets")
    data = make_class_folders(root / "data", {"red": 14, "green": 14, "blue": 14})
    run = vt.fit(data, epochs=2, valid_pct=0.4, output=str(root / "runs"), **TINY)
    return Path(run.run_dir), data


def test_a_run_keeps_its_calibration_and_held_out_scores(colour_run: tuple[Path, Path]) -> None:
    run, _ = colour_run
    record = RunDir(run).read_calibration()
    valid = sum(r["split"] == "valid" for r in RunDir(run).split_rows())
    assert record["kind"] == "temperature" and record["images"] == valid and 15 <= valid <= 18  # ~40% of 42
    assert set(record["before"]) == {"ece", "nll"} and record["after"]["nll"] <= record["before"]["nll"]
    assert RunDir(run).reliability.is_file()
    bundle = load_bundle(run)
    assert bundle.model.calibration.scale[0].item() == pytest.approx(1 / record["temperature"][0], rel=1e-5)
    assert bundle.uncertainty["sets"]["kind"] == "raps" and bundle.uncertainty["sets"]["n"] == valid


def test_predict_writes_the_set_in_the_line_csv_and_json(colour_run: tuple[Path, Path], tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    run, data = colour_run
    images = str(data / "red")
    assert main(["predict", str(run), images, "--coverage", "0.9", "--engine", "torch",
                 "--output", str(tmp_path / "p.csv")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 14 and all("\t90% set: " in line for line in lines)
    rows = list(csv.DictReader(open(tmp_path / "p.csv")))
    assert {"set", "set_size"} <= set(rows[0]) and all(int(r["set_size"]) == len(r["set"].split()) for r in rows)
    assert all(r["label"] in r["set"].split() for r in rows)  # the top class (kept when unknown) is in its set
    assert main(["predict", str(run), images, "--coverage", "0.5", "--engine", "torch",
                 "--output", str(tmp_path / "p.json")]) == 0
    records = json.loads((tmp_path / "p.json").read_text())
    assert all(r["coverage"] == 0.5 and r["set_size"] == len(r["set"]) and r["abstained"] is False for r in records)
    smaller = sum(r["set_size"] for r in records)
    assert smaller <= sum(int(r["set_size"]) for r in rows)  # asking less coverage never grows a set


def test_abstain_says_not_sure_when_the_set_holds_more_than_one_class(colour_run: tuple[Path, Path]) -> None:
    run, data = colour_run
    preds, _ = vt.predict(run, data, coverage=0.95, abstain=True, engine="torch")
    preds = [p for p in preds if not p.decoded.unknown]  # "unknown" comes before "not sure" (tests/models)
    unsure = [p for p in preds if len(p.set.labels) > 1]
    sure = [p for p in preds if len(p.set.labels) == 1]
    assert all(p.line().split("\t")[1] == "not sure: " + " or ".join(p.set.labels) for p in unsure)
    assert all(p.line().split("\t")[1] == p.label for p in sure)
    assert all(p.record()["abstained"] for p in unsure) and not any(p.record()["abstained"] for p in sure)
    with pytest.raises(ConfigError, match="give --coverage too"):
        vt.predict(run, data, abstain=True)


def test_evaluate_reports_calibration_and_coverage(colour_run: tuple[Path, Path]) -> None:
    run, data = colour_run
    result = vt.evaluate(run, data, coverage=0.9)
    m = result.metrics
    assert {"ece", "nll", "ece_uncalibrated", "nll_uncalibrated"} <= set(m)
    assert m["nll"] == pytest.approx(m["loss"], abs=1e-4)  # the loss is of the calibrated outputs
    assert 0 <= m["coverage"] <= 1 and 1 <= m["mean_set_size"] <= 3 and 0 <= m["single_share"] <= 1
    calibration = RunDir(run).read_calibration()
    if calibration["temperature"][0] != pytest.approx(1.0, abs=1e-3):
        assert m["nll"] != pytest.approx(m["nll_uncalibrated"], abs=1e-6)


def test_the_exported_graph_outputs_the_probabilities_predict_gives(colour_run: tuple[Path, Path],
                                                                    tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    import onnxruntime as ort

    run, data = colour_run
    onnx = tmp_path / "m.onnx"
    export(run, "onnx", output=onnx)
    torch_preds, _ = vt.predict(run, data / "green", engine="torch", coverage=0.9)
    onnx_preds, _ = vt.predict(onnx, data / "green", coverage=0.9)
    for a, b in zip(torch_preds, onnx_preds):
        assert a.label == b.label and a.set.labels == b.set.labels
        assert np.allclose([a.probs[c] for c in a.probs], [b.probs[c] for c in a.probs], atol=1e-5)
    # outside visiontune, the file's output is the probabilities themselves (rows sum to 1)
    session = ort.InferenceSession(str(onnx))
    x = np.random.default_rng(0).normal(size=(2, 3, TINY["image_size"], TINY["image_size"])).astype(np.float32)
    out = session.run(None, {session.get_inputs()[0].name: x})[0]
    assert np.allclose(out.sum(axis=1), 1.0, atol=1e-5) and (out >= 0).all()


def test_label_sets_and_numbers_get_sets_and_intervals(tmp_path: Path) -> None:
    tags = make_multilabel_data(tmp_path / "tags", n=40)
    run = vt.fit(tags, csv="labels.csv", task="multi-label", strategy="feature-extract", valid_pct=0.4,
                 output=str(tmp_path / "runs"), **TINY)
    assert RunDir(run.run_dir).read_calibration()["kind"] == "temperature per label"
    preds, _ = vt.predict(run.run_dir, tags / "images", coverage=0.9, engine="torch")
    fewer, _ = vt.predict(run.run_dir, tags / "images", coverage=0.5, engine="torch")
    assert all(set(p.set.labels) <= {"red", "green", "blue"} for p in preds)
    assert all(set(a.set.labels) <= set(b.set.labels) for a, b in zip(fewer, preds))  # more coverage, more labels
    with pytest.raises(ConfigError, match="--abstain chooses between classes"):
        vt.predict(run.run_dir, tags / "images", coverage=0.9, abstain=True)

    numbers = make_regression_data(tmp_path / "numbers", n=40)
    run = vt.fit(numbers, csv="targets.csv", task="regression", strategy="feature-extract", valid_pct=0.4,
                 output=str(tmp_path / "runs"), **TINY)
    assert RunDir(run.run_dir).read_calibration()["kind"] == "none"  # a number has no probability
    preds, _ = vt.predict(run.run_dir, numbers / "images", coverage=0.8, engine="torch")
    assert all(p.set.interval[0] < p.value < p.set.interval[1] for p in preds)
    widths = {round(p.set.size, 6) for p in preds}
    assert len(widths) == 1  # split conformal: one width for every image
    assert main(["predict", run.run_dir, str(numbers / "images"), "--coverage", "0.8", "--engine", "torch",
                 "--output", str(tmp_path / "n.csv")]) == 0
    rows = list(csv.DictReader(open(tmp_path / "n.csv")))
    assert all(float(r["low"]) < float(r["prediction"]) < float(r["high"]) for r in rows)
    result = vt.evaluate(run.run_dir, numbers, csv="targets.csv", coverage=0.8)
    assert "mean_interval_width" in result.metrics and "ece" not in result.metrics


def test_a_run_without_held_out_scores_is_refused_with_the_reason(tmp_path: Path) -> None:
    """Every class with one image: no validation split; the probe's cross-validation holds 2
    images out, too few to fit a temperature or sets on (MIN_HELD_OUT)."""
    data = make_class_folders(tmp_path / "data", {"red": 1, "green": 1})
    run = vt.fit(data, strategy="feature-extract", output=str(tmp_path / "runs"), **TINY)
    assert load_bundle(run.run_dir).uncertainty.get("sets") is None
    with pytest.raises(ConfigError, match="no prediction sets"):
        vt.predict(run.run_dir, data, coverage=0.9)
    preds, _ = vt.predict(run.run_dir, data)  # without --coverage it predicts as before
    assert len(preds) == 2 and preds[0].set is None
