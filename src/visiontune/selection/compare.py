"""Every strategy side by side on the same split, seed and epoch budget (d2l 14.2's
fine-tuned-vs-scratch experiment as one call), optionally cross-validated.

The numbers are honest: epochs are chosen on one split and the metrics reported on
another that no choice looked at. With a test split, epochs are chosen on valid and the
test split is reported; without one, epochs are chosen on an inner split of the training
images (stratified, `valid_pct`) and the valid split is reported. With `folds`, each
strategy is cross-validated (selection/cv.py). The table says which.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from typing import Any

from visiontune import display
from visiontune.config import RunConfig
from visiontune.data.items import TEST, TRAIN, VALID, DataSource, Item, LabelFunc
from visiontune.data.sources import resolve_inputs
from visiontune.data.splits import group_keys, stratified_split
from visiontune.errors import ConfigError
from visiontune.planning.plan import plan_run
from visiontune.rundir import RunDir
from visiontune.selection.cv import SELECTIONS, cross_validate
from visiontune.tasks.catalog import TASKS
from visiontune.train.session import score_items, train_run
from visiontune.train.strategies import STRATEGIES, strategy_names
from visiontune.train.tracking import flat_params, parent_run


@dataclass
class CompareRow:
    strategy: str
    scores: dict[str, float]  # the task's headline metrics and "loss" (single-label: accuracy, macro_f1)
    selected_epoch: int  # the epoch whose weights were scored (0 when cross-validated)
    epochs_run: int
    seconds: float
    trainable_params: int
    protocol: str = ""  # which split chose the epochs and which one is reported
    stds: dict[str, float] | None = None  # with folds

    def __getattr__(self, name: str) -> float | None:
        """`row.accuracy`, `row.loss`, `row.mAP`... and `row.accuracy_std`."""
        scores, stds = self.__dict__.get("scores", {}), self.__dict__.get("stds")
        if name in scores:
            return scores[name]
        if name.endswith("_std") and name[:-4] in scores:
            return None if stds is None else stds[name[:-4]]
        raise AttributeError(name)


class CompareTable(list):
    """The rows of `compare`, one per strategy; renders as a table in Jupyter."""

    def _repr_html_(self) -> str:
        names = list(self[0].scores) if self else []
        rows = [[r.strategy, *(r.scores[n] if r.stds is None else f"{r.scores[n]:.4f} +- {r.stds[n]:.4f}"
                               for n in names), r.selected_epoch, r.epochs_run, r.seconds, r.trainable_params]
                for r in self]
        protocol = self[0].protocol if self else ""
        return display.table(rows, ["strategy", *names, "epoch scored", "epochs run", "seconds", "trainable"],
                             protocol)


@dataclass
class Holdout:
    """The data each strategy trains on, the items it is scored on, and how."""

    source: DataSource
    report: list[Item]
    protocol: str


def compare(data: str | os.PathLike[str] | None = None, *, strategies: tuple[str, ...] | None = None,
            folds: int | None = None, config: RunConfig | None = None, label_func: LabelFunc | None = None,
            **overrides: Any) -> tuple[CompareTable, str]:
    """Every strategy (default: all registered) on the same data, seed and epochs;
    returns the rows and the output folder."""
    strategies = strategy_names() if strategies is None else strategies
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        raise ConfigError(f"unknown strategies {unknown}; choose from {', '.join(strategy_names())}")
    RunConfig.create(config, **overrides).refuse_time_budget("compare",
                       "compares strategies at the same epochs on the same split")
    cfg, source = resolve_inputs(data, config, label_func, overrides)
    out = RunDir.claim(cfg.output, cfg.name, "compare")
    out_dir = out.path
    holdout = None if folds else holdout_for(source, cfg)
    headline = TASKS[source.task].headline
    rows = CompareTable()
    with parent_run(cfg.tracking.track, out_dir.parent, out_dir.name, {"kind": "compare"}, flat_params(cfg)) as parent:
        for strategy in strategies:
            weights = "none" if STRATEGIES[strategy].random_init else cfg.model.weights
            scfg = RunConfig.create(cfg, strategy=strategy, weights=weights, output=str(out_dir), name=strategy)
            started = time.perf_counter()
            rows.append(_cv_row(scfg, source, folds, started) if folds
                        else _holdout_row(scfg, holdout, headline, started))
            parent.log_metrics({f"{strategy}_{m}": v for m, v in rows[-1].scores.items() if v is not None})
    out.write_compare(format_compare(rows), [row.__dict__ for row in rows])
    return rows, str(out_dir)


def holdout_for(source: DataSource, cfg: RunConfig) -> Holdout:
    """Test split reported, epochs chosen on valid; or, without test images, valid reported
    and epochs chosen on an inner split of train."""
    if source.split(TEST):
        return Holdout(source, source.split(TEST), "epochs chosen on valid; metrics on test")
    valid, train = source.split(VALID), source.split(TRAIN)
    if not valid:
        why = f" ({source.no_validation}, so none could be held out)" if source.no_validation else ""
        raise ConfigError(f"compare needs held-out images to report on{why}: a valid/ or test/ folder, "
                          + ("or more labelled images" if source.no_validation else "or --valid-pct > 0"))
    inner = set(stratified_split([it.label for it in train], cfg.data.valid_pct or 0.2, cfg.seed, group_keys(train)))
    items = [replace(it, split=VALID if j in inner else TRAIN) for j, it in enumerate(train)]
    report = [replace(it, split=TEST) for it in valid]
    fit_on = replace(source, items=items + report)
    return Holdout(fit_on, report, "epochs chosen on an inner split of train; metrics on valid")


def _holdout_row(cfg: RunConfig, holdout: Holdout | None, headline: tuple[str, ...], started: float) -> CompareRow:
    assert holdout is not None
    plan = plan_run(cfg, holdout.source)  # --batch-size auto: per strategy, as each trains
    result = train_run(plan.cfg, holdout.source, clock=plan.clock)
    metrics, _ = score_items(result, holdout.report)
    return CompareRow(cfg.strategy.name, {m: metrics.get(m, float("nan")) for m in headline}, result.best_epoch,
                      len(result.history), time.perf_counter() - started, result.trainable_params,
                      holdout.protocol + " (untouched by selection)")


def _cv_row(cfg: RunConfig, source: DataSource, folds: int, started: float) -> CompareRow:
    cv = cross_validate(config=cfg, folds=folds, source=source, name=f"{cfg.strategy.name}-cv")
    return CompareRow(cfg.strategy.name, dict(cv.mean), 0, 0, time.perf_counter() - started, 0,
                      f"{cv.num_folds}-fold CV: {SELECTIONS[cv.selection]}; metrics on each held-out fold",
                      dict(cv.std))


def format_compare(rows: list[CompareRow]) -> str:
    if not rows:
        return ""
    names, caption = list(rows[0].scores), f"({rows[0].protocol})"
    if rows[0].stds is not None:
        head = f"| {'strategy':<16} | " + " | ".join(f"{n:>17}" for n in names) + f" | {'wall s':>7} |"
        lines = [head, "|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|"]
        for r in rows:
            cells = " | ".join(f"{r.scores[n]:>8.4f} +- {r.stds[n]:.4f}" for n in names)  # type: ignore[index]
            lines.append(f"| {r.strategy:<16} | {cells} | {r.seconds:>7.1f} |")
        return "\n".join([*lines, caption])
    head = (f"| {'strategy':<16} | " + " | ".join(f"{n:>8}" for n in names)
            + f" | {'epoch':>5} | {'of':>3} | {'wall s':>7} | {'trainable':>11} |")
    lines = [head, "|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|"]
    for r in rows:
        cells = " | ".join(f"{r.scores[n]:>8.4f}" for n in names)
        lines.append(f"| {r.strategy:<16} | {cells} | {r.selected_epoch:>5d} | {r.epochs_run:>3d} | "
                     f"{r.seconds:>7.1f} | {r.trainable_params:>11,} |")
    return "\n".join([*lines, caption])
