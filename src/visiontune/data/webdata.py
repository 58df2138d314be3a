"""WebDataset shards: tar files of samples, read as a stream (the `webdataset` package, the
format timm and large-scale training use).

`visiontune shard DATA --out SHARDS --size 1000` writes, from any source `train` accepts,
`SHARDS/train-000000.tar`, `valid-...`, `test-...` (the splits of DATA kept), each sample
`<key>.<jpg|png|...>` (the file's own bytes), `<key>.cls` (the class index, single-label)
and `<key>.json` (label or labels, group, original path, digest of the image bytes), plus
`SHARDS/dataset.json` (classes, task, the shards and sample count of each split) and
`SHARDS/index.csv` (key, split, label, group, digest, shard of every sample).

`visiontune train SHARDS` (a folder holding dataset.json), or
`visiontune train 'shards/train-{0000..0099}.tar' --valid 'shards/valid-{0000..0009}.tar'`
(brace patterns; labels then come from each sample's .json / .cls / .txt member, read in
one pass) stream the samples: no random access. An item's path is `<shard>#<key>`. The
training stream shuffles shard order and samples in a buffer, seeded by (seed, epoch);
shards are split across torchrun processes (rank r takes every world-th shard) and
DataLoader workers (webdataset's per-worker split), so no sample is read twice in an epoch. The feature cache keys shard
samples by the digest stored at shard time, so frozen phases read each image once.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import random
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import webdataset as wds
from torch.utils.data import IterableDataset

from visiontune.data.images import has_image_extension, load_rgb
from visiontune.data.items import TEST, TRAIN, VALID, DataSource, Item
from visiontune.data.labels import Label, is_multi, label_set, label_text
from visiontune.errors import DataError
from visiontune.files import file_digest, write_csv, write_json
from visiontune.tasks.base import NO_LABEL

log = logging.getLogger(__name__)

DATASET_FILE, INDEX_FILE = "dataset.json", "index.csv"
SHUFFLE_BUFFER = 1000


def is_shard_item(path: str) -> bool:
    """An item path of a sample inside a shard: `<shard>.tar#<key>`."""
    return ".tar#" in path


def is_shards(path: str) -> bool:
    """A folder written by `visiontune shard`, a .tar file, or a brace pattern of them."""
    return (Path(path) / DATASET_FILE).is_file() or path.endswith(".tar") or ("{" in path and ".tar" in path)


# -- writing -------------------------------------------------------------------------------
def write_shards(source: DataSource, out: str | os.PathLike[str], size: int = 1000, seed: int = 0,
                 delim: str = " ") -> dict[str, Any]:
    """Every item of `source` into `out/<split>-NNNNNN.tar`, at most `size` samples per
    shard; the training samples in a seeded random order. Returns dataset.json's content."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    index = {c: i for i, c in enumerate(source.classes)}
    described: dict[str, Any] = {"classes": source.classes, "task": source.task, "label_delim": delim, "splits": {}}
    rows = []
    key = 0
    for split in (TRAIN, VALID, TEST):
        items = source.split(split)
        if not items:
            continue
        if split == TRAIN:
            items = random.Random(seed).sample(items, len(items))
        pattern = str(out / f"{split}-%06d.tar")
        with wds.ShardWriter(pattern, maxcount=size, verbose=0) as sink:  # shard n: samples n*size ...
            for n, it in enumerate(items):
                sample, digest = _sample(it, f"{key:09d}", index)
                sink.write(sample)
                rows.append([f"{key:09d}", split, label_text(it.label, delim), it.group, digest,
                             Path(pattern % (n // size)).name])
                key += 1
        described["splits"][split] = {"shards": sorted({r[5] for r in rows if r[1] == split}), "samples": len(items)}
    write_csv(out / INDEX_FILE, ["key", "split", "label", "group", "digest", "shard"], rows)
    write_json(out / DATASET_FILE, described)
    return described


def _sample(item: Item, key: str, index: dict[str, int]) -> tuple[dict[str, Any], str]:
    data = Path(item.path).read_bytes()
    ext = Path(item.path).suffix.lower().lstrip(".").replace("jpeg", "jpg") or "jpg"
    meta = {"label": list(label_set(item.label)) if is_multi(item.label) else item.label, "group": item.group,
            "path": item.path, "digest": file_digest(item.path)}
    sample = {"__key__": key, ext: data, "json": json.dumps(meta).encode()}
    if not is_multi(item.label):
        sample["cls"] = str(index[item.label]).encode()
    return sample, str(meta["digest"])


# -- reading -------------------------------------------------------------------------------
def shard_source(path: str, valid: str | None, multi: bool) -> DataSource:
    """The samples of a shard folder (its index) or of patterns (read once for labels)."""
    folder = Path(path)
    if (folder / DATASET_FILE).is_file():
        return _indexed_source(folder)
    urls = {TRAIN: expand(path), **({VALID: expand(valid)} if valid else {})}
    source = DataSource(root=str(Path(urls[TRAIN][0]).parent), classes=[], items=[])
    for split, names in urls.items():
        for url in names:
            for key, members in read_members(url, ("json", "cls", "txt")).items():
                label = _label_of(members, multi)
                if label is None:
                    source.excluded.append((f"{url}#{key}", "no .json/.cls/.txt label member"))
                else:
                    source.items.append(Item(f"{url}#{key}", label, split))
    return source


def read_members(url: str, wanted: tuple[str, ...] = ()) -> dict[str, dict[str, bytes]]:
    """key -> {extension: bytes} of the `wanted` members of each sample in a tar file, in
    order (tar headers are read and image bytes skipped: the file is seekable)."""
    if not os.path.isfile(url):
        raise DataError(f"shard {url!r} does not exist")
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(url) as tar:
        for member in tar:
            if not member.isfile() or "." not in os.path.basename(member.name):
                continue
            key, ext = member.name.split(".", 1)
            members = samples.setdefault(key, {})
            if ext in wanted:
                members[ext] = tar.extractfile(member).read()  # type: ignore[union-attr]
    return samples


def sample_paths(inputs: str) -> list[str]:
    """`<shard>#<key>` of every sample in a .tar file, a brace pattern or a shard folder."""
    folder = Path(inputs)
    urls = [str(folder / s) for s in sorted(p.name for p in folder.glob("*.tar"))] if folder.is_dir() \
        else expand(inputs)
    return [f"{url}#{key}" for url in urls for key in read_members(url)]


def _indexed_source(folder: Path) -> DataSource:
    described = json.loads((folder / DATASET_FILE).read_text())
    multi, delim = described["task"] == "multi-label", described.get("label_delim", " ")
    source = DataSource(root=str(folder), classes=[], items=[])
    with open(folder / INDEX_FILE, newline="") as fh:
        for row in csv.DictReader(fh):
            label: Label = tuple(sorted(row["label"].split(delim))) if multi and row["label"] else (
                () if multi else row["label"])
            source.items.append(Item(f"{folder / row['shard']}#{row['key']}", label, row["split"], row["group"]))
    return source


def expand(pattern: str) -> list[str]:
    """'a/train-{0000..0002}.tar' -> the three paths (webdataset's brace expansion)."""
    return list(wds.shardlists.expand_urls(pattern))


def _label_of(sample: dict[str, bytes], multi: bool) -> Label | None:
    if "json" in sample:
        label = json.loads(sample["json"]).get("label")
        if label is not None:
            return tuple(sorted(map(str, label))) if isinstance(label, list) or multi else str(label)
    for member in ("txt", "cls"):
        if member in sample:
            text = sample[member].decode().strip()
            return tuple(sorted(text.split())) if multi else text
    return None


def shard_digests(paths: list[str]) -> list[str]:
    """The digest of each sample's image bytes: from the shard folder's index; for shards
    without one, a hash of the shard's name, size and mtime and the sample's key."""
    indexed: dict[str, str] = {}
    for folder in {os.path.dirname(p.split("#")[0]) for p in paths}:
        index = Path(folder) / INDEX_FILE
        if index.is_file():
            with open(index, newline="") as fh:
                indexed.update({os.path.join(folder, r["shard"]) + "#" + r["key"]: r["digest"]
                                for r in csv.DictReader(fh)})
    return [indexed.get(p) or _stand_in_digest(p) for p in paths]


def _stand_in_digest(path: str) -> str:
    shard = path.split("#")[0]
    st = os.stat(shard)
    return hashlib.blake2b(f"{os.path.abspath(shard)}|{st.st_size}|{st.st_mtime_ns}|{path}".encode(),
                           digest_size=16).hexdigest()


def shard_items(paths: list[str]) -> list[Item]:
    return [Item(p, "", "") for p in paths]


class ShardStream(IterableDataset):
    """Samples of `items` (paths `<shard>#<key>`) streamed from their shards: each yields
    (transform(image), target). `shuffle`: shard order and a sample buffer, seeded by
    (seed, epoch) (`set_epoch`); shards split across processes (rank, world) and workers."""

    def __init__(self, items: list[Item], targets: torch.Tensor | None, transform: Callable[[Any], torch.Tensor],
                 decode_side: int | None, shuffle: bool = False, seed: int = 0, rank: int = 0, world: int = 1) -> None:
        per_url = Counter(it.path.split("#")[0] for it in items)
        self.urls = sorted(per_url)
        self.row = {it.path.split("#", 1)[1]: i for i, it in enumerate(items)}
        self.targets, self.transform, self.decode_side = targets, transform, decode_side
        self.shuffle, self.seed, self.rank, self.world, self.epoch = shuffle, seed, rank, world, 0
        # under torchrun every process must take the same number of training steps: the
        # loader is cut to the smallest share (selection of which samples wait: the shuffle)
        shares = [sum(per_url[u] for u in self.urls[r::world]) for r in range(world)]
        self.length = min(shares) if shuffle and world > 1 else shares[rank]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        urls = self.urls[self.rank::self.world] if self.world > 1 else self.urls
        stream = wds.WebDataset(urls, shardshuffle=len(urls) if self.shuffle else False, empty_check=False,
                                seed=self.seed * 100_003 + self.epoch, nodesplitter=_this_process_only)
        if self.shuffle:
            stream = stream.shuffle(SHUFFLE_BUFFER, rng=random.Random(self.seed * 100_003 + self.epoch))
        for sample in stream:
            i = self.row.get(sample["__key__"])
            if i is not None:
                target = self.targets[i] if self.targets is not None else torch.tensor(NO_LABEL)
                yield self.transform(_image(sample, self.decode_side)), target


def _this_process_only(urls: Any) -> Any:
    """The shards are split by rank before the stream is built (ShardStream.__iter__)."""
    return urls


def _image(sample: dict[str, Any], decode_side: int | None) -> Any:
    member = next((k for k in sample if has_image_extension(f"x.{k}")), None)
    if member is None:
        raise DataError(f"sample {sample['__key__']} has no image member (members: {sorted(sample)})")
    return load_rgb(io.BytesIO(sample[member]), decode_side)
