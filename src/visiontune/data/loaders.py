"""torch Datasets and DataLoaders over (path, label) items, and the decoded-image cache."""

from __future__ import annotations

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
from visiontune.data.webdata import ShardStream, is_shard_item, read_marked, shard_items
from visiontune.files import cache_root, guarded, identity_digest, save_entry, touch


class DecodedCache:
    """Training images brought down to shorter side `side` (fastai's presizing); large ones
    decoded once and kept, so later epochs read a small uint8 array instead of decoding a
    multi-megapixel JPEG again.

    Layout: `<root>/<side>/<ab>/<key>.npy` (H x W x 3 uint8, shorter side = `side`), written
    atomically; key = hash of the file's identity (files.file_identity: path, size,
    modification time, inode, change time), so an edited or replaced file is decoded again. Only images larger than `side` are stored
    (smaller ones decode as fast as the cache reads). Safe to delete at any time. With
    `root` None nothing is stored: every load decodes and downsizes, to the same pixels.
    """

    def __init__(self, root: str | os.PathLike[str] | None, side: int) -> None:
        self.dir = None if root is None else Path(root) / str(side)
        self.side = side

    def _path(self, path: str) -> Path | None:
        key = identity_digest(path) if self.dir is not None else None
        return None if key is None else self.dir / key[:2] / f"{key}.npy"  # type: ignore[operator]

    def load(self, path: str) -> Image.Image:
        """The image at `path` with its shorter side at most `side`, from the cache if there."""
        entry = self._path(path)
        if entry is not None:
            try:
                image = Image.fromarray(np.load(entry, allow_pickle=False))
                touch(entry)  # used now: the size cap evicts the least recently used (files.evict)
                return image
            except (FileNotFoundError, ValueError, OSError, TypeError):
                pass  # not cached yet, or torn by a crash: decode again
        image = load_rgb(path, min_side=self.side)
        if min(image.size) <= self.side:
            return image
        image = shrink(image, self.side)
        if entry is not None:  # a read-only or full cache only costs speed (files.guarded)
            guarded(f"the decoded-image cache {self.dir}", lambda: save_entry(entry, np.asarray(image)), None)
        return image


class ImageDataset(Dataset):
    """Reads `paths` as RGB, applies `transform`; yields (image, target, row). `targets`
    (one row per path) may be None (predict: every target is NO_LABEL). `ids`: each
    path's row in the caller's list (default 0..n-1), so results are stored by identity
    (a process validating every world-th image passes its global rows).

    `decode_side`: JPEGs are decoded at reduced scale down to this shorter side (the
    transform never needs more); `cache`: a DecodedCache reads (and downsizes) instead.
    `unreadable_size`: a file that fails to decode yields a zero image of this size and
    target UNREADABLE instead of an error, so files are decoded once, without a checking
    pass first (predict)."""

    def __init__(self, paths: Sequence[str], targets: torch.Tensor | None, transform: Callable,
                 decode_side: int | None = None, cache: DecodedCache | None = None,
                 unreadable_size: int | None = None, unreadable_views: int = 0,
                 ids: Sequence[int] | None = None) -> None:
        self.paths = list(paths)
        self.targets = targets
        self.ids = list(ids) if ids is not None else None
        self.unreadable_views = unreadable_views  # TTA: a blank stack of this many views
        self.transform = transform
        self.decode_side = decode_side
        self.cache = cache
        self.unreadable_size = unreadable_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        path, row = self.paths[index], self.ids[index] if self.ids is not None else index
        return read_marked(lambda: self.cache.load(path) if self.cache is not None else load_rgb(path, self.decode_side),
                           self, index, row)


def eval_dataset(paths: Sequence[str], targets: torch.Tensor | None, pre: Preprocess,
                 mark_unreadable: bool = False, tta: bool = False, rank: int = 0,
                 world: int = 1) -> ImageDataset | ShardStream:
    """Images through the backbone's eval pipeline (resize, center crop, normalise), or
    with `tta` the stacked test-time views of each (transforms.TTAViews), yielding
    (image, target, row); `mark_unreadable`: see ImageDataset's `unreadable_size`.
    Under torchrun (`world` > 1) this process's part: every world-th file, or its shards;
    rows stay those of `paths`."""
    transform = tta_transform(pre) if tta else eval_transform(pre)
    unreadable = {"unreadable_size": pre.input_size if mark_unreadable else None,
                  "unreadable_views": TTA_VIEWS if tta else 0}
    if paths and is_shard_item(paths[0]):  # samples of WebDataset shards: streamed, in shard order
        return ShardStream(shard_items(list(paths)), targets, transform, eval_side(pre), rank=rank, world=world,
                           **unreadable)
    ids = range(rank, len(paths), world)
    return ImageDataset([paths[i] for i in ids], targets[rank::world] if targets is not None else None, transform,
                        decode_side=eval_side(pre), ids=ids, **unreadable)


def train_dataset(paths: Sequence[str], targets: torch.Tensor | None, pre: Preprocess, augment: str, hflip: float,
                  min_scale: float, image_cache: bool, cache_dir: str | None = None,
                  transform: Callable | None = None) -> ImageDataset:
    """Training images: decoded at reduced scale and brought down to `train_side` (kept on
    disk when `image_cache`), then randomly cropped and flipped (`transform`: another
    training transform over the same decoded images, e.g. --unlabeled's two views)."""
    side = train_side(pre)
    cache = DecodedCache(cache_root(cache_dir) / "images" if image_cache else None, side)
    return ImageDataset(paths, targets, transform or train_transform(pre, augment, hflip, min_scale), cache=cache)


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
