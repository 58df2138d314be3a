"""How predictions are written (tasks/output.py): one companion per output shape, reached
as `task.output`."""

from __future__ import annotations

import numpy as np

from visiontune.tasks.catalog import make_task
from visiontune.tasks.conformal import SetPrediction
from visiontune.tasks.output import Decoded, LabelSetOutput, NumberOutput, Output


def test_each_shape_has_its_output_companion() -> None:
    assert type(make_task("single-label", ["a", "b"]).output) is Output
    assert type(make_task("multi-label", ["a", "b"]).output) is LabelSetOutput
    assert type(make_task("regression", ["age"]).output) is NumberOutput


def test_label_sets_are_written_with_every_probability() -> None:
    task = make_task("multi-label", ["cat", "dog"])
    chosen, none = task.decode(np.array([[0.9, 0.7], [0.2, 0.1]]), 2)
    out = task.output
    assert out.line("x.png", chosen) == "x.png\tcat 0.900, dog 0.700"
    assert out.line("y.png", none) == "y.png\t(none)\t(top: cat 0.200, dog 0.100)"
    assert out.csv_header(2) == ["path", "labels", "prob_cat", "prob_dog"]
    assert out.csv_row("x.png", chosen, ";", 2) == ["x.png", "cat;dog", "0.900000", "0.700000"]
    assert out.record(none)["probs"] == {"cat": 0.2, "dog": 0.1} and out.record(none)["labels"] == []
    assert out.oof_columns() == ["prob_cat", "prob_dog"]
    assert out.oof_cells(np.array([0.9, 0.1]), " ") == ["cat", "0.900000", "0.100000"]


def test_the_printed_coverage_is_the_one_asked() -> None:
    """--coverage 0.999 printed "100% set" (and 0.925 "92% set"): a certainty it does not give."""
    task = make_task("single-label", ["a", "b"])
    for coverage, shown in [(0.9, "\t90% set: a or b"), (0.999, "\t99.9% set: a or b"), (0.925, "\t92.5% set: a or b")]:
        decoded = Decoded(["a"], [0.6], [("a", 0.6), ("b", 0.4)], prediction_set=SetPrediction(["a", "b"],
                                                                                               coverage=coverage))
        assert task.output.line("x.png", decoded).endswith(shown)


def test_an_unknown_image_names_the_class_its_probability_is_of() -> None:
    """An image past the OOD threshold printed "unknown<TAB>0.9990<TAB>(dogs 0.001)": the 0.999
    read as sure it is unknown, and the class it belongs to was named nowhere. It is printed as
    label sets print theirs: unknown, then (top: every class and its probability)."""
    task = make_task("single-label", ["cats", "dogs"])
    decoded = Decoded(["cats"], [0.999], [("cats", 0.999), ("dogs", 0.001)], ood_score=2.5, unknown=True)
    assert task.output.line("p.jpg", decoded) == ("p.jpg\tunknown\t(top: cats 0.999, dogs 0.001)"
                                                  "\t(unlike the training images: score 2.5)")


def test_an_unknown_image_keeps_its_top_class_in_the_line_and_the_csv() -> None:
    """An image past the OOD threshold was written "unknown 0.3574 (red 0.337, green 0.305)":
    the probability of a class the line did not name (blue), and in the CSV label=unknown
    beside that probability, so the prediction was lost (with --top-k 1, entirely)."""
    task = make_task("single-label", ["blue", "green", "red"])
    decoded, top_1 = (task.decode(np.array([[0.3574, 0.3054, 0.3372]]), k)[0] for k in (3, 1))
    for d in (decoded, top_1):
        d.ood_score, d.unknown = 1.75, True
    assert task.output.line("x.png", decoded) == ("x.png\tunknown\t(top: blue 0.357, red 0.337, green 0.305)"
                                                  "\t(unlike the training images: score 1.75)")
    header, row = task.output.csv_header(1, ood=True), task.output.csv_row("x.png", top_1, " ", 1)
    assert dict(zip(header, row)) == {"path": "x.png", "label": "blue", "prob": "0.357400", "unknown": "true",
                                      "ood_score": "1.75"}
    assert task.output.record(decoded)["labels"] == ["blue"]  # as the JSON record had it
