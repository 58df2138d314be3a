"""From a path to labelled, split items: class folders, file-name labels or a CSV.

Nothing here needs torch. `load_items` returns a `DataSource` (data/items.py): the sorted
class list, (path, label, split, group) items, and what was left out and why. Tables are
read in data/tables.py, splits made in data/splits.py.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from visiontune.config import DataConfig, RunConfig
from visiontune.data.hf import hf_source, is_hf
from visiontune.data.images import has_image_extension, is_hidden
from visiontune.data.items import LISTED_IN_EXCLUDE, TEST, TRAIN, VALID, DataSource, Item, LabelFunc
from visiontune.data.scan import scan, scan_cache
from visiontune.data.splits import assign_validation
from visiontune.data.tables import VALID_DIR_NAMES, from_csv, read_path_column, read_path_list
from visiontune.data.webdata import DATASET_FILE, is_shards, sample_paths, shard_source
from visiontune.errors import ConfigError, DataError
from visiontune.tasks.catalog import make_task, task_class
from visiontune.tasks.labels import label_counts, task_of

log = logging.getLogger(__name__)

GROUPS_FILE = "groups.csv"  # at the data root: path,group (imagify writes one)
EXCLUDED_FROM_POOL = f"{LISTED_IN_EXCLUDE}: an image of the --unlabeled pool, left out of the pool"


def resolve_inputs(data: str | os.PathLike[str] | None, config: RunConfig | None,
                   label_func: LabelFunc | None, overrides: dict[str, Any]) -> tuple[RunConfig, DataSource]:
    """The preamble of every command that trains or measures: DATA and the options ->
    a validated RunConfig -> the scanned, checked and split images."""
    if data is not None:
        overrides["path"] = str(data)
    if label_func is not None:
        overrides.setdefault("label_func", getattr(label_func, "__name__", "function"))
    cfg = RunConfig.create(config, **overrides)
    if not cfg.data.path and not cfg.data.csv:
        raise ConfigError("no data given: pass a folder of images (or csv=...)")
    return cfg, load_items(cfg.data, cfg.seed, label_func, cache_dir=cfg.runtime.cache_dir)


def collect_images(inputs: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Image files among `inputs` (folders searched recursively, as `train` scans them, by
    name: decoding is left to the reader, which reports files that fail); (path, reason)
    for everything skipped."""
    found: list[str] = []
    skipped: list[tuple[str, str]] = []
    for item in inputs:
        p = Path(item)
        if is_shards(item):
            found += sample_paths(item)
        elif p.is_dir():
            scan = DataSource(root=item, classes=[], items=[])
            found += walk_images(scan, p)
            skipped += [(h, "hidden") for h in scan.hidden] + scan.excluded
        elif p.is_file():
            found.append(str(p))
        else:
            skipped.append((item, "no such file or folder"))
    return found, skipped


def unlabelled_images(inputs: list[str], labelled: Iterable[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """The image files among `inputs` (as collect_images finds them) that are not the
    `labelled` files (compared by resolved location); (path, reason) for the rest."""
    found, skipped = collect_images(inputs)
    known = {os.path.realpath(p) for p in labelled}
    kept = [p for p in found if os.path.realpath(p) not in known]
    return kept, skipped + [(p, "labelled already") for p in found if os.path.realpath(p) in known]


def load_items(cfg: DataConfig, seed: int = 0, label_func: LabelFunc | None = None,
               min_classes: int = 2, cache_dir: str | None = None) -> DataSource:
    """Find images and labels as `cfg` says, check them, and split them.

    Layouts: a Hugging Face dataset (`hf:NAME[:CONFIG]` or a save_to_disk folder:
    data/hf.py); WebDataset shards; `cfg.csv` (path,label[,split]); labels from file names (`cfg.label_regex`
    or `label_func`, e.g. fastai's `lambda p: p.name[0].isupper()`); otherwise class
    folders, either `root/train/<class>/`, `root/valid|val/<class>/`, `root/test/<class>/`
    or a flat `root/<class>/` tree split by `cfg.valid_pct` (stratified, seeded).
    `min_classes=1` accepts a single class (scoring a model on part of its classes).
    Byte-identical files under two names never train on one side of the split and
    validate on the other (`_copies_on_one_side`).
    """
    root = Path(cfg.path).expanduser()
    shards = bool(cfg.path) and is_shards(cfg.path)
    if is_hf(cfg.path) and not cfg.csv:
        source = hf_source(cfg, cache_dir)
    elif shards:
        source = _from_shards(cfg)
    elif cfg.csv:
        source = from_csv(root, Path(cfg.csv).expanduser(), cfg)
    else:
        _require_dir(root)
        if label_func is None and cfg.label_regex:
            label_func = _regex_labeller(cfg.label_regex)
        source = _from_folders(root, label_func)
    _settle_task(source, cfg.task, cfg.label_delim)
    if cfg.relabel or cfg.exclude:
        _apply_corrections(source, cfg.relabel, cfg.exclude, cfg.label_delim, cfg.unlabeled)
    _attach_groups(source, cfg.groups or _default_groups_file(root, cfg))
    digests = {}  # each file's digest, from the check (no file is read twice); none without it
    if cfg.verify_images and not shards:  # shard samples were checked when they were written
        digests = _drop_unreadable(source, cache_dir)
    _check_classes(source, min_classes)
    before = [it.split for it in source.items]
    assign_validation(source, cfg.valid_pct, seed)
    _copies_on_one_side(source, before, digests)
    return source


def _from_shards(cfg: DataConfig) -> DataSource:
    """WebDataset shards (data/webdata.py): a folder written by `visiontune shard` keeps its
    splits; training shards given by a pattern without --valid give --valid-pct of their
    samples to validation."""
    source = shard_source(cfg.path, cfg.valid, cfg.task, delim=cfg.label_delim)
    if not (Path(cfg.path) / DATASET_FILE).is_file() and not cfg.valid:
        source.items = [replace(it, split="") for it in source.items]
    return source


def _settle_task(source: DataSource, task: str, delim: str = " ") -> None:
    """Choose the task once (`--task`; auto: label sets make multi-label, a label
    function's floats regression, else single-label) and put every label in its shape
    (Task.settle: single classes become one-label sets under multi-label, a label set
    under single-label is an error naming the image, regression reads numbers)."""
    chosen = task if task != "auto" else task_of(it.label for it in source.items)
    settled = task_class(chosen).settle([it.label for it in source.items], [it.path for it in source.items], delim)
    source.items = [replace(it, label=label) for it, label in zip(source.items, settled)]
    source.task_name = chosen  # what every later step reads


def _default_groups_file(root: Path, cfg: DataConfig) -> str | None:
    found = root / GROUPS_FILE
    return str(found) if not cfg.csv and found.is_file() else None


def _attach_groups(source: DataSource, groups_file: str | None) -> None:
    """Each item's group from a path,group file (paths relative to the data root, or
    absolute); images of one group then stay in one split and one fold."""
    if not groups_file:
        return
    base = Path(source.root)
    group_of = {os.path.realpath(base / row[0].strip()): row[1].strip()
                for row in read_path_column(groups_file, "groups") if len(row) > 1}
    source.items = [replace(it, group=group_of.get(os.path.realpath(it.path), it.group)) for it in source.items]
    found = len({it.group for it in source.items if it.group})
    log.info("groups from %s: %d groups; each stays within one split", groups_file, found)


def _require_dir(root: Path) -> None:
    if not root.exists():
        raise DataError(f"data path {str(root)!r} does not exist; pass a folder of class folders")
    if not root.is_dir():
        raise DataError(
            f"data path {str(root)!r} is a file, not a folder; pass a folder of class folders "
            "or use --csv for a label file"
        )
    if not os.access(root, os.R_OK | os.X_OK):
        raise DataError(f"data folder {str(root)!r} cannot be read (permissions); fix with chmod")


def _split_dirs(root: Path) -> dict[str, Path]:
    """Map split name -> folder when `root` holds train/ (+ valid|val/, test/)."""
    found: dict[str, Path] = {}
    names = {p.name.lower(): p for p in root.iterdir() if p.is_dir()}
    if TRAIN in names:
        found[TRAIN] = names[TRAIN]
        for alias in VALID_DIR_NAMES:
            if alias in names:
                found[VALID] = names[alias]
                break
        if TEST in names:
            found[TEST] = names[TEST]
    return found


def _from_folders(root: Path, label_func: LabelFunc | None) -> DataSource:
    source = DataSource(root=str(root), classes=[], items=[])
    splits = _split_dirs(root) or {"": root}  # train/ (+ test/) alone: assign_validation splits train
    if "" in splits:
        _refuse_split_beside_classes(root)
    for split, folder in splits.items():
        if label_func is not None:
            _collect_named(source, folder, split, label_func)
        else:
            _collect_class_folders(source, folder, split)
    return source


def _refuse_split_beside_classes(root: Path) -> None:
    """DATA/<class>/ beside DATA/valid/<class>/ (or test/): the split folder would become a
    class holding the other classes' images; the layout with splits wants DATA/train/."""
    for name in (*VALID_DIR_NAMES, TEST):
        folder = root / name
        if folder.is_dir() and any(p.is_dir() and not p.name.startswith(".") for p in folder.iterdir()):
            raise DataError(f"{folder} holds class folders beside the class folders of {root}: with a {name}/ split "
                            f"the training class folders go under {root / 'train'}/ (DATA/train/<class>/, "
                            f"DATA/{name}/<class>/)")


def _collect_class_folders(source: DataSource, folder: Path, split: str) -> None:
    class_dirs = sorted(
        p for p in folder.iterdir() if p.is_dir() and not _note_hidden(source, p)
    )
    if not class_dirs:
        raise DataError(
            f"no class folders in {str(folder)!r}: expected {folder}/<class name>/<image files>"
            f" (or {folder}/train/<class>/ and {folder}/valid/<class>/); for labels in file "
            "names use --label-regex, for a label file use --csv"
        )
    for class_dir in class_dirs:
        paths = list(walk_images(source, class_dir))
        if not paths:
            raise DataError(
                f"class folder {str(class_dir)!r} holds no image files; add images or remove "
                "the folder"
            )
        source.items += [Item(p, class_dir.name, split) for p in paths]


def _collect_named(source: DataSource, folder: Path, split: str, label_func: LabelFunc) -> None:
    for p in walk_images(source, folder):
        try:
            label = label_func(Path(p))
        except Exception as exc:  # noqa: BLE001 - the user's function, reported per file
            source.excluded.append((p, f"label function failed: {exc}"))
            continue
        if label is None:
            source.excluded.append((p, "no label from the file name"))
            continue
        if isinstance(label, (list, tuple, set, frozenset)):  # a label set: multi-label
            source.detected = "a label function returning label sets"
            source.items.append(Item(p, tuple(sorted({str(x) for x in label})), split))
        else:  # a number stays a number (read as a class unless --task regression)
            source.items.append(Item(p, label if isinstance(label, float) else str(label), split))


def _regex_labeller(pattern: str) -> LabelFunc:
    try:
        rx = re.compile(pattern)
    except re.error as exc:
        raise DataError(f"--label-regex {pattern!r} is not a valid regular expression: {exc}") from None
    if rx.groups < 1:
        raise DataError(
            f"--label-regex {pattern!r} has no capture group; put the label in parentheses, "
            r"e.g. '^(.+)_\d+\.jpg$'"
        )

    def label(path: Path) -> str | None:
        m = rx.search(path.name)
        return m.group(1) if m else None

    return label


def _note_hidden(source: DataSource, p: Path) -> bool:
    if is_hidden(p.name):
        source.hidden.append(str(p))
        return True
    return False


def walk_images(source: DataSource, folder: Path) -> list[str]:
    """Image files below `folder`, sorted; hidden entries and other files are reported."""
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not _note_hidden(source, Path(dirpath, d)))
        for name in filenames:
            path = Path(dirpath, name)
            if _note_hidden(source, path):
                continue
            if not has_image_extension(path):
                source.excluded.append((str(path), "not an image (file extension)"))
            elif not path.is_file():
                source.excluded.append((str(path), "not a regular file (broken link?)"))
            else:
                found.append(str(path))
    return sorted(found)


def _apply_corrections(source: DataSource, relabel: str | None, exclude: str | None, delim: str = " ",
                       pool: str | None = None) -> None:
    """Fix labels and drop images as listed (e.g. from interpret's mislabels.csv); paths match
    by their resolved location, so relative and absolute spellings both work. An --exclude
    line naming an image of the --unlabeled `pool` is listed in `source.excluded` too (the
    pool leaves it out, and RUN/excluded.txt records it for `suggest --run`)."""
    def key(p: str) -> str:
        return os.path.realpath(p)

    dropped = {key(p) for p in read_path_list(exclude, "--exclude")} if exclude else set()
    fixes = {}
    parse = task_class(source.task).parse_label
    for row in read_path_column(relabel, "--relabel") if relabel else []:
        label = parse(row[1], delim, f"--relabel row {row}") if len(row) > 1 else ""
        if label == "":  # an empty class or number (an empty label set is () and a label)
            raise DataError(f"--relabel row {row} needs path,label")
        fixes[key(row[0].strip())] = label
    keys = [key(it.path) for it in source.items]
    known = sorted(label_counts(it.label for it in source.items))  # the data's labels before --relabel
    kept = []
    for it, k in zip(source.items, keys):
        if k in dropped:
            source.excluded.append((it.path, LISTED_IN_EXCLUDE))
        else:
            kept.append(replace(it, label=fixes[k]) if k in fixes else it)
    source.items = kept
    pooled = sorted(p for p in dropped - set(keys) if pool and _inside(p, pool))
    source.excluded += [(p, EXCLUDED_FROM_POOL) for p in pooled]  # the data summary lists them so
    for option, listed in (("--relabel", set(fixes)), ("--exclude", dropped - set(pooled))):
        unknown = sorted(listed - set(keys))
        if unknown:
            log.warning("%s lists %d paths that are not in the data, e.g. %s", option, len(unknown), unknown[0])
    new = make_task(source.task, known).unknown_labels(list(fixes.values()))
    if new:
        log.warning("--relabel gives labels the data does not have: %s; they are trained as new %ss (check the "
                    "spelling if that is not what you meant)", ", ".join(repr(c) for c in new),
                    task_class(source.task).wording.label_kind)


def _inside(path: str, folder: str) -> bool:
    """Whether the resolved `path` is `folder` (resolved) or lies below it."""
    root = os.path.realpath(folder)
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _drop_unreadable(source: DataSource, cache_dir: str | None) -> dict[str, str]:
    """Decode every image once (in parallel; unchanged files are remembered by the scan
    cache, data/scan.py) and leave out the ones that do not decode, with the reason; the
    digest of each file kept, by path."""
    verdicts = scan([it.path for it in source.items], scan_cache(cache_dir))
    kept, digests = [], {}
    for item, (reason, digest) in zip(source.items, verdicts):
        if reason is None:
            kept.append(item)
            digests[item.path] = digest
        else:
            source.excluded.append((item.path, reason))
    source.items = kept
    return digests


def _copies_on_one_side(source: DataSource, before: list[str], digests: dict[str, str]) -> None:
    """Byte-identical files (by `digests`, the check's: nothing is read again) on both
    sides of the split would validate (or test) on images the model trained on. A copy
    the split drew into validation (`before`: each item's split before the draw) goes to
    train with its twin, and a training image of its stratum (Task.strata) that was in
    the same draw and has no copy validates in its place, so validation keeps its size
    and proportions; a copy with a group stays (moving it would split the group). Copies
    the layout itself puts on both sides (folders, a split column, a dataset's splits)
    cannot move: one warning counts them and names a pair."""
    items = source.items
    same = _same_bytes(items, digests)
    twins = [rows for rows in same if len({items[i].split == TRAIN for i in rows}) == 2]
    drawn = {i: _trained(items, rows) for rows in twins for i in rows
             if items[i].split == VALID and before[i] != VALID and not items[i].group}
    if drawn:
        stand_ins = _stand_ins(source, before, sorted(drawn), {i for rows in same for i in rows})
        first = min(drawn)
        log.info("%d images drawn into validation are byte-identical copies of training images (e.g. %s = %s): "
                 "they train, and %d other training images of their strata validate in their place", len(drawn),
                 items[first].path, items[drawn[first]].path, len(stand_ins))
        source.items = items = [replace(it, split=TRAIN) if i in drawn else replace(it, split=VALID)
                                if i in stand_ins else it for i, it in enumerate(items)]
    apart = [(i, _trained(items, rows)) for rows in twins for i in rows if items[i].split != TRAIN]
    if apart:
        i, j = min(apart)
        log.warning("%d images in valid or test are byte-identical copies of training images (e.g. %s in %s = %s in "
                    "train): their scores are inflated; remove the copies", len(apart), items[i].path,
                    items[i].split, items[j].path)


def _same_bytes(items: list[Item], digests: dict[str, str]) -> list[list[int]]:
    """Rows of byte-identical files, one list per content that two or more files hold."""
    rows: dict[str, list[int]] = {}
    for i, it in enumerate(items):
        if digests.get(it.path):
            rows.setdefault(digests[it.path], []).append(i)
    return [r for r in rows.values() if len(r) > 1]


def _trained(items: list[Item], rows: list[int]) -> int:
    """A row among `rows` that trains."""
    return next(j for j in rows if items[j].split == TRAIN)


def _stand_ins(source: DataSource, before: list[str], drawn: list[int], copies: set[int]) -> set[int]:
    """For each row of `drawn`, a training row of the same stratum that was in the same
    draw (the same split before it), without a copy or a group (the first such row)."""
    strata = task_class(source.task).strata([it.label for it in source.items])

    def key(i: int) -> tuple[str, bytes]:
        return before[i], np.asarray(strata[i]).tobytes()

    free: dict[tuple[str, bytes], list[int]] = {}
    for j, it in reversed(list(enumerate(source.items))):
        if it.split == TRAIN and j not in copies and not it.group:
            free.setdefault(key(j), []).append(j)
    return {free[key(i)].pop() for i in drawn if free.get(key(i))}


def _check_classes(source: DataSource, min_classes: int = 2) -> None:
    if not source.items:
        raise DataError(f"no usable images found in {source.root!r}\n{source.summary()}")
    train_like = [it.label for it in source.items if it.split in ("", TRAIN)]
    if not train_like and min_classes < 2:  # scoring a model (evaluate): a test or validation split alone is its data
        train_like = [it.label for it in source.items]
    source.classes = task_class(source.task).classes_of(train_like, [it.label for it in source.items], source.root,
                                                        source.target_name, min_classes)
    if min_classes >= 2 and len(train_like) == 1:  # a label set or a number: one image, nothing to learn from
        raise DataError(f"a single labelled image to train on in {source.root!r} ({source.items[0].path}): a model "
                        "needs at least two; label more")
