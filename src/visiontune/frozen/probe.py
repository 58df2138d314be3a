"""The converged linear probe (LP of LP-FT, Kumar et al. 2022): while the backbone is frozen,
fit the head to convergence on the cached features instead of for a few SGD epochs.

The head's linear layer is fitted by full-batch L-BFGS (torch) to the task's own mean
loss (`Task.loss`, with the run's --balance weights: cross-entropy, binary cross-entropy
per label, or, for regression, squared error on standardised targets, which makes the
probe ridge regression) plus an L2 penalty that pulls the weights
towards where the head started: towards the pretrained classifier's rows for classes
warm-started from ImageNet (models/warmstart.py), towards zero elsewhere (plain L2). So a
warm start is a prior the data can move, not something the fit throws away. Features are
centred and scaled by one global RMS (per-feature scaling would give near-constant
features huge weights, which explode once fine-tuning moves them). The strength follows
scikit-learn's C: penalty = ||W - W0||^2 / (2 C N), C chosen by k-fold cross-validation
on the training features: the decade grid C_GRID (moved out while the best is on its edge),
then refined to a quarter decade around the best, each fold's fit warm-started along the
path; picked as the lowest held-out loss among the C values whose held-out score
(accuracy, mAP, R^2) is within one standard error of the best (the score decides where it
differs beyond noise; bench/probe_c.py and bench/RESULTS.md). The folds are made by the one
stratifier of the package (data/splits.py over `Task.strata`: by class, iterative
stratification for label sets, target quantile bins for numbers, the run's groups kept whole so images of one patient or recording never
sit on both sides). Above SEARCH_ROWS / FIT_ROWS images the search and the fit look at a
stratified sample that keeps every class. The result is folded back into the head:
W = W' / scale, b = b' - W @ mean. Seconds on thousands of images.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from visiontune.data.splits import fold_splits, most_folds, stratified_sample
from visiontune.tasks.base import Task, TaskLoss

log = logging.getLogger(__name__)

C_GRID = (1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0)  # inverse penalty strength, as scikit-learn's C
SEARCH_ORDER = (1e-2, 0.1, 1e-3, 1.0, 1e-4, 10.0)  # the grid from the middle out (a cut-short search)
C_LIMITS = (1e-6, 1e3)  # how far the search goes past the grid while the best sits on its edge
REFINE = 2  # halvings of the step in log C around the best decade: half, then a quarter of a decade
CRITERION = "metric-1se"  # what picks C: "loss", "metric" or "metric-1se" (_CSearch.best_c)
DEFAULT_C = 1.0  # too few images to cross-validate: scikit-learn's default
CV_FOLDS = 5
MIN_SEARCH_ROWS = 10  # fewer images: no search
SEARCH_ROWS = 20_000  # the C search looks at most at this many rows (a stratified sample)
MAX_ITER = 300
MIN_FINAL_ITER = 20  # iterations the final fit takes even when the deadline has passed
EVALS_PER_FIT = 200  # loss evaluations of an L-BFGS fit on real features (Lite0, 2,000 images: 57-330 by C, mean ~225)
FIT_ROWS = 50_000  # the final fit looks at most at this many rows (a stratified sample)


@dataclass
class ProbeFit:
    weight: np.ndarray  # (classes, features), for the head's linear layer
    bias: np.ndarray  # (classes,)
    c: float  # the chosen C
    folds: int  # of the cross-validation that chose it (0: no search, too little data)


def fit_probe(features: np.ndarray, targets: np.ndarray, task: Task, start: nn.Linear | None = None,
              weights: torch.Tensor | None = None, seed: int = 0, groups: list[str] | None = None,
              deadline: float | None = None, c: float | None = None) -> ProbeFit:
    """Fit a linear head on `features` (N, D) for `targets` as `task` encodes them (class
    indices, multi-hot rows, numbers). `start`: the head's current linear layer, the prior
    the penalty pulls towards (None: zero). `weights`: the loss weights of --balance (the
    trainer's, None for none). `groups`: each row's group (None: every row its own), kept
    whole by the C search's folds. `deadline` (time.perf_counter()): the search stops
    trying C values when the rest would end after it, and the final fit stops there with
    the weights it has reached. `c`: fit at this C, without a search."""
    criterion = task.loss(weights.cpu() if weights is not None else None)
    rows = stratified_sample(task.strata(np.asarray(targets)), FIT_ROWS, seed)
    if rows is not None:
        log.info("converged probe: fitting on %d of %d images, a stratified sample (memory stays bounded)",
                 len(rows), len(targets))
        groups = [groups[i] for i in rows] if groups is not None else None
    x = torch.tensor(np.asarray(features[rows] if rows is not None else features), dtype=torch.float32)
    targets = np.asarray(targets)[rows] if rows is not None else targets
    mean = x.mean(dim=0)
    x.sub_(mean)  # in place: one copy of the features in memory, whatever their number
    scale = math.sqrt(sum(float((c * c).sum()) for c in x.split(4096)) / max(1, x.numel())) + 1e-6
    x.div_(scale)
    y = torch.as_tensor(np.asarray(targets))
    classes = task.num_outputs
    w0 = (start.weight.detach().float().cpu() * scale) if start is not None else torch.zeros(classes, x.shape[1])
    b0 = (start.bias.detach().float().cpu() + start.weight.detach().float().cpu() @ mean) if start is not None \
        else torch.zeros(classes)
    search = _choose_c(x, y, w0, b0, criterion, task, seed, groups, deadline) if c is None else _Search(c, 0)
    c, folds = search.c, search.folds
    w, b = _final_fit(x, y, w0, b0, search, criterion, deadline)
    w = w / scale
    return ProbeFit(w.numpy(), (b - w @ mean).numpy(), c, folds)


def oof_outputs(features: np.ndarray, targets: np.ndarray, task: Task, seed: int = 0,
                folds: int = 5) -> tuple[np.ndarray, float]:
    """Out-of-fold outputs of the converged probe (the task's loss): C
    chosen once by its cross-validation on every row, then one fit per fold (folds by
    `task.strata`); and that C. Regression's "suspicious targets" rank images by these."""
    fits, c = fold_fits(features, targets, task, seed, folds)
    out = np.zeros((len(targets), task.num_outputs))
    for held, fit in fits:
        out[held] = probe_outputs(fit, features[held], task)
    return out, c


def fold_fits(features: np.ndarray, targets: np.ndarray, task: Task, seed: int = 0,
              folds: int = 5) -> tuple[list[tuple[np.ndarray, ProbeFit]], float]:
    """(held-out rows, the probe fitted on the other rows) per fold, all at the C that the
    search chose once on every row; and that C."""
    c = fit_probe(features, targets, task, seed=seed).c
    fits = []
    for held in fold_splits(task.strata(targets), None, max(2, min(folds, most_folds(task.strata(targets)))), seed):
        train = np.setdiff1d(np.arange(len(targets)), held)
        fits.append((held, fit_probe(features[train], targets[train], task, seed=seed, c=c)))
    return fits, c


def search_folds(strata: np.ndarray, groups: list[str] | None = None) -> int:
    """How many folds the C search uses on rows of `strata` (and `groups`); 0: too few
    images or groups to cross-validate, DEFAULT_C is used."""
    n = len(strata)
    folds = min(CV_FOLDS, n // 2, most_folds(strata), len(set(groups)) if groups is not None else n)
    return folds if n >= MIN_SEARCH_ROWS and folds >= 2 else 0


def validation_folds(strata: np.ndarray, seed: int, groups: list[str] | None = None) -> list[np.ndarray]:
    """The held-out rows of each fold of a cross-validation that stands in for a
    validation split (train/setup.py: labels too few to hold one out). Where the probe's
    fit chooses no C on these rows (too few images or groups: `search_folds`), leave one
    out (one group, with `groups`): nothing was chosen on the rows scored. Else the C
    search's folds, each fold's fit choosing its own C on its own rows (nested), so no
    choice is made on the rows a fold scores (DESIGN rule 8)."""
    folds = search_folds(strata, groups)
    if folds:
        return fold_splits(strata, groups, folds, seed)
    keys = groups if groups is not None else [str(i) for i in range(len(strata))]
    where = {k: i for i, k in enumerate(dict.fromkeys(keys))}
    index = np.array([where[k] for k in keys])
    return [np.flatnonzero(index == i) for i in range(len(where))]


def describe_folds(folds: list[np.ndarray], rows: int) -> str:
    """'leave-one-out cross-validation' or '5-fold cross-validation' (of `rows` rows)."""
    return "leave-one-out cross-validation" if len(folds) == rows else f"{len(folds)}-fold cross-validation"


def held_out_logits(features: np.ndarray, folds: list[np.ndarray], fit: Callable[[np.ndarray], ProbeFit],
                    stop: Callable[[], bool] = lambda: False) -> tuple[np.ndarray, np.ndarray]:
    """Each held-out row's logits from `fit(rows)`, the probe fitted on the rows outside
    its fold, fold by fold until `stop()` says so (after one fold at least): (the logits,
    their rows), rows in order."""
    parts, rows = [], []
    for held in folds:
        if parts and stop():
            break
        fitted = fit(np.setdiff1d(np.arange(len(features)), held))
        parts.append(np.asarray(features[held], dtype=np.float32) @ fitted.weight.T.astype(np.float32)
                     + fitted.bias.astype(np.float32))
        rows.append(held)
    order = np.argsort(np.concatenate(rows), kind="stable")
    return np.concatenate(parts)[order], np.concatenate(rows)[order]


def probe_outputs(fit: ProbeFit, features: np.ndarray, task: Task) -> np.ndarray:
    """The task's outputs (probabilities, numbers) of `fit` on `features` (N, D)."""
    logits = torch.from_numpy(np.asarray(features, dtype=np.float32) @ fit.weight.T.astype(np.float32)
                              + fit.bias.astype(np.float32))
    return task.probabilities(logits).numpy()


def load_into(head: nn.Module, fit: ProbeFit) -> None:
    """Copy the fitted probe into the head's (last) linear layer."""
    linear = head_linear(head)
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(fit.weight))
        linear.bias.copy_(torch.from_numpy(fit.bias))


def head_linear(head: nn.Module) -> nn.Linear:
    return head[-1] if isinstance(head, nn.Sequential) else head  # type: ignore[return-value]


class _OutOfTime(Exception):
    """The deadline passed inside an L-BFGS fit."""


def _lbfgs(x: torch.Tensor, y: torch.Tensor, w0: torch.Tensor, b0: torch.Tensor, c: float, criterion: TaskLoss,
           deadline: float | None = None,
           init: tuple[torch.Tensor, torch.Tensor] | None = None,
           max_iter: int = MAX_ITER) -> tuple[torch.Tensor, torch.Tensor]:
    """argmin mean loss + ||W - w0||^2 / (2 c N), from `init` (default (w0, b0)); past
    `deadline`, the iterate reached so far."""
    start_w, start_b = init if init is not None else (w0, b0)
    w, b = start_w.clone().requires_grad_(True), start_b.clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe",
                                  tolerance_grad=1e-6, tolerance_change=1e-9)
    strength = 1.0 / (2.0 * c * len(y))

    def closure() -> torch.Tensor:
        if deadline is not None and time.perf_counter() > deadline:
            raise _OutOfTime
        optimizer.zero_grad()
        value = criterion(x @ w.T + b, y) + strength * ((w - w0) ** 2).sum()
        value.backward()
        return value

    try:
        optimizer.step(closure)
    except _OutOfTime:
        pass
    return w.detach(), b.detach()


@dataclass
class _Search:
    c: float  # the chosen C
    folds: int  # 0: no search
    start: tuple[torch.Tensor, torch.Tensor] | None = None  # a fold's fit at that C: where the final fit starts


def _final_fit(x: torch.Tensor, y: torch.Tensor, w0: torch.Tensor, b0: torch.Tensor, search: _Search,
               criterion: TaskLoss, deadline: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The fit on every row at the chosen C, from the search's fold fit when there is one
    (4/5 of the way there). With a deadline it stops there; if the deadline has passed
    already, it still takes MIN_FINAL_ITER iterations (seconds at most): a head that never
    moved from its start would waste the features extracted."""
    if deadline is not None and time.perf_counter() > deadline:
        log.warning("time budget: no time left for the converged probe; %d iterations from %s", MIN_FINAL_ITER,
                    "a fold's fit" if search.start is not None else "the head's start")
        return _lbfgs(x, y, w0, b0, search.c, criterion, None, search.start, MIN_FINAL_ITER)
    w, b = _lbfgs(x, y, w0, b0, search.c, criterion, deadline, search.start)
    if deadline is not None and time.perf_counter() > deadline:
        log.warning("time budget: the converged probe stops short of convergence at the deadline")
    return w, b


def _choose_c(x: torch.Tensor, y: torch.Tensor, w0: torch.Tensor, b0: torch.Tensor, criterion: TaskLoss,
              task: Task, seed: int, groups: list[str] | None, deadline: float | None = None) -> _Search:
    """The best C by cross-validation over CV_FOLDS folds (data/splits.py: stratified,
    groups whole) of a stratified sample of at most SEARCH_ROWS rows; DEFAULT_C when there
    are too few images or groups to fold. Which C is best is CRITERION's rule
    (`_CSearch.best_c`; by default the lowest held-out loss within one standard error of the
    best held-out `score_metric`). First the decade grid C_GRID, from its middle
    out (SEARCH_ORDER: a search the deadline stops early has tried the likeliest), moved
    out by a decade while the best sits on its edge (down to C_LIMITS); then REFINE
    halvings of the step in log C around the best (half a decade, then a quarter). Each
    fold's fit starts from that fold's fit at the nearest C already tried (the path
    warm-started, as glmnet and scikit-learn's LogisticRegressionCV do)."""
    rows = stratified_sample(task.strata(y.numpy()), SEARCH_ROWS, seed)
    xs, ys = (x[rows], y[rows]) if rows is not None else (x, y)
    if groups is not None and rows is not None:
        groups = [groups[i] for i in rows]
    strata = task.strata(ys.numpy())
    folds = search_folds(strata, groups)
    if not folds:
        return _Search(DEFAULT_C, 0)
    search = _CSearch(xs, ys, w0, b0, criterion, task, fold_splits(strata, groups, folds, seed),
                      deadline, len(y) / len(ys))
    for c in SEARCH_ORDER:
        if not search.trial(c):
            return search.result()
    lowest, highest = C_LIMITS
    while search.scores:  # the best on the grid's edge: the optimum may lie beyond it
        best = search.best_c()
        edge = best / 10 if best == min(search.scores) and best / 10 >= lowest else \
            best * 10 if best == max(search.scores) and best * 10 <= highest else None
        if edge is None or edge in search.scores:
            break
        if not search.trial(edge):
            return search.result()
    step = 1.0
    for _ in range(REFINE):
        step /= 2
        best = search.best_c()
        for c in (best * 10 ** -step, best * 10 ** step):
            if lowest <= c <= highest and not search.trial(c):
                return search.result()
    return search.result()


class _CSearch:
    """Scores of C values by cross-validation, each fold's fit warm-started along the path."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, w0: torch.Tensor, b0: torch.Tensor, criterion: TaskLoss,
                 task: Task, held_out: list[np.ndarray], deadline: float | None, rows_ratio: float) -> None:
        self.x, self.y, self.w0, self.b0, self.criterion, self.task = x, y, w0, b0, criterion, task
        self.held_out = held_out
        self.train = [np.setdiff1d(np.arange(len(y)), test) for test in held_out]
        self.deadline, self.rows_ratio = deadline, rows_ratio
        self.plain = task.loss()
        self.scores: dict[float, tuple[float, float, float]] = {}  # C -> held-out (loss, score_metric, its SE)
        self.fits: dict[float, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.started = time.perf_counter()
        self.stopped = False

    def trial(self, c: float) -> bool:
        """Score `c` (once); False when the deadline stops the search before it."""
        c = float(f"{c:.6g}")
        if c in self.scores:
            return True
        if _search_overruns(self.deadline, self.started, len(self.scores), len(self.held_out), self.rows_ratio):
            log.warning("time budget: the C search stops after %d values", len(self.scores))
            self.stopped = True
            return False
        near = min(self.fits, key=lambda d: abs(math.log(d / c))) if self.fits else None
        total, fits = 0.0, []
        outputs = np.zeros((len(self.y), self.task.num_outputs))
        for k, (train, test) in enumerate(zip(self.train, self.held_out)):  # each fit stops at the deadline too
            fit = _lbfgs(self.x[train], self.y[train], self.w0, self.b0, c, self.criterion, self.deadline,
                         self.fits[near][k] if near is not None else None)
            logits = self.x[test] @ fit[0].T + fit[1]
            total += float(self.plain(logits, self.y[test])) * len(test)
            outputs[test] = self.task.probabilities(logits).numpy()
            fits.append(fit)
        y = self.y.numpy()
        name = self.task.score_metric
        metric = self.task.metrics(y, outputs).get(name, float("nan"))
        per_fold = [self.task.metrics(y[test], outputs[test]).get(name, float("nan")) for test in self.held_out]
        per_fold = [m for m in per_fold if m == m]
        se = float(np.std(per_fold, ddof=1) / math.sqrt(len(per_fold))) if len(per_fold) > 1 else 0.0
        self.scores[c], self.fits[c] = (total / len(self.y), float(metric), se), fits
        return True

    def best_c(self) -> float:
        """By CRITERION: "loss", the lowest held-out loss; "metric", the best score (ties:
        the loss); "metric-1se", the lowest loss among the C values whose score is within one
        standard error (over the folds) of the best score: the score decides where its
        differences are larger than its noise, the loss (a proper scoring rule, smooth where
        accuracy is a staircase) decides among the rest. On data without signal the score
        differs by noise only, and the loss keeps the strong penalty it calls for."""
        def score(c: float) -> float:
            value = self.scores[c][1]
            return value if value == value else -math.inf

        def loss(c: float) -> float:
            return self.scores[c][0]

        if CRITERION == "loss":
            return min(self.scores, key=lambda c: (loss(c), -score(c)))
        best = max(self.scores, key=lambda c: (score(c), -loss(c)))
        if CRITERION == "metric":
            return best
        near = [c for c in self.scores if score(c) >= score(best) - self.scores[best][2]]
        return min(near, key=loss)

    def result(self) -> _Search:
        if not self.scores:
            return _Search(SEARCH_ORDER[0], len(self.held_out))
        c = self.best_c()
        ranked = sorted(self.scores.items())
        how = {"loss": "the lowest held-out loss", "metric": f"the best held-out {self.task.score_metric}",
               "metric-1se": f"the lowest held-out loss within one standard error of the best "
                             f"{self.task.score_metric}"}[CRITERION]
        log.info("converged probe: C = %g by %d-fold CV (%s%s); held-out loss / %s (+-SE) by C: %s", c,
                 len(self.held_out), how, ", stopped by the deadline" if self.stopped else "",
                 self.task.score_metric, ", ".join(f"{k:g}: {v[0]:.4f}/{v[1]:.4f}+-{v[2]:.4f}" for k, v in ranked))
        return _Search(c, len(self.held_out), self.fits[c][-1])


def _search_overruns(deadline: float | None, started: float, done: int, folds: int, rows_ratio: float) -> bool:
    """Would one more C value and then the final fit end after `deadline`? One C value costs
    what the last ones did; the final fit about one fold's fit on `rows_ratio` as many rows.
    Before the first value: only whether the deadline has passed."""
    if deadline is None:
        return False
    if not done:
        return time.perf_counter() > deadline
    per_c = (time.perf_counter() - started) / done
    final = per_c / folds * rows_ratio
    return time.perf_counter() + per_c + final > deadline


def estimate_seconds(rows: int, dim: int, classes: int) -> float:
    """Seconds `fit_probe` takes on `rows` feature vectors of width `dim` for `classes`,
    measured here: the time of one evaluation of the loss and its gradient on synthetic data
    of that shape, at two sizes (a fixed cost and a cost per row), times EVALS_PER_FIT
    evaluations for each fit of the search (C values x folds on (k-1)/k of at most
    SEARCH_ROWS) and the final fit (at most FIT_ROWS). On real backbone features most fits
    run to about MAX_ITER iterations (synthetic data converges in a tenth of that, which is
    why evaluations are timed, not fits). The loss is timed as binary cross-entropy: every
    task's loss costs about what the (N, classes) logits' matrix product does."""
    _time_evals(16, dim, classes)  # the first evaluations of a process pay for warming up
    sizes = sorted({min(rows, 256), min(rows, 2048)})
    times = [_time_evals(n, dim, classes) for n in sizes]
    per_row = (times[-1] - times[0]) / (sizes[-1] - sizes[0]) if len(sizes) > 1 else times[0] / max(1, sizes[0])
    fixed = max(0.0, times[0] - per_row * sizes[0])
    search = min(rows, SEARCH_ROWS)
    folds = min(CV_FOLDS, search // 2) if search >= MIN_SEARCH_ROWS else 0
    values = len(C_GRID) + 2 * REFINE  # C values the search tries (more only when the best is on the grid's edge)
    fits = values * folds + 1
    rows_fitted = values * (folds - 1) * search + min(rows, FIT_ROWS) if folds else min(rows, FIT_ROWS)
    return EVALS_PER_FIT * (fits * fixed + max(per_row, 0.0) * rows_fitted)


def _time_evals(n: int, dim: int, classes: int, evals: int = 8, repeats: int = 3) -> float:
    """Seconds per evaluation of the probe's loss and gradient on `n` synthetic rows: the
    best of `repeats` timings of `evals` evaluations (as timeit reports), so one stall of
    the machine does not pass for the cost of the work."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, dim, generator=g)
    y = (torch.rand(n, classes, generator=g) > 0.5).float()
    w = torch.zeros(classes, dim, requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(evals):
            w.grad = b.grad = None
            (nn.functional.binary_cross_entropy_with_logits(x @ w.T + b, y) + 1e-3 * (w ** 2).sum()).backward()
        best = min(best, (time.perf_counter() - started) / evals)
    return best

