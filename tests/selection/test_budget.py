"""--time-budget: the plan for each situation, a run that ends on time, and advice that
weighs what fine-tuning costs here."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

import visiontune as vt
from visiontune.selection.advisor import weigh_cost
from visiontune.selection.budget import MAX_EPOCHS, decide_plan
from visiontune.selection.costs import Costs
from visiontune.train.trainer import Trainer

# 400 train + 100 valid images at 224 px: 20 ms per image to extract, 100 ms per training step image
COSTS = Costs(extract_per_image=0.02, step_per_image=0.1, images_to_extract=500, train_images=400,
              valid_images=100, input_size=224)


def test_the_plan_fits_fine_tuning_epochs_after_the_probe() -> None:
    probe, epoch = COSTS.probe_seconds(), COSTS.epoch_seconds()
    assert probe == pytest.approx(500 * 0.02 + 2.0 + 0.002 * 400) and epoch == pytest.approx(42.0)
    plan = decide_plan(COSTS, "gradual", "why", budget_s=600, spent=20)
    expected = int((600 * 0.97 - 20 - probe) // epoch)
    assert (plan.strategy, plan.epochs, plan.image_size) == ("gradual", expected + 1, 224)
    assert plan.expected_s <= 600 and any("fine-tuning epochs" in r for r in plan.reasons)


def test_a_tight_budget_shrinks_the_image_then_falls_back_to_the_probe() -> None:
    small = decide_plan(COSTS, "gradual", "why", budget_s=120, spent=5)  # 3 epochs at 224 px do not fit
    assert small.strategy == "gradual" and small.image_size < 224 and small.epochs >= 4
    probe_only = decide_plan(COSTS, "gradual", "why", budget_s=40, spent=5)
    assert (probe_only.strategy, probe_only.epochs) == ("feature-extract", 1)
    assert "the converged probe alone" in probe_only.reasons[-1]
    with pytest.raises(vt.ConfigError, match="too short"):
        decide_plan(COSTS, "gradual", "why", budget_s=10, spent=5)
    generous = decide_plan(COSTS, "finetune", "why", budget_s=10**6, spent=5)
    assert generous.epochs == MAX_EPOCHS + 1
    assert decide_plan(COSTS, "feature-extract", "why", 600, 5).strategy == "feature-extract"


def test_advice_prefers_the_probe_when_fine_tuning_cannot_gain_enough() -> None:
    strategy, reason = weigh_cost("gradual", "similar, data enough", probe=0.985, costs=COSTS)
    assert strategy == "feature-extract" and "42 s per epoch" in reason and "1.5 points" in reason
    assert weigh_cost("gradual", "r", probe=0.90, costs=COSTS) == ("gradual", "r")


def test_a_run_with_a_time_budget_ends_on_time(flat_data: Path, tmp_path: Path, tiny: dict,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    real = Trainer.train_step

    def slow(self, net, x, y, **kw):  # a slow machine: 0.15 s per step
        time.sleep(0.15)
        return real(self, net, x, y, **kw)

    monkeypatch.setattr(Trainer, "train_step", slow)
    from visiontune.selection import budget

    real_advice = budget.advise_source

    def fine_tune_please(cfg, source, costs=None):  # the red/green probe is perfect; make the advisor ask for more
        advice = real_advice(cfg, source, costs)
        advice.strategy = "gradual"
        return advice

    monkeypatch.setattr(budget, "advise_source", fine_tune_please)
    real_epoch = Costs.epoch_seconds
    monkeypatch.setattr(Costs, "epoch_seconds", lambda self, size=None: real_epoch(self, size) / 4)  # optimistic
    started = time.perf_counter()
    r = vt.fit(flat_data, **dict(tiny, time_budget="15s", trainable_bn="eval", output=str(tmp_path / "r")))
    took = time.perf_counter() - started
    plan = json.loads((Path(r.run_dir) / "time_budget.json").read_text())
    assert plan["strategy"] == "gradual" and plan["epochs"] >= 4 and plan["reasons"]
    assert len(r.history) < plan["epochs"]  # the plan was too optimistic: the deadline stopped the run
    assert 0.9 * 15 <= took <= 15 * 1.05  # it used the budget, and ended on time
    assert plan["budget_s"] == 15
    assert vt.RunConfig.create(None, time_budget="1h30m").train.time_budget == 5400.0
