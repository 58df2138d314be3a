"""The public face: fit, evaluate, predict, inspect. The CLI is a thin layer over these."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from visiontune.analysis.inspection import describe
from visiontune.bundle import load_bundle
from visiontune.config import RunConfig, ineffective
from visiontune.data.items import LabelFunc
from visiontune.data.sources import load_items, resolve_inputs
from visiontune.errors import VisiontuneError
from visiontune.models.classifier import create_classifier
from visiontune.planning.budget import RESERVE_MARGIN_S
from visiontune.planning.plan import plan_run, resolve_batch_size
from visiontune.prediction import (  # noqa: F401 - evaluate and predict live there (no training stack); re-exported
    EvalResult,
    Prediction,
    PredictionStream,
    evaluate,
    predict,
    predict_stream,
)
from visiontune.rundir import RunDir
from visiontune.train.callbacks import Callback
from visiontune.train.clock import Clock
from visiontune.train.session import FitResult, train_run

log = logging.getLogger(__name__)

__all__ = ["EvalResult", "FitResult", "Prediction", "PredictionStream", "evaluate", "fit", "inspect", "predict",
           "predict_stream"]


def fit(
    data: str | os.PathLike[str] | None = None,
    *,
    config: RunConfig | None = None,
    label_func: LabelFunc | None = None,
    resume: str | os.PathLike[str] | None = None,
    callbacks: list[Callback] | None = None,
    started: float | None = None,
    **overrides: Any,
) -> FitResult:
    """Fine-tune a pretrained backbone on the images at `data`; return the run's results.

    Options are RunConfig field names, e.g. `fit("images/", strategy="gradual", epochs=5,
    backbone="timm:resnet50", lr=1e-3)`. `label_func(path) -> label` takes labels from file
    names (fastai style). `resume="runs/<run>"` continues an interrupted run from its last
    checkpoint (pass `epochs=` to extend it; a run with `time_budget` keeps what is left of
    it, counted from its first start). `started` (time.perf_counter()): when the run's
    clock began (default: now; the CLI passes when the command began).
    """
    started = time.perf_counter() if started is None else started
    if resume is not None:
        return _resume(Path(resume), data, label_func, callbacks, overrides, started)
    cfg, source = resolve_inputs(data, config, label_func, overrides)
    plan = plan_run(cfg, source, started)  # strategy, batch size and time budget resolved once
    for line in ineffective(plan.cfg, overrides):  # e.g. --epochs for feature-extract's converged probe
        log.warning(line)
    result = train_run(plan.cfg, source, callbacks=[*(callbacks or []), *plan.callbacks()], clock=plan.clock)
    plan.finish(result.run_dir)
    return result


def _resume(run_dir: Path, data: str | os.PathLike[str] | None, label_func: LabelFunc | None,
            callbacks: list[Callback] | None, overrides: dict[str, Any], started: float) -> FitResult:
    """Continue the run in `run_dir` from its last checkpoint, or from the start when it
    has none; under a budget its clock goes on from the time the run used (clock.json)."""
    run = RunDir(run_dir)
    saved = run.read_config()
    if saved is None:
        raise VisiontuneError(f"{str(run_dir)!r} is not a run directory (no {run.config_file.name})")
    if data is not None:
        overrides["path"] = str(data)
    cfg = RunConfig.create(saved, **overrides)
    ckpt = run.read_checkpoint()
    if ckpt is None:  # killed before its first epoch ended: start that run again, in place
        log.warning("%s has no checkpoint yet: training it from the beginning", run_dir)
    plan = run.read_time_budget() if cfg.budget.time_budget else {}
    clock = Clock.resumed(run_dir, cfg.budget.time_budget, started, float(plan.get("reserve_s", RESERVE_MARGIN_S)),
                          float(plan.get("finish_s", 0.0)))
    source = load_items(cfg.data, cfg.seed, label_func, cache_dir=cfg.runtime.cache_dir)
    result = train_run(resolve_batch_size(cfg, source), source, run_dir=run_dir, ckpt=ckpt, callbacks=callbacks,
                       clock=clock)  # the saved plan goes on: only a batch size given again as 'auto' is new
    if cfg.budget.time_budget:  # the plan (if it was written), the budget now, the time taken over every session
        given = {"planned_for_s": plan["budget_s"]} if plan.get("budget_s", cfg.budget.time_budget) != \
            cfg.budget.time_budget else {}
        run.write_time_budget({**plan, **given, "budget_s": cfg.budget.time_budget, "actual_s": result.seconds,
                               "resumed": True})
    return result



# -- inspect ----------------------------------------------------------------------------
def inspect(target: str, *, strategy: str = "gradual", num_classes: int = 2, depth: int = 2,
            weights: str = "none", parameters: bool = False, **overrides: Any) -> str:
    """Text view of a model: module tree with parameter counts, layer groups and which of
    them train in each phase of `strategy`, and every optimizer group's learning rate;
    with `parameters=True` also every named parameter and what `state_dict()` holds.

    `target` is a backbone name (built with `weights`, random by default: the structure
    does not depend on them) or a run directory.
    """
    if Path(target).is_dir() or target.endswith(".safetensors"):
        bundle = load_bundle(target)
        cfg = RunConfig.create(bundle.config or RunConfig(), strategy=overrides.pop("strategy", strategy),
                               **overrides)
        return describe(bundle.model, cfg, depth, parameters)
    cfg = RunConfig.create(None, backbone=target, weights=weights, strategy=strategy, **overrides)
    model, _ = create_classifier(cfg.model, num_classes)
    return describe(model, cfg, depth, parameters)

