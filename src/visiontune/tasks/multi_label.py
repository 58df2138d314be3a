"""A set of labels per image (possibly empty): one sigmoid per label, binary cross-entropy,
a threshold per label; mAP (threshold-free) is the headline metric.

Thresholds: 0.5 for every label by default; `tune_thresholds` picks, per label, the one
that maximises that label's F1 on the given (validation) outputs, falling back to the
global threshold for labels with fewer than MIN_POSITIVES positives there. They are
stored with the weights (`metadata`) and used wherever predictions become label sets.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from itertools import product
from typing import Any

import numpy as np
import torch
from torch import nn

from visiontune.errors import DataError
from visiontune.tasks.base import Decoded, Probabilities, Report, Task, TaskLoss, marker_like
from visiontune.tasks.calibration import LabelSetCalibrator
from visiontune.tasks.conformal import LabelSetConformal
from visiontune.tasks.form import FormOf, LabelSetForm
from visiontune.tasks.labels import (
    NONE,
    check_label_names,
    indicator,
    label_counts,
    parse_label_set,
)
from visiontune.tasks.metrics import (
    absent_note,
    format_matrix,
    format_table,
    multilabel_metrics,
    per_label_report,
    sk_metrics,
)
from visiontune.tasks.output import LabelSetOutput
from visiontune.tasks.wording import LABEL_SETS

log = logging.getLogger(__name__)

MIN_POSITIVES = 5  # a label needs this many positives in validation to get a threshold of its own
MAX_POS_WEIGHT = 100.0


class BinaryCrossEntropy(TaskLoss):
    """Mean binary cross-entropy over images x labels; `pos_weight` per label (--balance
    weights); label smoothing moves targets to eps/2 and 1 - eps/2."""

    def __init__(self, pos_weight: torch.Tensor | None = None, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.pos_weight, self.label_smoothing = pos_weight, label_smoothing

    def total(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        y = targets.float()
        if self.label_smoothing:
            y = y * (1 - self.label_smoothing) + self.label_smoothing / 2
        return nn.functional.binary_cross_entropy_with_logits(logits, y, pos_weight=self.pos_weight, reduction="sum")

    def norm(self, targets: torch.Tensor) -> torch.Tensor:
        return torch.tensor(float(targets.numel()), device=targets.device)


class MultiLabel(Task):
    exported_outputs = "probabilities"  # export_module: the file outputs them
    name = "multi-label"
    calibrator_type = LabelSetCalibrator
    conformal_type = LabelSetConformal
    headline = ("mAP", "macro_f1", "loss")
    higher_is_better = {"mAP": True, "micro_f1": True, "macro_f1": True, "samples_f1": True,
                        "subset_accuracy": True, "hamming_loss": False, "val_loss": False, "train_loss": False}

    score_metric = "mAP"
    mixup_targets = "multi-hot"
    form = FormOf(LabelSetForm)
    output_type = LabelSetOutput
    wording = LABEL_SETS

    @classmethod
    def parse_label(cls, text: Any, delim: str, where: str) -> Any:
        """A set: a list, or a cell of labels joined by `delim`; an empty cell, or NONE
        alone, is the empty set."""
        if isinstance(text, (list, tuple, set, frozenset)):
            return tuple(sorted({str(x) for x in text}))
        labels = parse_label_set(str(text), delim, where)
        if NONE in labels:
            if len(labels) > 1:
                raise DataError(f"{where}: {text!r}: {NONE} means no label, and stands alone in its cell")
            return ()
        return labels

    @classmethod
    def label_text(cls, label: Any, delim: str = " ") -> str:
        return delim.join(label) if isinstance(label, tuple) else str(label)

    @classmethod
    def strata(cls, labels: Sequence[Any] | np.ndarray) -> np.ndarray:
        """Label sets as a 0/1 matrix (iterative stratification); a 2-D target array as is."""
        if isinstance(labels, np.ndarray) and labels.ndim == 2:
            return labels
        return indicator(labels, sorted(label_counts(labels)))

    @classmethod
    def settle(cls, labels: list[Any], where: list[str], delim: str) -> list[Any]:
        """A single class becomes a one-label set; label sets are written joined by `delim`,
        so no label name may hold it."""
        settled = [label if isinstance(label, tuple) else (str(label),) for label in labels]
        check_label_names(settled, delim)
        return settled

    @classmethod
    def classes_of(cls, train: list[Any], every: list[Any], root: str, name: str = "",
                   min_classes: int = 2) -> list[str]:
        """One label is a task too: it is there or it is not."""
        if not label_counts(train):
            raise DataError(f"found no label in {root!r}; give each image a label set (an empty one means none)")
        return super().classes_of(train, every, root, name, 1)

    @classmethod
    def fold_count(cls, labels: list[Any], folds: int) -> int:
        """Label sets keep `folds`: a rare label is in some folds only (a warning names them)."""
        rare = sorted(c for c, n in label_counts(labels).items() if n < folds)
        if rare:
            log.warning("labels %s have fewer images than %d folds: some folds cannot validate them", rare, folds)
        return folds

    def chance(self, targets: np.ndarray) -> float:
        """A random ranking's AP is the label's prevalence: their mean."""
        y = np.asarray(targets) > 0.5
        present = y.any(axis=0)
        return float(y[:, present].mean()) if present.any() else 0.0

    def output_targets(self, targets: np.ndarray) -> np.ndarray:
        return np.asarray(targets, dtype=float)

    def label_of(self, decoded: Decoded) -> Any:
        return tuple(sorted(decoded.labels))

    def __init__(self, classes: Sequence[str], thresholds: Sequence[float] | None = None,
                 threshold: float = 0.5) -> None:
        super().__init__(classes)
        self.threshold = threshold
        self.thresholds = np.full(len(self.classes), threshold) if thresholds is None else np.asarray(thresholds, float)

    def encode(self, labels: Sequence[Any]) -> torch.Tensor:
        y = torch.zeros(len(labels), self.num_outputs)
        for row, label in enumerate(labels):
            names = label if isinstance(label, tuple) else (label,)
            y[row, [self.index[n] for n in names]] = 1.0
        return y

    def marker(self, value: int) -> torch.Tensor:
        return marker_like(torch.zeros(0, self.num_outputs), value)

    def loss(self, weights: torch.Tensor | None = None, label_smoothing: float = 0.0) -> TaskLoss:
        return BinaryCrossEntropy(weights, label_smoothing)

    def balance_weights(self, labels: Sequence[Any]) -> list[float]:
        """pos_weight = negatives / positives per label (at most MAX_POS_WEIGHT)."""
        counts = Counter(n for label in labels for n in (label if isinstance(label, tuple) else (label,)))
        total = len(labels)
        return [min(MAX_POS_WEIGHT, (total - counts[c]) / counts[c]) if counts.get(c) else 1.0 for c in self.classes]

    def oversample_weights(self, targets: torch.Tensor) -> torch.Tensor:
        """1 / images of the image's rarest label (images with no label: 1 / their number)."""
        y = targets > 0.5
        per_label = 1.0 / y.sum(dim=0).float().clamp(min=1)
        weights = (y.float() * per_label[None, :]).max(dim=1).values
        none = ~y.any(dim=1)
        return torch.where(none, 1.0 / none.sum().clamp(min=1).float(), weights)

    def export_module(self) -> nn.Module:
        return Probabilities(self)

    def average_views(self, outputs: torch.Tensor) -> torch.Tensor:
        """An exported file's sigmoids: back to logits, averaged, and mapped again."""
        if not self.outputs_mapped:
            return super().average_views(outputs)
        return torch.logit(outputs.float(), eps=1e-7).mean(dim=1).sigmoid()

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.float() if self.outputs_mapped else logits.sigmoid()

    def uncertainty(self, members: np.ndarray) -> np.ndarray:
        """Label sets: each label's binary entropy (in bits, 1 = a coin flip) of the mean
        output, averaged over the labels."""
        p = np.clip(np.asarray(members).mean(axis=0), 1e-7, 1 - 1e-7)
        return (-(p * np.log2(p) + (1 - p) * np.log2(1 - p))).mean(axis=1)

    def pseudo_targets(self, outputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Label sets: each label present at its threshold; the confidence is the least sure
        label's (the probability of the side it is on)."""
        outputs = np.asarray(outputs)
        present = outputs >= self.thresholds[None, :]
        return present.astype(np.float32), np.where(present, outputs, 1 - outputs).min(axis=1)

    def predictions(self, probs: np.ndarray) -> np.ndarray:
        return (probs >= self.thresholds[None, :]).astype(int) if len(probs) else np.zeros((0, self.num_outputs), int)

    def metrics(self, targets: np.ndarray, probs: np.ndarray, labels: Sequence[int] | None = None) -> dict[str, float]:
        return multilabel_metrics(np.asarray(targets), probs, self.predictions(probs), labels)

    def report(self, targets: np.ndarray, probs: np.ndarray) -> Report:
        y, preds = np.asarray(targets).astype(int), self.predictions(probs)
        rows = per_label_report(y, probs, preds, self.classes, self.thresholds)
        tp, fp = (y * preds).sum(0), ((1 - y) * preds).sum(0)
        fn, tn = (y * (1 - preds)).sum(0), ((1 - y) * (1 - preds)).sum(0)
        matrix = np.stack([tp, fp, fn, tn], axis=1)
        text = "\n".join(format_table(rows, self.classes) + [""] + format_matrix(
            matrix, self.classes, ["TP", "FP", "FN", "TN"], "per-label confusion (rows: labels)")
            + list(filter(None, [absent_note(y, self.classes)])))
        return Report(rows, matrix, text, self.confused_pairs(y, preds), ("TP", "FP", "FN", "TN"))

    def confused_pairs(self, y: np.ndarray, preds: np.ndarray) -> list[tuple[int, str, str]]:
        """(count, actual, predicted): label `predicted` was predicted but absent while
        `actual` was present but missed, in the same image."""
        pairs: Counter[tuple[str, str]] = Counter()
        for truth, guess in zip(y, preds):
            missed, extra = np.flatnonzero(truth & (1 - guess)), np.flatnonzero(guess & (1 - truth))
            pairs.update((self.classes[a], self.classes[p]) for a, p in product(missed, extra))
        return sorted(((n, a, p) for (a, p), n in pairs.items()), reverse=True)

    def sample_losses(self, targets: np.ndarray, probs: np.ndarray) -> np.ndarray:
        p = np.clip(probs, 1e-12, 1 - 1e-12)
        y = np.asarray(targets, dtype=float)
        return -(y * np.log(p) + (1 - y) * np.log(1 - p)).mean(axis=1)

    def describe(self, target: Any, probs: np.ndarray) -> tuple[str, str]:
        predicted = [c for c, on in zip(self.classes, probs >= self.thresholds) if on]
        actual = [c for c, on in zip(self.classes, np.asarray(target) > 0.5) if on]
        return " ".join(predicted) or "(none)", " ".join(actual) or "(none)"

    def decode(self, probs: np.ndarray, top_k: int) -> list[Decoded]:
        k = max(1, min(top_k, self.num_outputs))
        out = []
        for row in probs:
            order = np.argsort(-row, kind="stable")
            above = [i for i in order if row[i] >= self.thresholds[i]]
            ranked = [(self.classes[i], float(row[i])) for i in order[:max(k, len(above))]]
            out.append(Decoded([self.classes[i] for i in above], [float(row[i]) for i in above], ranked,
                               scores=dict(zip(self.classes, map(float, row)))))
        return out

    def default_monitor(self, imbalance: float) -> str:
        return "val_loss"

    def tune_thresholds(self, targets: np.ndarray, probs: np.ndarray) -> np.ndarray:
        """Per label, the threshold with the best F1 on (targets, probs); the global one
        where a label has fewer than MIN_POSITIVES positives. Sets and returns them."""
        y = np.asarray(targets) > 0.5
        tuned = np.full(self.num_outputs, self.threshold)
        for c in range(self.num_outputs):
            if y[:, c].sum() >= MIN_POSITIVES:
                precision, recall, cuts = sk_metrics().precision_recall_curve(y[:, c], probs[:, c])
                f1 = 2 * precision[:-1] * recall[:-1] / np.maximum(1e-12, precision[:-1] + recall[:-1])
                best = int(np.argmax(f1))
                # midway to the next lower score: the same F1 here, and no image sits on the threshold
                below = probs[:, c][probs[:, c] < cuts[best]]
                tuned[c] = float((cuts[best] + below.max()) / 2) if len(below) else float(cuts[best] / 2)
        self.thresholds = tuned
        return tuned

    def metadata(self) -> dict[str, Any]:
        return {"task": self.name, "thresholds": [float(t) for t in self.thresholds], "threshold": self.threshold}

    @classmethod
    def from_metadata(cls, classes: Sequence[str], metadata: dict[str, Any]) -> Task:
        return cls(classes, metadata.get("thresholds"), float(metadata.get("threshold", 0.5))).mapped_outputs(metadata)
