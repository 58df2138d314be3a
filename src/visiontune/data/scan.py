"""Checking many images once: in parallel across processes, and remembered.

The scan cache (`<cache root>/scan.sqlite`, SQLite) keeps, per file, the verdict of a full
decode and the digest of its bytes, keyed by the absolute path and valid while the file's
identity (files.file_identity: size, modification time, inode, change time) is unchanged:
a re-run over unchanged data decodes nothing and hashes nothing (the feature cache keys
entries by those digests). An edited or replaced file (even one copied with its size and
times preserved) is checked again. Safe to delete at any time.

Files not in the cache are checked (`check_image` + `file_digest`) by a pool of worker
processes when there are many (PARALLEL_FROM), in this process otherwise. Workers are
forked on Linux (an unguarded script is not re-run) and spawned elsewhere; a pool that
breaks falls back to checking in this process.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import sqlite3
import sys
import time
import warnings
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import closing
from pathlib import Path

from visiontune.caches import Cache, CacheEntry, guarded, lock_wait, select_in
from visiontune.cpus import usable_cpus
from visiontune.data.images import check_image
from visiontune.files import file_digest, file_identity

log = logging.getLogger(__name__)

PARALLEL_FROM = 256  # files to check before worker processes pay for themselves
CHUNK = 64

Verdict = tuple[str | None, str]  # (why the file cannot be used or None, digest of its bytes)
VANISHED = "not readable (it vanished or cannot be opened)"


def check_and_digest(path: str) -> Verdict:
    """Decode the whole file once (None if usable, else the reason) and hash its bytes."""
    reason = check_image(path)
    try:
        digest = file_digest(path)
    except OSError as exc:
        return reason or f"cannot read: {exc}", ""
    return reason, digest


class ScanCache(Cache):
    """(path, identity) -> verdict, in one SQLite file (concurrent runs may share it). A
    cache that cannot be created, read or written (read-only, locked by another process
    past `lock_wait()`, full) is turned off with one warning (caches.guarded). Keyed by
    the file's identity; never evicted (small, and where every file's digest comes from)."""

    area = "scan"
    folder = "scan.sqlite"
    keyed_by = "identity"
    evictable = False
    key = staticmethod(file_identity)  # a row is valid while (path, identity) is what was stored

    @classmethod
    def entries(cls, root: Path) -> Iterator[CacheEntry]:
        """The one database file (its rows only make sense together), if there."""
        path = cls.under(root)
        try:
            st = path.stat()
        except OSError:
            return
        yield CacheEntry(cls.area, path, st.st_size, st.st_mtime)

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.name = f"the scan cache {self.path}"
        self.ok = guarded(self.name, self._create, False)

    def _create(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with closing(self._connect()) as db, db:
            db.execute("CREATE TABLE IF NOT EXISTS checked (path TEXT PRIMARY KEY, identity TEXT, reason TEXT, "
                       "digest TEXT)")
        return True

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=lock_wait())

    def lookup(self, keys: list[tuple[str, str]]) -> dict[str, Verdict]:
        """Verdicts of the files whose (path, identity) match what was stored."""
        if not self.ok or not keys:
            return {}
        return guarded(self.name, lambda: self._lookup(keys), {})

    def _lookup(self, keys: list[tuple[str, str]]) -> dict[str, Verdict]:
        wanted = dict(keys)
        found: dict[str, Verdict] = {}
        with closing(self._connect()) as db:
            for path, identity, reason, digest in select_in(
                    db, "SELECT path, identity, reason, digest FROM checked WHERE path IN", list(wanted)):
                if wanted.get(path) == identity:
                    found[path] = (reason, digest)
        return found

    def store(self, rows: Iterable[tuple[str, str, str | None, str]]) -> None:
        if not self.ok:
            return
        guarded(self.name, lambda: self._store(list(rows)), None)

    def _store(self, rows: list[tuple[str, str, str | None, str]]) -> None:
        with closing(self._connect()) as db, db:
            db.executemany("INSERT OR REPLACE INTO checked VALUES (?, ?, ?, ?)", rows)


def scan_cache(cache_dir: str | os.PathLike[str] | None = None) -> ScanCache:
    return ScanCache(ScanCache.location(cache_dir))


def scan(paths: list[str], cache: ScanCache | None = None, workers: int | None = None) -> list[Verdict]:
    """The verdict and digest of every path, from the cache where the file is unchanged,
    else checked (in parallel when there are many) and remembered."""
    started = time.perf_counter()
    keys = [file_identity(p) for p in paths]
    known = cache.lookup([k for k in keys if k is not None]) if cache else {}
    todo = [p for p, k in zip(paths, keys) if k is not None and k[0] not in known]
    fresh = dict(zip(todo, _check_all(todo, workers)))
    if cache and fresh:
        cache.store((k[0], k[1], *fresh[p]) for p, k in zip(paths, keys) if k is not None and p in fresh)
    out = [(VANISHED, "") if k is None else
           fresh[p] if p in fresh else known[k[0]] for p, k in zip(paths, keys)]
    log.info("scan: %d files, %d remembered, %d checked (%.1fs)", len(paths), len(paths) - len(todo), len(todo),
             time.perf_counter() - started)
    return out


def _check_all(paths: list[str], workers: int | None) -> list[Verdict]:
    workers = workers or usable_cpus()
    if len(paths) < PARALLEL_FROM or workers < 2:
        return [check_and_digest(p) for p in paths]
    # fork where the platform has it, as torch's DataLoader workers do on Linux: a spawned
    # worker imports the user's __main__ again, so a script without an `if __name__ ==
    # "__main__":` guard would re-run (and break the pool). The workers only decode with PIL
    # and hash bytes: nothing of the parent's threads (torch's) is used in them.
    context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    try:
        with warnings.catch_warnings():  # Python >= 3.12 warns about fork in a threaded process
            warnings.filterwarnings("ignore", message=r".*fork\(\) may lead to deadlocks", category=DeprecationWarning)
            with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
                return list(pool.map(check_and_digest, paths, chunksize=CHUNK))
    except BrokenProcessPool:
        log.warning("scan: the worker processes failed (on this platform a script that trains must put that code "
                    "under `if __name__ == \"__main__\":`); checking %d files in this process instead", len(paths))
        return [check_and_digest(p) for p in paths]


def digests_of(paths: list[str], cache: ScanCache | None, strict: bool = True) -> list[str]:
    """The digest of each file's bytes: remembered where the file is unchanged since a scan,
    else read and hashed (not remembered: no verdict goes with it). A file that cannot be
    read is an OSError, or with `strict` False the digest "" (the caller reads it later and
    learns why: `why_unreadable`)."""
    keys = [file_identity(p) for p in paths]
    known = cache.lookup([k for k in keys if k is not None]) if cache else {}
    return [known[k[0]][1] if k is not None and k[0] in known and known[k[0]][1] else _digest(p, strict)
            for p, k in zip(paths, keys)]


def _digest(path: str, strict: bool) -> str:
    try:
        return file_digest(path)
    except OSError:
        if strict:
            raise
        return ""


def why_unreadable(path: str) -> str:
    """Why a file that failed to load cannot be used, in the words of a scan's verdict."""
    return VANISHED if file_identity(path) is None else check_image(path) or "cannot decode"
