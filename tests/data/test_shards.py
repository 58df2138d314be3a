"""WebDataset shards: every sample keeps its own identity however the shards are listed and
read (workers, processes), the index names every shard written, and a folder whose index
disagrees with its files is refused."""

from __future__ import annotations

import io
import json
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

import visiontune as vt
from conftest import COLORS, by_path, make_class_folders, original_paths
from visiontune.config import DataConfig
from visiontune.data.sources import load_items
from visiontune.data.webdata import write_shards
from visiontune.errors import DataError


@pytest.fixture
def three_class_shards(tmp_path: Path) -> tuple[Path, Path]:
    """Folders of three colours (train / valid / test) and the same as shards of 3 samples."""
    data = tmp_path / "d"
    make_class_folders(data / "train", {"red": 6, "green": 6, "blue": 6}, 0)
    make_class_folders(data / "valid", {"red": 3, "green": 3, "blue": 3}, 100)
    make_class_folders(data / "test", {"red": 4, "green": 4, "blue": 4}, 200)
    shards = tmp_path / "shards"
    write_shards(load_items(DataConfig(path=str(data))), shards, size=3)
    return data, shards


def test_predictions_from_shards_in_any_order_with_two_workers_name_their_own_files(
        three_class_shards: tuple[Path, Path], tmp_path: Path, tiny: dict) -> None:
    data, shards = three_class_shards
    run = vt.fit(data, **dict(tiny, strategy="finetune", epochs=1, output=str(tmp_path / "runs"))).run_dir
    tars = sorted(shards.glob("test-*.tar"))
    assert len(tars) == 4
    listed = [str(tars[i]) for i in (2, 0, 3, 1)]  # not in sorted order
    from_shards, skipped = vt.predict(run, listed, num_workers=2, batch_size=2)
    from_files, _ = vt.predict(run, data / "test")
    assert skipped == [] and len(from_shards) == 12 == len({p.path for p in from_shards})
    origin, files = original_paths(tars), by_path(from_files)
    for path, probs in by_path(from_shards).items():
        assert np.allclose(probs, files[origin[path]], atol=1e-5), path


def test_two_shards_that_reuse_keys_keep_their_own_labels_and_predictions(tmp_path: Path, tiny: dict) -> None:
    """External shards often restart keys at 000000: a sample is its shard and its key."""
    folder = make_class_folders(tmp_path / "d", {"red": 8, "green": 8})
    run = vt.fit(folder, **dict(tiny, strategy="finetune", epochs=2, lr=3e-3, output=str(tmp_path / "runs"))).run_dir
    for name in ("red", "green"):
        with wds.TarWriter(str(tmp_path / f"{name}.tar")) as sink:
            for i, png in enumerate(sorted((folder / name).glob("*.png"))):
                sink.write({"__key__": f"{i:06d}", "png": png.read_bytes(), "txt": name.encode()})
    preds, _ = vt.predict(run, [str(tmp_path / "red.tar"), str(tmp_path / "green.tar")], num_workers=2)
    files = by_path(vt.predict(run, folder)[0])
    assert len(preds) == 16 == len({p.path for p in preds})
    for path, probs in by_path(preds).items():
        name, key = path.split(".tar#")[0].rsplit("/", 1)[1], int(path.split("#")[1])
        assert np.allclose(probs, files[str(folder / name / f"{name}_{key:03d}.png")], atol=1e-5), path
    source = load_items(DataConfig(path=str(tmp_path / "{red,green}.tar")))
    assert sorted((it.path.split(".tar#")[0].rsplit("/", 1)[1], it.label) for it in source.items) == \
        [("green", "green")] * 8 + [("red", "red")] * 8


def test_held_out_scores_follow_the_items_whatever_order_the_shards_are_read_in(
        three_class_shards: tuple[Path, Path], tmp_path: Path, tiny: dict) -> None:
    """What cv's out-of-fold rows and compare's test scores stand on: score_items returns
    rows in the order of the items it was given."""
    from visiontune.train.session import score_items

    data, shards = three_class_shards
    result = vt.fit(shards, **dict(tiny, strategy="finetune", epochs=1, num_workers=2,
                                   output=str(tmp_path / "runs")))
    assert result.data is not None
    items = result.data.split("test")[::-1]  # an order no stream reads in
    _, out = score_items(result, items)
    from_files, _ = vt.predict(result.run_dir, [original_paths([Path(it.path.split("#")[0])])[it.path]
                                                for it in items])
    expected = np.array([[p.probs[c] for c in result.classes] for p in from_files])
    assert np.allclose(out.probs, expected, atol=1e-5)


def test_cv_out_of_fold_rows_agree_with_their_files(three_class_shards: tuple[Path, Path], tmp_path: Path,
                                                     tiny: dict) -> None:
    """Each out-of-fold row holds what its fold's model says about that row's own file."""
    import csv

    from visiontune.selection.cv import cross_validate

    _, shards = three_class_shards
    result = cross_validate(shards, folds=3, selection="last",
                            **dict(tiny, strategy="finetune", epochs=1, num_workers=2, output=str(tmp_path / "cv")))
    rows = list(csv.DictReader(open(result.oof_path)))
    origin = original_paths(sorted(shards.glob("*.tar")))
    for fold in (1, 2, 3):
        mine = [r for r in rows if r["fold"] == str(fold)]
        preds, _ = vt.predict(Path(result.out_dir) / f"fold{fold}", [origin[r["path"]] for r in mine])
        for row, pred in zip(mine, preds):
            assert [float(row[f"prob_{c}"]) for c in result.classes] == \
                pytest.approx([pred.probs[c] for c in result.classes], abs=1e-5), row["path"]


def test_the_index_names_every_shard_the_writer_started_by_size(tmp_path: Path) -> None:
    """webdataset's ShardWriter also starts a new tar at `maxsize` bytes: the index must name
    the shards that were written, not `n // size`."""
    data = make_class_folders(tmp_path / "d", {"red": 6, "green": 6})
    source = load_items(DataConfig(path=str(data), valid_pct=0.0))
    one = (data / "red" / "red_000.png").stat().st_size
    described = write_shards(source, tmp_path / "s", size=1000, max_bytes=3 * one)
    on_disk = sorted(p.name for p in (tmp_path / "s").glob("train-*.tar"))
    assert len(on_disk) >= 4 and described["splits"]["train"]["shards"] == on_disk
    assert len(load_items(DataConfig(path=str(tmp_path / "s"), valid_pct=0.0)).items) == 12


def test_a_shard_folder_whose_index_disagrees_with_its_files_is_refused(tmp_path: Path) -> None:
    data = make_class_folders(tmp_path / "d", {"red": 4, "green": 4})
    write_shards(load_items(DataConfig(path=str(data), valid_pct=0.0)), tmp_path / "s", size=3)
    extra = tmp_path / "s" / "train-000009.tar"
    extra.write_bytes((tmp_path / "s" / "train-000000.tar").read_bytes())
    with pytest.raises(DataError, match="does not list"):
        load_items(DataConfig(path=str(tmp_path / "s")))
    extra.unlink()
    (tmp_path / "s" / "train-000001.tar").unlink()
    with pytest.raises(DataError, match="missing"):
        load_items(DataConfig(path=str(tmp_path / "s")))


def test_shards_are_not_written_over_old_ones(tmp_path: Path) -> None:
    data = make_class_folders(tmp_path / "d", {"red": 4, "green": 4})
    source = load_items(DataConfig(path=str(data), valid_pct=0.0))
    write_shards(source, tmp_path / "s", size=2)
    before = {p.name: p.read_bytes() for p in (tmp_path / "s").iterdir()}
    with pytest.raises(DataError, match="already holds shards"):
        write_shards(source, tmp_path / "s", size=8)
    assert {p.name: p.read_bytes() for p in (tmp_path / "s").iterdir()} == before


def _tar(path: Path, samples: dict[str, dict[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, members in samples.items():
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_a_json_label_that_is_a_string_is_one_label_in_multi_label_shards(tmp_path: Path) -> None:
    png = io.BytesIO()
    Image.new("RGB", (8, 8), COLORS["red"]).save(png, format="PNG")
    _tar(tmp_path / "a.tar", {"x1": {"png": png.getvalue(), "json": json.dumps({"label": "cat dog"}).encode()},
                              "x2": {"png": png.getvalue(), "json": json.dumps({"label": ["dog"]}).encode()},
                              "x3": {"png": png.getvalue(), "json": json.dumps({"label": "cat"}).encode()}})
    source = load_items(DataConfig(path=str(tmp_path / "a.tar"), task="multi-label", valid_pct=0.0))
    assert sorted(it.label for it in source.items) == [("cat",), ("cat", "dog"), ("dog",)]


def test_label_names_holding_the_delimiter_are_refused_with_a_delimiter_that_works(tmp_path: Path) -> None:
    png = io.BytesIO()
    Image.new("RGB", (8, 8), COLORS["red"]).save(png, format="PNG")
    _tar(tmp_path / "a.tar", {"x1": {"png": png.getvalue(), "json": json.dumps({"label": ["sea lion", "seal"]}).encode()},
                              "x2": {"png": png.getvalue(), "json": json.dumps({"label": ["seal"]}).encode()}})
    with pytest.raises(DataError, match="--label-delim ','"):
        load_items(DataConfig(path=str(tmp_path / "a.tar"), valid_pct=0.0))
    source = load_items(DataConfig(path=str(tmp_path / "a.tar"), valid_pct=0.0, label_delim=","))
    assert sorted(it.label for it in source.items) == [("sea lion", "seal"), ("seal",)]


def test_torchrun_processes_take_whole_shards_when_balanced_else_spread_the_samples() -> None:
    from visiontune.data.items import Item
    from visiontune.data.webdata import ShardStream

    def stream(sizes: list[int], rank: int, epoch: int) -> ShardStream:
        items = [Item(f"s{i}.tar#{k:06d}", "x", "train") for i, n in enumerate(sizes) for k in range(n)]
        s = ShardStream(items, None, lambda im: im, None, shuffle=True, seed=0, rank=rank, world=3)
        s.set_epoch(epoch)
        return s

    balanced = [stream([6, 5, 7, 4, 6, 1, 7], r, 0).assignment() for r in range(3)]
    assert all(a.rows is None and a.length == 12 for a in balanced)
    assert sorted(u for a in balanced for u in a.urls) == sorted(f"s{i}.tar" for i in range(7))
    for epoch in (0, 1):
        few = [stream([18, 18], r, epoch).assignment() for r in range(3)]  # 2 shards, 3 processes
        assert all(a.rows is not None and a.length == 12 and len(a.urls) == 2 for a in few)
        rows = [sorted(a.rows) for a in few]
        assert sorted(r for part in rows for r in part) == list(range(36))  # each sample once per epoch
    assert [sorted(stream([18, 18], 0, e).assignment().rows) for e in (0, 1)][0] != \
        sorted(stream([18, 18], 0, 1).assignment().rows)  # drawn anew each epoch
    lopsided = [stream([30, 3, 3], r, 0).assignment() for r in range(3)]  # whole shards would idle 75%
    assert all(a.rows is not None and a.length == 12 for a in lopsided)


def test_a_run_that_reads_no_training_sample_fails_instead_of_succeeding_with_zero_steps(
        three_class_shards: tuple[Path, Path], tmp_path: Path, tiny: dict) -> None:
    """An index whose keys are not in its tar files: nothing is read. That is an error
    naming the cause, never a finished run with train_loss 0.0."""
    _, shards = three_class_shards
    index = shards / "index.csv"
    lines = index.read_text().splitlines()
    index.write_text("\n".join([lines[0], *("x" + line for line in lines[1:])]) + "\n")
    for strategy in ("finetune", "feature-extract"):
        with pytest.raises(DataError, match="read no training image|yielded no features"):
            vt.fit(shards, **dict(tiny, strategy=strategy, epochs=1, output=str(tmp_path / "runs")))


def test_unlabelled_pool_along_shards_counts_every_pool_image(three_class_shards: tuple[Path, Path],
                                                               tmp_path: Path, tiny: dict,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    """--unlabeled with shard training data (read by 2 workers): the frozen phase spreads
    labels over the pool's features and the fine-tuning phase's consistency term goes
    through the whole pool each epoch."""
    import csv

    _, shards = three_class_shards
    pool = make_class_folders(tmp_path / "pool", {"red": 5, "green": 5, "blue": 5}, 300)
    with caplog.at_level(logging.INFO, logger="visiontune"):
        result = vt.fit(shards, **dict(tiny, strategy="gradual", freeze_epochs=1, epochs=3, num_workers=2,
                                       unlabeled=str(pool), consistency_threshold=0.0, output=str(tmp_path / "runs")))
    assert any("23 of 23 views of the 15 pool images (cycled" in m for m in caplog.messages)
    with open(Path(result.run_dir) / "consistency.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["epoch"] for r in rows] == ["2", "3"]  # the fine-tuning epochs
    # 18 training samples are 3 steps of 8; the 15 pool images are 2 batches (8, 7), so the
    # pool cycles: 8 + 7 + 8 views an epoch, every pool image at least once
    assert all(r["seen"] == r["passed"] == "23" for r in rows), rows
    assert all(sum(int(r[c]) for c in ("red", "green", "blue")) == 23 for r in rows)


def test_a_shard_trained_runs_images_stay_out_of_the_pool_by_their_bytes(three_class_shards: tuple[Path, Path],
                                                                          tmp_path: Path, tiny: dict) -> None:
    """A run trained on shards lists its images as shard samples: a pool file with the same
    bytes as one of them (the index holds each sample's digest) is neither suggested nor
    pseudo-labelled. `suggest` took the samples for missing files and suggested the copy."""
    import csv
    import shutil

    from visiontune.selection.suggest import suggest

    data, shards = three_class_shards
    pool = make_class_folders(tmp_path / "pool", {"red": 4, "green": 4}, 300)
    shutil.copy(data / "valid" / "red" / "red_000.png", pool / "red" / "seen_before.png")
    run = vt.fit(shards, **dict(tiny, strategy="feature-extract", epochs=1, unlabeled=str(pool),
                                output=str(tmp_path / "runs")))
    with open(Path(run.run_dir) / "pseudo_labels.csv", newline="") as fh:
        assert sorted(Path(r["path"]).name for r in csv.DictReader(fh)) == sorted(p.name for p in pool.rglob("*_0*"))
    result = suggest(pool, run=run.run_dir, n=9, method="random")
    assert len(result.rows) == 8 and "seen_before.png" not in {Path(r.path).name for r in result.rows}
    assert (str(pool / "red" / "seen_before.png"), "the same bytes as a labelled image") in result.excluded
