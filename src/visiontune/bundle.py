"""A trained run loaded back: the classifier rebuilt from the run's model.safetensors
(safetensors only, so no file can execute code), its task, preprocessing and config, and
the environment a run records. The run directory's layout, and the reading and writing of
each of its files, are `rundir.RunDir`'s.
"""

from __future__ import annotations

import json
import logging
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torchvision
from safetensors import safe_open
from safetensors.torch import load_file

from visiontune.config import ModelConfig, RunConfig
from visiontune.data.preprocess import Preprocess
from visiontune.errors import ConfigError, VisiontuneError
from visiontune.models.classifier import create_classifier, load_weights
from visiontune.rundir import MODEL_FILE, WORKING_FOLDER, RunDir
from visiontune.tasks.base import Decoded, Task
from visiontune.tasks.catalog import make_task
from visiontune.tasks.conformal import check_coverage, minimum_images
from visiontune.version import __version__

log = logging.getLogger(__name__)


@dataclass
class Bundle:
    model: Any  # a Classifier, or an exported model behind the same call (deploy/export.py)
    task: Task
    preprocess: Preprocess
    path: str
    config: RunConfig | None = None

    uncertainty: dict[str, Any] | None = None  # what the run fitted on held-out outputs (calibration, sets)

    def __post_init__(self) -> None:
        if self.uncertainty is None:
            self.uncertainty = getattr(self.model, "uncertainty", None) or {}

    @property
    def classes(self) -> list[str]:
        return self.task.classes


@dataclass
class SetRequest:
    """predict and serve --coverage [--abstain]: what attaches a prediction set to each
    prediction."""

    fitted: dict[str, Any]  # the run's held-out scores (model.uncertainty["sets"])
    coverage: float
    abstain: bool = False

    @classmethod
    def of(cls, bundle: Bundle, coverage: float | None, abstain: bool = False) -> SetRequest | None:
        """The request for `bundle` (None without `coverage`); ConfigError when the run has no
        held-out scores, or --abstain for a task without classes to choose between."""
        if coverage is None:
            return None
        check_coverage(coverage)
        if bundle.task.conformal is None:
            raise ConfigError(f"--coverage: the {bundle.task.name} task has no prediction sets")
        fitted = (bundle.uncertainty or {}).get("sets")
        if not fitted:
            raise ConfigError(f"{bundle.path}: this model has no prediction sets (--coverage): they are fitted on the "
                              "validation split at the end of training, and this run had none, or was trained by "
                              "an older visiontune; train it again with a validation split")
        if abstain and not bundle.task.conformal.can_abstain:
            raise ConfigError(f"--abstain chooses between classes (single-label); a {bundle.task.name} model's "
                              "uncertainty is its set (interval) column")
        needed = minimum_images(coverage)
        if fitted.get("n", needed) < needed:
            log.warning("--coverage %g needs %d held-out images for its guarantee; this run had %d, so every set "
                        "holds every class (every interval is unbounded)", coverage, needed, fitted["n"])
        return cls(fitted, coverage, abstain)

    def attach(self, task: Any, probs: np.ndarray, decoded: list[Decoded]) -> None:
        for d, s in zip(decoded, task.conformal.sets(probs, self.fitted, self.coverage)):
            d.prediction_set = s
            d.abstained = self.abstain and len(s.labels) > 1


@dataclass
class OodRequest:
    """What marks a prediction "unknown": the run's OOD threshold (model.uncertainty["ood"],
    set on its validation split: train/calibrate.py), or predict --ood-threshold."""

    threshold: float

    @classmethod
    def of(cls, bundle: Bundle, threshold: float | None = None) -> OodRequest | None:
        """The request for `bundle`: None when its model scores no image (no bank: a run
        trained before visiontune had one, or without a validation split); ConfigError when
        `threshold` is asked of such a model."""
        fitted = (bundle.uncertainty or {}).get("ood")
        if not fitted:
            if threshold is not None:
                raise ConfigError(f"--ood-threshold {threshold:g}: {bundle.path}'s model has no out-of-distribution "
                                  "score (it keeps features of its training images when trained with a validation "
                                  "split by this visiontune); train it again, or leave --ood-threshold out")
            return None
        return cls(float(fitted["threshold"] if threshold is None else threshold))

    def attach(self, scores: np.ndarray, decoded: list[Decoded]) -> None:
        for d, score in zip(decoded, scores):
            d.ood_score, d.unknown = float(score), bool(score > self.threshold)


def model_file(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    if p.is_dir():
        p = RunDir(p).model
    if not p.is_file():
        raise VisiontuneError(
            f"no model at {str(path)!r}: expected a run directory holding {MODEL_FILE} "
            "(written by `visiontune train`) or the .safetensors file itself"
        )
    return p


def load_bundle(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> Bundle:
    """Rebuild the trained classifier from a run directory or its model.safetensors."""
    file = model_file(path)
    try:
        with safe_open(str(file), framework="pt") as fh:
            raw = (fh.metadata() or {}).get("visiontune")
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error for a file of another format
        raise VisiontuneError(f"{str(file)!r} is not a safetensors file of a visiontune run ({exc}); give the run "
                              f"directory (an exported .onnx / .pt2 file predicts and evaluates, but this command "
                              "needs the run's weights)") from None
    if raw is None:
        raise VisiontuneError(f"{str(file)!r} is not a visiontune model (no metadata)")
    meta = json.loads(raw)
    pre = Preprocess.from_dict(meta["preprocess"])
    model_cfg = ModelConfig(
        backbone=meta["backbone"], weights="none", image_size=pre.input_size,
        head_hidden=int(meta["head_hidden"]), head_dropout=float(meta["head_dropout"]),
    )
    task = make_task(meta.get("task", "single-label"), list(meta["classes"]), meta)
    model, _ = create_classifier(model_cfg, task.num_outputs)  # the head's width is the task's
    load_weights(model, load_file(str(file)))
    model.uncertainty = meta.get("uncertainty") or {}
    model.to(device, memory_format=torch.channels_last).eval()  # inputs follow in run_eval
    return Bundle(model, task, pre, str(file.parent), RunDir(file.parent).read_config())


def environment(cfg: RunConfig, device: str) -> dict[str, Any]:
    return {
        "visiontune": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "seed": cfg.seed,
        WORKING_FOLDER: os.getcwd(),  # splits.csv's relative paths are relative to it (RunDir.splits)
    }

