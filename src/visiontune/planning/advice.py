"""Which strategy fits this task? Measure, then decide, then say why with the numbers
(`advise_source`: what `--strategy auto`, the time budget and the `advise` command ask).

Measured: images per class and imbalance; how well the pretrained features already
separate the classes: the converged probe (frozen/probe.py, the same probe as training's
frozen phases), scored out of fold by the task's `score_metric` (accuracy, mAP, R^2) on
cached, frozen features, against a baseline that knows nothing of ImageNet (k-nearest
neighbours on 16x16 pixels, the same folds) and chance (`Task.chance`). The probe's share
of the possible gain over chance is the task similarity: near 1, the source features
already solve the task. Whether fine-tuning is likely to pay after the probe
(`fine_tuning_outlook`): from the same folds, the probe's score on its own training rows
(the train/validation gap) and at half its training rows (the learning curve). Nothing
here branches on the label shape: the task says how to score, what chance is and what its
targets look like to the neighbours.
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
from visiontune.data.splits import fold_count, fold_pairs, stratified_sample
from visiontune.frozen.features import FeatureExtractor
from visiontune.frozen.probe import fit_probe, fold_fits, probe_outputs
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
# Heuristics of fine_tuning_outlook, not yet measured against the suite (bench/generalise.py will):
CURVE_RISE = 0.02  # score the probe gains from half its training rows to all: above, it is data-limited
TRAIN_GAP = 0.10  # the probe's training score above its cross-validated one: above, it already overfits


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
    probe_train: float = float("nan")  # the probe's score on the rows it was fitted on (mean over the folds)
    probe_half: float = float("nan")  # its cross-validated score fitted on half of each fold's training rows
    outlook: str = ""  # whether fine-tuning is likely to pay after the probe, and why (fine_tuning_outlook)

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
    probe, probe_train, probe_half = _probe_scores(task, feats, targets, cfg.seed, folds)
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
    outlook = fine_tuning_outlook(probe, probe_train, probe_half, what)
    return Advice(strategy, f"{explanation} {outlook}", len(pool), len(source.classes), median,
                  float(counts.max() / max(1, counts[counts > 0].min())), probe, baseline, chance, similarity,
                  f"Cost {costs.describe()}." if costs else "", probe_train, probe_half, outlook)


def fine_tuning_outlook(probe: float, train: float, half: float, what: str = "score") -> str:
    """Whether fine-tuning after the converged probe is likely to pay, in a sentence with
    the figures: the probe's cross-validated `probe`, its score on its own training rows
    (`train`: the gap) and fitted on half of them (`half`: the learning curve). Unlikely
    when the probe is within PROBE_CEILING of perfect, or data-limited (still rising with
    more rows) while already overfitting (a wide gap): fine-tuning fits far more parameters
    to the same images. Likely to pay when the curve is flat and the gap narrow: the frozen
    features, not the data, hold the probe back."""
    rise, gap = probe - half, train - probe
    figures = (f"the probe's {what} moves {rise:+.3f} from half its training images to all of them, and scores "
               f"{gap:+.3f} higher on the images it was fitted on")
    if 1 - probe < PROBE_CEILING:
        return f"Fine-tuning is unlikely to pay: the probe is within {100 * (1 - probe):.1f} points of perfect."
    if rise > CURVE_RISE and gap > TRAIN_GAP:
        return (f"Fine-tuning is unlikely to pay: {figures}: more labelled images would help more than fitting the "
                "whole network to these.")
    if rise <= CURVE_RISE and gap <= TRAIN_GAP:
        return f"Fine-tuning may pay: {figures}: the frozen features, not the data, hold the probe back."
    return f"Whether fine-tuning pays is open: {figures}; the run stops it if it cannot beat the probe."


def _probe_scores(task: Task, feats: np.ndarray, targets: np.ndarray, seed: int, folds: int) -> tuple[float, ...]:
    """The converged probe's cross-validated score, its mean score on each fold's own
    training rows, and its cross-validated score when each fold fits half its training
    rows (a stratified sample) at the same C: the score, the gap and the learning curve."""
    fits, c = fold_fits(feats, targets, task, seed, folds)
    full, half = np.zeros((len(targets), task.num_outputs)), np.zeros((len(targets), task.num_outputs))
    train_scores = []
    for held, fit in fits:
        train = np.setdiff1d(np.arange(len(targets)), held)
        full[held] = probe_outputs(fit, feats[held], task)
        train_scores.append(_score(task, targets[train], probe_outputs(fit, feats[train], task)))
        sample = stratified_sample(task.strata(targets[train]), len(train) // 2, seed)
        part = train if sample is None else train[sample]
        half[held] = probe_outputs(fit_probe(feats[part], targets[part], task, seed=seed, c=c), feats[held], task)
    return _score(task, targets, full), float(np.mean(train_scores)), _score(task, targets, half)


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
