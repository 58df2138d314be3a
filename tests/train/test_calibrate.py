"""Calibration at the end of training (train/calibrate.py), on runs trained for real; what it says when the
validation split is too small to calibrate."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

import visiontune as vt
from conftest import COLORS, TINY, make_class_folders, make_image
from visiontune.bundle import load_bundle
from visiontune.rundir import RunDir
from visiontune.runtime.inference import EvalOutput
from visiontune.tasks.catalog import make_task
from visiontune.train.calibrate import MIN_HELD_OUT, calibrate
from visiontune.train.session import score_items


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
@pytest.mark.parametrize("kept", [dict(restore_best=False), dict(restore_best=False, ema=True, ema_decay=0.5),
                                  dict(ema=True, ema_decay=0.5)], ids=["last-epoch", "last-epoch-ema", "best-ema"])
def test_a_finished_run_resumed_keeps_its_weights_calibration_and_sets(tmp_path: Path, kept: dict) -> None:
    """`train --resume` of a run that had finished trains nothing and must end with what it
    had: the same weights, calibrated on the same validation outputs, with its prediction
    sets and OOD threshold. With --no-restore-best it wrote its weights uncalibrated, without
    sets (the last epoch's validation outputs were not in the checkpoint), and with --ema the
    raw weights where the EMA's had validated better."""
    data = make_class_folders(tmp_path / "d", {"red": 12, "green": 12})
    result = vt.fit(data, **dict(TINY, strategy="finetune", epochs=2, valid_pct=0.5, output=str(tmp_path / "runs"),
                             **kept))
    run = RunDir(result.run_dir)
    before, record = load_bundle(run.path), run.read_calibration()
    assert before.uncertainty["sets"] is not None and before.model.calibration.fitted
    vt.fit(resume=run.path)
    after = load_bundle(run.path)
    assert after.uncertainty["sets"] == before.uncertainty["sets"]
    assert after.uncertainty["ood"]["threshold"] == pytest.approx(before.uncertainty["ood"]["threshold"], rel=1e-4)
    assert run.read_calibration() == record
    state, again = before.model.state_dict(), after.model.state_dict()
    assert all(torch.equal(state[k], again[k]) for k in state if not k.startswith("novelty."))


def test_held_out_scores_are_of_the_calibrated_model_on_cached_features_too(tmp_path: Path) -> None:
    """cv's folds and compare's strategies are scored by `score_items`; on cached features it
    ran the head alone, without the calibration the model predicts with, so a feature-extract
    fold's out-of-fold probabilities and loss were uncalibrated while a fine-tuned one's were
    calibrated. They are the probabilities predict gives."""
    data = tmp_path / "d"
    for i in range(42):  # every 7th image looks like another class: the probe is not sure of everything
        name = ["red", "green", "blue"][i % 3]
        make_image(data / name / f"{name}_{i:03d}.png", COLORS[name if i % 7 else ["green", "blue", "red"][i % 3]],
                   seed=i)
    result = vt.fit(data, **dict(TINY, strategy="feature-extract", valid_pct=0.4, output=str(tmp_path / "runs")))
    assert load_bundle(result.run_dir).model.calibration.fitted
    items = result.data.split("valid")
    metrics, out = score_items(result, items)
    predicted, _ = vt.predict(result.run_dir, [it.path for it in items], top_k=3, engine="torch")
    expected = np.array([[p.probs[c] for c in result.classes] for p in predicted])
    assert np.allclose(out.probs, expected, atol=1e-5)
