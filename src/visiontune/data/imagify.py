"""Non-image data as images: time series -> Gramian Angular Fields or recurrence plots.

Each series is shrunk (or stretched) to `size` points by piecewise aggregate approximation
(PAA: the mean of `size` equal, fractionally weighted segments; linear interpolation when
the series is shorter), rescaled to [-1, 1], and drawn as a `size` x `size` greyscale PNG:

- gasf: cos(phi_i + phi_j), gadf: sin(phi_i - phi_j), with phi = arccos(x) (Wang & Oates 2015);
- recurrence: |x_i - x_j| / 2 (distance between states; 0 = recurrence).

`imagify(csv, out)` writes `out/<label>/<name>.png`, ready for `visiontune train out`.
Wide tables: one series per row (every numeric column but the label and group columns, in
order; trailing empty cells allowed). Long tables (`value_col`): one series down the rows,
cut into windows of `window` points every `stride`, labelled by the most common label
inside. Rows with NaN, a constant series or fewer than `min_length` points are reported,
not drawn.

Groups keep overlapping windows out of two splits: every image's group (its recording) is
written to `out/groups.csv`, which `train`, `cv` and `compare` read, so that one group's
images never straddle train/valid or two folds. The group is the `group_col` value when
given (a recording, a patient, a sensor session: windows never cross two of them), else
the row (wide tables) or, for one long series, a block of `BLOCK_WINDOWS` windows' worth of
points: windows never cross a block boundary, so windows of different groups never
overlap (the few windows that would straddle a boundary are not drawn).
"""

from __future__ import annotations

import csv
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from visiontune.errors import ConfigError, DataError
from visiontune.files import write_csv

KINDS = ("gasf", "gadf", "recurrence")
BLOCK_WINDOWS = 10  # one long series without a group column: groups of 10 windows' length
GROUPS_FILE = "groups.csv"


def paa(series: np.ndarray, size: int) -> np.ndarray:
    """Piecewise aggregate approximation to `size` points (interpolation when shorter)."""
    x = np.asarray(series, dtype=np.float64)
    n = len(x)
    if n == size:
        return x.copy()
    if n < size:
        return np.interp(np.linspace(0, n - 1, size), np.arange(n), x)
    edges = np.linspace(0, n, size + 1)  # segment boundaries in sample units
    cumulative = np.concatenate([[0.0], np.cumsum(x)])

    def integral(t: np.ndarray) -> np.ndarray:  # sum of x over [0, t), fractional samples weighted
        whole = np.floor(t).astype(int)
        part = t - whole
        return cumulative[whole] + part * x[np.minimum(whole, n - 1)]

    return (integral(edges[1:]) - integral(edges[:-1])) / (edges[1:] - edges[:-1])


def rescale(series: np.ndarray) -> np.ndarray:
    """Min-max to [-1, 1]; a constant series is rejected by the caller."""
    lo, hi = float(series.min()), float(series.max())
    return (2 * series - hi - lo) / (hi - lo)


def gramian_field(x: np.ndarray, kind: str = "gasf") -> np.ndarray:
    """`x` already in [-1, 1]: GASF = cos(phi_i + phi_j), GADF = sin(phi_i - phi_j)."""
    phi = np.arccos(np.clip(x, -1.0, 1.0))
    if kind == "gasf":
        return np.cos(phi[:, None] + phi[None, :])
    if kind == "gadf":
        return np.sin(phi[:, None] - phi[None, :])
    raise ConfigError(f"kind {kind!r} is not a Gramian field; use gasf or gadf")


def recurrence_plot(x: np.ndarray) -> np.ndarray:
    """`x` in [-1, 1]: |x_i - x_j| / 2, in [0, 1]."""
    return np.abs(x[:, None] - x[None, :]) / 2.0


def series_to_image(series: np.ndarray, kind: str = "gadf", size: int = 64) -> np.ndarray:
    """uint8 (size, size) image of one series."""
    x = rescale(paa(series, size))
    if kind == "recurrence":
        unit = recurrence_plot(x)
    else:
        unit = (gramian_field(x, kind) + 1.0) / 2.0
    return np.clip(np.rint(unit * 255), 0, 255).astype(np.uint8)


@dataclass
class ImagifyReport:
    written: dict[str, int] = field(default_factory=dict)  # label -> images
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (row or window, reason)
    out: str = ""

    def format(self) -> str:
        lines = [f"wrote {sum(self.written.values())} images to {self.out}: "
                 + ", ".join(f"{k}={v}" for k, v in sorted(self.written.items()))]
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)}:")
            lines += [f"  {where}: {why}" for where, why in self.skipped[:20]]
        return "\n".join(lines)


def problem(series: np.ndarray, min_length: int) -> str | None:
    if len(series) < min_length:
        return f"too short ({len(series)} points, need {min_length})"
    if not np.all(np.isfinite(series)):
        return "NaN or infinite values"
    if float(series.max()) == float(series.min()):
        return "constant series (no shape to draw)"
    return None


def imagify(table: str | os.PathLike[str], out: str | os.PathLike[str], *, kind: str = "gadf",
            label_col: str = "label", value_col: str | None = None, window: int | None = None,
            stride: int | None = None, size: int = 64, min_length: int = 8,
            group_col: str | None = None) -> ImagifyReport:
    """Draw every series (row, or window of `value_col`) of a CSV into `out/<label>/`, and
    each image's group into `out/groups.csv` (see the module docstring)."""
    if kind not in KINDS:
        raise ConfigError(f"kind {kind!r} unknown; choose one of {', '.join(KINDS)}")
    if size < 2:
        raise ConfigError(f"size must be >= 2, got {size}")
    rows, header = _read_table(Path(table))
    for what, col in (("--csv-label-col", label_col), ("--group-col", group_col)):
        if col is not None and col not in header:
            raise DataError(f"no column {col!r} in {str(table)!r}; columns: {header}; use {what}")
    if value_col is not None:
        series_list = _windows(rows, header, label_col, value_col, window, stride, group_col)
    else:
        series_list = _wide_rows(rows, header, label_col, window, stride, group_col)
    report = ImagifyReport(out=str(out))
    folders = _folders({s.label for s in series_list if s.label})
    groups: list[tuple[str, str]] = []
    for s in series_list:
        why = problem(s.values, min_length) if s.label else "empty label"
        if why:
            report.skipped.append((s.name, why))
            continue
        rel = f"{folders[s.label]}/{s.name}.png"
        _save_png(Path(out) / rel, series_to_image(s.values, kind, size))
        groups.append((rel, s.group))
        report.written[s.label] = report.written.get(s.label, 0) + 1
    if not report.written:
        raise DataError(f"no usable series in {str(table)!r}\n{report.format()}")
    write_csv(Path(out) / GROUPS_FILE, ["path", "group"], groups)
    return report


@dataclass(frozen=True)
class Series:
    name: str  # file name without extension, unique in the table
    label: str
    values: np.ndarray
    group: str


def _folders(labels: set[str]) -> dict[str, str]:
    """label -> folder name; two labels that would share a folder are an error."""
    folders = {label: safe_folder_name(label) for label in sorted(labels)}
    clash: dict[str, list[str]] = {}
    for label, folder in folders.items():
        clash.setdefault(folder.lower(), []).append(label)
    both = [v for v in clash.values() if len(v) > 1]
    if both:
        raise DataError(f"labels {both[0]} would share the folder {folders[both[0][0]]!r}; rename them so that "
                        "they differ in letters or digits")
    return folders


def _read_table(path: Path) -> tuple[list[list[str]], list[str]]:
    if not path.is_file():
        raise DataError(f"table {str(path)!r} does not exist")
    with open(path, newline="", encoding="utf-8-sig") as fh:
        rows = list(csv.reader(fh))
    if len(rows) < 2:
        raise DataError(f"table {str(path)!r} needs a header row and at least one data row")
    return rows[1:], [h.strip() for h in rows[0]]


def _number(text: str) -> float:
    text = text.strip()
    if text == "" or text.lower() in ("nan", "na", "null"):
        return math.nan
    try:
        return float(text)
    except ValueError:
        return math.nan


def _wide_rows(rows: list[list[str]], header: list[str], label_col: str, window: int | None,
               stride: int | None, group_col: str | None) -> list[Series]:
    li = header.index(label_col)
    gi = header.index(group_col) if group_col else None
    out = []
    for r, row in enumerate(rows, start=2):
        cells = [c for i, c in enumerate(row) if i not in (li, gi)]
        while cells and cells[-1].strip() == "":  # ragged rows: shorter series
            cells.pop()
        values = np.array([_number(c) for c in cells])
        label = row[li].strip() if li < len(row) else ""
        group = row[gi].strip() if gi is not None and gi < len(row) else f"row{r:06d}"
        for start, chunk in _cut(values, window, stride):
            suffix = f"_w{start}" if window else ""
            out.append(Series(f"row{r:06d}{suffix}", label, chunk, group))
    return out


def _windows(rows: list[list[str]], header: list[str], label_col: str, value_col: str, window: int | None,
             stride: int | None, group_col: str | None) -> list[Series]:
    if value_col not in header:
        raise DataError(f"no column {value_col!r}; columns: {header}")
    if not window:
        raise ConfigError("a long table (--value-col) needs --window (points per image)")
    vi, li = header.index(value_col), header.index(label_col)
    values = np.array([_number(row[vi]) if vi < len(row) else math.nan for row in rows])
    labels = [row[li].strip() if li < len(row) else "" for row in rows]
    out = []
    for group, lo, hi in _recordings(rows, header, group_col, window):
        for start, chunk in _cut(values[lo:hi], window, stride):
            label = Counter(labels[lo + start: lo + start + window]).most_common(1)[0][0]
            out.append(Series(f"{safe_folder_name(group)}_w{lo + start:08d}", label, chunk, group))
    return out


def _recordings(rows: list[list[str]], header: list[str], group_col: str | None,
                window: int) -> list[tuple[str, int, int]]:
    """(group, first row, end row) of each stretch that windows stay inside: runs of one
    `group_col` value, else blocks of BLOCK_WINDOWS windows' length."""
    if group_col is None:
        block = BLOCK_WINDOWS * window
        return [(f"block{lo // block:05d}", lo, min(lo + block, len(rows))) for lo in range(0, len(rows), block)]
    gi = header.index(group_col)
    keys = [row[gi].strip() if gi < len(row) else "" for row in rows]
    runs, lo = [], 0
    for i in range(1, len(keys) + 1):
        if i == len(keys) or keys[i] != keys[lo]:
            runs.append((keys[lo], lo, i))
            lo = i
    return runs


def _cut(values: np.ndarray, window: int | None, stride: int | None) -> list[tuple[int, np.ndarray]]:
    if not window:
        return [(0, values)]
    if window < 2:
        raise ConfigError(f"window must be >= 2, got {window}")
    step = stride or window
    if step < 1:
        raise ConfigError(f"stride must be >= 1, got {step}")
    return [(s, values[s:s + window]) for s in range(0, max(1, len(values) - window + 1), step)]


def safe_folder_name(label: str) -> str:
    """A folder name for `label` that stays inside the output folder and is not hidden:
    letters, digits and "-_. " kept, anything else (path separators...) becomes "_",
    leading dots too (".." and ".hidden" would escape or hide)."""
    name = "".join(c if c.isalnum() or c in "-_. " else "_" for c in label).strip()
    stripped = name.lstrip(".")
    return "_" * (len(name) - len(stripped)) + stripped if name else "_"


def _save_png(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image, mode="L").save(path)
