"""Class averages are taken over the classes a split holds: a class absent from the truth
has no F1 to measure, so scoring it 0 would deflate every split that lacks a rare class."""

from __future__ import annotations

import numpy as np
import pytest

from visiontune.data.items import DataSource, Item
from visiontune.selection.cv import common_labels
from visiontune.tasks.catalog import make_task


def test_single_label_macro_f1_averages_the_classes_present_and_the_report_says_which_were_not() -> None:
    task = make_task("single-label", ["ant", "bee", "wasp"])
    targets = np.array([0, 0, 1, 1])
    probs = np.eye(3)[targets] * 0.8 + 0.05  # every image right
    assert task.metrics(targets, probs)["macro_f1"] == pytest.approx(1.0)
    assert task.metrics(targets, probs, labels=[0, 1, 2])["macro_f1"] == pytest.approx(2 / 3)  # asked for all
    assert "2 of 3 labels present here; 1 absent (wasp) left out" in task.report(targets, probs).text


def test_a_class_predicted_but_absent_still_costs_the_classes_it_took_images_from() -> None:
    task = make_task("single-label", ["ant", "bee", "wasp"])
    targets, predicted = np.array([0, 0, 1, 1]), np.array([0, 2, 1, 1])
    f1 = task.metrics(targets, np.eye(3)[predicted])["macro_f1"]
    assert f1 == pytest.approx((2 / 3 + 1.0) / 2)  # ant's recall fell; wasp (absent) is not averaged


def test_multi_label_map_and_macro_f1_leave_out_labels_absent_from_the_split() -> None:
    task = make_task("multi-label", ["a", "b", "c"])
    targets = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 0]], dtype=float)
    probs = np.clip(targets * 0.9 + 0.05, 0, 1)  # right everywhere, c never present nor predicted
    metrics = task.metrics(targets, probs)
    assert metrics["mAP"] == pytest.approx(1.0) and metrics["macro_f1"] == pytest.approx(1.0)
    assert "1 absent (c) left out" in task.report(targets, probs).text


def test_cv_averages_every_fold_over_the_labels_present_in_all_folds() -> None:
    items = [Item(f"{i}.png", label, "train") for i, label in enumerate(["a"] * 6 + ["b"] * 6 + ["c"] * 2)]
    source = DataSource("root", ["a", "b", "c"], items)
    folds = [np.array([0, 1, 2, 6, 7, 8, 12]), np.array([3, 4, 5, 9, 10, 11]), np.array([13])]
    assert common_labels(items, folds, source) == []  # fold 3 holds c only
    folds = [np.array([0, 1, 2, 6, 7, 8, 12]), np.array([3, 4, 5, 9, 10, 11, 13])]
    assert common_labels(items, folds, source) == [0, 1, 2]
    folds = [np.array([0, 1, 2, 6, 7, 8, 12, 13]), np.array([3, 4, 5, 9, 10, 11])]
    assert common_labels(items, folds, source) == [0, 1]
