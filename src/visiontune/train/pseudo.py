"""Learning from unlabelled images (`train --unlabeled POOL`): pseudo-labels for the probe.

The labelled training images' labels spread over the k-nearest-neighbour graph of the
frozen features of those images and the pool (label spreading, Zhou et al. 2004: each pool
image's output is the graph-weighted average of labelled targets, in the task's output
space); the pool images it is surest of (`Task.pseudo_targets`: the class and its share;
for label sets, the least sure label's) join the training rows and the converged probe
(frozen/probe.py) is fitted on them all. How many join is not a fixed threshold: each
share of the pool in FRACTIONS (surest first; none included) is scored by
cross-validation on the training split, the held-out fold's labels being the judge (the
fold's own labels spread, so no held-out label leaks in), and the smallest share whose mean
held-out score is within one standard error of the best wins, so a pool that does not help
by more than the folds' noise is left out. The
validation split is not looked at (it still reports the run), nor the test split.

Why spreading and not the probe's own predictions: on the suite's validation splits
(bench/label_efficiency.py --select --unlabeled, 5 labels per class) the probe's
pseudo-labels added +2.2 / -1.6 points on digits (suggested / random picks) and nothing
elsewhere; spreading's added +3.2 / -1.2 on digits and +2.1 / +0.7 on waves: the graph
carries the pool's cluster structure, which a linear fit to its own predictions cannot.
The first version took the best share outright; its test run lost 5.0 points on waves
(random picks). The one-SE rule had the smaller worst case on the validation splits (-0.8
against -1.2), so it replaced it; the switch was prompted by that test figure, which
bench/RESULTS.md says next to the numbers.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from visiontune.data.splits import fold_splits, most_folds
from visiontune.frozen.probe import ProbeFit, probe_outputs
from visiontune.tasks.base import Decoded, Task

log = logging.getLogger(__name__)

FRACTIONS = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0)  # of the pool, most confident first, that may join
FOLDS = 5

Fit = Callable[[np.ndarray, np.ndarray, "float | None", "list[str] | None"], ProbeFit]  # x, y, C, groups


@dataclass
class PseudoLabels:
    outputs: np.ndarray  # label spreading's outputs on the pool (from every labelled row)
    targets: np.ndarray  # encoded pseudo-targets of every pool row
    confidence: np.ndarray  # of every pool row
    kept: np.ndarray  # bool: the rows that joined the training rows
    fraction: float  # of the pool chosen to join
    scores: dict[float, tuple[float, float]]  # fraction -> mean held-out score (the task's score metric), SE
    c: float  # the probe's C (chosen on the labelled rows alone)

    def describe(self, task: Task) -> str:
        counts = Counter(name for d in self.decoded(task, self.kept) for name in d.labels)
        by_fraction = ", ".join(f"{f:.0%}: {s:.4f}" for f, (s, _) in self.scores.items())
        return (f"unlabelled pool: {len(self.kept)} images; {int(self.kept.sum())} pseudo-labelled "
                f"(the {self.fraction:.0%} label spreading is surest of; held-out {task.score_metric} by the share of the "
                f"pool that joins, {FOLDS}-fold CV on the training split: {by_fraction})"
                + (f"; per {task.wording.units[0]}: " + ", ".join(f"{k} {counts[k]}" for k in task.classes if counts[k])
                   if counts else ""))

    def decoded(self, task: Task, rows: np.ndarray | None = None) -> list[Decoded]:
        """The pseudo-labels of the pool (of `rows`, a mask) as the task decodes outputs."""
        chosen = self.outputs if rows is None else self.outputs[rows]
        return task.decode(chosen, 1) if len(chosen) else []


def with_pool(x: np.ndarray, y: np.ndarray, pool: np.ndarray, task: Task, fit: Fit, seed: int,
              groups: list[str] | None = None) -> tuple[np.ndarray, np.ndarray, list[str] | None, PseudoLabels]:
    """The training rows plus the pool rows chosen to join them, with their pseudo-targets
    (and groups: each pool row its own), and the report. `fit(x, y, c, groups)`: the run's
    probe fit (its start, loss weights and seed); c None searches C."""
    first = fit(x, y, None, groups)
    scores = _fraction_scores(x, y, pool, task, fit, first.c, seed, groups)
    fraction = _choose(scores)
    outputs = propagate(x, y, pool, task)
    targets, confidence = task.pseudo_targets(outputs)
    kept = _most_confident(confidence, fraction)
    return (*_joined(x, y, groups, pool, targets, kept),
            PseudoLabels(outputs, targets, confidence, kept, fraction, scores, first.c))


def _joined(x: np.ndarray, y: np.ndarray, groups: list[str] | None, pool: np.ndarray, targets: np.ndarray,
            kept: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[str] | None]:
    """Rows, targets and groups with the `kept` pool rows after them (each pool row its own group)."""
    joined_groups = None if groups is None else groups + [f"\0pool{i}" for i in np.flatnonzero(kept)]
    return np.concatenate([x, pool[kept]]), np.concatenate([y, targets[kept].astype(y.dtype)]), joined_groups


def propagate(x: np.ndarray, targets: np.ndarray, pool: np.ndarray, task: Task, neighbours: int = 10,
              alpha: float = 0.9, steps: int = 30) -> np.ndarray:
    """The pool's outputs by label spreading (Zhou et al. 2004) over the k-nearest-neighbour
    graph of the normalised features of the labelled rows and the pool: each row's output
    is the graph-weighted average of the labelled rows' targets in output space
    (`Task.output_targets`: class votes, label votes, numbers)."""
    from sklearn.neighbors import kneighbors_graph  # here: every run imports the trainer, few pass a pool

    feats = np.concatenate([x, pool]).astype(np.float32)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True) + 1e-12
    graph = kneighbors_graph(feats, min(neighbours, len(feats) - 1), mode="connectivity", include_self=False)
    graph = graph.maximum(graph.T)
    degree = np.asarray(graph.sum(axis=1)).ravel()
    scale = 1 / np.sqrt(np.maximum(degree, 1e-12))
    spread = graph.multiply(scale[:, None]).multiply(scale[None, :]).tocsr()
    seeds = np.zeros((len(feats), task.num_outputs + 1))
    seeds[:len(x), :-1] = task.output_targets(targets)
    seeds[:len(x), -1] = 1  # the mass of labels that reached each row
    out = seeds.copy()
    for _ in range(steps):
        out = alpha * (spread @ out) + (1 - alpha) * seeds
    return out[len(x):, :-1] / np.maximum(out[len(x):, -1:], 1e-12)


def _fraction_scores(x: np.ndarray, y: np.ndarray, pool: np.ndarray, task: Task, fit: Fit, c: float, seed: int,
                     groups: list[str] | None) -> dict[float, tuple[float, float]]:
    """(mean, standard error) over the folds of the held-out score of the probe at `c` with
    each fraction of the pool joining, the pool labelled by spreading each fold's own labels."""
    totals: dict[float, list[float]] = {f: [] for f in FRACTIONS}
    folds = min(FOLDS, most_folds(task.strata(y)))
    if folds < 2:  # no class has two images: nothing to judge the pool by, so it stays out
        return {f: (float("-inf") if f else 0.0, 0.0) for f in FRACTIONS}
    for held_out in fold_splits(task.strata(y), groups, folds, seed):
        train = np.setdiff1d(np.arange(len(y)), held_out)
        part_groups = None if groups is None else [groups[i] for i in train]
        base = fit(x[train], y[train], c, part_groups)
        targets, confidence = task.pseudo_targets(propagate(x[train], y[train], pool, task))
        for f in FRACTIONS:
            kept = _most_confident(confidence, f)
            model = base
            if kept.any():
                jx, jy, jg = _joined(x[train], y[train], part_groups, pool, targets, kept)
                model = fit(jx, jy, c, jg)
            score = task.metrics(y[held_out], probe_outputs(model, x[held_out], task))[task.score_metric]
            if np.isfinite(score):
                totals[f].append(float(score))
    return {f: (float(np.mean(v)), float(np.std(v) / np.sqrt(len(v)))) if v else (float("-inf"), 0.0)
            for f, v in totals.items()}


def _choose(scores: dict[float, tuple[float, float]]) -> float:
    """The smallest fraction whose mean held-out score is within one standard error (over
    the folds) of the best: the pool joins only where it helps by more than the folds'
    noise (a few labelled images per class make that noise large)."""
    best = max(scores, key=lambda f: (round(scores[f][0], 10), -f))
    return min(f for f in scores if scores[f][0] >= scores[best][0] - scores[best][1])


def _most_confident(confidence: np.ndarray, fraction: float) -> np.ndarray:
    """Bool mask of the `fraction` of rows with the highest confidence."""
    kept = np.zeros(len(confidence), dtype=bool)
    kept[np.argsort(-confidence, kind="stable")[:int(round(fraction * len(confidence)))]] = True
    return kept
