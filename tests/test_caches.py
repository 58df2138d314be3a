"""The caches' one interface (caches.py, issue 35): every cache lists its entries (size,
last use) and removes them through it; `cache_usage`, `evict` and `visiontune cache`
iterate the registered caches, and a new cache is one registered class."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
from PIL import Image

import visiontune as vt
from conftest import COLORS, make_image
from visiontune.caches import (
    CACHES,
    Cache,
    FolderEntries,
    cache_areas,
    cache_entries,
    cache_usage,
    evict,
    register_cache,
)
from visiontune.cli import main
from visiontune.data.loaders import train_dataset
from visiontune.data.preprocess import Preprocess
from visiontune.runtime.engine import onnx_available

AREAS = ("features", "images", "probes", "engines", "datasets")  # what `visiontune cache` has always shown


def _bytes_under(path: Path) -> int:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files)


@pytest.fixture
def hf_data(tmp_path: Path) -> Path:
    """A Hugging Face DatasetDict saved to disk (its images inside it)."""
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=["green", "red"])})

    def split(n: int, seed: int) -> datasets.Dataset:
        paths = [str(make_image(tmp_path / "src" / f"{c}_{seed + i}.png", COLORS[c], seed=seed + i))
                 for c in ("red", "green") for i in range(n)]
        return datasets.Dataset.from_dict({"img": paths, "label": [p.split("/")[-1].split("_")[0] for p in paths]},
                                          features=features)

    datasets.DatasetDict({"train": split(8, 0), "validation": split(3, 100)}).save_to_disk(str(tmp_path / "hf"))
    return tmp_path / "hf"


def _fill(root: Path, hf_data: Path, tmp_path: Path, tiny: dict) -> Any:
    """Every cache, built for real: a feature-extract run on a Hugging Face dataset (its
    images, the scan, the features, the probe, the ONNX engine) and a large training image
    decoded at its reduced size."""
    engine = "onnx" if onnx_available() else "torch"
    result = vt.fit(str(hf_data), **dict(tiny, strategy="feature-extract", epochs=1, engine=engine,
                                         cache_dir=str(root), output=str(tmp_path / "runs")))
    big = tmp_path / "big.jpg"
    Image.fromarray(np.full((300, 400, 3), 120, np.uint8)).save(big)
    images = train_dataset([str(big)], None, Preprocess(32, (0.5,) * 3, (0.5,) * 3), False, 0.0, 1.0, True, str(root))
    images[0]  # noqa: B018 - decoding stores the entry
    return result


def test_every_cache_lists_and_evicts_its_entries_through_the_interface(
        hf_data: Path, tmp_path: Path, tiny: dict) -> None:
    root = tmp_path / "cache"
    first = _fill(root, hf_data, tmp_path, tiny)
    assert cache_areas() == AREAS and set(CACHES) == {*AREAS, "scan"}
    built = [a for a in AREAS if a != "engines" or onnx_available()]
    for area in built:
        entries = list(CACHES[area].entries(root))
        assert entries, f"{area}: no entry listed"
        assert all(e.area == area and e.size == _bytes_under(e.path) > 0 for e in entries)
        assert cache_usage(root)[area] == (sum(e.size for e in entries), len(entries))
    scan = list(CACHES["scan"].entries(root))
    assert [e.path.name for e in scan] == ["scan.sqlite"] and "scan" not in cache_usage(root)
    for area in built:  # one area at a time: the others stay
        before = cache_usage(root)
        assert evict(root, max_bytes=0, areas=[area]) == (before[area][1], before[area][0])
        after = cache_usage(root)
        assert after[area] == (0, 0) and not list(CACHES[area].entries(root))
        assert {a: after[a] for a in AREAS if a != area} == {a: before[a] for a in AREAS if a != area}
    assert (root / "scan.sqlite").is_file()  # never evicted
    again = vt.fit(str(hf_data), **dict(tiny, strategy="feature-extract", epochs=1, cache_dir=str(root),
                                        output=str(tmp_path / "runs")))
    assert again.metrics == first.metrics  # what was evicted is computed again


def test_a_folder_entry_is_removed_whole_while_a_reader_holds_its_files(tmp_path: Path) -> None:
    """A feature folder evicted while another process has a shard memory-mapped: the reader
    reads on, the key finds nothing (no half-deleted folder), and nothing is left behind."""
    folder = tmp_path / "features" / "fp"
    folder.mkdir(parents=True)
    np.save(folder / "shard-1.npy", np.arange(12, dtype=np.float32).reshape(3, 4))
    (folder / "index.sqlite").write_bytes(b"x" * 10)
    mapped = np.load(folder / "shard-1.npy", mmap_mode="r")
    (entry,) = CACHES["features"].entries(tmp_path)
    CACHES["features"].remove(entry)
    assert float(mapped.sum()) == 66.0 and not folder.exists() and not list((tmp_path / "features").iterdir())


class _Thumbs(FolderEntries):
    """thumbnails of a test (a cache registered from outside the package)"""

    area: ClassVar[str] = "thumbs"
    folder: ClassVar[str] = "thumbs"


class _Notes(Cache):
    """a cache listed with one entry per file, never evicted"""

    area: ClassVar[str] = "notes"
    folder: ClassVar[str] = "notes"
    evictable: ClassVar[bool] = False


@pytest.fixture
def extra_caches() -> Iterator[None]:
    register_cache(_Thumbs)
    register_cache(_Notes)
    yield
    CACHES.pop("thumbs")
    CACHES.pop("notes")


def test_a_new_cache_is_one_registered_class(tmp_path: Path, extra_caches: None,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("a", "b"):
        (tmp_path / "thumbs" / name).mkdir(parents=True)
        (tmp_path / "thumbs" / name / "t.png").write_bytes(b"x" * 100)
    os.utime(tmp_path / "thumbs" / "a" / "t.png", (1.0, 1.0))
    os.utime(tmp_path / "thumbs" / "a", (1.0, 1.0))
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "n.txt").write_text("kept")
    assert cache_usage(tmp_path)["thumbs"] == (200, 2) and "notes" not in cache_usage(tmp_path)
    assert [e.path.name for e in cache_entries(tmp_path, ["notes"])] == ["n.txt"]
    assert main(["cache", "info", "--cache-dir", str(tmp_path)]) == 0
    assert "thumbs" in capsys.readouterr().out
    assert evict(tmp_path, max_bytes=150) == (1, 100)  # the least recently used folder
    assert not (tmp_path / "thumbs" / "a").exists() and (tmp_path / "thumbs" / "b").exists()
    assert main(["cache", "clear", "--only", "thumbs", "--cache-dir", str(tmp_path)]) == 0
    assert cache_usage(tmp_path)["thumbs"] == (0, 0) and (tmp_path / "notes" / "n.txt").is_file()
    assert main(["cache", "clear", "--only", "notes", "--cache-dir", str(tmp_path)]) == 2  # not evictable


def test_each_registered_cache_says_its_name_folder_and_keying() -> None:
    folders = set()
    for name in CACHES:
        cls = CACHES[name]
        assert issubclass(cls, Cache) and cls.area == name and cls.keyed_by in ("content", "identity")
        assert cls.evictable == CACHES.meta(name).get("evictable", True) and callable(cls.key)
        folders.add(cls.folder)
    assert len(folders) == len(CACHES)  # no two caches share a folder
