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

A crash between the log and the files, or between two files, loses nothing and
duplicates nothing: the files are derived again from the whole log at the next decision
or review start; a record torn by a crash is left out (files.read_log) and cut off at
the next append. Two pages on the same run append to the same log, and each derives the
files from all of it. A run folder from before the log (the three files only, exclude.txt
and kept.txt one path a line) is read once, and its decisions become the log's first
records.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

from visiontune.errors import DataError
from visiontune.files import append_line, read_csv, read_csv_dicts, read_log, write_csv, write_text

log = logging.getLogger(__name__)

REVIEW_DIR = "review"
LOG, CORRECTIONS, EXCLUDE, KEPT = "decisions.jsonl", "corrections.csv", "exclude.txt", "kept.txt"
ACTIONS = ("keep", "exclude", "relabel")


class Decisions:
    """The review decisions of one run (see the module docstring)."""

    def __init__(self, run: str | os.PathLike[str]) -> None:
        self.dir = Path(run) / REVIEW_DIR
        self.log = self.dir / LOG
        self.lock = threading.Lock()
        if not self.log.is_file():
            self._import_files()
        if self.log.is_file():
            self.derive()  # whatever a crash left half-written is made whole again

    def latest(self) -> dict[str, tuple[str, str]]:
        """path -> (decision, label cell) of every image decided, its last record's."""
        state: dict[str, tuple[str, str]] = {}
        for n, line in enumerate(read_log(self.log), start=1):
            try:
                record = json.loads(line)
                decision = record["decision"]
                if decision not in ACTIONS:
                    raise ValueError(decision)
                state[str(record["path"])] = (decision, str(record.get("label", "")))
            except (ValueError, KeyError, TypeError):
                raise DataError(f"{self.log}:{n} is not a review decision ({line[:80]!r}): remove that line (or the "
                                "file, to start the review over)") from None
        return state

    def record(self, path: str, decision: str, label: str = "") -> None:
        """Append one decision to the log, then derive the files from the whole log."""
        if decision not in ACTIONS:
            raise DataError(f"decision {decision!r}: {', '.join(ACTIONS)}")
        with self.lock:
            append_line(self.log, json.dumps({"path": path, "decision": decision, "label": label}, ensure_ascii=False))
            self.derive()

    def derive(self) -> None:
        """corrections.csv, exclude.txt and kept.txt from the log."""
        state = self.latest()
        write_csv(self.dir / CORRECTIONS, ["path", "label"],
                  sorted((p, label) for p, (d, label) in state.items() if d == "relabel"))
        for name, decision in ((EXCLUDE, "exclude"), (KEPT, "keep")):
            write_csv(self.dir / name, ["path"], ([p] for p, (d, _) in state.items() if d == decision))

    def _import_files(self) -> None:
        """The decisions of a run folder from before the log, as its first records."""
        corrections = self.dir / CORRECTIONS
        relabelled = [(r["path"], "relabel", r.get("label") or "") for r in read_csv_dicts(corrections)] \
            if corrections.is_file() else []
        others = [(p, decision) for name, decision in ((EXCLUDE, "exclude"), (KEPT, "keep"))
                  for p in _path_list(self.dir / name)]
        records = relabelled + [(p, d, "") for p, d in others]
        if records:
            log.info("review: %d decisions read from %s (written before %s existed)", len(records), self.dir, LOG)
            write_text(self.log, "".join(json.dumps({"path": p, "decision": d, "label": lb}, ensure_ascii=False)
                                         + "\n" for p, d, lb in records))


def _path_list(path: Path) -> list[str]:
    """The paths of exclude.txt / kept.txt: a CSV with a `path` header (as `derive` writes
    them), or, from before, one path a line."""
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    if lines[:1] == ["path"]:
        return [r[0] for r in read_csv(path)[1:] if r]
    return [line for line in lines if line]
