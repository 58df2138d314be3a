"""A number per image (a count, an age, an angle, a score): one linear output, MSE or Huber
loss on standardised targets; MAE (the headline, lower is better), RMSE, R² and
Spearman's rho.

On the data side a label is a float. Targets stay in real units everywhere (the
dataset, evaluation outputs, out-of-fold rows, reports); the standardisation lives in
the loss and in the output map: the head's raw output z means `mean + std * z`, or, with
a target range (fastai's `y_range`), `low + (high - low) * sigmoid(z)`. The training
labels' mean and std and the range are stored with the weights (`metadata`), so a saved
or exported model outputs real units. The one "class" is the target's name (a CSV
column's, else "target"), so the head has one output.

Stratified splits and folds bin the targets by quantile (`strata`): every part sees
the whole range. Class balancing has no meaning for a number: `--balance` is refused.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from visiontune.errors import ConfigError, DataError
from visiontune.tasks.base import Decoded, Report, Task, TaskLoss, marker_like
from visiontune.tasks.calibration import NoCalibration
from visiontune.tasks.conformal import NumberConformal
from visiontune.tasks.form import FormOf, NumberForm
from visiontune.tasks.metrics import sk_metrics
from visiontune.tasks.output import NumberOutput
from visiontune.tasks.wording import NUMBERS

LOSSES = ("mse", "huber")
STRATA_BINS = 10  # quantile bins of the target for stratified splits and folds
REPORT_BINS = 5  # rows of the residual-by-target table


class RegressionLoss(TaskLoss):
    """Squared (or Huber, delta 1) error between the standardised prediction and the
    standardised target, summed; its mean over images is the batch loss."""

    def __init__(self, task: Regression) -> None:
        super().__init__()
        self.task = task

    def total(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        t = self.task
        z = t.standardised_output(logits[:, 0])
        y = (targets.float() - t.mean) / t.std
        if t.loss_kind == "huber":
            return nn.functional.huber_loss(z, y, reduction="sum", delta=1.0)
        return nn.functional.mse_loss(z, y, reduction="sum")

    def norm(self, targets: torch.Tensor) -> torch.Tensor:
        return torch.tensor(float(len(targets)), device=targets.device)


class Regression(Task):
    name = "regression"
    headline = ("mae", "r2", "loss")
    higher_is_better = {"mae": False, "rmse": False, "r2": True, "spearman": True,
                        "val_loss": False, "train_loss": False}
    score_metric = "r2"
    mixup_targets = None
    confusable = False
    form = FormOf(NumberForm)
    output_type = NumberOutput
    calibrator_type = NoCalibration
    conformal_type = NumberConformal
    wording = NUMBERS
    ensemble = 5  # the probe's cross-validation fits: their spread is the uncertainty

    def __init__(self, classes: Sequence[str], mean: float = 0.0, std: float = 1.0,
                 target_range: Sequence[float] | None = None, loss: str = "mse", outputs_mapped: bool = False) -> None:
        super().__init__(list(classes)[:1] or ["target"])
        self.outputs_mapped = outputs_mapped  # an exported model: the output map is inside, outputs are real units
        if loss not in LOSSES:
            raise ConfigError(f"--loss {loss!r} is not valid for regression; choose one of: {', '.join(LOSSES)}")
        self.mean, self.std, self.loss_kind = float(mean), float(std), loss
        self.target_range = tuple(float(v) for v in target_range) if target_range else None
        if self.target_range is not None and not self.target_range[0] < self.target_range[1]:
            raise ConfigError(f"--target-range {self.target_range}: LOW must be below HIGH")

    # -- the data side -------------------------------------------------------------------

    @classmethod
    def parse_label(cls, text: Any, delim: str, where: str) -> float | str:
        """A table cell or a label function's value as a number ("" for an empty cell)."""
        if isinstance(text, str) and not text.strip():
            return ""
        try:
            if isinstance(text, str) and "_" in text:  # float() reads "4_003" as 4003: a regex caught too much
                raise ValueError(text)
            value = float(text)
        except (TypeError, ValueError):
            raise DataError(f"{where}: {text!r} is not a number, and --task regression needs one per image "
                            "(fix the value, or leave the row out)") from None
        if not math.isfinite(value):
            raise DataError(f"{where}: {text!r} is not a finite number; regression targets must be finite")
        return value

    @classmethod
    def label_text(cls, label: Any, delim: str = " ") -> str:
        return repr(float(label))

    @classmethod
    def strata(cls, labels: Sequence[Any] | np.ndarray) -> np.ndarray:
        """Quantile bins of the targets (at most STRATA_BINS, fewer when there are few
        values), one per row: what splits and folds stratify by."""
        y = np.asarray(labels, dtype=float).reshape(len(labels))
        if len(y) == 0:
            return np.zeros(0, dtype=int)
        for bins in range(max(1, min(STRATA_BINS, len(y) // 10)), 0, -1):  # fewer bins until none is a single row
            edges = np.unique(np.quantile(y, np.linspace(0, 1, bins + 1)[1:-1]))
            strata = np.searchsorted(edges, y, side="right")
            counts = np.bincount(strata)
            if counts[counts > 0].min() >= 2:
                break
        return strata

    @classmethod
    def classes_of(cls, train: list[Any], every: list[Any], root: str, name: str = "",
                   min_classes: int = 2) -> list[str]:
        """One output, named after the target (a CSV column's name, else "target")."""
        if not train:
            raise DataError(f"no training images in {root!r}")
        return [name or "target"]

    @classmethod
    def single_image_classes(cls, labels: list[Any]) -> list[str]:
        return []  # numbers are stratified by quantile bins, made so that none holds a single image

    @classmethod
    def fold_count(cls, labels: list[Any], folds: int) -> int:
        if len(labels) < 2 * folds:
            raise DataError(f"{len(labels)} images cannot fill {folds} folds; use fewer --folds")
        return folds

    @classmethod
    def counts(cls, labels: Sequence[Any], classes: list[str]) -> dict[str, int]:
        return {}  # a number has no classes to count (or to balance)

    def fit_labels(self, labels: Sequence[Any]) -> None:
        """Mean and std of the training targets: what the head's output is scaled by."""
        y = np.asarray(labels, dtype=float)
        if len(y):
            self.mean = float(y.mean())
            self.std = float(y.std()) if y.std() > 1e-12 else 1.0

    def labels_per_output(self, labels: Sequence[Any]) -> dict[str, int]:
        """Every known number is a label of the one target (`counts` is empty: a number has
        no classes to balance, but it was labelled)."""
        return {self.classes[0]: int(np.isfinite(np.asarray(labels, dtype=float)).sum())}

    def unknown_labels(self, labels: Sequence[Any]) -> list[str]:
        return []  # every number is a target

    def warm_start_names(self) -> list[str] | None:
        return None

    def check(self, balance: str, label_smoothing: float) -> None:
        if balance != "none":
            raise ConfigError(f"--balance {balance} reweights classes; a regression target has none (leave --balance "
                              "at none; to weight rare target values, give them more images)")
        if label_smoothing:
            raise ConfigError("--label-smoothing applies to classes; leave it at 0 for --task regression")

    # -- the model side ------------------------------------------------------------------

    def encode(self, labels: Sequence[Any]) -> torch.Tensor:
        return torch.tensor([float(v) for v in labels], dtype=torch.float32)

    def marker(self, value: int) -> torch.Tensor:
        return marker_like(torch.zeros(0), value)

    def loss(self, weights: torch.Tensor | None = None, label_smoothing: float = 0.0) -> TaskLoss:
        return RegressionLoss(self)

    def balance_weights(self, labels: Sequence[Any]) -> list[float]:
        self.check("weights", 0.0)
        return []

    def oversample_weights(self, targets: torch.Tensor) -> torch.Tensor:
        self.check("oversample", 0.0)
        return torch.ones(len(targets))

    def standardised_output(self, z: torch.Tensor) -> torch.Tensor:
        """The head's raw output in standardised target units."""
        if self.outputs_mapped:
            return (z - self.mean) / self.std
        if self.target_range is None:
            return z
        low, high = self.target_range
        return (low + (high - low) * torch.sigmoid(z) - self.mean) / self.std

    def average_views(self, outputs: torch.Tensor) -> torch.Tensor:
        """An exported file's real units: linear in the head's output, so their mean is the
        mean output's, except under --target-range, whose sigmoid is undone first."""
        if not self.outputs_mapped or self.target_range is None:
            return super().average_views(outputs)
        low, high = self.target_range
        z = torch.logit((outputs.float() - low) / (high - low), eps=1e-7).mean(dim=1)
        return low + (high - low) * torch.sigmoid(z)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """The prediction in real units, (N, 1) (named as the other tasks' outputs are)."""
        return self.standardised_output(logits.float()) * self.std + self.mean

    exported_outputs = "the prediction in real units"

    def output_module(self) -> nn.Module:
        return _Scale(self)

    def export_module(self) -> nn.Module:
        return _Scale(self)

    def linear_output(self, weight: torch.Tensor,
                      bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, nn.Module, dict[str, Any]]:
        """mean + std * z is linear: folded in, the layer outputs real units. A target
        range's sigmoid is not: the layer outputs z, and the description says what to apply."""
        if self.outputs_mapped:
            return weight, bias, nn.Identity(), {"outputs_mapped": True, "outputs": "the prediction in real units"}
        if self.target_range is None:
            return (weight * self.std, bias * self.std + self.mean, nn.Identity(),
                    {"outputs_mapped": True, "outputs": "the prediction in real units"})
        return weight, bias, _Scale(self), {
            "outputs": "z: the prediction is low + (high - low) * sigmoid(z), [low, high] = target_range"}

    def pseudo_targets(self, outputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise ConfigError("--unlabeled: a regression probe gives no confidence to choose pseudo-labels by; train "
                          "without --unlabeled (or label more images: `visiontune suggest` says which)")

    def uncertainty(self, members: np.ndarray) -> np.ndarray:
        """Numbers: the spread (standard deviation, real units) of the fits' predictions; one
        fit alone says nothing of its doubt, so this needs `ensemble` fits."""
        members = np.asarray(members)
        if len(members) < 2:
            raise ValueError("regression's uncertainty needs the predictions of several fits")
        return members[..., 0].std(axis=0)

    def metrics(self, targets: np.ndarray, probs: np.ndarray, labels: Sequence[int] | None = None) -> dict[str, float]:
        y, p = np.asarray(targets, dtype=float).reshape(-1), np.asarray(probs, dtype=float).reshape(-1)
        if len(y) == 0:
            return {k: float("nan") for k in ("mae", "rmse", "r2", "spearman")}
        from scipy.stats import spearmanr  # with scikit-learn's metrics: only where metrics are computed

        sk = sk_metrics()
        constant = len(y) < 2 or np.ptp(y) == 0 or np.ptp(p) == 0
        return {"mae": float(sk.mean_absolute_error(y, p)), "rmse": float(math.sqrt(sk.mean_squared_error(y, p))),
                "r2": float(sk.r2_score(y, p)) if len(y) > 1 and np.ptp(y) > 0 else float("nan"),
                "spearman": float("nan") if constant else float(spearmanr(y, p).statistic)}

    def report(self, targets: np.ndarray, probs: np.ndarray) -> Report:
        """Residuals (prediction - target) by target quantile: where the model is off, and
        which way."""
        y, p = np.asarray(targets, dtype=float).reshape(-1), np.asarray(probs, dtype=float).reshape(-1)
        rows = []
        if len(y):
            bins = np.unique(np.quantile(y, np.linspace(0, 1, REPORT_BINS + 1)))
            which = np.clip(np.searchsorted(bins, y, side="right") - 1, 0, max(0, len(bins) - 2))
            for b in range(max(1, len(bins) - 1)):
                r = (p - y)[which == b]
                if len(r):
                    rows.append({"class": f"{bins[b]:.4g}..{bins[min(b + 1, len(bins) - 1)]:.4g}",
                                 "mae": float(np.abs(r).mean()), "bias": float(r.mean()), "support": int(len(r))})
        residual = p - y
        head = (f"residuals (prediction - target): mean {residual.mean():.4g}, median |r| "
                f"{np.median(np.abs(residual)):.4g}, 90th percentile |r| {np.quantile(np.abs(residual), 0.9):.4g}"
                if len(y) else "no labelled images")
        table = ["by target range:", f"{'target':>18}  {'mae':>9}  {'bias':>9}  {'support':>7}"] + [
            f"{r['class']:>18}  {r['mae']:>9.4g}  {r['bias']:>9.4g}  {r['support']:>7d}" for r in rows]
        return Report(rows, None, "\n".join([head, ""] + table), columns=("mae", "bias", "support"))

    def sample_losses(self, targets: np.ndarray, probs: np.ndarray) -> np.ndarray:
        """Each image's absolute error, in target units (the largest errors)."""
        return np.abs(np.asarray(probs, dtype=float).reshape(-1) - np.asarray(targets, dtype=float).reshape(-1))

    def describe(self, target: Any, probs: np.ndarray) -> tuple[str, str]:
        return f"{float(np.asarray(probs).reshape(-1)[0]):.4g}", f"{float(target):.4g}"

    def decode(self, probs: np.ndarray, top_k: int) -> list[Decoded]:
        out = []
        for row in np.asarray(probs, dtype=float).reshape(len(probs), -1):
            value = float(row[0])
            out.append(Decoded([f"{value:.6g}"], [value], [(self.classes[0], value)], value=value))
        return out

    def default_monitor(self, imbalance: float) -> str:
        return "val_loss"

    def label_of(self, decoded: Decoded) -> Any:
        return float(decoded.value) if decoded.value is not None else float(decoded.probs[0])

    def explained(self, decoded: Decoded, most: int = 3) -> list[str]:
        return self.classes[:1]

    def present_labels(self, targets: np.ndarray) -> list[int]:
        return [0]

    def chance(self, targets: np.ndarray) -> float:
        return 0.0  # predicting the mean: R^2 = 0

    def output_targets(self, targets: np.ndarray) -> np.ndarray:
        return np.asarray(targets, dtype=float).reshape(-1, 1)

    def metadata(self) -> dict[str, Any]:
        return {"task": self.name, "target_mean": self.mean, "target_std": self.std,
                "target_range": list(self.target_range) if self.target_range else None, "loss": self.loss_kind}

    @classmethod
    def from_metadata(cls, classes: Sequence[str], metadata: dict[str, Any]) -> Task:
        return cls(classes, float(metadata.get("target_mean", 0.0)), float(metadata.get("target_std", 1.0)),
                   metadata.get("target_range"), str(metadata.get("loss", "mse")), bool(metadata.get("outputs_mapped")))


class _Scale(nn.Module):
    """The output map as a module (export puts it inside the file: real units out)."""

    def __init__(self, task: Regression) -> None:
        super().__init__()
        self.mean, self.std, self.target_range = task.mean, task.std, task.target_range

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.target_range is None:
            return z * self.std + self.mean
        low, high = self.target_range
        return low + (high - low) * torch.sigmoid(z)
