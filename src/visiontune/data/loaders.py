"""torch Datasets and DataLoaders over (path, label) items, and the decoded-image cache."""

from __future__ import annotations

import contextlib
import os
import queue
import random
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset, RandomSampler, Sampler

from visiontune.caches import Cache, guarded, save_entry, touch
from visiontune.cpus import usable_cpus
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
from visiontune.files import identity_digest


class DecodedCache(Cache):
    """Training images brought down to shorter side `side` (fastai's presizing); large ones
    decoded once and kept, so later epochs read a small uint8 array instead of decoding a
    multi-megapixel JPEG again.

    Layout: `<root>/<side>/<ab>/<key>.npy` (H x W x 3 uint8, shorter side = `side`), written
    atomically; key = hash of the file's identity (files.file_identity: path, size,
    modification time, inode, change time), so an edited or replaced file is decoded again. Only images larger than `side` are stored
    (smaller ones decode as fast as the cache reads). Safe to delete at any time. With
    `root` None nothing is stored: every load decodes and downsizes, to the same pixels.
    `root`: its folder (`DecodedCache.location()`); an entry (evicted alone) is one file.
    """

    area = "images"
    folder = "images"
    keyed_by = "identity"  # under the folder of the side decoded to (the option that changes it)
    key = staticmethod(identity_digest)

    def __init__(self, root: str | os.PathLike[str] | None, side: int) -> None:
        self.dir = None if root is None else Path(root) / str(side)
        self.side = side

    def _path(self, path: str) -> Path | None:
        key = self.key(path) if self.dir is not None else None
        return None if key is None else self.dir / key[:2] / f"{key}.npy"  # type: ignore[operator]

    def load(self, path: str) -> Image.Image:
        """The image at `path` with its shorter side at most `side`, from the cache if there."""
        entry = self._path(path)
        if entry is not None:
            try:
                image = Image.fromarray(np.load(entry, allow_pickle=False))
                touch(entry)  # used now: the size cap evicts the least recently used (caches.evict)
                return image
            except (FileNotFoundError, ValueError, OSError, TypeError):
                pass  # not cached yet, or torn by a crash: decode again
        image = load_rgb(path, min_side=self.side)
        if min(image.size) <= self.side:
            return image
        image = shrink(image, self.side)
        if entry is not None:  # a read-only or full cache only costs speed (caches.guarded)
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
    pass first (predict), or a file removed since it was checked is skipped (the
    unlabelled pool); without it such a file is a DataError that names it."""

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

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """`key`: an index, or (index, seed) from a SeededSampler: then the transform draws
        its randomness from `seed` alone (see SeededSampler)."""
        if isinstance(key, tuple):
            index, seed = key
            with seeded_randomness(seed):
                return self._item(index)
        return self._item(key)

    def _item(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        path, row = self.paths[index], self.ids[index] if self.ids is not None else index
        return read_marked(lambda: self.cache.load(path) if self.cache is not None else load_rgb(path, self.decode_side),
                           self, index, row, path)


_MASK64 = (1 << 64) - 1
ORDER_STREAM = -1  # mixed into a pass's seed for its order (positions 0, 1, ...: the samples' augmentations)


def mix_seed(*values: int) -> int:
    """A 63-bit seed from integers (splitmix64 over them): the same on every platform and
    Python version, unlike hash()."""
    h = 0x9E3779B97F4A7C15
    for value in values:
        h = (h ^ (value & _MASK64)) & _MASK64
        h = (h + 0x9E3779B97F4A7C15) & _MASK64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 31
    return h >> 1


@contextlib.contextmanager
def seeded_randomness(seed: int) -> Iterator[None]:
    """torch's CPU, Python's and NumPy's global generators (what torchvision's and timm's
    transforms draw from: RandAugment uses NumPy and `random`) seeded with `seed` inside.
    In the main process (0 workers) they are given back as they were after, so a sample's
    augmentation leaves the trainer's own draws (dropout, mixup) untouched; a worker
    process draws for nothing else, so there they are not saved (8 us a sample instead of
    ~90: NumPy's state is slow to read and write)."""
    worker = torch.utils.data.get_worker_info() is not None
    saved = None if worker else (torch.random.get_rng_state(), random.getstate(), np.random.get_state())
    torch.default_generator.manual_seed(seed)  # torch.manual_seed would also seed every CUDA device (~90 us)
    random.seed(seed)
    np.random.seed(seed % (2**32))
    try:
        yield
    finally:
        if saved is not None:
            torch.random.set_rng_state(saved[0])
            random.setstate(saved[1])
            np.random.set_state(saved[2])


class SeededSampler(Sampler):
    """Wraps a training sampler's order and yields (index, seed): each sample's own
    augmentation seed, mixed from (run seed, process rank, epoch, pass within the epoch,
    position in the pass). So what a sample's augmentation draws depends on nothing else:
    not on which worker process decodes it, how many there are, whether they are kept
    across epochs (persistent_workers) or where a resumed run started; the same run gives
    the same model with 0 workers or 15. `set_epoch` (the trainer calls it at each epoch)
    is passed on to the wrapped sampler (DistributedSampler's shuffle); a pass is one
    iteration over the sampler (the --unlabeled pool is gone through again when the
    labelled epoch is longer). The wrapped sampler's own draws (RandomSampler's order,
    WeightedRandomSampler's picks) come from this sampler's generator, seeded at the start
    of each pass: they depend neither on another loader drawing from a shared generator nor
    on when worker prefetching pulls the indices (RandomSampler draws once more at the end
    of a pass, which prefetching moves earlier)."""

    def __init__(self, inner: Sampler | Iterable[int], seed: int, rank: int = 0) -> None:
        self.inner, self.seed, self.rank = inner, seed, rank
        self.epoch, self.passes = 0, 0
        self.generator = torch.Generator()
        if hasattr(inner, "generator"):  # RandomSampler, WeightedRandomSampler (DistributedSampler: seed + epoch)
            inner.generator = self.generator

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.passes = epoch, 0
        if hasattr(self.inner, "set_epoch"):
            self.inner.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.inner)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        base = mix_seed(self.seed, self.rank, self.epoch, self.passes)
        self.passes += 1
        self.generator.manual_seed(mix_seed(base, ORDER_STREAM))
        for position, index in enumerate(self.inner):
            yield index, mix_seed(base, position)


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
                  transform: Callable | None = None, mark_unreadable: bool = False) -> ImageDataset:
    """Training images: decoded at reduced scale and brought down to `train_side` (kept on
    disk when `image_cache`), then randomly cropped and flipped (`transform`: another
    training transform over the same decoded images, e.g. --unlabeled's two views).
    `mark_unreadable`: see ImageDataset's `unreadable_size` (the --unlabeled pool)."""
    side = train_side(pre)
    cache = DecodedCache(DecodedCache.location(cache_dir) if image_cache else None, side)
    return ImageDataset(paths, targets, transform or train_transform(pre, augment, hflip, min_scale), cache=cache,
                        unreadable_size=pre.input_size if mark_unreadable else None)


def default_num_workers(device: torch.device | None = None) -> int:
    """DataLoader worker processes for a model on `device`.

    On an accelerator the CPU only decodes: all cores but one, at most 16 (on an H200 with
    16 cores, 15 workers kept across epochs fed Lite0's training 1.11x faster than 8:
    bench/gpu.py h). On a CPU the
    model's own threads use every core and worker processes compete with them: on 2 cores
    training ran at 1.03x the raw step with 0 workers, 0.85x with 2 and 0.71x with 1
    (bench/speed.py), while decoding a 400x300 JPEG costs ~1 ms against ~70 ms per image
    of model step. So 0 up to 4 cores, then one worker per 8 cores (at most 4). The cores
    are those this process may use (cpus.usable_cpus: affinity and a container's CPU
    quota), not the host's: a 4-CPU container on a 64-core host starts 3 workers, not 15.
    """
    cpus = usable_cpus()
    if device is not None and device.type != "cpu":
        return max(0, min(16, cpus - 1))
    return 0 if cpus <= 4 else min(4, cpus // 8)


_T = TypeVar("_T")
_END = object()  # read_ahead's end of the batches


def read_ahead(loader: Iterable[_T], depth: int = 2) -> Iterator[_T]:
    """The batches of `loader`, read by a background thread up to `depth` ahead, so that
    decoding the next batch overlaps the model's work on this one (PIL's decoding and
    resizing, and ONNX Runtime's or PyTorch's kernels, release the GIL). For evaluation
    loaders without worker processes (the default on a CPU of up to 4 cores: bench/frozen.py
    measured 1.1x on the frozen path's features). Read in this thread as they are: a loader
    with workers (they read ahead already), one of a single batch, and a seeded training
    loader (its augmentation draws from the global generators, which `seeded_randomness`
    sets in the main process; a second thread must not touch them). The first batch is
    read here and the thread starts when the second is asked for, so a stream that is
    never read past its first batch decodes only that one (predict's stream). An error in
    the loader is raised here, at the batch that failed; stopping early (a deadline,
    `break`) stops the thread."""
    if getattr(loader, "num_workers", 0) or isinstance(getattr(loader, "sampler", None), SeededSampler) or (
            hasattr(loader, "__len__") and len(loader) <= 1):  # type: ignore[arg-type]
        yield from loader
        return
    batches = iter(loader)
    for batch in batches:  # the first, read in this thread
        yield batch
        break
    else:
        return
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    thread = threading.Thread(target=_produce, args=(batches, ready, stop), name="visiontune-read-ahead", daemon=True)
    thread.start()
    try:
        while True:
            batch, error = ready.get()
            if error is not None:
                raise error
            if batch is _END:
                return
            yield batch
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            with contextlib.suppress(queue.Empty):
                ready.get(timeout=0.1)
        thread.join()


def _produce(batches: Iterator[Any], ready: queue.Queue, stop: threading.Event) -> None:
    """read_ahead's thread: each batch into `ready` (waiting while it is full) until the
    batches end, `stop` is set, or the loader fails (the error handed on with the end)."""
    try:
        for batch in batches:
            while not stop.is_set():
                try:
                    ready.put((batch, None), timeout=0.1)
                    break
                except queue.Full:
                    continue
            if stop.is_set():
                return
        ready.put((_END, None))
    except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
        ready.put((_END, exc))


def make_loader(
    dataset: Dataset,
    batch_size: int,
    num_workers: int | None,
    device: torch.device | None = None,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    sampler: Sampler | None = None,
    seed: int | None = None,
    rank: int = 0,
    persistent: bool = False,
) -> DataLoader:
    """`num_workers` None: default_num_workers(device); memory is pinned for CUDA. A dataset
    of known length gets at most one worker per batch, and none for a single batch: on a
    16-core GPU host the default is 15, and `predict RUN one.jpg` would start them all.

    `seed` (training loaders: `shuffle` or a `sampler`; then no `generator`): the order is
    wrapped in a SeededSampler, so the order and each sample's augmentation depend on
    (seed, rank, epoch, pass, position) alone. `persistent`: the loader is gone through
    again each epoch, so its worker processes are kept between passes (starting them again
    cost 0.4 s an epoch with 8 and 0.8 s with 15 on a GPU host, epochs of 2,048 images:
    bench/gpu.py h); only for a map-style dataset, whose samples carry their seed (a shard
    stream learns its epoch from set_epoch in the main process, which a kept worker's copy
    would never see)."""
    workers = default_num_workers(device) if num_workers is None else num_workers
    if not isinstance(dataset, IterableDataset):  # at most one worker per batch; one batch: none (no fork to wait for)
        batches = -(-len(dataset) // batch_size)
        workers = 0 if batches <= 1 else min(workers, batches)
    if seed is not None and isinstance(dataset, ImageDataset) and (shuffle or sampler is not None):
        if generator is not None:
            raise ValueError("make_loader: a seeded loader draws its order from its seed; pass no generator")
        sampler = SeededSampler(sampler if sampler is not None else RandomSampler(dataset), seed, rank)
        shuffle, generator = False, torch.Generator()  # DataLoader's own draw of worker seeds, used by nothing
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        sampler=sampler,
        num_workers=workers,
        generator=generator,
        pin_memory=device is not None and device.type == "cuda",
        drop_last=False,
        persistent_workers=persistent and workers > 0 and not isinstance(dataset, IterableDataset),
    )
