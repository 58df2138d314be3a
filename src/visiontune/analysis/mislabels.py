"""Suspected label errors over the whole dataset, from out-of-fold evidence.

Out-of-fold probabilities come from `visiontune cv` (oof.csv) when given, otherwise from a
quick cross-validated logistic regression on cached frozen features. Each image is ranked
by self-confidence, p(given label) (lowest first); following confident learning (Northcutt
et al. 2021), an image is flagged when another class's probability reaches that class's
threshold (the mean self-confidence of images labelled with it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from visiontune.data.splits import fold_count


@dataclass(frozen=True)
class Suspect:
    path: str
    label: str
    predicted: str
    p_label: float
    p_predicted: float
    flagged: bool  # confident-learning off-diagonal


def rank_mislabels(paths: list[str], labels: list[str], probs: np.ndarray, classes: list[str]) -> list[Suspect]:
    idx = {c: i for i, c in enumerate(classes)}
    y = np.array([idx[lb] for lb in labels])
    self_conf = probs[np.arange(len(y)), y]
    thresholds = np.array([self_conf[y == c].mean() if (y == c).any() else 1.0 for c in range(len(classes))])
    out = []
    for i in np.argsort(self_conf, kind="stable"):
        above = [(probs[i, c], c) for c in range(len(classes)) if c != y[i] and probs[i, c] >= thresholds[c]]
        best = max(above) if above else max((probs[i, c], c) for c in range(len(classes)) if c != y[i])
        out.append(Suspect(paths[i], labels[i], classes[best[1]], float(self_conf[i]), float(best[0]), bool(above)))
    return out


def probe_estimator() -> Any:
    """The linear probe used on frozen features (here and by the advisor): standardised
    features, L2-regularised logistic regression."""
    return make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))


def oof_probabilities(features: np.ndarray, labels: list[str], classes: list[str], seed: int = 0,
                      folds: int = 5) -> np.ndarray:
    """Out-of-fold class probabilities from a logistic-regression probe on `features`."""
    idx = {c: i for i, c in enumerate(classes)}
    y = np.array([idx[lb] for lb in labels])
    k = fold_count(labels, folds)
    raw = cross_val_predict(probe_estimator(), features, y, cv=StratifiedKFold(k, shuffle=True, random_state=seed),
                            method="predict_proba")
    present = sorted(set(y.tolist()))
    probs = np.zeros((len(y), len(classes)))
    probs[:, present] = raw
    return probs


def rank_outliers(features: np.ndarray, k: int = 5) -> np.ndarray:
    """Atypicality of each image: 1 - mean cosine similarity to its k nearest neighbours in
    feature space (placeholders, blank or off-topic images score high). Indices, most odd first,
    and the scores."""
    f = features / np.maximum(1e-12, np.linalg.norm(features, axis=1, keepdims=True))
    sim = f @ f.T
    np.fill_diagonal(sim, -np.inf)
    k = max(1, min(k, len(f) - 1))
    nearest = -np.sort(-sim, axis=1)[:, :k]
    return 1.0 - nearest.mean(axis=1)
