"""`--time-budget`: the best model this machine can train in the time given.

1. Measure (planning/costs.py): a few real fine-tuning steps and feature batches.
2. Ask the advisor which strategy the data calls for (it knows these costs too).
3. Plan: the converged probe always fits first (features + one fit); when the advisor
   calls for fine-tuning, `gradual` at the backbone's size, or a smaller image size when
   fewer than MIN_EPOCHS would fit by the measured costs, or the probe alone when no size
   gives MIN_EPOCHS (itself at a smaller size when its features at the backbone's size do
   not fit). Fine-tuning runs a warmup-stable-decay schedule whose length is decided late
   (train/schedules.py): as many epochs as the time holds (at most MAX_EPOCHS), the
   decay starting when the time left equals its length, re-planned from the epoch times
   measured as the run goes, so an estimate that was off costs no unused time; or
   earlier, when validation has not improved for 2 x patience epochs at the peak
   (callbacks.EarlyStopping): the run then ends after the decay, and says when the
   converged probe is what fine-tuning did not beat.
4. Train with a deadline: an epoch that would end after it is not started, an epoch
   running late is cut short (validated, then stopped), feature extraction stops at the
   deadline (the probe fits the images extracted, a random sample), the probe's C search
   stops trying values when the rest would not fit, and the best weights by validation are
   kept, wherever the deadline falls. `--resume` keeps the deadline: the budget less the
   time the run had used over every session, counted from the first start by the run's
   clock (train/clock.py: its record, clock.json, is kept up to date while the run goes,
   so the time before the first checkpoint and after the last one counts). The plan and
   its reasons go to the log and `time_budget.json` (written when training starts,
   completed with the time taken at the end).

`cv`, `compare`, `advise` and `lr-find` refuse a budget (`RunConfig.refuse_time_budget`): they
measure configurations.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from visiontune.config import RunConfig
from visiontune.data.items import TRAIN, VALID, DataSource
from visiontune.data.splits import strata_of, stratified_sample
from visiontune.errors import ConfigError
from visiontune.planning.advice import advise_source
from visiontune.planning.costs import Costs, measure_costs, uncached_images

log = logging.getLogger(__name__)

MIN_EPOCHS, MAX_EPOCHS = 3, 30  # fine-tuning epochs worth planning; more than MAX rarely helps
SIZE_STEPS = (1.0, 0.75, 0.5)  # image sizes tried, as fractions of the backbone's own
SAFETY = 0.97  # plan to end before the budget: estimates drift a little
ADVISOR_SHARE = 0.25  # of the budget left after measuring, at most, for the advisor
ADVISOR_PIXELS = 0.25  # the advisor's raw-pixel baseline reads every image: about this much of an extraction
ADVISOR_FIT_FACTOR = 1.3  # the advisor's converged probe: the search and fit on every row, then 5 fold fits at its C and 5 on half their rows (the learning curve)
MIN_ADVISOR_IMAGES = 200
MIN_PROBE_IMAGES = 200  # fewer images' features in the time: the budget is too short
RESERVE_MARGIN_S = 5.0  # besides the probe's fit, kept after feature extraction (validation, saving)


@dataclass
class BudgetPlan:
    budget_s: float
    strategy: str
    epochs: int
    image_size: int
    expected_s: float
    reasons: list[str] = field(default_factory=list)
    reserve_s: float = 0.0  # feature extraction stops this long before the deadline: the probe's fit needs it

    schedule: str | None = None  # "wsd" for fine-tuning: its length follows the clock
    finish_s: float = 0.0  # training stops this long before the deadline: the OOD score's pass needs it

    def overrides(self) -> dict[str, Any]:
        return {"strategy": self.strategy, "epochs": self.epochs, "image_size": self.image_size,
                **({"schedule": self.schedule} if self.schedule else {})}

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def plan_budget(cfg: RunConfig, source: DataSource, budget_s: float, started: float) -> BudgetPlan:
    """Measure, ask the advisor (on as many images as ADVISOR_SHARE of the budget allows:
    its features are the probe's, it caches them), count what is still to extract, plan."""
    costs = measure_costs(cfg, source)
    sample = advisor_sample(source, costs, budget_s - (time.perf_counter() - started), cfg.seed)
    advice = advise_source(cfg, sample, costs)
    costs = replace(costs, images_to_extract=uncached_images(cfg, source))  # the advisor cached some
    spent = time.perf_counter() - started
    # the advisor's reasons without its cost note: the plan states the costs as they are now
    why = advice.explanation + (f" (the advisor looked at a stratified sample of {len(sample.items)} of "
                                f"{len(source.items)} images, what the budget allows)" if sample is not source else "")
    return decide_plan(costs, advice.strategy, why, budget_s, spent, cfg.strategy.freeze_epochs)


def advisor_sample(source: DataSource, costs: Costs, left_s: float, seed: int) -> DataSource:
    """`source`, or a stratified sample of its train + valid images small enough for the
    advisor (features of the uncached ones, then raw pixels of all for its baseline, about
    ADVISOR_PIXELS of an extraction) to take at most ADVISOR_SHARE of the time left."""
    pool = [it for it in source.items if it.split in (TRAIN, VALID)]
    fit_per_image = costs.probe_fit_s / max(1, costs.train_images) * ADVISOR_FIT_FACTOR  # its out-of-fold probe
    per_image = costs.extract_per_image * (costs.images_to_extract / max(1, len(pool)) + ADVISOR_PIXELS) + fit_per_image
    fits = int(ADVISOR_SHARE * max(0.0, left_s) / max(per_image, 1e-9))
    if fits >= len(pool):
        return source
    rows = stratified_sample(strata_of([it.label for it in pool]), max(MIN_ADVISOR_IMAGES, fits), seed)
    chosen = pool if rows is None else [pool[i] for i in rows]
    log.info("time budget: the advisor looks at %d of %d images", len(chosen), len(pool))
    return replace(source, items=chosen)


def decide_plan(costs: Costs, advised: str, why: str, budget_s: float, spent: float,
                head_epochs: int = 1) -> BudgetPlan:
    """The plan for `advised` within `budget_s` of which `spent` are gone (pure: testable);
    `head_epochs`: gradual's head-only epochs before the fine-tuning ones."""
    left = budget_s * SAFETY - spent
    reasons = [f"measured {costs.describe()}", f"advisor: {advised} ({why})"]
    sizes = [costs.input_size] + [max(32, int(round(costs.input_size * f / 32)) * 32) for f in SIZE_STEPS[1:]]
    if advised != "feature-extract":
        plan = _fine_tuning_plan(costs, sizes, left, budget_s, spent, head_epochs, reasons)
        if plan is not None:
            return plan
        reasons.append(f"fewer than {MIN_EPOCHS} fine-tuning epochs fit even at {sizes[-1]} px: the converged probe "
                       "alone")
    else:
        reasons.append("the converged probe is what the data calls for; the budget is not the limit")
    return _probe_plan(costs, sizes, left, budget_s, spent, reasons)


def _probe_plan(costs: Costs, sizes: list[int], left: float, budget_s: float, spent: float,
                reasons: list[str]) -> BudgetPlan:
    """The probe at the backbone's size if it fits, else at a smaller one; else at the
    smallest on the random sample of images whose features fit (extraction stops at the
    deadline less the fit's time), when that is at least MIN_PROBE_IMAGES."""
    reserve = costs.probe_fit_s + RESERVE_MARGIN_S
    for size in sizes:
        if costs.probe_seconds(size) <= left:
            if size != costs.input_size:
                reasons.append(f"the probe needs ~{costs.probe_seconds():.0f} s at {costs.input_size} px: features at "
                               f"{size} px (~{costs.probe_seconds(size):.0f} s)")
            return BudgetPlan(budget_s, "feature-extract", 1, size, spent + costs.probe_seconds(size), reasons, reserve)
    size, todo = sizes[-1], costs.train_images + costs.valid_images
    extract = (costs.probe_seconds(size) - costs.probe_fit_s) / max(1, todo)  # an image's features at `size`
    fit_per_image = costs.probe_fit_s / max(1, todo)  # the fit grows with the images it fits
    fit = int(max(0.0, left - RESERVE_MARGIN_S) / max(1e-9, extract + fit_per_image))
    reserve = fit * fit_per_image + RESERVE_MARGIN_S
    if fit < MIN_PROBE_IMAGES:
        raise ConfigError(f"the time budget of {budget_s:.0f} s is too short here: measuring and advising took "
                          f"{spent:.0f} s and the converged probe needs ~{costs.probe_seconds(size):.0f} s even at "
                          f"{size} px (features of {fit} images would fit); raise --time-budget")
    reasons.append(f"the probe needs ~{costs.probe_seconds(size):.0f} s even at {size} px: features of about {fit} of "
                   f"{todo} images fit, and the probe fits the random sample extracted by then")
    return BudgetPlan(budget_s, "feature-extract", 1, size, spent + left, reasons, reserve)


def _fine_tuning_plan(costs: Costs, sizes: list[int], left: float, budget_s: float, spent: float, head_epochs: int,
                      reasons: list[str]) -> BudgetPlan | None:
    """gradual at the largest size where the probe and at least MIN_EPOCHS fine-tuning
    epochs fit (as many as fit, at most MAX_EPOCHS), or None."""
    for size in sizes:
        probe, epoch, finish = costs.probe_seconds(size), costs.epoch_seconds(size), costs.finish_seconds(size)
        epochs = min(MAX_EPOCHS, math.floor((left - probe - finish) / epoch))
        if epochs >= MIN_EPOCHS:
            reasons.append(f"about {epochs} fine-tuning epochs of ~{epoch:.0f} s at {size} px fit after the probe "
                           f"(~{probe:.0f} s)" + ("" if epochs < MAX_EPOCHS else f" (capped at {MAX_EPOCHS})")
                           + "; warmup-stable-decay by the clock: as many epochs as the time holds, the decay in its "
                             f"last fifth; ~{finish:.0f} s kept for the out-of-distribution score's pass")
            expected = spent + probe + epochs * epoch + finish if epochs == MAX_EPOCHS else spent + left
            return BudgetPlan(budget_s, "gradual", MAX_EPOCHS + head_epochs, size, expected, reasons,
                              costs.probe_fit_s + RESERVE_MARGIN_S, schedule="wsd", finish_s=finish)
    return None
