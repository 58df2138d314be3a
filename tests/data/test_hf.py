"""Hugging Face datasets as DATA (data/hf.py): a save_to_disk folder offline, its splits,
the label's shape from the column's type, and hf:NAME failing fast without the Hub."""

from __future__ import annotations

import csv
import json
import os
import time
from collections import Counter
from pathlib import Path

import pytest

import visiontune as vt
from conftest import COLORS, TINY, make_class_folders, make_image
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
    # a train split alone is split by --valid-pct (stratified by target bins): 3 of 12 validate
    assert Counter(it.split for it in numbers.items) == {"train": 9, "valid": 3}
    with pytest.raises(vt.DataError, match=r"--image-col 'picture' is not a column.*columns: image, tags"):
        load_items(DataConfig(path=str(tmp_path / "multi"), image_col="picture"))


def _save(dd: dict[str, datasets.Dataset], out: Path) -> Path:
    datasets.DatasetDict(dd).save_to_disk(str(out))
    return out


def test_a_dataset_dict_without_a_validation_split_has_train_split_by_valid_pct_as_folders_are(
        tmp_path: Path) -> None:
    """train + test (and train alone): --valid-pct of train validates, stratified and seeded,
    the same rule and the same counts as the folder layout train/ + test/."""
    src = tmp_path / "src"
    train, test = _split(src, {"red": 10, "green": 10}, 0), _split(src, {"red": 3, "green": 3}, 200)
    with_test = load_items(DataConfig(path=str(_save({"train": train, "test": test}, tmp_path / "tt")),
                                      valid_pct=0.25))
    counts = Counter((it.split, it.label) for it in with_test.items)
    assert counts == {("train", "red"): 8, ("train", "green"): 7, ("valid", "red"): 2, ("valid", "green"): 3,
                      ("test", "red"): 3, ("test", "green"): 3} or counts == {
        ("train", "red"): 7, ("train", "green"): 8, ("valid", "red"): 3, ("valid", "green"): 2,
        ("test", "red"): 3, ("test", "green"): 3}
    folders = tmp_path / "folders"
    make_class_folders(folders / "train", {"red": 10, "green": 10}, 0)
    make_class_folders(folders / "test", {"red": 3, "green": 3}, 200)
    same = load_items(DataConfig(path=str(folders), valid_pct=0.25))
    assert Counter(it.split for it in same.items) == Counter(it.split for it in with_test.items)
    alone = load_items(DataConfig(path=str(_save({"train": train}, tmp_path / "t")), valid_pct=0.5))
    assert Counter((it.split, it.label) for it in alone.items) == {
        ("train", "red"): 5, ("train", "green"): 5, ("valid", "red"): 5, ("valid", "green"): 5}
    # --valid-pct 0 asks for no validation: none is made
    assert {it.split for it in load_items(DataConfig(path=str(tmp_path / "t"), valid_pct=0)).items} == {"train"}
    # and a run trained on it monitors validation (its splits.csv holds valid rows)
    r = vt.fit(tmp_path / "tt", **dict(TINY, strategy="feature-extract", epochs=1), output=str(tmp_path / "runs"))
    with open(Path(r.run_dir) / "splits.csv", newline="") as fh:
        assert Counter(row["split"] for row in csv.DictReader(fh)) == {"train": 16, "valid": 4, "test": 6}


def test_a_test_split_without_the_label_column_is_listed_and_columns_are_looked_for_in_every_split(
        tmp_path: Path) -> None:
    """The label column is found whichever split comes first; a split that lacks it (a
    test split without labels, as many Hub sets have) is left out and listed."""
    src = tmp_path / "src"
    train = _split(src, {"red": 6, "green": 6}, 0)
    unlabelled = datasets.Dataset.from_dict({"img": _images(src, 4, "red", 300)},
                                            features=datasets.Features({"img": datasets.Image()}))
    saved = _save({"test": unlabelled, "train": train}, tmp_path / "saved")  # test first, as some sets are
    source = load_items(DataConfig(path=str(saved)))
    assert source.classes == ["green", "red"] and len(source.items) == 12
    assert Counter(it.split for it in source.items) == {"train": 10, "valid": 2}
    assert any("'test'" in where and "4 rows" in why and "no 'label' column" in why
               for where, why in source.excluded)
    named = load_items(DataConfig(path=str(saved), label_col="label", image_col="img"))
    assert len(named.items) == 12
    train_first = load_items(DataConfig(path=str(_save({"train": train, "test": unlabelled}, tmp_path / "tf"))))
    assert len(train_first.items) == 12 and any("'test'" in where for where, _ in train_first.excluded)
    assert main(["train", str(saved), "--backbone", "timm:test_efficientnet", "--weights", "none", "--image-size",
                 "32", "--strategy", "feature-extract", "--epochs", "1", "--output", str(tmp_path / "runs")]) == 0


def test_a_training_split_without_the_columns_is_an_error_that_names_it(tmp_path: Path) -> None:
    """Audit of issue 34: a train split without the label column (the validation split
    has it), or an --image-col that only the test split has, was left out silently and
    the run failed with "found a single class []"."""
    src = tmp_path / "src"
    valid = _split(src, {"red": 3, "green": 3}, 100)
    bare = datasets.Dataset.from_dict({"img": _images(src, 6, "red", 0)},
                                      features=datasets.Features({"img": datasets.Image()}))
    saved = _save({"train": bare, "validation": valid}, tmp_path / "saved")
    with pytest.raises(vt.DataError, match=r"the training split 'train' \(6 rows\) has no 'label' column"):
        load_items(DataConfig(path=str(saved), label_col="label", image_col="img"))


_WRITER = """
import json, sys, time
from pathlib import Path
from visiontune.config import DataConfig
from visiontune.data.hf import hf_source
saved, cache, rank, world, rounds = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
try:
    for r in range(rounds):  # each round: wait for every process, then all read into one new cache folder
        (cache / f"ready{r}.{rank}").touch()
        while len(list(cache.glob(f"ready{r}.*"))) < world:
            if (cache / "failed").exists():
                sys.exit(3)
            time.sleep(0.0005)
        source = hf_source(DataConfig(path=saved), str(cache / str(r)))
        (cache / f"items{r}.{rank}.json").write_text(json.dumps(sorted((it.path, it.label) for it in source.items)))
except BaseException:
    (cache / "failed").touch()  # the others stop waiting for this one
    raise
"""


def test_processes_writing_one_datasets_images_at_once_each_get_every_image_whole(tmp_path: Path) -> None:
    """torchrun's ranks all read the dataset at once: each writes the images into the one
    cache folder (no rank may find its file taken by another), and each sees them all.
    Four processes, six rounds that start together (a race at the first rows: one file
    name for every process made a rank fail in each of 4 tries of this test)."""
    import io
    import subprocess
    import sys

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    blobs = []
    for _ in range(80):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(buf, format="PNG")
        blobs.append(buf.getvalue())
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    part = datasets.Dataset.from_dict({"img": [{"bytes": b, "path": None} for b in blobs],
                                       "label": [i % 2 for i in range(80)]}, features=features)
    saved = _save({"train": part}, tmp_path / "saved")
    cache, world, rounds = tmp_path / "cache", 4, 6
    cache.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(vt.__file__).parents[1]),
                                                       os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(saved), str(cache), str(k), str(world),
                               str(rounds)], env=env, stderr=subprocess.PIPE, text=True) for k in range(world)]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * world, "\n".join(errors)
    for r in range(rounds):
        seen = [json.loads((cache / f"items{r}.{k}.json").read_text()) for k in range(world)]
        assert all(s == seen[0] for s in seen) and len(seen[0]) == 80
        by_row = {int(Path(path).stem): Path(path) for path, _ in seen[0]}
        assert all(by_row[i].read_bytes() == blobs[i] for i in range(80))
        assert not [f for f in by_row[0].parent.iterdir() if f.name.endswith(".tmp")]  # no temporary file left


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
