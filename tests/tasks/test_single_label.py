"""The single-label task by itself: encode / decode, metrics against scikit-learn, the loss on
known values, the data side (settle, classes, folds) and the output rows."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score

from visiontune.errors import ConfigError, DataError
from visiontune.tasks.catalog import make_task
from visiontune.tasks.single_label import SingleLabel


def test_encode_decode_round_trip() -> None:
    task = SingleLabel(["ant", "bee", "wasp"])
    assert task.encode(["wasp", "ant"]).tolist() == [2, 0]
    decoded = task.decode(np.array([[0.1, 0.7, 0.2]]), top_k=2)[0]
    assert decoded.labels == ["bee"] and decoded.ranked == [("bee", 0.7), ("wasp", 0.2)]
    assert decoded.scores == {"ant": 0.1, "bee": 0.7, "wasp": 0.2}
    again = make_task("single-label", task.classes, task.metadata())
    assert isinstance(again, SingleLabel) and again.classes == task.classes


def test_metrics_match_scikit_learn_over_the_classes_present() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 60)  # class 3 of 4 never occurs: macro-F1 averages the 3 present
    probs = rng.dirichlet(np.ones(4), 60)
    m = SingleLabel(list("abcd")).metrics(y, probs)
    pred = probs.argmax(1)
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["macro_f1"] == pytest.approx(f1_score(y, pred, labels=[0, 1, 2], average="macro"))
    assert m["error_rate"] == pytest.approx(1 - m["accuracy"])


def test_the_monitor_direction_and_a_metric_the_task_lacks() -> None:
    """--monitor's direction comes from the task; a metric it lacks is a ConfigError (raised
    before training) that names the metrics it has."""
    task = SingleLabel(["green", "red"])
    assert [task.objective(m).mode for m in ("macro_f1", "accuracy", "val_loss")] == ["max", "max", "min"]
    with pytest.raises(ConfigError, match=r"--monitor 'auc' is not a metric of the single-label task; "
                                          r"available: .*accuracy.*macro_f1"):
        task.objective("auc")


def test_loss_on_known_values_with_class_weights() -> None:
    task = SingleLabel(["a", "b"])
    logits, y = torch.tensor([[0.0, 0.0], [2.0, 0.0]]), torch.tensor([0, 1])
    plain = float(task.loss()(logits, y))
    assert plain == pytest.approx((math.log(2) + math.log(1 + math.exp(2))) / 2, rel=1e-6)
    weights = torch.tensor(task.balance_weights(["a", "a", "a", "b"]))  # N / (C n_c): 4/6 and 2
    assert weights.tolist() == pytest.approx([4 / 6, 2.0])
    weighted = float(task.loss(weights)(logits, y))
    assert weighted == pytest.approx((4 / 6 * math.log(2) + 2 * math.log(1 + math.exp(2))) / (4 / 6 + 2), rel=1e-6)


def test_settle_refuses_a_label_set_and_classes_need_training_images() -> None:
    with pytest.raises(DataError, match="use --task multi-label"):
        SingleLabel.settle(["a", ("a", "b")], ["x.png", "y.png"], " ")
    assert SingleLabel.settle([True, "b"], ["x", "y"], " ") == ["True", "b"]
    with pytest.raises(DataError, match="single class"):
        SingleLabel.classes_of(["a", "a"], ["a", "a"], "root")
    with pytest.raises(DataError, match=r"classes \['c'\] appear in valid/test"):
        SingleLabel.classes_of(["a", "b"], ["a", "b", "c"], "root")


def test_fold_count_shrinks_to_the_smallest_class() -> None:
    assert SingleLabel.fold_count(["a"] * 10 + ["b"] * 3, 5) == 3
    with pytest.raises(DataError, match="have a single image"):
        SingleLabel.fold_count(["a"] * 10 + ["b"], 5)


def test_output_rows() -> None:
    task = SingleLabel(["ant", "bee"])
    d = task.decode(np.array([[0.25, 0.75]]), 2)[0]
    assert task.output.csv_header(2) == ["path", "label", "prob", "label2", "prob2"]
    assert task.output.csv_row("x.png", d, " ", 2) == ["x.png", "bee", "0.750000", "ant", "0.250000"]
    assert task.output.record(d) == {"labels": ["bee"], "predictions": [{"label": "bee", "prob": 0.75},
                                                                 {"label": "ant", "prob": 0.25}]}
    assert task.output.line("x.png", d) == "x.png\tbee\t0.7500\t(ant 0.250)"
    assert task.output.oof_cells(np.array([0.25, 0.75]), " ") == ["bee", "0.250000", "0.750000"]
