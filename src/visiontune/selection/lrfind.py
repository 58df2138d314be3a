"""The learning-rate range test (Smith 2015; fastai's `lr_find`).

The first phase of the chosen strategy is set up as `fit` would; the LR grows
exponentially from `start_lr` to `end_lr` over at most `num_iter` steps (every group keeps
its ratio to the head's LR) while the smoothed loss is recorded; it stops when the loss
exceeds 4x its minimum. Suggestion: the LR of steepest descent of the smoothed loss,
before its minimum.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from visiontune.config import RunConfig
from visiontune.data.items import LabelFunc
from visiontune.data.sources import resolve_inputs
from visiontune.errors import ConfigError
from visiontune.planning.plan import plan_run
from visiontune.plots import save_lr_curve
from visiontune.runtime.device import to_device
from visiontune.runtime.inference import progress
from visiontune.train.setup import prepare_run
from visiontune.train.trainer import Trainer


@dataclass
class LRFindResult:
    suggested_lr: float
    min_loss_lr: float
    lrs: list[float] = field(repr=False)
    losses: list[float] = field(repr=False)
    plot: str | None = None


def suggest(lrs: list[float], losses: list[float]) -> tuple[float, float]:
    """(steepest-descent LR before the loss minimum, LR at the minimum / 10)."""
    i_min = int(np.argmin(losses))
    if i_min < 2:
        return lrs[i_min], lrs[i_min] / 10
    slopes = np.gradient(np.asarray(losses[: i_min + 1]), np.log10(np.asarray(lrs[: i_min + 1])))
    return float(lrs[int(np.argmin(slopes))]), lrs[i_min] / 10


def lr_find(data: str | os.PathLike[str] | None = None, *, start_lr: float = 1e-7, end_lr: float = 10.0,
            num_iter: int = 100, plot: str | os.PathLike[str] | bool | None = True,
            config: RunConfig | None = None, label_func: LabelFunc | None = None, **overrides: Any) -> LRFindResult:
    """Sweep the first phase's LR exponentially; each step is the Trainer's own (precision,
    class weights, label smoothing, micro-batching after out-of-memory). `plot`: True saves
    the curve as `<output>/lr_find.png` (the folder runs go to, never the current one), a
    path saves it there, None/False saves none."""
    if not 0 < start_lr < end_lr:
        raise ConfigError(f"need 0 < start_lr < end_lr, got {start_lr}, {end_lr}")
    RunConfig.create(config, **overrides).refuse_time_budget("lr-find", "measures the loss over a range of "
                                                                        "learning rates")
    cfg, source = resolve_inputs(data, config, label_func, overrides)
    setup = prepare_run(plan_run(cfg, source).cfg, source)
    try:
        lrs, losses = sweep(Trainer(setup, []), start_lr, end_lr, num_iter)
    finally:
        setup.data.release()  # the loaders' kept workers end here
    if len(lrs) < 3:
        raise ConfigError("the loss diverged at once; lower start_lr")
    steep, valley = suggest(lrs, losses)
    result = LRFindResult(steep, valley, lrs, losses)
    if plot:
        target = Path(cfg.output) / "lr_find.png" if plot is True else Path(plot)
        target.parent.mkdir(parents=True, exist_ok=True)
        result.plot = str(save_lr_curve(target, lrs, losses, steep))
    return result


def sweep(trainer: Trainer, start_lr: float, end_lr: float, num_iter: int) -> tuple[list[float], list[float]]:
    """(head LRs, smoothed losses) of training steps at exponentially growing LRs (every
    group keeps its ratio to the head's); stops when the loss exceeds 4x its minimum. The
    steps show a progress bar (stderr, on a terminal) unless the run's progress is off."""
    trainer.enter_phase(0)
    data = trainer.data.for_phase(0)
    net = trainer.net_for(data)
    head_lr = max(trainer.plan.phases[0].lrs)
    ratios = [g["peak_lr"] / head_lr for g in trainer.optimizer.param_groups]
    trainer.train_mode()
    lrs: list[float] = []
    losses: list[float] = []
    avg, best = 0.0, math.inf
    batches = _cycle(data.train)
    steps = progress(range(num_iter), trainer.cfg.runtime.progress, "lr-find", num_iter)
    for i in steps:
        lr = start_lr * (end_lr / start_lr) ** (i / max(1, num_iter - 1))
        for g, r in zip(trainer.optimizer.param_groups, ratios):
            g["lr"] = lr * r
        x, y, *_ = next(batches)  # (images, targets, rows)
        loss = trainer.train_step(net, to_device(x, trainer.device, trainer.cfg.runtime.channels_last),
                                  y.to(trainer.device))
        avg = 0.98 * avg + 0.02 * loss
        smoothed = avg / (1 - 0.98 ** (i + 1))
        if not math.isfinite(smoothed):
            break
        lrs.append(lr)
        losses.append(smoothed)
        best = min(best, smoothed)
        if smoothed > 4 * best and i > 10:
            break
    getattr(steps, "close", lambda: None)()  # the bar goes when the test stops early too
    return lrs, losses


def _cycle(loader: Any) -> Iterator[Any]:
    while True:
        yield from loader
