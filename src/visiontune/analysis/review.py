"""`visiontune review --label to_label.csv`: label the suggested images in the browser.

A page on localhost shows the images of a suggestions CSV (`visiontune suggest`) whose
label is still empty, one by one, with the model's guess pre-filled: Enter accepts it, a
digit key picks a class (1 = the first, as the page lists them), `s` skips, and the text
box takes anything else (a new class, a label set, a number). Each answer is written into
the CSV's label column at once (atomically: the file is whole at every moment), so
`visiontune train --csv to_label.csv` and the next `suggest` read it back. Images are
served by row number only: the page can show the CSV's files and nothing else.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations at run
# time (fastapi is an optional extra, imported inside create_review_app).
import csv
import html
import json
import os
import threading
from pathlib import Path
from typing import Any

from visiontune.data.tables import suggestion_table
from visiontune.errors import DataError, VisiontuneError
from visiontune.files import atomic_write

# both review pages: a button per class (keys 1-9), each calling the page's own pick(c)
CLASS_BUTTONS = """const CLASSES = __CLASSES__;
const $ = (id) => document.getElementById(id);
CLASSES.forEach((c, i) => { const b = document.createElement('button');
  b.innerHTML = (i < 9 ? '<span class="key">' + (i + 1) + '</span> ' : '') + c.replace(/</g, '&lt;');
  b.onclick = () => pick(c); $('classes').appendChild(b); });"""

PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>visiontune review</title>
<style>body{font-family:system-ui,sans-serif;max-width:720px;margin:2em auto}
img{max-width:100%;max-height:60vh;display:block;margin:1em 0;image-rendering:pixelated;min-width:224px}
button{margin:.2em;padding:.4em .8em}.key{font-weight:bold;color:#555}#guess{font-size:1.2em}
.muted{color:#777}</style></head><body>
<h1>Label the suggested images</h1>
<p class="muted">__FILE__ &middot; Enter: accept the guess &middot; 1-9: that class &middot; s: skip
&middot; or type a label and press Enter</p>
<div id="item"><p id="progress"></p><img id="image" alt="">
<p id="guess"></p><p id="reason" class="muted"></p>
<div id="classes"></div><input id="text" placeholder="another label" autocomplete="off"></div>
<p id="done" hidden></p>
<script>
__BUTTONS__
let queue = [], at = 0, answered = 0;
function pick(c) { answer(c); }
function show() {
  if (at >= queue.length) { $('item').hidden = true; $('done').hidden = false;
    $('done').textContent = 'Done: ' + answered + ' labelled, ' + (queue.length - answered) + ' skipped.'; return; }
  const it = queue[at];
  $('progress').textContent = (at + 1) + ' of ' + queue.length + ': ' + it.name;
  $('image').src = '/image/' + it.row;
  $('guess').textContent = it.prediction ? 'guess: ' + it.prediction : 'no guess (press a key or type)';
  $('reason').textContent = it.reason; $('text').value = '';
}
async function answer(label) {
  const it = queue[at];
  if (label !== null) {
    const r = await fetch('/api/label', {method: 'POST', headers: {'Content-Type': 'application/json'},
      body: JSON.stringify({row: it.row, label: label})});
    if (!r.ok) { alert((await r.json()).detail); return; }
    answered++;
  }
  at++; show();
}
document.addEventListener('keydown', (e) => {
  if (at >= queue.length) return;
  const typing = document.activeElement === $('text') && $('text').value !== '';
  if (e.key === 'Enter') { e.preventDefault();
    const label = typing ? $('text').value.trim() : queue[at].prediction;
    if (label) answer(label); return; }
  if (typing || document.activeElement === $('text')) return;
  if (e.key === 's') { answer(null); return; }
  const n = parseInt(e.key, 10);
  if (n >= 1 && n <= Math.min(9, CLASSES.length)) answer(CLASSES[n - 1]);
});
fetch('/api/queue').then((r) => r.json()).then((q) => { queue = q.items; show(); });
</script></body></html>""".replace("__BUTTONS__", CLASS_BUTTONS)


class LabelFile:
    """A suggestions CSV (path, label, prediction, reason, score...): its rows, and answers
    written into its label column, one atomic rewrite each."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"--label {self.path}: no such file (write one with `visiontune suggest POOL --output "
                            f"{self.path}`)")
        table = suggestion_table(self.path)
        if table is None:
            with open(self.path, newline="", encoding="utf-8-sig") as fh:
                first = next(csv.reader(fh), None)
            raise DataError(f"--label {self.path}: not a suggestions CSV (path,label,...): its header is "
                            f"{first or 'empty'}")
        self.rows, self.label_i = table
        header = [h.strip().lower() for h in self.rows[0]]
        self.cells = {name: header.index(name) for name in ("prediction", "reason") if name in header}
        self.lock = threading.Lock()

    def cell(self, row: list[str], name: str) -> str:
        i = self.cells.get(name)
        return row[i] if i is not None and i < len(row) else ""

    def pending(self) -> list[dict[str, Any]]:
        """The rows still without a label, by their row number."""
        return [{"row": n, "name": os.path.basename(r[0]), "prediction": self.cell(r, "prediction"),
                 "reason": self.cell(r, "reason")}
                for n, r in enumerate(self.rows[1:], start=1) if r and not self._label(r).strip()]

    def image(self, row: int) -> str:
        if not 1 <= row < len(self.rows) or not self.rows[row]:
            raise DataError(f"row {row} is not in {self.path}")
        path = Path(self.rows[row][0])
        return str(path if path.is_absolute() else self.path.parent / path)  # as train --csv reads it

    def answer(self, row: int, label: str) -> None:
        self.image(row)
        if not label.strip() or "\n" in label:
            raise DataError(f"label {label!r}: give one line of text")
        with self.lock:
            cells = self.rows[row] + [""] * (self.label_i + 1 - len(self.rows[row]))
            cells[self.label_i] = label.strip()
            self.rows[row] = cells
            atomic_write(self.path, self._write)

    def classes(self) -> list[str]:
        """Class names seen in the file: labels given and the model's guesses."""
        seen = {self._label(r).strip() for r in self.rows[1:] if r} | {self.cell(r, "prediction") for r in self.rows[1:]}
        return sorted(s for s in seen if s)

    def _label(self, row: list[str]) -> str:
        return row[self.label_i] if self.label_i < len(row) else ""

    def _write(self, tmp: str) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            csv.writer(fh).writerows(self.rows)


def create_review_app(label_file: str | os.PathLike[str], classes: list[str] | None = None) -> Any:
    """The review page and its API over `label_file`; `classes`: the buttons (default: the
    labels and guesses in the file)."""
    try:
        from fastapi import FastAPI, HTTPException
        from fastapi.responses import FileResponse, HTMLResponse
    except ImportError:
        raise VisiontuneError("review needs fastapi: pip install 'visiontune[serve]'") from None
    labels = LabelFile(label_file)
    names = classes or labels.classes()
    page = PAGE.replace("__FILE__", html.escape(str(labels.path))).replace(
        "__CLASSES__", json.dumps(names).replace("</", "<\\/"))
    app = FastAPI(title="visiontune review")

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return page

    @app.get("/api/queue")
    def queue() -> dict:
        return {"classes": names, "items": labels.pending()}

    @app.get("/image/{row}")
    def image(row: int) -> Any:
        try:
            return FileResponse(labels.image(row))
        except DataError as exc:
            raise HTTPException(404, str(exc)) from None

    @app.post("/api/label")
    def label(answer: dict) -> dict:
        try:
            labels.answer(int(answer.get("row", -1)), str(answer.get("label", "")))
        except (DataError, ValueError) as exc:
            raise HTTPException(400, str(exc)) from None
        return {"ok": True, "remaining": len(labels.pending())}

    return app


def serve_page(app: Any, host: str = "127.0.0.1", port: int = 8001) -> None:
    """Serve a review page (this one, or analysis/run_review.py's) until Ctrl+C."""
    try:
        import uvicorn
    except ImportError:
        raise VisiontuneError("review needs uvicorn: pip install 'visiontune[serve]'") from None
    uvicorn.run(app, host=host, port=port, log_level="warning")
