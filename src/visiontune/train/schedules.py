"""Learning-rate multipliers within one phase (0 <= progress <= 1).

"wsd" (warmup-stable-decay; Hägele et al. 2024, "Scaling Laws and Compute-Optimal Training
Beyond Fixed Training Durations"; MiniCPM): a short warm-up, the peak LR held, then a
cosine decay over the last WSD_DECAY of the phase. Its length can be decided late: under
a deadline (--time-budget) the clock (train/clock.py) gives it progress in time, not steps, so the decay
starts when the time left equals the decay's length, whatever the epochs turned out to cost.
The weights it exists for are those after (or inside) its decay: `keepable` says which a
run may keep (train/callbacks.Checkpoint), never those warming up or at the peak LR.

Written here rather than taken from torch/timm schedulers because a phase change (gradual)
restarts the schedule with new per-group peak LRs on the same optimizer, and a multiplier
of progress is all that needs.
"""

from __future__ import annotations

import math

from visiontune.config import TrainConfig

ONECYCLE_DIV = 25.0  # start at peak / 25 (fastai's div)
ONECYCLE_DIV_FINAL = 1e5  # end at peak / 1e5 (fastai's div_final)
WSD_WARMUP, WSD_DECAY = 0.1, 0.2  # shares of the phase: warm-up, and the decay at its end (Hägele et al.: 20%)


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
    if t.schedule == "wsd":
        return wsd_factor(progress)
    warm = t.pct_start
    if progress < warm:
        return _cos(1.0 / ONECYCLE_DIV, 1.0, progress / warm)
    return _cos(1.0, 1.0 / ONECYCLE_DIV_FINAL, (progress - warm) / max(1e-8, 1.0 - warm))


def wsd_factor(progress: float) -> float:
    """Warmup-stable-decay at `progress` (0..1) through the phase: from peak / ONECYCLE_DIV
    up to the peak over WSD_WARMUP, the peak, then down to peak / ONECYCLE_DIV_FINAL over the
    last WSD_DECAY."""
    progress = min(max(progress, 0.0), 1.0)
    if progress < WSD_WARMUP:
        return _cos(1.0 / ONECYCLE_DIV, 1.0, progress / WSD_WARMUP)
    if progress < 1.0 - WSD_DECAY:
        return 1.0
    return _cos(1.0, 1.0 / ONECYCLE_DIV_FINAL, (progress - (1.0 - WSD_DECAY)) / WSD_DECAY)


def keepable(schedule: str, progress: float) -> bool:
    """Whether weights reached at `progress` (0..1) through a phase may be the ones a run
    keeps: under warmup-stable-decay only once its decay has begun (at the peak LR the
    weights bounce around a wide basin; the decay is what settles them); under every other
    schedule, any epoch's."""
    return schedule != "wsd" or progress >= 1.0 - WSD_DECAY
