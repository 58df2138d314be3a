"""Frozen backbone features, computed once and cached on disk.

While a phase keeps the whole backbone frozen (feature-extract, the head-only epochs of
gradual) and its BatchNorm in eval mode, the backbone is a fixed function of the image:
its pooled features are computed once per (backbone weights, eval transform, file
content) and the head trains on those tensors, so later epochs, runs, folds and
strategies cost milliseconds instead of a pass over the images.

Layout: `<cache>/<model fingerprint>/<ab>/<file digest>.npy`, one float32 vector per image,
written atomically. The fingerprint hashes the backbone name, every backbone tensor and the
preprocessing, so other weights or another image size never reuse stale entries; the
digest hashes the file's bytes, so an edited image is recomputed. The cache is safe to
delete at any time. Default location: `$VISIONTUNE_CACHE` or `~/.cache/visiontune/features` (`--cache-dir` replaces the root).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from visiontune.data.loaders import eval_dataset, make_loader
from visiontune.data.preprocess import Preprocess
from visiontune.files import cache_root, file_digest, save_entry
from visiontune.runtime.device import to_device

log = logging.getLogger(__name__)


DECODE_VERSION = "jpeg-draft+fused-resize-crop"  # how files become pixels (load_rgb min_side, ResizeCenterCrop)


def model_fingerprint(backbone_name: str, backbone: nn.Module, pre: Preprocess) -> str:
    """Hash of the backbone's identity, all its tensors (parameters and buffers) and the
    eval preprocessing: anything that changes the features changes the fingerprint."""
    h = hashlib.blake2b(digest_size=16)
    h.update(backbone_name.encode())
    h.update(DECODE_VERSION.encode())
    h.update(repr(sorted(pre.to_dict().items())).encode())
    for name, tensor in backbone.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().to("cpu").contiguous().numpy().tobytes())
    return h.hexdigest()


class FeatureCache:
    """Vectors keyed by file digest under one model fingerprint."""

    def __init__(self, root: str | os.PathLike[str], fingerprint: str) -> None:
        self.dir = Path(root) / fingerprint

    def _path(self, digest: str) -> Path:
        return self.dir / digest[:2] / f"{digest}.npy"

    def get(self, digest: str) -> np.ndarray | None:
        try:
            return np.load(self._path(digest), allow_pickle=False)
        except (FileNotFoundError, ValueError, OSError):
            return None  # missing or torn by an old crash: recompute

    def put(self, digest: str, vector: np.ndarray) -> None:
        save_entry(self._path(digest), vector.astype(np.float32))


def cache_for(backbone_name: str, backbone: nn.Module, pre: Preprocess,
              cache_dir: str | os.PathLike[str] | None = None) -> FeatureCache:
    """The cache of this backbone (weights) and preprocessing, under `cache_dir` or the default."""
    return FeatureCache(cache_root(cache_dir) / "features", model_fingerprint(backbone_name, backbone, pre))


@dataclass
class FeatureStats:
    hits: int
    misses: int
    seconds: float


@torch.inference_mode()
def extract_features(
    backbone: nn.Module,
    paths: Sequence[str],
    pre: Preprocess,
    device: torch.device,
    cache: FeatureCache | None,
    batch_size: int = 64,
    num_workers: int | None = None,
    channels_last: bool = True,
    memmap_dir: str | os.PathLike[str] | None = None,
) -> tuple[torch.Tensor, FeatureStats]:
    """(N, D) float32 features of `paths` through the frozen `backbone` in eval mode.

    With `memmap_dir` the matrix is a memory-mapped file there (unlinked at once, so
    nothing is left behind) and rows stream into it: memory stays flat as N grows, the
    pages the head reads are the kernel's to keep or drop."""
    started = time.perf_counter()
    n = len(paths)
    matrix: _Rows = _Rows(n, memmap_dir)
    digests = [file_digest(p) for p in paths] if cache else [""] * n
    missing = []
    for i, digest in enumerate(digests):
        row = cache.get(digest) if cache else None
        if row is None:
            missing.append(i)
        else:
            matrix.put(i, row)
    if missing:
        was_training = backbone.training
        backbone.eval()
        ds = eval_dataset([paths[i] for i in missing], None, pre)
        done = 0
        for x, _ in make_loader(ds, batch_size, num_workers, device):
            out = backbone(to_device(x, device, channels_last)).float().cpu().numpy()
            for row in out:
                i = missing[done]
                matrix.put(i, row)
                if cache:
                    cache.put(digests[i], row)
                done += 1
        backbone.train(was_training)
    stats = FeatureStats(n - len(missing), len(missing), time.perf_counter() - started)
    log.info("features: %d cached, %d computed (%.1fs)", stats.hits, stats.misses, stats.seconds)
    return matrix.tensor(), stats


class _Rows:
    """An (n, D) float32 matrix filled row by row; D is learnt from the first row. In RAM,
    or a memory-mapped file under `memmap_dir`."""

    def __init__(self, n: int, memmap_dir: str | os.PathLike[str] | None) -> None:
        self.n, self.dir = n, memmap_dir
        self.array: np.ndarray | None = None

    def put(self, i: int, row: np.ndarray) -> None:
        if self.array is None:
            self.array = self._allocate((self.n, int(row.shape[-1])))
        self.array[i] = row

    def _allocate(self, shape: tuple[int, int]) -> np.ndarray:
        if self.dir is None:
            return np.empty(shape, dtype=np.float32)
        try:
            Path(self.dir).mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(dir=self.dir, suffix=".features.npy")
            os.close(fd)
        except OSError as exc:  # unwritable cache folder: keep the matrix in memory
            log.warning("cannot map features in %s (%s); keeping them in memory", self.dir, exc)
            return np.empty(shape, dtype=np.float32)
        try:
            return np.lib.format.open_memmap(name, mode="w+", dtype=np.float32, shape=shape)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(name)  # the mapping stays valid; a crash leaves no file behind

    def tensor(self) -> torch.Tensor:
        if self.array is None:
            return torch.zeros(0, 0)
        return torch.from_numpy(self.array)
