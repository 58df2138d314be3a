"""WebDataset shards: tar files of samples, read as a stream (the `webdataset` package, the
format timm and large-scale training use).

`visiontune shard DATA --out SHARDS --size 1000` writes, from any source `train` accepts,
`SHARDS/train-000000.tar`, `valid-...`, `test-...` (the splits of DATA kept), each sample
`<key>.<jpg|png|...>` (the file's own bytes), `<key>.cls` (the class index, single-label)
and `<key>.json` (label or labels, group, original path, digest of the image bytes), plus
`SHARDS/dataset.json` (classes, task, the shards and sample count of each split) and
`SHARDS/index.csv` (key, split, label, group, digest, shard of every sample). A shard
ends at `--size` samples or at `--shard-bytes` (webdataset's `maxsize`), whichever comes
first; the index names the shard each sample was actually written to, and reading a shard
folder checks dataset.json against the tar files on disk.

`visiontune train SHARDS` (a folder holding dataset.json), or
`visiontune train 'shards/train-{0000..0099}.tar' --valid 'shards/valid-{0000..0009}.tar'`
(brace patterns; labels then come from each sample's .json / .cls / .txt member, read in
one pass) stream the samples: no random access. An item's path is `<shard>#<key>`: a
sample is known by its shard and its key, and every stream yields each sample's row with
it (ShardStream), so predictions, features and out-of-fold rows are stored by identity
whatever order workers and processes read in. The training stream shuffles shard order and
samples in a buffer, seeded by (seed, epoch); how torchrun processes and DataLoader
workers share the shards is ShardStream's docstring. The feature cache keys shard samples
by the digest stored at shard time, so frozen phases read each image once.
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
import tarfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import webdataset as wds
from torch.utils.data import IterableDataset
from webdataset.tariterators import base_plus_ext

from visiontune.data.images import has_image_extension, load_rgb
from visiontune.data.items import TEST, TRAIN, VALID, DataSource, Item
from visiontune.errors import DataError
from visiontune.files import file_digest, identity_digest, read_csv_dicts, write_csv, write_json
from visiontune.tasks.base import NO_LABEL, UNREADABLE, marker_like
from visiontune.tasks.catalog import task_class
from visiontune.tasks.labels import MULTI, SINGLE, Label, class_index

log = logging.getLogger(__name__)

DATASET_FILE, INDEX_FILE = "dataset.json", "index.csv"
SHUFFLE_BUFFER = 1000
SHARD_BYTES = 3_000_000_000  # webdataset's default maxsize: a shard ends past this many bytes
MAX_IDLE = 0.05  # training under torchrun: whole shards per process while at most this share of samples waits


def is_shard_item(path: str) -> bool:
    """An item path of a sample inside a shard: `<shard>.tar#<key>`."""
    return ".tar#" in path


def split_item(path: str) -> tuple[str, str]:
    """`<shard>.tar#<key>` -> (shard, key)."""
    at = path.index(".tar#") + len(".tar")
    return path[:at], path[at + 1:]


def is_shards(path: str) -> bool:
    """A folder written by `visiontune shard`, a .tar file, or a brace pattern of them."""
    return (Path(path) / DATASET_FILE).is_file() or path.endswith(".tar") or ("{" in path and ".tar" in path)


# -- writing -------------------------------------------------------------------------------
def write_shards(source: DataSource, out: str | os.PathLike[str], size: int = 1000, seed: int = 0,
                 delim: str = " ", max_bytes: float = SHARD_BYTES,
                 progress: Callable[[list[Item], str], Iterable[Item]] | None = None) -> dict[str, Any]:
    """Every item of `source` into `out/<split>-NNNNNN.tar`, at most `size` samples and
    about `max_bytes` per shard; the training samples in a seeded random order. `out` must
    hold no shards yet. `progress(items, split)` wraps each split's items (the CLI's
    progress bar). Returns dataset.json's content."""
    out = Path(out)
    _require_empty(out)
    out.mkdir(parents=True, exist_ok=True)
    index = class_index(source.classes)
    described: dict[str, Any] = {"classes": source.classes, "task": source.task, "label_delim": delim, "splits": {}}
    rows = []
    for split in (TRAIN, VALID, TEST):
        items = source.split(split)
        if not items:
            continue
        if split == TRAIN:
            items = random.Random(seed).sample(items, len(items))
        written: list[str] = []
        with wds.ShardWriter(str(out / f"{split}-%06d.tar"), maxcount=size, maxsize=max_bytes, verbose=0) as sink:
            for it in progress(items, split) if progress else items:
                key = f"{len(rows):09d}"
                sample, digest = _sample(it, key, index)
                sink.write(sample)  # the writer starts a new tar at `size` samples or `max_bytes`
                shard = Path(sink.fname).name
                written += [] if written and written[-1] == shard else [shard]
                rows.append([key, split, task_class(source.task).label_text(it.label, delim), it.group, digest, shard])
        described["splits"][split] = {"shards": written, "samples": len(items)}
    write_csv(out / INDEX_FILE, ["key", "split", "label", "group", "digest", "shard"], rows)
    write_json(out / DATASET_FILE, described)
    return described


def _require_empty(out: Path) -> None:
    """Shards are written into a folder without any: old tar files would mix with the new."""
    if not out.is_dir():
        return
    found = sorted(p.name for p in out.iterdir() if p.suffix == ".tar" or p.name in (DATASET_FILE, INDEX_FILE))
    if found:
        raise DataError(f"{str(out)!r} already holds shards ({', '.join(found[:3])}"
                        f"{', ...' if len(found) > 3 else ''}); write into a new or empty folder, or remove them first")


def _sample(item: Item, key: str, index: dict[str, int]) -> tuple[dict[str, Any], str]:
    data = Path(item.path).read_bytes()
    ext = Path(item.path).suffix.lower().lstrip(".").replace("jpeg", "jpg") or "jpg"
    meta = {"label": item.label, "group": item.group,  # JSON keeps the label's type: a name, a list, a number
            "path": item.path, "digest": file_digest(item.path)}
    sample = {"__key__": key, ext: data, "json": json.dumps(meta).encode()}
    if item.label in index:  # a class (webdataset's .cls convention): an index
        sample["cls"] = str(index[item.label]).encode()
    return sample, str(meta["digest"])


# -- reading -------------------------------------------------------------------------------
def shard_source(path: str, valid: str | None, task: str, delim: str = " ") -> DataSource:
    """The samples of a shard folder (its index) or of patterns (read once for labels)."""
    folder = Path(path)
    if (folder / DATASET_FILE).is_file():
        return _indexed_source(folder)
    urls = {TRAIN: expand(path), **({VALID: expand(valid)} if valid else {})}
    source = DataSource(root=str(Path(urls[TRAIN][0]).parent), classes=[], items=[])
    for split, names in urls.items():
        for url in names:
            for key, members in read_members(url, ("json", "cls", "txt")).items():
                label = _label_of(members, task, delim, f"{url}#{key}")
                if label is None:
                    source.excluded.append((f"{url}#{key}", "no .json/.cls/.txt label member"))
                else:
                    source.items.append(Item(f"{url}#{key}", label, split))
    return source


def read_members(url: str, wanted: tuple[str, ...] = ()) -> dict[str, dict[str, bytes]]:
    """key -> {extension: bytes} of the `wanted` members of each sample in a tar file, in
    order (tar headers are read and image bytes skipped: the file is seekable). Keys and
    extensions are split as webdataset splits them (`base_plus_ext`)."""
    if not os.path.isfile(url):
        raise DataError(f"shard {url!r} does not exist")
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(url) as tar:
        for member in tar:
            key, ext = base_plus_ext(member.name) if member.isfile() else (None, None)
            if key is None:
                continue
            members = samples.setdefault(key, {})
            if ext.lower() in wanted:
                members[ext.lower()] = tar.extractfile(member).read()  # type: ignore[union-attr]
    return samples


def sample_paths(inputs: str) -> list[str]:
    """`<shard>#<key>` of every sample in a .tar file, a brace pattern or a shard folder."""
    folder = Path(inputs)
    urls = [str(folder / s) for s in sorted(p.name for p in folder.glob("*.tar"))] if folder.is_dir() \
        else expand(inputs)
    return [f"{url}#{key}" for url in urls for key in read_members(url)]


def _indexed_source(folder: Path) -> DataSource:
    described = json.loads((folder / DATASET_FILE).read_text(encoding="utf-8"))
    task, delim = task_class(described["task"]), described.get("label_delim", " ")
    source = DataSource(root=str(folder), classes=[], items=[])
    for row in read_csv_dicts(folder / INDEX_FILE):
        label: Label = task.parse_label(row["label"], delim, f"{INDEX_FILE}: {row['key']}")
        source.items.append(Item(f"{folder / row['shard']}#{row['key']}", label, row["split"], row["group"]))
    check_shard_folder(folder, described, source.items)
    return source


def check_shard_folder(folder: Path, described: dict[str, Any], items: list[Item]) -> None:
    """dataset.json, index.csv and the tar files on disk must agree: every shard listed
    exists, every `<split>-*.tar` on disk is listed, every split has the samples it says.
    A folder that disagrees would train on part of the data without a word: DataError."""
    problems = []
    for split, part in described.get("splits", {}).items():
        listed = set(part["shards"])
        on_disk = {p.name for p in folder.glob(f"{split}-*.tar")}
        indexed = Counter(split_item(it.path)[0] for it in items if it.split == split)
        if on_disk - listed:
            problems.append(f"{len(on_disk - listed)} {split} shard(s) on disk that dataset.json does not list "
                            f"(e.g. {sorted(on_disk - listed)[0]})")
        if listed - on_disk:
            problems.append(f"{len(listed - on_disk)} {split} shard(s) listed but missing (e.g. {sorted(listed - on_disk)[0]})")
        if sum(indexed.values()) != part["samples"]:
            problems.append(f"{split}: dataset.json says {part['samples']} samples, {INDEX_FILE} lists "
                            f"{sum(indexed.values())}")
        unlisted = {Path(u).name for u in indexed} - listed
        if unlisted:
            problems.append(f"{INDEX_FILE} names {split} shard(s) dataset.json does not list (e.g. {sorted(unlisted)[0]})")
    if problems:
        raise DataError(f"the shard folder {str(folder)!r} is inconsistent: {'; '.join(problems)}. Its index does not "
                        "describe its files; write the shards again with `visiontune shard` into an empty folder")


def expand(pattern: str) -> list[str]:
    """'a/train-{0000..0002}.tar' -> the three paths (webdataset's brace expansion)."""
    return list(wds.shardlists.expand_urls(pattern))


def _label_of(sample: dict[str, bytes], task: str, delim: str, where: str) -> Label | None:
    """A sample's label from its .json ("label": a name, a list of names or a number), else
    .txt / .cls (text), read as `task` ("auto": a list is a label set, anything else a
    class) reads labels."""
    value: Any = None
    if "json" in sample:
        value = json.loads(sample["json"]).get("label")
    for member in ("txt", "cls"):
        if value is None and member in sample:
            value = sample[member].decode().strip()
    if value is None:
        return None
    shape = task if task != "auto" else MULTI if isinstance(value, list) else SINGLE  # auto: a list is a set
    return task_class(shape).parse_label(value, delim, where)


def shard_digests(paths: list[str]) -> list[str]:
    """The digest of each sample's image bytes: from the shard folder's index; for shards
    without one, a hash of the shard's identity and the sample's key."""
    indexed: dict[str, str] = {}
    for folder in {os.path.dirname(p.split("#")[0]) for p in paths}:
        index = Path(folder) / INDEX_FILE
        if index.is_file():
            indexed.update({os.path.join(folder, r["shard"]) + "#" + r["key"]: r["digest"]
                            for r in read_csv_dicts(index)})
    return [indexed.get(p) or _stand_in_digest(p) for p in paths]


def _stand_in_digest(path: str) -> str:
    """A sample of a shard without an index: its shard's identity (files.file_identity) and
    its key stand for its bytes."""
    digest = identity_digest(split_item(path)[0], path)
    if digest is None:
        raise DataError(f"shard {split_item(path)[0]!r} cannot be read")
    return digest


def shard_items(paths: list[str]) -> list[Item]:
    return [Item(p, "", "") for p in paths]


def plan_shards(sizes: dict[str, int], world: int, seed: int) -> list[list[str]]:
    """The shards of each of `world` processes: the largest first, each to the process
    holding the fewest samples so far (equal sizes in a seeded random order), so the
    shares differ by at most one shard's samples."""
    order = sorted(sizes)
    random.Random(seed).shuffle(order)
    order.sort(key=lambda url: -sizes[url])  # stable: shards of one size keep the seeded order
    loads, plan = [0] * world, [[] for _ in range(world)]  # type: list[int], list[list[str]]
    for url in order:
        rank = min(range(world), key=lambda r: (loads[r], r))
        plan[rank].append(url)
        loads[rank] += sizes[url]
    return plan


def shard_share(paths: list[str], rank: int, world: int) -> list[str]:
    """The samples among `paths` whose shards `plan_shards` gives to process `rank`: each
    process reads only its own shards."""
    sizes = Counter(split_item(p)[0] for p in paths)
    mine = set(plan_shards(sizes, world, 0)[rank])
    return [p for p in paths if split_item(p)[0] in mine]


@dataclass(frozen=True)
class Assignment:
    """What one process reads in one epoch: its shards, its rows when samples are spread
    across processes (None: every sample of its shards), and how many samples it yields."""

    urls: list[str]
    rows: frozenset[int] | None
    length: int


class ShardStream(IterableDataset):
    """Samples of `items` (paths `<shard>.tar#<key>`) streamed from their shards. Each yields
    (transform(image), target, row), `row` being the sample's index in `items`: workers
    and processes read in their own order, so results are stored by row, never by position.
    A sample is identified by its shard and key (two shards may reuse a key).

    `shuffle` (training): shard order and a sample buffer, seeded by (seed, epoch)
    (`set_epoch`). Across torchrun processes (rank, world) training takes whole shards,
    balanced anew each epoch, and every process yields the same number of samples (the
    smallest share); when shards are too few or too uneven for that (more than
    MAX_IDLE of the samples would wait), every process reads every shard and keeps its
    own 1/world of the samples instead (a seeded permutation per epoch). Evaluation
    (`shuffle` False) takes whole shards per process, as balanced; a process may get none.
    DataLoader workers split a process's shards (webdataset's per-worker split).
    `unreadable_size`: a sample that fails to decode yields a blank image of this size and
    the UNREADABLE marker instead of an error (predict, evaluate)."""

    def __init__(self, items: list[Item], targets: torch.Tensor | None, transform: Callable[[Any], torch.Tensor],
                 decode_side: int | None, shuffle: bool = False, seed: int = 0, rank: int = 0, world: int = 1,
                 unreadable_size: int | None = None, unreadable_views: int = 0) -> None:
        self.rows: dict[str, list[int]] = {}
        for i, it in enumerate(items):
            self.rows.setdefault(it.path, []).append(i)
        self.sizes = dict(Counter(split_item(it.path)[0] for it in items))
        self.count = len(items)
        self.targets, self.transform, self.decode_side = targets, transform, decode_side
        self.unreadable_size, self.unreadable_views = unreadable_size, unreadable_views
        self.shuffle, self.seed, self.rank, self.world, self.epoch = shuffle, seed, rank, world, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.assignment().length

    def epoch_seed(self) -> int:
        return self.seed * 100_003 + self.epoch

    def assignment(self) -> Assignment:
        """This process's part of this epoch (see the class docstring)."""
        if self.world == 1:
            return Assignment(sorted(self.sizes), None, self.count)
        plan = plan_shards(self.sizes, self.world, self.epoch_seed() if self.shuffle else 0)
        shares = [sum(self.sizes[u] for u in urls) for urls in plan]
        if not self.shuffle:
            return Assignment(plan[self.rank], None, shares[self.rank])
        if self.world * min(shares) >= (1 - MAX_IDLE) * self.count:
            return Assignment(plan[self.rank], None, min(shares))
        order = torch.randperm(self.count, generator=torch.Generator().manual_seed(self.epoch_seed())).tolist()
        return Assignment(sorted(self.sizes), frozenset(order[self.rank::self.world]), self.count // self.world)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        part = self.assignment()
        if not part.urls:
            return
        stream = wds.WebDataset(part.urls, shardshuffle=len(part.urls) if self.shuffle else False,
                                empty_check=False, seed=self.epoch_seed(), nodesplitter=_this_process_only)
        if part.rows is not None:  # samples spread across processes: keep this one's before decoding
            stream = stream.select(lambda s: any(r in part.rows for r in self._rows_of(s)))  # type: ignore[operator]
        if self.shuffle:
            stream = stream.shuffle(SHUFFLE_BUFFER, rng=random.Random(self.epoch_seed()))
        for sample in stream:
            for row in self._rows_of(sample):
                if part.rows is None or row in part.rows:
                    yield self._load(sample, row)

    def _rows_of(self, sample: dict[str, Any]) -> list[int]:
        return self.rows.get(f"{sample['__url__']}#{sample['__key__']}", [])

    def _load(self, sample: dict[str, Any], row: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        return read_marked(lambda: _image(sample, self.decode_side), self, row, row,
                           f"{sample['__url__']}#{sample['__key__']}")


def read_marked(read: Callable[[], Any], ds: Any, index: int, row: int,
                name: str = "") -> tuple[torch.Tensor, torch.Tensor, int]:
    """(ds.transform(read()), its target, row): the one way ImageDataset and ShardStream
    yield a sample. A file (`name`) that does not decode is a DataError naming it, or, when
    the dataset marks them (`ds.unreadable_size`), a blank image (what the transform says a
    blank is, when it says: `blank(size)`, e.g. two views) with the UNREADABLE marker;
    without targets (predict) the target is NO_LABEL."""
    try:
        image = read()
    except Exception as exc:
        if ds.unreadable_size is not None:
            blank = getattr(ds.transform, "blank", None)
            stand_in = blank(ds.unreadable_size) if blank is not None else blank_image(ds.unreadable_size,
                                                                                    ds.unreadable_views)
            return stand_in, marker_like(ds.targets, UNREADABLE), row
        if isinstance(exc, (DataError, MemoryError)):
            raise
        raise DataError(unreadable_message(name, exc)) from exc
    target = ds.targets[index] if ds.targets is not None else marker_like(None, NO_LABEL)
    return ds.transform(image), target, row


def unreadable_message(name: str, exc: Exception) -> str:
    """What a run says of an image that fails to load: which, why, and how to go on."""
    what = f"the image {name or '(unnamed)'} cannot be read ({type(exc).__name__}: {exc})"
    if is_shard_item(name):
        return f"{what}: write the shards again with `visiontune shard`"
    return (f"{what}: it was not checked before the run (--no-verify skips that check: drop --no-verify and files "
            "that do not decode are left out and listed), or it changed after the check")


def blank_image(size: int, views: int = 0) -> torch.Tensor:
    """What an unreadable image stands in as: zeros of the input size (a stack of `views`)."""
    return torch.zeros(views, 3, size, size) if views else torch.zeros(3, size, size)


def _this_process_only(urls: Any) -> Any:
    """The shards are split by rank before the stream is built (ShardStream.assignment)."""
    return urls


def _image(sample: dict[str, Any], decode_side: int | None) -> Any:
    member = next((k for k in sample if has_image_extension(f"x.{k}")), None)
    if member is None:
        raise DataError(f"sample {sample['__key__']} has no image member (members: {sorted(sample)})")
    return load_rgb(io.BytesIO(sample[member]), decode_side)
