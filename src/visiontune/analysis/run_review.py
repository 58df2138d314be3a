"""`visiontune review RUN [DATA]`: go through what interpret found, in the browser.

fastai's `ImageClassifierCleaner`, for the whole run and outside a notebook. A page on
localhost lists the images `interpret` flagged (RUN/interpret/: suspected mislabels, top
losses, near-duplicates, outliers; interpret runs first when they are missing), one by
one, with the image, its Grad-CAM, the given label, the model's and the reasons. Each
decision is written at once (atomically) into RUN/review/:

- `corrections.csv` (path,label): relabelled images, the file `train --relabel` reads;
- `exclude.txt` (one path per line): excluded images, the file `train --exclude` reads;
- `kept.txt`: images looked at and kept (so they are not shown again).

Keys: Enter takes the model's label, 1-9 a class (the given one: keep), `k` keeps, `x`
excludes, `s` skips; a later decision on an image replaces the earlier one. The user's
files are never touched; images are served by their place in the list only.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations at run time.
import csv
import html
import json
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from visiontune.analysis.review import CLASS_BUTTONS
from visiontune.bundle import Bundle, load_bundle, run_splits
from visiontune.data.labels import label_text
from visiontune.errors import DataError, VisiontuneError
from visiontune.files import atomic_write, write_csv, write_text

log = logging.getLogger(__name__)

REVIEW_DIR = "review"
CORRECTIONS, EXCLUDE, KEPT = "corrections.csv", "exclude.txt", "kept.txt"


@dataclass
class Case:
    """One flagged image: why, and what the model says."""

    path: str
    label: str  # the given label, as a table cell
    suggested: str = ""  # the model's label (a suspected mislabel's or a top loss's prediction)
    reasons: list[str] = field(default_factory=list)
    order: float = 0.0  # smaller first: mislabels, then top losses, duplicates, outliers


def _rows(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def flagged(run: Path, bundle: Bundle, data: str | None = None) -> list[Case]:
    """The images interpret flagged in RUN/interpret/, one case each (reasons merged), in
    the order they are best looked at; interpret runs first if it has not."""
    views = run / "interpret"
    if not (views / "top_losses.csv").is_file():
        from visiontune.analysis.interpret import interpret

        log.info("review: running interpret first (its views are what the page lists)")
        interpret(run, data)
    delim = bundle.config.data.label_delim if bundle.config else " "
    cases: dict[str, Case] = {}

    def case(path: str, label: str, order: float) -> Case:
        found = cases.setdefault(os.path.realpath(path), Case(path, label, order=order))
        found.order = min(found.order, order)
        return found

    for r in _rows(views / "mislabels.csv"):
        if r.get("flagged", "").lower() in ("true", "1", "yes"):
            c = case(r["path"], r["label"], float(r["rank"]))
            c.suggested = c.suggested or r["suspected"]
            c.reasons.append(f"suspected mislabel #{r['rank']}: p(given) {float(r['p_label']):.2f}, "
                             f"p({r['suspected']}) {float(r['p_suspected']):.2f}")
    for i, r in enumerate(_rows(views / "top_losses.csv")):
        c = case(r["path"], r["actual"], 1e4 + i)
        c.suggested = c.suggested or r["predicted"]
        c.reasons.append(f"top loss #{i + 1}: loss {float(r['loss']):.2f}, predicted {r['predicted']}")
    labels = {os.path.realpath(p): label_text(y, delim) for p, y, _ in run_splits(run, bundle.task, delim)}
    for i, r in enumerate(_rows(views / "duplicates.csv")):
        crosses = r.get("crosses_splits", "").lower() in ("true", "1", "yes")
        for this, other, split in ((r["a"], r["b"], r["split_b"]), (r["b"], r["a"], r["split_a"])):
            c = case(this, labels.get(os.path.realpath(this), ""), 2e4 + i)
            c.reasons.append(f"{r['kind']} duplicate of {os.path.basename(other)} ({split}"
                             f"{', across splits: a leak' if crosses else ''})")
    for r in _rows(views / "outliers.csv"):
        c = case(r["path"], r["label"], 3e4 + float(r["rank"]))
        c.reasons.append(f"outlier #{r['rank']}: atypicality {float(r['atypicality']):.2f}")
    return sorted(cases.values(), key=lambda c: c.order)


class Decisions:
    """RUN/review/: corrections.csv, exclude.txt and kept.txt, rewritten whole (atomically)
    after each decision; what an earlier session decided is read back."""

    def __init__(self, run: Path) -> None:
        self.dir = run / REVIEW_DIR
        self.relabelled = {r["path"]: r["label"] for r in _rows(self.dir / CORRECTIONS)}
        self.excluded = self._lines(EXCLUDE)
        self.kept = self._lines(KEPT)
        self.lock = threading.Lock()

    def _lines(self, name: str) -> list[str]:
        path = self.dir / name
        return [line for line in path.read_text(encoding="utf-8").splitlines() if line] if path.is_file() else []

    def decided(self, path: str) -> bool:
        return path in self.relabelled or path in self.excluded or path in self.kept

    def decide(self, case: Case, action: str, label: str = "") -> None:
        if action not in ("keep", "exclude", "relabel"):
            raise DataError(f"decision {action!r}: keep, exclude or relabel")
        if action == "relabel" and (not label.strip() or "\n" in label):
            raise DataError(f"relabel {case.path}: give the new label (one line)")
        if action == "relabel" and label.strip() == case.label:
            action = "keep"  # the given label chosen again
        with self.lock:
            self.relabelled.pop(case.path, None)
            self.excluded = [p for p in self.excluded if p != case.path]
            self.kept = [p for p in self.kept if p != case.path]
            if action == "relabel":
                self.relabelled[case.path] = label.strip()
            else:
                (self.excluded if action == "exclude" else self.kept).append(case.path)
            self.dir.mkdir(parents=True, exist_ok=True)
            write_csv(self.dir / CORRECTIONS, ["path", "label"], sorted(self.relabelled.items()))
            write_text(self.dir / EXCLUDE, "".join(f"{p}\n" for p in self.excluded))
            write_text(self.dir / KEPT, "".join(f"{p}\n" for p in self.kept))


PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>visiontune review: __RUN__</title>
<style>body{font-family:system-ui,sans-serif;max-width:960px;margin:2em auto}
.pics{display:flex;gap:1em}.pics img{width:45%;max-height:55vh;object-fit:contain;image-rendering:pixelated}
button{margin:.2em;padding:.4em .8em}.key{font-weight:bold;color:#555}.muted{color:#777}
#labels{font-size:1.2em}</style></head><body>
<h1>Review __RUN__</h1>
<p class="muted">Enter: the model's label &middot; 1-9: that class &middot; k: keep &middot; x: exclude
&middot; s: skip. Decisions go to __DIR__ at once.</p>
<div id="item"><p id="progress"></p>
<div class="pics"><img id="image" alt="image"><img id="cam" alt="Grad-CAM"></div>
<p id="labels"></p><ul id="reasons" class="muted"></ul>
<div id="classes"></div><button id="keep"><span class="key">k</span> keep</button>
<button id="exclude"><span class="key">x</span> exclude</button></div>
<p id="done" hidden></p>
<script>
__BUTTONS__
let queue = [], at = 0, decided = 0;
function pick(c) { decide('relabel', c); }
$('keep').onclick = () => decide('keep'); $('exclude').onclick = () => decide('exclude');
function show() {
  if (at >= queue.length) { $('item').hidden = true; $('done').hidden = false;
    $('done').textContent = 'Done: ' + decided + ' decided, ' + (queue.length - decided) + ' skipped.'; return; }
  const it = queue[at];
  $('progress').textContent = (at + 1) + ' of ' + queue.length + ': ' + it.name;
  $('image').src = '/image/' + it.index; $('cam').src = '/cam/' + it.index;
  $('labels').textContent = 'given: ' + it.label + (it.suggested ? '   model: ' + it.suggested : '');
  $('reasons').innerHTML = '';
  it.reasons.forEach((r) => { const li = document.createElement('li'); li.textContent = r; $('reasons').appendChild(li); });
}
async function decide(action, label) {
  if (action !== null) {
    const r = await fetch('/api/decide', {method: 'POST', headers: {'Content-Type': 'application/json'},
      body: JSON.stringify({index: queue[at].index, action: action, label: label || ''})});
    if (!r.ok) { alert((await r.json()).detail); return; }
    decided++;
  }
  at++; show();
}
document.addEventListener('keydown', (e) => {
  if (at >= queue.length) return;
  const it = queue[at];
  if (e.key === 'Enter') { e.preventDefault(); if (it.suggested) decide('relabel', it.suggested); return; }
  if (e.key === 'k') { decide('keep'); return; }
  if (e.key === 'x') { decide('exclude'); return; }
  if (e.key === 's') { decide(null); return; }
  const n = parseInt(e.key, 10);
  if (n >= 1 && n <= Math.min(9, CLASSES.length)) decide('relabel', CLASSES[n - 1]);
});
fetch('/api/queue').then((r) => r.json()).then((q) => { queue = q.items; show(); });
</script></body></html>""".replace("__BUTTONS__", CLASS_BUTTONS)


class RunReview:
    """What the page shows and records: the flagged cases, the decisions, Grad-CAMs."""

    def __init__(self, run: str | os.PathLike[str], data: str | None = None, device: str = "auto") -> None:
        from visiontune.runtime.device import resolve_device

        self.run = Path(run)
        self.bundle = load_bundle(self.run)  # a bad run is an error before the page exists
        self.cases = flagged(self.run, self.bundle, data)
        self.decisions = Decisions(self.run)
        self.device = resolve_device(device)
        self.bundle.model.to(self.device)
        self.cams = self.run / REVIEW_DIR / "gradcam"

    def case(self, index: int) -> Case:
        if not 0 <= index < len(self.cases):
            raise DataError(f"no case {index}")
        return self.cases[index]

    def queue(self) -> list[dict[str, Any]]:
        """The cases not decided yet, by their place in the list."""
        return [{"index": i, "name": os.path.basename(c.path), "path": c.path, "label": c.label,
                 "suggested": c.suggested, "reasons": c.reasons}
                for i, c in enumerate(self.cases) if not self.decisions.decided(c.path)]

    def cam(self, index: int) -> Path:
        """The case's Grad-CAM as a PNG (made once, kept in RUN/review/gradcam/)."""
        from visiontune.analysis.interpret import explain
        from visiontune.plots import grid_figure

        target = self.cams / f"{index}.png"
        if not target.is_file():
            views = explain(self.bundle, self.device, self.case(index).path)
            figure = grid_figure([v[0] for v in views], [v[2] for v in views], [v[1] for v in views],
                                 cols=max(1, len(views)))
            atomic_write(target, lambda tmp: figure.savefig(tmp, format="png", dpi=80))
        return target

    def page(self) -> str:
        return PAGE.replace("__RUN__", html.escape(self.run.name)).replace(
            "__DIR__", html.escape(str(self.run / REVIEW_DIR))).replace(
            "__CLASSES__", json.dumps(self.bundle.task.classes).replace("</", "<\\/"))


def create_run_review_app(run: str | os.PathLike[str], data: str | None = None, device: str = "auto") -> Any:
    """The page and its API over the cases interpret flagged in `run` (see the module
    docstring)."""
    try:
        from fastapi import FastAPI, HTTPException
        from fastapi.responses import FileResponse, HTMLResponse
    except ImportError:
        raise VisiontuneError("review needs fastapi: pip install 'visiontune[serve]'") from None
    review = RunReview(run, data, device)
    app = FastAPI(title="visiontune review")

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return review.page()

    @app.get("/api/queue")
    def queue() -> dict:
        return {"classes": review.bundle.task.classes, "items": review.queue()}

    @app.get("/image/{index}")
    def image(index: int) -> Any:
        try:
            return FileResponse(review.case(index).path)
        except DataError as exc:
            raise HTTPException(404, str(exc)) from None

    @app.get("/cam/{index}")
    def cam(index: int) -> Any:
        try:
            return FileResponse(review.cam(index), media_type="image/png")
        except (VisiontuneError, OSError) as exc:
            raise HTTPException(404, f"no Grad-CAM: {exc}") from None

    @app.post("/api/decide")
    def decide(answer: dict) -> dict:
        try:
            review.decisions.decide(review.case(int(answer.get("index", -1))), str(answer.get("action", "")),
                                    str(answer.get("label", "")))
        except (DataError, ValueError) as exc:
            raise HTTPException(400, str(exc)) from None
        return {"ok": True}

    return app

