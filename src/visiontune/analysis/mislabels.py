"""Suspected label errors over the whole dataset, from out-of-fold evidence.

Out-of-fold probabilities come from `visiontune cv` (oof.csv) when given, otherwise from the
converged probe (frozen/probe.py: C chosen once by its cross-validation, then one fit per
fold) on cached frozen features (`frozen.probe.oof_outputs`; bench/mislabels.py: more precise than a
fixed-C scikit-learn probe on hymenoptera and digits). Each image is ranked
by self-confidence, p(given label) (lowest first). Which images are flagged is confident
learning (Northcutt et al. 2021) as cleanlab implements it: `find_label_issues` with
`prune_by_noise_rate` (install the optional extra `visiontune[cleanlab]`). Without
cleanlab, the plain confident-joint off-diagonal is used (an image is flagged when another
class's probability reaches that class's mean self-confidence); bench/mislabels.py
measures both. `flag_method()` names the method in use; interpret's report says which.
"""

from __future__ import annotations

import importlib.metadata
import warnings
from dataclasses import dataclass

import numpy as np
from sklearn import config_context
from sklearn.neighbors import NearestNeighbors

from visiontune.tasks.base import Task
from visiontune.tasks.labels import Label, class_index, indicator, is_multi, label_set


@dataclass(frozen=True)
class Suspect:
    path: str
    label: str
    predicted: str
    p_label: float
    p_predicted: float
    flagged: bool  # a label issue by confident learning (see flag_method())
    suggested: Label = ""  # the label the evidence points to, in the data's shape (review's suggestion)


def rank_mislabels(paths: list[str], labels: list[Label], probs: np.ndarray, classes: list[str]) -> list[Suspect]:
    """Every image, lowest self-confidence first, with its most likely other class and
    whether confident learning flags it. Label sets: see `rank_label_sets`."""
    if labels and is_multi(labels[0]):  # label sets: per-label evidence, cleanlab's multi-label filter
        return rank_label_sets(paths, labels, probs, classes)
    idx = class_index(classes)
    y = np.array([idx[lb] for lb in labels])
    self_conf = probs[np.arange(len(y)), y]
    flagged = flag_label_issues(y, probs)
    others = probs.copy()
    others[np.arange(len(y)), y] = -1.0
    out = []
    for i in np.argsort(self_conf, kind="stable"):
        best = int(np.argmax(others[i]))
        out.append(Suspect(paths[i], labels[i], classes[best], float(self_conf[i]), float(probs[i, best]),
                           bool(flagged[i]), classes[best]))
    return out


def rank_label_sets(paths: list[str], labels: list[Label], probs: np.ndarray, classes: list[str]) -> list[Suspect]:
    """Multi-label: an image's self-confidence is its least agreeing label's (p where the
    label is given, 1 - p where it is not); `predicted` names the suspected changes
    ("+dog" missing, "-cat" extra: out-of-fold p on the other side of 0.5) and `suggested`
    is the set they lead to; flags from cleanlab's multi-label find_label_issues (or any
    suspected change without cleanlab)."""
    y = indicator(labels, classes)
    agree = np.where(y == 1, probs, 1 - probs)
    self_conf = agree.min(axis=1)
    flagged = _flag_label_sets(y, probs)
    out = []
    for i in np.argsort(self_conf, kind="stable"):
        wrong = agree[i] < 0.5
        changes = [("-" if y[i, c] else "+") + classes[c] for c in np.flatnonzero(wrong)]
        suggested = tuple(classes[c] for c in np.flatnonzero((y[i] == 1) != wrong))  # the given set, changes applied
        out.append(Suspect(paths[i], " ".join(label_set(labels[i])), " ".join(changes), float(self_conf[i]),
                           float(1 - self_conf[i]), bool(flagged[i]), suggested))
    return out


def _flag_label_sets(y: np.ndarray, probs: np.ndarray) -> np.ndarray:
    if _cleanlab_version():
        from cleanlab.multilabel_classification.filter import find_label_issues  # optional extra

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return np.asarray(find_label_issues([list(np.flatnonzero(r)) for r in y], probs), dtype=bool)
    return ((probs >= 0.5) != (y == 1)).any(axis=1)


def flag_method() -> str:
    """The name of the flagging method in use, for the report."""
    version = _cleanlab_version()
    if version:
        return f"cleanlab {version} find_label_issues (confident learning, prune_by_noise_rate)"
    return ("confident-joint off-diagonal (cleanlab is not installed; pip install 'visiontune[cleanlab]' "
            "for its noise-rate pruning)")


def flag_label_issues(y: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Boolean mask of likely label errors given out-of-fold `probs`."""
    if _cleanlab_version():
        from cleanlab.filter import find_label_issues  # optional extra

        with warnings.catch_warnings():  # small classes: cleanlab warns it may miss some, and still answers
            warnings.simplefilter("ignore", UserWarning)
            return np.asarray(find_label_issues(y, probs, filter_by="prune_by_noise_rate"), dtype=bool)
    return off_diagonal(y, probs)


def off_diagonal(y: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """The plain confident-joint rule (what `flag_label_issues` falls back to without
    cleanlab): an image is flagged when another class's probability reaches that class's
    threshold (the mean self-confidence of the images labelled with it). Y holds class
    indices, PROBS one row of out-of-sample class probabilities per image."""
    classes = probs.shape[1]
    self_conf = probs[np.arange(len(y)), y]
    thresholds = np.array([self_conf[y == c].mean() if (y == c).any() else 1.0 for c in range(classes)])
    above = probs >= thresholds[None, :]
    above[np.arange(len(y)), y] = False
    return above.any(axis=1)


def _cleanlab_version() -> str | None:
    try:
        return importlib.metadata.version("cleanlab")
    except importlib.metadata.PackageNotFoundError:
        return None


def rank_residuals(paths: list[str], targets: np.ndarray, outputs: np.ndarray, task: Task,
                   flag_z: float = 3.0) -> list[Suspect]:
    """Every image, largest out-of-fold |residual| first: `predicted` is the probe's number,
    `p_label` the robust z-score of the residual (|r - median| / (1.4826 MAD)); flagged
    above `flag_z` (a target that far from what the image shows is worth a look)."""
    residual = outputs.reshape(-1) - targets.reshape(-1)
    mad = 1.4826 * np.median(np.abs(residual - np.median(residual))) or float(np.std(residual)) or 1.0
    z = np.abs(residual - np.median(residual)) / mad
    predicted = outputs.reshape(-1)
    return [Suspect(paths[i], task.label_text(float(targets[i])), f"{predicted[i]:.4g}", float(z[i]),
                    float(residual[i]), bool(z[i] > flag_z), float(predicted[i])) for i in np.argsort(-z, kind="stable")]


OUTLIER_MEMORY_MB = 256  # working memory of the neighbour search, whatever the number of images


def rank_outliers(features: np.ndarray, k: int = 5) -> np.ndarray:
    """Atypicality of each image: 1 - mean cosine similarity to its k nearest neighbours in
    feature space (placeholders, blank or off-topic images score high). Exact brute-force
    search in row blocks (scikit-learn's chunked distances), so memory stays bounded by
    OUTLIER_MEMORY_MB instead of growing with N^2."""
    n = len(features)
    if n < 2:
        return np.zeros(n)
    k = max(1, min(k, n - 1))
    unit = features / np.maximum(1e-12, np.linalg.norm(features, axis=1, keepdims=True))
    search = NearestNeighbors(metric="cosine", algorithm="brute").fit(unit)
    with config_context(working_memory=OUTLIER_MEMORY_MB):
        distances, _ = search.kneighbors(n_neighbors=k)  # no query: each image is not its own neighbour
    return distances.mean(axis=1)
