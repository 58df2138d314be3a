"""Writing files safely, and the on-disk cache primitives every cache shares.

- `atomic_write` and the `write_*` helpers: temporary file + fsync + rename, so a crash
  leaves the previous file or the new one, never a torn one (run directories).
- `cache_root`, `save_entry`, `file_digest`: the root of visiontune's caches, one atomic
  cache entry (no fsync: a torn entry fails to load and is recomputed), and the content
  hash that keys entries by a file's bytes (feature cache, duplicates).
- `select_in`: a lookup of many keys in an SQLite index (scan cache, feature shards).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import sqlite3
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np


def atomic_write(path: str | os.PathLike[str], write: Callable[[str], None]) -> None:
    """Call `write(tmp_path)`, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_text(path: str | os.PathLike[str], text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)

    atomic_write(path, write)


def write_csv(path: str | os.PathLike[str], header: list[str], rows: Iterable[Iterable[Any]]) -> None:
    """A header and rows as CSV, written atomically; `rows` may be a generator (it is
    consumed while writing; if it raises, `path` keeps what it held)."""
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(header)
            writer.writerows(rows)

    atomic_write(path, write)


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


SQLITE_MAX_PARAMS = 900  # under SQLite's limit on bound parameters per statement


def select_in(db: sqlite3.Connection, query: str, keys: Sequence[str]) -> Iterator[tuple[Any, ...]]:
    """The rows of `query` (a SELECT ending in `WHERE <column> IN`) for every key, asked in
    batches that SQLite accepts."""
    for i in range(0, len(keys), SQLITE_MAX_PARAMS):
        batch = list(keys[i:i + SQLITE_MAX_PARAMS])
        yield from db.execute(f"{query} ({','.join('?' * len(batch))})", batch)


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Root of visiontune's caches: `cache_dir`, `$VISIONTUNE_CACHE` or ~/.cache/visiontune;
    features live in its features/, decoded images in its images/."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    env = os.environ.get("VISIONTUNE_CACHE")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "visiontune"


def save_entry(target: Path, array: np.ndarray) -> None:
    """A cache entry as .npy, written to a temporary file and renamed over `target`: readers
    see the old entry or the whole new one. No fsync (unlike `atomic_write`): a cache
    entry torn by a crash fails to load and is computed again."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.save(fh, array, allow_pickle=False)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def file_digest(path: str | os.PathLike[str]) -> str:
    """blake2b of the file's bytes (128 bits, hex)."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
