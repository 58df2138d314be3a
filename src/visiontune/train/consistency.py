"""FixMatch's consistency term for phases that train the backbone, with `--unlabeled POOL`
(Sohn et al. 2020, "FixMatch: Simplifying Semi-Supervised Learning with Consistency and
Confidence").

Each step also takes a batch of pool images in two views: a weak one (the `light`
augmentation: random crop and flip) and a strong one (`medium`: timm's RandAugment and
random erasing, data/transforms.py). The model's output on the weak view, without
gradient, gives a pseudo-label (`Task.pseudo_targets`: the most probable class, or each
label at its threshold); where its confidence reaches `--consistency-threshold` (0.95,
FixMatch's), the task's own loss on the strong view against it is added to the step's
loss, divided by the whole pool batch (FixMatch's normalisation) and weighted by
`WEIGHT` (1, FixMatch's lambda_u). The strong views go through the model as the whole
batch they came in (BatchNorm's batch statistics are the batch's, as in FixMatch, never
those of the few images that passed); a batch of one image uses BatchNorm's running
statistics (runtime/device.batch_norm_for). An epoch is as long as the longer of the labelled
images and the pool (the shorter one cycles), so every pool image is seen at least once
per epoch.
How many pool images passed the threshold, and as which classes, is logged every epoch
and kept in RUN/consistency.csv (epoch, seen, passed, one column per class); when the
pool cycled, these count views (an image seen twice counts twice), and the log says so.
Under torchrun each process takes its share of the pool (a DistributedSampler, which
repeats a few images so that every process gets as many) and the counts are merged by
identity: each pool batch carries its images' rows and the pass through the pool it
belongs to, so a view is counted once per (pass, row), and the sampler's repeats are not.
The frozen phases use the pool through label spreading instead (train/pseudo.py). A pool
file that cannot be read when its views are made (removed or replaced since the pool was
checked) is left out of its batch and listed once, as the pool check lists what it skips.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from visiontune.data.items import excluded_lines
from visiontune.data.scan import why_unreadable
from visiontune.rundir import RunDir
from visiontune.runtime.device import autocast, batch_norm_for, to_device
from visiontune.runtime.distributed import DistEnv, gather
from visiontune.tasks.base import Task, unreadable_rows

log = logging.getLogger(__name__)

WEIGHT = 1.0  # lambda_u: the consistency term's weight against the labelled loss (FixMatch's 1)


class TwoViews:
    """One image -> (weak view, strong view)."""

    def __init__(self, weak: Any, strong: Any) -> None:
        self.weak, self.strong = weak, strong

    def __call__(self, image: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return self.weak(image), self.strong(image)

    @staticmethod
    def blank(size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """What a file that cannot be read stands in as (data/webdata.read_marked): two blank views."""
        return torch.zeros(3, size, size), torch.zeros(3, size, size)


class PoolBatch(NamedTuple):
    """A batch of pool images in two views, with their identity: each image's row in the
    pool and the pass through the pool (0, 1, ... within the epoch) it was read in."""

    weak: torch.Tensor
    strong: torch.Tensor
    rows: torch.Tensor
    turn: int


class Paired:
    """(x, y, PoolBatch or None) per step: the labelled loader, and when there is a pool
    loader, both cycled until the longer one is through."""

    def __init__(self, train: Any, pool: Any | None) -> None:
        self.train, self.pool = train, pool

    def __len__(self) -> int:
        return max(len(self.train), len(self.pool)) if self.pool is not None else len(self.train)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, PoolBatch | None]]:
        if self.pool is None:
            for x, y, *_ in self.train:
                yield x, y, None
            return
        labelled, pool = _cycle(self.train), _passes(self.pool)
        for _ in range(len(self)):
            x, y, *_ = next(labelled)
            yield x, y, next(pool, None)  # None: nothing of the pool can be read any more


def _cycle(loader: Any) -> Iterator[Any]:
    """The loader's batches again and again (each pass reshuffled by the loader)."""
    return itertools.chain.from_iterable(iter(loader) for _ in itertools.count())


def _passes(loader: Any) -> Iterator[PoolBatch]:
    """The pool loader's batches ((weak, strong), target, rows) again and again, as
    PoolBatches that say which pass they belong to. A pool image that cannot be read now
    (removed or replaced since the pool was checked: the dataset marks it UNREADABLE) is
    left out of its batch and listed once; a pass that reads nothing ends the batches."""
    reported: set[int] = set()
    for turn in itertools.count():
        read = False
        for (weak, strong), marks, rows in loader:
            rows, bad = torch.as_tensor(rows), torch.as_tensor(unreadable_rows(marks))
            if bad.any():
                _report_unreadable(loader.dataset, rows[bad].tolist(), reported)
                weak, strong, rows = weak[~bad], strong[~bad], rows[~bad]
            if len(rows):
                read = True
                yield PoolBatch(weak, strong, rows, turn)
        if not read:
            return


def _report_unreadable(dataset: Any, rows: list[int], reported: set[int]) -> None:
    """One warning for the pool files of `rows` not reported yet, as the pool check lists
    the files it skips (data/pool.py)."""
    new = sorted(set(rows) - reported)
    if not new:
        return
    reported.update(new)
    paths = getattr(dataset, "paths", None)
    lost = [(paths[r], why_unreadable(paths[r])) if paths is not None else (f"pool row {r}", "cannot be read")
            for r in new]
    log.warning("%s", "\n".join(["the unlabelled pool (consistency term):",
                                 *excluded_lines(lost, "skipped", "files that cannot be read")]))


class Consistency:
    """The term, and what passed the threshold this epoch."""

    def __init__(self, task: Task, criterion: Any, threshold: float, device: torch.device, precision: str,
                 channels_last: bool) -> None:
        self.task, self.criterion, self.threshold = task, criterion, threshold
        self.device, self.precision, self.channels_last = device, precision, channels_last
        self.reset()

    def reset(self) -> None:
        self.seen, self.passed, self.used = 0, 0, np.zeros(self.task.num_outputs)
        self.outcomes: dict[tuple[int, int], tuple[int, ...] | None] = {}  # (pass, row) -> classes it passed as, or None

    def backward(self, net: nn.Module, views: PoolBatch, chunk: int, scaler: Any = None) -> float:
        """Add the term's gradients for this pool batch (in chunks of `chunk` images);
        returns the term's value (0 when no image passed the threshold; not finite, and
        no gradient added for that chunk, when the loss is not). The batch is counted
        (by (pass, row): seen, and the classes of those that passed) only once all of it
        went through: a step that runs out of memory starts again with the same batch."""
        weak, strong = (to_device(v, self.device, self.channels_last) for v in (views.weak, views.strong))
        total, outcome = 0.0, []
        for w, s in zip(weak.split(chunk), strong.split(chunk)):
            with torch.no_grad(), autocast(self.device, self.precision), batch_norm_for(net, len(w)):
                probs = self.task.probabilities(net(w).float())
            targets, confidence = self.task.pseudo_targets(probs.cpu().numpy())
            keep = confidence >= self.threshold
            outcome += _classes(self.task.output_targets(targets), keep)
            if not keep.any():
                continue
            index = torch.as_tensor(np.flatnonzero(keep), device=self.device)
            y = torch.as_tensor(targets[keep], device=self.device)
            with autocast(self.device, self.precision), batch_norm_for(net, len(s)):  # BatchNorm: the whole batch
                logits = net(s).index_select(0, index)
            # the mean over the kept images, scaled to the whole pool batch: FixMatch's sum / (mu B)
            loss = WEIGHT * self.criterion(logits.float(), y) * len(index) / len(weak)
            if not torch.isfinite(loss):
                return float(loss.item())
            (scaler.scale(loss) if scaler is not None else loss).backward()
            total += float(loss.item())
        for row, classes in zip(views.rows.tolist(), outcome):
            self.outcomes.setdefault((views.turn, int(row)), classes)
        return total

    def sum_over_processes(self, env: DistEnv, device: torch.device) -> None:
        """The epoch's counts (every process must call this): the views of every process
        (under torchrun each saw its share of the pool), each (pass, row) once, so the
        log and consistency.csv, which rank 0 writes, count the whole pool and nothing
        twice (DistributedSampler's repeats, which even out the processes' shares)."""
        merged: dict[tuple[int, int], tuple[int, ...] | None] = {}
        for part in gather(self.outcomes, env):
            for key, classes in part.items():
                merged.setdefault(key, classes)
        passed = [c for c in merged.values() if c is not None]
        self.seen, self.passed = len(merged), len(passed)
        self.used = np.bincount([i for c in passed for i in c], minlength=self.task.num_outputs).astype(float)

    def record(self, run: RunDir, epoch: int) -> None:
        """This epoch's counts into the run's consistency.csv (`RunDir.record_consistency`)."""
        run.record_consistency(epoch, [self.seen, self.passed, *(int(n) for n in self.used)],
                               ["seen", "passed", *self.task.classes])

    def summary(self, pool_size: int | None = None) -> str:
        """'12 of 40 pool images passed 0.95 (ants 5, bees 7)'; when the labelled epoch was
        longer than the pool (`pool_size` images), the pool went through more than once and
        the counts are of views: '23 views of the 15 pool images ...'."""
        used = ", ".join(f"{c} {int(n)}" for c, n in zip(self.task.classes, self.used) if n)
        cycled = pool_size is not None and self.seen > pool_size
        seen = f"{self.seen} views of the {pool_size} pool images (cycled along the labelled batches)" if cycled \
            else f"{self.seen} pool images"
        return (f"consistency: {self.passed} of {seen} passed the {self.threshold:g} confidence"
                + (f" ({used})" if used else ""))


def _classes(targets: np.ndarray, keep: np.ndarray) -> list[tuple[int, ...] | None]:
    """Per image: the outputs its pseudo-label counts for (`targets` in the outputs' space,
    Task.output_targets) where it passed the threshold, else None."""
    return [tuple(np.flatnonzero(t > 0).tolist()) if k else None for t, k in zip(targets, keep)]
