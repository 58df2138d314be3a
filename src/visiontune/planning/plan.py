"""`plan_run`: a run's `auto` options and its time budget, resolved once before training.

`--strategy auto` becomes the advisor's choice on the train and valid images
(planning/advice.py; test images are never looked at), `--time-budget` the planner's
strategy, epochs, image size and schedule with the clock that keeps the deadline
(planning/budget.py), and `--batch-size auto` the largest batch whose training step fits
the device at the planned image size (runtime/batchsize.py), in that order. `train_run`
and `prepare_run` take the plan's config and refuse one left unresolved
(train/setup.require_planned). Every caller plans here: `fit`, each fold of `cv`, each
strategy of `compare`, `lr-find`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import Any

from visiontune.config import RunConfig
from visiontune.data.items import TRAIN, DataSource
from visiontune.errors import ConfigError
from visiontune.models.classifier import create_classifier
from visiontune.planning.advice import advise_source
from visiontune.planning.budget import BudgetPlan, plan_budget
from visiontune.planning.costs import measure_costs
from visiontune.rundir import RunDir
from visiontune.runtime import distributed
from visiontune.runtime.batchsize import auto_batch_size, free_device_memory
from visiontune.runtime.device import prepare_model, resolve_device, resolve_precision
from visiontune.train.callbacks import Callback
from visiontune.train.clock import Clock
from visiontune.train.setup import make_run_task
from visiontune.train.strategies import AUTO

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunPlan:
    """What `train_run` is given: the config with nothing left to resolve, the run's clock
    (its budget and the probe's reserve) and, under a budget, the planner's plan."""

    cfg: RunConfig
    clock: Clock
    budget: BudgetPlan | None = None

    def callbacks(self) -> list[Callback]:
        """The plan's own callbacks: under a budget, the writer of time_budget.json."""
        return [PlanWriter(self.budget)] if self.budget is not None else []

    def finish(self, run_dir: str) -> None:
        """A budgeted plan's time_budget.json completed with the time taken."""
        if self.budget is not None:
            RunDir(run_dir).write_time_budget({**self.budget.as_dict(),
                                               "actual_s": time.perf_counter() - self.clock.started})


def plan_run(cfg: RunConfig, source: DataSource, started: float | None = None) -> RunPlan:
    """Resolve `cfg`'s strategy, time budget and batch size on `source`; the clock counts
    from `started` (time.perf_counter(); default: now). With too few labels to hold out a
    validation split a budget is not planned (nothing to compare strategies with): the
    clock keeps it and the strategy resolves as without one."""
    started = time.perf_counter() if started is None else started
    budget = float(cfg.budget.time_budget) if cfg.budget.time_budget else None
    plan = None
    if budget and not source.no_validation:
        plan = _budget_plan(cfg, source, budget, started)
        cfg, clock = RunConfig.create(cfg, **plan.overrides()), Clock(budget, started, reserve_s=plan.reserve_s,
                                                                    finish_s=plan.finish_s)
    else:
        cfg, clock = resolve_strategy(cfg, source), Clock(budget, started)
    return RunPlan(resolve_batch_size(cfg, source), clock, plan)


def _budget_plan(cfg: RunConfig, source: DataSource, budget: float, started: float) -> BudgetPlan:
    """--time-budget: measure, ask the advisor, plan (planning/budget.py)."""
    if distributed.from_env().parallel:  # each process would judge its own clock: their steps could part ways
        raise ConfigError("--time-budget plans for one process; under torchrun with several processes leave it "
                          "out and set --epochs")
    plan = plan_budget(cfg, source, budget, started)
    log.info("time budget %.0f s: %s for %d epochs at %d px (expected %.0f s): %s", budget, plan.strategy,
             plan.epochs, plan.image_size, plan.expected_s, "; ".join(plan.reasons))
    return plan


def resolve_strategy(cfg: RunConfig, source: DataSource) -> RunConfig:
    """`cfg` with strategy 'auto' replaced by the advisor's choice on `source`'s train and
    valid images (test images are never looked at); other strategies unchanged."""
    if cfg.strategy.name != AUTO:
        return cfg
    if source.no_validation:  # no fold could validate on every class: nothing to compare strategies with
        log.info("advisor: feature-extract (%s: too few labels to measure and compare strategies)",
                 source.no_validation)
        return RunConfig.create(cfg, strategy="feature-extract")
    advice = advise_source(cfg, source, measure_costs(cfg, source))
    log.info("advisor: %s", advice.described())
    return RunConfig.create(cfg, strategy=advice.strategy)


def resolve_batch_size(cfg: RunConfig, source: DataSource) -> RunConfig:
    """`cfg` with batch_size 'auto' replaced by the largest that fits the device: the run's
    model (its task's head) at its image size and precision, capped by the training images
    (runtime/batchsize.auto_batch_size); under torchrun each process takes batch_size /
    world_size, so the size found is per process times the world size."""
    if cfg.train.batch_size != "auto":
        return cfg
    env = distributed.from_env()
    device = distributed.device_for(env, resolve_device(cfg.runtime.device))
    task = make_run_task(cfg, source)
    # random weights: the memory a step takes does not depend on them, and pretrained ones
    # would be loaded (or downloaded) a second time, on the budget's clock
    model, pre = create_classifier(replace(cfg.model, weights="none"), task.num_outputs)
    prepare_model(model, device, cfg.runtime.channels_last)
    found = auto_batch_size(model, pre.input_size, len(source.split(TRAIN)), device, cfg.runtime.channels_last,
                            resolve_precision(cfg.runtime.precision, device))
    del model
    free_device_memory(device)
    return RunConfig.create(cfg, batch_size=found * env.world_size if env.launched else found)


class PlanWriter(Callback):
    """time_budget.json (the plan) into the run directory when training starts, so a run
    killed on the way and resumed still has it (completed with the time taken at the end)."""

    def __init__(self, plan: BudgetPlan) -> None:
        self.plan = plan

    def on_fit_start(self, trainer: Any) -> None:
        if trainer.env.is_main:
            RunDir(trainer.run_dir).write_time_budget(self.plan.as_dict())
