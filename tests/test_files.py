"""visiontune.files: the one CSV writer neutralises cells a spreadsheet would run as a
formula (OWASP's CSV injection: a leading single quote) and its readers give back exactly
what was written; a class named like a formula survives training, splits.csv and predict's
CSV output."""

from __future__ import annotations

import csv
import errno
import os
import shutil
from pathlib import Path

import pytest

import visiontune as vt
from conftest import TINY, make_class_folders
from visiontune.bundle import load_bundle
from visiontune.cli import main
from visiontune.files import preallocate, read_csv, read_csv_dicts, write_csv, write_text
from visiontune.rundir import RunDir

TRICKY = ["=SUM(A1:A9)", "+dog", "-cat", "@home", "'=quoted", "''twice", "\tx", "plain", "-3.5", "+1e3", "", "a=b",
          "'90s", "'s-Hertogenbosch"]


def raw(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.reader(fh))


def test_formula_cells_get_one_quote_and_come_back_unchanged(tmp_path: Path) -> None:
    out = tmp_path / "t.csv"
    write_csv(out, ["label", "=head"], [[v, 1] for v in TRICKY])
    cells = [r[0] for r in raw(out)[1:]]
    assert raw(out)[0] == ["label", "'=head"]
    assert cells == ["'=SUM(A1:A9)", "'+dog", "'-cat", "'@home", "''=quoted", "'''twice", "'\tx", "plain", "-3.5",
                     "+1e3", "", "a=b", "'90s", "'s-Hertogenbosch"]  # numbers are no formula; a real quote
    # before a formula or a quote is kept behind the added one; before anything else it is text as typed
    assert not any(c.startswith(("=", "+", "-", "@", "\t")) and c not in ("-3.5", "+1e3") for c in cells)
    assert [r[0] for r in read_csv(out)[1:]] == TRICKY
    assert [r["label"] for r in read_csv_dicts(out)] == TRICKY and "=head" in read_csv_dicts(out)[0]


def test_a_class_named_like_a_formula_trains_and_predicts_to_neutral_csv_cells(tmp_path: Path) -> None:
    data = make_class_folders(tmp_path / "data", {"red": 6, "green": 6})
    (data / "red").rename(data / "=red")
    (data / "green").rename(data / "@green")
    run = Path(vt.fit(data, **dict(TINY, strategy="feature-extract", epochs=1, output=str(tmp_path / "runs"))).run_dir)
    bundle = load_bundle(run)
    assert bundle.classes == ["=red", "@green"]
    assert {label for _, label, _ in RunDir(run).splits(bundle.task)} == {"=red", "@green"}  # splits.csv read back
    assert {r[1] for r in raw(run / "splits.csv")[1:]} == {"'=red", "'@green"}
    assert main(["predict", str(run), str(data), "--output", str(tmp_path / "p.csv"), "--top-k", "2"]) == 0
    cells = [c for row in raw(tmp_path / "p.csv")[1:] for c in row[1:]]
    assert {c for c in cells if c.startswith("'")} == {"'=red", "'@green"}
    assert not any(c.startswith(("=", "@", "+")) for c in cells)


def test_a_leading_apostrophe_typed_by_a_person_reads_as_typed(tmp_path: Path) -> None:
    """Audit of issue 34: every reader removed any leading quote, so a user's label `'90s`
    trained as the class `90s`; only the quote the writer adds (before a formula or a
    quote) is removed."""
    typed = tmp_path / "typed.csv"
    typed.write_text("path,label\na.png,'90s\nb.png,'s-Hertogenbosch\nc.png,'=guarded\n", encoding="utf-8")
    assert [r["label"] for r in read_csv_dicts(typed)] == ["'90s", "'s-Hertogenbosch", "=guarded"]


def test_a_csv_that_is_not_utf8_is_an_error_that_says_how_to_save_it(tmp_path: Path) -> None:
    """Audit of issue 34: Excel's plain CSV on Windows (cp1252) gave a UnicodeDecodeError traceback."""
    import pytest

    legacy = tmp_path / "excel.csv"
    legacy.write_bytes("path,label\na.png,caf\u00e9\n".encode("cp1252"))
    with pytest.raises(vt.DataError, match=r"excel\.csv is not UTF-8 text .* 'CSV UTF-8'"):
        read_csv(legacy)
    assert main(["train", "--csv", str(legacy), "--output", str(tmp_path / "runs")]) == 2


def test_rewritten_files_keep_their_permissions_and_links(tmp_path: Path) -> None:
    """Audit of issue 34: an atomic rewrite made the file the owner's alone (mkstemp's
    0600: a cache shared between users could not be read) and replaced a symbolic link by
    a file."""
    import os
    import stat

    from visiontune.files import write_text

    fresh = tmp_path / "fresh.txt"
    write_text(fresh, "x")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o666 & ~umask
    shared = tmp_path / "shared.txt"
    shared.write_text("x")
    shared.chmod(0o664)
    write_text(shared, "y")
    assert stat.S_IMODE(shared.stat().st_mode) == 0o664
    target, link = tmp_path / "real" / "labels.csv", tmp_path / "labels.csv"
    target.parent.mkdir()
    target.write_text("old")
    link.symlink_to(target)
    write_text(link, "new")
    assert link.is_symlink() and target.read_text() == "new"


def test_locked_lets_one_process_at_a_time_through(tmp_path: Path) -> None:
    """Two processes each add 1 to a counter file 50 times by read-then-write inside
    `locked`: none of the 100 increments is lost."""
    import subprocess
    import sys

    counter = tmp_path / "n.txt"
    counter.write_text("0")
    script = ("import sys; from pathlib import Path; from visiontune.files import locked, write_text\n"
              "p = Path(sys.argv[1])\n"
              "for _ in range(50):\n"
              "    with locked(p):\n"
              "        write_text(p, str(int(p.read_text()) + 1))\n")
    procs = [subprocess.Popen([sys.executable, "-c", script, str(counter)]) for _ in range(2)]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    assert counter.read_text() == "100"


def test_preallocate_without_statvfs_or_fallocate(tmp_path: Path, without_statvfs: None) -> None:
    """As on Windows (no os.statvfs, no os.posix_fallocate): the file is extended when the
    disk has room, and a size past the free space is ENOSPC (a cache error) before any write."""
    target = tmp_path / "matrix.npy"
    target.write_bytes(b"header")
    preallocate(target, 1 << 20)
    assert target.stat().st_size == 1 << 20 and target.read_bytes()[:6] == b"header"
    with pytest.raises(OSError) as refused:
        preallocate(target, shutil.disk_usage(tmp_path).free + (1 << 40))
    assert refused.value.errno == errno.ENOSPC and target.stat().st_size == 1 << 20


def test_atomic_writes_where_a_folder_cannot_be_opened(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Windows: no os.O_DIRECTORY, and os.open of a folder is PermissionError. Every run
    directory write goes through atomic_write, whose folder fsync is skipped there."""
    real_open = os.open

    def windows_open(path, flags, *args):
        if os.path.isdir(path):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args)

    monkeypatch.delattr(os, "O_DIRECTORY")
    monkeypatch.setattr(os, "open", windows_open)
    write_text(tmp_path / "run" / "metrics.json", "{}\n")
    assert (tmp_path / "run" / "metrics.json").read_text(encoding="utf-8") == "{}\n"
