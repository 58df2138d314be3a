"""Stratified k-fold cross-validation: a fresh model per fold, out-of-fold probabilities
for every image. With the feature cache, frozen strategies compute backbone features once
for all folds."""

from __future__ import annotations

import logging
import os
import statistics
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.model_selection import StratifiedKFold

from visiontune.config import RunConfig
from visiontune.data.sources import TEST, TRAIN, VALID, DataSource, LabelFunc, fold_count, resolve_inputs
from visiontune.files import write_csv, write_json
from visiontune.train.session import train_run

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


def cross_validate(data: str | os.PathLike[str] | None = None, *, folds: int = 5, config: RunConfig | None = None,
                   label_func: LabelFunc | None = None, source: DataSource | None = None,
                   **overrides: Any) -> CVResult:
    """Stratified k-fold over train + valid images (test/ stays out)."""
    started = time.perf_counter()
    if source is None:
        cfg, source = resolve_inputs(data, config, label_func, overrides)
    else:
        cfg = RunConfig.create(config, **overrides)
    pool = [it for it in source.items if it.split in (TRAIN, VALID)]
    labels = [it.label for it in pool]
    k = fold_count(labels, folds)
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
        result = train_run(replace(cfg, output=str(out_dir), name=f"fold{i + 1}"), fold_source)
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


