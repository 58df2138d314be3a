"""tasks/form.py: how a person gives a label (review pages, a suggestions CSV), one form
per label shape, reached from a task or its class; and tasks/wording.py's summary lines."""

from __future__ import annotations

import pytest

from visiontune.errors import DataError
from visiontune.tasks.form import Form, LabelSetForm, NumberForm
from visiontune.tasks.multi_label import MultiLabel
from visiontune.tasks.regression import Regression
from visiontune.tasks.single_label import SingleLabel


def test_each_shape_has_its_form_from_the_class_and_from_a_task() -> None:
    for cls, form, entry, column in ((SingleLabel, Form, "choose", "label"),
                                     (MultiLabel, LabelSetForm, "toggle", "labels"),
                                     (Regression, NumberForm, "type", "value")):
        assert type(cls.form) is form and cls.form.task is cls
        assert type(cls(["a", "b"]).form) is form
        assert cls.form.label_entry == entry and cls.form.label_column == column
        assert cls.form.label_column in cls.form.label_columns or cls is SingleLabel


def test_answers_read_back_as_written_and_an_empty_cell_is_unanswered() -> None:
    assert MultiLabel.form.answer_text(()) == "(none)"  # an empty cell would read as not answered
    assert MultiLabel.form.parse_answer("(none)", " ", "x") == ()
    assert MultiLabel.form.parse_answer("  ", " ", "x") is None
    assert SingleLabel.form.parse_answer("cat", " ", "x") == "cat"
    assert Regression.form.parse_answer(Regression.form.answer_text(2.5), " ", "x") == 2.5


def test_a_page_sends_its_shape_and_anything_else_is_refused() -> None:
    assert MultiLabel.form.from_entry(["dog", "cat"], " ", "x") == ("cat", "dog")
    assert Regression.form.from_entry(3, " ", "x") == 3.0
    with pytest.raises(DataError, match="a number is text here, not true/false"):
        Regression.form.from_entry(True, " ", "x")
    with pytest.raises(DataError, match="a class is text here, not a list"):
        SingleLabel.form.from_entry(["cat"], " ", "x")


def test_an_old_change_list_is_applied_to_the_given_set() -> None:
    assert MultiLabel.form.read_change(("cat",), "+dog -cat", " ", "x") == ("dog",)
    assert MultiLabel.form.read_change(None, "dog", " ", "x") == ("dog",)
    with pytest.raises(DataError, match="list of changes"):
        MultiLabel.form.read_change(None, "+dog", " ", "x")


def test_evidence_and_labels_read_per_shape() -> None:
    assert SingleLabel.form.suspicion("1", "dog", 0.1, 0.9) == "suspected mislabel #1: p(given) 0.10, p(dog) 0.90"
    assert Regression.form.suspicion("2", "4.5", 3.0, 1.5).startswith("suspect target #2: the model says 4.5")
    assert Regression.form.shown(1234567.8) == "1.23457e+06"
    assert MultiLabel.form.change(("cat",), ("dog",)) == "dog (+dog -cat)"


def test_the_data_summary_lines_follow_the_shape() -> None:
    assert SingleLabel.wording.summary_head(["a", "b"]) == "classes: 2"
    assert MultiLabel.wording.summary_head(["a", "b"]) == "labels: 2"
    assert Regression.wording.summary_head(["age"]) == "target: age"
    assert SingleLabel.wording.split_lines("train", ["a", "b", "a"], ["a", "b"]) == ["  train: 3 images (a=2, b=1)"]
    assert MultiLabel.wording.split_lines("valid", [("a",), ()], ["a"])[:2] == ["  valid: 2 images",
                                                                                "    per label: a=1"]
    assert Regression.wording.split_lines("test", [1.0, 3.0], ["age"])[1].startswith("    age: mean 2, std 1")
