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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from visiontune.config import RunConfig
from visiontune.data import LabelFunc, load_items
from visiontune.errors import ConfigError


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
            num_iter: int = 100, plot: str | os.PathLike[str] | None = "lr_find.png", config: RunConfig | None = None,
            label_func: LabelFunc | None = None, **overrides: Any) -> LRFindResult:
    import torch

    from visiontune.api import prepare_run
    from visiontune.strategy import apply_phase, set_batchnorm_modes
    from visiontune.trainer import to_device

    if not 0 < start_lr < end_lr:
        raise ConfigError(f"need 0 < start_lr < end_lr, got {start_lr}, {end_lr}")
    if data is not None:
        overrides["path"] = str(data)
    cfg = RunConfig.create(config, **overrides)
    source = load_items(cfg.data, cfg.seed, label_func)
    model, _, plan, optimizer, run_data, device = prepare_run(cfg, source)
    apply_phase(model, optimizer, plan, 0)
    phase_data = run_data(0)
    net = model.head if phase_data.on_features else model
    head_lr = max(plan.phases[0].lrs)
    ratios = [g["peak_lr"] / head_lr for g in optimizer.param_groups]
    criterion = torch.nn.CrossEntropyLoss()
    lrs: list[float] = []
    losses: list[float] = []
    avg, best = 0.0, math.inf
    model.train()
    set_batchnorm_modes(model, *cfg.bn_modes())
    batches = _cycle(phase_data.train)
    for i in range(num_iter):
        lr = start_lr * (end_lr / start_lr) ** (i / max(1, num_iter - 1))
        for g, r in zip(optimizer.param_groups, ratios):
            g["lr"] = lr * r
        x, y = next(batches)
        loss = criterion(net(to_device(x, device, cfg.train.channels_last)), y.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        avg = 0.98 * avg + 0.02 * loss.item()
        smoothed = avg / (1 - 0.98 ** (i + 1))
        if not math.isfinite(smoothed):
            break
        lrs.append(lr)
        losses.append(smoothed)
        best = min(best, smoothed)
        if smoothed > 4 * best and i > 10:
            break
    if len(lrs) < 3:
        raise ConfigError("the loss diverged at once; lower start_lr")
    steep, valley = suggest(lrs, losses)
    result = LRFindResult(steep, valley, lrs, losses)
    if plot:
        result.plot = str(_plot(Path(plot), lrs, losses, steep))
    return result


def _cycle(loader: Any) -> Any:
    while True:
        yield from loader


def _plot(path: Path, lrs: list[float], losses: list[float], suggested: float) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(lrs, losses)
    ax.axvline(suggested, color="red", linestyle="--", label=f"suggested {suggested:.2e}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (head)")
    ax.set_ylabel("smoothed training loss")
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
