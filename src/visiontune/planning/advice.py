"""Which strategy fits this task? Measure, then decide, then say why with the numbers
(`advise_source`: what `--strategy auto`, the time budget and the `advise` command ask).

Measured: images per class and imbalance; how well the pretrained features already
separate the classes: the converged probe (frozen/probe.py, the same probe as training's
frozen phases), scored out of fold by the task's `score_metric` (accuracy, mAP, R^2) on
cached, frozen features, against a baseline that knows nothing of ImageNet (k-nearest
neighbours on 16x16 pixels, the same folds) and chance (`Task.chance`). The probe's share
of the possible gain over chance is the task similarity: near 1, the source features
already solve the task. Nothing here branches on the label shape: the task says how to
score, what chance is and what its targets look like to the neighbours.
"""

from __future__ import annotations

import logging
import statistics
from dataclasses import dataclass

import numpy as np

from visiontune import display
from visiontune.config import ModelConfig, RunConfig
from visiontune.data.images import load_rgb
from visiontune.data.items import TRAIN, VALID, DataSource
from visiontune.data.splits import fold_count, fold_pairs
from visiontune.frozen.features import FeatureExtractor
from visiontune.frozen.probe import oof_outputs
from visiontune.models.classifier import create_classifier
from visiontune.planning.costs import Costs
from visiontune.tasks.base import Task
from visiontune.tasks.catalog import make_task
from visiontune.train.strategies import get_strategy

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
    cost_note: str = ""  # what a probe and an epoch cost here, as measured before the advisor ran

    def format(self) -> str:
        return f"strategy: {self.strategy}\n{self.described()}"

    def described(self) -> str:
        """The explanation and, when costs were measured, what they were."""
        return self.explanation + (f" {self.cost_note}" if self.cost_note else "")

    def _repr_html_(self) -> str:
        facts = [["images", self.images], ["classes", self.classes], ["median per class", self.median_per_class],
                 ["imbalance", self.imbalance], ["probe accuracy", self.probe_accuracy],
                 ["baseline accuracy", self.baseline_accuracy], ["chance", self.chance],
                 ["similarity to ImageNet", self.similarity]]
        return (f"<h4>recommended strategy: {display.cell(self.strategy)}</h4>" + display.pre(self.described())
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


def weigh_cost(strategy: str, reason: str, probe: float, costs: Costs | None) -> tuple[str, str]:
    """A fine-tuning recommendation becomes the converged probe (feature-extract) when the
    converged probe's cross-validated score is already
    within PROBE_CEILING of a perfect score: fine-tuning cannot gain more than that, at the
    measured cost of every epoch."""
    if strategy == "feature-extract" or 1 - probe >= PROBE_CEILING:
        return strategy, reason
    cost = f" at ~{costs.epoch_seconds():.0f} s per epoch here" if costs else ""
    return "feature-extract", (f"the converged probe already scores {probe:.3f} (cross-validated): "
                               f"fine-tuning{cost} could gain at "
                               f"most {100 * (1 - probe):.1f} points, so the probe (seconds) is the better buy")


def advise_source(cfg: RunConfig, source: DataSource, costs: Costs | None = None) -> Advice:
    """Measure `source` (train + valid images) and recommend a registered strategy; with
    `costs` (planning/costs.py) the explanation quotes what each choice costs here."""
    pool = [it for it in source.items if it.split in (TRAIN, VALID)]
    labels = [it.label for it in pool]
    model_cfg = cfg.model if cfg.model.weights != "none" else RunConfig().model
    feats = _frozen_features(cfg, model_cfg, source, [it.path for it in pool])
    folds = fold_count(labels, 5)
    task = make_task(source.task, source.classes)
    task.fit_labels(labels)
    targets = task.encode(labels).numpy()
    probe = _score(task, targets, oof_outputs(feats, targets, task, cfg.seed, folds)[0])
    neighbours = min(5, max(1, len(labels) // (2 * folds)))
    baseline = _score(task, targets, _knn_outputs(_pixels([it.path for it in pool]), task, targets, neighbours, folds,
                                                  cfg.seed))
    chance = task.chance(targets)
    similarity = (probe - chance) / max(1e-9, 1 - chance)
    counts = np.array(list(task.labels_per_output(labels).values()))
    median = float(statistics.median(counts[counts > 0]))
    strategy, reason = weigh_cost(*decide(median, similarity, probe, baseline), probe, costs)
    (unit, units), what = task.wording.units, task.score_metric
    explanation = (
        f"{len(pool)} images, {len(source.classes)} {units} (median {median:.0f} images per {unit}, largest/smallest "
        f"{counts.max() / max(1, counts[counts > 0].min()):.1f}). The converged probe on frozen {model_cfg.backbone} "
        f"features scores {probe:.3f} {what} ({folds}-fold CV) against {baseline:.3f} for nearest neighbours on raw "
        f"pixels and {chance:.3f} for chance, i.e. {similarity:.0%} of the possible gain over chance. So "
        f"{strategy}: {reason} ({get_strategy(strategy).description})."
    )
    return Advice(strategy, explanation, len(pool), len(source.classes), median,
                  float(counts.max() / max(1, counts[counts > 0].min())), probe, baseline, chance, similarity,
                  f"Cost {costs.describe()}." if costs else "")


def _score(task: Task, targets: np.ndarray, outputs: np.ndarray) -> float:
    """The task's `score_metric` of out-of-fold outputs."""
    return float(task.metrics(targets, outputs)[task.score_metric])


def _knn_outputs(pixels: np.ndarray, task: Task, targets: np.ndarray, neighbours: int, folds: int,
                 seed: int) -> np.ndarray:
    """Out-of-fold outputs of k nearest neighbours on standardised pixels: the mean of the
    neighbours' targets in output space (class votes, label votes, or numbers), with the
    probe's folds. (scikit-learn's model selection is imported here: `train --strategy X`
    imports this module and never asks the advisor, 0.5 s of start-up.)"""
    from sklearn.model_selection import cross_val_predict
    from sklearn.neighbors import KNeighborsRegressor
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    knn = make_pipeline(StandardScaler(), KNeighborsRegressor(n_neighbors=neighbours))
    y = task.output_targets(targets)
    return cross_val_predict(knn, pixels, y, cv=fold_pairs(task.strata(targets), folds, seed)).reshape(len(y), -1)


def _frozen_features(cfg: RunConfig, model_cfg: ModelConfig, source: DataSource, paths: list[str]) -> np.ndarray:
    model, pre = create_classifier(model_cfg, len(source.classes))
    return FeatureExtractor.for_run(model_cfg.backbone, model.backbone, pre, cfg,
                                    cached=cfg.runtime.feature_cache).features(paths)


def _pixels(paths: list[str], size: int = 16) -> np.ndarray:
    return np.stack([np.asarray(load_rgb(p).resize((size, size)), dtype=np.float32).ravel() / 255 for p in paths])
