"""How a task shape is named and described in the text the package writes: what one
output is called (summaries, errors), the advisor's units, the model card's tag, whether
the data summary names the task, and the data summary's lines (`summary_head`,
`split_lines`). One frozen `Wording` per shape (`Task.wording`); a new shape takes one of
these as it is or writes its own. The one-line help of each shape is its registry entry's
(tasks/catalog.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from visiontune.tasks.labels import label_counts, multi_label_lines


@dataclass(frozen=True)
class Wording:
    """Classes: counted per class."""

    label_kind: str = "class"  # what one output is called in summaries and errors ("class", "label", "number")
    units: tuple[str, str] = ("class", "classes")  # one output / many, in the advisor's words
    card_tag: str = "image-classification"  # the model card's tag (deploy/hub.py)
    named_in_summary: bool = False  # the data summary names the task (the default task is not named)

    def summary_head(self, classes: list[str]) -> str:
        """The outputs in the data summary's first line (and the model card's labels)."""
        return f"{self.units[1]}: {len(classes)}"

    def split_lines(self, split: str, labels: list[Any], classes: list[str]) -> list[str]:
        """A split's lines in the data summary: its images per class."""
        found = label_counts(labels)
        return [f"  {split}: {len(labels)} images (" + ", ".join(f"{c}={found.get(c, 0)}" for c in classes) + ")"]


@dataclass(frozen=True)
class LabelSetWording(Wording):
    """Label sets: images per label, cardinality, the most frequent pairs."""

    def split_lines(self, split: str, labels: list[Any], classes: list[str]) -> list[str]:
        return [f"  {split}: {len(labels)} images", *multi_label_lines(labels, classes)]


@dataclass(frozen=True)
class NumberWording(Wording):
    """A number: the target's name, its mean, spread and quartiles."""

    def summary_head(self, classes: list[str]) -> str:
        return f"target: {classes[0] if classes else '?'}"

    def split_lines(self, split: str, labels: list[Any], classes: list[str]) -> list[str]:
        y = np.asarray(labels, dtype=float)
        lines = [f"  {split}: {len(y)} images"]
        if len(y):
            q = np.quantile(y, [0, 0.25, 0.5, 0.75, 1])
            lines.append(f"    {classes[0] if classes else 'target'}: mean {y.mean():.4g}, std {y.std():.4g}, min "
                         f"{q[0]:.4g}, quartiles {q[1]:.4g} / {q[2]:.4g} / {q[3]:.4g}, max {q[4]:.4g}")
        return lines


CLASSES = Wording()
LABEL_SETS = LabelSetWording("label", ("label", "labels"), named_in_summary=True)
NUMBERS = NumberWording("number", ("target", "target"), "image-regression", named_in_summary=True)
