"""Classification metrics (scikit-learn computes them). Single-label: accuracy, error rate,
macro-F1, per-class report, confusion matrix. Multi-label: mAP (macro average precision
over the labels with a positive), micro / macro / samples F1, subset (exact-match)
accuracy, Hamming loss, and per-label precision / recall / F1 / AP with support.

Direction is explicit: `HIGHER_IS_BETTER` names every metric and whether to maximise it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def sk_metrics() -> Any:
    """scikit-learn's metrics, imported when a metric is first computed: predict and serve
    compute none, and the import is a second of their start-up (issue 23)."""
    import sklearn.metrics

    return sklearn.metrics


HIGHER_IS_BETTER = {"accuracy": True, "macro_f1": True, "error_rate": False, "val_loss": False, "train_loss": False}


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int,
                           labels: Sequence[int] | None = None) -> dict[str, float]:
    """Accuracy, error rate and macro-F1. Macro-F1 averages the classes in `labels`, by
    default those present in `y_true`: a class absent from the split has no F1 to measure
    (scoring it 0 would deflate every split that lacks a rare class)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if y_true.size == 0:
        return {"accuracy": float("nan"), "error_rate": float("nan"), "macro_f1": float("nan")}
    acc = float((y_true == y_pred).mean())
    scored = present_classes(y_true, num_classes) if labels is None else list(labels)
    f1 = sk_metrics().f1_score(y_true, y_pred, labels=scored, average="macro", zero_division=0) if scored else float("nan")
    return {"accuracy": acc, "error_rate": 1.0 - acc, "macro_f1": float(f1)}


def present_classes(y_true: np.ndarray, num_classes: int) -> list[int]:
    """The classes (labels) with at least one image in `y_true`: class indices, or the
    columns of a 0/1 matrix with a positive."""
    y = np.asarray(y_true)
    if y.ndim == 2:
        return np.flatnonzero((y > 0.5).sum(axis=0) > 0).tolist()
    return sorted(set(np.unique(y[y >= 0]).tolist()) & set(range(num_classes)))


def absent_note(y_true: np.ndarray, classes: list[str]) -> str:
    """A line naming the classes a split lacks (left out of the macro averages), or ""."""
    absent = sorted(set(range(len(classes))) - set(present_classes(y_true, len(classes))))
    if not absent:
        return ""
    names = ", ".join(classes[i] for i in absent[:10]) + (", ..." if len(absent) > 10 else "")
    return (f"macro averages over the {len(classes) - len(absent)} of {len(classes)} labels present here; "
            f"{len(absent)} absent ({names}) left out")


def confusion(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Rows: actual class; columns: predicted class."""
    return sk_metrics().confusion_matrix(y_true, y_pred, labels=list(range(num_classes)))


def per_class_report(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> list[dict[str, Any]]:
    p, r, f, s = sk_metrics().precision_recall_fscore_support(
        y_true, y_pred, labels=list(range(len(classes))), zero_division=0
    )
    return [
        {"class": c, "precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
        for i, c in enumerate(classes)
    ]


MULTILABEL_METRICS = ("mAP", "micro_f1", "macro_f1", "samples_f1", "subset_accuracy", "hamming_loss")


def multilabel_metrics(y_true: np.ndarray, probs: np.ndarray, y_pred: np.ndarray,
                       labels: Sequence[int] | None = None) -> dict[str, float]:
    """`y_true`, `y_pred`: (N, C) 0/1; `probs`: (N, C) sigmoid outputs. mAP and macro-F1
    average the labels in `labels`, by default those with a positive in `y_true` (AP and F1
    are undefined for a label that never occurs); the other metrics count every label."""
    if len(y_true) == 0:
        return {k: float("nan") for k in MULTILABEL_METRICS}
    y = (np.asarray(y_true) > 0.5).astype(int)
    scored = present_classes(y, y.shape[1]) if labels is None else list(labels)
    ap = mean_average_precision(y, probs, scored)
    macro = sk_metrics().f1_score(y[:, scored], y_pred[:, scored], average="macro", zero_division=0) if scored else float("nan")
    return {
        "mAP": float(ap),
        "micro_f1": float(sk_metrics().f1_score(y, y_pred, average="micro", zero_division=0)),
        "macro_f1": float(macro),
        "samples_f1": float(sk_metrics().f1_score(y, y_pred, average="samples", zero_division=1)),
        "subset_accuracy": float(sk_metrics().accuracy_score(y, y_pred)),
        "hamming_loss": float(sk_metrics().hamming_loss(y, y_pred)),
    }


def mean_average_precision(y_true: np.ndarray, probs: np.ndarray, labels: Sequence[int] | None = None) -> float:
    """mAP: the macro average of each label's average precision over `labels` (default:
    the labels with a positive; AP is undefined for one that never occurs). The one mAP of
    the package (metrics, cv, the advisor)."""
    y = (np.asarray(y_true) > 0.5).astype(int)
    scored = present_classes(y, y.shape[1]) if labels is None else list(labels)
    return float(sk_metrics().average_precision_score(y[:, scored], probs[:, scored], average="macro")) if scored else float("nan")


def per_label_report(y_true: np.ndarray, probs: np.ndarray, y_pred: np.ndarray, labels: list[str],
                     thresholds: np.ndarray) -> list[dict[str, Any]]:
    y = (np.asarray(y_true) > 0.5).astype(int)
    p, r, f, s = sk_metrics().precision_recall_fscore_support(y, y_pred, zero_division=0) if len(y) else ([0.0] * len(labels),) * 4
    rows = []
    for i, name in enumerate(labels):
        ap = float(sk_metrics().average_precision_score(y[:, i], probs[:, i])) if len(y) and y[:, i].any() else float("nan")
        rows.append({"class": name, "precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "ap": ap,
                     "threshold": float(thresholds[i]), "support": int(s[i])})
    return rows


def most_confused(matrix: np.ndarray, classes: list[str]) -> list[tuple[int, str, str]]:
    """(count, actual, predicted) of every off-diagonal cell with a count, largest first."""
    n = len(classes)
    return sorted(((int(matrix[i, j]), classes[i], classes[j]) for i in range(n) for j in range(n)
                   if i != j and matrix[i, j] > 0), reverse=True)


def format_table(report: list[dict[str, Any]], classes: list[str]) -> list[str]:
    """The per-class rows as aligned text: every numeric column the rows have."""
    width = max(8, *(len(c) for c in classes))
    keys = [k for k in report[0] if k != "class"] if report else []
    lines = [f"{'class':<{width}}  " + "  ".join(f"{k:>9}" for k in keys)]
    for row in report:
        cells = [f"{row[k]:>9d}" if isinstance(row[k], int) else f"{row[k]:>9.3f}" for k in keys]
        lines.append(f"{row['class']:<{width}}  " + "  ".join(cells))
    return lines


def format_matrix(matrix: np.ndarray, rows: list[str], columns: list[str], title: str) -> list[str]:
    width = max(8, *(len(c) for c in rows))
    cell = max(5, *(len(c) for c in columns), len(str(int(matrix.max(initial=0)))))
    lines = [title, " " * (width + 2) + " ".join(f"{c:>{cell}}" for c in columns)]
    for c, row in zip(rows, matrix):
        lines.append(f"{c:<{width}}  " + " ".join(f"{int(v):>{cell}d}" for v in row))
    return lines


def format_report(report: list[dict[str, Any]], matrix: np.ndarray, classes: list[str]) -> str:
    return "\n".join(format_table(report, classes) + [""] + format_matrix(
        matrix, classes, classes, "confusion matrix (rows: actual, columns: predicted)"))
