"""The run's Objective: one metric and its direction, what early stopping, the best
checkpoint and the EMA's comparison all judge "better" by; the Task gives its direction."""

from __future__ import annotations

import math

import pytest

from visiontune.errors import ConfigError
from visiontune.tasks.catalog import make_task
from visiontune.tasks.objective import VAL_LOSS, Objective


def test_an_objective_improves_in_its_direction_by_more_than_min_delta() -> None:
    low, high = Objective("val_loss", "min"), Objective("accuracy", "max")
    assert low.improves(0.5, None) and high.improves(0.5, None)  # anything beats no best
    assert low.improves(0.4, 0.5) and not low.improves(0.6, 0.5) and not low.improves(0.5, 0.5)
    assert high.improves(0.6, 0.5) and not high.improves(0.4, 0.5)
    assert not low.improves(0.45, 0.5, min_delta=0.1) and low.improves(0.35, 0.5, min_delta=0.1)
    assert not high.improves(0.55, 0.5, min_delta=0.1) and high.improves(0.65, 0.5, min_delta=0.1)
    assert not low.improves(math.nan, None) and not high.improves(math.nan, 0.5)  # NaN beats nothing
    assert VAL_LOSS == low


def test_better_compares_two_epochs_metrics_and_needs_the_metric_in_both() -> None:
    acc = Objective("accuracy", "max")
    assert acc.better({"accuracy": 0.9}, {"accuracy": 0.8}) and not acc.better({"accuracy": 0.8}, {"accuracy": 0.8})
    assert not acc.better({"val_loss": 0.1}, {"accuracy": 0.8}) and not acc.better({"accuracy": 0.9}, {})
    assert Objective("val_loss", "min").better({"val_loss": 0.1}, {"val_loss": 0.2})


def test_a_bad_mode_or_a_missing_metric_is_refused_with_what_is_valid() -> None:
    with pytest.raises(ConfigError, match="'min' or 'max'"):
        Objective("val_loss", "auto")
    with pytest.raises(ConfigError, match=r"monitor 'f1' is not a metric of this run; available: accuracy, val_loss"):
        Objective("f1", "max").value({"val_loss": 0.3, "accuracy": 0.9})


def test_the_task_gives_the_direction_and_refuses_a_metric_it_lacks() -> None:
    single, regression = make_task("single-label", ["a", "b"]), make_task("regression", ["y"])
    assert single.objective("accuracy") == Objective("accuracy", "max", "val_loss")  # ties: the lower loss
    assert single.objective("val_loss") == Objective("val_loss", "min")
    assert single.objective("accuracy", "min").mode == "min"  # --mode given: kept
    assert regression.objective("mae").mode == "min" and regression.objective("r2").mode == "max"
    with pytest.raises(ConfigError, match="--monitor 'mae' is not a metric of the single-label task"):
        single.objective("mae")
