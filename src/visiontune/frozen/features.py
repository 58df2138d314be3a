"""Frozen backbone features, computed once and cached on disk.

While a phase keeps the whole backbone frozen (feature-extract, the head-only epochs of
gradual) and its BatchNorm in eval mode, the backbone is a fixed function of the image:
its pooled features are computed once per (backbone weights, eval transform, file
content) and the head trains on those tensors, so later epochs, runs, folds and
strategies cost milliseconds instead of a pass over the images.

Layout: `<cache>/features/<model fingerprint>/`: shards of float32 vectors and an index
keyed by each file's digest (frozen/shards.py). The fingerprint hashes the backbone name,
every backbone tensor and the preprocessing, so other weights or another image size never
reuse stale entries; the digest hashes the file's bytes (remembered by the scan cache,
data/scan.py, while the file is unchanged), so an edited image is recomputed. The cache is
safe to delete at any time. Default root: `$VISIONTUNE_CACHE` or `~/.cache/visiontune`
(`--cache-dir` replaces it).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from visiontune.caches import FolderEntries, guarded, touch
from visiontune.data.loaders import eval_dataset, make_loader, read_ahead
from visiontune.data.preprocess import Preprocess
from visiontune.data.scan import ScanCache, digests_of, why_unreadable
from visiontune.data.webdata import is_shard_item, shard_digests
from visiontune.errors import DataError
from visiontune.files import preallocate
from visiontune.frozen.shards import SHARD_ROWS, ShardStore
from visiontune.runtime.device import eval_mode, prepare_model, resolve_device, to_device
from visiontune.runtime.engine import frozen_engine, module_digest
from visiontune.runtime.inference import progress
from visiontune.tasks.base import unreadable_rows

log = logging.getLogger(__name__)


DECODE_VERSION = "jpeg-draft+fused-resize-crop"  # how files become pixels (load_rgb min_side, ResizeCenterCrop)


def model_fingerprint(backbone_name: str, backbone: nn.Module, pre: Preprocess) -> str:
    """Hash of the backbone's identity, all its tensors (parameters and buffers) and the
    eval preprocessing: anything that changes the features changes the fingerprint."""
    h = hashlib.blake2b(digest_size=16)
    h.update(backbone_name.encode())
    h.update(DECODE_VERSION.encode())
    h.update(repr(sorted(pre.to_dict().items())).encode())
    h.update(module_digest(backbone).encode())
    return h.hexdigest()


class FeatureCache(FolderEntries):
    """Vectors keyed by file digest under one model fingerprint, in shards (frozen/shards.py).
    Every read and write is guarded (caches.guarded): a cache that is read-only, locked or
    full turns itself off with one warning and features are computed instead. `root`: its
    folder (`FeatureCache.location()`); an entry (evicted whole) is one fingerprint's folder."""

    area = "features"
    folder = "features"
    keyed_by = "content"  # the file's digest, under the model's fingerprint (the options that change it)
    key = staticmethod(model_fingerprint)

    def __init__(self, root: str | os.PathLike[str], fingerprint: str) -> None:
        self.dir = Path(root) / fingerprint
        self.name = cache_name(self.dir)
        self.scans = ScanCache(ScanCache.under(Path(root).parent))  # digests of unchanged files, remembered
        self._store: ShardStore | None = None

    @property
    def store(self) -> ShardStore:
        if self._store is None:
            self._store = ShardStore(self.dir)
        return self._store

    def get_many(self, digests: list[str]) -> dict[str, np.ndarray]:
        if self.dir.is_dir():
            touch(self.dir)  # used now: the size cap evicts the least recently used (caches.evict)
        return guarded(self.name, lambda: self.store.get_many(digests), {})

    def put_many(self, digests: list[str], vectors: np.ndarray) -> None:
        guarded(self.name, lambda: self.store.put_many(digests, vectors), None)

    def count_known(self, digests: list[str]) -> int:
        """How many of `digests` have a vector here (0 when the cache cannot be read)."""
        return guarded(self.name, lambda: self.store.count_known(digests), 0)

    def digests(self, paths: Sequence[str], strict: bool = True) -> list[str]:
        """Digests of the files' bytes (shard samples: from their index); `strict` False: ""
        for a file that cannot be read (data/scan.digests_of)."""
        if paths and is_shard_item(paths[0]):
            return shard_digests(list(paths))
        return digests_of(list(paths), self.scans, strict)


def cache_name(directory: str | os.PathLike[str]) -> str:
    """How warnings name the feature cache of one model fingerprint (one name: one warning)."""
    return f"the feature cache {directory}"


def cache_for(backbone_name: str, backbone: nn.Module, pre: Preprocess,
              cache_dir: str | os.PathLike[str] | None = None) -> FeatureCache:
    """The cache of this backbone (weights) and preprocessing, under `cache_dir` or the default."""
    return FeatureCache(FeatureCache.location(cache_dir), model_fingerprint(backbone_name, backbone, pre))


def readable_rows(feats: np.ndarray, paths: list[str],
                  stats: FeatureStats) -> tuple[np.ndarray, list[str], list[tuple[str, str]]]:
    """The rows of `feats` (of `paths`) that hold features, their paths, and (path, why) of
    the files an extraction skipped (`stats.unreadable`)."""
    if not stats.unreadable:
        return feats, paths, []
    gone = {i for i, _ in stats.unreadable}
    kept = [i for i in range(len(paths)) if i not in gone]
    rows = feats[kept] if len(kept) else np.zeros((0, feats.shape[1] if feats.ndim == 2 else 0), np.float32)
    return rows, [paths[i] for i in kept], [(paths[i], why) for i, why in stats.unreadable]


@dataclass
class FeatureStats:
    hits: int
    misses: int  # computed here
    seconds: float
    left_out: list[int] = field(default_factory=list)  # rows not computed: the deadline came first
    unreadable: list[tuple[int, str]] = field(default_factory=list)  # (row, why): files skipped (skip_unreadable)


@dataclass(frozen=True, eq=False)
class FeatureExtractor:
    """The frozen `backbone`'s features of image files, with how they are computed fixed
    once: its preprocessing, the device, the feature cache (None: computed every time), the
    loader's batch size and workers, channels-last, the engine that computes missing rows
    on the CPU ("torch", "onnx" or "auto", runtime/engine.py; exported once per weights
    under `cache_dir`'s engines/), and whether a progress bar counts the rows computed."""

    backbone: nn.Module
    pre: Preprocess
    device: torch.device
    cache: FeatureCache | None = None
    batch_size: int = 64
    num_workers: int | None = None
    channels_last: bool = True
    engine: str = "torch"
    cache_dir: str | os.PathLike[str] | None = None
    progress: bool = False

    @classmethod
    def for_run(cls, backbone_name: str, backbone: nn.Module, pre: Preprocess, cfg: Any,
                device: torch.device | None = None, cached: bool = True) -> FeatureExtractor:
        """The extractor a run's options give (`cfg`: a RunConfig): its device (the backbone
        moved there, unless `device` says where it already is), its cache (`cached` False:
        none), batch size (64 for "auto"), workers, channels-last, engine, progress bar."""
        r, batch_size = cfg.runtime, cfg.train.batch_size
        if device is None:
            device = resolve_device(r.device)
            prepare_model(backbone, device, r.channels_last)
        cache = cache_for(backbone_name, backbone, pre, r.cache_dir) if cached else None
        return cls(backbone, pre, device, cache, batch_size if isinstance(batch_size, int) else 64,
                   r.num_workers, r.channels_last, r.engine, r.cache_dir, r.progress)

    def features(self, paths: Sequence[str]) -> np.ndarray:
        """(N, D) features of `paths`: what the advisor and `suggest` measure on."""
        return self.extract(paths)[0].numpy()

    def readable(self, paths: Sequence[str]) -> tuple[np.ndarray, list[str], list[tuple[str, str]]]:
        """The features of the files that can be read now (an unlabelled pool: files checked
        earlier may have been removed or replaced since): (their features, their paths,
        (path, why) of the files skipped)."""
        feats, stats = self.extract(paths, skip_unreadable=True)
        return readable_rows(feats.numpy(), list(paths), stats)

    @torch.inference_mode()
    def extract(self, paths: Sequence[str], memmap_dir: str | os.PathLike[str] | None = None,
                deadline: float | None = None, skip_unreadable: bool = False) -> tuple[torch.Tensor, FeatureStats]:
        """(N, D) float32 features of `paths` through the frozen backbone in eval mode.

        With `memmap_dir` the matrix is a memory-mapped file there (unlinked at once, so
        nothing is left behind) and rows stream into it: memory stays flat as N grows, the
        pages the head reads are the kernel's to keep or drop. With `deadline`
        (time.perf_counter()) the images to compute are taken in a seeded random order and
        the work stops at the deadline: the rows not computed (a random sample of them) are
        in `stats.left_out` and hold no features. All rows cached: no engine is loaded. A
        file that cannot be read is an error (data/webdata.read_marked: a DataError naming
        it), or with `skip_unreadable` (the unlabelled pool) a row that holds no features,
        listed with the reason in `stats.unreadable`."""
        started, n, cache = time.perf_counter(), len(paths), self.cache
        matrix: _Rows = _Rows(n, memmap_dir)
        digests = cache.digests(paths, strict=not skip_unreadable) if cache else [""] * n
        missing = _cached_rows(matrix, digests, cache)
        if deadline is not None:  # cut short, what was computed is a random sample
            missing = [missing[i] for i in np.random.default_rng(0).permutation(len(missing))]
        model = frozen_engine(self.backbone, self.pre.input_size, self.device, self.engine, self.cache_dir,
                              len(missing)) if missing else self.backbone
        rows = _compute(model, [paths[i] for i in missing], self.pre, self.device, self.batch_size, self.num_workers,
                        self.channels_last, deadline, skip_unreadable)
        done, unreadable = _fill(matrix, _CacheWriter(cache), digests, missing,
                                 progress(rows, self.progress, "features", len(missing)))
        left_out = np.flatnonzero(~done).tolist()
        if left_out and not (deadline is not None and time.perf_counter() > deadline):
            raise DataError(f"{len(left_out)} of {n} images yielded no features (e.g. {paths[left_out[0]]}): their "
                            "shards do not hold what the index lists; write the shards again with `visiontune shard`")
        computed = len(missing) - len(left_out) - len(unreadable)
        stats = FeatureStats(n - len(missing), computed, time.perf_counter() - started, left_out,
                             [(i, why_unreadable(paths[i])) for i in unreadable])
        log.info("features: %d cached, %d computed%s%s (%.1fs)", stats.hits, stats.misses,
                 (" by ONNX Runtime" if model is not self.backbone else " by PyTorch") if missing else "",
                 f", {len(unreadable)} files skipped (cannot be read)" if unreadable else "", stats.seconds)
        return matrix.tensor(), stats


def _fill(matrix: _Rows, writer: _CacheWriter, digests: list[str], missing: list[int],
          computed: Iterator[tuple[int, np.ndarray | None]]) -> tuple[np.ndarray, list[int]]:
    """Put each computed row into `matrix` and the cache; (which rows are done, the rows
    whose file could not be read)."""
    done = np.ones(len(digests), dtype=bool)
    done[missing] = False
    unreadable = []
    for j, row in computed:
        i = missing[j]
        done[i] = True
        if row is None:
            unreadable.append(i)
            continue
        matrix.put(i, row)
        writer.add(digests[i], row)
    writer.flush()
    return done, unreadable


class _CacheWriter:
    """Computed vectors on their way to the cache, written a shard's worth at a time."""

    def __init__(self, cache: FeatureCache | None) -> None:
        self.cache, self.pending = cache, []  # type: FeatureCache | None, list[tuple[str, np.ndarray]]

    def add(self, digest: str, row: np.ndarray) -> None:
        if self.cache is not None and digest:  # "": the file could not be hashed (read since): nothing to key by
            self.pending.append((digest, row))
            if len(self.pending) >= SHARD_ROWS:
                self.flush()

    def flush(self) -> None:
        if self.cache is not None and self.pending:
            self.cache.put_many([d for d, _ in self.pending], np.stack([r for _, r in self.pending]))
        self.pending.clear()


def _cached_rows(matrix: _Rows, digests: list[str], cache: FeatureCache | None) -> list[int]:
    """Fill `matrix` with the cached vectors (read a shard's worth at a time: memory stays
    flat); return the rows still to compute."""
    missing: list[int] = []
    for start in range(0, len(digests), SHARD_ROWS):
        part = digests[start:start + SHARD_ROWS]
        known = cache.get_many(part) if cache else {}
        for j, digest in enumerate(part):
            if digest in known:
                matrix.put(start + j, known[digest])
            else:
                missing.append(start + j)
    return missing


def _compute(backbone: nn.Module, paths: list[str], pre: Preprocess, device: torch.device, batch_size: int,
             num_workers: int | None, channels_last: bool, deadline: float | None = None,
             skip_unreadable: bool = False) -> Iterator[tuple[int, np.ndarray | None]]:
    """(index into `paths`, backbone features) of the paths (eval mode, eval transform), in
    the order the loader reads (shard samples: as their shards stream them), until
    `deadline`; the loader yields each image's row, so no row is paired with another
    image's features. `skip_unreadable`: a file that does not load gives None, not an error."""
    if not paths:
        return
    dataset = eval_dataset(paths, None, pre, mark_unreadable=skip_unreadable)
    with eval_mode(backbone):  # each module's own mode back afterwards, also when the caller stops early
        for x, marks, rows in read_ahead(make_loader(dataset, batch_size, num_workers, device)):
            if deadline is not None and time.perf_counter() > deadline:
                log.warning("time budget: feature extraction stopped at the deadline")
                break
            feats = backbone(to_device(x, device, channels_last)).float().cpu().numpy()
            bad = unreadable_rows(marks).tolist()
            yield from ((row, None if gone else f) for row, f, gone in zip(rows.tolist(), feats, bad))


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
        mapped = guarded(cache_name(self.dir), lambda: self._mapped(shape), None)  # else: in memory
        return mapped if mapped is not None else np.empty(shape, dtype=np.float32)

    def _mapped(self, shape: tuple[int, int]) -> np.ndarray:
        """A memory-mapped matrix in a file unlinked at once (a crash leaves nothing), its
        blocks reserved first: a full disk is an OSError now, never a SIGBUS later. Windows
        cannot unlink a mapped file: it stays until a later matrix in the folder sweeps it."""
        Path(self.dir).mkdir(parents=True, exist_ok=True)  # type: ignore[arg-type]
        _sweep_matrices(Path(self.dir))  # type: ignore[arg-type]
        fd, name = tempfile.mkstemp(dir=self.dir, suffix=MATRIX_SUFFIX)
        os.close(fd)
        try:
            array = np.lib.format.open_memmap(name, mode="w+", dtype=np.float32, shape=shape)
            preallocate(name, os.path.getsize(name))
            return array
        finally:
            with contextlib.suppress(OSError):
                os.unlink(name)  # the mapping stays valid

    def tensor(self) -> torch.Tensor:
        if self.array is None:
            return torch.zeros(0, 0)
        return torch.from_numpy(self.array)


MATRIX_SUFFIX = ".features.npy"  # _Rows' memory-mapped matrices
SWEEP_AFTER_S = 60.0


def _sweep_matrices(folder: Path) -> None:
    """Remove the matrices left in `folder` (on Windows, where a mapped file cannot be
    unlinked while in use) that are over a minute old; one still mapped by a process
    cannot be removed there, and elsewhere an unlinked file's mapping stays valid."""
    for left in folder.glob(f"*{MATRIX_SUFFIX}"):
        with contextlib.suppress(OSError):
            if time.time() - left.stat().st_mtime > SWEEP_AFTER_S:
                left.unlink()
