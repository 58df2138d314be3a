"""Which strategy fits this task? Measure, then decide, then say why with the numbers.

Measured: images per class and imbalance; how well the pretrained features already
separate the classes (a cross-validated logistic-regression probe on cached, frozen
features) against a baseline that knows nothing of ImageNet (k-nearest neighbours on
16x16 pixels) and chance. The probe's share of the possible gain over chance is the
task similarity: near 1, the source features already solve the task.
"""

from __future__ import annotations

import logging
import os
import statistics
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sklearn.linear_model import RidgeCV
from sklearn.model_selection import cross_val_predict, cross_val_score
from sklearn.multiclass import OneVsRestClassifier
from sklearn.neighbors import KNeighborsClassifier, KNeighborsRegressor
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from visiontune import display
from visiontune.config import ModelConfig, RunConfig
from visiontune.data.images import load_rgb
from visiontune.data.items import TRAIN, VALID, DataSource, LabelFunc
from visiontune.data.labels import REGRESSION, Label, class_index, indicator, is_multi, label_counts
from visiontune.data.sources import resolve_inputs
from visiontune.data.splits import fold_count, fold_pairs
from visiontune.models.classifier import create_classifier
from visiontune.runtime.device import prepare_model, resolve_device
from visiontune.selection.costs import Costs, measure_costs
from visiontune.tasks.metrics import mean_average_precision
from visiontune.tasks.regression import Regression
from visiontune.train.features import cache_for, extract_features
from visiontune.train.probe import probe_estimator
from visiontune.train.strategies import AUTO, get_strategy

log = logging.getLogger(__name__)

SMALL_PER_CLASS = 100  # images per class below which the backbone is best left (mostly) alone
LARGE_PER_CLASS = 1000  # enough to re-learn features
SIMILAR, SOMEWHAT = 0.8, 0.5  # probe share of the possible gain over chance
PROBE_CEILING = 0.03  # a probe within 3 points of perfect leaves fine-tuning too little to gain for its cost


@dataclass
class Advice:
    strategy: str
    explanation: str
    images: int
    classes: int
    median_per_class: float
    imbalance: float
    probe_accuracy: float
    baseline_accuracy: float
    chance: float
    similarity: float

    def format(self) -> str:
        return f"strategy: {self.strategy}\n{self.explanation}"

    def _repr_html_(self) -> str:
        facts = [["images", self.images], ["classes", self.classes], ["median per class", self.median_per_class],
                 ["imbalance", self.imbalance], ["probe accuracy", self.probe_accuracy],
                 ["baseline accuracy", self.baseline_accuracy], ["chance", self.chance],
                 ["similarity to ImageNet", self.similarity]]
        return (f"<h4>recommended strategy: {display.cell(self.strategy)}</h4>" + display.pre(self.explanation)
                + display.table(facts, ["measured", "value"]))


def decide(median_per_class: float, similarity: float, probe: float, baseline: float) -> tuple[str, str]:
    """The rule: (strategy, reason). `similarity` = (probe - chance) / (1 - chance)."""
    small, large = median_per_class < SMALL_PER_CLASS, median_per_class >= LARGE_PER_CLASS
    if similarity >= SIMILAR:
        if small:
            return "feature-extract", ("the frozen features already separate the classes and there is little data, "
                                       "so train only the head (cheapest, least overfitting)")
        return "gradual", ("the frozen features already fit well and there is data enough to refine them: head "
                           "first, then the whole network at low, discriminative learning rates")
    if similarity >= SOMEWHAT:
        if small:
            return "freeze-k", ("the features fit partly and data is scarce: keep the generic early layers frozen "
                                "and adapt the later ones")
        if large:
            return "finetune", "the features fit partly and data is plentiful: fine-tune the whole network"
        return "gradual", "the features fit partly: train the head first, then fine-tune everything gently"
    if large:
        if baseline >= probe:
            return "scratch", ("the pretrained features do no better than raw pixels and data is plentiful: "
                               "training from scratch loses nothing")
        return "finetune", "the task is far from ImageNet but data is plentiful: fine-tune the whole network"
    if small:
        return "feature-extract", ("the task is far from ImageNet and data is scarce, so no strategy will do "
                                   "much; the frozen-feature head overfits least. More labelled data would help "
                                   "most")
    return "freeze-k", "the task is far from ImageNet with a medium amount of data: re-train the later layers"


def advise(data: str | os.PathLike[str] | None = None, *, config: RunConfig | None = None,
           label_func: LabelFunc | None = None, **overrides: Any) -> Advice:
    """Measure the data, the task similarity and the costs here; recommend a strategy."""
    cfg, source = resolve_inputs(data, config, label_func, overrides)
    return advise_source(cfg, source, measure_costs(cfg, source))


def resolve_strategy(cfg: RunConfig, source: DataSource) -> RunConfig:
    """`cfg` with strategy 'auto' replaced by the advisor's choice on `source`'s train and
    valid images (test images are never looked at); other strategies unchanged."""
    if cfg.strategy.name != AUTO:
        return cfg
    advice = advise_source(cfg, source, measure_costs(cfg, source))
    log.info("advisor: %s", advice.explanation)
    return RunConfig.create(cfg, strategy=advice.strategy)


def weigh_cost(strategy: str, reason: str, probe: float, costs: Costs | None) -> tuple[str, str]:
    """A fine-tuning recommendation becomes the converged probe (feature-extract) when the
    advisor's scikit-learn probe (C = 0.1, the one still apart from train/probe.py) is already
    within PROBE_CEILING of a perfect score: fine-tuning cannot gain more than that, at the
    measured cost of every epoch."""
    if strategy == "feature-extract" or 1 - probe >= PROBE_CEILING:
        return strategy, reason
    cost = f" at ~{costs.epoch_seconds():.0f} s per epoch here" if costs else ""
    return "feature-extract", (f"a linear probe on the frozen features already scores {probe:.3f} (cross-validated): "
                               f"fine-tuning{cost} could gain at "
                               f"most {100 * (1 - probe):.1f} points, so the probe (seconds) is the better buy")


def advise_source(cfg: RunConfig, source: DataSource, costs: Costs | None = None) -> Advice:
    """Measure `source` (train + valid images) and recommend a registered strategy; with
    `costs` (selection/costs.py) the explanation quotes what each choice costs here."""
    pool = [it for it in source.items if it.split in (TRAIN, VALID)]
    labels = [it.label for it in pool]
    model_cfg = cfg.model if cfg.model.weights != "none" else RunConfig().model
    feats = _frozen_features(cfg, model_cfg, source, [it.path for it in pool])
    folds = fold_count(labels, 5)
    m = _measures(labels, source, folds, cfg.seed)
    counts, chance, (what, unit, units) = m.counts, m.chance, m.words
    probe = m.score(m.probe, feats)
    baseline = m.score(m.baseline(min(5, max(1, len(labels) // (2 * folds)))), _pixels([it.path for it in pool]))
    similarity = (probe - chance) / max(1e-9, 1 - chance)
    median = float(statistics.median(counts[counts > 0]))
    strategy, reason = weigh_cost(*decide(median, similarity, probe, baseline), probe, costs)
    explanation = (
        f"{len(pool)} images, {len(source.classes)} {units} (median {median:.0f} images per {unit}, largest/smallest "
        f"{counts.max() / max(1, counts[counts > 0].min()):.1f}). A linear probe on frozen {model_cfg.backbone} "
        f"features scores {probe:.3f} {what} ({folds}-fold CV) against {baseline:.3f} for nearest neighbours on raw "
        f"pixels and {chance:.3f} for chance, i.e. {similarity:.0%} of the possible gain over chance. So "
        f"{strategy}: {reason} ({get_strategy(strategy).description})."
        + (f" Cost {costs.describe()}." if costs else "")
    )
    return Advice(strategy, explanation, len(pool), len(source.classes), median,
                  float(counts.max() / max(1, counts[counts > 0].min())), probe, baseline, chance, similarity)


def _frozen_features(cfg: RunConfig, model_cfg: ModelConfig, source: DataSource, paths: list[str]) -> np.ndarray:
    model, pre = create_classifier(model_cfg, len(source.classes))
    device = resolve_device(cfg.train.device)
    prepare_model(model, device, cfg.train.channels_last)
    cache = cache_for(model_cfg.backbone, model.backbone, pre, cfg.train.cache_dir)
    batch = cfg.train.batch_size if isinstance(cfg.train.batch_size, int) else 64
    with torch.no_grad():
        feats, _ = extract_features(model.backbone, paths, pre, device, cache, batch, cfg.train.num_workers,
                                    cfg.train.channels_last)
    return feats.numpy()


@dataclass
class _Measures:
    """How the advisor scores this task's labels: a cross-validated score of an estimator
    on features, the probe and the pixel baseline to score, chance, images per class."""

    score: Callable[[Any, np.ndarray], float]
    probe: Any
    baseline: Callable[[int], Any]  # neighbours -> a k-nearest-neighbours estimator
    chance: float
    counts: np.ndarray  # images per class (per label; numbers: all images, one target)
    words: tuple[str, str, str]  # (the score, one class, classes)


def _measures(labels: list[Label], source: DataSource, folds: int, seed: int) -> _Measures:
    if source.task == REGRESSION:  # numbers: R^2 of ridge / k-NN regression; predicting the mean (chance) scores 0
        y = np.asarray(labels, dtype=float)
        splits = fold_pairs(Regression.strata(y), folds, seed)
        probe = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-2, 5, 15)))
        return _Measures(lambda est, x: float(cross_val_score(est, x, y, cv=splits, scoring="r2").mean()), probe,
                         lambda k: make_pipeline(StandardScaler(), KNeighborsRegressor(n_neighbors=k)), 0.0,
                         np.array([len(y)]), ("R^2", "target", "target"))
    counts = np.array(list(label_counts(labels).values()))
    multi = bool(labels) and is_multi(labels[0])
    # chance: the majority class's accuracy; for label sets, a random ranking's AP = the label's prevalence
    chance = float(counts.mean() / len(labels)) if multi else float(counts.max() / counts.sum())
    return _Measures(_scorer(labels, source.classes, folds, seed), probe_estimator(),
                     lambda k: make_pipeline(StandardScaler(), KNeighborsClassifier(n_neighbors=k)), chance, counts,
                     ("mAP", "label", "labels") if multi else ("accuracy", "class", "classes"))


def _scorer(labels: list[Label], classes: list[str], folds: int, seed: int) -> Callable[[Any, np.ndarray], float]:
    """estimator, features -> cross-validated accuracy (classes) or mAP (label sets)."""
    if labels and is_multi(labels[0]):  # label sets score by mAP over one probe per label
        y = indicator(labels, classes)
        cv = fold_pairs(y, folds, seed)  # iterative stratification over the 0/1 matrix

        def mean_ap(est: Any, x: np.ndarray) -> float:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                probs = cross_val_predict(OneVsRestClassifier(est), x, y, cv=cv, method="predict_proba")
            return mean_average_precision(y, probs)

        return mean_ap
    index = class_index(classes)
    target = np.array([index[lb] for lb in labels])
    splits = fold_pairs(target, folds, seed)
    return lambda est, x: float(cross_val_score(est, x, target, cv=splits).mean())


def _pixels(paths: list[str], size: int = 16) -> np.ndarray:
    return np.stack([np.asarray(load_rgb(p).resize((size, size)), dtype=np.float32).ravel() / 255 for p in paths])
