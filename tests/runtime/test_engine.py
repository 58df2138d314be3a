"""The frozen forward pass through ONNX Runtime (runtime/engine.py): same features as
PyTorch within the stated tolerance, exported once per weights into the cache, and never
used when it disagrees with PyTorch."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_class_folders
from visiontune.config import ModelConfig
from visiontune.data.preprocess import Preprocess
from visiontune.errors import VisiontuneError
from visiontune.frozen.features import FeatureExtractor
from visiontune.models.classifier import create_classifier
from visiontune.runtime import engine as eng
from visiontune.runtime.engine import FEATURE_TOLERANCE, OnnxModule, frozen_engine

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

CPU = torch.device("cpu")


def _backbone(seed: int) -> tuple[torch.nn.Module, Preprocess]:
    torch.manual_seed(seed)
    model, pre = create_classifier(ModelConfig(backbone="timm:test_efficientnet", weights="none", image_size=32), 2)
    return model.backbone.eval(), pre


def test_onnx_features_match_pytorch_and_the_export_lives_in_the_cache(tmp_path: Path) -> None:
    data = make_class_folders(tmp_path / "data", {"red": 6, "green": 6})
    paths = sorted(str(p) for p in data.rglob("*.png"))
    backbone, pre = _backbone(0)
    eager, _ = FeatureExtractor(backbone, pre, CPU, None, engine="torch").extract(paths)
    onnx, _ = FeatureExtractor(backbone, pre, CPU, None, engine="onnx", cache_dir=tmp_path / "cache").extract(paths)
    scale = max(1.0, float(eager.abs().max()))
    assert float((eager - onnx).abs().max()) / scale <= FEATURE_TOLERANCE
    exported = list((tmp_path / "cache" / "engines").glob("*.onnx"))
    assert len(exported) == 1 and not list(data.rglob("*.onnx"))  # the cache holds it, not the data or a run
    inode = exported[0].stat().st_ino  # a new export is written atomically: a new file, a new inode
    assert isinstance(frozen_engine(backbone, 32, CPU, "auto", tmp_path / "cache"), OnnxModule)
    assert exported[0].stat().st_ino == inode  # exported once for these weights, then reused


def test_an_export_that_disagrees_with_pytorch_is_never_used(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """An export of other weights stored under these weights' name (a stale or corrupt
    cache entry) fails the check against eager: auto falls back to PyTorch, onnx refuses."""
    mine, _ = _backbone(0)
    other, _ = _backbone(1)
    frozen_engine(other, 32, CPU, "onnx", tmp_path / "cache")
    [theirs] = (tmp_path / "cache" / "engines").glob("*.onnx")
    shutil.copy(theirs, theirs.parent / f"{eng.module_digest(mine)}-32.onnx")
    with caplog.at_level(logging.WARNING):
        assert frozen_engine(mine, 32, CPU, "auto", tmp_path / "cache") is mine
    assert "differ from PyTorch" in caplog.text
    with pytest.raises(VisiontuneError, match="differ from PyTorch"):
        frozen_engine(mine, 32, CPU, "onnx", tmp_path / "cache")
    # the refusal is of that file: a cache without it exports these weights anew (it refused them in every
    # cache of the process, so a later run in the same process failed with --engine onnx)
    assert isinstance(frozen_engine(mine, 32, CPU, "onnx", tmp_path / "fresh"), OnnxModule)


def test_auto_exports_only_when_the_work_pays_for_it(tmp_path: Path) -> None:
    backbone, _ = _backbone(2)
    assert frozen_engine(backbone, 32, CPU, "auto", tmp_path / "cache", images=10) is backbone
    assert not (tmp_path / "cache" / "engines").exists()
    assert isinstance(frozen_engine(backbone, 32, CPU, "auto", tmp_path / "cache", images=10**6), OnnxModule)
    assert isinstance(frozen_engine(backbone, 32, CPU, "auto", tmp_path / "cache", images=10), OnnxModule)  # exists


def test_features_are_the_same_whichever_engine_ran(tmp_path: Path) -> None:
    """The feature cache does not name the engine: rows computed by ONNX Runtime and rows
    computed by PyTorch sit in one cache and agree within the tolerance."""
    from visiontune.frozen.features import cache_for

    data = make_class_folders(tmp_path / "data", {"red": 4, "green": 4})
    paths = sorted(str(p) for p in data.rglob("*.png"))
    backbone, pre = _backbone(3)
    cache = cache_for("timm:test_efficientnet", backbone, pre, tmp_path / "c")
    FeatureExtractor(backbone, pre, CPU, cache, engine="onnx", cache_dir=tmp_path / "c").extract(paths[:4])
    mixed, stats = FeatureExtractor(backbone, pre, CPU, cache, engine="torch").extract(paths)
    assert (stats.hits, stats.misses) == (4, 4)
    eager, _ = FeatureExtractor(backbone, pre, CPU, None, engine="torch").extract(paths)
    assert np.allclose(mixed.numpy(), eager.numpy(), atol=FEATURE_TOLERANCE * max(1.0, float(eager.abs().max())))
