"""The converged linear probe (LP of LP-FT, Kumar et al. 2022): while the backbone is frozen,
fit the head to convergence on the cached features instead of for a few SGD epochs.

scikit-learn's logistic regression (lbfgs) on centred features scaled by one global RMS
(per-feature scaling would give near-constant features huge weights, which explode once
fine-tuning moves them), its L2 strength C chosen by stratified k-fold cross-validation
on the training features (log loss), then the fitted model folded back into the linear
head: W = coef / scale, b = intercept - W @ mean. Single-label: one multinomial model (two classes: the binary logit split as
+-z/2, the same softmax). Multi-label: one binary model per label (a label that is always
or never present gets a constant logit). Seconds on thousands of images.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from torch import nn

log = logging.getLogger(__name__)

C_GRID = (0.001, 0.01, 0.1, 1.0, 10.0)  # inverse L2 strength on standardised features
SEARCH_ROWS = 20_000  # the C search looks at most at this many rows; the final fit at all
MAX_ITER = 1000


@dataclass
class ProbeFit:
    weight: np.ndarray  # (classes, features), for the head's linear layer
    bias: np.ndarray  # (classes,)
    c: list[float]  # the chosen C (one per label for multi-label)


def fit_probe(features: np.ndarray, targets: np.ndarray, multi_label: bool, balanced: bool = False,
              seed: int = 0) -> ProbeFit:
    """Logistic regression to convergence on `features` (N, D); `targets` are class indices
    (N,) or multi-hot (N, C). `balanced` weights classes (labels) by their inverse frequency."""
    mean = features.mean(axis=0)
    scale = float(np.sqrt(((features - mean) ** 2).mean(axis=1).mean())) + 1e-6
    x = (features - mean) / scale
    if multi_label:
        fits = [_binary(x, targets[:, c].astype(int), balanced, seed) for c in range(targets.shape[1])]
        weight, bias = np.stack([w for w, _, _ in fits]), np.array([b for _, b, _ in fits])
        chosen = [c for _, _, c in fits]
    else:
        weight, bias, c = _multinomial(x, targets.astype(int), balanced, seed)
        chosen = [c]
    weight = weight / scale
    return ProbeFit(weight.astype(np.float32), (bias - weight @ mean).astype(np.float32), chosen)


def load_into(head: nn.Module, fit: ProbeFit) -> None:
    """Copy the fitted probe into the head's (only) linear layer."""
    linear = head[-1] if isinstance(head, nn.Sequential) else head
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(fit.weight))
        linear.bias.copy_(torch.from_numpy(fit.bias))


def _model(c: float, balanced: bool) -> LogisticRegression:
    return LogisticRegression(C=c, max_iter=MAX_ITER, class_weight="balanced" if balanced else None)


def _best_c(x: np.ndarray, y: np.ndarray, balanced: bool, seed: int) -> float:
    """The C of the grid with the best cross-validated log loss (on at most SEARCH_ROWS rows)."""
    if len(y) > SEARCH_ROWS:
        keep = np.random.default_rng(seed).choice(len(y), SEARCH_ROWS, replace=False)
        x, y = x[keep], y[keep]
    folds = int(min(5, np.bincount(y).min()))
    if folds < 2:
        return 1.0
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        scores = [cross_val_score(_model(c, balanced), x, y, cv=cv, scoring="neg_log_loss").mean() for c in C_GRID]
    return float(C_GRID[int(np.argmax(scores))])


def _multinomial(x: np.ndarray, y: np.ndarray, balanced: bool, seed: int) -> tuple[np.ndarray, np.ndarray, float]:
    c = _best_c(x, y, balanced, seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model = _model(c, balanced).fit(x, y)
    classes = int(y.max()) + 1
    weight, bias = np.zeros((classes, x.shape[1])), np.full(classes, -30.0)  # an absent class: never predicted
    if len(model.classes_) == 2:  # one logit z for the second class: softmax of (-z/2, z/2) is sigmoid(z)
        rows = np.vstack([-model.coef_ / 2, model.coef_ / 2])
        weight[model.classes_], bias[model.classes_] = rows, np.array([-1, 1]) * model.intercept_[0] / 2
    else:
        weight[model.classes_], bias[model.classes_] = model.coef_, model.intercept_
    return weight, bias, c


def _binary(x: np.ndarray, y: np.ndarray, balanced: bool, seed: int) -> tuple[np.ndarray, float, float]:
    if y.min() == y.max():  # always or never there: a constant logit
        p = np.clip(y.mean(), 1e-3, 1 - 1e-3)
        return np.zeros(x.shape[1]), float(np.log(p / (1 - p))), 0.0
    weight, bias, c = _multinomial(x, y, balanced, seed)
    return weight[1] - weight[0], float(bias[1] - bias[0]), c
