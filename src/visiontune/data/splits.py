"""Splitting labelled images: a stratified validation split and k-fold, both keeping every
group (a recording, a patient: `Item.group`) whole when groups are given (scikit-learn's
StratifiedKFold / StratifiedGroupKFold). What is stratified comes from the task
(`Task.strata`, via `strata_of`): classes as they are, numbers by quantile bins, label
sets as a 0/1 matrix; label sets are stratified by iterative stratification (the `iterative-stratification` package, Sechidis et al. 2011);
label sets with groups fall back to scikit-learn's group splits, unstratified."""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import numpy as np

from visiontune.data.items import TRAIN, VALID, DataSource, Item
from visiontune.errors import ConfigError, DataError
from visiontune.tasks.catalog import task_class
from visiontune.tasks.labels import Label, task_of

log = logging.getLogger(__name__)

def sk() -> Any:
    """scikit-learn's model_selection, imported when data is first split: predict and serve
    split nothing, and the import is a second of their start-up (issue 23)."""
    import sklearn.model_selection

    return sklearn.model_selection


def ms() -> Any:
    """iterative-stratification's multi-label splitters (imported when first used, as `sk`)."""
    import iterstrat.ml_stratifiers

    return iterstrat.ml_stratifiers


MIN_PER_CLASS = 50  # a stratified sample keeps at least this many rows of each class (or all it has)


def fold_count(labels: list[Label], folds: int) -> int:
    """How many folds `labels` can fill, as their task says (Task.fold_count)."""
    if folds < 2:
        raise ConfigError(f"folds must be >= 2, got {folds}")
    return task_class(task_of(labels)).fold_count(labels, folds)


class TooFewToSplit(DataError):
    """Some class has a single image: a stratified split cannot give it to both sides."""

    def __init__(self, classes: list[str]) -> None:
        self.classes = classes
        super().__init__(f"classes {classes} have a single image, which cannot be split into train and valid; "
                         "add images, or give a valid/ folder")


def assign_validation(source: DataSource, valid_pct: float, seed: int) -> None:
    """Items without a split go to train/valid: stratified by class, seeded, groups whole.
    The one rule for every layout: when no item is in a validation split (folders train/
    [+ test/], a Hugging Face dataset of train [+ test], a CSV whose split column names no
    valid row), the training items are split the same way (`valid_pct` 0: no validation).
    When some class has a single image (the first rounds of labelling: `suggest` at 1 or
    2 labels per class), no split can hold one of each class out: every image trains and
    `source.no_validation` says why (the run then validates by the converged probe's
    cross-validation: train/setup.py)."""
    unsplit = ("", TRAIN) if not source.split(VALID) else ("",)
    loose = [i for i, it in enumerate(source.items) if it.split in unsplit]
    if not loose:
        return
    items = [source.items[i] for i in loose]
    try:
        chosen = stratified_split([it.label for it in items], valid_pct, seed, group_keys(items))
    except TooFewToSplit as exc:
        if source.split(VALID):  # a valid/ folder validates; the loose images train
            chosen = []
        else:
            chosen, source.no_validation = [], f"{_few(exc.classes)} a single labelled image"
    to_valid = {loose[k] for k in chosen}
    split = [replace(it, split=VALID if i in to_valid else TRAIN) if it.split in unsplit else it
             for i, it in enumerate(source.items)]
    why = "" if source.split(VALID) else _too_few(source, split, valid_pct, len(chosen))
    source.items = split if not why else [replace(it, split=TRAIN) if it.split in unsplit else it
                                          for it in source.items]
    source.no_validation = source.no_validation or why


def _too_few(source: DataSource, split: list[Item], valid_pct: float, n_valid: int) -> str:
    """Why a split just drawn holds nothing usable out ("" when it does): no image at all
    (label sets too few for iterative stratification to give --valid-pct any), or some
    class (label) with no training image left."""
    if valid_pct > 0 and not n_valid:
        return f"{sum(it.split == TRAIN for it in split)} labelled images are too few to hold out {valid_pct:g} of them"
    task = task_class(source.task)
    trained = task.counts([it.label for it in split if it.split == TRAIN], source.classes)
    untrained = [c for c, n in trained.items() if not n]
    return f"a validation split would leave no training image of {_named(untrained)}" if untrained else ""


def _few(classes: list[str]) -> str:
    """'class 'rose' has' / '3 classes (a, b, c) have' / '12 classes (a, b, c, ...) have'."""
    return _named(classes) + (" has" if len(classes) == 1 else " have")


def _named(classes: list[str]) -> str:
    if len(classes) == 1:
        return f"class {classes[0]!r}"
    return f"{len(classes)} classes ({', '.join(map(str, classes[:3]))}{', ...' if len(classes) > 3 else ''})"


def group_keys(items: list[Item]) -> list[str] | None:
    """Each item's group (an item without one is its own group), or None when no item has one."""
    if not any(it.group for it in items):
        return None
    return [it.group or f"\0{it.path}" for it in items]


def stratified_split(labels: list[Label], valid_pct: float, seed: int, groups: list[str] | None = None) -> list[int]:
    """Indices of the validation part: `valid_pct` of each class, chosen with `seed`; with
    `groups`, whole groups (one fold of StratifiedGroupKFold with 1 / valid_pct folds)."""
    if valid_pct <= 0:
        return []
    single = task_class(task_of(labels)).single_image_classes(labels)
    if single:
        raise TooFewToSplit(single)
    y = strata_of(labels)
    if y.ndim == 2:
        return _multi_label_split(y, valid_pct, seed, groups)
    labels = y.tolist()  # a class per row (numbers: their quantile bin)
    if groups is not None:
        return _group_split(labels, groups, valid_pct, seed)
    counts = Counter(labels)
    n_valid = max(len(counts), round(valid_pct * len(labels)))
    if n_valid > len(labels) - len(counts):
        raise DataError(
            f"valid_pct={valid_pct} leaves no training image for some class among "
            f"{len(labels)} images and {len(counts)} classes; lower --valid-pct"
        )
    _, valid = sk().train_test_split(
        list(range(len(labels))), test_size=n_valid, stratify=labels, random_state=seed
    )
    return sorted(valid)


def _group_split(labels: list[str], groups: list[str], valid_pct: float, seed: int) -> list[int]:
    n_groups = len(set(groups))
    if n_groups < 2:
        raise DataError(f"all {len(labels)} images belong to one group ({groups[0]!r}), which cannot be split "
                        "into train and valid without putting parts of it in both; give more groups, or a valid/ "
                        "folder")
    k = min(n_groups, max(2, round(1 / valid_pct)), max(Counter(labels).values()))  # scikit-learn: <= largest class
    splitter = sk().StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    _, valid = next(splitter.split(np.zeros(len(labels)), labels, groups))
    return sorted(valid.tolist())


def strata_of(labels: list[Label]) -> np.ndarray:
    """What to stratify `labels` by, as their task says (Task.strata)."""
    return task_class(task_of(labels)).strata(labels)


def _multi_label_split(y: np.ndarray, valid_pct: float, seed: int, groups: list[str] | None) -> list[int]:
    x = np.zeros(len(y))
    if groups is not None:
        _, valid = next(sk().GroupShuffleSplit(n_splits=1, test_size=valid_pct, random_state=seed).split(x, groups=groups))
    else:
        splitter = ms().MultilabelStratifiedShuffleSplit(n_splits=1, test_size=valid_pct, random_state=seed)
        _, valid = next(splitter.split(x, y))
    return sorted(valid.tolist())


def fold_indices(items: list[Item], folds: int, seed: int) -> Iterator[np.ndarray]:
    """The validation indices of each of `folds` stratified folds (groups kept whole)."""
    labels, groups = [it.label for it in items], group_keys(items)
    if groups is not None and len(set(groups)) < folds:
        raise DataError(f"{len(set(groups))} groups cannot fill {folds} folds without splitting a group; "
                        f"use --folds {len(set(groups))} or fewer")
    y = strata_of(labels)
    yield from fold_splits(y, groups, folds, seed)


def most_folds(y: np.ndarray) -> int:
    """The most folds `fold_splits` can make of strata `y`: a class per row needs its
    largest class to reach every fold (scikit-learn refuses more folds than that); label
    sets and bins are limited by the rows alone."""
    y = np.asarray(y)
    return int(np.bincount(y.astype(np.int64)).max()) if y.ndim == 1 and len(y) else len(y)


def fold_splits(y: np.ndarray, groups: list[str] | None, folds: int, seed: int) -> list[np.ndarray]:
    """The validation indices of `folds` folds over rows stratified by `y`: one class per row
    (StratifiedKFold, StratifiedGroupKFold with `groups`), or a 0/1 matrix of label sets
    (iterative stratification; GroupKFold, unstratified, with `groups`). Groups stay whole.
    A class with fewer rows than folds is in some folds only (scikit-learn warns; silenced)."""
    x = np.zeros(len(y))
    if y.ndim == 2:
        splitter = ms().MultilabelStratifiedKFold(n_splits=folds, shuffle=True, random_state=seed) if groups is None \
            else sk().GroupKFold(n_splits=folds)
        return [valid for _, valid in splitter.split(x, y, groups)]
    stratified = sk().StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed) if groups is None \
        else sk().StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        return [valid for _, valid in stratified.split(x, y, groups)]


def fold_pairs(y: np.ndarray, folds: int, seed: int, groups: list[str] | None = None) -> list[tuple[np.ndarray,
                                                                                                  np.ndarray]]:
    """`fold_splits` as scikit-learn's `cv=` takes them: (train rows, validation rows) per fold."""
    rows = np.arange(len(y))
    return [(np.setdiff1d(rows, valid), valid) for valid in fold_splits(y, groups, folds, seed)]


def stratified_sample(y: np.ndarray, limit: int, seed: int, at_least: int = MIN_PER_CLASS) -> np.ndarray | None:
    """At most about `limit` row indices (sorted) drawn at random with every class kept: `y`
    holds one class per row, or is a 0/1 matrix of label sets (rows without a label count as
    one more class). Each class gets its share of `limit` and at least min(its rows,
    `at_least`), the first rows of it in a seeded random order, so a rare class never
    vanishes from the sample. None when there are no more than `limit` rows (take all)."""
    n = len(y)
    if n <= limit:
        return None
    order = np.random.default_rng(seed).permutation(n)
    if y.ndim == 1:
        _, cls = np.unique(y, return_inverse=True)
        counts = np.bincount(cls)
        drawn = cls[order]
        by_class = np.argsort(drawn, kind="stable")  # each class's rows in drawn order
        rank = np.empty(n, dtype=np.int64)
        rank[by_class] = np.arange(n) - np.searchsorted(drawn[by_class], drawn[by_class])
        take = rank < _quota(counts, limit, n, at_least)[drawn]
    else:
        columns = np.concatenate([y > 0.5, ~(y > 0.5).any(axis=1, keepdims=True)], axis=1)
        quota = _quota(columns.sum(axis=0), limit, n, at_least)
        take = np.zeros(n, dtype=bool)
        for k in range(columns.shape[1]):  # memory stays one column, whatever the number of labels
            drawn = columns[order, k]
            take |= drawn & (np.cumsum(drawn) <= quota[k])
    return np.sort(order[take])


def _quota(counts: np.ndarray, limit: int, n: int, at_least: int) -> np.ndarray:
    """Rows to keep of each class: the fraction limit / n of its rows (so all classes take
    about the same first rows of the random order), at least min(count, at_least)."""
    share = np.round(limit * counts / n)
    return np.maximum(share, np.minimum(counts, at_least)).astype(np.int64)
