"""One self-contained HTML page per run (`<run>/interpret/report.html`): images inlined as
data URIs, no scripts, no external files."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

from visiontune.files import write_text
from visiontune.rundir import RunDir, Views
from visiontune.tasks.base import Task

STYLE = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;font-size:.9em}td,th{border:1px solid #ddd;padding:.25em .6em;text-align:left}
th{background:#f3f3f3}img{max-width:100%;border:1px solid #eee}pre{background:#f7f7f7;padding:.8em;overflow:auto}
.warn{color:#b00020;font-weight:bold}"""


def _img(path: Path, alt: str) -> str:
    if not path.is_file():
        return f"<p><em>{html.escape(alt)}: not available</em></p>"
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _section(ident: str, title: str, body: str) -> str:
    return f'<section id="{ident}"><h2>{html.escape(title)}</h2>{body}</section>'


def write_report(path: Path, run: Path, res: Any, items: list[tuple[str, str, str]], task: Task,
                 per_class: list[dict[str, Any]], confused: list[tuple[int, str, str]]) -> None:
    out = Views(path.parent)
    splits = sorted({s for _, _, s in items})
    counts = {s: task.counts([lb for _, lb, split in items if split == s], task.classes) for s in splits}
    data_rows = ([[c, *[counts[s][c] for s in splits]] for c in task.classes] if any(counts.values())  # per class
                 else [["images", *[sum(split == s for _, _, split in items) for s in splits]]])  # a number: no classes
    config_file = RunDir(run).config_file
    config = config_file.read_text(encoding="utf-8") if config_file.is_file() else f"(no {config_file.name})"
    flagged = [s for s in res.suspects if s.flagged]
    leak = (f'<p class="warn">{res.leaks} duplicate pairs cross splits: validation scores are optimistic.</p>'
            if res.leaks else "<p>No duplicates across splits.</p>")
    parts = [
        f"<h1>visiontune report: {html.escape(run.name)}</h1>",
        _section("summary", "Summary", "<p>" + html.escape(f"{res.evaluated_on}: " + " | ".join(
            f"{k} {v:.4f}" for k, v in res.metrics.items()))
                 + f"</p><p>{len(flagged)} suspected mislabels flagged; {len(res.duplicates)} duplicate pairs.</p>"),
        _section("data", "Data", _table(["class", *splits], data_rows)),
        _section("config", "Configuration", f"<pre>{html.escape(config)}</pre>"),
        _section("curves", "Training curves", _img(out.curves, "training curves")),
        _section("confusion", "Confusion matrix", _img(out.confusion, "confusion matrix")
                 + _table(["actual", "predicted", "count"], [[a, p, c] for c, a, p in confused[:10]])),
        _section("per-class", "Per-class report", _table(list(per_class[0]) if per_class else [],
                                                          [[f"{v:.3f}" if isinstance(v, float) else v
                                                            for v in r.values()] for r in per_class])),
        _section("top-losses", "Top losses (predicted/actual, loss, probability)",
                 _img(out.top_losses_png, "top losses")),
        _section("saliency", "Grad-CAM on the top losses", _img(out.gradcam, "Grad-CAM")),
        _section("filters", "First-layer filters", _img(out.filters, "first-layer filters")),
        _section("mislabels", "Suspected mislabels", f"<p>Ranked by out-of-fold p(label); flagged by "
                 f"{html.escape(res.mislabel_method)}.</p>" + _img(out.mislabels_png, "suspected mislabels")
                 + _table(["path", "label", "suspected", "p(label)", "flagged"],
                          [[Path(s.path).name, s.label, s.predicted, f"{s.p_label:.3f}", s.flagged]
                           for s in res.suspects[:20]])),
        _section("outliers", "Most atypical images (far from their neighbours in feature space)",
                 _img(out.outliers_png, "atypical images")
                 + _table(["path", "atypicality"], [[Path(p).name, f"{s:.3f}"] for p, s in res.outliers[:10]])),
        _section("duplicates", "Duplicates and leakage", leak
                 + _table(["a", "b", "splits", "kind", "hamming"],
                          [[Path(d.a).name, Path(d.b).name, f"{d.split_a}/{d.split_b}", d.kind, d.distance]
                           for d in res.duplicates[:50]])),
    ]
    page = f"<!doctype html><html><head><meta charset='utf-8'><title>visiontune report</title>" \
           f"<style>{STYLE}</style></head><body>{''.join(parts)}</body></html>"
    write_text(path, page)
