"""Stratified k-fold cross-validation with honest numbers: a fresh model per fold, every
choice made on the training part of the fold, the held-out fold scored untouched.

Each outer fold is held out; the rest trains. How the epoch is chosen (`selection`):

- "inner" (default): the training part is split again (stratified, `valid_pct`, groups
  kept whole); early stopping and the best checkpoint look at that inner split only. The
  recipe of a normal `train` run, measured without peeking.
- "last": no inner split; a fixed epoch budget on all of the training part, the last
  epoch's weights.

`--strategy auto` asks the advisor per fold, on the fold's training part only. The
held-out fold's metrics and out-of-fold probabilities (oof.csv) come from a separate pass
over it with the chosen weights. With the feature cache, frozen strategies compute
backbone features once for all folds.
"""

from __future__ import annotations

import logging
import math
import os
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from visiontune import display
from visiontune.config import RunConfig
from visiontune.data.items import TEST, TRAIN, VALID, DataSource, Item, LabelFunc
from visiontune.data.sources import resolve_inputs
from visiontune.data.splits import fold_count, fold_indices, group_keys, stratified_split
from visiontune.errors import ConfigError, DataError
from visiontune.files import write_csv
from visiontune.planning.plan import plan_run
from visiontune.rundir import RunDir
from visiontune.runtime.inference import progress
from visiontune.tasks.base import Task
from visiontune.tasks.catalog import make_task
from visiontune.train.session import score_items, train_run
from visiontune.train.tracking import flat_params, parent_run

log = logging.getLogger(__name__)

SELECTIONS = {
    "inner": "epochs chosen on an inner validation split of each fold's training part",
    "last": "a fixed epoch budget, last epoch's weights",
}


@dataclass
class CVResult:
    folds: list[dict[str, float]]
    mean: dict[str, float]
    std: dict[str, float]
    oof_path: str
    out_dir: str
    num_folds: int
    oof_probs: np.ndarray = field(repr=False, default_factory=lambda: np.zeros((0, 0)))
    paths: list[str] = field(repr=False, default_factory=list)
    labels: list[str] = field(repr=False, default_factory=list)
    classes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    selection: str = "inner"
    metrics: tuple[str, ...] = ("accuracy", "macro_f1", "loss")  # the task's headline

    def format(self) -> str:
        lines = [f"{self.num_folds}-fold cross-validation ({len(self.paths)} images, {self.seconds:.1f}s); "
                 f"{SELECTIONS[self.selection]}; each held-out fold scored untouched"]
        for i, f in enumerate(self.folds):
            lines.append(f"  fold {i + 1}: " + "  ".join(f"{k} {f[k]:.4f}" for k in self.metrics))
        lines.append("  mean +- std: " + "  ".join(f"{k} {self.mean[k]:.4f} +- {self.std[k]:.4f}" for k in self.metrics))
        lines.append(f"out-of-fold probabilities: {self.oof_path}")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        rows = [[f"fold {i + 1}", *(f[k] for k in self.metrics)] for i, f in enumerate(self.folds)]
        rows.append(["mean +- std", *(f"{self.mean[k]:.4f} +- {self.std[k]:.4f}" for k in self.metrics)])
        return display.table(rows, ["", *self.metrics], f"{self.num_folds}-fold cross-validation, "
                             f"{len(self.paths)} images, {self.seconds:.1f}s; {SELECTIONS[self.selection]}")


def cross_validate(data: str | os.PathLike[str] | None = None, *, folds: int = 5, config: RunConfig | None = None,
                   label_func: LabelFunc | None = None, source: DataSource | None = None, selection: str = "inner",
                   **overrides: Any) -> CVResult:
    """Stratified k-fold over train + valid images (test/ stays out; groups stay whole); the
    folds show a progress bar (stderr, on a terminal) unless the run's progress is off."""
    if selection not in SELECTIONS:
        raise ConfigError(f"selection {selection!r} is not valid; choose one of: {', '.join(SELECTIONS)}")
    started = time.perf_counter()
    RunConfig.create(config, **overrides).refuse_time_budget("cv",
                       "scores one configuration trained the same way on every fold")
    if source is None:
        cfg, source = resolve_inputs(data, config, label_func, overrides)
    else:
        cfg = RunConfig.create(config, **overrides)
    pool = [it for it in source.items if it.split in (TRAIN, VALID)]
    k = fold_count([it.label for it in pool], folds)
    if selection == "inner":
        _check_inner_split(pool, k)
    task = make_task(source.task, source.classes)
    headline = task.headline
    out = RunDir.claim(cfg.output, cfg.name, "cv", cfg.strategy.name)
    out_dir = out.path
    probs = np.zeros((len(pool), task.num_outputs), dtype=np.float64)
    fold_of = np.zeros(len(pool), dtype=int)
    rows = []
    fold_rows = list(fold_indices(pool, k, cfg.seed))
    scored = common_labels(pool, fold_rows, source)
    with parent_run(cfg.tracking.track, out_dir.parent, out_dir.name, {"kind": "cv", "strategy": cfg.strategy.name,
                                                   "selection": selection}, flat_params(cfg)) as parent:
        for i, held_out in enumerate(progress(fold_rows, cfg.runtime.progress, "cv folds", k)):
            log.info("fold %d/%d: %d held out, %d to train on", i + 1, k, len(held_out), len(pool) - len(held_out))
            fold_cfg = replace(cfg, output=str(out_dir), name=f"fold{i + 1}")
            metrics = _run_fold(fold_cfg, source, pool, held_out, selection, probs, scored)
            rows.append({m: float(metrics.get(m, float("nan"))) for m in headline})
            fold_of[held_out] = i + 1
        mean = {m: statistics.fmean(r[m] for r in rows) for m in headline}
        std = {m: statistics.pstdev(r[m] for r in rows) for m in headline}
        parent.log_metrics({**{f"cv_mean_{m}": v for m, v in mean.items()},
                            **{f"cv_std_{m}": v for m, v in std.items()}})
    oof_path = out.oof
    _write_oof(oof_path, pool, fold_of, probs, task, cfg.data.label_delim)
    out.write_cv_summary({"folds": rows, "mean": mean, "std": std, "num_folds": k,
                                             "strategy": cfg.strategy.name, "selection": SELECTIONS[selection],
                                             "labels_averaged": [source.classes[i] for i in scored]})
    return CVResult(rows, mean, std, str(oof_path), str(out_dir), k, probs, [it.path for it in pool],
                    [it.label for it in pool], source.classes, time.perf_counter() - started, selection, headline)


def _check_inner_split(pool: list[Item], folds: int) -> None:
    """selection "inner" splits each fold's training part again, which needs two images of
    every class there: a class of n images leaves n - ceil(n / folds) in a training part.
    Too few is refused before any fold trains."""
    counts = Counter(it.label for it in pool if isinstance(it.label, str))  # classes (numbers are binned: no check)
    short = sorted(c for c, n in counts.items() if n - math.ceil(n / folds) < 2)
    if short:
        raise DataError(f"classes {short[:10]} have too few images for {folds}-fold cv with an inner validation "
                        f"split (each fold's training part needs 2 images of every class: at least 3 per class "
                        "overall); add images, or use --selection last (a fixed epoch budget, no inner split)")


def common_labels(pool: list[Item], folds: list[np.ndarray], source: DataSource) -> list[int]:
    """The classes (labels) present in every held-out fold: each fold's class averages
    (macro-F1, mAP) are taken over these, so the folds' figures measure the same thing and
    their mean is one metric. The ones left out are named in the log."""
    task = make_task(source.task, source.classes)
    targets = task.encode([it.label for it in pool]).numpy()
    common = set(range(len(source.classes)))
    for held_out in folds:
        common &= set(task.present_labels(targets[held_out]))
    left_out = [source.classes[i] for i in range(len(source.classes)) if i not in common]
    if left_out:
        log.warning("cv: %d of %d labels are missing from some held-out fold (%s); every fold averages the %d "
                    "present in all", len(left_out), len(source.classes), ", ".join(left_out[:10]), len(common))
    return sorted(common)


def _run_fold(cfg: RunConfig, source: DataSource, pool: list[Item], held_out: np.ndarray, selection: str,
              probs: np.ndarray, labels: list[int]) -> dict[str, float]:
    """Train on the fold's training part as `selection` says; score the held-out part
    (its probabilities go into `probs`; class averages over `labels`); return the task's
    metrics and "loss" on it."""
    held_out_rows = set(held_out.tolist())
    rest = [it for j, it in enumerate(pool) if j not in held_out_rows]
    if selection == "inner":
        inner = stratified_split([it.label for it in rest], cfg.data.valid_pct or 0.2, cfg.seed, group_keys(rest))
        chosen = set(inner)
        rest = [replace(it, split=VALID if j in chosen else TRAIN) for j, it in enumerate(rest)]
    else:
        rest = [replace(it, split=TRAIN) for it in rest]
        cfg = RunConfig.create(cfg, patience=0, restore_best=False, monitor="train_loss")
    outer = [replace(pool[j], split=TEST) for j in held_out]
    fold_source = replace(source, items=rest + outer)  # the same task, classes and exclusions
    plan = plan_run(cfg, fold_source)  # 'auto': the advisor sees the training part only
    metrics, out = score_items(train_run(plan.cfg, fold_source, clock=plan.clock), outer, labels)
    probs[held_out] = out.probs
    return metrics


def _write_oof(path: Path, pool: list[Item], fold_of: np.ndarray, probs: np.ndarray, task: Task,
               delim: str) -> None:
    """One row per image: its label(s), fold, the prediction as decoded (the class, the
    label set above the thresholds, the number) and the task's output columns."""
    write_csv(path, ["path", "label", "fold", "predicted", *task.output.oof_columns()],
              ([it.path, task.label_text(it.label, delim), int(fold), *task.output.oof_cells(p, delim)]
               for it, fold, p in zip(pool, fold_of, probs)))
