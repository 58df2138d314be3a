"""RUN/review/: what `visiontune review RUN` decided, as one append-only log and the files
`train` reads, derived from it.

`decisions.jsonl` is the truth: one JSON record per decision (`{"path", "decision",
"label"}`: keep, exclude, or relabel with the new label as a table cell), appended and
fsync'ed before anything else is written; an image's last record is its decision. From
the log, after each decision and whenever a review starts, three files are rewritten
whole (each atomically), in the one CSV format `train` reads:

- `corrections.csv` (path,label): relabelled images, for `train --relabel`;
- `exclude.txt` (a `path` header, then one path a row, quoted where a CSV needs it):
  excluded images, for `train --exclude`;
- `kept.txt` (the same): images looked at and kept, not shown again.

Each decision (append, then derive) holds `files.locked` on the log: two pages on one run,
in two processes, take turns, so the files always match the whole log. A crash between
the log and the files, or between two files, loses nothing and duplicates nothing: the
files are derived again from the whole log at the next decision or review start; a
record torn by a crash is left out (files.read_log) and cut off at the next append.

The files are yours to edit too. `derived.json` keeps the identity (`files.file_identity`)
of each file as last written; a file that no longer has it was edited by hand. Its rows
that the log does not say (an image added to exclude.txt, a label changed in
corrections.csv) are taken into the log as decisions, with a warning; rows removed by hand
come back, with a warning saying to change the decision on the page instead (keep, or
another label). A run folder from before the log (the three files only, exclude.txt and
kept.txt maybe one path a line) is read once, and its decisions become the log's first
records; a label written there as a list of changes ("+dog -cat", older review pages of
label sets) is read with `convert` (the run's task, against the image's given labels).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

from visiontune.data.tables import read_path_list
from visiontune.errors import DataError
from visiontune.files import (
    append_line,
    file_identity,
    locked,
    read_csv,
    read_log,
    write_csv,
    write_json,
    write_text,
)
from visiontune.rundir import REVIEW_DIR, Review, RunDir

__all__ = ["ACTIONS", "CORRECTIONS", "DERIVED", "EXCLUDE", "KEPT", "LOG", "REVIEW_DIR", "Decisions"]

log = logging.getLogger(__name__)

LOG, CORRECTIONS, EXCLUDE, KEPT = Review.LOG, Review.CORRECTIONS, Review.EXCLUDE, Review.KEPT
DERIVED = Review.DERIVED  # {file name: its identity when this module last wrote it}
ACTIONS = ("keep", "exclude", "relabel")
FILES = ((CORRECTIONS, "relabel"), (EXCLUDE, "exclude"), (KEPT, "keep"))
State = dict[str, tuple[str, str]]  # path -> (decision, label cell)
Convert = Callable[[str, str], str]  # (path, an old corrections.csv label cell) -> the label cell it means


class Decisions:
    """The review decisions of one run (see the module docstring)."""

    def __init__(self, run: str | os.PathLike[str], convert: Convert | None = None) -> None:
        self.dir = RunDir(run).review.path
        self.log = self.dir / LOG
        self.dir.mkdir(parents=True, exist_ok=True)
        with locked(self.log):
            if not self.log.is_file():
                self._import_files(convert)
            if self.log.is_file():
                self._take_hand_edits()
                self._derive()  # whatever a crash left half-written is made whole again

    def latest(self) -> State:
        """path -> (decision, label cell) of every image decided, its last record's."""
        state: State = {}
        for n, line in enumerate(read_log(self.log), start=1):
            try:
                record = json.loads(line)
                decision = record["decision"]
                if decision not in ACTIONS:
                    raise ValueError(decision)
                state[str(record["path"])] = (decision, str(record.get("label", "")))
            except (ValueError, KeyError, TypeError):
                raise DataError(f"{self.log}:{n} is not a review decision ({line[:80]!r}): remove that line; to start "
                                f"the review over, remove the folder {self.dir} (its files are read back into a new "
                                "log otherwise)") from None
        return state

    def current(self) -> State:
        """`latest`, after taking in what was edited by hand in the files since they were written."""
        with locked(self.log):
            if self._take_hand_edits():
                self._derive()
            return self.latest()

    def record(self, path: str, decision: str, label: str = "") -> None:
        """Append one decision to the log, then derive the files from the whole log (one
        process at a time: see the module docstring)."""
        if decision not in ACTIONS:
            raise DataError(f"decision {decision!r}: {', '.join(ACTIONS)}")
        with locked(self.log):
            self._take_hand_edits()
            self._append([(path, decision, label)])
            self._derive()

    def _append(self, records: list[tuple[str, str, str]]) -> None:
        for path, decision, label in records:
            append_line(self.log, json.dumps({"path": path, "decision": decision, "label": label}, ensure_ascii=False))

    def _derive(self) -> None:
        """corrections.csv, exclude.txt and kept.txt from the log, and their identities."""
        state = self.latest()
        write_csv(self.dir / CORRECTIONS, ["path", "label"],
                  sorted((p, label) for p, (d, label) in state.items() if d == "relabel"))
        for name, decision in FILES[1:]:
            write_csv(self.dir / name, ["path"], ([p] for p, (d, _) in state.items() if d == decision))
        write_json(self.dir / DERIVED, {name: _identity(self.dir / name) for name, _ in FILES})

    def _take_hand_edits(self) -> bool:
        """Rows of the files edited by hand since they were written, taken into the log;
        whether any file was edited."""
        try:
            written = json.loads((self.dir / DERIVED).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False  # never derived by this version: the files are the log's
        edited = [(name, decision) for name, decision in FILES if _identity(self.dir / name) != written.get(name)]
        if not edited:
            return False
        state, found = self.latest(), {name: self._rows(name) for name, _ in edited}
        added = [(p, decision, label) for name, decision in edited for p, label in found[name].items()
                 if state.get(p) != (decision, label)]
        if added:
            log.warning("review: %d rows added or changed by hand in %s are taken as decisions (%s%s)", len(added),
                        ", ".join(name for name, _ in edited), "; ".join(f"{d} {p} {lb}".strip() for p, d, lb in added[:5]),
                        "; ..." if len(added) > 5 else "")
            self._append(added)
        state = self.latest()
        for name, decision in edited:
            removed = sorted(p for p, (d, _) in state.items() if d == decision and p not in found[name])
            if removed:
                log.warning("review: %d rows removed by hand from %s come back (e.g. %s): the decision log holds them; "
                            "change the decision on the review page instead (keep, or another label)", len(removed),
                            name, removed[0])
        return True

    def _rows(self, name: str) -> dict[str, str]:
        """path -> label cell of one of the files as it is now ({} when it is gone)."""
        path = self.dir / name
        if not path.is_file():
            return {}
        if name != CORRECTIONS:
            return dict.fromkeys(read_path_list(path, name), "")
        rows = read_csv(path)
        if not rows or [h.strip().lower() for h in rows[0][:2]] != ["path", "label"]:
            raise DataError(f"{path}: the header must be path,label (it was edited by hand); put it back")
        return {r[0].strip(): r[1].strip() for r in rows[1:] if len(r) > 1 and r[0].strip() and r[1].strip()}

    def _import_files(self, convert: Convert | None) -> None:
        """The decisions of a run folder from before the log, as its first records."""
        relabelled = [(p, "relabel", convert(p, label) if convert else label)
                      for p, label in self._rows(CORRECTIONS).items()]
        others = [(p, decision, "") for name, decision in FILES[1:] if (self.dir / name).is_file()
                  for p in read_path_list(self.dir / name, name)]
        records = relabelled + others
        if records:
            log.info("review: %d decisions read from %s (written before %s existed)", len(records), self.dir, LOG)
            write_text(self.log, "".join(json.dumps({"path": p, "decision": d, "label": lb}, ensure_ascii=False)
                                         + "\n" for p, d, lb in records))


def _identity(path: Path) -> str | None:
    found = file_identity(path)
    return None if found is None else found[1]
