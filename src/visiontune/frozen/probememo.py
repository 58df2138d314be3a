"""The converged probe, remembered: a fit is stored under the digest of everything it
depends on (the feature matrix, the targets, the task and its metadata, the head's start,
the loss weights, the groups, the seed and the probe's own constants), so a re-run over
unchanged features skips the C search and the fit (issue 23: "a re-run that pays only for
what changed"). Entries live in `$VISIONTUNE_CACHE/probes/<digest>.npy`; like every
cache they are written atomically, read through `caches.guarded`, and safe to delete.

Only fits that ran to the end are stored: one cut short by a time budget's deadline is
not what an unhurried run would fit.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from visiontune.caches import Cache, guarded, save_entry, touch
from visiontune.frozen import probe
from visiontune.frozen.probe import ProbeFit
from visiontune.tasks.base import Task

log = logging.getLogger(__name__)

VERSION = 2  # bump when the probe's maths changes: old entries are then never read


def probe_key(features: np.ndarray, targets: np.ndarray, task: Task, start: nn.Linear | None,
              weights: torch.Tensor | None, seed: int, groups: list[str] | None) -> str:
    """The digest of every input of `fit_probe` and of the probe's constants."""
    h = hashlib.sha256()
    for array in (features, targets):
        array = np.ascontiguousarray(array)
        h.update(f"{array.dtype.str}{array.shape}".encode())
        h.update(memoryview(array).cast("B"))
    for tensor in ((start.weight, start.bias) if start is not None else ()) + ((weights,) if weights is not None else ()):
        h.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    h.update(json.dumps([VERSION, task.name, task.classes, task.metadata(), seed, groups, probe.C_GRID,
                         probe.C_LIMITS, probe.REFINE, probe.CRITERION, probe.MAX_ITER, probe.CV_FOLDS, probe.SEARCH_ROWS, probe.FIT_ROWS, start is not None,
                         weights is not None], sort_keys=True, default=str).encode())
    return h.hexdigest()


class ProbeMemory(Cache):
    """Remembered probe fits under `<cache root>/probes/`: a file each, keyed by the digest
    of the fit's inputs (`probe_key`)."""

    area = "probes"
    folder = "probes"
    keyed_by = "content"
    key = staticmethod(probe_key)

    def __init__(self, cache_dir: str | None = None) -> None:
        self.dir = self.location(cache_dir)

    def fit(self, key: str, compute: Callable[[], ProbeFit], storable: Callable[[], bool]) -> tuple[ProbeFit, bool]:
        """(the fit remembered under `key`, True), else (`compute()`, False), stored when
        `storable()` says the fit ran to the end."""
        entry = self.dir / f"{key}.npy"
        found = guarded(f"the probe cache {self.dir}", lambda: _read(entry), None)
        if found is not None:
            return found, True
        fit = compute()
        if storable():
            guarded(f"the probe cache {self.dir}", lambda: save_entry(entry, _pack(fit)), None)
        return fit, False


def _pack(fit: ProbeFit) -> np.ndarray:
    """weight | bias | c | folds as one float64 matrix (one row per output)."""
    rows = len(fit.bias)
    return np.concatenate([fit.weight.astype(np.float64), fit.bias.reshape(rows, 1).astype(np.float64),
                           np.full((rows, 1), fit.c), np.full((rows, 1), float(fit.folds))], axis=1)


def _read(entry: Path) -> ProbeFit | None:
    if not entry.is_file():
        return None
    packed = np.load(entry, allow_pickle=False)
    touch(entry)  # used now: the size cap evicts the least recently used (caches.evict)
    return ProbeFit(packed[:, :-3].astype(np.float32), packed[:, -3].astype(np.float32), float(packed[0, -2]),
                    int(packed[0, -1]))
