"""Non-image data as images: time series -> Gramian Angular Fields or recurrence plots.

Each series is shrunk (or stretched) to `size` points by piecewise aggregate approximation
(PAA: the mean of `size` equal, fractionally weighted segments; linear interpolation when
the series is shorter), rescaled to [-1, 1], and drawn as a `size` x `size` greyscale PNG:

- gasf: cos(phi_i + phi_j), gadf: sin(phi_i - phi_j), with phi = arccos(x) (Wang & Oates 2015);
- recurrence: |x_i - x_j| / 2 (distance between states; 0 = recurrence).

`imagify(csv, out)` writes `out/<label>/<name>.png`, ready for `visiontune train out`.
Wide tables: one series per row (every numeric column but the label column, in order;
trailing empty cells allowed). Long tables (`value_col`): one series down the rows, cut
into windows of `window` points every `stride`, labelled by the most common label inside.
Rows with NaN, a constant series or fewer than `min_length` points are reported, not drawn.
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

KINDS = ("gasf", "gadf", "recurrence")


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
            stride: int | None = None, size: int = 64, min_length: int = 8) -> ImagifyReport:
    """Draw every series (row, or window of `value_col`) of a CSV into `out/<label>/`."""
    if kind not in KINDS:
        raise ConfigError(f"kind {kind!r} unknown; choose one of {', '.join(KINDS)}")
    if size < 2:
        raise ConfigError(f"size must be >= 2, got {size}")
    rows, header = _read_table(Path(table))
    if label_col not in header:
        raise DataError(f"no column {label_col!r} in {str(table)!r}; columns: {header}; use --label-col")
    if value_col is not None:
        series_list = _windows(rows, header, label_col, value_col, window, stride)
    else:
        series_list = _wide_rows(rows, header, label_col, window, stride)
    report = ImagifyReport(out=str(out))
    for name, label, values in series_list:
        why = problem(values, min_length) if label else "empty label"
        if why:
            report.skipped.append((name, why))
            continue
        _save_png(Path(out) / _safe(label) / f"{name}.png", series_to_image(values, kind, size))
        report.written[label] = report.written.get(label, 0) + 1
    if not report.written:
        raise DataError(f"no usable series in {str(table)!r}\n{report.format()}")
    return report


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
               stride: int | None) -> list[tuple[str, str, np.ndarray]]:
    li = header.index(label_col)
    out = []
    for r, row in enumerate(rows, start=2):
        cells = [c for i, c in enumerate(row) if i != li]
        while cells and cells[-1].strip() == "":  # ragged rows: shorter series
            cells.pop()
        values = np.array([_number(c) for c in cells])
        label = row[li].strip() if li < len(row) else ""
        for start, chunk in _cut(values, window, stride):
            suffix = f"_w{start}" if window else ""
            out.append((f"row{r:06d}{suffix}", label, chunk))
    return out


def _windows(rows: list[list[str]], header: list[str], label_col: str, value_col: str, window: int | None,
             stride: int | None) -> list[tuple[str, str, np.ndarray]]:
    if value_col not in header:
        raise DataError(f"no column {value_col!r}; columns: {header}")
    if not window:
        raise ConfigError("a long table (--value-col) needs --window (points per image)")
    vi, li = header.index(value_col), header.index(label_col)
    values = np.array([_number(row[vi]) if vi < len(row) else math.nan for row in rows])
    labels = [row[li].strip() if li < len(row) else "" for row in rows]
    out = []
    for start, chunk in _cut(values, window, stride):
        label = Counter(labels[start:start + window]).most_common(1)[0][0]
        out.append((f"window{start:08d}", label, chunk))
    return out


def _cut(values: np.ndarray, window: int | None, stride: int | None) -> list[tuple[int, np.ndarray]]:
    if not window:
        return [(0, values)]
    if window < 2:
        raise ConfigError(f"window must be >= 2, got {window}")
    step = stride or window
    if step < 1:
        raise ConfigError(f"stride must be >= 1, got {step}")
    return [(s, values[s:s + window]) for s in range(0, max(1, len(values) - window + 1), step)]


def _safe(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_. " else "_" for c in label).strip() or "_"


def _save_png(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image, mode="L").save(path)
