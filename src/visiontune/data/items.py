"""Labelled images as the pipeline sees them: `Item` (path, label, split, group) and
`DataSource` (the classes, the items, and what was left out and why)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TRAIN, VALID, TEST = "train", "valid", "test"

LabelFunc = Callable[[Path], Any]


@dataclass(frozen=True)
class Item:
    path: str
    label: str
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

    def split(self, name: str) -> list[Item]:
        return [it for it in self.items if it.split == name]

    def class_index(self) -> dict[str, int]:
        return {c: i for i, c in enumerate(self.classes)}

    def class_counts(self, split: str = TRAIN) -> dict[str, int]:
        counts = Counter(it.label for it in self.split(split))
        return {c: counts.get(c, 0) for c in self.classes}

    def imbalance_ratio(self, split: str = TRAIN) -> float:
        """Largest class count / smallest (1.0 = balanced) over the training split."""
        counts = [n for n in self.class_counts(split).values() if n > 0]
        return max(counts) / min(counts) if counts else 1.0

    def summary(self) -> str:
        lines = [f"data: {self.root}  classes: {len(self.classes)}"]
        for split in (TRAIN, VALID, TEST):
            items = self.split(split)
            if items:
                counts = Counter(it.label for it in items)
                per_class = ", ".join(f"{c}={counts.get(c, 0)}" for c in self.classes)
                lines.append(f"  {split}: {len(items)} images ({per_class})")
        if self.split(TRAIN):
            lines.append(f"  imbalance (largest/smallest train class): {self.imbalance_ratio():.2f}")
        if self.hidden:
            lines.append(f"  skipped {len(self.hidden)} hidden files/folders (e.g. {self.hidden[0]})")
        if self.excluded:
            lines.append(f"  excluded {len(self.excluded)} files:")
            lines += [f"    {p}: {why}" for p, why in self.excluded[:10]]
            if len(self.excluded) > 10:
                lines.append(f"    ... and {len(self.excluded) - 10} more")
        return "\n".join(lines)
