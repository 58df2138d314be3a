"""HTML for Jupyter: the results' `_repr_html_` build their tables and figures here.

Plain strings, escaped; images inlined as base64 PNG so a saved notebook keeps them.
Imports nothing heavy: results render without loading torch.
"""

from __future__ import annotations

import base64
import html
import math
import os
from collections.abc import Iterable, Sequence
from typing import Any


def cell(value: Any) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.4f}"
    return html.escape(str(value))


def table(rows: Iterable[Sequence[Any]], header: Sequence[str], caption: str = "") -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    cap = f"<caption style='caption-side:top;text-align:left'>{html.escape(caption)}</caption>" if caption else ""
    return f"<table class='visiontune'>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def metrics_table(metrics: dict[str, float], caption: str = "") -> str:
    return table([[k, v] for k, v in metrics.items()], ["metric", "value"], caption)


def image(path: str | os.PathLike[str], width: int = 640, title: str = "") -> str:
    """An <img> with the PNG/JPEG file inlined (nothing when the file is missing)."""
    try:
        with open(path, "rb") as fh:
            data = base64.b64encode(fh.read()).decode("ascii")
    except OSError:
        return ""
    kind = "jpeg" if str(path).lower().endswith((".jpg", ".jpeg")) else "png"
    head = f"<h4>{html.escape(title)}</h4>" if title else ""
    return f"{head}<img src='data:image/{kind};base64,{data}' style='max-width:{width}px'/>"


def pre(text: str) -> str:
    return f"<pre>{html.escape(text)}</pre>"
