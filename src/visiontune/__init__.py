"""visiontune: transfer learning for image classification, every step measured and shown.

    import visiontune as vt
    result = vt.fit("images/", strategy="gradual", epochs=5)
    preds, skipped = vt.predict(result.run_dir, "photos/")
    print(vt.evaluate(result.run_dir, "images/test").format())

`import visiontune` is light: the public names below are imported on first use
(PEP 562), so `vt.ConfigError` does not load torch and `vt.fit` loads what training needs.
"""

from __future__ import annotations

import importlib
from typing import Any

from visiontune.version import __version__ as __version__

_PUBLIC = {
    "fit": "visiontune.api",
    "evaluate": "visiontune.prediction",
    "predict": "visiontune.prediction",
    "predict_stream": "visiontune.prediction",
    "inspect": "visiontune.api",
    "EvalResult": "visiontune.prediction",
    "FitResult": "visiontune.api",
    "Prediction": "visiontune.prediction",
    "PredictionStream": "visiontune.prediction",
    "RunConfig": "visiontune.config",
    "DataConfig": "visiontune.config",
    "ModelConfig": "visiontune.config",
    "StrategyConfig": "visiontune.config",
    "TrainConfig": "visiontune.config",
    "OutputConfig": "visiontune.config",
    "AugmentConfig": "visiontune.config",
    "RuntimeConfig": "visiontune.config",
    "TrackingConfig": "visiontune.config",
    "BudgetConfig": "visiontune.config",
    "ConfigError": "visiontune.errors",
    "DataError": "visiontune.errors",
    "VisiontuneError": "visiontune.errors",
    "WeightsUnavailableError": "visiontune.errors",
    "register_strategy": "visiontune.train.strategies",
    "interpret": "visiontune.analysis.interpret",
    "cross_validate": "visiontune.selection.cv",
    "compare": "visiontune.selection.compare",
    "advise": "visiontune.selection.advisor",
    "lr_find": "visiontune.selection.lrfind",
    "show_batch": "visiontune.analysis.notebook",
}

__all__ = sorted([*_PUBLIC, "__version__"])


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"visiontune.{name}")
    raise AttributeError(f"module 'visiontune' has no attribute {name!r}")


_SUBMODULES = {"api", "bundle", "config", "errors", "cli", "data", "models", "tasks", "train", "runtime",
               "selection", "analysis", "deploy", "files"}


def __dir__() -> list[str]:
    return sorted([*__all__, *_SUBMODULES])
