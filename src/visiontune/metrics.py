"""Classification metrics: accuracy, error rate, macro-F1, per-class report, confusion.

Direction is explicit: `HIGHER_IS_BETTER` names the metrics to maximise.
"""

from __future__ import annotations

from typing import Any

import numpy as np

HIGHER_IS_BETTER = {"accuracy": True, "macro_f1": True, "error_rate": False, "val_loss": False, "train_loss": False}


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> dict[str, float]:
    from sklearn.metrics import f1_score

    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if y_true.size == 0:
        return {"accuracy": float("nan"), "error_rate": float("nan"), "macro_f1": float("nan")}
    acc = float((y_true == y_pred).mean())
    f1 = f1_score(y_true, y_pred, labels=list(range(num_classes)), average="macro", zero_division=0)
    return {"accuracy": acc, "error_rate": 1.0 - acc, "macro_f1": float(f1)}


def confusion(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Rows: actual class; columns: predicted class."""
    from sklearn.metrics import confusion_matrix

    return confusion_matrix(y_true, y_pred, labels=list(range(num_classes)))


def per_class_report(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> list[dict[str, Any]]:
    from sklearn.metrics import precision_recall_fscore_support

    p, r, f, s = precision_recall_fscore_support(
        y_true, y_pred, labels=list(range(len(classes))), zero_division=0
    )
    return [
        {"class": c, "precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
        for i, c in enumerate(classes)
    ]


def format_report(report: list[dict[str, Any]], matrix: np.ndarray, classes: list[str]) -> str:
    width = max(8, *(len(c) for c in classes))
    lines = [f"{'class':<{width}}  precision  recall     f1  support"]
    for row in report:
        lines.append(
            f"{row['class']:<{width}}  {row['precision']:9.3f}  {row['recall']:6.3f}  {row['f1']:5.3f}  {row['support']:7d}"
        )
    lines += ["", "confusion matrix (rows: actual, columns: predicted)"]
    cell = max(5, *(len(c) for c in classes), len(str(int(matrix.max(initial=0)))))
    lines.append(" " * (width + 2) + " ".join(f"{c:>{cell}}" for c in classes))
    for c, row in zip(classes, matrix):
        lines.append(f"{c:<{width}}  " + " ".join(f"{int(v):>{cell}d}" for v in row))
    return "\n".join(lines)
