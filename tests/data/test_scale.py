"""Scale: the scan cache (hit, miss, edited file, parallel checks), the sharded feature
cache's migration of old entries, and WebDataset shards from folder to prediction."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import visiontune as vt
from conftest import by_path, make_class_folders, make_image, original_paths
from visiontune.data import scan as scanning
from visiontune.frozen.shards import ShardStore


def _checked(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    seen: list[str] = []
    real = scanning.check_and_digest
    monkeypatch.setattr(scanning, "check_and_digest", lambda p: seen.append(p) or real(p))
    return seen


def test_the_scan_cache_remembers_unchanged_files_and_rechecks_edited_ones(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_class_folders(tmp_path / "d", {"red": 3, "green": 2})
    (root / "red" / "broken.png").write_bytes(b"not a png")
    paths = sorted(str(p) for p in root.rglob("*.png"))
    cache = scanning.ScanCache(tmp_path / "scan.sqlite")
    seen = _checked(monkeypatch)
    first = scanning.scan(paths, cache)
    assert len(seen) == 6 and sum(r is not None for r, _ in first) == 1
    seen.clear()
    assert scanning.scan(paths, cache) == first and seen == []  # all remembered, the broken verdict too
    make_image(Path(paths[0]), (0, 0, 0), size=44, seed=5)  # edited: new size and mtime
    again = scanning.scan(paths, cache)
    assert seen == [paths[0]] and again[0][1] != first[0][1] and again[1:] == first[1:]


def test_many_files_are_checked_by_worker_processes_with_the_same_verdicts(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_class_folders(tmp_path / "d", {"red": 6, "green": 6})
    (root / "red" / "truncated.png").write_bytes((root / "red" / "red_000.png").read_bytes()[:60])
    paths = sorted(str(p) for p in root.rglob("*.png"))
    one_by_one = scanning.scan(paths, None, workers=1)
    monkeypatch.setattr(scanning, "PARALLEL_FROM", 4)
    assert scanning.scan(paths, None, workers=2) == one_by_one
    assert sum(r is not None for r, _ in one_by_one) == 1


def test_a_rerun_over_unchanged_data_decodes_nothing(flat_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from visiontune.config import DataConfig
    from visiontune.data.sources import load_items

    load_items(DataConfig(path=str(flat_data)))
    seen = _checked(monkeypatch)
    load_items(DataConfig(path=str(flat_data)))
    assert seen == []


def test_old_one_file_per_image_entries_move_into_shards(tmp_path: Path) -> None:
    store_dir = tmp_path / "fp"
    legacy = store_dir / "ab" / "abcdef.npy"
    legacy.parent.mkdir(parents=True)
    np.save(legacy, np.arange(4, dtype=np.float32))
    store = ShardStore(store_dir)
    found = store.get_many(["abcdef", "missing"])
    assert list(found) == ["abcdef"] and found["abcdef"].tolist() == [0, 1, 2, 3]
    assert not legacy.exists() and len(list(store_dir.glob("shard-*.npy"))) == 1
    assert ShardStore(store_dir).get_many(["abcdef"])["abcdef"].tolist() == [0, 1, 2, 3]


def test_shards_round_trip_train_predict_evaluate(split_data: Path, tmp_path: Path, tiny: dict) -> None:
    """folder -> shards -> train -> predict / evaluate: the metrics of the folder run (the
    converged probe on the same features is deterministic) and the same predictions."""
    from visiontune.cli import main

    shards = tmp_path / "shards"
    assert main(["shard", str(split_data), "--out", str(shards), "--size", "7"]) == 0
    described = json.loads((shards / "dataset.json").read_text())
    assert described["splits"]["train"] == {"shards": ["train-000000.tar", "train-000001.tar", "train-000002.tar"],
                                            "samples": 20}
    kw = dict(tiny, strategy="feature-extract", output=str(tmp_path / "runs"))
    folder_run = vt.fit(split_data, name="folder", **kw)
    shard_run = vt.fit(shards, name="shards", **kw)
    assert shard_run.metrics == pytest.approx(folder_run.metrics, abs=1e-5)
    from_shards, _ = vt.predict(shard_run.run_dir, str(shards / "test-000000.tar"))
    from_files, _ = vt.predict(folder_run.run_dir, split_data / "test")
    assert len(from_shards) == 6 and all(".tar#" in p.path for p in from_shards)
    origin, files = original_paths([shards / "test-000000.tar"]), by_path(from_files)
    for path, probs in by_path(from_shards).items():  # each sample against its own file
        assert np.allclose(probs, files[origin[path]], atol=1e-5), path
    scored = vt.evaluate(shard_run.run_dir, shards)  # its test shards
    assert scored.metrics["accuracy"] == pytest.approx(vt.evaluate(folder_run.run_dir, split_data).metrics["accuracy"])


def test_training_on_a_pattern_of_shards_with_a_valid_pattern(split_data: Path, tmp_path: Path, tiny: dict) -> None:
    from visiontune.config import DataConfig
    from visiontune.data.sources import load_items
    from visiontune.data.webdata import write_shards

    write_shards(load_items(DataConfig(path=str(split_data))), tmp_path / "s", size=7)
    pattern = str(tmp_path / "s" / "train-{000000..000002}.tar")
    r = vt.fit(pattern, valid=str(tmp_path / "s" / "valid-{000000..000001}.tar"),
               **dict(tiny, strategy="finetune", epochs=2, output=str(tmp_path / "runs")))
    assert len(r.history) == 2 and np.isfinite(r.history[-1]["val_loss"])
    assert r.data is not None and len(r.data.split("train")) == 20 and len(r.data.split("valid")) == 8


def test_a_script_without_a_main_guard_runs_once_when_the_scan_uses_workers(tmp_path: Path) -> None:
    """Scan workers must not re-run the user's script: a spawned worker imports __main__ again,
    so an unguarded `vt.fit(...)` at the top of train.py would run once per worker."""
    import subprocess
    import sys

    root = make_class_folders(tmp_path / "d", {"red": 6, "green": 6})
    script = tmp_path / "train.py"
    script.write_text(
        "from visiontune.data import scan\n"
        "print('top level ran', flush=True)\n"
        "scan.PARALLEL_FROM = 4\n"
        f"paths = sorted(str(p) for p in __import__('pathlib').Path({str(root)!r}).rglob('*.png'))\n"
        "print(sum(r is None for r, _ in scan.scan(paths, None, workers=2)), 'usable')\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["top level ran", "12 usable"]


def test_a_broken_worker_pool_falls_back_to_checking_in_this_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    from concurrent.futures.process import BrokenProcessPool

    class Broken:
        def __init__(self, *args, **kwargs) -> None:
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            pass

        def map(self, *args, **kwargs):
            raise BrokenProcessPool("a worker died")

    root = make_class_folders(tmp_path / "d", {"red": 3, "green": 3})
    paths = sorted(str(p) for p in root.rglob("*.png"))
    expected = scanning.scan(paths, None, workers=1)
    monkeypatch.setattr(scanning, "PARALLEL_FROM", 2)
    monkeypatch.setattr(scanning, "ProcessPoolExecutor", Broken)
    assert scanning.scan(paths, None, workers=2) == expected
    assert "__main__" in caplog.text
