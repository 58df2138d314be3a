"""The loaders a run needs, per phase: augmented images, or cached backbone features while
the whole backbone is frozen (see features.py). Built lazily and once. Targets come from
the task (`Task.encode`)."""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset, WeightedRandomSampler

from visiontune.config import RunConfig
from visiontune.data.items import TRAIN, VALID, DataSource, Item
from visiontune.data.loaders import ImageDataset, eval_dataset, make_loader, train_dataset
from visiontune.data.preprocess import Preprocess
from visiontune.data.transforms import eval_side, eval_transform, train_side, train_transform
from visiontune.data.webdata import ShardStream, is_shard_item
from visiontune.errors import ConfigError
from visiontune.models.classifier import Classifier
from visiontune.runtime.distributed import DistEnv, barrier
from visiontune.tasks.base import Task
from visiontune.train.features import FeatureCache, FeatureStats, cache_for, extract_features
from visiontune.train.plan import Plan

log = logging.getLogger(__name__)


class Cut:
    """The first `batches` batches of a loader, every epoch (equal steps on every process)."""

    def __init__(self, loader: DataLoader, batches: int) -> None:
        self.loader, self.batches = loader, batches
        self.dataset = loader.dataset

    def __len__(self) -> int:
        return self.batches

    def __iter__(self) -> Iterator[Any]:
        return itertools.islice(iter(self.loader), self.batches)


@dataclass
class PhaseData:
    """What one phase trains and validates on: image loaders, or cached-feature loaders
    (`on_features`), in which case only `model.head` runs."""

    train: DataLoader
    valid: DataLoader | None
    on_features: bool = False


class FeatureDataset(TensorDataset):
    """Rows of a (memory-mapped) feature matrix; a whole batch is gathered in one indexing
    operation (DataLoader calls `__getitems__`) instead of row by row."""

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(indices)
        feats, targets = self.tensors
        return feats[index], targets[index]


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

    def __post_init__(self) -> None:
        self._images: PhaseData | None = None
        self._features: PhaseData | None = None
        self.feature_stats: list[FeatureStats] = []

    def __call__(self, phase_index: int) -> PhaseData:
        return self.features() if self.uses_features(phase_index) else self.images()

    def uses_features(self, phase_index: int) -> bool:
        """Cached features are exact only when nothing in the backbone changes: every
        backbone group frozen and its BatchNorm in eval mode."""
        phase = self.plan.phases[phase_index]
        body_frozen = not any(on for on, g in zip(phase.trainable, self.plan.groups) if not g.is_head)
        return (self.cfg.train.feature_cache or phase.probe) and body_frozen and self.cfg.strategy.frozen_bn == "eval"

    def class_weights(self) -> torch.Tensor | None:
        """balance='weights': the task's loss weights from the training labels."""
        if self.cfg.train.balance != "weights":
            return None
        labels = [it.label for it in self.source.split(TRAIN)]
        return torch.tensor(self.task.balance_weights(labels), dtype=torch.float32, device=self.device)

    def _shuffle_args(self, targets: torch.Tensor) -> dict:
        """balance='oversample': draw with replacement, rare classes (labels) as often as common ones."""
        if self.cfg.train.balance != "oversample":
            return {"shuffle": True, "generator": self.generator}
        weights = self.task.oversample_weights(targets)
        return {"sampler": WeightedRandomSampler(weights.double(), len(targets), replacement=True,
                                                 generator=self.generator)}

    def _targets(self, split: str) -> tuple[list[str], torch.Tensor]:
        return self._paths_targets(self.source.split(split))

    def _paths_targets(self, items: list[Item]) -> tuple[list[str], torch.Tensor]:
        return [i.path for i in items], self.task.encode([i.label for i in items])

    def held_out(self, items: list[Item]) -> tuple[DataLoader, bool]:
        """A loader over `items` scored as validation is (on cached features when no phase
        trains the backbone, so the head alone runs), and whether it is on features."""
        t = self.cfg.train
        paths, targets = self._paths_targets(items)
        if all(self.uses_features(i) for i in range(len(self.plan.phases))):
            feats, _ = extract_features(self.model.backbone, paths, self.preprocess, self.device, self._cache(),
                                        t.batch_size, t.num_workers, t.channels_last)
            return DataLoader(FeatureDataset(feats, targets), batch_size=t.batch_size, collate_fn=_as_batch), True
        return make_loader(eval_dataset(paths, targets, self.preprocess), t.batch_size, t.num_workers,
                           self.device), False

    def _cache(self) -> FeatureCache:
        return cache_for(self.cfg.model.backbone, self.model.backbone, self.preprocess, self.cfg.train.cache_dir)

    def images(self) -> PhaseData:
        if self._images is None and self._from_shards():
            self._images = self._shard_images()
        if self._images is None:
            t, pre = self.cfg.train, self.preprocess
            paths, targets = self._targets(TRAIN)
            train = train_dataset(paths, targets, pre, t.augment, t.hflip, t.min_scale, t.image_cache, t.cache_dir)
            valid = None
            vpaths, vtargets = self._targets(VALID)
            if self.env.launched:  # each process validates every world_size-th image; outputs are gathered
                step = self.env.world_size
                if 0 < len(vpaths) < step:  # a process with nothing to validate would wait forever
                    raise ConfigError(f"{len(vpaths)} validation images for {step} processes; "
                                      "use fewer processes or more validation images")
                vpaths, vtargets = vpaths[self.env.rank :: step], vtargets[self.env.rank :: step]
            if vpaths:
                valid = make_loader(eval_dataset(vpaths, vtargets, pre), t.batch_size, t.num_workers, self.device)
            if self.env.launched:
                train_loader = self._distributed_loader(train)
            else:
                train_loader = make_loader(train, t.batch_size, t.num_workers, self.device,
                                           **self._shuffle_args(targets))
            self._images = PhaseData(train_loader, valid)
        return self._images

    def _from_shards(self) -> bool:
        return any(is_shard_item(it.path) for it in self.source.items[:1])

    def _shard_images(self) -> PhaseData:
        """Streams of WebDataset shards (data/webdata.py): training shuffled per epoch,
        shards split across processes and workers; under torchrun every process takes the
        same number of steps (the smallest share, in whole batches)."""
        t, pre, env = self.cfg.train, self.preprocess, self.env
        world = env.world_size if env.parallel else 1
        if t.balance == "oversample":
            raise ConfigError("--balance oversample needs random access to the images; shards are read as a stream: "
                              "use --balance weights")
        items = self.source.split(TRAIN)
        stream = ShardStream(items, self.task.encode([it.label for it in items]),
                             train_transform(pre, t.augment, t.hflip, t.min_scale), train_side(pre), shuffle=True,
                             seed=self.cfg.seed, rank=env.rank, world=world)
        per_step = t.batch_size // world
        train = make_loader(stream, per_step, t.num_workers, self.device)
        if env.parallel:
            train = Cut(train, math.ceil(len(stream) / per_step))
        valid_items = self.source.split(VALID)
        valid = None
        if valid_items:
            vstream = ShardStream(valid_items, self.task.encode([it.label for it in valid_items]), eval_transform(pre),
                                  eval_side(pre), rank=env.rank, world=world)
            valid = make_loader(vstream, t.batch_size, t.num_workers, self.device)
        return PhaseData(train, valid)

    def _distributed_loader(self, train: ImageDataset) -> DataLoader:
        t, world = self.cfg.train, self.env.world_size
        if t.batch_size % world:
            raise ConfigError(f"batch_size {t.batch_size} must be a multiple of the {world} processes")
        if t.balance == "oversample":
            raise ConfigError("--balance oversample is not supported under torchrun; use --balance weights")
        sampler = DistributedSampler(train, num_replicas=world, rank=self.env.rank, shuffle=True, seed=self.cfg.seed)
        return make_loader(train, t.batch_size // world, t.num_workers, self.device, sampler=sampler)

    def features(self) -> PhaseData:
        """Loaders over the frozen backbone's features. Under torchrun each process first
        extracts its share of the uncached images into the shared cache, then every process
        reads them all: each process trains the head on every training feature (as one
        process would; their gradients agree) and validates its share."""
        if self._features is None:
            loaders: list[DataLoader | None] = []
            for split in (TRAIN, VALID):
                paths, targets = self._targets(split)
                if split == VALID and self.env.parallel:
                    paths, targets = paths[self.env.rank:: self.env.world_size], targets[self.env.rank:: self.env.world_size]
                loaders.append(self._feature_loader(paths, targets, shuffle=split == TRAIN) if paths else None)
            assert loaders[0] is not None
            self._features = PhaseData(loaders[0], loaders[1], on_features=True)
        return self._features

    def _feature_loader(self, paths: list[str], targets: torch.Tensor, shuffle: bool) -> DataLoader:
        t = self.cfg.train
        cache = self._cache() if t.feature_cache else None  # the probe without a disk cache: in memory
        if cache is not None and self.env.parallel:  # this process's share first, then everyone's from the cache
            mine = paths[self.env.rank:: self.env.world_size]
            _, stats = extract_features(self.model.backbone, mine, self.preprocess, self.device, cache, t.batch_size,
                                        t.num_workers, t.channels_last)
            self.feature_stats.append(stats)
            barrier(self.env)
        feats, stats = extract_features(self.model.backbone, paths, self.preprocess, self.device, cache, t.batch_size,
                                        t.num_workers, t.channels_last, memmap_dir=cache.dir if cache else None)
        self.feature_stats.append(stats)
        order = self._shuffle_args(targets) if shuffle else {}
        return DataLoader(FeatureDataset(feats, targets), batch_size=t.batch_size, collate_fn=_as_batch, **order)
