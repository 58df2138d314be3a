"""torch Datasets and DataLoaders over (path, label) items, and the decoded-image cache."""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from visiontune.data.images import load_rgb, shrink
from visiontune.data.preprocess import Preprocess
from visiontune.data.transforms import (
    TTA_VIEWS,
    eval_side,
    eval_transform,
    train_side,
    train_transform,
    tta_transform,
)
from visiontune.data.webdata import ShardStream, is_shard_item, shard_items
from visiontune.files import cache_root, save_entry
from visiontune.tasks.base import NO_LABEL, UNREADABLE


class DecodedCache:
    """Training images brought down to shorter side `side` (fastai's presizing); large ones
    decoded once and kept, so later epochs read a small uint8 array instead of decoding a
    multi-megapixel JPEG again.

    Layout: `<root>/<side>/<ab>/<key>.npy` (H x W x 3 uint8, shorter side = `side`), written
    atomically; key = hash of the file's absolute path, size and modification time, so an
    edited or replaced file is decoded again. Only images larger than `side` are stored
    (smaller ones decode as fast as the cache reads). Safe to delete at any time. With
    `root` None nothing is stored: every load decodes and downsizes, to the same pixels.
    """

    def __init__(self, root: str | os.PathLike[str] | None, side: int) -> None:
        self.dir = None if root is None else Path(root) / str(side)
        self.side = side

    def _path(self, path: str) -> Path | None:
        if self.dir is None:
            return None
        try:
            st = os.stat(path)
        except OSError:
            return None
        key = hashlib.blake2b(f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}".encode(),
                              digest_size=16).hexdigest()
        return self.dir / key[:2] / f"{key}.npy"

    def load(self, path: str) -> Image.Image:
        """The image at `path` with its shorter side at most `side`, from the cache if there."""
        entry = self._path(path)
        if entry is not None:
            try:
                return Image.fromarray(np.load(entry, allow_pickle=False))
            except (FileNotFoundError, ValueError, OSError, TypeError):
                pass  # not cached yet, or torn by a crash: decode again
        image = load_rgb(path, min_side=self.side)
        if min(image.size) <= self.side:
            return image
        image = shrink(image, self.side)
        if entry is not None:
            with contextlib.suppress(OSError):  # a read-only or full cache only costs speed
                save_entry(entry, np.asarray(image))
        return image


class ImageDataset(Dataset):
    """Reads `paths` as RGB, applies `transform`; `targets` (one row per path) may be None
    (predict: every target is NO_LABEL).

    `decode_side`: JPEGs are decoded at reduced scale down to this shorter side (the
    transform never needs more); `cache`: a DecodedCache reads (and downsizes) instead.
    `unreadable_size`: a file that fails to decode yields a zero image of this size and
    target UNREADABLE instead of an error, so files are decoded once, without a checking
    pass first (predict)."""

    def __init__(self, paths: Sequence[str], targets: torch.Tensor | None, transform: Callable,
                 decode_side: int | None = None, cache: DecodedCache | None = None,
                 unreadable_size: int | None = None, unreadable_views: int = 0) -> None:
        self.paths = list(paths)
        self.targets = targets
        self.unreadable_views = unreadable_views  # TTA: a blank stack of this many views
        self.transform = transform
        self.decode_side = decode_side
        self.cache = cache
        self.unreadable_size = unreadable_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        path = self.paths[index]
        try:
            image = self.cache.load(path) if self.cache is not None else load_rgb(path, self.decode_side)
        except Exception:
            if self.unreadable_size is None:
                raise
            size = self.unreadable_size
            blank = torch.zeros(self.unreadable_views, 3, size, size) if self.unreadable_views else torch.zeros(3, size, size)
            return blank, self._marker(UNREADABLE)
        target = self.targets[index] if self.targets is not None else self._marker(NO_LABEL)
        return self.transform(image), target

    def _marker(self, value: int) -> torch.Tensor:
        """A target row holding a marker, shaped like the other targets."""
        if self.targets is None or self.targets.ndim == 1:
            return torch.tensor(value)
        return torch.full(self.targets.shape[1:], value, dtype=self.targets.dtype)


def eval_dataset(paths: Sequence[str], targets: torch.Tensor | None, pre: Preprocess,
                 mark_unreadable: bool = False, tta: bool = False) -> ImageDataset:
    """Images through the backbone's eval pipeline (resize, center crop, normalise), or
    with `tta` the stacked test-time views of each (transforms.TTAViews);
    `mark_unreadable`: see ImageDataset's `unreadable_size`."""
    transform = tta_transform(pre) if tta else eval_transform(pre)
    if paths and is_shard_item(paths[0]):  # samples of WebDataset shards: streamed, in shard order
        return ShardStream(shard_items(list(paths)), targets, transform, eval_side(pre))  # type: ignore[return-value]
    return ImageDataset(paths, targets, transform, decode_side=eval_side(pre),
                        unreadable_size=pre.input_size if mark_unreadable else None,
                        unreadable_views=TTA_VIEWS if tta else 0)


def train_dataset(paths: Sequence[str], targets: torch.Tensor, pre: Preprocess, augment: str, hflip: float,
                  min_scale: float, image_cache: bool, cache_dir: str | None = None) -> ImageDataset:
    """Training images: decoded at reduced scale and brought down to `train_side` (kept on
    disk when `image_cache`), then randomly cropped and flipped."""
    side = train_side(pre)
    cache = DecodedCache(cache_root(cache_dir) / "images" if image_cache else None, side)
    return ImageDataset(paths, targets, train_transform(pre, augment, hflip, min_scale), cache=cache)


def default_num_workers(device: torch.device | None = None) -> int:
    """DataLoader worker processes for a model on `device`.

    On an accelerator the CPU only decodes: all cores but one, at most 8. On a CPU the
    model's own threads use every core and worker processes compete with them: on 2 cores
    training ran at 1.03x the raw step with 0 workers, 0.85x with 2 and 0.71x with 1
    (bench/speed.py), while decoding a 400x300 JPEG costs ~1 ms against ~70 ms per image
    of model step. So 0 up to 4 cores, then one worker per 8 cores (at most 4).
    """
    cpus = os.cpu_count() or 1
    if device is not None and device.type != "cpu":
        return max(0, min(8, cpus - 1))
    return 0 if cpus <= 4 else min(4, cpus // 8)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    num_workers: int | None,
    device: torch.device | None = None,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    sampler: Sampler | None = None,
) -> DataLoader:
    """`num_workers` None: default_num_workers(device); memory is pinned for CUDA."""
    workers = default_num_workers(device) if num_workers is None else num_workers
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        sampler=sampler,
        num_workers=workers,
        generator=generator,
        pin_memory=device is not None and device.type == "cuda",
        drop_last=False,
    )
