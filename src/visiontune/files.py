"""Writing files safely, and the keys that say a file is unchanged.

- `atomic_write` and the `write_*` helpers: temporary file + fsync + rename, so a crash
  leaves the previous file or the new one, never a torn one (run directories).
- `append_line` / `read_log`: an append-only log of one-line records (each fsync'ed; a
  record torn by a crash is left out on reading and cut off at the next append).
- `write_csv` / `read_csv` / `read_csv_dicts`: the one CSV writer and its readers. A cell
  a spreadsheet would run as a formula is written with a leading single quote (`csv_cell`,
  OWASP's advice on CSV injection) and read back without it (`csv_value`).
- `locked`: one process at a time in a read-merge-write; `claim_dir`: a new folder by an
  exclusive mkdir; `preallocate`: a file's blocks reserved before it is memory-mapped.
- `file_digest`: the content hash that keys things by a file's bytes (feature cache,
  duplicates, exports' weights).
- `file_identity`, `identity_digest`: the one key for "this file, unchanged" without
  reading it (atomic_write's check, scan cache, decoded-image cache, stand-in digests of
  foreign shards, review's decisions).

The caches (their root, their interface, `guarded`, their size and eviction) are in
caches.py.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import hashlib
import json
import logging
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from visiontune.errors import ConfigError, DataError

log = logging.getLogger(__name__)


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
    if sync:
        sync_dir(path.parent)


def sync_dir(folder: str | os.PathLike[str]) -> None:
    """fsync `folder`, so that a rename in it survives a power cut. Only where a folder can
    be opened (POSIX: os.O_DIRECTORY); Windows cannot open one, and NTFS journals renames."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
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


def preallocate(path: str | os.PathLike[str], size: int) -> None:
    """Reserve `size` bytes for the file at `path` (posix_fallocate), so that a memory map of
    it can never meet a full disk mid-write (SIGBUS): OSError now instead. Where there is
    no posix_fallocate (macOS, Windows) the file system is asked for room first
    (shutil.disk_usage, which every platform has), then the file is extended."""
    fd = os.open(path, os.O_RDWR | getattr(os, "O_BINARY", 0))
    try:
        if hasattr(os, "posix_fallocate"):
            os.posix_fallocate(fd, 0, size)
        else:
            free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
            if free < size - os.fstat(fd).st_size:
                raise OSError(errno.ENOSPC, f"{size} bytes needed, {free} free", str(path))
            os.ftruncate(fd, size)
    finally:
        os.close(fd)


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
