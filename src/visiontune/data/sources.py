"""From a path to labelled, split items: class folders, file-name labels or a CSV.

Nothing here needs torch. `load_items` returns a `DataSource`: the sorted class list,
(path, label, split) items, and what was left out and why.
"""

from __future__ import annotations

import csv
import logging
import os
import re
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from sklearn.model_selection import train_test_split

from visiontune.config import DataConfig, RunConfig
from visiontune.data.images import check_image, has_image_extension, is_hidden
from visiontune.errors import ConfigError, DataError

log = logging.getLogger(__name__)

TRAIN, VALID, TEST = "train", "valid", "test"
VALID_DIR_NAMES = ("valid", "val", "validation")
PATH_COLUMNS = ("path", "file", "filename", "file_name", "image", "fname")
LABEL_COLUMNS = ("label", "class", "target", "category", "labels")

LabelFunc = Callable[[Path], Any]


@dataclass(frozen=True)
class Item:
    path: str
    label: str
    split: str


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
    return cfg, load_items(cfg.data, cfg.seed, label_func)


def fold_count(labels: list[str], folds: int) -> int:
    """`folds`, or fewer when a class has fewer images (each fold needs one of each class);
    a class with a single image cannot be validated on in any fold: DataError."""
    if folds < 2:
        raise ConfigError(f"folds must be >= 2, got {folds}")
    counts = Counter(labels)
    smallest = min(counts.values())
    if smallest >= folds:
        return folds
    small = sorted(c for c, n in counts.items() if n < folds)
    if smallest < 2:
        raise DataError(f"classes {small} have fewer than 2 images: no fold split can validate on them; add images")
    log.warning("classes %s have fewer images than %d folds: using %d folds (the smallest class size)",
                small, folds, smallest)
    return smallest


def collect_images(inputs: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Image files among `inputs` (folders searched recursively, as `train` scans them, by
    name: decoding is left to the reader, which reports files that fail); (path, reason)
    for everything skipped."""
    found: list[str] = []
    skipped: list[tuple[str, str]] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            scan = DataSource(root=item, classes=[], items=[])
            found += walk_images(scan, p)
            skipped += [(h, "hidden") for h in scan.hidden] + scan.excluded
        elif p.is_file():
            found.append(str(p))
        else:
            skipped.append((item, "no such file or folder"))
    return found, skipped


def load_items(cfg: DataConfig, seed: int = 0, label_func: LabelFunc | None = None,
               min_classes: int = 2) -> DataSource:
    """Find images and labels as `cfg` says, check them, and split them.

    Layouts: `cfg.csv` (path,label[,split]); labels from file names (`cfg.label_regex`
    or `label_func`, e.g. fastai's `lambda p: p.name[0].isupper()`); otherwise class
    folders, either `root/train/<class>/`, `root/valid|val/<class>/`, `root/test/<class>/`
    or a flat `root/<class>/` tree split by `cfg.valid_pct` (stratified, seeded).
    `min_classes=1` accepts a single class (scoring a model on part of its classes).
    """
    root = Path(cfg.path).expanduser()
    if cfg.csv:
        source = _from_csv(root, Path(cfg.csv).expanduser(), cfg)
    else:
        _require_dir(root)
        if label_func is None and cfg.label_regex:
            label_func = _regex_labeller(cfg.label_regex)
        source = _from_folders(root, label_func)
    if cfg.relabel or cfg.exclude:
        _apply_corrections(source, cfg.relabel, cfg.exclude)
    if cfg.verify_images:
        _drop_unreadable(source)
    _check_classes(source, min_classes)
    _assign_validation(source, cfg.valid_pct, seed)
    return source


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
    splits = _split_dirs(root) or {"": root}
    if TRAIN in splits and VALID not in splits:  # train/ (+ test/) only: split train by valid_pct
        splits = {("" if k == TRAIN else k): v for k, v in splits.items()}
    for split, folder in splits.items():
        if label_func is not None:
            _collect_named(source, folder, split, label_func)
        else:
            _collect_class_folders(source, folder, split)
    return source


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
        source.items.append(Item(p, str(label), split))


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


def _read_path_column(path: str, what: str) -> list[list[str]]:
    if not os.path.isfile(path):
        raise DataError(f"{what} file {path!r} does not exist")
    with open(path, newline="", encoding="utf-8-sig") as fh:
        rows = [r for r in csv.reader(fh) if r and r[0].strip()]
    if rows and rows[0][0].strip().lower() in PATH_COLUMNS:
        rows = rows[1:]
    return rows


def _apply_corrections(source: DataSource, relabel: str | None, exclude: str | None) -> None:
    """Fix labels and drop images as listed (e.g. from interpret's mislabels.csv); paths match
    by their resolved location, so relative and absolute spellings both work."""
    def key(p: str) -> str:
        return os.path.realpath(p)

    dropped = {key(r[0].strip()) for r in _read_path_column(exclude, "--exclude")} if exclude else set()
    fixes = {}
    for row in _read_path_column(relabel, "--relabel") if relabel else []:
        if len(row) < 2 or not row[1].strip():
            raise DataError(f"--relabel row {row} needs path,label")
        fixes[key(row[0].strip())] = row[1].strip()
    keys = [key(it.path) for it in source.items]
    kept = []
    for it, k in zip(source.items, keys):
        if k in dropped:
            source.excluded.append((it.path, "listed in --exclude"))
        else:
            kept.append(replace(it, label=fixes[k]) if k in fixes else it)
    unknown = sorted(set(fixes) - set(keys))
    if unknown:
        log.warning("--relabel lists %d paths that are not in the data, e.g. %s", len(unknown), unknown[0])
    source.items = kept


def check_images(paths: list[str]) -> list[str | None]:
    """`check_image` over many files on a thread pool (decoders release the GIL)."""
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 2) * 2)) as pool:
        return list(pool.map(check_image, paths))


def _drop_unreadable(source: DataSource) -> None:
    reasons = check_images([it.path for it in source.items])
    kept = []
    for item, reason in zip(source.items, reasons):
        if reason is None:
            kept.append(item)
        else:
            source.excluded.append((item.path, reason))
    source.items = kept


def _check_classes(source: DataSource, min_classes: int = 2) -> None:
    if not source.items:
        raise DataError(f"no usable images found in {source.root!r}\n{source.summary()}")
    train_like = [it for it in source.items if it.split in ("", TRAIN)]
    classes = sorted({it.label for it in train_like})
    if len(classes) < min_classes:
        raise DataError(
            f"found a single class {classes} in {source.root!r}; classification needs at least "
            "two classes (one folder per class, or labels that take two or more values)"
        )
    other = sorted({it.label for it in source.items} - set(classes))
    if other:
        raise DataError(
            f"classes {other} appear in valid/test but not in train under {source.root!r}; "
            "add training images for them or remove them"
        )
    source.classes = classes


def _assign_validation(source: DataSource, valid_pct: float, seed: int) -> None:
    """Items without a split go to train/valid: stratified by class, seeded."""
    loose = [i for i, it in enumerate(source.items) if it.split == ""]
    if not loose:
        if not source.split(VALID):
            log.warning("no valid/ folder under %s: training without validation", source.root)
        return
    chosen = stratified_split([source.items[i].label for i in loose], valid_pct, seed)
    to_valid = {loose[k] for k in chosen}
    source.items = [
        replace(it, split=VALID if i in to_valid else TRAIN) if it.split == "" else it
        for i, it in enumerate(source.items)
    ]


def stratified_split(labels: list[str], valid_pct: float, seed: int) -> list[int]:
    """Indices of the validation part: `valid_pct` of each class, chosen with `seed`."""
    if valid_pct <= 0:
        return []
    counts = Counter(labels)
    tiny = sorted(c for c, n in counts.items() if n < 2)
    if tiny:
        raise DataError(
            f"classes {tiny} have a single image, which cannot be split into train and valid; "
            "add images, or give a valid/ folder"
        )
    n_valid = max(len(counts), round(valid_pct * len(labels)))
    if n_valid > len(labels) - len(counts):
        raise DataError(
            f"valid_pct={valid_pct} leaves no training image for some class among "
            f"{len(labels)} images and {len(counts)} classes; lower --valid-pct"
        )
    _, valid = train_test_split(
        list(range(len(labels))), test_size=n_valid, stratify=labels, random_state=seed
    )
    return sorted(valid)


def _from_csv(root: Path, csv_path: Path, cfg: DataConfig) -> DataSource:
    if not csv_path.is_absolute() and not csv_path.exists() and root.is_dir():
        csv_path = root / csv_path
    if not csv_path.is_file():
        raise DataError(f"label file {str(csv_path)!r} does not exist")
    base = root if str(root) not in ("", ".") and root.is_dir() else csv_path.parent
    with open(csv_path, newline="", encoding="utf-8-sig") as fh:
        rows = list(csv.reader(fh))
    if not rows:
        raise DataError(f"label file {str(csv_path)!r} is empty")
    path_i, label_i, split_i, body = _csv_columns(rows, cfg, csv_path)
    source = DataSource(root=str(base), classes=[], items=[])
    base_real = os.path.realpath(base)
    for lineno, row in enumerate(body, start=2 if body is not rows else 1):
        if len(row) <= max(path_i, label_i) or not row[path_i].strip():
            source.excluded.append((f"{csv_path}:{lineno}", "row has no path or no label"))
            continue
        rel, label = row[path_i].strip(), row[label_i].strip()
        full = os.path.realpath(base / rel)
        if not os.path.isabs(rel) and os.path.commonpath([full, base_real]) != base_real:
            source.excluded.append((f"{csv_path}:{lineno}", f"path {rel!r} leaves {base}"))
        elif not os.path.isfile(full):
            source.excluded.append((str(base / rel), f"listed in {csv_path.name}:{lineno} but missing"))
        elif not label:
            source.excluded.append((str(base / rel), f"empty label in {csv_path.name}:{lineno}"))
        else:
            split = _csv_split(row[split_i]) if split_i is not None and len(row) > split_i else ""
            source.items.append(Item(str(base / rel), label, split))
    return source


def _csv_columns(
    rows: list[list[str]], cfg: DataConfig, csv_path: Path
) -> tuple[int, int, int | None, list[list[str]]]:
    header = [h.strip().lower() for h in rows[0]]
    named = cfg.csv_path_col or cfg.csv_label_col
    has_header = named or any(h in PATH_COLUMNS + LABEL_COLUMNS for h in header)
    if not has_header:
        if len(header) < 2:
            raise DataError(f"label file {str(csv_path)!r} needs two columns: path,label")
        return 0, 1, None, rows

    def pick(explicit: str | None, candidates: tuple[str, ...], fallback: int) -> int:
        if explicit:
            if explicit.lower() not in header:
                raise DataError(
                    f"column {explicit!r} not in {str(csv_path)!r}; columns are {rows[0]}"
                )
            return header.index(explicit.lower())
        return next((header.index(c) for c in candidates if c in header), fallback)

    split_i = next((header.index(c) for c in ("split", "is_valid") if c in header), None)
    return pick(cfg.csv_path_col, PATH_COLUMNS, 0), pick(cfg.csv_label_col, LABEL_COLUMNS, 1), split_i, rows[1:]


def _csv_split(value: str) -> str:
    v = value.strip().lower()
    if v in ("true", "1", "yes") or v in VALID_DIR_NAMES:
        return VALID
    if v == TEST:
        return TEST
    return TRAIN if v in ("train", "false", "0", "no") else ""
