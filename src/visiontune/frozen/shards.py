"""The on-disk store of the feature cache: shards of vectors and an index.

    <cache>/features/<model fingerprint>/
        index.sqlite            digest -> (shard, row)
        shard-<unique>.npy      float32 (n, D), up to SHARD_ROWS vectors, written once

One file per few thousand images instead of one per image (inodes and open() calls stay
few at 10^6 images); shards are read memory-mapped. A shard is written to a temporary
name and renamed, then indexed in one transaction, so readers see whole shards only;
concurrent writers (torchrun ranks) use unique shard names and SQLite's locking. A shard
that fails to load (torn by a crash, deleted) drops out of the index and its vectors are
computed again; any other failure (read-only, locked past `lock_wait()`, full) is the
caller's to handle (FeatureCache turns the cache off). Entries of the earlier layout (`<fingerprint>/<ab>/<digest>.npy`, one file
per image) are read when found and moved into shards as they are used. Safe to delete.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import uuid
from contextlib import closing
from pathlib import Path

import numpy as np

from visiontune.caches import lock_wait, save_entry, select_in

log = logging.getLogger(__name__)

SHARD_ROWS = 4096


class ShardStore:
    """Vectors keyed by digest under one directory (one model fingerprint)."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        with closing(self._connect()) as db, db:
            db.execute("CREATE TABLE IF NOT EXISTS vectors (digest TEXT PRIMARY KEY, shard TEXT, row INTEGER)")

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.dir / "index.sqlite", timeout=lock_wait())

    def get_many(self, digests: list[str]) -> dict[str, np.ndarray]:
        """The stored vectors among `digests` (torn or missing shards: left out, unindexed)."""
        located = self._locate(digests)
        found: dict[str, np.ndarray] = {}
        broken: list[str] = []
        for shard, rows in _by_shard(located).items():
            try:
                array = np.load(self.dir / shard, mmap_mode="r", allow_pickle=False)
                found.update({d: np.array(array[r]) for d, r in rows})
            except (OSError, ValueError, IndexError):
                broken.append(shard)
        if broken:
            log.warning("feature cache: %d unreadable shard(s) in %s; their vectors are computed again", len(broken),
                        self.dir)
            self._forget(broken)
        legacy = {d: v for d in set(digests) - set(found) if (v := self._legacy(d)) is not None}
        if legacy:  # moved into a shard of their own, then the old files go
            self.put_many(list(legacy), np.stack(list(legacy.values())))
            for digest in legacy:
                with contextlib.suppress(OSError):
                    self._legacy_path(digest).unlink()
        return {**found, **legacy}

    def count_known(self, digests: list[str]) -> int:
        """How many of `digests` have a vector here (indexed, or in the old one-file layout),
        without reading any."""
        indexed = {d for d, _, _ in self._locate(digests)}
        return sum(d in indexed or self._legacy_path(d).is_file() for d in digests)

    def put_many(self, digests: list[str], vectors: np.ndarray) -> None:
        """Write `vectors` (n, D) as new shards of at most SHARD_ROWS and index them."""
        for start in range(0, len(digests), SHARD_ROWS):
            part, rows = digests[start:start + SHARD_ROWS], vectors[start:start + SHARD_ROWS]
            name = f"shard-{uuid.uuid4().hex}.npy"
            save_entry(self.dir / name, np.ascontiguousarray(rows, dtype=np.float32))
            with closing(self._connect()) as db, db:
                db.executemany("INSERT OR REPLACE INTO vectors VALUES (?, ?, ?)",
                               [(d, name, i) for i, d in enumerate(part)])

    def _locate(self, digests: list[str]) -> list[tuple[str, str, int]]:
        with closing(self._connect()) as db:
            return list(select_in(db, "SELECT digest, shard, row FROM vectors WHERE digest IN",
                                  list(dict.fromkeys(digests))))

    def _forget(self, shards: list[str]) -> None:
        with closing(self._connect()) as db, db:
            db.executemany("DELETE FROM vectors WHERE shard = ?", [(s,) for s in shards])
        for shard in shards:
            with contextlib.suppress(OSError):
                (self.dir / shard).unlink()

    def _legacy_path(self, digest: str) -> Path:
        """Where the one-file-per-image layout kept a digest's vector."""
        return self.dir / digest[:2] / f"{digest}.npy"

    def _legacy(self, digest: str) -> np.ndarray | None:
        """A vector of the one-file-per-image layout, if there."""
        try:
            return np.load(self._legacy_path(digest), allow_pickle=False)
        except (FileNotFoundError, ValueError, OSError):
            return None


def _by_shard(located: list[tuple[str, str, int]]) -> dict[str, list[tuple[str, int]]]:
    grouped: dict[str, list[tuple[str, int]]] = {}
    for digest, shard, row in located:
        grouped.setdefault(shard, []).append((digest, row))
    return grouped
