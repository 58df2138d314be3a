"""The Task interface and its registry.

A Task turns labels into targets (`encode`), builds the loss (`loss`), turns logits into
probabilities (`probabilities`), scores them (`metrics`, `report`, `sample_losses`) and
turns them back into labels (`decode`). The training loop, evaluation, prediction,
export and interpret call these and never look at the label shape themselves.

Targets are one row per image: a class index (single-label) or a vector (multi-label).
Two markers stand in for a missing label: NO_LABEL (prediction) and UNREADABLE (a file
that did not decode); in a vector target every element holds the marker.

Adding a task shape = one subclass and its line in `tasks/catalog.py`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

NO_LABEL = -1  # target of an image without a label (predict)
UNREADABLE = -2  # target of a file that could not be decoded


def row_markers(targets: torch.Tensor | np.ndarray) -> Any:
    """One value per row: the target itself (class indices) or its first element (vectors);
    negative values are NO_LABEL / UNREADABLE."""
    return targets if targets.ndim == 1 else targets[:, 0]


def marker_like(targets: torch.Tensor | None, value: int) -> torch.Tensor:
    """One target row holding a marker (NO_LABEL / UNREADABLE), shaped like a row of
    `targets` (None: a scalar, as class indices are)."""
    if targets is None or targets.ndim == 1:
        return torch.tensor(value)
    return torch.full(targets.shape[1:], value, dtype=targets.dtype)


class TaskLoss(nn.Module):
    """A loss whose batch mean is `total(logits, y) / norm(y)`, so micro-batches can each
    contribute their exact share (`total(chunk) / norm(whole batch)`)."""

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.total(logits, targets) / self.norm(targets)

    def total(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def norm(self, targets: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


@dataclass
class Decoded:
    """One image's prediction: the predicted label(s), their probability, and the ranked
    (label, probability) list."""

    labels: list[str]
    probs: list[float]
    ranked: list[tuple[str, float]] = field(default_factory=list)


@dataclass
class Report:
    """Per-class rows (class, precision, recall, f1, support, ...) and a confusion matrix
    (rows: actual, columns: predicted; per task shape)."""

    rows: list[dict[str, Any]]
    confusion: np.ndarray
    text: str
    confused: list[tuple[int, str, str]] = field(default_factory=list)  # (count, actual, predicted)
    columns: tuple[str, ...] | None = None  # the confusion matrix's columns (None: the classes)


class Task(ABC):
    """What a label is, and everything that follows from it (see the module docstring)."""

    name: ClassVar[str]
    description: ClassVar[str]
    higher_is_better: ClassVar[dict[str, bool]]  # every metric `metrics` returns, and the losses
    headline: ClassVar[tuple[str, ...]]  # what cv and compare report: two metrics and "loss"

    def __init__(self, classes: Sequence[str]) -> None:
        self.classes = list(classes)
        self.index = {c: i for i, c in enumerate(self.classes)}

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @abstractmethod
    def encode(self, labels: Sequence[Any]) -> torch.Tensor:
        """Targets of many labels (an item's `label`), one row each."""

    @abstractmethod
    def marker(self, value: int) -> torch.Tensor:
        """One target row holding NO_LABEL or UNREADABLE."""

    @abstractmethod
    def loss(self, weights: torch.Tensor | None = None, label_smoothing: float = 0.0) -> TaskLoss:
        """The training loss; `weights`: from `balance_weights`, or None."""

    @abstractmethod
    def balance_weights(self, labels: Sequence[Any]) -> list[float]:
        """Loss weights for `--balance weights` from the training labels."""

    @abstractmethod
    def oversample_weights(self, targets: torch.Tensor) -> torch.Tensor:
        """Per-image sampling weights for `--balance oversample` (rare classes drawn as often)."""

    @abstractmethod
    def probabilities(self, logits: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def metrics(self, targets: np.ndarray, probs: np.ndarray, labels: Sequence[int] | None = None) -> dict[str, float]:
        """Validation metrics of labelled rows; NaN for every metric when there are none.
        Averages over classes (macro-F1, mAP) take the classes in `labels`, by default those
        present in `targets` (cv passes the ones present in every fold)."""

    @abstractmethod
    def report(self, targets: np.ndarray, probs: np.ndarray) -> Report: ...

    @abstractmethod
    def sample_losses(self, targets: np.ndarray, probs: np.ndarray) -> np.ndarray:
        """Each image's loss (top losses in interpret)."""

    @abstractmethod
    def describe(self, target: Any, probs: np.ndarray) -> tuple[str, str]:
        """(predicted, actual) of one image as short text (top-loss titles)."""

    @abstractmethod
    def decode(self, probs: np.ndarray, top_k: int) -> list[Decoded]: ...

    @abstractmethod
    def default_monitor(self, imbalance: float) -> str:
        """The metric early stopping watches under `--monitor auto`."""

    def tune_thresholds(self, targets: np.ndarray, probs: np.ndarray) -> np.ndarray | None:
        """Decision thresholds chosen on (targets, probs), set and returned; None where the
        task has none (single-label predicts the most probable class)."""
        return None

    def metadata(self) -> dict[str, Any]:
        """What a saved model needs to decode like this task (stored with the weights)."""
        return {"task": self.name}

    @classmethod
    def from_metadata(cls, classes: Sequence[str], metadata: dict[str, Any]) -> Task:
        """The task as `metadata()` described it."""
        return cls(classes)
