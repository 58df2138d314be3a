"""What "better" means for a run: one metric, the direction in which it improves, and the
metric that breaks its ties.

The Task knows each of its metrics' direction (`Task.objective` builds one); early
stopping, the best checkpoint and the trainer's choice between the raw and the EMA
weights all compare by the same `Objective`. A score that moves by whole images
(accuracy, macro-F1 on a small validation split) ties often: two epochs with the same
accuracy are told apart by the lower validation loss (`tie_break`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from visiontune.errors import ConfigError

MODES = ("min", "max")


@dataclass(frozen=True)
class Objective:
    """`metric` and whether it is minimised ("min") or maximised ("max"); between two
    equal values of it, the lower `tie_break` (a loss; "" for none) is better."""

    metric: str
    mode: str
    tie_break: str = ""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"mode must be 'min' or 'max', got {self.mode!r}")

    def value(self, metrics: dict[str, float]) -> float:
        """The metric's value in `metrics` (ConfigError naming those there when it is not)."""
        if self.metric not in metrics:
            raise ConfigError(
                f"monitor {self.metric!r} is not a metric of this run; available: {', '.join(sorted(metrics))}"
            )
        return float(metrics[self.metric])

    def tie(self, metrics: dict[str, float]) -> float | None:
        """The tie-break's value in `metrics` (None: no tie-break, or not there)."""
        value = metrics.get(self.tie_break) if self.tie_break else None
        return None if value is None else float(value)

    def improves(self, value: float, best: float | None, min_delta: float = 0.0, tie: float | None = None,
                 best_tie: float | None = None) -> bool:
        """Whether `value` beats `best` by more than `min_delta`, or equals it with a lower
        tie-break (`tie` against `best_tie`); anything beats no best, NaN beats nothing."""
        if math.isnan(value):
            return False
        if best is None:
            return True
        if value == best and tie is not None and best_tie is not None:
            return tie < best_tie
        return value < best - min_delta if self.mode == "min" else value > best + min_delta

    def better(self, a: dict[str, float], b: dict[str, float]) -> bool:
        """Whether the metrics `a` are strictly better than `b` (False when either lacks the metric)."""
        if self.metric not in a or self.metric not in b:
            return False
        return self.improves(float(a[self.metric]), float(b[self.metric]), tie=self.tie(a), best_tie=self.tie(b))


VAL_LOSS = Objective("val_loss", "min")  # the default objective: the lowest validation loss
CALIBRATED_LOSS = "calibrated_loss"  # the validation loss after a temperature fitted on the same outputs
LOSSES = ("val_loss", "train_loss", CALIBRATED_LOSS)  # monitors that need no tie-break: they hardly ever tie
