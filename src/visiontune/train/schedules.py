"""Learning-rate multipliers within one phase (0 <= progress <= 1).

Written here rather than taken from torch/timm schedulers because a phase change (gradual)
restarts the schedule with new per-group peak LRs on the same optimizer, and a multiplier
of progress is all that needs.
"""

from __future__ import annotations

import math

from visiontune.config import TrainConfig

ONECYCLE_DIV = 25.0  # start at peak / 25 (fastai's div)
ONECYCLE_DIV_FINAL = 1e5  # end at peak / 1e5 (fastai's div_final)


def _cos(start: float, end: float, pct: float) -> float:
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * pct))


def lr_factor(t: TrainConfig, progress: float, epoch_in_phase: int) -> float:
    progress = min(max(progress, 0.0), 1.0)
    if t.schedule == "constant":
        return 1.0
    if t.schedule == "step":
        return t.gamma ** (epoch_in_phase // max(1, t.step_size))
    if t.schedule == "cosine":
        return _cos(1.0, 0.0, progress)
    warm = t.pct_start
    if progress < warm:
        return _cos(1.0 / ONECYCLE_DIV, 1.0, progress / warm)
    return _cos(1.0, 1.0 / ONECYCLE_DIV_FINAL, (progress - warm) / max(1e-8, 1.0 - warm))
