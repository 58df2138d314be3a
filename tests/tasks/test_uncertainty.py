"""Calibration (tasks/calibration.py) and prediction sets with a guarantee (tasks/conformal.py)
on outputs with a known answer: the temperature against its closed form, coverage on a
problem whose probabilities are the truth, the stored order statistics never below the exact
threshold."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from visiontune.errors import ConfigError
from visiontune.tasks.calibration import OutputCalibration, expected_calibration_error
from visiontune.tasks.catalog import make_task
from visiontune.tasks.conformal import STORED, minimum_images, threshold


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_the_temperature_is_the_closed_form_one() -> None:
    """Logits (z, -z) on every image, the first class right on a share a of them: the
    likelihood is highest where sigmoid(2 z / T) = a, so T = 2 z / logit(a)."""
    z, a, n = 3.0, 0.8, 20_000  # the prior on log T weighs 1 / n: nothing at this size
    probs = softmax(np.tile([z, -z], (n, 1)))
    targets = np.where(np.arange(n) < a * n, 0, 1)
    fit = make_task("single-label", ["x", "y"]).calibrator.fit(targets, probs)
    assert 1 / fit.scale[0] == pytest.approx(2 * z / math.log(a / (1 - a)), rel=1e-3)
    assert fit.after["nll"] < fit.before["nll"] and fit.after["ece"] < 1e-3 < fit.before["ece"]


def test_each_label_gets_its_own_closed_form_temperature() -> None:
    """Multi-label: label j has logit c_j on every image and is present on a share a_j."""
    n, c, a = 20_000, np.array([2.0, 4.0]), np.array([0.7, 0.9])
    probs = 1 / (1 + np.exp(-np.tile(c, (n, 1))))
    targets = (np.arange(n)[:, None] < a[None, :] * n).astype(np.float32)
    fit = make_task("multi-label", ["p", "q"]).calibrator.fit(targets, probs)
    assert 1 / fit.scale == pytest.approx(c / np.log(a / (1 - a)), rel=1e-3)
    assert (fit.bias == 0).all()  # a temperature: 0.5 stays 0.5, so no default decision moves


def test_a_few_images_cannot_drive_the_temperature_to_an_extreme() -> None:
    """Seven images, ranked right at near-uniform probabilities: the likelihood alone wants
    T -> 0 (it hit the bound, T = 0.018, and the ECE got worse); the prior keeps it near 1."""
    probs = softmax(np.tile([0.02, 0.0, -0.02], (7, 1)))
    fit = make_task("single-label", ["a", "b", "c"]).calibrator.fit(np.zeros(7, dtype=int), probs)
    assert 0.5 < 1 / fit.scale[0] < 1.0


def test_a_number_has_nothing_to_calibrate() -> None:
    task = make_task("regression", ["y"], {"mean": 0.0, "std": 1.0})
    assert task.calibrator.fit(np.arange(5.0), np.arange(5.0)[:, None]) is None


def test_the_calibration_layer_is_the_identity_until_set() -> None:
    layer = OutputCalibration(3)
    z = torch.randn(4, 3)
    assert not layer.fitted and torch.equal(layer(z), z)
    layer.set(np.array([0.5, 0.5, 0.5]), np.zeros(3))
    assert layer.fitted and torch.allclose(layer(z), z / 2)


def test_ece_of_a_known_case() -> None:
    """Half the predictions at 0.9 confidence and 60% right, half at 0.6 and all right:
    ECE = 0.5 * 0.3 + 0.5 * 0.4."""
    conf = np.r_[np.full(10, 0.9), np.full(10, 0.6)]
    right = np.r_[np.ones(6), np.zeros(4), np.ones(10)]
    assert expected_calibration_error(conf, right) == pytest.approx(0.35)


def calibrated_problem(n: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities that are the truth: each label drawn from its own image's probabilities."""
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.full(classes, 0.3), n)
    targets = np.array([rng.choice(classes, p=p) for p in probs])
    return targets, probs


@pytest.mark.parametrize("coverage", [0.8, 0.9, 0.95])
def test_sets_cover_the_true_class_as_often_as_asked(coverage: float) -> None:
    """Fitted on 2,000 held-out images, checked on 20,000 others: the coverage is what was
    asked (the guarantee is at least it, and the finite-sample correction adds at most
    1 / (n + 1)); a method that covered 0.8 when 0.9 was asked fails."""
    task = make_task("single-label", [f"c{i}" for i in range(10)])
    fitted = task.conformal.fit(*calibrated_problem(2000, 10, 0))
    result = task.conformal.assess(*calibrated_problem(20000, 10, 1), fitted, coverage)
    assert coverage - 0.015 <= result["coverage"] <= coverage + 0.02
    assert 1 <= result["mean_set_size"] < 10 and 0 < result["single_share"] < 1
    easier = task.conformal.assess(*calibrated_problem(20000, 10, 1), fitted, coverage - 0.1)
    assert easier["mean_set_size"] < result["mean_set_size"]


def test_sets_are_prefixes_of_the_ranking_and_never_empty() -> None:
    task = make_task("single-label", ["a", "b", "c"])
    fitted = {"kind": "raps", "n": 1, "step": 1, "scores": [0.0]}  # a threshold no cumulative stays under
    sets = task.conformal.sets(np.array([[0.2, 0.7, 0.1]]), fitted, 0.4)
    assert [s.labels for s in sets] == [["b"]]
    fitted = {"kind": "raps", "n": 1, "step": 1, "scores": [0.8]}  # a: 0.7 above + 0.01; c: 0.9 + 0.02
    assert task.conformal.sets(np.array([[0.2, 0.7, 0.1]]), fitted, 0.4)[0].labels == ["b", "a"]


def test_too_few_held_out_images_give_every_class() -> None:
    """n = 5 cannot guarantee 0.9 (needs ceil((n + 1) 0.9) <= n, n >= 9): the set is every
    class, said by an infinite threshold."""
    task = make_task("single-label", ["a", "b", "c"])
    fitted = task.conformal.fit(*calibrated_problem(5, 3, 0))
    assert minimum_images(0.9) == 9 and threshold(fitted, 0.9) == math.inf
    assert task.conformal.sets(np.array([[0.9, 0.05, 0.05]]), fitted, 0.9)[0].labels == ["a", "b", "c"]


def test_many_held_out_scores_are_kept_small_and_conservative() -> None:
    rng = np.random.default_rng(0)
    scores = rng.random(25_000)
    task = make_task("regression", ["y"], {"mean": 0.0, "std": 1.0})
    fitted = task.conformal.fit(scores, np.zeros((len(scores), 1)))  # residuals = the scores
    assert len(fitted["scores"]) <= STORED + 1
    for coverage in (0.5, 0.9, 0.95, 0.999):
        exact = np.sort(scores)[math.ceil((len(scores) + 1) * coverage) - 1]
        assert exact <= threshold(fitted, coverage) <= exact + 0.002


def test_intervals_cover_the_true_number() -> None:
    rng = np.random.default_rng(0)
    task = make_task("regression", ["y"], {"mean": 0.0, "std": 1.0})

    def problem(n: int) -> tuple[np.ndarray, np.ndarray]:
        pred = rng.normal(0, 5, n)
        return pred + rng.normal(0, 1, n), pred[:, None]
    fitted = task.conformal.fit(*problem(2000))
    result = task.conformal.assess(*problem(20000), fitted, 0.9)
    assert 0.885 <= result["coverage"] <= 0.92
    assert result["mean_interval_width"] == pytest.approx(2 * 1.645, rel=0.06)  # the normal's 90% interval


def test_missed_labels_stay_under_the_rate_asked() -> None:
    """Multi-label: each label present with its own (true) probability; the share of true
    labels left out of the set is at most 1 - coverage, and close to it."""
    rng = np.random.default_rng(0)
    task = make_task("multi-label", [f"l{i}" for i in range(6)])

    def problem(n: int) -> tuple[np.ndarray, np.ndarray]:
        p = rng.beta(0.5, 0.5, (n, 6))
        return (rng.random((n, 6)) < p).astype(np.float32), p
    fitted = task.conformal.fit(*problem(2000))
    result = task.conformal.assess(*problem(20000), fitted, 0.9)
    assert 0.89 <= result["coverage"] <= 0.93 and 0 < result["mean_set_size"] < 6


def test_a_coverage_outside_0_and_1_is_refused() -> None:
    task = make_task("single-label", ["a", "b"])
    fitted = task.conformal.fit(np.array([0, 1]), np.array([[0.9, 0.1], [0.2, 0.8]]))
    with pytest.raises(ConfigError, match="between 0 and 1"):
        task.conformal.sets(np.array([[0.5, 0.5]]), fitted, 90)
