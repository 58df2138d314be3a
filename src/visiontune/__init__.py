"""visiontune: transfer learning for image classification, every step measured and shown.

    import visiontune as vt
    result = vt.fit("images/", strategy="gradual", epochs=5)
    preds, skipped = vt.predict(result.run_dir, "photos/")
    print(vt.evaluate(result.run_dir, "images/test").format())
"""

from visiontune.api import EvalResult, FitResult, Prediction, evaluate, fit, inspect, predict
from visiontune.config import DataConfig, ModelConfig, RunConfig, StrategyConfig, TrainConfig
from visiontune.errors import ConfigError, DataError, VisiontuneError, WeightsUnavailableError

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "DataConfig",
    "DataError",
    "EvalResult",
    "FitResult",
    "ModelConfig",
    "Prediction",
    "RunConfig",
    "StrategyConfig",
    "TrainConfig",
    "VisiontuneError",
    "WeightsUnavailableError",
    "__version__",
    "evaluate",
    "fit",
    "inspect",
    "predict",
]
