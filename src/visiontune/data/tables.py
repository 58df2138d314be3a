"""Labels from tables: a CSV of path,label[,split][,group], and the path lists of
--relabel / --exclude / groups files. Cells are read as `files.read_csv` reads them: one
leading single quote (what visiontune's CSVs, and spreadsheets, put before text that would
run as a formula) is not part of the value."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

from visiontune.config import DataConfig
from visiontune.data.items import TEST, TRAIN, VALID, DataSource, Item
from visiontune.errors import DataError
from visiontune.files import read_csv
from visiontune.tasks.catalog import TASKS, task_class
from visiontune.tasks.labels import MULTI_LABEL_COLUMNS, SINGLE, Label, parse_label_set

VALID_DIR_NAMES = ("valid", "val", "validation")
PATH_COLUMNS = ("path", "file", "filename", "file_name", "image", "image_name", "fname")
LABEL_COLUMNS = ("label", "class", "target", "category", *MULTI_LABEL_COLUMNS)

log = logging.getLogger(__name__)


def suggestion_label(header: list[str]) -> int | None:
    """The label column's index when `header` (lower case) is a suggestions CSV's (what
    `visiontune suggest` writes: path, the task's label column, prediction, ...); None for
    a table of another shape."""
    columns = ["label", *(t.form.label_column for t in TASKS.values())]
    if header[:1] != ["path"] or "prediction" not in header:
        return None
    return next((header.index(c) for c in columns if c in header), None)


def suggestion_table(path: str | os.PathLike[str]) -> tuple[list[list[str]], int] | None:
    """The rows (header first) of a suggestions CSV (`suggestion_label`) and its label
    column's index; None for a file of another shape."""
    rows = read_csv(path)
    label_i = suggestion_label([h.strip().lower() for h in rows[0]] if rows else [])
    return None if label_i is None else (rows, label_i)


def read_path_column(path: str, what: str) -> list[list[str]]:
    """Rows of a path list (one path per row, or a CSV whose first column is the path;
    a header row naming the path column is skipped)."""
    if not os.path.isfile(path):
        raise DataError(f"{what} file {path!r} does not exist")
    rows = [r for r in read_csv(path) if r and r[0].strip()]
    if rows and rows[0][0].strip().lower() in PATH_COLUMNS:
        rows = rows[1:]
    return rows


def read_path_list(path: str | os.PathLike[str], what: str) -> list[str]:
    """The paths of an image list (--exclude, review's exclude.txt and kept.txt): a CSV
    whose header names the path column (`path`, `file`, ...: review's files, interpret's
    mislabels.csv), one path a row; a file without such a header is one path a line, as
    written (the old exclude.txt: a comma is part of the path, never a column break)."""
    if not os.path.isfile(path):
        raise DataError(f"{what} file {str(path)!r} does not exist")
    rows = read_csv(path)  # a file that is not UTF-8 is a DataError here
    header = [h.strip().lower() for h in rows[0]] if rows else []
    column = next((header.index(c) for c in PATH_COLUMNS if c in header), None)
    if column is not None:
        return [r[column].strip() for r in rows[1:] if len(r) > column and r[column].strip()]
    with open(path, encoding="utf-8-sig") as fh:
        return [line.strip() for line in fh.read().splitlines() if line.strip()]


def _locate_csv(root: Path, csv_path: Path) -> Path:
    """A relative --csv names a file in DATA first (`train DATA --csv labels.csv`), then in
    the current folder; when both exist, DATA's is used and the other named in a warning."""
    if csv_path.is_absolute() or str(root) in ("", ".") or not root.is_dir():
        return csv_path
    in_data = root / csv_path
    if in_data.is_file():
        if csv_path.is_file() and not os.path.samefile(csv_path, in_data):
            log.warning("--csv %s: using %s (in DATA), not ./%s in the current folder", csv_path, in_data, csv_path)
        return in_data
    return csv_path


def from_csv(root: Path, csv_path: Path, cfg: DataConfig) -> DataSource:
    csv_path = _locate_csv(root, csv_path)
    if not csv_path.is_file():
        raise DataError(f"label file {str(csv_path)!r} does not exist")
    base = root if str(root) not in ("", ".") and root.is_dir() else csv_path.parent
    rows = read_csv(csv_path)
    if not rows:
        raise DataError(f"label file {str(csv_path)!r} is empty")
    path_i, label_i, split_i, group_i, body = _csv_columns(rows, cfg, csv_path)
    task, detected = csv_task(rows, label_i, body is not rows, cfg)
    answers = body is not rows and suggestion_label([h.strip().lower() for h in rows[0]]) == label_i
    source = DataSource(root=str(base), classes=[], items=[], detected=detected,
                        target_name=rows[0][label_i].strip() if body is not rows and label_i < len(rows[0]) else "")
    base_real = os.path.realpath(base)
    seen: dict[str, tuple[str, Item]] = {}
    for lineno, row in enumerate(body, start=2 if body is not rows else 1):
        if len(row) <= max(path_i, label_i) or not row[path_i].strip():
            source.excluded.append((f"{csv_path}:{lineno}", "row has no path or no label"))
            continue
        rel = row[path_i].strip()
        label = _row_label(row[label_i], task, cfg, f"{csv_path.name}:{lineno}", answers, detected)
        full = os.path.realpath(base / rel)
        if not os.path.isabs(rel) and os.path.commonpath([full, base_real]) != base_real:
            source.excluded.append((f"{csv_path}:{lineno}", f"path {rel!r} leaves {base}"))
        elif not os.path.isfile(full):
            source.excluded.append((str(base / rel), f"listed in {csv_path.name}:{lineno} but missing"))
        elif label is None:
            source.excluded.append((str(base / rel), f"not labelled yet (an empty cell of a suggestions CSV) in "
                                                     f"{csv_path.name}:{lineno}"))
        elif label == "":
            source.excluded.append((str(base / rel), f"empty label in {csv_path.name}:{lineno}"))
        else:
            split = _csv_split(row[split_i]) if split_i is not None and len(row) > split_i else ""
            group = row[group_i].strip() if group_i is not None and len(row) > group_i else ""
            _add_once(source, seen, Item(str(base / rel), label, split, group), full, f"{csv_path.name}:{lineno}",
                      lambda lb: task_class(task).label_text(lb, cfg.label_delim))
    return source


def _add_once(source: DataSource, seen: dict[str, tuple[str, Item]], item: Item, key: str, where: str,
              text: Callable[[Label], str]) -> None:
    """One item per image (`key`: its resolved path): a row that repeats an earlier row's
    image with the same label, split and group is counted once, and the summary says so;
    with another label (or split, or group) it is an error naming both rows, since the
    image would otherwise train twice, or train and validate."""
    if key not in seen:
        seen[key] = (where, item)
        source.items.append(item)
        return
    first_where, first = seen[key]
    for what, mine, theirs in (("label", text(item.label), text(first.label)), ("split", item.split, first.split),
                               ("group", item.group, first.group)):
        if mine != theirs:
            raise DataError(f"{where} lists {item.path!r} again with another {what} ({mine!r}; {first_where} says "
                            f"{theirs!r}): an image has one row. Keep the right row and delete the other")
    source.excluded.append((item.path, f"listed again on {where}, as on {first_where}: counted once"))


def csv_task(rows: list[list[str]], label_i: int, has_header: bool, cfg: DataConfig) -> tuple[str, str]:
    """(task shape, how it was detected): --task, else the task whose `label_columns`
    name the label column (label sets: fastai's and Kaggle's "labels", "tags"; numbers:
    "value", as `suggest` writes them), else single-label."""
    if cfg.task != "auto":
        return cfg.task, ""
    name = rows[0][label_i].strip().lower() if has_header and label_i < len(rows[0]) else ""
    found = next((t for t in TASKS.values() if name and name in t.form.label_columns), None)
    if found is None:
        return SINGLE, ""
    return found.name, f"a {name!r} column of {found.wording.label_kind}s"


def _row_label(text: str, task: str, cfg: DataConfig, where: str, answers: bool = False,
               detected: str = "") -> Label | None:
    """A row's label: the set (multi-label), the number, or the class; None for a row of
    a suggestions CSV (`answers`) not answered yet (`Form.parse_answer`, tasks/form.py). With an explicit
    --task single-label, a cell holding several labels is an error naming the row; a task
    `detected` from the column's name says so when the cell does not fit it."""
    shape = task_class(task)
    try:
        label = (shape.form.parse_answer if answers else shape.parse_label)(text, cfg.label_delim, where)
    except DataError as exc:
        if not detected:
            raise
        raise DataError(f"{exc} (the task, {task}, was read from {detected}; pass --task to read it otherwise)") \
            from None
    # only an explicit --task single-label refuses a cell that reads as a set: under auto,
    # "golden retriever" is one class (a set needs a 'labels'/'tags' column)
    if cfg.task == SINGLE and label and len(parse_label_set(label, cfg.label_delim, where)) > 1:
        raise DataError(f"{where}: {label!r} holds several labels but --task is single-label; use --task "
                        f"multi-label (or, if class names contain {cfg.label_delim!r}, a --label-delim they do not "
                        "contain)")
    return label


def _csv_columns(
    rows: list[list[str]], cfg: DataConfig, csv_path: Path
) -> tuple[int, int, int | None, int | None, list[list[str]]]:
    """(path, label, split, group) column indices and the data rows."""
    header = [h.strip().lower() for h in rows[0]]
    named = cfg.csv_path_col or cfg.csv_label_col
    labels = (*LABEL_COLUMNS, *(c for t in TASKS.values() for c in t.form.label_columns if c not in LABEL_COLUMNS))
    has_header = named or any(h in PATH_COLUMNS + labels for h in header)
    if not has_header:
        if len(header) < 2:
            raise DataError(f"label file {str(csv_path)!r} needs two columns: path,label")
        return 0, 1, None, None, rows

    def pick(explicit: str | None, candidates: tuple[str, ...], fallback: int) -> int:
        if explicit:
            if explicit.lower() not in header:
                raise DataError(
                    f"column {explicit!r} not in {str(csv_path)!r}; columns are {rows[0]}"
                )
            return header.index(explicit.lower())
        return next((header.index(c) for c in candidates if c in header), fallback)

    split_i = next((header.index(c) for c in ("split", "is_valid") if c in header), None)
    group_i = header.index("group") if "group" in header else None
    return (pick(cfg.csv_path_col, PATH_COLUMNS, 0), pick(cfg.csv_label_col, labels, 1), split_i, group_i, rows[1:])


def _csv_split(value: str) -> str:
    v = value.strip().lower()
    if v in ("true", "1", "yes") or v in VALID_DIR_NAMES:
        return VALID
    if v == TEST:
        return TEST
    return TRAIN if v in ("train", "false", "0", "no") else ""
