"""The Task interface and its registry.

A Task turns labels into targets (`encode`), builds the loss (`loss`), turns logits into
probabilities (`probabilities`), scores them (`metrics`, `report`, `sample_losses`) and
turns them back into labels (`decode`). The training loop, evaluation, prediction,
export and interpret call these and never look at the label shape themselves.

Targets are one row per image: a class index (single-label), a vector (multi-label) or a
number (regression). Two markers stand in for a missing label: NO_LABEL (prediction) and
UNREADABLE (a file that did not decode). A marker is a value no target can take: a
negative class index, or, for float targets (label sets, numbers, where -1 is a real
value), NaN (NO_LABEL) and -inf (UNREADABLE); in a vector every element holds it.
`known_rows` / `unreadable_rows` read them, by dtype, never by shape or value range.

The Task also owns the label on the data side (classmethods, no classes needed yet):
parsing a table cell or a label function's value (`parse_label`), writing it back
(`label_text`), what splits and folds stratify by (`strata`) and the class list
(`classes_of`). Three companions, which a new shape takes as they are or subclasses,
hold the rest: how predictions are written (the printed line, predict's CSV columns and
JSON record, cv's out-of-fold cells) is `task.output` (tasks/output.py); how its outputs
are calibrated and turned into prediction sets with a coverage guarantee are
`task.calibrator` (tasks/calibration.py) and `task.conformal` (tasks/conformal.py); how a person
gives a label on the review pages and in a suggestions CSV is `task.form` (tasks/form.py,
reachable from the class too); how the shape is named and summarised in text is
`Task.wording` (tasks/wording.py).

Adding a task shape = one subclass and its line in `tasks/catalog.py`.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from visiontune.errors import ConfigError, DataError
from visiontune.tasks.calibration import Calibrator, NoCalibration
from visiontune.tasks.conformal import Conformal
from visiontune.tasks.form import Form, FormOf
from visiontune.tasks.labels import class_index, label_counts
from visiontune.tasks.metrics import present_classes
from visiontune.tasks.objective import CALIBRATED_LOSS, LOSSES, Objective
from visiontune.tasks.output import Decoded, Output
from visiontune.tasks.wording import CLASSES, Wording

log = logging.getLogger(__name__)

NO_LABEL = -1  # target of an image without a label (predict)
UNREADABLE = -2  # target of a file that could not be decoded


def row_markers(targets: torch.Tensor | np.ndarray) -> Any:
    """One value per row: the target itself (class indices, numbers) or its first element
    (vectors), where a marker would be."""
    return targets if targets.ndim == 1 else targets[:, 0]


def _floating(targets: torch.Tensor | np.ndarray) -> bool:
    return targets.is_floating_point() if isinstance(targets, torch.Tensor) else np.issubdtype(targets.dtype,
                                                                                                 np.floating)


def known_rows(targets: torch.Tensor | np.ndarray) -> Any:
    """True for each row with a real target (not NO_LABEL, not UNREADABLE)."""
    first = row_markers(targets)
    if _floating(targets):
        return torch.isfinite(first) if isinstance(first, torch.Tensor) else np.isfinite(first)
    return first >= 0


def unreadable_rows(targets: torch.Tensor | np.ndarray) -> Any:
    """True for each row the reader marked UNREADABLE."""
    first = row_markers(targets)
    if _floating(targets):
        return torch.isneginf(first) if isinstance(first, torch.Tensor) else np.isneginf(first)
    return first == UNREADABLE


def marker_like(targets: torch.Tensor | None, value: int) -> torch.Tensor:
    """One target row holding a marker (NO_LABEL / UNREADABLE), shaped and typed like a row
    of `targets` (None: a class index)."""
    if targets is None or not targets.is_floating_point():
        return torch.tensor(value)
    fill = float("nan") if value == NO_LABEL else float("-inf")
    return torch.full(targets.shape[1:], fill, dtype=targets.dtype)


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
class Report:
    """Per-class rows (class, precision, recall, f1, support, ...) and a confusion matrix
    (rows: actual, columns: predicted; per task shape)."""

    rows: list[dict[str, Any]]
    confusion: np.ndarray | None  # None: the task has no classes to confuse (regression)
    text: str
    confused: list[tuple[int, str, str]] = field(default_factory=list)  # (count, actual, predicted)
    columns: tuple[str, ...] | None = None  # the confusion matrix's columns (None: the classes)


class Task(ABC):
    """What a label is, and everything that follows from it (see the module docstring)."""

    name: ClassVar[str]
    higher_is_better: ClassVar[dict[str, bool]]  # every metric `metrics` returns, and the losses
    headline: ClassVar[tuple[str, ...]]  # what cv and compare report: two metrics and "loss"
    mixup_targets: ClassVar[str | None] = "one-hot"  # how timm's Mixup mixes targets ("multi-hot"; None: it cannot)
    score_metric: ClassVar[str] = "accuracy"  # the advisor's score (higher is better, 1 perfect; chance below)
    confusable: ClassVar[bool] = True  # outputs are classes a label can be confused with (mislabels by confident learning)
    ensemble: ClassVar[int] = 1  # fits whose disagreement `uncertainty` reads (1: one model's outputs say it)
    wording: ClassVar[Wording] = CLASSES  # how the shape is named in summaries, errors, the card (tasks/wording.py)
    output_type: ClassVar[type[Output]] = Output  # how predictions are written (tasks/output.py)
    # how outputs are calibrated, and their prediction sets with a guarantee (tasks/calibration.py,
    # tasks/conformal.py); a new shape has neither until it names them (None: no sets)
    calibrator_type: ClassVar[type[Calibrator]] = NoCalibration
    conformal_type: ClassVar[type[Conformal] | None] = None
    form = FormOf(Form)  # how the review pages and a suggestions CSV take a label (tasks/form.py)

    exported_outputs: ClassVar[str] = "logits"  # what an exported file outputs (`export_module`)

    def __init__(self, classes: Sequence[str]) -> None:
        self.classes = list(classes)
        self.index = class_index(self.classes)
        self.outputs_mapped = False  # an exported file's task: its outputs are mapped already (`export_module`)

    @property
    def num_outputs(self) -> int:
        """The head's outputs: one per class (regression: one, the target)."""
        return len(self.classes)

    @property
    def output(self) -> Output:
        """How this task's predictions are written: the printed line, predict's CSV and
        JSON, cv's out-of-fold cells (tasks/output.py)."""
        return self.output_type(self)

    @property
    def calibrator(self) -> Calibrator:
        """How this task's outputs are calibrated after training (tasks/calibration.py)."""
        return self.calibrator_type(self)

    @property
    def conformal(self) -> Conformal | None:
        """This task's prediction sets with a coverage guarantee (tasks/conformal.py; None:
        the shape has none)."""
        return self.conformal_type(self) if self.conformal_type is not None else None

    def objective(self, metric: str, mode: str = "auto") -> Objective:
        """`metric` and its direction: `mode` ("min" / "max"), or with "auto" the one this
        task's metric improves in (ConfigError for a metric the task lacks); a metric that
        is not a loss has its ties broken by the validation loss (accuracy on a small split
        moves by whole images)."""
        monitors = self.monitors()
        if metric not in monitors:
            raise ConfigError(f"--monitor {metric!r} is not a metric of the {self.name} task; available: "
                              f"{', '.join(monitors)}")
        return Objective(metric, mode if mode != "auto" else ("max" if monitors[metric] else "min"),
                         "" if metric in LOSSES or "val_loss" not in monitors else "val_loss")

    def monitors(self) -> dict[str, bool]:
        """What early stopping may watch, and whether higher is better: the task's metrics
        and losses, and `calibrated_loss` (`calibrated_loss()`) where its outputs have a
        calibrator."""
        return {**self.higher_is_better, **({CALIBRATED_LOSS: False} if self.calibrator.kind != "none" else {})}

    def calibrated_loss(self, targets: np.ndarray, probs: np.ndarray) -> dict[str, float]:
        """{"calibrated_loss": the validation loss after the calibrator's temperature,
        fitted on these very outputs} (tasks/calibration.py): a loss that no longer
        punishes over-confidence, only the ranking of the classes; {} where the outputs
        have no calibrator or too few rows to fit one."""
        fit = self.calibrator.fit(targets, probs)
        return {} if fit is None else {CALIBRATED_LOSS: float(fit.after["nll"])}

    # -- the data side (classmethods: the classes are not known yet) ----------------------

    @classmethod
    def parse_label(cls, text: Any, delim: str, where: str) -> Any:
        """A table cell (or a label function's value) as this task's label ("" if empty)."""
        return str(text).strip()

    @classmethod
    def label_text(cls, label: Any, delim: str = " ") -> str:
        """The label as a table cell (splits.csv, shard indexes, --relabel)."""
        return str(label)

    @classmethod
    def strata(cls, labels: Sequence[Any] | np.ndarray) -> np.ndarray:
        """What stratified splits, folds and samples keep in proportion, one row per label:
        a class per row (1-D), or a 0/1 matrix of label sets (2-D)."""
        return np.asarray(labels)

    @classmethod
    def settle(cls, labels: list[Any], where: list[str], delim: str) -> list[Any]:
        """Every label in this task's shape (`where`: each label's image, for errors):
        registered tasks read each one with `parse_label`."""
        return [cls.parse_label(label, delim, w) for label, w in zip(labels, where)]

    @classmethod
    def classes_of(cls, train: list[Any], every: list[Any], root: str, name: str = "",
                   min_classes: int = 2) -> list[str]:
        """The sorted class list from the training labels (DataError for fewer than
        `min_classes`, or for classes only valid/test have)."""
        classes = sorted(label_counts(train))
        if len(classes) < min_classes:
            raise DataError(f"found a single class {classes} in {root!r}; classification needs at least two classes "
                            "(one folder per class, or labels that take two or more values)")
        other = sorted(set(label_counts(every)) - set(classes))
        if other:
            kind = "classes" if cls.wording.label_kind == "class" else f"{cls.wording.label_kind}s"
            raise DataError(f"{kind} {other} appear in valid/test but not in train under {root!r}; "
                            "add training images for them or remove them")
        return classes

    @classmethod
    def single_image_classes(cls, labels: list[Any]) -> list[str]:
        """Classes (labels of a set) that a single image has: no stratified split can give
        them to both sides (data/splits.py)."""
        return sorted(c for c, n in label_counts(labels).items() if n < 2)

    @classmethod
    def fold_count(cls, labels: list[Any], folds: int) -> int:
        """`folds`, or fewer when a class has fewer images (each fold needs one of each
        class); a class with a single image cannot be validated on in any fold: DataError."""
        counts = Counter(labels)
        smallest = min(counts.values())
        if smallest >= folds:
            return folds
        small = sorted(c for c, n in counts.items() if n < folds)
        if smallest < 2:
            raise DataError(f"classes {cls.single_image_classes(labels)} have a single image: no fold split can "
                            "validate on them; add images")
        log.warning("classes %s have fewer images than %d folds: using %d folds (the smallest class size)",
                    small, folds, smallest)
        return smallest

    @classmethod
    def counts(cls, labels: Sequence[Any], classes: list[str]) -> dict[str, int]:
        """Images per class (per label: an image counts once for each of its labels)."""
        found = label_counts(labels)
        return {c: found.get(c, 0) for c in classes}

    def labels_per_output(self, labels: Sequence[Any]) -> dict[str, int]:
        """How many of `labels` each output has: images per class (per label: an image
        counts once for each of its labels). How far labelling has come, in the task's
        units: `suggest --method auto` and the advisor read its median."""
        return self.counts(labels, self.classes)

    def unknown_labels(self, labels: Sequence[Any]) -> list[str]:
        """Class (label) names among `labels` that this task's classes lack (sorted)."""
        return sorted(set(label_counts(labels)) - set(self.classes))

    def chance(self, targets: np.ndarray) -> float:
        """`score_metric` of a model that knows nothing of the images: the largest class's
        share (it always predicts that class)."""
        counts = np.bincount(np.asarray(targets, dtype=np.int64), minlength=self.num_outputs)
        return float(counts.max() / max(1, counts.sum()))

    def output_targets(self, targets: np.ndarray) -> np.ndarray:
        """Targets in the outputs' space, one column per output (a one-hot row per class
        index): what averaging neighbours' targets turns into outputs (the advisor's k-NN)."""
        return np.eye(self.num_outputs)[np.asarray(targets, dtype=np.int64)]

    def uncertainty(self, members: np.ndarray) -> np.ndarray:
        """(N,) how unsure the model is of each image, higher = less sure, from `members`
        (M, N, outputs): the outputs of M fits (`suggest` ranks images to label by it).
        Classes: 1 - the margin between the two most probable classes of the mean output."""
        probs = np.sort(np.asarray(members).mean(axis=0), axis=1)
        second = probs[:, -2] if probs.shape[1] > 1 else 1 - probs[:, -1]
        return 1 - (probs[:, -1] - second)

    def pseudo_targets(self, outputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(encoded targets, confidence in 0..1) of unlabelled images from the model's
        `outputs` (train --unlabeled keeps the most confident). Classes: the most probable
        class and its probability."""
        outputs = np.asarray(outputs)
        return outputs.argmax(axis=1), outputs.max(axis=1)

    def warm_start_names(self) -> list[str] | None:
        """Names to match against the pretrained classifier's classes (models/warmstart.py);
        None: nothing to warm-start (a number is no ImageNet class)."""
        return self.classes

    def fit_labels(self, labels: Sequence[Any]) -> None:
        """Learn what the task needs from the training labels (regression: their scale)."""
        return None

    def check(self, balance: str, label_smoothing: float) -> None:
        """ConfigError for options that mean nothing to this task."""
        return None

    def output_module(self) -> nn.Module:
        """What export appends to the model so the file outputs what a user reads
        (classification: the logits themselves; the task's probabilities follow them)."""
        return nn.Identity()

    def average_views(self, outputs: torch.Tensor) -> torch.Tensor:
        """Test-time augmentation: each image's output from its views' outputs (B, V, C): the
        logits averaged. The built-in shapes read an exported file's mapped outputs
        (`outputs_mapped`) back to logits first, so that an export averages as the run does."""
        return outputs.mean(dim=1)

    def export_module(self) -> nn.Module:
        """What export appends to the (calibrated) model, so that the file outputs
        `exported_outputs`: the logits here (a new shape's `probabilities` is applied after
        the file, as for files exported before); the built-in shapes append their
        probabilities (real units) and, read back from such a file (`outputs_mapped`), take
        them as they are."""
        return nn.Identity()

    def linear_output(self, weight: torch.Tensor,
                      bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, nn.Module, dict[str, Any]]:
        """The head's linear layer for a format that holds nothing after it (timm's Hub
        layout): (weight, bias) with as much of `output_module` folded in as a linear layer
        can hold, the rest of `output_module` (what a user applies to the layer's outputs;
        the exporter checks rest(outputs) against the run), and what the outputs are, for
        the format's config (`outputs`, in words)."""
        return weight, bias, nn.Identity(), {"outputs": "logits"}

    # -- the output side -----------------------------------------------------------------

    def label_of(self, decoded: Decoded) -> Any:
        """The label a prediction gives an image, in the data's shape (the class; the set
        above the thresholds; the number): what `review` suggests as its new label."""
        return decoded.labels[0]

    def explained(self, decoded: Decoded, most: int = 3) -> list[str]:
        """The outputs (class names) Grad-CAM explains for one prediction: the predicted
        label(s), at most `most`, else the most probable."""
        return decoded.labels[:most] or [decoded.ranked[0][0]]

    def present_labels(self, targets: np.ndarray) -> list[int]:
        """The outputs (classes) with a positive among `targets`: what class averages cover."""
        return present_classes(targets, self.num_outputs)

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
        """The task as `metadata()` described it (and an export's: `mapped_outputs`)."""
        return cls(classes).mapped_outputs(metadata)

    def mapped_outputs(self, metadata: dict[str, Any]) -> Task:
        """This task, reading the outputs of an exported file whose metadata says they are
        `exported_outputs` already (files exported before that say nothing: logits)."""
        mapped = self.exported_outputs != "logits" and metadata.get("outputs") == self.exported_outputs
        self.outputs_mapped = self.outputs_mapped or mapped
        return self


class Probabilities(nn.Module):
    """A task's probability function as a module (the end of an exported graph)."""

    def __init__(self, task: Task) -> None:
        super().__init__()
        self.task = task

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return self.task.probabilities(logits)
