"""What "better" means for a run: one metric and the direction in which it improves.

The Task knows each of its metrics' direction (`Task.objective` builds one); early
stopping, the best checkpoint and the trainer's choice between the raw and the EMA
weights all compare by the same `Objective`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from visiontune.errors import ConfigError

MODES = ("min", "max")


@dataclass(frozen=True)
class Objective:
    """`metric` and whether it is minimised ("min") or maximised ("max")."""

    metric: str
    mode: str

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

    def improves(self, value: float, best: float | None, min_delta: float = 0.0) -> bool:
        """Whether `value` beats `best` by more than `min_delta` (anything beats no best;
        NaN beats nothing)."""
        if math.isnan(value):
            return False
        if best is None:
            return True
        return value < best - min_delta if self.mode == "min" else value > best + min_delta

    def better(self, a: dict[str, float], b: dict[str, float]) -> bool:
        """Whether the metrics `a` are strictly better than `b` (False when either lacks the metric)."""
        if self.metric not in a or self.metric not in b:
            return False
        return self.improves(float(a[self.metric]), float(b[self.metric]))


VAL_LOSS = Objective("val_loss", "min")  # the default objective: the lowest validation loss
