"""Everything a run needs before its first epoch, as one typed object (`RunSetup`):
the process environment and device, the model and its preprocessing, the task, the plan
of phases, the optimizer, the per-phase data and the run's clock."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from visiontune.config import RunConfig
from visiontune.data.items import TRAIN, VALID, DataSource
from visiontune.data.preprocess import Preprocess
from visiontune.errors import ConfigError
from visiontune.models.classifier import Classifier, create_classifier
from visiontune.runtime import distributed
from visiontune.runtime.device import prepare_model, resolve_device, seed_everything
from visiontune.runtime.distributed import DistEnv
from visiontune.tasks.base import Task
from visiontune.tasks.catalog import make_task
from visiontune.train.clock import Clock
from visiontune.train.plan import Plan, build_optimizer, make_plan
from visiontune.train.rundata import RunData
from visiontune.train.strategies import AUTO

log = logging.getLogger(__name__)


@dataclass
class RunSetup:
    cfg: RunConfig  # as planned (planning/plan.py): nothing "auto" left in strategy or batch size
    model: Classifier
    preprocess: Preprocess
    task: Task
    plan: Plan
    optimizer: torch.optim.Optimizer
    data: RunData
    device: torch.device
    env: DistEnv
    note: str = ""  # what the setup changed that the run says in one line (too few labels to hold out validation)
    clock: Clock = field(default_factory=Clock)  # the run's time and budget (the data's feature extraction reads it)


def prepare_run(cfg: RunConfig, source: DataSource, resuming: bool = False, clock: Clock | None = None) -> RunSetup:
    """Model, preprocessing, task, plan, optimizer, per-phase data and device for `cfg` on
    `source`, timed by `clock` (default: a clock without a budget, from now). When
    resuming, the weights come from the checkpoint (none are loaded here). `cfg` is a
    plan's (planning/plan.plan_run): an unresolved one is refused (require_resolved)."""
    require_resolved(cfg)
    clock = clock if clock is not None else Clock()
    env = distributed.from_env()
    device = distributed.device_for(env, resolve_device(cfg.runtime.device))
    distributed.init(env, device)
    seed_everything(cfg.seed)  # the same initial weights in every process
    model_cfg = replace(cfg.model, weights="none") if resuming else cfg.model
    task = make_run_task(cfg, source)
    model, pre = create_classifier(model_cfg, task.num_outputs, task.warm_start_names())
    prepare_model(model, device, cfg.runtime.channels_last)
    plan = make_plan(model, cfg.strategy, cfg.train, converged_probe=_probe_applies(cfg, model, env),
                     keeps_bn_statistics=cfg.bn_modes()[1] == "eval")
    cfg, plan, note = _without_held_out(cfg, source, model, plan)
    _check_unlabeled(cfg, task, plan)
    optimizer = build_optimizer(model, plan, cfg.train)
    data = RunData(cfg, source, task, model, pre, plan, device, torch.Generator(), env, clock)
    return RunSetup(cfg, model, pre, task, plan, optimizer, data, device, env, note, clock)


def _without_held_out(cfg: RunConfig, source: DataSource, model: Classifier,
                      plan: Plan) -> tuple[RunConfig, Plan, str]:
    """Labels too few to hold out a validation split (`source.no_validation` says why):
    every image trains. A plan that begins with the converged probe keeps the probe alone
    (feature-extract), whose cross-validation is the run's validation (train/trainer.py):
    no held-out image could tell whether fine-tuning helps. Any other plan runs every epoch
    and keeps the last (restore_best and early stopping off: no held-out image can choose
    one). The third value is the one line a run says about it ("" when nothing changed)."""
    if not source.no_validation or source.split(VALID):
        return cfg, plan, ""
    n, why = len(source.split(TRAIN)), f"{source.no_validation}, so no validation split can be held out"
    if plan.phases[0].probe:
        skipped = f"; {cfg.strategy.name}'s fine-tuning is skipped" if len(plan.phases) > 1 else ""
        note = (f"{why}: all {n} images train, and the converged probe's cross-validation on them is the validation"
                f"{skipped} (label more, e.g. with `visiontune suggest`, or give a valid/ folder, to fine-tune)")
        cfg = RunConfig.create(cfg, strategy="feature-extract")
        return cfg, make_plan(model, cfg.strategy, cfg.train, converged_probe=True), note
    note = (f"{why}: all {n} images train for every epoch and the last epoch's weights are kept (nothing held out "
            "can choose an epoch or stop early; a plan that begins with the converged probe would be validated by "
            "its cross-validation)")
    return RunConfig.create(cfg, restore_best=False, patience=0), plan, note  # nothing measures an epoch: all run


def make_run_task(cfg: RunConfig, source: DataSource) -> Task:
    """The run's task over the source's classes, its options checked and what it learns
    from the training labels learnt (regression: their mean and std)."""
    o = cfg.outputs
    task = make_task(source.task, source.classes, {"threshold": o.threshold, "target_range": o.target_range,
                                                   "loss": o.loss})
    task.check(o.balance, o.label_smoothing)
    task.fit_labels([it.label for it in source.split(TRAIN)])
    return task


def _check_unlabeled(cfg: RunConfig, task: Task, plan: Plan) -> None:
    """--unlabeled works through the converged probe (frozen phases) or the consistency
    term (phases that train the backbone), on a task whose outputs say how sure they are."""
    if not cfg.data.unlabeled:
        return
    trains_body = any(on and not g.is_head for phase in plan.phases for on, g in zip(phase.trainable, plan.groups))
    if not trains_body and not any(phase.probe for phase in plan.phases):
        raise ConfigError(f"--unlabeled {cfg.data.unlabeled}: the pool joins the converged probe's fit or the "
                          "consistency term of phases that train the backbone, and this run has neither (strategy "
                          f"{cfg.strategy.name}, --probe {cfg.strategy.probe}); use --probe converged, or a strategy "
                          "that fine-tunes (gradual, finetune)")
    task.pseudo_targets(np.zeros((0, task.num_outputs)))  # a task without confidences refuses here, before any work


def _probe_applies(cfg: RunConfig, model: Classifier, env: DistEnv) -> bool:
    """The converged probe fits a linear head on eval-mode features of one process."""
    if cfg.strategy.probe != "converged":
        return False
    why = ("the head has a hidden layer" if cfg.model.head_hidden else
           "frozen BatchNorm statistics train (--frozen-bn train)" if cfg.strategy.frozen_bn != "eval" else "")
    if why:
        log.info("head-only phases train by SGD epochs: %s", why)
    return not why


class UnplannedRun(RuntimeError):
    """An internal error: training was given a config that no plan resolved (a caller that
    skipped planning/plan.plan_run), never a user's mistake."""


def unresolved(cfg: RunConfig, clock: Clock | None = None) -> list[str]:
    """What `cfg` (and the run's `clock`) leave for planning to resolve: `auto` strategy or
    batch size, a time budget that no clock keeps."""
    left = [f"{name} 'auto'" for name, value in (("strategy", cfg.strategy.name), ("batch_size", cfg.train.batch_size))
            if value == AUTO]
    if clock is not None and cfg.budget.time_budget and clock.budget_s is None:
        left.append(f"time_budget {cfg.budget.time_budget:g} s without a clock that keeps it")
    return left


def require_resolved(cfg: RunConfig, clock: Clock | None = None) -> None:
    """Refuse (UnplannedRun) a config with anything `unresolved`, naming it."""
    left = unresolved(cfg, clock)
    if left:
        raise UnplannedRun(f"training was given an unresolved plan ({'; '.join(left)}): resolve the config with "
                           "visiontune.planning.plan.plan_run(cfg, source) and train its RunPlan's cfg and clock")
