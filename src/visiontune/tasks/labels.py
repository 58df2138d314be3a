"""Label shapes on the data side (no torch: config and the data layer read them). An item's label is a class name (`str`, single-label) or a
set of labels (`tuple[str, ...]`, sorted, possibly empty: "none of these"; multi-label).
These helpers let splitting, counting and summaries treat both alike."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from itertools import combinations

import numpy as np

from visiontune.errors import DataError

Label = str | tuple[str, ...] | float
SINGLE, MULTI, REGRESSION = "single-label", "multi-label", "regression"  # the built-in shapes (tasks/catalog.py)
MULTI_LABEL_COLUMNS = ("labels", "tags")  # a CSV column by one of these names holds label sets
NONE = "(none)"  # a set without labels, as a suggestions CSV holds an answer (an empty cell: not answered yet)
DELIMITERS = (" ", ",", ";", "|")


def is_multi(label: Label) -> bool:
    return isinstance(label, tuple)


def label_set(label: Label) -> tuple[str, ...]:
    return label if isinstance(label, tuple) else (label,)


def label_text(label: Label, delim: str = " ") -> str:
    """The label as written in a table: the class, or the set joined by `delim`."""
    return delim.join(label) if isinstance(label, tuple) else str(label)


def parse_label_set(text: str, delim: str, where: str) -> tuple[str, ...]:
    """'cat dog' -> ('cat', 'dog') with delimiter ' '; '' -> (). A token holding another
    delimiter (e.g. 'red,leather' with ' ') means the column mixes delimiters: DataError."""
    tokens = split_labels(text, delim)
    for token in tokens:
        other = next((d for d in DELIMITERS if d not in (delim, " ") and d in token), None)
        if other is not None:
            raise DataError(f"{where}: {text!r} mixes delimiters ({other!r} inside a label split by {delim!r}); "
                            f"use one delimiter throughout, or pass --label-delim {other!r}")
    return tuple(sorted(set(tokens)))


def split_labels(text: str, delim: str) -> list[str]:
    """The label names in `text` written with `delim` (blank ones dropped)."""
    tokens = [t.strip() for t in (text.split(delim) if delim != " " else text.split())]
    return [t for t in tokens if t]


def check_label_names(labels: Iterable[Label], delim: str) -> None:
    """Label sets are written joined by `delim` (splits.csv, shard indexes, predictions):
    a label name holding it would come back as two labels, so it is refused here."""
    bad = sorted({name for label in labels for name in label_set(label) if delim in name or name != name.strip()})
    if bad:
        other = next((d for d in DELIMITERS if not any(d in name for name in bad)), ";")
        raise DataError(f"label names {bad[:5]} contain the label delimiter {delim!r} (or surrounding spaces), so "
                        f"label sets written with it could not be read back; pass --label-delim {other!r}")


def class_index(classes: Iterable[str]) -> dict[str, int]:
    """Each class (label) name's column: the one class-to-index map of the package."""
    return {c: i for i, c in enumerate(classes)}


def label_counts(labels: Iterable[Label]) -> Counter[str]:
    """Images per class (single-label) or per label (an image counts once for each of its labels)."""
    return Counter(name for label in labels for name in label_set(label))


def indicator(labels: Iterable[Label], classes: list[str]) -> np.ndarray:
    """(N, C) 0/1 matrix: row i has a 1 for each class (label) of labels[i]."""
    index = class_index(classes)
    rows = list(labels)
    y = np.zeros((len(rows), len(classes)), dtype=int)
    for row, label in enumerate(rows):
        y[row, [index[name] for name in label_set(label)]] = 1
    return y


def task_of(labels: Iterable[Label]) -> str:
    """The task shape labels are in: numbers (regression), label sets, else classes."""
    shape = SINGLE
    for label in labels:
        if isinstance(label, float):
            return REGRESSION
        if is_multi(label):
            shape = MULTI
    return shape


def multi_label_lines(labels: list[Label], classes: list[str], top_pairs: int = 5) -> list[str]:
    """Summary lines of label sets: images per label, cardinality, images with no label, and
    the most frequent co-occurring pairs."""
    sets = [label_set(label) for label in labels]
    counts = label_counts(labels)
    pairs = Counter(pair for s in sets for pair in combinations(sorted(s), 2))
    lines = ["    per label: " + ", ".join(f"{c}={counts.get(c, 0)}" for c in classes),
             f"    labels per image: {sum(map(len, sets)) / max(1, len(sets)):.2f}; "
             f"images with no label: {sum(not s for s in sets)}"]
    if pairs:
        lines.append("    most frequent pairs: " + ", ".join(f"{a}+{b}={n}" for (a, b), n in pairs.most_common(top_pairs)))
    return lines
