"""Hugging Face datasets as DATA (data/hf.py): a save_to_disk folder offline, its splits,
the label's shape from the column's type, and hf:NAME failing fast without the Hub."""

from __future__ import annotations

import csv
import time
from collections import Counter
from pathlib import Path

import pytest

import visiontune as vt
from conftest import COLORS, TINY, make_image
from visiontune.cli import main
from visiontune.config import DataConfig
from visiontune.data.sources import load_items

datasets = pytest.importorskip("datasets")


def _images(root: Path, n: int, colour: str, seed: int) -> list[str]:
    return [str(make_image(root / f"{colour}_{seed + i}.png", COLORS[colour], seed=seed + i)) for i in range(n)]


def _split(root: Path, counts: dict[str, int], seed: int) -> datasets.Dataset:
    paths, labels = [], []
    for colour, n in counts.items():
        paths += _images(root, n, colour, seed)
        labels += [colour] * n
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=["green", "red"]),
                                  "note": datasets.Value("string")})
    return datasets.Dataset.from_dict({"img": paths, "label": labels, "note": ["x"] * len(paths)}, features=features)


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    """A DatasetDict (train / validation / test) saved with save_to_disk; its images' bytes
    are inside it, the source files deleted."""
    src = tmp_path / "src"
    dd = datasets.DatasetDict({"train": _split(src, {"red": 10, "green": 10}, 0),
                               "validation": _split(src, {"red": 4, "green": 4}, 100),
                               "test": _split(src, {"red": 3, "green": 3}, 200)})
    out = tmp_path / "saved"
    dd.save_to_disk(str(out))
    for f in src.iterdir():
        f.unlink()  # the saved folder must stand alone
    return out


def test_a_saved_dataset_dict_trains_with_its_own_splits_and_labels_offline(saved: Path, tmp_path: Path) -> None:
    r = vt.fit(saved, **dict(TINY, strategy="feature-extract", epochs=1), output=str(tmp_path / "runs"))
    with open(Path(r.run_dir) / "splits.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert Counter((row["split"], row["label"]) for row in rows) == {
        ("train", "red"): 10, ("train", "green"): 10, ("valid", "red"): 4, ("valid", "green"): 4,
        ("test", "red"): 3, ("test", "green"): 3}
    assert all(Path(row["path"]).is_file() for row in rows)
    # an image's file holds the colour of its label (rows and labels stay together)
    from PIL import Image

    for row in rows[:6]:
        r_, g_, _ = Image.open(row["path"]).convert("RGB").resize((1, 1)).getpixel((0, 0))
        assert (r_ > g_) == (row["label"] == "red")
    # a second read reuses the written files
    before = {row["path"]: Path(row["path"]).stat().st_mtime_ns for row in rows}
    again = load_items(DataConfig(path=str(saved)))
    assert {it.path: Path(it.path).stat().st_mtime_ns for it in again.items} == before
    # shard reads it too, with the same splits
    assert main(["shard", str(saved), "--output", str(tmp_path / "shards")]) == 0
    import json

    described = json.loads((tmp_path / "shards" / "dataset.json").read_text())
    assert {s: p["samples"] for s, p in described["splits"].items()} == {"train": 20, "valid": 8, "test": 6}


def test_the_label_shape_comes_from_the_column_type_and_odd_rows_are_listed(tmp_path: Path) -> None:
    paths = _images(tmp_path / "img", 6, "red", 0) + _images(tmp_path / "img", 6, "green", 50)
    tags = datasets.Sequence(datasets.ClassLabel(names=["round", "shiny", "small"]))
    features = datasets.Features({"image": datasets.Image(), "tags": tags, "size": datasets.Value("float32"),
                                  "kind": datasets.ClassLabel(names=["a", "b"])})
    data = {"image": paths, "tags": [[0, 1], [], [2]] * 4, "size": [float(i) for i in range(12)],
            "kind": [0, 1, -1] * 4}
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict(data, features=features),
                               "unsupervised": datasets.Dataset.from_dict(data, features=features)})
    dd.save_to_disk(str(tmp_path / "multi"))

    single = load_items(DataConfig(path=str(tmp_path / "multi")))  # the first ClassLabel: kind; -1 has no label
    assert single.task == "single-label" and single.classes == ["a", "b"] and len(single.items) == 8
    assert sum("no label in 'kind'" in why for _, why in single.excluded) == 4
    assert any("'unsupervised'" in where and "not train, validation or test" in why
               for where, why in single.excluded)
    multi = load_items(DataConfig(path=str(tmp_path / "multi"), label_col="tags"))
    assert multi.task == "multi-label" and multi.classes == ["round", "shiny", "small"]
    assert sorted({it.label for it in multi.items}) == [(), ("round", "shiny"), ("small",)]
    numbers = load_items(DataConfig(path=str(tmp_path / "multi"), label_col="size", valid_pct=0.25))
    assert numbers.task == "regression" and sorted(it.label for it in numbers.items) == [float(i) for i in range(12)]
    with pytest.raises(vt.DataError, match=r"--image-col 'picture' is not a column.*columns: image, tags"):
        load_items(DataConfig(path=str(tmp_path / "multi"), image_col="picture"))


def test_hf_name_without_the_hub_fails_fast_and_says_how_to_work_offline(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: the Hub is unreachable
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    started = time.perf_counter()
    with pytest.raises(vt.DataError, match=r"(?s)hf:visiontune-no-such-set: the Hugging Face Hub .* cannot be "
                                           r"reached .*not in the local cache.*save_to_disk"):
        load_items(DataConfig(path="hf:visiontune-no-such-set"))
    assert time.perf_counter() - started < 15
    assert main(["train", "hf:visiontune-no-such-set", "--epochs", "1"]) == 2
