"""`visiontune review --label to_label.csv`: label the suggested images in the browser.

A page on localhost shows the images of a suggestions CSV (`visiontune suggest`: path,
the task's label column, prediction, ...) whose label is still empty, one by one, with
the model's guess. How a label is given is the task's (`task.form.label_entry`, tasks/form.py; `--task`, auto
as `train --csv` reads the file): a class is chosen (a button, or a digit key: 1 = the
first, as the page lists them), the labels of a set are toggled (buttons or digits, then
Enter; a set with no label is saved as `(none)`, since an empty cell is a row not
answered yet), a number is typed (the box holds the guess). Enter accepts what is shown,
Esc skips (and `s`, where the box does not take the keys), and the text box takes anything
else (a new class, a label set written with --label-delim, a number). Digit keys pick
nothing when a class name is itself a number: a digit would store another class, so it
is typed, and the help line says so. The class buttons come with the queue and each
answer: classes added to the file later get one.

Each answer is read with the task (`Form.from_entry`: text, or a list for a set; null, a
list for a class, an object are refused, a number that is not one too) and written into
the CSV's label column at once (`Form.answer_text`), merged with what the file holds at
that moment: rows `suggest` appended and labels typed in a spreadsheet while the page is
open are kept, rows are found by their path, and an image labelled otherwise in the file
meanwhile is refused (409: reload the page) rather than overwritten. Two pages on one
file (two processes) take turns (`files.locked` around each read-merge-write); the file
is whole at every moment (atomic replace, after checking nobody replaced it since it was
read: a spreadsheet saving meanwhile makes the answer read the file again), so
`visiontune train --csv to_label.csv` and the next `suggest` read it back. Images are
served by their number in the page's list only: the page can show the CSV's files and
nothing else.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations at run
# time (fastapi is an optional extra, imported inside create_review_app).
import html
import json
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from visiontune.config import DataConfig
from visiontune.data.tables import csv_task, suggestion_table
from visiontune.errors import DataError, VisiontuneError
from visiontune.files import FileChanged, file_identity, locked, read_csv, write_csv
from visiontune.tasks.base import Task
from visiontune.tasks.catalog import task_class
from visiontune.tasks.labels import label_counts

MERGE_TRIES = 5  # read-merge-write rounds before giving up on a file that keeps changing

# both review pages: how a label is given (SPEC: the task's entry, the class buttons, whether
# digit keys pick them); each page defines submit(label)
ENTRY = """const SPEC = __SPEC__;
const $ = (id) => document.getElementById(id);
let chosen = new Set();  // toggle: the label set being edited
const esc = (t) => String(t).replace(/&/g, '&amp;').replace(/</g, '&lt;');
function drawClasses() {
  $('classes').innerHTML = '';
  if (SPEC.entry !== 'type') SPEC.classes.forEach((c, i) => { const b = document.createElement('button');
    b.dataset.name = c; b.innerHTML = (SPEC.keys && i < 9 ? '<span class="key">' + (i + 1) + '</span> ' : '') + esc(c);
    b.onclick = () => press(c); $('classes').appendChild(b); });
  if ($('help')) $('help').textContent = SPEC.help;
  if (SPEC.entry === 'toggle') paint();
}
function applySpec(spec) {  // the classes (and so the keys and the help) as the server has them now
  if (!spec || JSON.stringify(spec) === JSON.stringify(SPEC)) return;
  Object.assign(SPEC, spec); drawClasses();
}
function paint() {
  document.querySelectorAll('#classes button').forEach((b) => b.classList.toggle('on', chosen.has(b.dataset.name)));
  $('chosen').textContent = 'new: ' + ([...chosen].sort().join(', ') || '(none)') + ' (Enter saves)';
}
function setEntry(value) {  // what the entry shows first: a list (toggle), a value's text (type)
  if (SPEC.entry === 'toggle') { chosen = new Set(value || []); paint(); }
  if (SPEC.entry === 'type') $('text').value = value == null ? '' : value;
  $('chosen').hidden = SPEC.entry !== 'toggle';
}
function press(c) {
  if (SPEC.entry !== 'toggle') { submit(c); return; }
  if (chosen.has(c)) chosen.delete(c); else chosen.add(c);
  paint();
}
function entered() { return SPEC.entry === 'toggle' ? [...chosen].sort() : $('text').value.trim(); }
function digitKey(e) {
  const n = parseInt(e.key, 10);
  if (!SPEC.keys || !(n >= 1 && n <= Math.min(9, SPEC.classes.length))) return false;
  e.preventDefault(); press(SPEC.classes[n - 1]); return true;
}
drawClasses();"""

STYLE = """<style>body{font-family:system-ui,sans-serif;max-width:__WIDTH__px;margin:2em auto}
button{margin:.2em;padding:.4em .8em}button.on{background:#cde;border-color:#357}.key{font-weight:bold;color:#555}
.muted{color:#777}#guess,#labels{font-size:1.2em}</style>"""

PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>visiontune review</title>
__STYLE__<style>img{max-width:100%;max-height:60vh;display:block;margin:1em 0;image-rendering:pixelated;
min-width:224px}</style></head><body>
<h1>Label the suggested images</h1>
<p class="muted">__FILE__ &middot; <span id="help"></span></p>
<div id="item"><p id="progress"></p><img id="image" alt="">
<p id="guess"></p><p id="reason" class="muted"></p>
<div id="classes"></div><p id="chosen" class="muted" hidden></p>
<input id="text" placeholder="__PLACEHOLDER__" autocomplete="off"> <button id="skip">Esc skip</button></div>
<p id="done" hidden></p>
<script>
__ENTRY__
let queue = [], at = 0, answered = 0;
async function submit(label) { await answer(label); }
$('skip').onclick = () => answer(null);
function show() {
  if (at >= queue.length) { $('item').hidden = true; $('done').hidden = false;
    $('done').textContent = 'Done: ' + answered + ' labelled, ' + (queue.length - answered) + ' skipped.'; return; }
  const it = queue[at];
  $('progress').textContent = (at + 1) + ' of ' + queue.length + ': ' + it.name;
  $('image').src = '/image/' + it.id;
  $('guess').textContent = it.prediction ? 'guess: ' + it.prediction : 'no guess (press a key or type)';
  $('reason').textContent = it.reason; $('text').value = ''; setEntry(it.entry);
  if (SPEC.entry === 'type' || !SPEC.keys) $('text').focus(); else $('text').blur();
}
async function answer(label) {
  const it = queue[at];
  if (label !== null) {
    const r = await fetch('/api/label', {method: 'POST', headers: {'Content-Type': 'application/json'},
      body: JSON.stringify({id: it.id, label: label})});
    const body = await r.json();
    if (!r.ok) { alert(body.detail); return; }
    answered++; applySpec(body.spec);
  }
  at++; show();
}
document.addEventListener('keydown', (e) => {
  if (at >= queue.length) return;
  const inText = document.activeElement === $('text');
  if (e.key === 'Enter') { e.preventDefault();
    const typed = $('text').value.trim();
    const label = typed !== '' ? typed : SPEC.entry === 'toggle' ? entered() : queue[at].entry;
    if (label !== null && label !== '') answer(label); return; }
  if (e.key === 'Escape') { e.preventDefault(); answer(null); return; }
  if (inText && !(SPEC.entry === 'type' && e.key === 's')) return;  // typing (a number holds no s)
  if (e.key === 's') { e.preventDefault(); answer(null); return; }
  digitKey(e);
});
fetch('/api/queue').then((r) => r.json()).then((q) => { applySpec(q.spec); queue = q.items; show(); });
</script></body></html>"""

HELP = {"choose": ("Enter: accept the guess · 1-9: that class", "Enter: accept the guess · a button: that class"),
        "toggle": ("1-9 or a button: add / remove that label · Enter: save the set shown (the guess first)",
                   "a button: add / remove that label · Enter: save the set shown (the guess first)"),
        "type": ("type the number (the box holds the guess) · Enter: save it",) * 2}


def label_help(spec: dict[str, Any]) -> str:
    """The labelling page's help line for `spec` (page_spec): what the keys do on it."""
    text = HELP[spec["entry"]][0 if spec["keys"] else 1]
    if spec["entry"] != "type" and not spec["keys"] and spec["classes"]:
        text += " · class names are numbers: digits are typed, so type the class and press Enter"
    skip = "s or Esc: skip" if spec["keys"] or spec["entry"] == "type" else "Esc: skip"
    return f"{text} · {skip}" + ("" if spec["entry"] == "type" else " · or type a label and press Enter")


def page_spec(task: type[Task] | Task, classes: Sequence[str]) -> dict[str, Any]:
    """What ENTRY draws: the task's way of giving a label, the class buttons, and whether
    digit keys pick them (not when a class name is itself a number: a typed 3 would then
    store the third class, not "3")."""
    names = [str(c) for c in classes]
    return {"entry": task.form.label_entry, "classes": names,
            "keys": task.form.label_entry != "type" and bool(names) and not any(_numeric(c) for c in names), "help": ""}


def _numeric(name: str) -> bool:
    try:
        float(name)
    except ValueError:
        return False
    return True


def spec_json(spec: dict[str, Any]) -> str:
    """`spec` as a script literal (no `</` can close the script)."""
    return json.dumps(spec).replace("</", "<\\/")


class LabelFile:
    """A suggestions CSV (path, label, prediction, reason, score...): its unlabelled rows,
    and answers merged into what the file holds when each is written."""

    def __init__(self, path: str | os.PathLike[str], task: str = "auto", delim: str = " ") -> None:
        self.path, self.delim = Path(path), delim
        if not self.path.is_file():
            raise DataError(f"--label {self.path}: no such file (write one with `visiontune suggest POOL --output "
                            f"{self.path}`)")
        rows, label_i = self._read()
        name, _ = csv_task(rows, label_i, True, DataConfig(task=task, label_delim=delim))
        self.task = task_class(name)
        self.paths: list[str] = []  # every path the page has listed: an item's id is its place here
        self.lock = threading.Lock()
        self._note(rows)

    def _read(self) -> tuple[list[list[str]], int]:
        if not self.path.is_file():
            raise ConflictError(f"{self.path} is gone: it was moved or deleted while the page was open")
        table = suggestion_table(self.path)
        if table is None:
            first = next(iter(read_csv(self.path)), None)
            raise DataError(f"--label {self.path}: not a suggestions CSV (path, a label column, prediction, ...: what "
                            f"`visiontune suggest` writes): its header is {first or 'empty'}")
        return table

    def _note(self, rows: list[list[str]]) -> None:
        known = set(self.paths)
        for r in rows[1:]:
            if r and r[0] and r[0] not in known:
                self.paths.append(r[0])
                known.add(r[0])

    def pending(self) -> list[dict[str, Any]]:
        """The rows without a label in the file as it is now (rows appended since are
        listed too), each path once, with the guess and what the entry starts from."""
        rows, label_i = self._read()
        with self.lock:
            self._note(rows)
        header = [h.strip().lower() for h in rows[0]]
        cell = {name: header.index(name) for name in ("prediction", "reason") if name in header}
        ids, seen, out = {p: i for i, p in enumerate(self.paths)}, set(), []
        for r in rows[1:]:
            if not r or not r[0] or r[0] in seen or _cell(r, label_i).strip():
                continue
            seen.add(r[0])
            guess = _cell(r, cell.get("prediction"))
            out.append({"id": ids[r[0]], "name": os.path.basename(r[0]), "prediction": guess,
                        "entry": self._entry(guess), "reason": _cell(r, cell.get("reason"))})
        return out

    def _entry(self, guess: str) -> Any:
        """The guess as the entry edits it (None: no guess, or one the task cannot read)."""
        try:
            return self.task.form.entry(self.task.parse_label(guess, self.delim, "prediction"), self.delim) if guess else None
        except DataError:
            return None

    def classes(self) -> list[str]:
        """Class (label) names seen in the file: labels given and the model's guesses."""
        rows, label_i = self._read()
        header = [h.strip().lower() for h in rows[0]]
        guess_i = header.index("prediction") if "prediction" in header else None
        labels = []
        for text in filter(str.strip, [_cell(r, i) for r in rows[1:] for i in (label_i, guess_i)]):
            try:
                labels.append(self.task.parse_label(text, self.delim, str(self.path)))
            except DataError:
                continue  # a cell the task cannot read is no class to offer
        return sorted(str(c) for c in label_counts(labels))

    def spec(self, classes: Sequence[str] | None = None) -> dict[str, Any]:
        """What the page draws now (page_spec and its help line): `classes` first, then
        the file's classes (`classes`) that they lack, so a class added to the file gets a
        button."""
        found = self.classes()
        names = [*classes, *(c for c in found if c not in classes)] if classes else found
        spec = page_spec(self.task, names)
        return {**spec, "help": label_help(spec)}

    def image(self, item: int) -> str:
        if not 0 <= item < len(self.paths):
            raise DataError(f"image {item} is not in {self.path}")
        path = Path(self.paths[item])
        return str(path if path.is_absolute() else self.path.parent / path)  # as train --csv reads it

    def answer(self, item: int, value: Any) -> None:
        """Write `value` (the page's entry: text, or a list of labels) as the label of image
        `item`, read by the task (DataError for one it refuses), merged into the file as it
        is now (`_merge`; ConflictError when the file contradicts it)."""
        self.image(item)
        path = self.paths[item]
        label = self.task.form.from_entry(value, self.delim, f"label of {path}")
        text = self.task.form.answer_text(label, self.delim).strip()
        if not text:
            raise DataError(f"label {value!r} for {path}: an empty label cannot be told from an unanswered row in "
                            f"{self.path.name}; skip the image (Esc) instead")
        if "\n" in text or "\r" in text:
            raise DataError(f"label {value!r}: give one line of text")
        with locked(self.path):  # another page (process) on this file waits for this read-merge-write
            for _ in range(MERGE_TRIES):
                try:
                    self._merge(path, text)
                    return
                except FileChanged:
                    continue  # written by a program without the lock (a spreadsheet) meanwhile: read it again
        raise DataError(f"{self.path} kept changing while the answer was written ({MERGE_TRIES} tries); try again")

    def _merge(self, path: str, text: str) -> None:
        """Read the file as it is now, set the label of `path`'s unlabelled rows, and write
        it back unless it changed since it was read (FileChanged)."""
        before = file_identity(self.path)
        rows, label_i = self._read()
        mine = [r for r in rows[1:] if r and r[0] == path]
        if not mine:
            raise ConflictError(f"{path} is no longer in {self.path} (the file was rewritten while the page was "
                                "open): reload the page")
        other = sorted({_cell(r, label_i).strip() for r in mine} - {"", text})
        if other:
            raise ConflictError(f"{path} was labelled {other[0]!r} in {self.path.name} meanwhile (in a spreadsheet, "
                                "or on another page): nothing was changed; reload the page")
        for r in mine:
            r.extend([""] * (label_i + 1 - len(r)))
            r[label_i] = text
        write_csv(self.path, rows[0], rows[1:], expected=before)


class ConflictError(DataError):
    """An answer the file contradicts (409): the row is gone or was labelled otherwise."""


def _cell(row: list[str], i: int | None) -> str:
    return row[i] if i is not None and i < len(row) else ""


def create_review_app(label_file: str | os.PathLike[str], classes: list[str] | None = None, task: str = "auto",
                      delim: str = " ") -> Any:
    """The review page and its API over `label_file`; `classes`: the buttons (default: the
    labels and guesses in the file); `task`, `delim`: how its labels read (auto: as
    `train --csv` reads the file)."""
    try:
        from fastapi import FastAPI, HTTPException
        from fastapi.responses import FileResponse, HTMLResponse
    except ImportError:
        raise VisiontuneError("review needs fastapi: pip install 'visiontune[serve]'") from None
    labels = LabelFile(label_file, task, delim)
    page = (PAGE.replace("__ENTRY__", ENTRY).replace("__STYLE__", STYLE.replace("__WIDTH__", "720"))
            .replace("__PLACEHOLDER__", "the number" if labels.task.form.label_entry == "type" else "another label")
            .replace("__FILE__", html.escape(str(labels.path))).replace("__SPEC__", spec_json(labels.spec(classes))))
    app = FastAPI(title="visiontune review")

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return page

    @app.get("/api/queue")
    def queue() -> dict:
        try:
            spec = labels.spec(classes)
            return {"classes": spec["classes"], "spec": spec, "items": labels.pending()}
        except ConflictError as exc:
            raise HTTPException(409, str(exc)) from None
        except DataError as exc:  # a file re-saved in another encoding, or of another shape now
            raise HTTPException(400, str(exc)) from None

    @app.get("/image/{item}")
    def image(item: int) -> Any:
        try:
            return FileResponse(labels.image(item))
        except DataError as exc:
            raise HTTPException(404, str(exc)) from None

    @app.post("/api/label")
    def label(answer: dict) -> dict:
        try:
            labels.answer(int(answer.get("id", -1)), answer.get("label", ""))
            return {"ok": True, "remaining": len(labels.pending()), "spec": labels.spec(classes)}
        except ConflictError as exc:
            raise HTTPException(409, str(exc)) from None
        except (DataError, ValueError, TypeError) as exc:
            raise HTTPException(400, str(exc)) from None
        except OSError as exc:
            raise HTTPException(500, f"could not write {labels.path}: {exc}") from None

    return app
