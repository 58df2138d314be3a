"""Stratified k-fold cross-validation and the side-by-side strategy comparison.

`cross_validate` trains a fresh model per fold and writes out-of-fold probabilities for
every image; `compare` runs every strategy on the same split, seed and epoch budget (d2l
14.2's fine-tuned-vs-scratch experiment as one call). With the feature cache, frozen
strategies compute backbone features once for all folds and strategies.
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from visiontune.api import FitResult, fit_source
from visiontune.bundle import write_csv, write_json, write_text
from visiontune.config import STRATEGIES, RunConfig
from visiontune.data import TEST, TRAIN, VALID, DataSource, LabelFunc, load_items
from visiontune.errors import ConfigError, DataError

log = logging.getLogger(__name__)

SUMMARY_METRICS = ("accuracy", "macro_f1", "val_loss")


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

    def format(self) -> str:
        lines = [f"{self.num_folds}-fold cross-validation ({len(self.paths)} images, {self.seconds:.1f}s)"]
        for i, f in enumerate(self.folds):
            lines.append(f"  fold {i + 1}: " + "  ".join(f"{k} {f[k]:.4f}" for k in SUMMARY_METRICS))
        lines.append("  mean +- std: " + "  ".join(f"{k} {self.mean[k]:.4f} +- {self.std[k]:.4f}" for k in SUMMARY_METRICS))
        lines.append(f"out-of-fold probabilities: {self.oof_path}")
        return "\n".join(lines)


def choose_folds(labels: list[str], folds: int) -> int:
    """`folds`, or fewer when a class has fewer images (each fold needs one of each)."""
    if folds < 2:
        raise ConfigError(f"folds must be >= 2, got {folds}")
    counts: dict[str, int] = {}
    for label in labels:
        counts[label] = counts.get(label, 0) + 1
    smallest = min(counts.values())
    if smallest >= folds:
        return folds
    small = sorted(c for c, n in counts.items() if n < folds)
    if smallest < 2:
        raise DataError(f"classes {small} have fewer than 2 images: no fold split can validate on them; add images")
    log.warning("classes %s have fewer images than %d folds: using %d folds (the smallest class size)",
                small, folds, smallest)
    return smallest


def cross_validate(data: str | os.PathLike[str] | None = None, *, folds: int = 5, config: RunConfig | None = None,
                   label_func: LabelFunc | None = None, source: DataSource | None = None,
                   **overrides: Any) -> CVResult:
    """Stratified k-fold over train + valid images (test/ stays out)."""
    started = time.perf_counter()
    if data is not None:
        overrides["path"] = str(data)
    cfg = RunConfig.create(config, **overrides)
    if source is None:
        source = load_items(cfg.data, cfg.seed, label_func)
    pool = [it for it in source.items if it.split in (TRAIN, VALID)]
    labels = [it.label for it in pool]
    k = choose_folds(labels, folds)
    from sklearn.model_selection import StratifiedKFold

    splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=cfg.seed)
    out_dir = Path(cfg.output) / (cfg.name or f"{time.strftime('%Y%m%d-%H%M%S')}-cv-{cfg.strategy.name}")
    probs = np.zeros((len(pool), len(source.classes)), dtype=np.float64)
    fold_of = np.zeros(len(pool), dtype=int)
    rows = []
    for i, (_, valid_idx) in enumerate(splitter.split(np.zeros(len(pool)), labels)):
        chosen = set(valid_idx.tolist())
        items = [replace(it, split=VALID if j in chosen else TRAIN) for j, it in enumerate(pool)]
        items += [it for it in source.items if it.split == TEST]
        fold_source = DataSource(source.root, source.classes, items, source.excluded, source.hidden)
        log.info("fold %d/%d: %d train, %d valid", i + 1, k, len(pool) - len(chosen), len(chosen))
        result = fit_source(replace(cfg, output=str(out_dir), name=f"fold{i + 1}"), fold_source)
        rows.append({m: float(result.metrics.get(m, float("nan"))) for m in SUMMARY_METRICS})
        if result.valid_probs is not None:
            probs[sorted(chosen)] = result.valid_probs  # valid items keep pool order
        fold_of[sorted(chosen)] = i + 1
    mean = {m: statistics.fmean(r[m] for r in rows) for m in SUMMARY_METRICS}
    std = {m: statistics.pstdev(r[m] for r in rows) for m in SUMMARY_METRICS}
    oof_path = out_dir / "oof.csv"
    _write_oof(oof_path, pool, fold_of, probs, source.classes)
    write_json(out_dir / "cv_summary.json", {"folds": rows, "mean": mean, "std": std, "num_folds": k,
                                             "strategy": cfg.strategy.name})
    return CVResult(rows, mean, std, str(oof_path), str(out_dir), k, probs, [it.path for it in pool], labels,
                    source.classes, time.perf_counter() - started)


def _write_oof(path: Path, pool: list[Any], fold_of: np.ndarray, probs: np.ndarray, classes: list[str]) -> None:
    write_csv(path, ["path", "label", "fold", "predicted", *[f"prob_{c}" for c in classes]],
              ([it.path, it.label, int(fold), classes[int(np.argmax(p))], *[f"{v:.6f}" for v in p]]
               for it, fold, p in zip(pool, fold_of, probs)))


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


def compare(data: str | os.PathLike[str] | None = None, *, strategies: tuple[str, ...] = STRATEGIES,
            folds: int | None = None, config: RunConfig | None = None, label_func: LabelFunc | None = None,
            **overrides: Any) -> tuple[list[CompareRow], str]:
    """Every strategy on the same split, seed and epochs; returns the rows and the output folder."""
    if data is not None:
        overrides["path"] = str(data)
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        raise ConfigError(f"unknown strategies {unknown}; choose from {', '.join(STRATEGIES)}")
    cfg = RunConfig.create(config, **overrides)
    source = load_items(cfg.data, cfg.seed, label_func)
    out_dir = Path(cfg.output) / (cfg.name or f"{time.strftime('%Y%m%d-%H%M%S')}-compare")
    rows = []
    for strategy in strategies:
        scfg = RunConfig.create(cfg, strategy=strategy, weights="none" if strategy == "scratch" else cfg.model.weights,
                                output=str(out_dir), name=strategy)
        started = time.perf_counter()
        if folds:
            cv = cross_validate(config=scfg, folds=folds, source=source, name=f"{strategy}-cv")
            rows.append(CompareRow(strategy, cv.mean["accuracy"], max(f["accuracy"] for f in cv.folds),
                                   cv.mean["macro_f1"], cv.mean["val_loss"], 0, time.perf_counter() - started, 0,
                                   cv.std["accuracy"], cv.std["macro_f1"], cv.std["val_loss"]))
            continue
        r: FitResult = fit_source(scfg, source)
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
