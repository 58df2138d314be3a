"""Matplotlib figures saved as PNG. Built with `matplotlib.figure.Figure` directly (no
pyplot): no global state, no display and no backend to choose. Each figure also renders
itself in Jupyter (`_repr_png_`), without pyplot's inline backend."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure


class ShownFigure(Figure):
    """A Figure that Jupyter displays as a PNG."""

    def _repr_png_(self) -> bytes:
        buffer = io.BytesIO()
        self.savefig(buffer, format="png", dpi=80)
        return buffer.getvalue()


def _subplots(rows: int, cols: int, figsize: tuple[float, float], **kw: Any) -> tuple[Figure, Any]:
    fig = ShownFigure(figsize=figsize)
    return fig, fig.subplots(rows, cols, **kw)


def save_lr_curve(path: Path, lrs: list[float], losses: list[float], suggested: float) -> Path:
    """The learning-rate range test: smoothed loss against the head's LR (log scale)."""
    fig, ax = _subplots(1, 1, (6, 4))
    ax.plot(lrs, losses)
    ax.axvline(suggested, color="red", linestyle="--", label=f"suggested {suggested:.2e}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (head)")
    ax.set_ylabel("smoothed training loss")
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def save_confusion(path: Path, matrix: np.ndarray, classes: list[str], columns: list[str] | None = None) -> None:
    confusion_figure(matrix, classes, columns).savefig(path, dpi=90)


def confusion_figure(matrix: np.ndarray, classes: list[str], columns: list[str] | None = None) -> Figure:
    """Actual x predicted counts and the same normalised by actual; with `columns` (e.g.
    TP/FP/FN/TN per label) one panel of counts with those columns."""
    norm = matrix / np.maximum(1, matrix.sum(axis=1, keepdims=True))
    side = max(4.0, 0.6 * len(classes) + 2)
    panels = [(matrix, "counts")] + ([(norm, "normalised by actual")] if columns is None else [])
    fig, axes = _subplots(1, len(panels), (side * len(panels), side), squeeze=False)
    for ax, (data, title) in zip(axes[0], panels):
        ax.imshow(data, cmap="Blues")
        ax.set_xticks(range(data.shape[1]), columns or classes, rotation=45, ha="right")
        ax.set_yticks(range(len(classes)), classes)
        ax.set_xlabel("predicted" if columns is None else "")
        ax.set_ylabel("actual" if columns is None else "label")
        ax.set_title(title)
        for (i, j), v in np.ndenumerate(data):
            ax.text(j, i, f"{v:.2f}" if data is norm else f"{int(v)}", ha="center", va="center",
                    color="white" if v > data.max() / 2 else "black")
    fig.tight_layout()
    return fig


def save_reliability(path: Path, curves: dict[str, list[tuple[float, float, int]]], ece: dict[str, float],
                     what: str = "accuracy") -> None:
    """The reliability diagram: per confidence bin, `what` (accuracy; the share of labels
    present) against the mean confidence, one line per curve (before / after calibration);
    on the diagonal, a probability means what it says."""
    fig, ax = _subplots(1, 1, (5, 5))
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfectly calibrated")
    for name, points in curves.items():
        if points:
            conf, acc, count = zip(*points)
            ax.plot(conf, acc, marker="o", label=f"{name} (ECE {ece[name]:.3f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (mean of the bin)")
    ax.set_ylabel(what)
    ax.legend(loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)


def save_residuals(path: Path, targets: np.ndarray, predictions: np.ndarray, name: str) -> None:
    residuals_figure(targets, predictions, name).savefig(path, dpi=90)


def residuals_figure(targets: np.ndarray, predictions: np.ndarray, name: str) -> Figure:
    """Regression: predicted vs true (the diagonal is perfect) and the residual by target
    (a trend means the model shrinks towards the mean, or misses a range)."""
    y, p = np.asarray(targets, float).reshape(-1), np.asarray(predictions, float).reshape(-1)
    fig, (left, right) = _subplots(1, 2, (10, 4.5))
    lo, hi = (float(min(y.min(), p.min())), float(max(y.max(), p.max()))) if len(y) else (0.0, 1.0)
    left.scatter(y, p, s=10, alpha=0.6)
    left.plot([lo, hi], [lo, hi], color="grey", linewidth=1)
    left.set_xlabel(f"true {name}")
    left.set_ylabel(f"predicted {name}")
    left.set_title("predicted vs true")
    right.scatter(y, p - y, s=10, alpha=0.6)
    right.axhline(0, color="grey", linewidth=1)
    right.set_xlabel(f"true {name}")
    right.set_ylabel("residual (predicted - true)")
    right.set_title("residual by target")
    fig.tight_layout()
    return fig


def save_grid(path: Path, images: list[np.ndarray], titles: list[str], overlays: list[np.ndarray] | None = None,
              cols: int = 4) -> None:
    grid_figure(images, titles, overlays, cols).savefig(path, dpi=80)


def grid_figure(images: list[np.ndarray], titles: list[str], overlays: list[np.ndarray] | None = None,
                cols: int = 4) -> Figure:
    """Images in a grid with a title each (and a heat map over each with `overlays`)."""
    rows = max(1, math.ceil(len(images) / cols))
    fig, axes = _subplots(rows, cols, (3.2 * cols, 3.4 * rows), squeeze=False)
    for k, ax in enumerate(axes.ravel()):
        ax.axis("off")
        if k < len(images):
            ax.imshow(images[k])
            if overlays is not None:
                ax.imshow(overlays[k], cmap="jet", alpha=0.45)
            ax.set_title(titles[k], fontsize=8)
    fig.tight_layout()
    return fig


NOT_METRICS = ("epoch", "train_loss", "val_loss", "lr", "seconds", "phase", "steps", "candidate")
HEADLINE_METRICS = ("accuracy", "macro_f1", "mAP", "mae", "r2")  # what the curves show when the history has them


def save_curves(path: Path, history: list[dict[str, Any]]) -> None:
    curves_figure(history).savefig(path, dpi=90)


def curves_figure(history: list[dict[str, Any]]) -> Figure:
    """Losses and the validation metrics per epoch (`metrics`: by default the task's
    headline ones found in the history, else every other number in it)."""
    epochs = [h["epoch"] for h in history]
    fig, axes = _subplots(1, 2, (10, 3.8))
    shown = [k for k in dict.fromkeys(k for h in history for k in h)
             if k not in NOT_METRICS and all(isinstance(h.get(k, 0.0), (int, float)) for h in history)]
    headline = [k for k in HEADLINE_METRICS if k in shown]
    panels = ((("train_loss", "val_loss"), "loss"), (tuple(headline or shown), "validation metrics"))
    for ax, (keys, title) in zip(axes, panels):
        for key in keys:
            if any(key in h for h in history):
                ax.plot(epochs, [h.get(key, float("nan")) for h in history], marker="o", label=key)
        ax.set_xlabel("epoch")
        ax.set_title(title)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    return fig


def save_filters(path: Path, filters: np.ndarray) -> None:
    n = len(filters)
    cols = min(16, n)
    rows = math.ceil(n / cols)
    fig, axes = _subplots(rows, cols, (cols * 0.6, rows * 0.6), squeeze=False)
    for k, ax in enumerate(axes.ravel()):
        ax.axis("off")
        if k < n:
            ax.imshow(filters[k], interpolation="nearest")
    fig.savefig(path, dpi=90)
