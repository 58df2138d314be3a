"""plan_run: `auto` options and the time budget resolved once, before training; training
refuses a config that no plan resolved (DESIGN rule 11). The advisor's choice, the budget's
plan and the batch size found are tested where they are decided (test_advice via
tests/selection/test_advisor.py, test_budget.py, tests/runtime/test_speed.py); here, that
they are decided in one place and that nothing unresolved reaches training."""

from __future__ import annotations

from pathlib import Path

import pytest

from visiontune.config import RunConfig
from visiontune.data.sources import resolve_inputs
from visiontune.planning.plan import plan_run
from visiontune.train.clock import Clock
from visiontune.train.session import train_run
from visiontune.train.setup import UnplannedRun, prepare_run, unresolved


def test_training_refuses_an_unresolved_config_and_names_what_is_unresolved(flat_data: Path, tmp_path: Path,
                                                                            tiny: dict) -> None:
    cfg, source = resolve_inputs(str(flat_data), None, None, dict(tiny, strategy="auto", batch_size="auto",
                                                                  time_budget=60, output=str(tmp_path / "r")))
    with pytest.raises(UnplannedRun, match=r"unresolved plan \(strategy 'auto'; batch_size 'auto'; time_budget 60 s "
                                           r"without a clock that keeps it\).*plan_run"):
        train_run(cfg, source)
    assert not (tmp_path / "r").exists()  # refused before any run directory
    with pytest.raises(UnplannedRun, match=r"\(batch_size 'auto'\)"):
        prepare_run(RunConfig.create(cfg, strategy="gradual"), source)
    assert unresolved(RunConfig.create(cfg, strategy="gradual", batch_size=4), Clock(60.0)) == []


def test_plan_run_resolves_the_batch_size_and_keeps_what_was_given(split_data: Path, tiny: dict) -> None:
    cfg, source = resolve_inputs(str(split_data), None, None, dict(tiny, batch_size="auto"))
    plan = plan_run(cfg, source)
    assert plan.cfg.train.batch_size == 2  # 20 training images: 8 steps per epoch at most 2 images each
    assert plan.budget is None and plan.clock.budget_s is None and plan.callbacks() == []
    assert unresolved(plan.cfg, plan.clock) == []
    given = RunConfig.create(cfg, batch_size=4)
    assert plan_run(given, source).cfg is given  # nothing to resolve: the config as it came


def test_too_few_labels_to_plan_a_budget_keep_it_on_the_clock(tmp_path: Path, tiny: dict) -> None:
    """A class of one image: no validation split, nothing to compare strategies with; the
    budget is not planned but the clock keeps it, and 'auto' is the probe."""
    from conftest import make_class_folders

    data = make_class_folders(tmp_path / "few", {"red": 6, "green": 1})
    cfg, source = resolve_inputs(str(data), None, None, dict(tiny, strategy="auto", time_budget=60))
    assert source.no_validation
    plan = plan_run(cfg, source, started=5.0)
    assert plan.cfg.strategy.name == "feature-extract" and plan.budget is None
    assert (plan.clock.budget_s, plan.clock.started) == (60.0, 5.0)


def test_the_batch_size_is_measured_on_random_weights(split_data: Path, tiny: dict,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The memory a step takes does not depend on the weights: measuring must not load (or
    download, on the budget's clock) the pretrained ones a second time. Offline with none
    cached, loading them is an error, so only a random-weights measurement gets through."""
    monkeypatch.setenv("VISIONTUNE_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(split_data.parent / "no-hub-cache"))
    cfg, source = resolve_inputs(str(split_data), None, None, dict(tiny, batch_size="auto", weights="pretrained"))
    assert plan_run(cfg, source).cfg.train.batch_size == 2
