"""Prediction sets with a coverage guarantee (split conformal prediction), one companion per
output shape, reached as `task.conformal`. Each is fitted on held-out outputs (the run's
validation split, calibrated) and answers for any coverage asked at prediction time:

- `Conformal` (single-label): RAPS (Angelopoulos et al. 2021), deterministic: the classes
  in order of probability while the probability ranked above each, plus a small penalty for
  each class past the first K_REG, stays under the threshold (the most probable class is
  always in). Any score gives the guarantee; this one keeps sets small without the random
  tie-breaking of randomised APS, so the same image always gets the same set. When the top
  class alone is right more often than the coverage asked, sets of one class over-cover:
  coverage is then the accuracy. The true class is in the set for at
  least `coverage` of images from the same distribution (the finite-sample quantile
  ceil((n + 1) * coverage) / n of n held-out scores).
- `LabelSetConformal` (multi-label): conformal risk control of the false-negative rate
  (Angelopoulos et al. 2022): the labels above one threshold, chosen so that the expected
  share of an image's true labels missed is at most 1 - coverage.
- `NumberConformal` (regression): split conformal on the absolute residual: the interval
  prediction +- q, holding the true number for at least `coverage` of images.

What is kept (in model.safetensors' metadata, and so in exports) is small whatever the
number of held-out images: at most STORED order statistics of the scores (rounded towards
the conservative side), or the risk on a fixed grid of thresholds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from visiontune.errors import ConfigError

STORED = 1000  # order statistics of the held-out scores kept (every m-th beyond that, rounded up)
TIE = 1e-6  # a score this close to the threshold counts as under it: engines (torch, ONNX) differ by ~1e-7
GRID = 1001  # multi-label: thresholds 0, 0.001, ..., 1 at which the held-out risk is kept


@dataclass
class SetPrediction:
    """One image's set: the labels in it (classes, label names) or, for a number, its interval."""

    labels: list[str]
    interval: tuple[float, float] | None = None
    coverage: float = 0.0  # the share of images whose set holds the truth, as asked

    def named(self, delim: str = " or ") -> str:
        """The set in words ("a or b"; "[1.2, 3.4]"; "(none)")."""
        if self.interval is not None:
            return f"[{self.interval[0]:.6g}, {self.interval[1]:.6g}]"
        return delim.join(self.labels) or "(none)"

    @property
    def percent(self) -> str:
        """The coverage asked, as a percentage with the digits it was given ("90%", "99.9%"; a
        rounded "100%" claimed a certainty that 0.999 does not give)."""
        return f"{self.coverage * 100:.4g}%"

    @property
    def size(self) -> float:
        """How many labels, or the interval's width."""
        if self.interval is not None:
            return self.interval[1] - self.interval[0]
        return float(len(self.labels))


def check_coverage(coverage: float) -> None:
    if not 0 < coverage < 1:
        raise ConfigError(f"--coverage {coverage}: give the share of images whose set holds the truth, between 0 "
                          "and 1 (e.g. 0.9)")


def minimum_images(coverage: float) -> int:
    """Held-out images needed for a guarantee at `coverage`: ceil((n + 1) c) <= n."""
    return math.ceil(coverage / (1 - coverage) - 1e-9)


class Conformal:
    """RAPS prediction sets over classes (single-label)."""

    kind = "raps"
    can_abstain = True  # a set of more than one class can be answered "not sure: a or b" (--abstain)
    penalty = 0.01  # RAPS' lambda: added per class ranked past K_REG
    k_reg = 1

    def __init__(self, task: Any) -> None:
        self.task = task

    # -- fitting ---------------------------------------------------------------------
    def scores(self, targets: np.ndarray, probs: np.ndarray) -> np.ndarray:
        """The held-out images' nonconformity: the score of their true class."""
        cum = self._cumulative(probs)
        rank = self._ranks(probs)[np.arange(len(targets)), np.asarray(targets, dtype=int)]
        return cum[np.arange(len(targets)), rank]

    def fit(self, targets: np.ndarray, probs: np.ndarray) -> dict[str, Any] | None:
        """What is kept to answer any coverage later (None without held-out images)."""
        if len(targets) < 1:
            return None
        return {"kind": self.kind, **_order_statistics(self.scores(targets, probs))}

    # -- predicting ------------------------------------------------------------------
    def sets(self, probs: np.ndarray, fitted: dict[str, Any], coverage: float) -> list[SetPrediction]:
        q = threshold(fitted, coverage)
        order = np.argsort(-np.asarray(probs), axis=1, kind="stable")
        # the score grows with the rank, so a set is the first `size` classes of the ranking (at least one)
        sizes = np.maximum(1, (self._cumulative(probs) <= q + TIE).sum(axis=1))
        return [SetPrediction([self.task.classes[c] for c in row[:size]], coverage=coverage)
                for row, size in zip(order, sizes)]

    def assess(self, targets: np.ndarray, probs: np.ndarray, fitted: dict[str, Any],
               coverage: float) -> dict[str, float]:
        """Empirical coverage, mean set size, and selective accuracy (accuracy where the set is
        one class) with the share of such images."""
        sets = self.sets(probs, fitted, coverage)
        names = [self.task.classes[int(t)] for t in targets]
        covered = np.array([n in s.labels for n, s in zip(names, sets)])
        single = np.array([len(s.labels) == 1 for s in sets])
        right = np.array([s.labels[0] == n for n, s in zip(names, sets)])
        return {"coverage": float(covered.mean()), "mean_set_size": float(np.mean([s.size for s in sets])),
                "selective_accuracy": float(right[single].mean()) if single.any() else float("nan"),
                "single_share": float(single.mean())}

    # -- the score ---------------------------------------------------------------------
    def _cumulative(self, probs: np.ndarray) -> np.ndarray:
        """Per row, by rank: the probability of the classes ranked above it, plus the penalty
        for ranks past k_reg. (Counting the class's own probability too, as randomised APS does
        before subtracting a random share of it, made the deterministic sets far too large:
        digits, coverage 0.98 and 1.87 classes a set where 0.9 was asked.)"""
        sorted_p = -np.sort(-np.asarray(probs, dtype=np.float64), axis=1)
        ranks = np.arange(1, sorted_p.shape[1] + 1)
        above = np.cumsum(sorted_p, axis=1) - sorted_p
        return above + self.penalty * np.maximum(0, ranks - self.k_reg)

    @staticmethod
    def _ranks(probs: np.ndarray) -> np.ndarray:
        """Per row, each class's rank (0: the most probable)."""
        order = np.argsort(-np.asarray(probs), axis=1, kind="stable")
        ranks = np.empty_like(order)
        np.put_along_axis(ranks, order, np.arange(order.shape[1])[None, :].repeat(len(order), 0), axis=1)
        return ranks


class LabelSetConformal(Conformal):
    """Labels above one threshold, the false-negative rate controlled (multi-label)."""

    kind = "fnr"
    can_abstain = False  # a label set is already the answer: its uncertainty is its set column

    def fit(self, targets: np.ndarray, probs: np.ndarray) -> dict[str, Any] | None:
        if len(targets) < 1:
            return None
        y = np.asarray(targets) > 0.5
        rows, cols = np.nonzero(y)
        # the mean share of an image's true labels under t: each true label weighs 1 / (its image's labels), so
        # the risk at every t is one weighted count of the true labels' probabilities under t
        values = np.asarray(probs, dtype=np.float64)[rows, cols]
        order = np.argsort(values, kind="stable")
        weights = np.concatenate([[0.0], np.cumsum(1.0 / y.sum(axis=1)[rows][order])])
        risk = weights[np.searchsorted(values[order], np.linspace(0.0, 1.0, GRID), side="left")] / len(y)
        return {"kind": self.kind, "n": int(len(y)), "risk": [round(float(r), 6) for r in risk]}

    def threshold(self, fitted: dict[str, Any], coverage: float) -> float:
        """The highest threshold whose corrected held-out risk, (n R + 1) / (n + 1), is at most
        1 - coverage (0: every label, when none is)."""
        check_coverage(coverage)
        n, risk = fitted["n"], np.asarray(fitted["risk"])
        ok = (n * risk + 1) / (n + 1) <= (1 - coverage) + 1e-12
        grid = np.linspace(0.0, 1.0, len(risk))
        return float(grid[ok].max()) if ok.any() else 0.0

    def sets(self, probs: np.ndarray, fitted: dict[str, Any], coverage: float) -> list[SetPrediction]:
        t = self.threshold(fitted, coverage)
        return [SetPrediction([c for c, v in zip(self.task.classes, row) if v >= t - TIE], coverage=coverage)
                for row in np.asarray(probs)]

    def assess(self, targets: np.ndarray, probs: np.ndarray, fitted: dict[str, Any],
               coverage: float) -> dict[str, float]:
        """The mean share of an image's true labels in its set (1 - the false-negative rate;
        images without labels count as fully covered), and the mean set size."""
        sets = self.sets(probs, fitted, coverage)
        y = np.asarray(targets) > 0.5
        recall = [1.0 if not row.any() else float(np.mean([self.task.classes[j] in s.labels
                                                           for j in np.flatnonzero(row)]))
                  for row, s in zip(y, sets)]
        return {"coverage": float(np.mean(recall)), "mean_set_size": float(np.mean([s.size for s in sets]))}


class NumberConformal(Conformal):
    """prediction +- q, q from the held-out absolute residuals (regression)."""

    kind = "residual"
    can_abstain = False  # an interval is the answer's uncertainty

    def scores(self, targets: np.ndarray, probs: np.ndarray) -> np.ndarray:
        return np.abs(np.asarray(targets, dtype=np.float64).ravel() - np.asarray(probs, dtype=np.float64)[:, 0])

    def sets(self, probs: np.ndarray, fitted: dict[str, Any], coverage: float) -> list[SetPrediction]:
        q = threshold(fitted, coverage) + TIE
        return [SetPrediction([], (float(v) - q, float(v) + q), coverage)
                for v in np.asarray(probs, dtype=np.float64)[:, 0]]

    def assess(self, targets: np.ndarray, probs: np.ndarray, fitted: dict[str, Any],
               coverage: float) -> dict[str, float]:
        sets = self.sets(probs, fitted, coverage)
        y = np.asarray(targets, dtype=np.float64).ravel()
        inside = [s.interval[0] <= v <= s.interval[1] for v, s in zip(y, sets)]  # type: ignore[index]
        return {"coverage": float(np.mean(inside)), "mean_interval_width": float(np.mean([s.size for s in sets]))}


def threshold(fitted: dict[str, Any], coverage: float) -> float:
    """The ceil((n + 1) coverage)-th smallest held-out score (inf when n is too small for
    that coverage: then the set is every class, the interval unbounded)."""
    check_coverage(coverage)
    n, step, kept = fitted["n"], fitted["step"], fitted["scores"]
    k = math.ceil((n + 1) * coverage - 1e-9)
    if k > n:
        return math.inf
    return float(kept[min(math.ceil(k / step), len(kept)) - 1])


def _order_statistics(scores: np.ndarray) -> dict[str, Any]:
    """The sorted scores, or every step-th of them (ranks step, 2 step, ..., and n) when there
    are more than STORED: a threshold read from them is never below the exact one."""
    s = np.sort(np.asarray(scores, dtype=np.float64))
    n = len(s)
    step = max(1, math.ceil(n / STORED))
    ranks = list(range(step, n + 1, step))
    if not ranks or ranks[-1] != n:
        ranks.append(n)
    return {"n": n, "step": step, "scores": [float(s[r - 1]) for r in ranks]}
