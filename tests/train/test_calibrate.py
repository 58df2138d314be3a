"""Calibration at the end of training (train/calibrate.py), on runs trained for real."""

from __future__ import annotations

from pathlib import Path

import pytest

import visiontune as vt
from conftest import TINY, make_class_folders
from visiontune.bundle import load_bundle
from visiontune.rundir import RunDir


def test_cross_validated_calibration_leaves_out_a_class_its_fold_never_saw(tmp_path: Path) -> None:
    """A class with a single image: no split can be held out and the probe's cross-validation
    validates. The fold holding that image out trained without its class, so its output for
    it was near 0; fitted on it, the temperature flattened every probability (ECE 0.02 ->
    0.15) and calibration.json said "the validation split". That row is left out."""
    data = make_class_folders(tmp_path / "d", {"red": 14, "green": 14, "blue": 1})
    result = vt.fit(data, **dict(TINY, strategy="feature-extract", output=str(tmp_path / "runs")))
    record = RunDir(result.run_dir).read_calibration()
    assert "cross-validation" in record["fitted_on"]
    assert record["images"] == 28  # 29 labelled images, less the one blue
    assert record["after"]["nll"] <= record["before"]["nll"] + 1e-9
    assert record["sets"]["held_out_images"] == 28
    bundle = load_bundle(result.run_dir)
    assert bundle.uncertainty["sets"]["n"] == 28
    assert bundle.model.calibration.scale[0].item() == pytest.approx(1 / record["temperature"][0], rel=1e-5)
