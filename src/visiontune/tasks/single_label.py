"""One class per image: softmax over the classes, cross-entropy, accuracy / macro-F1."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from visiontune.errors import DataError
from visiontune.tasks.base import Decoded, Probabilities, Report, Task, TaskLoss
from visiontune.tasks.calibration import Calibrator
from visiontune.tasks.conformal import Conformal
from visiontune.tasks.metrics import (
    HIGHER_IS_BETTER,
    absent_note,
    classification_metrics,
    confusion,
    format_report,
    most_confused,
    per_class_report,
)

log = logging.getLogger(__name__)

IMBALANCE_WARN_RATIO = 3.0  # largest / smallest training class above which accuracy misleads


class CrossEntropy(TaskLoss):
    """Cross-entropy with optional class weights and label smoothing (PyTorch's mean:
    the weighted sum over the batch divided by the weights of the true classes)."""

    def __init__(self, weight: torch.Tensor | None = None, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.weight = weight
        self.label_smoothing = label_smoothing

    def total(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(logits, targets, weight=self.weight,
                                           label_smoothing=self.label_smoothing, reduction="sum")

    def norm(self, targets: torch.Tensor) -> torch.Tensor:
        if self.weight is not None and targets.ndim == 1:  # soft (mixed) targets: PyTorch divides by N
            return self.weight[targets].sum()
        return torch.tensor(float(len(targets)), device=targets.device)


def class_weight_values(counts: list[int]) -> list[float]:
    """w_c = N / (C * n_c) (scikit-learn's 'balanced'): mean 1 over the samples."""
    total, n = sum(counts), len(counts)
    return [total / (n * c) if c else 0.0 for c in counts]


class SingleLabel(Task):
    exported_outputs = "probabilities"  # export_module: the file outputs them
    calibrator_type = Calibrator
    conformal_type = Conformal
    name = "single-label"
    headline = ("accuracy", "macro_f1", "loss")
    higher_is_better = HIGHER_IS_BETTER

    @classmethod
    def settle(cls, labels: list[Any], where: list[str], delim: str) -> list[Any]:
        """A label set is an error naming its image (use --task multi-label)."""
        for label, w in zip(labels, where):
            if isinstance(label, tuple):
                raise DataError(f"{w} has the label set {list(label)} but --task is single-label; "
                                "use --task multi-label")
        return [label if isinstance(label, str) else str(label) for label in labels]

    def encode(self, labels: Sequence[Any]) -> torch.Tensor:
        return torch.tensor([self.index[label] for label in labels], dtype=torch.long)

    def marker(self, value: int) -> torch.Tensor:
        return torch.tensor(value, dtype=torch.long)

    def loss(self, weights: torch.Tensor | None = None, label_smoothing: float = 0.0) -> TaskLoss:
        return CrossEntropy(weights, label_smoothing)

    def balance_weights(self, labels: Sequence[Any]) -> list[float]:
        counts = Counter(labels)
        return class_weight_values([counts.get(c, 0) for c in self.classes])

    def oversample_weights(self, targets: torch.Tensor) -> torch.Tensor:
        """1 / images of the class: each class equally likely."""
        counts = torch.bincount(targets, minlength=self.num_outputs).float()
        return (1.0 / counts.clamp(min=1))[targets]

    def export_module(self) -> nn.Module:
        return Probabilities(self)

    def average_views(self, outputs: torch.Tensor) -> torch.Tensor:
        """An exported file's probabilities: softmax of the views' mean log-probability, which
        is softmax of their mean logits (log p = z - logsumexp z; the constant cancels)."""
        if not self.outputs_mapped:
            return super().average_views(outputs)
        return outputs.float().clamp_min(torch.finfo(torch.float32).tiny).log().mean(dim=1).softmax(dim=1)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.float() if self.outputs_mapped else logits.softmax(dim=1)

    def predictions(self, probs: np.ndarray) -> np.ndarray:
        return probs.argmax(axis=1) if len(probs) else np.zeros(0, dtype=int)

    def metrics(self, targets: np.ndarray, probs: np.ndarray, labels: Sequence[int] | None = None) -> dict[str, float]:
        return classification_metrics(targets, self.predictions(probs), self.num_outputs, labels)

    def report(self, targets: np.ndarray, probs: np.ndarray) -> Report:
        preds = self.predictions(probs)
        rows = per_class_report(targets, preds, self.classes)
        matrix = confusion(targets, preds, self.num_outputs)
        text = "\n".join(filter(None, [format_report(rows, matrix, self.classes), absent_note(targets, self.classes)]))
        return Report(rows, matrix, text, most_confused(matrix, self.classes))

    def sample_losses(self, targets: np.ndarray, probs: np.ndarray) -> np.ndarray:
        return -np.log(np.clip(probs[np.arange(len(targets)), targets], 1e-12, 1.0))

    def describe(self, target: Any, probs: np.ndarray) -> tuple[str, str]:
        """(predicted, actual) of one image, as short text."""
        return self.classes[int(np.argmax(probs))], self.classes[int(target)]

    def decode(self, probs: np.ndarray, top_k: int) -> list[Decoded]:
        k = max(1, min(top_k, self.num_outputs))
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        out = []
        for row, idx in zip(probs, order):
            ranked = [(self.classes[i], float(row[i])) for i in idx]
            out.append(Decoded([ranked[0][0]], [ranked[0][1]], ranked, scores=dict(zip(self.classes, map(float, row)))))
        return out

    def default_monitor(self, imbalance: float) -> str:
        if imbalance > IMBALANCE_WARN_RATIO:
            log.warning("classes are imbalanced (largest/smallest = %.1f): accuracy is misleading; "
                        "early stopping monitors macro_f1 (set --monitor to override; --balance weights|oversample "
                        "to rebalance)", imbalance)
            return "macro_f1"
        return "val_loss"
