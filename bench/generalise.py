"""The model that generalises best, in the time given (issue 37): what a run keeps, which
epoch each monitor would pick, and whether fine-tuning paid, on the suite's sets.

    python -m bench.suite prepare OUT                  # the sets, once (bench/suite.py)
    python -m bench.generalise OUT [--only NAME ...] [--recipes NAME ...]
    python -m bench.generalise --smoke                 # a generated set, the tiny model

Protocol: each recipe trains on the set's train split and chooses (epochs, temperature,
C, the kept weights) only on its valid split; the test split is never used for a choice.
Per set and recipe: test accuracy and macro-F1 of the weights the run kept (calibrated, as
`evaluate` scores them), the wall time of the whole call, the epoch kept and why (the
run's own line, metrics.json's "kept"), and why it stopped. For items 1 and 2 of the
issue, the bench (and only the bench) also scores the test split after every epoch, with a
callback whose time is not charged to a --time-budget: which epoch each monitor
(val_loss, accuracy with val_loss as tie-break, calibrated_loss) would pick among all
epochs and among those a run may keep, and that epoch's test accuracy; and the last
epoch's (restore-best against the last epoch for the one-cycle default).

Recipes: default (gradual, 5 epochs, one-cycle, --probe-patience 2); budget-5m / budget-10m
(--time-budget, warmup-stable-decay by the clock); hand recipes: gradual-15 (15 epochs),
probe-patience-1 / probe-patience-0 (stop after one fine-tuning epoch that does not beat
the probe / never for that), monitor-accuracy, monitor-calibrated, last-epoch
(--no-restore-best), wsd-15 (15 epochs, warmup-stable-decay by steps).
"""

from __future__ import annotations

import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import visiontune as vt
from bench.harness import SMOKE_MODEL, Recorder, parser, tiny_folders
from bench.suite import SETS
from visiontune.runtime.inference import run_eval
from visiontune.train.callbacks import Best, Callback

RECIPES: dict[str, dict[str, Any]] = {
    "default": {},
    "budget-5m": {"time_budget": "5m"},
    "budget-10m": {"time_budget": "10m"},
    "gradual-15": {"strategy": "gradual", "epochs": 15},
    "probe-patience-1": {"probe_patience": 1},
    "probe-patience-0": {"probe_patience": 0},
    "monitor-accuracy": {"monitor": "accuracy"},
    "monitor-calibrated": {"monitor": "calibrated_loss"},
    "last-epoch": {"restore_best": False},
    "wsd-15": {"strategy": "gradual", "epochs": 15, "schedule": "wsd"},
}
MONITORS = ("val_loss", "accuracy", "calibrated_loss")


class TestPerEpoch(Callback):
    """The test split's accuracy and macro-F1 of each epoch's weights (the bench's own
    figure: no choice reads it); the seconds it takes are given back to the run's clock,
    so a --time-budget run trains as long as it would without it."""

    def __init__(self) -> None:
        self.scores: dict[int, dict[str, float]] = {}  # epoch (1-based) -> test metrics
        self.loader: Any = None
        self.on_features = False

    def on_fit_start(self, trainer: Any) -> None:
        self.loader, self.on_features = trainer.data.held_out(trainer.data.source.split("test"))

    def on_epoch_end(self, trainer: Any) -> None:
        started = time.perf_counter()
        model = trainer.chosen_model()
        out = run_eval(model.head if self.on_features else model, self.loader, trainer.device, trainer.task,
                       channels_last=trainer.cfg.runtime.channels_last)
        self.scores[trainer.state.epoch + 1] = trainer.task.metrics(out.targets, out.probs)
        trainer.clock.started += time.perf_counter() - started  # not charged to the run's time


def picked(history: list[dict], task: Any, monitor: str, candidates_only: bool) -> int:
    """The epoch (1-based) `monitor` picks in `history` by the task's objective (0: none)."""
    best = Best(task.objective(monitor))
    for row in history:
        if monitor in row and (row.get("candidate", True) or not candidates_only):
            best.update(row, row["epoch"] - 1)
    return best.epoch + 1


def measure(data: Path, name: str, recipe: str, out: Path, record: Recorder, model: dict | None = None) -> None:
    """Train `recipe` on `data` (choices on valid), score test; figures -> `record`."""
    size, per_epoch = SETS.get(name, 32), TestPerEpoch()
    options = {"image_size": size, "batch_size": 32, "progress": False, **RECIPES[recipe], **(model or {})}
    started = time.perf_counter()
    run = vt.fit(data, seed=0, output=str(out / "runs" / name), name=f"{recipe}-generalise", callbacks=[per_epoch],
                 **options)
    seconds = time.perf_counter() - started
    test = vt.evaluate(run.run_dir, data).metrics
    key = f"{name} {recipe}"
    record(f"{key}: test accuracy / macro-F1", f"{test['accuracy']:.4f} / {test['macro_f1']:.4f}",
           note=f"{len(run.history)} epochs run")
    record(f"{key}: wall time", round(seconds, 1), "s")
    record(f"{key}: epoch kept", run.best_epoch if run.kept == "best" else len(run.history), note=run.why_kept)
    if run.why_stopped:
        record(f"{key}: why it stopped", run.why_stopped)
    task = run.setup.task
    for monitor in MONITORS:
        for only in (False, True):
            epoch = picked(run.history, task, monitor, only)
            if epoch:
                record(f"{key}: {monitor} picks epoch ({'candidates' if only else 'any'}) / its test accuracy",
                       f"{epoch} / {per_epoch.scores[epoch]['accuracy']:.4f}")
    last = len(run.history)
    record(f"{key}: last epoch's test accuracy", round(per_epoch.scores[last]["accuracy"], 4), note=f"epoch {last}")


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__)
    ap.add_argument("out", nargs="?", help="a folder prepared by `python -m bench.suite prepare OUT`")
    ap.add_argument("--only", nargs="+", choices=list(SETS))
    ap.add_argument("--recipes", nargs="+", choices=list(RECIPES), default=list(RECIPES))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    record = Recorder("generalise", args.smoke, argv)
    if args.smoke:
        out = Path(tempfile.mkdtemp(prefix="vt-bench-generalise-"))
        tiny_folders(out / "tiny", classes=2, per_class=10, splits=("train", "valid", "test"))
        for recipe in ("default", "wsd-15"):
            measure(out / "tiny", "tiny", recipe, out, record, {**SMOKE_MODEL, "epochs": 4, "patience": 3})
        return 0
    if args.out is None:
        ap.error("OUT is required (or --smoke)")
    out = Path(args.out)
    for name in args.only or list(SETS):
        for recipe in args.recipes:
            measure(out / name, name, recipe, out, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
