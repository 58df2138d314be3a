"""The frozen-backbone feature cache: hits, misses, invalidation, and equality with the
image path."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

import visiontune as vt
from conftest import make_class_folders, make_image
from visiontune.config import ModelConfig
from visiontune.frozen.features import FeatureCache, FeatureExtractor, model_fingerprint
from visiontune.models.classifier import Preprocess, create_classifier


def _model(seed: int = 0):
    torch.manual_seed(seed)
    return create_classifier(ModelConfig(backbone="timm:test_efficientnet", weights="none", image_size=32), 2)


def _extract(model, pre, paths, root):
    cache = FeatureCache(root, model_fingerprint("timm:test_efficientnet", model.backbone, pre))
    return FeatureExtractor(model.backbone, pre, torch.device("cpu"), cache, batch_size=4, num_workers=0).extract(
        paths)


def test_cache_hit_miss_and_invalidation(tmp_path: Path) -> None:
    root = make_class_folders(tmp_path / "d", {"red": 3, "green": 3})
    paths = sorted(str(p) for p in root.rglob("*.png"))
    model, pre = _model()
    first, s1 = _extract(model, pre, paths, tmp_path / "cache")
    assert (s1.hits, s1.misses) == (0, 6) and first.shape == (6, model.num_features)
    again, s2 = _extract(model, pre, paths, tmp_path / "cache")
    assert (s2.hits, s2.misses) == (6, 0) and torch.equal(first, again)
    make_image(Path(paths[0]), (0, 0, 0), seed=99)  # the file's content changes
    changed, s3 = _extract(model, pre, paths, tmp_path / "cache")
    assert (s3.hits, s3.misses) == (5, 1) and not torch.equal(changed[0], first[0])
    bigger = Preprocess(48, pre.mean, pre.std, pre.interpolation, pre.crop_pct)
    _, s4 = _extract(model, bigger, paths, tmp_path / "cache")  # another transform
    assert s4.misses == 6
    other, _ = _model(seed=1)
    _, s5 = _extract(other, pre, paths, tmp_path / "cache")  # other weights
    assert s5.misses == 6


def test_a_torn_shard_is_recomputed(tmp_path: Path) -> None:
    root = make_class_folders(tmp_path / "d", {"red": 2, "green": 2})
    paths = sorted(str(p) for p in root.rglob("*.png"))
    model, pre = _model()
    first, _ = _extract(model, pre, paths[:3], tmp_path / "cache")  # one shard of 3
    _extract(model, pre, paths, tmp_path / "cache")  # and one of 1
    torn = max((tmp_path / "cache").rglob("shard-*.npy"), key=lambda p: p.stat().st_size)
    torn.write_bytes(torn.read_bytes()[:40])  # a crash mid-write of the big shard
    again, stats = _extract(model, pre, paths, tmp_path / "cache")
    assert (stats.hits, stats.misses) == (1, 3) and torch.allclose(first, again[:3])
    _, healed = _extract(model, pre, paths, tmp_path / "cache")
    assert (healed.hits, healed.misses) == (4, 0) and not torn.exists()


@pytest.mark.parametrize("backbone,drop_path", [("timm:test_efficientnet", 0.0), ("timm:test_vit", 0.5)])
def test_cached_training_equals_training_on_images(flat_data: Path, tmp_path: Path, tiny: dict, backbone: str,
                                                   drop_path: float) -> None:
    """Without augmentation the two paths see the same numbers: same losses, same head. A
    frozen backbone with stochastic depth computes the same function on images as when its
    features were cached (every frozen module in eval mode)."""
    # engine "torch" and a cache of its own: an ONNX export of this backbone, or features of the same image
    # bytes computed in another test at another batch size, left in the session's cache would be equal to
    # these within 1e-3 (the cache's promise), not the 1e-5 asked here
    kw = dict(tiny, strategy="feature-extract", epochs=3, lr=1e-2, augment=False, output=str(tmp_path / "runs"),
              backbone=backbone, drop_path=drop_path, engine="torch", cache_dir=str(tmp_path / "cache"))
    cached = vt.fit(flat_data, name="cached", **kw)
    images = vt.fit(flat_data, name="images", feature_cache=False, **kw)
    for key in ("train_loss", "val_loss", "accuracy"):
        assert [h[key] for h in cached.history] == pytest.approx([h[key] for h in images.history], abs=1e-5)
    assert torch.allclose(cached.model.head[0].weight, images.model.head[0].weight, atol=1e-5)


def test_gradual_uses_features_only_while_the_backbone_is_frozen(flat_data: Path, tmp_path: Path, tiny: dict,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    import logging

    caplog.set_level(logging.INFO, logger="visiontune")
    vt.fit(flat_data, **dict(tiny, strategy="gradual", epochs=3, freeze_epochs=1, output=str(tmp_path / "r")))
    # train + valid, once, for the frozen phase; then the OOD step's two passes with the fine-tuned weights
    # (the validation images, then as much of the bank as the time left allows: train/calibrate.fit_ood)
    assert sum("features:" in r.message for r in caplog.records) == 4
    caplog.clear()
    vt.fit(flat_data, **dict(tiny, strategy="finetune", epochs=1, output=str(tmp_path / "r")))
    assert sum("features:" in r.message for r in caplog.records) == 2  # the OOD step's passes alone, after training


def test_memory_mapped_features_without_statvfs_or_fallocate(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                              request: pytest.FixtureRequest) -> None:
    """Windows has neither os.statvfs nor os.posix_fallocate (macOS lacks the latter): the
    matrix's room is asked of shutil.disk_usage, and the features are memory-mapped there
    as here. (Before: AttributeError, not a cache error, so the default path failed.)"""
    root = make_class_folders(tmp_path / "d", {"red": 3, "green": 2})
    paths = sorted(str(p) for p in root.rglob("*.png"))
    model, pre = _model()
    extractor = FeatureExtractor(model.backbone, pre, torch.device("cpu"), None, batch_size=4, num_workers=0)
    in_ram, _ = extractor.extract(paths)
    request.getfixturevalue("without_statvfs")  # from here on, the platform is as on Windows
    maps = tmp_path / "maps"
    left, fresh = maps / "tmpold.features.npy", maps / "tmpnew.features.npy"  # a matrix Windows could not unlink
    maps.mkdir()
    left.write_bytes(b"x" * 4096), fresh.write_bytes(b"y")
    os.utime(left, (time.time() - 3600,) * 2)
    mapped, _ = extractor.extract(paths, memmap_dir=maps)
    torch.testing.assert_close(mapped, in_ram)
    assert sorted(maps.iterdir()) == [fresh]  # the old one swept; one in use (or just made) is kept
    assert not [r for r in caplog.records if "cannot be used" in r.getMessage()]  # the memory map, not a fallback
