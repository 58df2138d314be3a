"""visiontune's on-disk caches: their root, the interface each one implements, and their
size (what `visiontune cache` shows and clears, and the cap enforced after a run).

Every cache is a `Cache` subclass in the module that reads and writes it, listed in
`CACHES` (its area name, help line and import path: nothing is imported until a cache is
looked up) or added with `register_cache`. A cache says:

- `area`: its name (`visiontune cache info` lists it, `clear --only` takes it);
- `folder`: its file or folder under the cache root (`location`);
- `keyed_by` and its `key(...)`: an entry is keyed by the digest of the content it is
  computed from ("content": features, probe fits, ONNX engines, datasets) or by the
  file's identity without reading it ("identity", files.file_identity: the scan's
  verdicts, decoded images), together with the options that change it (the model
  fingerprint, the decoded side), so a stale entry can never be read;
- `entries(root)`: its entries with their size and last use, for usage and eviction (a
  file each by default; `FolderEntries`: a folder each, whose files only make sense
  together), and `remove(entry)`: deleting one safely while another process may read it.
  `evictable = False` (the scan cache: small, and what every file's digest comes from)
  keeps a cache out of `visiontune cache` and the cap.

`cache_usage` and `evict` iterate the registered caches and know no layout. Also here:
`guarded` (every cache read and write goes through it: a cache that fails, read-only,
locked by another process past `lock_wait()`, disk or file-size limit full, is turned off
for the rest of the process with one warning, and the run goes on without it),
`save_entry` (one atomic .npy entry), `touch` (an entry used now), `select_in` (a lookup
of many keys in an SQLite index: scan cache, feature shards) and `cache_max`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sqlite3
import stat
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np

from visiontune.errors import ConfigError
from visiontune.registry import Registry

log = logging.getLogger(__name__)

T = TypeVar("T")
CACHE_ERRORS = (OSError, sqlite3.Error)  # read-only, locked, disk full, file too large, vanished
_TURNED_OFF: set[str] = set()  # caches that failed in this process: not tried again
DEFAULT_CACHE_MAX = 10 * 1024 ** 3
SQLITE_MAX_PARAMS = 900  # under SQLite's limit on bound parameters per statement


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Root of visiontune's caches: `cache_dir`, `$VISIONTUNE_CACHE` or ~/.cache/visiontune;
    each cache lives in its `folder` under it."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    env = os.environ.get("VISIONTUNE_CACHE")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "visiontune"


@dataclass(frozen=True)
class CacheEntry:
    """One evictable entry: the cache's area, its file or folder, bytes, last use (epoch s)."""

    area: str
    path: Path
    size: int
    used: float


class Cache:
    """The interface every cache implements (see the module docstring). The layout methods
    are classmethods: usage and eviction need no instance of a cache."""

    area: ClassVar[str] = ""
    folder: ClassVar[str] = ""
    keyed_by: ClassVar[str] = "content"  # or "identity"
    evictable: ClassVar[bool] = True

    @staticmethod
    def key(*parts: Any) -> str:
        """An entry's key: a digest of what it is computed from (a content digest, or the
        file's identity) and of the options that change it. Each cache may keep its own."""
        return hashlib.blake2b("|".join(map(str, parts)).encode(), digest_size=16).hexdigest()

    @classmethod
    def location(cls, cache_dir: str | os.PathLike[str] | None = None) -> Path:
        """This cache's file or folder under the cache root (`cache_root(cache_dir)`)."""
        return cls.under(cache_root(cache_dir))

    @classmethod
    def under(cls, root: str | os.PathLike[str]) -> Path:
        """This cache's file or folder under the cache root `root`."""
        return Path(root) / cls.folder

    @classmethod
    def entries(cls, root: Path) -> Iterator[CacheEntry]:
        """Every file under this cache's folder, each an entry used when last modified."""
        base = cls.under(root)
        if not base.is_dir():
            return
        for f in base.rglob("*"):
            st = _stat(f)
            if st is not None:
                yield CacheEntry(cls.area, f, st.st_size, st.st_mtime)

    @classmethod
    def remove(cls, entry: CacheEntry) -> None:
        """Delete `entry` (OSError when it cannot be). A file is unlinked: a process that has
        it open reads on, one that opens it later finds no entry and computes it again."""
        entry.path.unlink()


class FolderEntries(Cache):
    """A cache whose entries are the folders in its folder (each holds files that only make
    sense together: a model's feature shards and their index, one dataset's images)."""

    @classmethod
    def entries(cls, root: Path) -> Iterator[CacheEntry]:
        """Each folder: its files' bytes, used = the newest time in it (itself included)."""
        base = cls.under(root)
        if not base.is_dir():
            return
        for folder in (p for p in base.iterdir() if p.is_dir()):
            stats = [st for st in map(_stat, folder.rglob("*")) if st is not None]
            own = _stat(folder, folders=True)
            if own is not None:  # else: removed by another process meanwhile
                used = max([own.st_mtime, *(st.st_mtime for st in stats)])
                yield CacheEntry(cls.area, folder, sum(st.st_size for st in stats), used)

    @classmethod
    def remove(cls, entry: CacheEntry) -> None:
        """Rename the folder to a hidden name beside it (one atomic step: no process finds a
        half-deleted entry under its key), then delete it. A left-over hidden folder is an
        entry of its own and goes at the next eviction."""
        gone = entry.path.with_name(f".{entry.path.name}.removed-{uuid.uuid4().hex[:8]}")
        os.rename(entry.path, gone)
        shutil.rmtree(gone, ignore_errors=True)


def _stat(path: Path, folders: bool = False) -> os.stat_result | None:
    """A regular file's stat (or a folder's, with `folders`); None for anything else or
    for what another process removed meanwhile."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st if stat.S_ISREG(st.st_mode) or (folders and stat.S_ISDIR(st.st_mode)) else None


CacheClass = type[Cache]
CACHES: Registry[CacheClass] = Registry("cache")
CACHES.lazy("features", "visiontune.frozen.features:FeatureCache", "frozen backbone features (a folder per model)")
CACHES.lazy("images", "visiontune.data.loaders:DecodedCache", "training images decoded at their reduced size")
CACHES.lazy("probes", "visiontune.frozen.probememo:ProbeMemory", "converged probe fits")
CACHES.lazy("engines", "visiontune.runtime.engine:EngineCache", "frozen backbones exported to ONNX")
CACHES.lazy("datasets", "visiontune.data.hf:DatasetCache", "Hugging Face datasets' images (a folder each)")
CACHES.lazy("scan", "visiontune.data.scan:ScanCache", "each file's verdict and digest (never evicted)",
            evictable=False)


def register_cache(cls: type[T]) -> type[T]:
    """Add a `Cache` subclass (a decorator): `visiontune cache` and the cap then include it."""
    CACHES.add(cls.area, cls, (cls.__doc__ or "").strip().split("\n")[0], evictable=cls.evictable)  # type: ignore[attr-defined]
    return cls


def cache_areas() -> tuple[str, ...]:
    """The areas `visiontune cache` shows and clears (the evictable caches; imports nothing)."""
    return tuple(name for name in CACHES if CACHES.meta(name).get("evictable", True))


def cache_entries(root: Path, areas: Sequence[str] | None = None) -> list[CacheEntry]:
    """Every entry of the evictable caches (of `areas`) under the cache `root`."""
    return [entry for area in (cache_areas() if areas is None else areas) for entry in CACHES[area].entries(root)]


def cache_usage(root: Path) -> dict[str, tuple[int, int]]:
    """{area: (bytes, entries)} under the cache `root`."""
    usage = {area: (0, 0) for area in cache_areas()}
    for entry in cache_entries(root):
        size, count = usage[entry.area]
        usage[entry.area] = (size + entry.size, count + 1)
    return usage


def evict(root: Path, max_bytes: int | None = None, older_than_s: float | None = None,
          areas: Sequence[str] | None = None, now: float | None = None) -> tuple[int, int]:
    """Remove cache entries of `areas` (default: every evictable cache): those unused for
    `older_than_s`, then the least recently used until all areas together hold at most
    `max_bytes` (None: no cap). Returns (entries removed, bytes freed). Every entry is
    safe to delete: what is missing is computed again."""
    now = time.time() if now is None else now
    entries = sorted(cache_entries(root), key=lambda e: e.used)
    chosen = set(cache_areas() if areas is None else areas)
    total = sum(e.size for e in entries)
    removed = freed = 0
    for entry in entries:
        stale = older_than_s is not None and now - entry.used > older_than_s
        over = max_bytes is not None and total > max_bytes
        if entry.area not in chosen or not (stale or over):
            continue
        try:
            CACHES[entry.area].remove(entry)
        except OSError:
            continue
        total, removed, freed = total - entry.size, removed + 1, freed + entry.size
    return removed, freed


def parse_size(text: str) -> int:
    """'10G', '500M', '2.5GB', '800k' or plain bytes -> bytes."""
    value = str(text).strip().upper().removesuffix("B").removesuffix("I")
    scale = {"K": 1024, "M": 1024 ** 2, "G": 1024 ** 3, "T": 1024 ** 4}.get(value[-1:], 1)
    try:
        return int(float(value[:-1] if scale > 1 else value) * scale)
    except ValueError:
        raise ValueError(f"expected a size like 10G, 500M or 800k, got {text!r}") from None


def cache_max() -> int:
    """The cache's size cap: $VISIONTUNE_CACHE_MAX (e.g. 20G; 0: no cap) or 10 GB."""
    text = os.environ.get("VISIONTUNE_CACHE_MAX")
    try:
        return parse_size(text) if text else DEFAULT_CACHE_MAX
    except ValueError as exc:
        raise ConfigError(f"$VISIONTUNE_CACHE_MAX: {exc}") from None


def guarded(cache: str, action: Callable[[], T], default: T) -> T:
    """`action()`, or `default` when the cache named `cache` fails (or failed before in this
    process): a cache that cannot be read or written costs time, never the run. The first
    failure is logged once, naming the cache and the cause."""
    if cache in _TURNED_OFF:
        return default
    try:
        return action()
    except CACHE_ERRORS as exc:
        _TURNED_OFF.add(cache)
        log.warning("%s cannot be used (%s: %s); going on without it: this run only takes longer", cache,
                    type(exc).__name__, exc)
        return default


def lock_wait() -> float:
    """Seconds to wait for a cache database another process holds locked
    ($VISIONTUNE_LOCK_WAIT, default 60) before going on without that cache."""
    return float(os.environ.get("VISIONTUNE_LOCK_WAIT", "60"))


def select_in(db: sqlite3.Connection, query: str, keys: Sequence[str]) -> Iterator[tuple[Any, ...]]:
    """The rows of `query` (a SELECT ending in `WHERE <column> IN`) for every key, asked in
    batches that SQLite accepts."""
    for i in range(0, len(keys), SQLITE_MAX_PARAMS):
        batch = list(keys[i:i + SQLITE_MAX_PARAMS])
        yield from db.execute(f"{query} ({','.join('?' * len(batch))})", batch)


def save_entry(target: Path, array: np.ndarray) -> None:
    """A cache entry as .npy, written to a temporary file and renamed over `target`: readers
    see the old entry or the whole new one. No fsync (unlike files.atomic_write): a cache
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


def touch(path: Path) -> None:
    """Mark a cache entry used now (eviction removes the least recently used first)."""
    try:
        os.utime(path)
    except OSError:
        pass
