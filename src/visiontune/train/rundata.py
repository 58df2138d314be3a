"""The loaders a run needs, per phase: augmented images, or cached backbone features while
the whole backbone is frozen (see features.py). Built lazily and once. Targets come from
the task (`Task.encode`)."""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset, WeightedRandomSampler

from visiontune.config import RunConfig
from visiontune.data.items import LISTED_IN_EXCLUDE, TRAIN, VALID, DataSource, Item, excluded_lines
from visiontune.data.loaders import ImageDataset, eval_dataset, make_loader, mix_seed, train_dataset
from visiontune.data.pool import Pool, reason_counts, unlabelled_pool
from visiontune.data.preprocess import Preprocess
from visiontune.data.splits import group_keys
from visiontune.data.transforms import train_side, train_transform
from visiontune.data.webdata import ShardStream, is_shard_item, shard_share
from visiontune.errors import ConfigError, DataError
from visiontune.frozen.features import FeatureCache, FeatureExtractor, FeatureStats, cache_for, readable_rows
from visiontune.models.classifier import Classifier
from visiontune.runtime.distributed import DistEnv, barrier
from visiontune.tasks.base import Task
from visiontune.train.clock import Clock
from visiontune.train.consistency import TwoViews
from visiontune.train.plan import Plan

log = logging.getLogger(__name__)
POOL_STREAM = 1  # mixed into the run's seed for the --unlabeled pool's augmentations (training: the seed)


class Cut:
    """The first `batches(stream)` batches of a loader over a stream, every epoch: the same
    number of steps on every process (ShardStream's share of the epoch, in whole batches)."""

    def __init__(self, loader: DataLoader, per_step: int) -> None:
        self.loader, self.per_step = loader, per_step
        self.dataset = loader.dataset

    def __len__(self) -> int:
        return math.ceil(len(self.dataset) / self.per_step)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Any]:
        return itertools.islice(iter(self.loader), len(self))


@dataclass
class PhaseData:
    """What one phase trains and validates on: image loaders, or cached-feature loaders
    (`on_features`), in which case only `model.head` runs."""

    train: DataLoader
    valid: DataLoader | None  # None: no validation split (on every process alike)
    on_features: bool = False
    valid_rows: int = 0  # validation images over all processes (each reads its part; 0: not checked)
    groups: list[str] | None = None  # on features: each training row's group (the probe's folds keep them whole)
    pool: np.ndarray | None = None  # on features, with --unlabeled: the unlabelled images' features
    pool_paths: list[str] = field(default_factory=list)  # their files, row by row
    pool_views: DataLoader | None = None  # on images, with --unlabeled: (weak, strong) views of the pool (consistency.py)


class FeatureDataset(TensorDataset):
    """Rows of a (memory-mapped) feature matrix with their targets and row numbers (`ids`:
    each row's place in the caller's list, default 0..n-1); a whole batch is gathered in
    one indexing operation (DataLoader calls `__getitems__`) instead of row by row."""

    def __init__(self, feats: torch.Tensor, targets: torch.Tensor, ids: torch.Tensor | None = None) -> None:
        super().__init__(feats, targets, torch.arange(len(targets)) if ids is None else torch.as_tensor(ids))

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, ...]:
        index = torch.as_tensor(indices)
        return tuple(t[index] for t in self.tensors)


def _as_batch(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return batch


@dataclass
class RunData:
    cfg: RunConfig
    source: DataSource
    task: Task
    model: Classifier
    preprocess: Preprocess
    plan: Plan
    device: torch.device
    generator: torch.Generator
    env: DistEnv = field(default_factory=DistEnv)
    clock: Clock = field(default_factory=Clock)  # --time-budget: feature extraction stops at its extraction_deadline

    def __post_init__(self) -> None:
        self._images: PhaseData | None = None
        self._features: PhaseData | None = None
        self.feature_stats: list[FeatureStats] = []
        self.pool: Pool | None = self._find_pool() if self.cfg.data.unlabeled else None

    def release(self) -> None:
        """Drop the phases' loaders (rebuilt if asked for again): their kept worker processes
        (persistent_workers) end with them, and the features leave memory, so a finished
        run that stays referenced (a FitResult, cv's folds, compare's strategies) holds no
        worker process."""
        self._images = self._features = None

    def for_phase(self, phase_index: int) -> PhaseData:
        """The loaders phase `phase_index` trains and validates on: cached features where
        they are exact (`uses_features`), else images."""
        return self.features() if self.uses_features(phase_index) else self.images()

    def uses_features(self, phase_index: int) -> bool:
        """Cached features are exact only when nothing in the backbone changes: every
        backbone group frozen and its BatchNorm in eval mode."""
        phase = self.plan.phases[phase_index]
        body_frozen = not any(on for on, g in zip(phase.trainable, self.plan.groups) if not g.is_head)
        return (self.cfg.runtime.feature_cache or phase.probe) and body_frozen and self.cfg.strategy.frozen_bn == "eval"

    def class_weights(self) -> torch.Tensor | None:
        """balance='weights': the task's loss weights from the training labels."""
        if self.cfg.outputs.balance != "weights":
            return None
        labels = [it.label for it in self.source.split(TRAIN)]
        return torch.tensor(self.task.balance_weights(labels), dtype=torch.float32, device=self.device)

    def _shuffle_args(self, targets: torch.Tensor, generator: torch.Generator | None = None) -> dict:
        """balance='oversample': draw with replacement, rare classes (labels) as often as common
        ones. The draws come from `generator` (features: the run's, seeded each epoch), or
        else from the image loader's SeededSampler (make_loader's `seed`)."""
        if self.cfg.outputs.balance != "oversample":
            return {"shuffle": True, **({"generator": generator} if generator is not None else {})}
        weights = self.task.oversample_weights(targets)
        return {"sampler": WeightedRandomSampler(weights.double(), len(targets), replacement=True,
                                                 generator=generator)}

    def _targets(self, split: str) -> tuple[list[str], torch.Tensor]:
        return self._paths_targets(self.source.split(split))

    def _paths_targets(self, items: list[Item]) -> tuple[list[str], torch.Tensor]:
        return [i.path for i in items], self.task.encode([i.label for i in items])

    def held_out(self, items: list[Item]) -> tuple[DataLoader, bool]:
        """A loader over `items` scored as validation is (on cached features when no phase
        trains the backbone, so the head alone runs), and whether it is on features."""
        batch_size = self.cfg.train.batch_size
        paths, targets = self._paths_targets(items)
        if all(self.uses_features(i) for i in range(len(self.plan.phases))):
            feats, _ = self.extractor().extract(paths)
            return DataLoader(FeatureDataset(feats, targets), batch_size=batch_size, collate_fn=_as_batch), True
        return make_loader(eval_dataset(paths, targets, self.preprocess), batch_size, self.cfg.runtime.num_workers,
                           self.device), False

    def feature_cache(self) -> FeatureCache:
        """The feature cache of the run's backbone as its weights are now."""
        return cache_for(self.cfg.model.backbone, self.model.backbone, self.preprocess, self.cfg.runtime.cache_dir)

    def extractor(self, cached: bool = True) -> FeatureExtractor:
        """The run's backbone features on its device, options and (`cached`) feature cache,
        keyed by the backbone's weights as they are now."""
        return FeatureExtractor.for_run(self.cfg.model.backbone, self.model.backbone, self.preprocess, self.cfg,
                                        self.device, cached)

    def images(self) -> PhaseData:
        if self._images is None:
            self._images = self._shard_images() if self._from_shards() else self._file_images()
        return self._images

    def _world(self) -> tuple[int, int]:
        """(rank, processes) that share the data: (0, 1) outside torchrun."""
        return (self.env.rank, self.env.world_size) if self.env.parallel else (0, 1)

    def _file_images(self) -> PhaseData:
        a, r, pre = self.cfg.augmentation, self.cfg.runtime, self.preprocess
        paths, targets = self._targets(TRAIN)
        train = train_dataset(paths, targets, pre, a.augment, a.hflip, a.min_scale, r.image_cache, r.cache_dir)
        if self.env.launched:
            train_loader = self._distributed_loader(train)
        else:
            train_loader = make_loader(train, self.cfg.train.batch_size, r.num_workers, self.device, seed=self.cfg.seed,
                                       persistent=True, **self._shuffle_args(targets))
        return PhaseData(train_loader, self._valid_images(), valid_rows=len(self.source.split(VALID)),
                         pool_views=self._pool_views() if self.cfg.data.unlabeled else None)

    def _pool_views(self) -> DataLoader:
        """--unlabeled in phases that train the backbone: the pool's images as (weak, strong)
        views (train/consistency.py), shuffled, one batch per step."""
        a, r, pre = self.cfg.augmentation, self.cfg.runtime, self.preprocess
        views = TwoViews(train_transform(pre, "light", a.hflip, a.min_scale),
                         train_transform(pre, "medium", a.hflip, a.min_scale))
        pool = train_dataset(self._pool_files(), None, pre, "light", a.hflip, a.min_scale, r.image_cache, r.cache_dir,
                             transform=views, mark_unreadable=True)  # a file gone since the check: skipped, listed
        seed = mix_seed(self.cfg.seed, POOL_STREAM)
        if self.env.launched:
            return self._distributed_loader(pool, seed)
        return make_loader(pool, self.cfg.train.batch_size, r.num_workers, self.device, shuffle=True, seed=seed,
                           persistent=True)

    def _valid_images(self) -> DataLoader | None:
        """Validation images; under torchrun this process's part (every world-th file, or its
        shards; a process may have none): the outputs are gathered and put back by row."""
        items = self.source.split(VALID)
        if not items:
            return None
        rank, world = self._world()
        paths, targets = self._paths_targets(items)
        return make_loader(eval_dataset(paths, targets, self.preprocess, rank=rank, world=world),
                           self.cfg.train.batch_size, self.cfg.runtime.num_workers, self.device, persistent=True)

    def _from_shards(self) -> bool:
        return any(is_shard_item(it.path) for it in self.source.items[:1])

    def _shard_images(self) -> PhaseData:
        """Streams of WebDataset shards (data/webdata.py): training shuffled per epoch; under
        torchrun every process takes the same, nonzero number of steps (ShardStream)."""
        a, pre = self.cfg.augmentation, self.preprocess
        rank, world = self._world()
        if self.cfg.outputs.balance == "oversample":
            raise ConfigError("--balance oversample needs random access to the images; shards are read as a stream: "
                              "use --balance weights")
        per_step = self._per_process_batch(world)
        items = self.source.split(TRAIN)
        stream = ShardStream(items, self.task.encode([it.label for it in items]),
                             train_transform(pre, a.augment, a.hflip, a.min_scale), train_side(pre), shuffle=True,
                             seed=self.cfg.seed, rank=rank, world=world)
        train = make_loader(stream, per_step, self.cfg.runtime.num_workers, self.device)
        if world > 1:
            part = stream.assignment()
            if part.length == 0:
                raise ConfigError(f"{len(items)} training samples cannot give each of {world} processes one; "
                                  "use fewer processes")
            log.info("torchrun: %d training shards, %s; %d of %d samples per epoch", len(stream.sizes),
                     "whole shards per process" if part.rows is None else
                     f"too few or too uneven to split whole: each process reads them all and keeps 1/{world}",
                     part.length * world, len(items))
            train = Cut(train, per_step)
        return PhaseData(train, self._valid_images(), valid_rows=len(self.source.split(VALID)),
                         pool_views=self._pool_views() if self.cfg.data.unlabeled else None)

    def _per_process_batch(self, world: int) -> int:
        batch_size = self.cfg.train.batch_size
        if batch_size % world:
            raise ConfigError(f"batch_size {batch_size} must be a multiple of the {world} processes")
        return batch_size // world

    def _distributed_loader(self, train: ImageDataset, seed: int | None = None) -> DataLoader:
        """`seed`: of the samples' augmentations (default: the run's)."""
        world = self.env.world_size
        per_step = self._per_process_batch(world)
        if self.cfg.outputs.balance == "oversample":
            raise ConfigError("--balance oversample is not supported under torchrun; use --balance weights")
        sampler = DistributedSampler(train, num_replicas=world, rank=self.env.rank, shuffle=True, seed=self.cfg.seed)
        return make_loader(train, per_step, self.cfg.runtime.num_workers, self.device, sampler=sampler,
                           seed=self.cfg.seed if seed is None else seed, rank=self.env.rank, persistent=True)

    def features(self) -> PhaseData:
        """Loaders over the frozen backbone's features. Under torchrun each process first
        extracts its share of the uncached training images into the shared cache, then every
        process reads them all: each process trains the head on every training feature (as
        one process would; their gradients agree) and validates its part (which may be
        empty: the outputs are gathered by row)."""
        if self._features is None:
            paths, targets = self._targets(TRAIN)
            vpaths, vtargets = self._targets(VALID)
            train, kept = self._feature_loader(paths, targets, shuffle=True,
                                               deadline=self._share_of_deadline(len(paths), len(vpaths)))
            groups = group_keys(self.source.split(TRAIN))
            valid = None
            if vpaths:
                rows = self._part(vpaths)
                valid, _ = self._feature_loader([vpaths[i] for i in rows], vtargets[rows], shuffle=False,
                                                ids=torch.as_tensor(rows, dtype=torch.long), shared=False,
                                                deadline=self.clock.extraction_deadline)
            self._features = PhaseData(train, valid, on_features=True,  # cut by a deadline: not every row
                                       valid_rows=len(vpaths) if self.clock.extraction_deadline is None else 0,
                                       groups=[groups[i] for i in kept] if groups is not None else None)
            if self.cfg.data.unlabeled:
                self._features.pool_paths, self._features.pool = self._pool()
        return self._features

    def _find_pool(self) -> Pool:
        """--unlabeled: the pool's images (data/pool.py), found and checked before any phase
        runs: a file that does not decode is skipped and listed (as the data summary lists
        labelled files), and the run's own images (every split), the files --exclude lists
        (in the data or in the pool), and copies of any of them under other names stay out."""
        excluded = [p for p, why in self.source.excluded if why.startswith(LISTED_IN_EXCLUDE)]  # data/sources.py
        pool = unlabelled_pool([str(self.cfg.data.unlabeled)], [it.path for it in self.source.items],
                               self.cfg.runtime.cache_dir, left_out=excluded, verify=self.cfg.data.verify_images)
        if self.env.is_main:
            log.info("%s", pool.report())
        if not pool.paths:
            why = reason_counts(pool.excluded + pool.unreadable) or "no image files"
            raise DataError(f"--unlabeled {self.cfg.data.unlabeled}: no unlabelled image there ({why}); give a folder "
                            "of images that this run is not trained on")
        return pool

    def _pool_files(self) -> list[str]:
        """--unlabeled: the pool's image files (checked when the run's data was set up)."""
        assert self.pool is not None, "_pool_files without --unlabeled"
        return self.pool.paths

    def _pool(self) -> tuple[list[str], np.ndarray]:
        """--unlabeled: the pool's image files (`_pool_files`) and their features (through the
        feature cache). A file that cannot be read now (removed, or replaced by one that
        does not decode, since the pool was checked) is skipped from here on and listed."""
        paths = self._pool_files()
        feats, stats = self.extractor(self.cfg.runtime.feature_cache).extract(paths, skip_unreadable=True)
        feats, paths, lost = readable_rows(np.asarray(feats), paths, stats)
        if lost:
            self._lose(lost)
        return paths, feats

    def _lose(self, lost: list[tuple[str, str]]) -> None:
        """Pool files found unreadable after the check: out of the pool, listed as the check
        lists what it skips; a pool left with nothing is the error an empty pool is."""
        assert self.pool is not None, "_lose without --unlabeled"
        self.pool.lose(lost)
        if self.env.is_main:
            log.warning("%s", "\n".join([f"the unlabelled pool holds {len(self.pool.paths)} images to learn from now",
                                         *excluded_lines(lost, "skipped", "files that cannot be read")]))
        if not self.pool.paths:
            raise DataError(f"--unlabeled {self.cfg.data.unlabeled}: none of the pool's images can be read now "
                            "(removed or replaced since the run checked them); give a folder of images to learn from")

    def _share_of_deadline(self, train: int, valid: int) -> float | None:
        """When extracting training features must stop so that validation features get
        their share of the time left (a cut extraction then samples both alike)."""
        deadline = self.clock.extraction_deadline
        if deadline is None:
            return None
        now = time.perf_counter()
        return now + (deadline - now) * train / max(1, train + valid)

    def _part(self, paths: list[str]) -> list[int]:
        """The rows of `paths` this process reads: every world-th file, or the samples of its
        shards (each process reads only its own shards)."""
        rank, world = self._world()
        if world == 1:
            return list(range(len(paths)))
        if paths and is_shard_item(paths[0]):
            mine = set(shard_share(paths, rank, world))
            return [i for i, p in enumerate(paths) if p in mine]
        return list(range(rank, len(paths), world))

    def _feature_loader(self, paths: list[str], targets: torch.Tensor, shuffle: bool, ids: torch.Tensor | None = None,
                        shared: bool = True, deadline: float | None = None) -> tuple[DataLoader, list[int]]:
        """Features of `paths` (rows `ids` of the caller's list) and the rows of `paths` they
        hold: all, unless the time budget's deadline stopped the extraction (a random sample
        then, said in the log). `shared`: every process needs all of them, so under torchrun
        each extracts its share into the cache first."""
        extractor = self.extractor(self.cfg.runtime.feature_cache)  # the probe without a disk cache: in memory
        cache = extractor.cache
        if cache is not None and shared and self.env.parallel:  # this process's share first, then all from the cache
            _, stats = extractor.extract([paths[i] for i in self._part(paths)], deadline=deadline)
            self.feature_stats.append(stats)
            barrier(self.env)
        feats, stats = extractor.extract(paths, memmap_dir=cache.dir if cache else None, deadline=deadline)
        self.feature_stats.append(stats)
        kept = list(range(len(paths)))
        if stats.left_out:
            kept = sorted(set(kept) - set(stats.left_out))
            if shuffle and len(kept) < 2:  # nothing to fit: the budget ended before any (or a second) image
                raise ConfigError(f"the time budget ended when the features of {len(kept)} of {len(paths)} training "
                                  "images were computed: too few to fit a head on. Give a longer --time-budget")
            log.warning("time budget: features of %d of %d images were computed before the deadline; the head "
                        "%s on those (a random sample)", len(kept), len(paths), "fits" if shared else "is validated")
            feats, targets = feats[kept], targets[kept]
            ids = (ids if ids is not None else torch.arange(len(paths)))[kept]
        order = self._shuffle_args(targets, self.generator) if shuffle else {}
        loader = DataLoader(FeatureDataset(feats, targets, ids), batch_size=self.cfg.train.batch_size, collate_fn=_as_batch,
                            **order)
        return loader, kept
