"""Every strategy side by side on the same split, seed and epoch budget (d2l 14.2's
fine-tuned-vs-scratch experiment as one call), optionally cross-validated."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from visiontune.config import RunConfig
from visiontune.data.sources import LabelFunc, resolve_inputs
from visiontune.errors import ConfigError
from visiontune.files import write_json, write_text
from visiontune.selection.cv import cross_validate
from visiontune.train.session import FitResult, train_run
from visiontune.train.strategies import STRATEGIES, strategy_names


@dataclass
class CompareRow:
    strategy: str
    accuracy: float
    best_accuracy: float
    macro_f1: float
    val_loss: float
    epochs_to_best: int
    seconds: float
    trainable_params: int
    accuracy_std: float | None = None
    macro_f1_std: float | None = None
    val_loss_std: float | None = None


def compare(data: str | os.PathLike[str] | None = None, *, strategies: tuple[str, ...] | None = None,
            folds: int | None = None, config: RunConfig | None = None, label_func: LabelFunc | None = None,
            **overrides: Any) -> tuple[list[CompareRow], str]:
    """Every strategy (default: all registered) on the same split, seed and epochs;
    returns the rows and the output folder."""
    strategies = strategy_names() if strategies is None else strategies
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        raise ConfigError(f"unknown strategies {unknown}; choose from {', '.join(strategy_names())}")
    cfg, source = resolve_inputs(data, config, label_func, overrides)
    out_dir = Path(cfg.output) / (cfg.name or f"{time.strftime('%Y%m%d-%H%M%S')}-compare")
    rows = []
    for strategy in strategies:
        weights = "none" if STRATEGIES[strategy].random_init else cfg.model.weights
        scfg = RunConfig.create(cfg, strategy=strategy, weights=weights, output=str(out_dir), name=strategy)
        started = time.perf_counter()
        if folds:
            cv = cross_validate(config=scfg, folds=folds, source=source, name=f"{strategy}-cv")
            rows.append(CompareRow(strategy, cv.mean["accuracy"], max(f["accuracy"] for f in cv.folds),
                                   cv.mean["macro_f1"], cv.mean["val_loss"], 0, time.perf_counter() - started, 0,
                                   cv.std["accuracy"], cv.std["macro_f1"], cv.std["val_loss"]))
            continue
        r: FitResult = train_run(scfg, source)
        rows.append(CompareRow(strategy, r.metrics.get("accuracy", float("nan")),
                               max((h.get("accuracy", float("nan")) for h in r.history), default=float("nan")),
                               r.metrics.get("macro_f1", float("nan")), r.metrics.get("val_loss", float("nan")),
                               r.best_epoch, time.perf_counter() - started, r.trainable_params))
    write_text(out_dir / "compare.md", format_compare(rows) + "\n")
    write_json(out_dir / "compare.json", [row.__dict__ for row in rows])
    return rows, str(out_dir)


def format_compare(rows: list[CompareRow]) -> str:
    with_std = any(r.accuracy_std is not None for r in rows)
    if with_std:
        head = f"| {'strategy':<16} | {'accuracy':>17} | {'macro_f1':>17} | {'val_loss':>17} | {'wall s':>7} |"
        lines = [head, "|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|"]
        for r in rows:
            lines.append(f"| {r.strategy:<16} | {r.accuracy:>8.4f} +- {r.accuracy_std:.4f} | {r.macro_f1:>8.4f} +- "
                         f"{r.macro_f1_std:.4f} | {r.val_loss:>8.4f} +- {r.val_loss_std:.4f} | {r.seconds:>7.1f} |")
        return "\n".join(lines)
    head = (f"| {'strategy':<16} | {'accuracy':>8} | {'max acc':>7} | {'macro_f1':>8} | {'val_loss':>8} | "
            f"{'best ep':>7} | {'wall s':>7} | {'trainable':>11} |")
    lines = [head, "|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|"]
    for r in rows:
        lines.append(f"| {r.strategy:<16} | {r.accuracy:>8.4f} | {r.best_accuracy:>7.4f} | {r.macro_f1:>8.4f} | "
                     f"{r.val_loss:>8.4f} | {r.epochs_to_best:>7d} | {r.seconds:>7.1f} | {r.trainable_params:>11,} |")
    return "\n".join(lines)
