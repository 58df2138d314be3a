"""The cache's size (issue 24): `visiontune cache info|clear`, and a cap that evicts the
least recently used entries after a run instead of growing without limit."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

import visiontune as vt
from visiontune.caches import cache_usage, evict, parse_size
from visiontune.cli import main


def _entry(path: Path, size: int, age_days: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    when = time.time() - age_days * 86400
    os.utime(path, (when, when))
    return path


def _cache(root: Path) -> dict[str, Path]:
    feats = root / "features" / "fp-old"
    entries = {
        "old_image": _entry(root / "images" / "256" / "ab" / "old.npy", 4000, 40),
        "new_image": _entry(root / "images" / "256" / "cd" / "new.npy", 4000, 1),
        "probe": _entry(root / "probes" / "p.npy", 1000, 10),
        "shard": _entry(feats / "shard-000000.npy", 6000, 50),
        "index": _entry(feats / "index.sqlite", 500, 50),
    }
    os.utime(feats, (time.time() - 50 * 86400,) * 2)
    _entry(root / "scan.sqlite", 100, 60)  # never evicted
    return entries


def test_the_cap_evicts_the_least_recently_used_first_and_a_feature_folder_whole(tmp_path: Path) -> None:
    e = _cache(tmp_path)
    assert cache_usage(tmp_path)["features"] == (6500, 1)
    removed, freed = evict(tmp_path, max_bytes=6000)  # 15,500 bytes: the feature folder (oldest) then the old image
    assert (removed, freed) == (2, 10500)
    assert not e["shard"].parent.exists() and not e["old_image"].exists()
    assert e["new_image"].exists() and e["probe"].exists() and (tmp_path / "scan.sqlite").exists()


def test_cache_info_and_clear_by_age_and_area(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    e = _cache(tmp_path)
    assert main(["cache", "info", "--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "features" in out and "2 entries" in out and "cap 10.0 GB" in out
    assert main(["cache", "clear", "--older-than", "30d", "--only", "images", "--cache-dir", str(tmp_path)]) == 0
    assert not e["old_image"].exists() and e["new_image"].exists() and e["shard"].exists()  # features: not asked
    assert main(["cache", "clear", "--cache-dir", str(tmp_path)]) == 0
    assert sum(v[0] for v in cache_usage(tmp_path).values()) == 0 and (tmp_path / "scan.sqlite").exists()
    assert main(["cache", "clear", "--only", "pictures", "--cache-dir", str(tmp_path)]) == 2


def test_a_run_keeps_the_cache_under_its_cap(flat_data: Path, tmp_path: Path, tiny: dict,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A 1-byte cap: the run succeeds, and what it cached is evicted at its end; the next
    run computes again (the cache costs time, never the run)."""
    monkeypatch.setenv("VISIONTUNE_CACHE_MAX", "1")
    cache = tmp_path / "cache"
    r = vt.fit(flat_data, **dict(tiny, strategy="feature-extract", cache_dir=str(cache), output=str(tmp_path / "r")))
    assert r.metrics and sum(v[0] for v in cache_usage(cache).values()) <= 1
    assert vt.fit(flat_data, **dict(tiny, strategy="feature-extract", cache_dir=str(cache),
                                    output=str(tmp_path / "r"))).metrics == r.metrics
    assert parse_size("10G") == 10 * 1024 ** 3 and parse_size("500M") == 500 * 1024 ** 2 and parse_size("800") == 800


def test_a_bad_cap_is_a_clear_error_in_cache_info_and_never_fails_a_finished_run(
        flat_data: Path, tmp_path: Path, tiny: dict, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("VISIONTUNE_CACHE_MAX", "ten gigs")
    assert main(["cache", "info", "--cache-dir", str(tmp_path / "c")]) == 2
    assert "VISIONTUNE_CACHE_MAX" in capsys.readouterr().err
    r = vt.fit(flat_data, **dict(tiny, strategy="feature-extract", cache_dir=str(tmp_path / "c"),
                                 output=str(tmp_path / "r")))
    assert r.metrics and (Path(r.run_dir) / "model.safetensors").is_file()
