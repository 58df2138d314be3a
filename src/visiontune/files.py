"""Writing files safely, and the on-disk cache primitives every cache shares.

- `atomic_write` and the `write_*` helpers: temporary file + fsync + rename, so a crash
  leaves the previous file or the new one, never a torn one (run directories).
- `append_line` / `read_log`: an append-only log of one-line records (each fsync'ed; a
  record torn by a crash is left out on reading and cut off at the next append).
- `write_csv` / `read_csv` / `read_csv_dicts`: the one CSV writer and its readers. A cell
  a spreadsheet would run as a formula is written with a leading single quote (`csv_cell`,
  OWASP's advice on CSV injection) and read back without it (`csv_value`).
- `cache_root`, `save_entry`, `file_digest`: the root of visiontune's caches, one atomic
  cache entry (no fsync: a torn entry fails to load and is recomputed), and the content
  hash that keys entries by a file's bytes (feature cache, duplicates).
- `file_identity`, `identity_digest`: the one key for "this file, unchanged" without
  reading it (scan cache, decoded-image cache, stand-in digests of foreign shards).
- `select_in`: a lookup of many keys in an SQLite index (scan cache, feature shards).
- `guarded`: every cache read and write goes through it: a cache that fails (read-only,
  locked by another process past `lock_wait()`, disk or file-size limit full) is turned
  off for the rest of the process with one warning, and the run goes on without it.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import os
import sqlite3
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from visiontune.errors import ConfigError, DataError

log = logging.getLogger(__name__)

T = TypeVar("T")
CACHE_ERRORS = (OSError, sqlite3.Error)  # read-only, locked, disk full, file too large, vanished
_TURNED_OFF: set[str] = set()  # caches that failed in this process: not tried again


class FileChanged(Exception):
    """The file was written by someone else since it was read (`atomic_write`'s `expected`)."""


UNCHECKED = ("", "")  # atomic_write's default `expected`: replace whatever is there


def atomic_write(path: str | os.PathLike[str], write: Callable[[str], None],
                 expected: tuple[str, str] | None = UNCHECKED, sync: bool = True) -> None:
    """Call `write(tmp_path)`, fsync, then rename over `path`. The temporary file's name is
    unique, so processes writing the same `path` at once never take each other's file (the
    last rename wins; each reader sees one whole version). With `expected` (the
    `file_identity` the file had when it was read; None: it did not exist), FileChanged is
    raised instead of the rename when the file is no longer that one: a read-merge-write
    then reads again rather than overwrite what another writer wrote meanwhile.
    `sync=False`: no fsync, for many files that a marker written after them vouches for
    (the caller syncs once)."""
    path = Path(os.path.realpath(path)) if os.path.islink(path) else Path(path)  # a link: its file is rewritten
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        os.chmod(tmp, _mode_for(path))  # mkstemp's file is the owner's alone; the result is not
        write(tmp)
        if sync:
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        if expected != UNCHECKED and file_identity(path) != expected:
            raise FileChanged(str(path))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    if not sync:
        return
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _mode_for(path: Path) -> int:
    """The permissions `path` keeps when rewritten: its own, or a new file's (0o666 less
    the process's umask, as `open` gives)."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return 0o666 & ~_UMASK


def _umask() -> int:
    mask = os.umask(0o022)  # read once, when this module is imported (os.umask can only be read by setting it)
    os.umask(mask)
    return mask


_UMASK = _umask()


@contextlib.contextmanager
def locked(path: str | os.PathLike[str], timeout: float = 60.0) -> Iterator[None]:
    """One process (and thread) at a time inside the block for `path`: a read-merge-write
    of a file that several processes write (two review pages on one run, two labelling
    pages on one CSV). The lock is the hidden file `.NAME.lock` beside it (filelock)."""
    from filelock import FileLock, Timeout

    target = Path(path)
    try:
        with FileLock(str(target.parent / f".{target.name}.lock"), timeout=timeout):
            yield
    except Timeout:
        raise ConfigError(f"{target} is being written by another process for over {timeout:.0f} s; try again, or "
                          f"remove {target.parent / f'.{target.name}.lock'} if no visiontune process runs") from None


def write_text(path: str | os.PathLike[str], text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)

    atomic_write(path, write)


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")  # what a spreadsheet reads a cell as a formula by (OWASP)
CSV_QUOTE = "'"  # the prefix spreadsheets and their exports mark text with


def csv_cell(value: Any) -> Any:
    """`value` as written into a CSV cell: text a spreadsheet would run as a formula (it
    starts with = + - @, a tab or a carriage return, and is not a number such as -1.5) gets
    a leading single quote; so does text that is a quote followed by such a character or
    by another quote, so that `csv_value` strips exactly what was added. Other values,
    `'90s` or `'s-Hertogenbosch` among them, are written as they are."""
    if not isinstance(value, str) or not _quotable(value):
        return value
    if value[0] != CSV_QUOTE and _is_number(value):
        return value
    return CSV_QUOTE + value


def csv_value(cell: str) -> str:
    """A cell as `csv_cell` wrote it, read back: a leading quote is removed only where it
    guards a formula character or another quote (what `csv_cell` adds), so text a person
    typed with a leading apostrophe (`'90s`) reads as typed."""
    return cell[1:] if cell.startswith(CSV_QUOTE) and _quotable(cell[1:]) else cell


def _quotable(text: str) -> bool:
    """Text that `csv_cell` guards: a formula's start, or a quote before one or before a quote."""
    return text.startswith(FORMULA_STARTS) or (text.startswith(CSV_QUOTE) and
                                               text[1:].startswith((*FORMULA_STARTS, CSV_QUOTE)))


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def write_bytes(path: str | os.PathLike[str], data: bytes, sync: bool = True) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data), sync=sync)


def write_csv(path: str | os.PathLike[str], header: list[str], rows: Iterable[Iterable[Any]],
              expected: tuple[str, str] | None = UNCHECKED) -> None:
    """A header and rows as CSV, written atomically, every cell through `csv_cell`; `rows`
    may be a generator (it is consumed while writing; if it raises, `path` keeps what it
    held). `read_csv` / `read_csv_dicts` read it back; `expected`: see `atomic_write`."""
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow([csv_cell(v) for v in header])
            writer.writerows([csv_cell(v) for v in row] for row in rows)

    atomic_write(path, write, expected)


def read_csv(path: str | os.PathLike[str]) -> list[list[str]]:
    """Every row of a CSV file (a UTF-8 byte-order mark is skipped), cells through
    `csv_value`: what `write_csv` was given, as text. A file that is not UTF-8 (Excel's
    plain "CSV" on Windows) is a DataError saying how to save it."""
    with _utf8(path) as fh:
        return [[csv_value(cell) for cell in row] for row in csv.reader(fh)]


def read_csv_dicts(path: str | os.PathLike[str]) -> list[dict[str, str]]:
    """The rows of a CSV file with a header, as dicts (csv.DictReader's), read as `read_csv`
    reads cells."""
    with _utf8(path) as fh:
        reader = csv.DictReader(fh)
        reader.fieldnames = [csv_value(name) for name in reader.fieldnames or []]
        return [{k: csv_value(v) if isinstance(v, str) else v for k, v in row.items()} for row in reader]


@contextlib.contextmanager
def _utf8(path: str | os.PathLike[str]) -> Iterator[Any]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            yield fh
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text (byte {exc.object[exc.start:exc.start + 1]!r} at offset "
                        f"{exc.start}): save it as UTF-8 (Excel: Save As, 'CSV UTF-8'; LibreOffice: character set "
                        "Unicode (UTF-8))") from None


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def append_line(path: str | os.PathLike[str], line: str) -> None:
    """Append one record (a line without a line break) to a log, then fsync: a crash leaves
    every earlier record whole and at worst this one torn. A torn last record found here is
    cut off first (with a warning), so that this one starts on a line of its own."""
    if "\n" in line or "\r" in line:
        raise ValueError("a log record is one line")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab+") as fh:
        if fh.seek(0, os.SEEK_END):
            fh.seek(-1, os.SEEK_END)
            if fh.read(1) != b"\n":
                whole = _whole_records(path, Path(path).read_bytes())
                fh.truncate(len(whole))
        fh.write(line.encode("utf-8") + b"\n")
        fh.flush()
        os.fsync(fh.fileno())


def read_log(path: str | os.PathLike[str]) -> list[str]:
    """The whole records of an append-only log (`append_line`); [] when there is none. A
    torn last record (a crash while it was appended) is left out, with a warning."""
    if not os.path.isfile(path):
        return []
    return _whole_records(path, Path(path).read_bytes()).decode("utf-8").splitlines()


def _whole_records(path: str | os.PathLike[str], data: bytes) -> bytes:
    whole = data[:data.rfind(b"\n") + 1]
    if len(whole) < len(data):
        log.warning("%s: its last record was cut off while written (%d bytes: %r); it is left out", path,
                    len(data) - len(whole), data[len(whole):][:80])
    return whole


def claim_dir(parent: str | os.PathLike[str], name: str) -> Path:
    """A new folder `parent/name`, or `name-2`, `name-3`... when taken, made by an exclusive
    mkdir: two processes asking at once never get the same folder."""
    Path(parent).mkdir(parents=True, exist_ok=True)
    suffix = 1
    while True:
        folder = Path(parent) / (name if suffix == 1 else f"{name}-{suffix}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            suffix += 1


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


def preallocate(path: str | os.PathLike[str], size: int) -> None:
    """Reserve `size` bytes for the file at `path` (posix_fallocate), so that a memory map of
    it can never meet a full disk mid-write (SIGBUS): OSError now instead."""
    fd = os.open(path, os.O_RDWR)
    try:
        if hasattr(os, "posix_fallocate"):
            os.posix_fallocate(fd, 0, size)
        else:  # no fallocate on this platform: ask the file system for room first
            free = os.statvfs(path).f_bavail * os.statvfs(path).f_frsize
            if free < size:
                raise OSError(28, f"{size} bytes needed, {free} free", str(path))
            os.ftruncate(fd, size)
    finally:
        os.close(fd)


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


def file_identity(path: str | os.PathLike[str]) -> tuple[str, str] | None:
    """(absolute path, what stands for its content without reading it) or None when it
    cannot be stat'ed. Size and modification time are not enough: `rsync -a`, `cp -p`,
    `tar x` and `unzip` keep both while replacing the bytes; the inode and the change time
    (which no program can set back) tell a replaced or rewritten file from the old one."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return os.path.abspath(path), f"{st.st_size}|{st.st_mtime_ns}|{st.st_ino}|{st.st_ctime_ns}"


def identity_digest(path: str | os.PathLike[str], extra: str = "") -> str | None:
    """A hash of `file_identity(path)` (and `extra`): a cache key that changes when the file
    may have; None when the file cannot be stat'ed."""
    identity = file_identity(path)
    if identity is None:
        return None
    return hashlib.blake2b("|".join((*identity, extra)).encode(), digest_size=16).hexdigest()


def file_digest(path: str | os.PathLike[str]) -> str:
    """blake2b of the file's bytes (128 bits, hex)."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# -- the cache's size: what `visiontune cache` shows and clears, and the cap ------------
# scan.sqlite (small) is never evicted; datasets/: a Hugging Face dataset's images (data/hf.py)
CACHE_AREAS = ("features", "images", "probes", "engines", "datasets")
DEFAULT_CACHE_MAX = 10 * 1024 ** 3


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


def touch(path: Path) -> None:
    """Mark a cache entry used now (eviction removes the least recently used first)."""
    try:
        os.utime(path)
    except OSError:
        pass


def cache_entries(root: Path) -> list[tuple[str, Path, int, float]]:
    """(area, path, bytes, last used) of every evictable entry under the cache `root`: a
    file of images/, probes/, engines/; a whole model's folder of features/ (its shards
    and index only make sense together) or of datasets/ (one dataset's images; used = the
    newest time in it)."""
    out: list[tuple[str, Path, int, float]] = []
    for area in CACHE_AREAS:
        base = root / area
        if not base.is_dir():
            continue
        if area in ("features", "datasets"):
            for folder in (p for p in base.iterdir() if p.is_dir()):
                stats = [st for st in map(_stat, folder.rglob("*")) if st is not None]
                out.append((area, folder, sum(st.st_size for st in stats),
                            max([folder.stat().st_mtime, *(st.st_mtime for st in stats)])))
            continue
        for f in base.rglob("*"):
            st = _stat(f)
            if st is not None:
                out.append((area, f, st.st_size, st.st_mtime))
    return out


def _stat(path: Path) -> os.stat_result | None:
    """A regular file's stat; None for a folder or a file another process removed meanwhile."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st if stat.S_ISREG(st.st_mode) else None


def cache_usage(root: Path) -> dict[str, tuple[int, int]]:
    """{area: (bytes, entries)} under the cache `root`."""
    usage = {area: (0, 0) for area in CACHE_AREAS}
    for area, _, size, _ in cache_entries(root):
        usage[area] = (usage[area][0] + size, usage[area][1] + 1)
    return usage


def evict(root: Path, max_bytes: int | None = None, older_than_s: float | None = None,
          areas: Sequence[str] = CACHE_AREAS, now: float | None = None) -> tuple[int, int]:
    """Remove cache entries of `areas`: those unused for `older_than_s`, then the least
    recently used until all areas together hold at most `max_bytes` (None: no cap).
    Returns (entries removed, bytes freed). Every entry is safe to delete: what is missing
    is computed again."""
    import shutil
    import time

    now = time.time() if now is None else now
    entries = sorted(cache_entries(root), key=lambda e: e[3])
    total = sum(e[2] for e in entries)
    removed = freed = 0
    for area, path, size, used in entries:
        if area not in areas:
            continue
        stale = older_than_s is not None and now - used > older_than_s
        over = max_bytes is not None and total > max_bytes
        if not (stale or over):
            continue
        try:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        except OSError:
            continue
        total, removed, freed = total - size, removed + 1, freed + size
    return removed, freed
