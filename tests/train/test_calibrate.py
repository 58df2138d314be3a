"""Calibration at the end of training (train/calibrate.py), on runs trained for real; what it says when the
validation split is too small to calibrate."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

import visiontune as vt
from conftest import TINY, make_class_folders
from visiontune.bundle import load_bundle
from visiontune.rundir import RunDir
from visiontune.runtime.inference import EvalOutput
from visiontune.tasks.catalog import make_task
from visiontune.train.calibrate import MIN_HELD_OUT, calibrate


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


def test_a_validation_split_too_small_to_calibrate_says_how_large_it_must_be(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A run with 5 validation images said predict --coverage "needs a run trained with a
    validation split": it had one; what it lacked was 10 images in it."""
    task = make_task("single-label", ["a", "b"])
    few = EvalOutput(0.5, np.array([0, 1, 0, 1, 0]), np.full((5, 2), 0.5), np.arange(5))
    with caplog.at_level(logging.INFO, logger="visiontune"):
        assert calibrate(None, task, few, tmp_path, write=False) is few
    said = caplog.text
    assert "5 held-out outputs (under 10)" in said and "trained with a validation split" not in said
    assert f"validation split holds {MIN_HELD_OUT} images or more" in said
