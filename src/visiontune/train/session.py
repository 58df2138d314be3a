"""One training run, top to bottom: set up, choose what to monitor, open the run
directory, assemble the callbacks, train, summarise. `api.fit` and the selection tools
(cv, compare) call `train_run`."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from visiontune import display
from visiontune.bundle import environment
from visiontune.caches import cache_max, cache_root, evict, guarded
from visiontune.config import RunConfig, TrainConfig
from visiontune.data.items import TRAIN, VALID, DataSource, Item
from visiontune.errors import ConfigError, DataError, VisiontuneError
from visiontune.rundir import RunDir
from visiontune.runtime.inference import EvalOutput, run_eval
from visiontune.tasks.base import Task, known_rows
from visiontune.tasks.catalog import make_task, task_class
from visiontune.tasks.objective import Objective
from visiontune.train.calibrate import calibrate, fit_ood
from visiontune.train.callbacks import (
    Callback,
    Checkpoint,
    EarlyStopping,
    EpochPrinter,
    HistoryLogger,
    metrics_of,
)
from visiontune.train.clock import Clock
from visiontune.train.setup import RunSetup, prepare_run, require_resolved
from visiontune.train.tracking import make_trackers
from visiontune.train.trainer import Trainer

log = logging.getLogger(__name__)


@dataclass
class FitResult:
    run_dir: str
    classes: list[str]
    metrics: dict[str, float]
    history: list[dict[str, Any]]
    best_epoch: int
    stopped_early: bool
    seconds: float
    trainable_params: int = 0  # most parameters training in any phase
    # rows follow data.split("valid"), or, validated by the probe's cross-validation, the training rows it held out
    valid_probs: np.ndarray | None = field(repr=False, default=None)
    validated_by: str = ""  # how the metrics were validated when not on a validation split (metrics.json's "validation")
    kept: str = "best"  # which epoch's weights the run ends with: "best" (restore_best) or "last"
    why_kept: str = ""  # which weights the run ended with and why, in a line (metrics.json's "kept")
    why_stopped: str = ""  # why early stopping ended the run or began the decay ("" when it did neither)
    model: Any = field(repr=False, default=None)
    data: DataSource | None = field(repr=False, default=None)
    setup: RunSetup | None = field(repr=False, default=None)  # what trained: task, preprocessing, plan, device

    def _repr_html_(self) -> str:
        keys = list(dict.fromkeys(k for row in self.history for k in row))
        return (display.metrics_table(self.metrics, f"{self.run_dir}: best epoch {self.best_epoch} of "
                                      f"{len(self.history)}, {self.seconds:.1f}s"
                                      + (", stopped early" if self.stopped_early else ""))
                + display.table([[row.get(k, "") for k in keys] for row in self.history], keys, "history"))


def score_items(result: FitResult, items: list[Item], labels: list[int] | None = None) -> tuple[dict[str, float],
                                                                                                EvalOutput]:
    """The task's metrics (and "loss") and the outputs of the trained model on `items`, e.g.
    a held-out fold or a test split that no selection looked at; class averages over
    `labels` (default: the classes present in `items`)."""
    setup = result.setup
    assert setup is not None, "score_items needs a FitResult from train_run"
    loader, on_features = setup.data.held_out(items)
    net = setup.model.on_features() if on_features else setup.model
    out = run_eval(net, loader, setup.device, setup.task, channels_last=setup.cfg.runtime.channels_last,
                   precision=setup.cfg.runtime.precision)
    out.require_all(len(items), [it.path for it in items])  # rows in the order of `items`, every one read
    return {**setup.task.metrics(out.targets, out.probs, labels), "loss": out.loss}, out


def train_run(cfg: RunConfig, source: DataSource, *, run_dir: Path | None = None, ckpt: dict[str, Any] | None = None,
              callbacks: list[Callback] | None = None, clock: Clock | None = None) -> FitResult:
    """Train `cfg` on already loaded and split items; `run_dir` + `ckpt` resume a run (or,
    without `ckpt`, restart one killed before its first checkpoint, in place); `clock`
    counts the run's time (default: from now) and, with a budget (--time-budget), ends it
    on time (feature extraction its `reserve_s` before the deadline: what the probe's fit
    needs)."""
    clock = clock if clock is not None else Clock()
    require_resolved(cfg, clock)  # a plan's config (planning/plan.plan_run): nothing "auto", the budget on the clock
    log.info("%s", source.summary())
    if run_dir is not None:
        _check_resumed_data(run_dir, source, cfg.data.label_delim, restart=ckpt is None)
        _check_time_left(clock, run_dir, has_checkpoint=ckpt is not None)
    setup = prepare_run(cfg, source, resuming=ckpt is not None, clock=clock)
    if setup.note:
        log.warning("%s", setup.note)
    objective = choose_objective(setup.cfg.train, source, setup.task, cross_validated(setup, source))
    resumed, run_dir = run_dir is not None, open_run_dir(setup, source, run_dir, restart=ckpt is None)
    checkpoint = Checkpoint(run_dir, objective, setup.cfg.train.restore_best, setup.cfg.train.min_delta,
                            write=setup.env.is_main)
    stopper = _early_stopping(setup.cfg.train, objective)
    trackers = make_trackers(setup.cfg.tracking.track, run_dir, setup.cfg, setup.task) if setup.env.is_main else []
    trainer = Trainer(setup, _callbacks(setup, run_dir, checkpoint, stopper, [*(callbacks or []), *trackers]),
                      objective, run_dir)
    start_epoch = trainer.restore(ckpt) if ckpt is not None else 0
    _start_clock(clock, setup, run_dir, resumed)
    log.info("run directory: %s", run_dir)
    log.info("strategy %s: %s trainable of %s parameters at start", setup.cfg.strategy.name,
             f"{setup.plan.trainable_params(0):,}", f"{sum(g.num_params for g in setup.plan.groups):,}")
    try:
        trainer.fit(start_epoch)
        _require_an_epoch(trainer, clock)
        valid_out = _finish_model(setup, trainer, checkpoint, run_dir, cross_validated(setup, source))
        result = summarise(setup, trainer, checkpoint, stopper, run_dir, source, valid_out)
    except BaseException:
        for tracker in trackers:
            tracker.fail()
        setup.data.release()
        raise
    finally:
        clock.stop()  # the record holds the time used to here, whatever ended the run
    for tracker in trackers:
        tracker.finish(result, _final_outputs(setup, trainer, checkpoint))
    setup.data.release()  # the loaders' kept workers end here, not when the result is dropped
    if setup.env.is_main:
        keep_cache_in_bounds(setup.cfg.runtime.cache_dir)
    return result


def _finish_model(setup: RunSetup, trainer: Trainer, checkpoint: Checkpoint, run_dir: Path,
                  by_cv: bool) -> EvalOutput | None:
    """After training: calibrate the kept weights, give them their OOD score (bank and
    threshold), tune the thresholds on the calibrated outputs, and write them
    (train/calibrate.py); the calibrated held-out outputs the thresholds were tuned on (None
    when none were). `by_cv`: the held-out outputs are the probe's cross-validation's."""
    valid_out = calibrate(setup.model, setup.task, _final_outputs(setup, trainer, checkpoint), run_dir,
                          write=setup.env.is_main, by_cv=by_cv)
    if setup.env.is_main:  # the bank and threshold go into the weights this process writes
        fit_ood(setup.model, setup.data, setup.cfg.seed, deadline=trainer.clock.deadline)
    tuned = setup.cfg.outputs.thresholds == "tuned" and tune_thresholds(setup, valid_out, run_dir)
    if setup.env.is_main:  # the weights kept, calibrated, with the task's (tuned) thresholds
        RunDir(run_dir).write_model(setup.model, setup.task, setup.preprocess, setup.cfg.model)
    return valid_out if tuned else None


def _require_an_epoch(trainer: Trainer, clock: Clock) -> None:
    """A run never "succeeds" with nothing trained: when the clock ended it before the
    first step (a budget shorter than what came before the first epoch), the error says so
    and how to go on (DESIGN rule 5); the run directory keeps its files, no model."""
    if trainer.state.history:
        return
    if clock.budget_s is None:
        raise VisiontuneError(f"the run in {trainer.run_dir} trained no epoch (epochs planned: "
                              f"{trainer.total_epochs}); nothing was written as its model")
    raise ConfigError(f"the time budget of {clock.budget_s or 0:g} s ended before the first training step "
                      f"({clock.used():.0f} s were used before it: data checks, measuring, features): nothing was "
                      f"trained and no model was written in {trainer.run_dir}. Give a longer --time-budget, or resume "
                      f"with one: `visiontune train --resume {trainer.run_dir} --time-budget SECONDS`")


def keep_cache_in_bounds(cache_dir: str | None) -> None:
    """The cache's size cap (caches.cache_max: $VISIONTUNE_CACHE_MAX, 10 GB by default),
    enforced after each run: the least recently used entries go first. A cache that cannot
    be read or cleaned, or a cap that cannot be read, costs nothing but the space: the run
    is done by then."""
    try:
        cap = cache_max()
    except ConfigError as exc:
        log.warning("%s; the cache is not trimmed", exc)
        return
    if cap <= 0:
        return
    root = cache_root(cache_dir)
    removed, freed = guarded(f"the cache {root}", lambda: evict(root, max_bytes=cap), (0, 0))
    if removed:
        log.info("cache: %d least recently used entries removed (%.1f MB) to stay under %.1f GB "
                 "($VISIONTUNE_CACHE_MAX)", removed, freed / 1e6, cap / 1024 ** 3)


def _start_clock(clock: Clock, setup: RunSetup, run_dir: Path, resumed: bool) -> None:
    """Under a budget: a resumed run says what is left of it; the clock keeps its record
    of the time used from here on (rank 0)."""
    if resumed:
        _say_time_left(clock, run_dir)
    if setup.env.is_main:
        clock.keep_record(run_dir)


def _check_time_left(clock: Clock, run_dir: Path, has_checkpoint: bool) -> None:
    """A run killed before its first checkpoint that had used its whole budget is refused:
    there are no weights to end with."""
    left = clock.left()
    if left is not None and left <= 0 and not has_checkpoint:
        raise ConfigError(f"{run_dir} used its whole time budget ({clock.used_before:.0f} s of {clock.budget_s:.0f} s)"
                          " before its first checkpoint: it has no weights to keep. Give it more time with "
                          "--time-budget (the whole run's budget, counting the time used), or start a new run")


def _say_time_left(clock: Clock, run_dir: Path) -> None:
    """A resumed run under a budget: what is left of it, counted from the first start
    (the clock's record, else the checkpoint)."""
    left = clock.left()
    if left is None:
        return
    if clock.used_before:
        log.info("time budget: %.0f s of %.0f s left after resuming (%.0f s used before)", max(0.0, left),
                 clock.budget_s, clock.used_before)
    else:
        log.warning("time budget: %s has no record of the time it used before; the whole budget of %.0f s counts "
                    "from now", run_dir, clock.budget_s)


def _final_outputs(setup: RunSetup, trainer: Trainer, checkpoint: Checkpoint) -> EvalOutput | None:
    """Validation outputs of the weights the run ends with."""
    if setup.cfg.train.restore_best and checkpoint.best_eval is not None:
        return checkpoint.best_eval
    return trainer.state.last_eval


def tune_thresholds(setup: RunSetup, valid_out: EvalOutput | None, run_dir: Path) -> bool:
    """Per-label thresholds with the best F1 on the (calibrated) validation outputs, kept by
    the task (written with the weights by the caller) and in thresholds.json (their validation
    F1 is optimistic: chosen there); whether any were tuned."""
    task = setup.task
    if valid_out is None or not len(valid_out.targets):
        log.warning("--thresholds tuned needs validation images; keeping the global threshold")
        return False
    tuned = task.tune_thresholds(valid_out.targets, valid_out.probs)
    if tuned is None:
        log.warning("--thresholds tuned applies to multi-label tasks; %s predicts the most probable class", task.name)
        return False
    log.info("thresholds tuned on the validation split: %s",
             ", ".join(f"{c}={t:.2f}" for c, t in zip(task.classes, tuned)))
    if setup.env.is_main:
        positives = (np.asarray(valid_out.targets) > 0.5).sum(axis=0)
        RunDir(run_dir).write_thresholds({
            "chosen_on": "the validation split (its F1 at these thresholds is optimistic)",
            "thresholds": {c: {"threshold": float(t), "valid_positives": int(n)}
                           for c, t, n in zip(task.classes, tuned, positives)}})
    return True


def choose_objective(t: TrainConfig, source: DataSource, task: Task, by_cv: bool = False) -> Objective:
    """What early stopping, the best checkpoint and the EMA's comparison look at:
    `t.monitor` resolved, in `t.mode`'s direction (auto: the task's); without validation
    images, the training loss (`by_cv`: the probe's cross-validation validates)."""
    monitor = resolve_monitor(t.monitor, source, task)
    objective = task.objective(monitor, t.mode)  # the task says which way is better (and refuses a metric it lacks)
    if not source.split(VALID) and monitor != "train_loss" and not by_cv:
        log.warning("no validation images: monitoring train_loss instead of %s", monitor)
        return Objective("train_loss", "min")
    return objective


def cross_validated(setup: RunSetup, source: DataSource) -> bool:
    """Whether the run validates by the converged probe's cross-validation: no split could
    be held out and the plan is the probe alone (train/setup.py)."""
    return bool(source.no_validation) and not source.split(VALID) and all(p.probe for p in setup.plan.phases)


def resolve_monitor(monitor: str, source: DataSource, task: Task | None = None) -> str:
    """'auto': the task's choice (single-label: val_loss, or macro_f1 when the training
    classes are imbalanced, largest / smallest > 3, where loss and accuracy reward
    ignoring the small classes)."""
    if monitor != "auto":
        return monitor
    from_task = task if task is not None else _default_task(source)
    return from_task.default_monitor(source.imbalance_ratio())


def _default_task(source: DataSource) -> Task:
    return make_task("single-label", source.classes)


def _check_resumed_data(run_dir: Path, source: DataSource, delim: str, restart: bool) -> None:
    """A run resumed from a checkpoint must see the data it started with (DataError
    otherwise); one restarted in place (killed before its first checkpoint) starts from
    nothing, so it only says what changed: its files are written again for the data now."""
    if not restart:
        keep_recorded_split(run_dir, source)
    try:
        check_same_data(run_dir, source, delim)
    except DataError as exc:
        if not restart:
            raise
        log.warning("%s had no checkpoint yet and starts again on the data as it is now (%s)", run_dir, exc)


def open_run_dir(setup: RunSetup, source: DataSource, run_dir: Path | None, restart: bool = False) -> Path:
    """A new run directory with the run's files (rank 0 only; other processes write to
    os.devnull); a run restarted in place gets them anew; a resumed one its config brought
    up to date."""
    main = setup.env.is_main
    if run_dir is None:
        run_dir = new_run_dir(setup.cfg) if main else Path(os.devnull)
        if main:
            write_run_files(run_dir, setup, source)
    elif main and restart:
        write_run_files(run_dir, setup, source)
    elif main:
        RunDir(run_dir).write_config(setup.cfg)
    if setup.model.warm_start and main:
        RunDir(run_dir).write_warm_start(setup.model.warm_start)
    return run_dir


def _early_stopping(t: TrainConfig, objective: Objective) -> EarlyStopping | None:
    """Early stopping by `--patience`, and after a converged probe by `--probe-patience`
    (none with --patience 0)."""
    return EarlyStopping(objective, t.patience, t.min_delta, t.probe_patience) if t.patience > 0 else None


def _callbacks(setup: RunSetup, run_dir: Path, checkpoint: Checkpoint, stopper: EarlyStopping | None,
               extra: list[Callback]) -> list[Callback]:
    """Early stopping before the checkpoint (which saves its state); printing and history
    files on rank 0 only; the caller's callbacks last."""
    first: list[Callback] = [stopper] if stopper else []
    if setup.env.is_main:
        return [EpochPrinter(), *first, checkpoint, HistoryLogger(run_dir), *extra]
    return [*first, checkpoint, *extra]


def summarise(setup: RunSetup, trainer: Trainer, checkpoint: Checkpoint, stopper: EarlyStopping | None,
              run_dir: Path, source: DataSource, valid_out: EvalOutput | None = None) -> FitResult:
    """The metrics of the weights the model now holds (the best epoch's with restore_best,
    else the last), written to metrics.json and environment.json on rank 0. With tuned
    thresholds, the decision metrics are those at the thresholds the model keeps, on the
    calibrated `valid_out` they were chosen on (optimistic, and marked so)."""
    t, history = setup.cfg.train, trainer.state.history
    best_epoch = checkpoint.best.epoch + 1
    kept_epoch = best_epoch if t.restore_best and best_epoch > 0 else len(history)
    final = {k: float(v) for k, v in metrics_of(history[kept_epoch - 1]).items()} if history else {}
    tuned = _at_tuned_thresholds(setup, valid_out)
    final.update(tuned)
    if setup.env.is_main:
        how = {"validation": validated_by} if (validated_by := _validated_by(setup, source)) else {}
        if tuned:
            how["thresholds"] = "tuned on these images: their F1 and accuracy here are optimistic"
        stopped = {"stopped": stopper.reason} if stopper and stopper.reason else {}
        RunDir(run_dir).write_metrics({**final, "epoch": kept_epoch, "best_epoch": best_epoch, "epochs_run": len(history),
                                       **how, "kept": checkpoint.why, **stopped})
        RunDir(run_dir).write_environment({**environment(setup.cfg, str(setup.device)),
                                           "world_size": setup.env.world_size})
    final_outputs = _final_outputs(setup, trainer, checkpoint)
    return FitResult(
        run_dir=str(run_dir), classes=setup.task.classes, metrics=final, history=history, best_epoch=best_epoch,
        stopped_early=bool(stopper and stopper.stopped_epoch is not None), seconds=trainer.elapsed(),
        trainable_params=setup.plan.most_trainable_params(), valid_probs=None if final_outputs is None else final_outputs.probs,
        model=setup.model, data=source, setup=setup, validated_by=_validated_by(setup, source),
        kept="best" if t.restore_best else "last", why_kept=checkpoint.why,
        why_stopped=stopper.reason if stopper else "",
    )


def _at_tuned_thresholds(setup: RunSetup, valid_out: EvalOutput | None) -> dict[str, float]:
    """The task's metrics at its tuned thresholds on the held-out outputs they were tuned on
    (`valid_out`; None, and {}, when none were tuned): the history's are at the global threshold."""
    if valid_out is None:
        return {}
    rows = known_rows(valid_out.targets)
    if not rows.any():
        return {}
    return {k: float(v) for k, v in setup.task.metrics(valid_out.targets[rows], valid_out.probs[rows]).items()}


def keep_recorded_split(run_dir: Path, source: DataSource) -> None:
    """A resumed run validates on the images it started with: where the train/valid split
    drawn now differs from the one its splits.csv records (a version whose rule splits
    another layout, another library's draw), each image keeps its recorded side, and one
    line says how many. Moves to or from test, and any other change, are check_same_data's."""
    sides = (TRAIN, VALID)
    before = {r["path"]: r["split"] for r in RunDir(run_dir).split_rows() if r["split"] in sides}
    if not before:
        return
    moved = [i for i, it in enumerate(source.items) if it.split in sides and before.get(it.path, it.split) != it.split]
    if not moved:
        return
    for i in moved:
        source.items[i] = replace(source.items[i], split=before[source.items[i].path])
    if source.split(VALID):
        source.no_validation = ""
    log.warning("%d images keep the side of the train/valid split that %s started with (e.g. %s: %s), not the one "
                "drawn now", len(moved), run_dir, source.items[moved[0]].path, source.items[moved[0]].split)


def _validated_by(setup: RunSetup, source: DataSource) -> str:
    """How the run's metrics were validated when not on a validation split ("" when they were)."""
    if cross_validated(setup, source):
        return f"the converged probe's cross-validation ({source.no_validation})"
    return ""


def check_same_data(run_dir: Path, source: DataSource, delim: str = " ") -> None:
    """Resuming must train on the images the run started with: the same classes, and the
    same (path, label, split) rows as its splits.csv. Anything else is refused, naming what
    changed."""
    run = RunDir(run_dir)
    saved_classes = run.read_classes()
    if saved_classes is None:
        return
    if saved_classes != source.classes:
        raise DataError(f"the data now has classes {source.classes} but the run to resume has {saved_classes}")
    if not run.splits_file.is_file():
        return
    before = {r["path"]: (r["label"], r["split"]) for r in run.split_rows()}
    text = task_class(source.task).label_text
    now = {it.path: (text(it.label, delim), it.split) for it in source.items}
    changes = [(what, paths) for what, paths in (
        ("added", sorted(now.keys() - before.keys())),
        ("removed", sorted(before.keys() - now.keys())),
        ("relabelled", sorted(p for p in now.keys() & before.keys() if now[p][0] != before[p][0])),
        ("moved to another split", sorted(p for p in now.keys() & before.keys() if now[p][1] != before[p][1])),
    ) if paths]
    if changes:
        said = "; ".join(f"{len(paths)} {'image' if len(paths) == 1 else 'images'} {what} (e.g. {paths[0]})"
                         for what, paths in changes)
        raise DataError(f"the data changed since {run_dir} started: {said}. Resuming would train on other images; "
                        "restore the data as it was, or start a new run")


def new_run_dir(cfg: RunConfig) -> Path:
    """A run directory no other run has: `--name` (or time-backbone-strategy), with -2, -3...
    when taken. Claimed by an exclusive mkdir, so two runs started in the same second (or
    under one --name) never share one."""
    return RunDir.claim(cfg.output, cfg.name, cfg.model.backbone.split(":")[-1], cfg.strategy.name).path


def write_run_files(run_dir: Path, setup: RunSetup, source: DataSource) -> None:
    run = RunDir(run_dir)
    run.write_config(setup.cfg)
    run.write_classes(source.classes)
    run.write_preprocess(setup.preprocess)
    run.write_environment(environment(setup.cfg, str(setup.device)))
    delim = setup.cfg.data.label_delim
    text = task_class(source.task).label_text
    run.write_splits((it.path, text(it.label, delim), it.split) for it in source.items)
    run.write_excluded([*source.excluded, *((p, "hidden") for p in source.hidden)])

