"""Calibrated probabilities: a task's outputs rescaled after training so that a 0.9 is right
nine times in ten. One companion per output shape, reached as `task.calibrator`:

- `Calibrator` (single-label): one temperature T for every class, softmax(z / T) (Guo et
  al. 2017). It never changes the ranking, so no prediction changes, only its probability.
- `LabelSetCalibrator` (multi-label): one temperature per label, sigmoid(z_j / T_j). A
  temperature keeps z = 0 at p = 0.5, so the default 0.5 decisions do not change (Platt's
  bias would move them); tuned thresholds are chosen after calibration, on the calibrated
  probabilities.
- `NoCalibration` (regression, and the default of a new task shape): a number has no
  probability to calibrate; its uncertainty is the conformal interval (tasks/conformal.py).

The fit is a one-parameter (per output) maximum likelihood on held-out outputs: the run's
validation split, the outputs of the weights the run keeps (train/calibrate.py says why not
cv's out-of-fold outputs), with a weak prior on log T so that a few images cannot push T to
an extreme. Written here, not with scikit-learn's `CalibratedClassifierCV
(method="temperature")`, because that wraps an estimator's `predict_proba` on features,
while ours are outputs of a network already computed; the fit is a bounded scalar
minimisation of the negative log-likelihood (scipy).

The fitted values live in the model as `OutputCalibration`, z -> z * scale + bias per
output (scale = 1 / T), a pair of buffers in model.safetensors: every path that runs the
model (predict, evaluate, serve, interpret, the exported graph) gives calibrated outputs
without knowing calibration exists. Until it is fitted the layer is the identity.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

ECE_BINS = 15  # equal-width confidence bins of the expected calibration error (Guo et al. 2017)
LOG_T_BOUNDS = (-4.0, 4.0)  # the temperature is searched in [e^-4, e^4] = [0.018, 55]
PRIOR_SD = 1.0  # of log T: the weak prior that keeps a fit on a few images near T = 1
_TINY = 1e-12


class OutputCalibration(nn.Module):
    """z -> z * scale + bias, per output: the identity until a calibrator sets it."""

    def __init__(self, num_outputs: int) -> None:
        super().__init__()
        self.register_buffer("scale", torch.ones(num_outputs))
        self.register_buffer("bias", torch.zeros(num_outputs))

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # no branch on the values: torch.export traces it
        return z * self.scale.to(z.dtype) + self.bias.to(z.dtype)

    @property
    def fitted(self) -> bool:
        return not (bool((self.scale == 1).all()) and bool((self.bias == 0).all()))

    def set(self, scale: np.ndarray, bias: np.ndarray) -> None:
        self.scale.copy_(torch.as_tensor(np.asarray(scale, dtype=np.float32)))
        self.bias.copy_(torch.as_tensor(np.asarray(bias, dtype=np.float32)))


@dataclass
class Fit:
    """What a calibrator found: the layer's values and the before/after figures."""

    scale: np.ndarray
    bias: np.ndarray
    before: dict[str, float]  # ece, nll of the outputs as they were
    after: dict[str, float]  # ... and calibrated
    images: int

    def record(self, kind: str, fitted_on: str) -> dict[str, Any]:
        """What model.safetensors and calibration.json keep of it."""
        return {"kind": kind, "fitted_on": fitted_on, "images": self.images,
                "temperature": [round(float(1 / s), 6) for s in self.scale], "before": self.before,
                "after": self.after}


class Calibrator:
    """One temperature for a softmax over classes (single-label)."""

    kind = "temperature"
    energy = "softmax"  # how the OOD score reads these logits (models/novelty.energy): one class of many
    outcome = "accuracy"  # what the reliability diagram plots against confidence

    def __init__(self, task: Any) -> None:
        self.task = task  # the tasks.base.Task whose outputs these are

    def raw(self, probs: np.ndarray) -> np.ndarray:
        """Logits back from probabilities, up to a constant per row (softmax ignores it)."""
        return np.log(np.clip(np.asarray(probs, dtype=np.float64), _TINY, None))

    def probabilities(self, raw: np.ndarray, scale: np.ndarray, bias: np.ndarray) -> np.ndarray:
        z = raw * scale + bias
        z = z - z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)

    def fit(self, targets: np.ndarray, probs: np.ndarray) -> Fit | None:
        """The temperature that minimises the negative log-likelihood of `targets` (None
        when there is nothing to fit on: no labelled rows, or one class only)."""
        targets, probs = np.asarray(targets), np.asarray(probs, dtype=np.float64)
        if len(targets) < 2:
            return None
        raw = self.raw(probs)
        n = raw.shape[1]
        scale = np.full(n, _temperature_scale(
            lambda s: self.nll(targets, self.probabilities(raw, np.full(n, s), np.zeros(n))), len(targets)))
        after = self.probabilities(raw, scale, np.zeros(n))
        return Fit(scale, np.zeros(n), self.figures(targets, probs), self.figures(targets, after), len(targets))

    def unseen_rows(self, targets: np.ndarray) -> np.ndarray:
        """Rows whose class no other row has: under cross-validation, the fold that held such a
        row out trained without its class, and its output says nothing of the model kept."""
        targets = np.asarray(targets, dtype=int)
        return np.bincount(targets, minlength=self.task.num_outputs)[targets] == 1

    def figures(self, targets: np.ndarray, probs: np.ndarray) -> dict[str, float]:
        return {"ece": round(self.ece(targets, probs), 6), "nll": round(self.nll(targets, probs), 6)}

    def nll(self, targets: np.ndarray, probs: np.ndarray) -> float:
        """Mean negative log-likelihood of the true class."""
        p = np.asarray(probs)[np.arange(len(targets)), np.asarray(targets, dtype=int)]
        return float(-np.log(np.clip(p, _TINY, None)).mean())

    def confidences(self, targets: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(confidence, right) per prediction: the top class's probability and whether it is
        the true class."""
        probs = np.asarray(probs)
        return probs.max(axis=1), (probs.argmax(axis=1) == np.asarray(targets, dtype=int)).astype(float)

    def ece(self, targets: np.ndarray, probs: np.ndarray, bins: int = ECE_BINS) -> float:
        """Expected calibration error: the mean |accuracy - confidence| over equal-width
        confidence bins, weighted by each bin's share of predictions."""
        return expected_calibration_error(*self.confidences(targets, probs), bins)

    def reliability(self, targets: np.ndarray, probs: np.ndarray,
                    bins: int = ECE_BINS) -> list[tuple[float, float, int]]:
        """(mean confidence, accuracy, count) of each non-empty bin: the reliability diagram."""
        conf, right = self.confidences(targets, probs)
        which = _bins(conf, bins)
        return [(float(conf[which == b].mean()), float(right[which == b].mean()), int((which == b).sum()))
                for b in range(bins) if (which == b).any()]


class LabelSetCalibrator(Calibrator):
    """One temperature per label of a multi-label head (sigmoid outputs)."""

    kind = "temperature per label"
    energy = "sigmoid"  # independent labels: the sum of each label's softplus
    outcome = "share of labels present"

    def raw(self, probs: np.ndarray) -> np.ndarray:
        p = np.clip(np.asarray(probs, dtype=np.float64), 1e-7, 1 - 1e-7)  # float32 sigmoids round to 1 above z ~ 16
        return np.log(p) - np.log1p(-p)

    def probabilities(self, raw: np.ndarray, scale: np.ndarray, bias: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-(raw * scale + bias)))

    def fit(self, targets: np.ndarray, probs: np.ndarray) -> Fit | None:
        targets, probs = np.asarray(targets, dtype=np.float64), np.asarray(probs, dtype=np.float64)
        if len(targets) < 2:
            return None
        raw = self.raw(probs)
        scale = np.ones(raw.shape[1])
        for j in range(raw.shape[1]):
            if 0 < targets[:, j].sum() < len(targets):  # both outcomes seen: something to fit
                scale[j] = _temperature_scale(lambda s, j=j: _bce(targets[:, j], 1 / (1 + np.exp(-raw[:, j] * s))),
                                              len(targets))
        after = self.probabilities(raw, scale, np.zeros_like(scale))
        return Fit(scale, np.zeros_like(scale), self.figures(targets, probs), self.figures(targets, after),
                   len(targets))

    def unseen_rows(self, targets: np.ndarray) -> np.ndarray:
        """Rows holding a label that no other row holds (see Calibrator.unseen_rows)."""
        y = np.asarray(targets) > 0.5
        return (y & (y.sum(axis=0) == 1)[None, :]).any(axis=1)

    def nll(self, targets: np.ndarray, probs: np.ndarray) -> float:
        """Mean binary cross-entropy over every (image, label)."""
        return _bce(np.asarray(targets, dtype=np.float64), np.asarray(probs, dtype=np.float64))

    def confidences(self, targets: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Every (image, label) as one binary prediction: its probability and whether the label
        is present (the calibration of each label's probability, pooled)."""
        return np.asarray(probs, dtype=np.float64).ravel(), (np.asarray(targets) > 0.5).astype(float).ravel()


class NoCalibration(Calibrator):
    """Nothing to calibrate: a number has no probability (see the module docstring), and a
    new task shape calibrates only once it names a calibrator (`Task.calibrator_type`)."""

    kind = "none"
    energy = "none"  # no logits to read: the OOD score is the distance alone

    def fit(self, targets: np.ndarray, probs: np.ndarray) -> Fit | None:
        return None

    def unseen_rows(self, targets: np.ndarray) -> np.ndarray:
        return np.zeros(len(targets), dtype=bool)  # a number has no class a fold can lack


def _temperature_scale(nll: Any, n: int) -> float:
    """1 / T for the T that minimises the mean negative log-likelihood `nll(1 / T)` of `n`
    held-out outputs plus a weak prior on log T (normal, sd PRIOR_SD, centred on T = 1), so
    that a handful of images cannot drive T to a bound; with hundreds it is negligible."""
    from scipy.optimize import minimize_scalar  # fitting is training's: predict and serve never load scipy

    found = minimize_scalar(lambda log_t: nll(float(np.exp(-log_t))) + log_t ** 2 / (2 * PRIOR_SD ** 2 * n),
                            bounds=LOG_T_BOUNDS, method="bounded", options={"xatol": 1e-5})
    return float(np.exp(-found.x))


def expected_calibration_error(confidence: np.ndarray, right: np.ndarray, bins: int = ECE_BINS) -> float:
    """sum over bins of (bin's share) * |accuracy - mean confidence| (0 for no predictions)."""
    confidence, right = np.asarray(confidence, dtype=np.float64), np.asarray(right, dtype=np.float64)
    if not len(confidence):
        return 0.0
    which = _bins(confidence, bins)
    gap = 0.0
    for b in range(bins):
        mask = which == b
        if mask.any():
            gap += mask.mean() * abs(right[mask].mean() - confidence[mask].mean())
    return float(gap)


def _bins(confidence: np.ndarray, bins: int) -> np.ndarray:
    """Equal-width bin of each confidence in [0, 1] (1.0 falls in the last bin)."""
    return np.minimum((np.asarray(confidence) * bins).astype(int), bins - 1)


def _bce(y: np.ndarray, p: np.ndarray) -> float:
    p = np.clip(p, _TINY, 1 - 1e-15)
    return float(-(y * np.log(p) + (1 - y) * np.log1p(-p)).mean())
