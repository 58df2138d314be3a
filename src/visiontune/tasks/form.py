"""How a person gives a label: the review and labelling pages (analysis/review.py,
analysis/run_review.py) and the suggestions CSV they fill in. One class per label shape,
reached as `task.form` (or `TaskClass.form`, where a caller has only the task class: the
data layer reading a suggestions CSV); a new task shape takes one of these as it is or
subclasses it. The label itself is still read and written by the task (`parse_label`,
`label_text`); a form says how a page edits it, what it sends back, how an answer is
written into a suggestions CSV (where an empty cell is a row not answered), how an older
version's decision file reads, and how the evidence against a label reads.

- `Form`: choose one class (single-label; the default).
- `LabelSetForm`: toggle the labels of a set.
- `NumberForm`: type a number.
"""

from __future__ import annotations

from typing import Any

from visiontune.errors import DataError
from visiontune.tasks.labels import MULTI_LABEL_COLUMNS, NONE, label_set, split_labels


def _json_kind(value: Any) -> str:
    """What a JSON value is, in words (for a refusal)."""
    if value is None:
        return "null"
    kinds = ((bool, "true/false"), ((int, float), "a number"), (str, "text"), ((list, tuple), "a list"),
             (dict, "an object"))
    return next((f"{name} ({value!r:.40})" for kind, name in kinds if isinstance(value, kind)), type(value).__name__)


class Form:
    """One class, chosen from the task's classes."""

    # how a person gives a label on the review pages: "choose" one class, "toggle" the
    # labels of a set, "type" a value (analysis/review.py draws each)
    label_entry = "choose"
    label_column = "label"  # the CSV column `suggest` writes, named so `train --csv` reads this shape
    label_columns: tuple[str, ...] = ()  # CSV label columns whose name selects this shape under --task auto

    def __init__(self, task: Any) -> None:
        self.task = task  # the tasks.base.Task class whose labels these are

    def entry(self, label: Any, delim: str = " ") -> Any:
        """A label as the review pages edit it (JSON: a class name; a list of labels; a
        number's text); `from_entry` reads what the page sends back."""
        return self.task.label_text(label, delim)

    def from_entry(self, value: Any, delim: str, where: str) -> Any:
        """What a review page sends back (the shape `entry` gives: a class name's text) as
        a label; DataError for any other JSON (null, a list, an object, a number), which
        would otherwise be stored as its repr."""
        if not isinstance(value, str):
            raise DataError(f"{where}: a {self.task.wording.label_kind} is text here, not {_json_kind(value)}")
        return self.task.parse_label(value, delim, where)

    def parse_answer(self, text: str, delim: str, where: str) -> Any | None:
        """A label cell of a suggestions CSV (`suggest`'s file, filled in on the labelling
        page or in a spreadsheet): None while it is unanswered (an empty cell), else the
        label (`answer_text` writes every label so that it reads back as one)."""
        return None if not str(text).strip() else self.task.parse_label(text, delim, where)

    def answer_text(self, label: Any, delim: str = " ") -> str:
        """A label as written into a suggestions CSV: never an empty cell, which is an
        unanswered row there (`parse_answer`)."""
        return self.task.label_text(label, delim)

    def read_change(self, given: Any, text: str, delim: str, where: str) -> Any:
        """A label cell of a review decision file from an older version (RUN/review/
        corrections.csv): the label it means (`given`: the image's given label, None when
        unknown). A class was written as itself."""
        return self.task.parse_label(text, delim, where)

    def suspicion(self, rank: str, suspected: str, given_score: float, suspected_score: float) -> str:
        """How interpret's evidence against an image's label reads on the review page (a
        row of mislabels.csv: its rank, `suspected`, `p_label`, `p_suspected`)."""
        return f"suspected mislabel #{rank}: p(given) {given_score:.2f}, p({suspected}) {suspected_score:.2f}"

    def shown(self, label: Any) -> str:
        """A label as the review pages show it."""
        return self.task.label_text(label)

    def change(self, given: Any, suggested: Any) -> str:
        """What relabelling from `given` to `suggested` means, as the review page shows it."""
        return self.shown(suggested)


class LabelSetForm(Form):
    """A label set: the page toggles each label; the empty set is written NONE."""

    label_entry = "toggle"
    label_column = MULTI_LABEL_COLUMNS[0]  # a 'labels' column reads as label sets under --task auto
    label_columns = MULTI_LABEL_COLUMNS

    def entry(self, label: Any, delim: str = " ") -> Any:
        return list(label_set(label))

    def from_entry(self, value: Any, delim: str, where: str) -> Any:
        """The page's set (a list of label names), or text typed as a cell is written."""
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return self.task.parse_label(value, delim, where)
        return super().from_entry(value, delim, where)

    def answer_text(self, label: Any, delim: str = " ") -> str:
        """The empty set as NONE: in a suggestions CSV an empty cell is a row not answered."""
        return self.task.label_text(label, delim) if label_set(label) != () else NONE

    def read_change(self, given: Any, text: str, delim: str, where: str) -> Any:
        """Review pages before the decision log wrote the suggested changes ("+dog -cat")
        as the label: applied to the given set here; refused when that set is unknown."""
        tokens = split_labels(text, delim)
        if not tokens or not all(len(t) > 1 and t[0] in "+-" for t in tokens):
            return self.task.parse_label(text, delim, where)
        if given is None:
            raise DataError(f"{where}: {text!r} is a list of changes (+label adds, -label removes) written by an older "
                            "review page, and this image's given labels are not known here to apply them to: write its "
                            "whole new label set in that cell instead")
        after = set(label_set(given)) | {t[1:] for t in tokens if t[0] == "+"}
        return tuple(sorted(after - {t[1:] for t in tokens if t[0] == "-"}))

    def suspicion(self, rank: str, suspected: str, given_score: float, suspected_score: float) -> str:
        return f"suspected mislabel #{rank}: {suspected} (its least sure label agrees at p {given_score:.2f})"

    def shown(self, label: Any) -> str:
        return ", ".join(label_set(label)) or NONE

    def change(self, given: Any, suggested: Any) -> str:
        """The new set and the changes: "dog (+dog -cat)"."""
        before, after = set(label_set(given)), set(label_set(suggested))
        changes = [f"+{c}" for c in sorted(after - before)] + [f"-{c}" for c in sorted(before - after)]
        return f"{self.shown(suggested)} ({' '.join(changes) or 'no change'})"


class NumberForm(Form):
    """A number, typed."""

    label_entry = "type"
    label_column = "value"  # the column `suggest` writes: under --task auto, a 'value' column holds numbers
    label_columns = ("value",)

    def from_entry(self, value: Any, delim: str, where: str) -> Any:
        """The page's text, or a JSON number."""
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return self.task.parse_label(value, delim, where)
        return super().from_entry(value, delim, where)

    def suspicion(self, rank: str, suspected: str, given_score: float, suspected_score: float) -> str:
        """A number's evidence is its out-of-fold residual (mislabels.csv: `p_suspected`
        the model's number minus the target, `p_label` its robust z-score)."""
        return (f"suspect target #{rank}: the model says {suspected} (residual {suspected_score:+.3g}), "
                f"{given_score:.1f} robust SDs from the typical residual")

    def shown(self, label: Any) -> str:
        return f"{float(label):.6g}"


class FormOf:
    """`Task.form` / `task.form`: the task class's form, from the class or an instance
    (the data layer has only the class when it reads a suggestions CSV)."""

    def __init__(self, form_type: type[Form]) -> None:
        self.form_type = form_type

    def __get__(self, obj: Any, owner: type) -> Form:
        return self.form_type(owner)
