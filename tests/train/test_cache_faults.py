"""Faults cost time, never the run: a cache folder that is read-only, a cache database that
another process holds locked, a full disk and a file-size limit each turn the cache off
with one warning, and the run ends as it would without a cache. And a file replaced by
one of the same size and the same modification time is never taken for the old one."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY, make_class_folders, make_image

RUN = textwrap.dedent("""
    import json, logging, sys
    logging.basicConfig(level=logging.WARNING, format="WARNING %(message)s")
    import visiontune as vt
    result = vt.fit(sys.argv[1], output=sys.argv[2], name="run", **json.loads(sys.argv[3]))
    print(json.dumps(result.metrics))
""")
KW = dict(TINY, strategy="feature-extract")


def _run(data: Path, out: Path, cache: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """One training run in its own process, its caches under `cache`."""
    full_env = {**os.environ, "VISIONTUNE_OFFLINE": "1", "VISIONTUNE_CACHE": str(cache), **(env or {})}
    return subprocess.run([sys.executable, "-c", RUN, str(data), str(out), json.dumps(KW)], env=full_env,
                          capture_output=True, text=True, timeout=300)


def _warnings(done: subprocess.CompletedProcess) -> list[str]:
    return [line for line in done.stderr.splitlines() if "cannot be used" in line]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, Path]:
    """The data, the metrics of a run with a healthy cache, and that cache (which the tests
    copy, never change)."""
    root = tmp_path_factory.mktemp("faults")
    data = make_class_folders(root / "d", {"red": 10, "green": 10, "blue": 10})
    done = _run(data, root / "runs", root / "cache")
    assert done.returncode == 0, done.stderr
    return data, json.loads(done.stdout.splitlines()[-1]), root / "cache"


def _same_run(done: subprocess.CompletedProcess, reference: dict) -> None:
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads(done.stdout.splitlines()[-1])
    assert metrics == pytest.approx(reference, abs=1e-6)


@contextlib.contextmanager
def _read_only(folder: Path) -> Iterator[None]:
    """`folder` where nothing can be created: file modes for a user; for root (whom modes do
    not stop) the immutable attribute (chattr +i), else a read-only bind mount."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        undo = ["chmod", "755", str(folder)]
    elif shutil.which("chattr") and subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0:
        undo = ["chattr", "-i", str(folder)]
    elif subprocess.run(f"mount --bind {folder} {folder} && mount -o remount,bind,ro {folder}", shell=True,
                        capture_output=True).returncode == 0:
        undo = ["umount", str(folder)]
    else:
        pytest.skip("cannot make a folder read-only for root here (no chattr, no mount)")
    try:
        yield
    finally:
        subprocess.run(undo, check=False)


@pytest.mark.slow
def test_a_read_only_cache_folder(reference: tuple[Path, dict, Path], tmp_path: Path) -> None:
    data, expected, _ = reference
    cache = tmp_path / "cache"
    cache.mkdir()
    with _read_only(cache):
        done = _run(data, tmp_path / "runs", cache)
        assert list(cache.iterdir()) == []
    _same_run(done, expected)
    names = [w.split(" cannot be used")[0] for w in _warnings(done)]
    assert names and len(names) == len(set(names)), done.stderr  # one warning per cache, not one per file


@pytest.mark.slow
def test_cache_databases_locked_by_another_process(reference: tuple[Path, dict, Path], tmp_path: Path) -> None:
    data, expected, warm = reference
    cache = tmp_path / "cache"
    shutil.copytree(warm, cache)  # the cache of a finished run, with its databases
    for p in data.rglob("*.png"):  # touched: the scan must look at every file again
        os.utime(p)
    databases = [str(cache / "scan.sqlite"), *map(str, (cache / "features").rglob("index.sqlite"))]
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import sqlite3, sys, time
        held = [sqlite3.connect(p, isolation_level=None) for p in sys.argv[1:]]
        for db in held:
            db.execute("BEGIN EXCLUSIVE")
        print("locked", flush=True)
        time.sleep(300)
    """), *databases], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            sqlite3.connect(databases[0], timeout=0.1).execute("SELECT * FROM checked").fetchall()
        started = time.perf_counter()
        done = _run(data, tmp_path / "runs", cache, env={"VISIONTUNE_LOCK_WAIT": "1"})
        _same_run(done, expected)
        assert time.perf_counter() - started < 120
        assert {w.split(" cannot be used")[0] for w in _warnings(done)} >= {f"WARNING the scan cache {databases[0]}"}
        assert all("locked" in w for w in _warnings(done))
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.slow
def test_a_file_size_limit_in_the_cache(reference: tuple[Path, dict, Path], tmp_path: Path) -> None:
    """RLIMIT_FSIZE of 16 KB: the databases fit, the memory-mapped matrix and the feature
    shard (30 x 256 floats) do not; the features are those computed without a cache."""
    data, _, _ = reference
    limit = 16 * 1024
    done = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        import json, logging, resource, sys
        import numpy as np
        logging.basicConfig(level=logging.WARNING, format="WARNING %(message)s")
        from visiontune.config import RunConfig
        from visiontune.models.classifier import create_classifier
        from visiontune.frozen.features import cache_for, FeatureExtractor
        import torch
        cfg = RunConfig.create(None, path=sys.argv[1], backbone="timm:test_efficientnet", weights="none",
                               image_size=32)
        model, pre = create_classifier(cfg.model, 3)
        paths = sorted(str(p) for p in __import__("pathlib").Path(sys.argv[1]).rglob("*.png"))
        plain, _ = FeatureExtractor(model.backbone, pre, torch.device("cpu"), None).extract(paths)
        limit = int(sys.argv[2])
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        cache = cache_for("timm:test_efficientnet", model.backbone, pre)
        extractor = FeatureExtractor(model.backbone, pre, torch.device("cpu"), cache)
        got, stats = extractor.extract(paths, memmap_dir=cache.dir)
        again, _ = extractor.extract(paths, memmap_dir=cache.dir)
        print(json.dumps([float((got - plain).abs().max()), float((again - plain).abs().max()), stats.misses]))
    """), str(data), str(limit)], env={**os.environ, "VISIONTUNE_CACHE": str(tmp_path / "cache")},
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    first, second, misses = json.loads(done.stdout.splitlines()[-1])
    assert first < 1e-6 and second < 1e-6 and misses == 30
    assert len(_warnings(done)) == 1 and "File too large" in _warnings(done)[0], done.stderr


def _small_filesystem(where: Path, size_kb: int) -> bool:
    """A tmpfs of `size_kb` at `where` (root only); False where it cannot be mounted."""
    where.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(where)],
                          capture_output=True).returncode == 0


@pytest.mark.slow
def test_a_full_disk_under_the_cache(reference: tuple[Path, dict, Path], tmp_path: Path) -> None:
    """A full file system: the memory-mapped feature matrix would die of SIGBUS when its
    pages are written; its room is reserved first, so the run keeps the matrix in memory."""
    data, expected, _ = reference
    disk = tmp_path / "disk"
    if not _small_filesystem(disk, 64):
        pytest.skip("needs root and mount to build a small file system")
    try:
        filler = disk / "filler"
        filler.write_bytes(b"\0" * (60 * 1024))
        done = _run(data, tmp_path / "runs", disk / "cache")
        assert done.returncode == 0 and done.returncode != -7, done.stderr[-3000:]  # -7: SIGBUS
        _same_run(done, expected)
        assert _warnings(done), done.stderr
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def _replace_keeping_size_and_times(path: Path, color: tuple[int, int, int]) -> None:
    """New bytes, the same size and modification time (what rsync -a, cp -p or tar x do);
    a BMP of the same dimensions has the same size."""
    before = path.stat()
    fresh = make_image(path.with_name("fresh.bmp"), color, size=40)
    os.replace(fresh, path)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)


def test_a_file_replaced_with_the_same_size_and_time_is_read_again(tmp_path: Path) -> None:
    import torch

    from visiontune.config import RunConfig
    from visiontune.data import scan as scanning
    from visiontune.data.loaders import DecodedCache
    from visiontune.files import file_digest
    from visiontune.frozen.features import FeatureExtractor, cache_for
    from visiontune.models.classifier import create_classifier

    path = make_image(tmp_path / "a.bmp", (220, 40, 40), size=40)
    cache = scanning.ScanCache(tmp_path / "scan.sqlite")
    (_, old_digest), = scanning.scan([str(path)], cache)
    cfg = RunConfig.create(None, path=str(tmp_path), backbone="timm:test_efficientnet", weights="none", image_size=32)
    model, pre = create_classifier(cfg.model, 2)
    features = cache_for("x", model.backbone, pre, tmp_path / "c")
    extractor = FeatureExtractor(model.backbone, pre, torch.device("cpu"), features)
    old, _ = extractor.extract([str(path)])
    decoded = DecodedCache(tmp_path / "img", 20)
    old_pixels = np.asarray(decoded.load(str(path)))

    _replace_keeping_size_and_times(path, (40, 60, 220))
    (_, new_digest), = scanning.scan([str(path)], cache)
    assert new_digest == file_digest(path) != old_digest
    new, stats = extractor.extract([str(path)])
    assert stats.misses == 1 and not torch.allclose(new, old)
    assert not np.array_equal(np.asarray(decoded.load(str(path))), old_pixels)
