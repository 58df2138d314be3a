"""torch Datasets and DataLoaders over (path, label) items."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from visiontune.images import load_rgb


class ImageDataset(Dataset):
    """Reads `paths` with `load_rgb`, applies `transform`; `targets` may be None (predict)."""

    def __init__(self, paths: Sequence[str], targets: Sequence[int] | None, transform: Callable) -> None:
        self.paths = list(paths)
        self.targets = list(targets) if targets is not None else None
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.transform(load_rgb(self.paths[index]))
        target = self.targets[index] if self.targets is not None else -1
        return image, target


def default_num_workers() -> int:
    """Decoding runs beside the model's own threads; on small machines keep it modest."""
    cpus = os.cpu_count() or 1
    return 0 if cpus <= 1 else min(4, cpus)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    num_workers: int | None,
    pin_memory: bool = False,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    sampler: Sampler | None = None,
) -> DataLoader:
    workers = default_num_workers() if num_workers is None else num_workers
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        sampler=sampler,
        num_workers=workers,
        generator=generator,
        pin_memory=pin_memory,
        drop_last=False,
    )
