"""How a task shape is named in the text the package writes: what one output is called
(summaries, errors), the advisor's units, the model card's tag, whether the data summary
names the task. One frozen `Wording` per shape (`Task.wording`); a new shape takes one of
these as it is or writes its own. The one-line help of each shape is its registry entry's
(tasks/catalog.py)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Wording:
    label_kind: str = "class"  # what one output is called in summaries and errors ("class", "label", "number")
    units: tuple[str, str] = ("class", "classes")  # one output / many, in the advisor's words
    card_tag: str = "image-classification"  # the model card's tag (deploy/hub.py)
    named_in_summary: bool = False  # the data summary names the task (the default task is not named)


CLASSES = Wording()
LABEL_SETS = Wording("label", ("label", "labels"), named_in_summary=True)
NUMBERS = Wording("number", ("target", "target"), "image-regression", named_in_summary=True)
