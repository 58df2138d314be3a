"""`visiontune review RUN [DATA]`: go through what interpret found, in the browser.

fastai's `ImageClassifierCleaner`, for the whole run and outside a notebook. A page on
localhost lists the images `interpret` flagged (RUN/interpret/: suspected mislabels, top
losses, near-duplicates, outliers), one by one, with the image, its Grad-CAM, the given
label, the model's and the reasons (a suspect's evidence as the task reads it:
`task.form.suspicion`, probabilities for classes, residuals for numbers). interpret runs first
when its views are missing, were made for other data than DATA (interpret/source.json
says which, and the folder it ran in, which the views' relative paths are relative to:
the page works from any folder), or by a version without their `suggested` column.

What a label is and how it is given is the run's task's (`task.form`: `label_entry`, `entry`,
`shown`, `change`): a class is chosen, the labels of a set are toggled (the page starts
from the set the evidence points to: the given set with the suspected changes applied),
a number is typed (the box starts from the model's number, every digit). Enter saves what
the entry shows (choose: the model's label), 1-9 a class (not when class names are
numbers: the help line says so), `k` keeps, `x` excludes, `s` skips; a relabel to the
given label is a keep. Each decision is read with the task form's `from_entry` (null, a list
for a class, an object, a number that is none, a class the run lacks: a 400 naming it)
and recorded at once in RUN/review/ (analysis/decisions.py: one append-only log, and
corrections.csv / exclude.txt / kept.txt derived from it, the files `train
--relabel/--exclude` read; rows edited into them by hand are taken into the log); a later
decision on an image replaces the earlier one. The user's files are never touched; images
are served by their place in the list only. Grad-CAMs are kept in RUN/review/gradcam/
under the identity of the image and of the weights, so a re-run of interpret or a retrain
never shows another image's map.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations at run time.
import functools
import html
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from visiontune.analysis.decisions import Decisions
from visiontune.analysis.interpret import data_key, explain, interpret, items_of
from visiontune.analysis.review import ENTRY, STYLE, page_spec, spec_json
from visiontune.bundle import Bundle, load_bundle
from visiontune.errors import DataError, VisiontuneError
from visiontune.files import atomic_write, file_identity, identity_digest, read_csv_dicts
from visiontune.plots import grid_figure
from visiontune.rundir import RunDir, Views, from_folder
from visiontune.tasks.labels import Label

log = logging.getLogger(__name__)

__all__ = ["Case", "RunReview", "create_run_review_app", "flagged"]


@dataclass
class Case:
    """One flagged image: why, and what the model says."""

    path: str
    label: Label  # the given label, in the task's shape
    suggested: Label | None = None  # the label the evidence points to (a mislabel's, a top loss's prediction)
    reasons: list[str] = field(default_factory=list)
    order: float = 0.0  # smaller first: mislabels, then top losses, duplicates, outliers


def _rows(path: Path) -> list[dict[str, str]]:
    return read_csv_dicts(path) if path.is_file() else []


def _views_source(views: Views) -> dict[str, Any]:
    """interpret/source.json: what the views were made from, and where ({} when unknown)."""
    try:
        source = json.loads(views.source.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return source if isinstance(source, dict) else {}


def _views_current(views: Views, data: str | None) -> bool:
    """Whether RUN/interpret/ holds what the page lists, made from `data` by this version."""
    source = _views_source(views)
    header = [next(iter(_rows(path)), {}) for path in (views.top_losses, views.mislabels)]
    return "data" in source and source["data"] == data_key(data) and all("suggested" in h for h in header if h)


class _Flagged:
    """The cases being gathered from the views: one per image of `items` (by resolved
    path), its path as it reads from here (the views' relative paths are relative to the
    folder interpret ran in, `folder`)."""

    def __init__(self, bundle: Bundle, items: list[tuple[str, Label, str]], folder: Any, views: Views) -> None:
        self.task, self.views = bundle.task, views
        self.delim = bundle.config.data.label_delim if bundle.config else " "
        self.folder = folder if isinstance(folder, str) else None
        self.given = {os.path.realpath(p): label for p, label, _ in items}
        self.cases: dict[str, Case] = {}

    def case(self, path: str, order: float, suggested: str | None = None) -> Case | None:
        here = os.path.abspath(from_folder(self.folder, path))
        key = os.path.realpath(here)
        if key not in self.given:
            return None  # not among the images looked at (an --oof file of other data)
        found = self.cases.setdefault(key, Case(here, self.given[key], order=order))
        found.order = min(found.order, order)
        if found.suggested is None and suggested is not None:
            found.suggested = self.task.parse_label(suggested, self.delim,
                                                    f"{self.views.path}: suggested label of {path}")
        return found


def flagged(run: Path, bundle: Bundle, data: str | None = None) -> list[Case]:
    """The images interpret flagged in RUN/interpret/ (for `data`, default the run's own
    images), one case each (reasons merged; paths absolute, from whatever folder), in the
    order they are best looked at."""
    views = RunDir(run).views
    if not _views_current(views, data):
        log.info("review: running interpret first (its views of %s are what the page lists)", data or "the run")
        interpret(run, data)
    found, task = _Flagged(bundle, items_of(run, data, bundle), _views_source(views).get("folder"), views), bundle.task
    for r in _rows(views.mislabels):
        if r.get("flagged", "").lower() in ("true", "1", "yes") and (c := found.case(r["path"], float(r["rank"]),
                                                                                     r["suggested"])):
            c.reasons.append(task.form.suspicion(r["rank"], r["suspected"], float(r["p_label"]), float(r["p_suspected"])))
    for i, r in enumerate(_rows(views.top_losses)):
        if c := found.case(r["path"], 1e4 + i, r["suggested"]):
            c.reasons.append(f"top loss #{i + 1}: loss {float(r['loss']):.2f}, predicted {r['predicted']}")
    for i, r in enumerate(_rows(views.duplicates)):
        crosses = r.get("crosses_splits", "").lower() in ("true", "1", "yes")
        for this, other, split in ((r["a"], r["b"], r["split_b"]), (r["b"], r["a"], r["split_a"])):
            if c := found.case(this, 2e4 + i):
                c.reasons.append(f"{r['kind']} duplicate of {os.path.basename(other)} ({split}"
                                 f"{', across splits: a leak' if crosses else ''})")
    for r in _rows(views.outliers):
        unknown = r.get("unknown") == "true"  # past the model's OOD threshold: first among the outliers
        if c := found.case(r["path"], (2.9e4 if unknown else 3e4) + float(r["rank"])):
            c.reasons.append(f"outlier #{r['rank']}: atypicality {float(r['atypicality']):.2f}"
                             + (f"; unlike the training images (OOD score {float(r['ood_score']):.2f})"
                                if unknown else ""))
    return sorted(found.cases.values(), key=lambda c: c.order)


PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>visiontune review: __RUN__</title>
__STYLE__<style>.pics{display:flex;gap:1em}.pics img{width:45%;max-height:55vh;object-fit:contain;
image-rendering:pixelated}</style></head><body>
<h1>Review __RUN__</h1>
<p class="muted">__HELP__ &middot; k: keep &middot; x: exclude &middot; s: skip. Decisions go to __DIR__ at once.</p>
<div id="item"><p id="progress"></p>
<div class="pics"><img id="image" alt="image"><img id="cam" alt="Grad-CAM"></div>
<p id="labels"></p><ul id="reasons" class="muted"></ul>
<div id="classes"></div><p id="chosen" class="muted" hidden></p>
<input id="text" hidden autocomplete="off" placeholder="the new value">
<button id="keep"><span class="key">k</span> keep</button>
<button id="exclude"><span class="key">x</span> exclude</button></div>
<p id="done" hidden></p>
<script>
__ENTRY__
let queue = [], at = 0, decided = 0;
function submit(label) { decide('relabel', label); }
$('keep').onclick = () => decide('keep'); $('exclude').onclick = () => decide('exclude');
$('text').hidden = SPEC.entry !== 'type';
function show() {
  if (at >= queue.length) { $('item').hidden = true; $('done').hidden = false;
    $('done').textContent = 'Done: ' + decided + ' decided, ' + (queue.length - decided) + ' skipped.'; return; }
  const it = queue[at];
  $('progress').textContent = (at + 1) + ' of ' + queue.length + ': ' + it.name;
  $('image').src = '/image/' + it.index; $('cam').src = '/cam/' + it.index;
  $('labels').textContent = 'given: ' + it.label + (it.change ? '   model: ' + it.change : '');
  $('reasons').innerHTML = '';
  it.reasons.forEach((r) => { const li = document.createElement('li'); li.textContent = r; $('reasons').appendChild(li); });
  setEntry(it.suggested !== null ? it.suggested : it.given);
  if (SPEC.entry === 'type') $('text').focus();
}
async function decide(action, label) {
  if (action !== null) {
    const r = await fetch('/api/decide', {method: 'POST', headers: {'Content-Type': 'application/json'},
      body: JSON.stringify({index: queue[at].index, action: action, label: label === undefined ? '' : label})});
    if (!r.ok) { alert((await r.json()).detail); return; }
    decided++;
  }
  at++; show();
}
document.addEventListener('keydown', (e) => {
  if (at >= queue.length) return;
  const it = queue[at];
  if (e.key === 'Enter') { e.preventDefault();
    if (SPEC.entry !== 'choose') submit(entered()); else if (it.suggested !== null) submit(it.suggested);
    return; }
  if (e.key === 'k') { e.preventDefault(); decide('keep'); return; }  // no number holds k, x or s
  if (e.key === 'x') { e.preventDefault(); decide('exclude'); return; }
  if (e.key === 's') { e.preventDefault(); decide(null); return; }
  digitKey(e);
});
fetch('/api/queue').then((r) => r.json()).then((q) => { queue = q.items; show(); });
</script></body></html>"""

HELP = {"choose": ("Enter: the model's label · 1-9: that class (the given one: keep)",
                   "Enter: the model's label · a button: that class (the given one: keep; the class names are "
                   "numbers, so digit keys pick none)"),
        "toggle": ("1-9 or a button: add / remove that label · Enter: save the set shown (the model's first)",
                   "a button: add / remove that label (the label names are numbers, so digit keys pick none) · "
                   "Enter: save the set shown (the model's first)"),
        "type": ("type the value (the box holds the model's) · Enter: save it",) * 2}


def review_help(spec: dict[str, Any]) -> str:
    """The run page's help line for `spec` (review.page_spec): what the keys do on it."""
    return HELP[spec["entry"]][0 if spec["keys"] or spec["entry"] == "type" else 1]


class RunReview:
    """What the page shows and records: the flagged cases, the decisions, Grad-CAMs."""

    def __init__(self, run: str | os.PathLike[str], data: str | None = None, device: str = "auto") -> None:
        from visiontune.runtime.device import resolve_device

        self.run = Path(run)
        self.review = RunDir(self.run).review  # RUN/review/: where the decisions go
        self.bundle = load_bundle(self.run)  # a bad run is an error before the page exists
        self.delim = self.bundle.config.data.label_delim if self.bundle.config else " "
        self.data = data
        self.cases = flagged(self.run, self.bundle, data)
        self.decisions = Decisions(self.run, self._old_label)
        self.device = resolve_device(device)
        self.bundle.model.to(self.device)
        self.cams = self.review.gradcam

    def case(self, index: int) -> Case:
        if not 0 <= index < len(self.cases):
            raise DataError(f"no case {index}")
        return self.cases[index]

    def _old_label(self, path: str, cell: str) -> str:
        """A label cell of a corrections.csv from before the decision log, as the log
        records it: the task reads it against the image's given label (`Form.read_change`:
        "+dog -cat" from an older page of label sets is the set it leads to)."""
        task, where = self.bundle.task, f"{self.review.corrections}: {path}"
        label = task.form.read_change(self._given.get(os.path.realpath(path)), cell, self.delim, where)
        return task.form.answer_text(label, self.delim)

    @functools.cached_property
    def _given(self) -> dict[str, Label]:
        """Resolved path -> given label of the run's images and DATA's."""
        items = [*items_of(self.run, None, self.bundle), *(items_of(self.run, self.data, self.bundle) if self.data else [])]
        return {os.path.realpath(p): label for p, label, _ in items}

    def queue(self) -> list[dict[str, Any]]:
        """The cases not decided yet (hand edits of the decision files included), by their
        place in the list; labels as the task shows (`label`, `change`) and edits them
        (`given`, `suggested`)."""
        task, decided = self.bundle.task, {os.path.realpath(p) for p in self.decisions.current()}
        return [{"index": i, "name": os.path.basename(c.path), "path": c.path, "label": task.form.shown(c.label),
                 "given": task.form.entry(c.label, self.delim), "reasons": c.reasons,
                 "suggested": None if c.suggested is None else task.form.entry(c.suggested, self.delim),
                 "change": "" if c.suggested is None else task.form.change(c.label, c.suggested)}
                for i, c in enumerate(self.cases) if os.path.realpath(c.path) not in decided]

    def decide(self, index: int, action: str, value: Any = "") -> None:
        """Record keep / exclude, or relabel to `value` (the page's entry, read by the task:
        text, a list for a set; a class the run lacks is refused; the given label again is
        a keep)."""
        case, task, text = self.case(index), self.bundle.task, ""
        if action == "relabel":
            where = f"relabel {case.path}"
            label = task.form.from_entry(value, self.delim, where)
            text = task.form.answer_text(label, self.delim)
            if label == "" or "\n" in text or "\r" in text:
                raise DataError(f"{where}: give the new label (one line)")
            if unknown := task.unknown_labels([label]):
                raise DataError(f"{where}: {', '.join(unknown)} is not a {task.wording.label_kind} of this run (it has "
                                f"{', '.join(task.classes)}); for a new one, add the row to "
                                f"{self.review.corrections} by hand (it is taken into the decisions)")
            if label == case.label:
                action, text = "keep", ""
        self.decisions.record(case.path, action, text)

    def cam(self, index: int) -> Path:
        """The case's Grad-CAM as a PNG, made once and kept in RUN/review/gradcam/ under the
        identity of the image file and of the weights."""
        path = self.case(index).path
        weights = file_identity(RunDir(self.run).model)
        key = identity_digest(path, "|".join(weights) if weights else "")
        if key is None:
            raise DataError(f"{path} cannot be read")
        target = self.cams / f"{key}.png"
        if not target.is_file():
            views = explain(self.bundle, self.device, path)
            figure = grid_figure([v[0] for v in views], [v[2] for v in views], [v[1] for v in views],
                                 cols=max(1, len(views)))
            atomic_write(target, lambda tmp: figure.savefig(tmp, format="png", dpi=80))
        return target

    def page(self) -> str:
        task = self.bundle.task
        spec = page_spec(task, task.classes)
        return (PAGE.replace("__ENTRY__", ENTRY).replace("__STYLE__", STYLE.replace("__WIDTH__", "960"))
                .replace("__HELP__", html.escape(review_help(spec))).replace("__RUN__", html.escape(self.run.name))
                .replace("__DIR__", html.escape(str(self.review.path))).replace("__SPEC__", spec_json(spec)))


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
            review.decide(int(answer.get("index", -1)), str(answer.get("action", "")), answer.get("label", ""))
        except (DataError, ValueError, TypeError) as exc:
            raise HTTPException(400, str(exc)) from None
        except OSError as exc:
            raise HTTPException(500, f"the decision could not be written into {review.review.path}: {exc}") \
                from None
        return {"ok": True}

    return app
