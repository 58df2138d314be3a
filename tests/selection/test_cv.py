"""Folds, out-of-fold probabilities, imbalance handling and the strategy comparison."""

from __future__ import annotations

import csv
import logging
from collections import Counter
from pathlib import Path

import pytest
import torch

import visiontune as vt
from conftest import make_class_folders
from visiontune.config import DataConfig, RunConfig
from visiontune.data.items import TRAIN
from visiontune.data.sources import load_items
from visiontune.data.splits import fold_count
from visiontune.models.classifier import create_classifier
from visiontune.selection.compare import compare
from visiontune.selection.cv import cross_validate
from visiontune.tasks.catalog import make_task
from visiontune.tasks.single_label import class_weight_values
from visiontune.train.plan import make_plan
from visiontune.train.rundata import RunData
from visiontune.train.session import resolve_monitor


def _cv(root: Path, tmp_path: Path, tiny: dict, folds: int, selection: str = "inner", **options):
    """cross_validate and the rows of its oof.csv."""
    result = cross_validate(root, folds=folds, selection=selection,
                            **dict(tiny, **options, output=str(tmp_path / "cv")))
    with open(result.oof_path) as fh:
        return result, list(csv.DictReader(fh))


def test_folds_are_disjoint_cover_everything_and_are_stratified(tmp_path: Path, tiny: dict) -> None:
    root = make_class_folders(tmp_path / "d", {"red": 10, "green": 5})
    result, rows = _cv(root, tmp_path, tiny, 5, strategy="feature-extract", epochs=2, lr=1e-2)
    assert sorted(r["path"] for r in rows) == sorted(str(p) for p in root.rglob("*.png"))  # each image once
    per_fold = Counter((r["fold"], r["label"]) for r in rows)
    assert all(per_fold[(str(f), "red")] == 2 and per_fold[(str(f), "green")] == 1 for f in range(1, 6))
    assert all(abs(float(r["prob_green"]) + float(r["prob_red"]) - 1) < 1e-4 for r in rows)
    assert len(result.folds) == 5 and set(result.mean) == {"accuracy", "macro_f1", "loss"}
    assert "mean +- std" in result.format() and "scored untouched" in result.format()


@pytest.mark.parametrize("selection", ["inner", "last"])
def test_the_held_out_fold_never_reaches_training_or_selection(tmp_path: Path, tiny: dict, selection: str) -> None:
    """Each fold's run trains (and, with 'inner', chooses its epoch) on the fold's training
    part only; the held-out fold is scored afterwards, as its test split."""
    root = make_class_folders(tmp_path / "d", {"red": 10, "green": 10})
    result, oof = _cv(root, tmp_path, tiny, 4, selection, strategy="finetune", epochs=2, patience=1)
    for fold in range(1, 5):
        held = {r["path"] for r in oof if r["fold"] == str(fold)}
        with open(Path(result.out_dir) / f"fold{fold}" / "splits.csv") as fh:
            run = list(csv.DictReader(fh))
        used = {r["split"]: {x["path"] for x in run if x["split"] == r["split"]} for r in run}
        assert used["test"] == held
        assert not held & (used.get("train", set()) | used.get("valid", set()))
        assert ("valid" in used) == (selection == "inner")  # inner: an inner split chooses the epoch


def test_cv_metrics_are_the_held_out_folds_own(tmp_path: Path, tiny: dict) -> None:
    """The reported fold accuracy is the accuracy of oof.csv's predictions on that fold."""
    root = make_class_folders(tmp_path / "d", {"red": 8, "green": 8})
    result, oof = _cv(root, tmp_path, tiny, 4, strategy="feature-extract", epochs=3, lr=3e-2)
    for fold, row in enumerate(result.folds, start=1):
        mine = [r for r in oof if r["fold"] == str(fold)]
        assert row["accuracy"] == pytest.approx(sum(r["predicted"] == r["label"] for r in mine) / len(mine))
    assert result.mean["accuracy"] == pytest.approx(sum(f["accuracy"] for f in result.folds) / 4)


def test_small_classes_reduce_the_fold_count(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    assert fold_count(["a"] * 10 + ["b"] * 3, 5) == 3
    assert "fewer images than 5 folds" in caplog.text
    with pytest.raises(vt.DataError, match=r"classes \['c'\] have a single image"):  # only those with one
        fold_count(["a"] * 10 + ["b"] * 2 + ["c"], 5)


def test_class_weight_values() -> None:
    assert class_weight_values([10, 30]) == pytest.approx([2.0, 2 / 3])
    assert class_weight_values([5, 5, 5]) == pytest.approx([1.0, 1.0, 1.0])


def _rundata(root: Path, balance: str) -> RunData:
    cfg = RunConfig.create(None, path=str(root), backbone="timm:test_efficientnet", weights="none", image_size=32,
                           balance=balance, batch_size=10, num_workers=0, valid_pct=0.2)
    source = load_items(cfg.data)
    model, pre = create_classifier(cfg.model, 2)
    return RunData(cfg, source, make_task("single-label", source.classes), model, pre,
                   make_plan(model, cfg.strategy, cfg.train), torch.device("cpu"), torch.Generator().manual_seed(0))


def test_oversampling_draws_classes_equally(tmp_path: Path) -> None:
    root = make_class_folders(tmp_path / "d", {"red": 25, "green": 5})
    data = _rundata(root, "oversample")
    assert data.source.class_counts(TRAIN) == {"green": 4, "red": 20}
    drawn = Counter(int(y) for _ in range(20) for _, ys, _ in data.features().train for y in ys)
    share = drawn[0] / sum(drawn.values())  # class 0 = green, 1/6 of the train images
    assert 0.42 < share < 0.58
    assert _rundata(root, "weights").class_weights().tolist() == pytest.approx([3.0, 0.6])


def test_imbalance_switches_the_monitor_to_macro_f1(tmp_path: Path) -> None:
    balanced = load_items(DataConfig(path=str(make_class_folders(tmp_path / "b", {"red": 6, "green": 6}))))
    skewed = load_items(DataConfig(path=str(make_class_folders(tmp_path / "s", {"red": 20, "green": 5}))))
    assert resolve_monitor("auto", balanced) == "val_loss"
    assert skewed.imbalance_ratio() == pytest.approx(4.0)
    assert resolve_monitor("auto", skewed) == "macro_f1"
    assert resolve_monitor("val_loss", skewed) == "val_loss"
    assert "imbalance" in skewed.summary()


def test_compare_runs_each_strategy_on_the_same_split(flat_data: Path, tmp_path: Path, tiny: dict) -> None:
    rows, out = compare(flat_data, strategies=("feature-extract", "finetune", "scratch"),
                        **dict(tiny, epochs=2, output=str(tmp_path / "cmp")))
    assert [r.strategy for r in rows] == ["feature-extract", "finetune", "scratch"]
    assert rows[0].trainable_params < rows[1].trainable_params == rows[2].trainable_params
    splits = {p.parent.name: p.read_text() for p in Path(out).glob("*/splits.csv")}
    assert len(splits) == 3 and len(set(splits.values())) == 1  # same split for all
    table = (Path(out) / "compare.md").read_text()
    assert table.count("|") > 20 and "inner split of train; metrics on valid" in table


def test_compare_reports_the_test_split_that_selection_never_saw(split_data: Path, tmp_path: Path,
                                                                 tiny: dict) -> None:
    """With a test/ folder, epochs are chosen on valid and the row holds the test metrics:
    exactly what `evaluate` finds for the saved model on test/."""
    rows, out = compare(split_data, strategies=("feature-extract", "finetune"),
                        **dict(tiny, epochs=3, patience=1, lr=3e-2, output=str(tmp_path / "cmp")))
    for row in rows:
        scored = vt.evaluate(Path(out) / row.strategy, split_data / "test")
        assert row.accuracy == pytest.approx(scored.metrics["accuracy"])
        assert row.loss == pytest.approx(scored.metrics["loss"], rel=1e-4)
        assert row.protocol.startswith("epochs chosen on valid; metrics on test")


def test_compare_with_folds_reports_mean_and_std(flat_data: Path, tmp_path: Path, tiny: dict) -> None:
    from visiontune.selection.compare import format_compare

    rows, _ = compare(flat_data, strategies=("feature-extract",), folds=3,
                      **dict(tiny, epochs=10, lr=0.1, output=str(tmp_path / "cmp")))
    assert rows[0].accuracy_std is not None and rows[0].accuracy >= 0.8  # red vs green on frozen features
    assert "+-" in format_compare(rows) and "3-fold CV" in format_compare(rows)


def test_a_class_too_small_for_an_inner_split_is_refused_before_any_fold_trains(tmp_path: Path, tiny: dict) -> None:
    """2 images of a class allow 2 folds, but each fold's training part then holds one of
    them, which an inner validation split cannot divide: said up front, with the way out."""
    data = make_class_folders(tmp_path / "d", {"red": 8, "green": 2})
    with pytest.raises(vt.DataError, match="--selection last"):
        vt.cross_validate(data, folds=5, **dict(tiny, strategy="feature-extract", output=str(tmp_path / "cv")))
    assert not (tmp_path / "cv").exists() or not list((tmp_path / "cv").rglob("model.safetensors"))
    result = vt.cross_validate(data, folds=5, selection="last",
                               **dict(tiny, strategy="feature-extract", output=str(tmp_path / "cv")))
    assert result.num_folds == 2
