"""Labelled images as the pipeline sees them: `Item` (path, label, split, group) and
`DataSource` (the classes, the items, and what was left out and why). A label is a class
name, a tuple of label names (multi-label) or a float (regression) (tasks/labels.py); the
task's class (tasks/) reads and summarises it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from visiontune.tasks.catalog import task_class
from visiontune.tasks.labels import Label, task_of

TRAIN, VALID, TEST = "train", "valid", "test"
LISTED_IN_EXCLUDE = "listed in --exclude"  # the reason of a file left out by the user's choice (RUN/excluded.txt)

LabelFunc = Callable[[Path], Any]


@dataclass(frozen=True)
class Item:
    path: str
    label: Label
    split: str
    group: str = ""  # images of one group (a recording, a patient...) stay in one split


@dataclass
class DataSource:
    """Everything the rest of the pipeline needs to know about the data."""

    root: str
    classes: list[str]
    items: list[Item]
    excluded: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    hidden: list[str] = field(default_factory=list)
    detected: str = ""  # how the task shape was found, for the summary (e.g. "a 'labels' column")
    target_name: str = ""  # regression: the label column's name (the one output's name)
    task_name: str = ""  # the task chosen (--task, else found from the labels): data/sources.py sets it once
    no_validation: str = ""  # why no validation split could be held out (data/splits.py); "" when one was, or none asked

    @property
    def task(self) -> str:
        """The task chosen for these labels; without a choice, the labels' shape (label
        sets: multi-label, numbers: regression, else single-label)."""
        return self.task_name or task_of(it.label for it in self.items)

    def split(self, name: str) -> list[Item]:
        return [it for it in self.items if it.split == name]

    def class_counts(self, split: str = TRAIN) -> dict[str, int]:
        """Images per class (per label: an image counts for each of its labels; none for a
        number), as the task counts them."""
        return task_class(self.task).counts([it.label for it in self.split(split)], self.classes)

    def imbalance_ratio(self, split: str = TRAIN) -> float:
        """Largest class count / smallest (1.0 = balanced) over the training split."""
        counts = [n for n in self.class_counts(split).values() if n > 0]
        return max(counts) / min(counts) if counts else 1.0

    def summary(self) -> str:
        task = task_class(self.task)
        lines = [f"data: {self.root}  {task.wording.summary_head(self.classes)}"
                 + (f"  task: {self.task}" + (f" (detected: {self.detected})" if self.detected else "")
                    if task.wording.named_in_summary else "")]
        for split in (TRAIN, VALID, TEST):
            items = self.split(split)
            if items:
                lines += task.wording.split_lines(split, [it.label for it in items], self.classes)
        if self.class_counts():
            lines.append(f"  imbalance (largest/smallest train {task.wording.label_kind}): {self.imbalance_ratio():.2f}")
        missing = self.missing_from_valid()
        if missing:
            lines.append(f"  labels in train but not in valid (not validated): {', '.join(missing)}")
        if self.hidden:
            lines.append(f"  skipped {len(self.hidden)} hidden files/folders (e.g. {self.hidden[0]})")
        lines += excluded_lines(self.excluded)
        return "\n".join(lines)

    def missing_from_valid(self) -> list[str]:
        """Classes with training images but none among the validation images (when any)."""
        valid = self.split(VALID)
        if not valid:
            return []
        seen = task_class(self.task).counts([it.label for it in valid], self.classes)
        return [c for c, n in seen.items() if not n]


def excluded_lines(excluded: list[tuple[str, str]], verb: str = "excluded", what: str = "files",
                   shown: int = 10) -> list[str]:
    """How a summary lists files left out: a count, then the first `shown` with the reason
    each ([] when there are none). The data summary and the unlabelled pool's use it."""
    if not excluded:
        return []
    lines = [f"  {verb} {len(excluded)} {what}:", *(f"    {p}: {why}" for p, why in excluded[:shown])]
    if len(excluded) > shown:
        lines.append(f"    ... and {len(excluded) - shown} more")
    return lines
