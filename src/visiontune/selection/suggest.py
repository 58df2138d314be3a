"""What to label next: rank unlabelled images by how much labelling them would help.

Everything is measured on frozen backbone features (frozen/features.py: computed once,
cached), so a pool that was seen before ranks in seconds. The methods:

- **typical** (TypiClust, Hacohen et al., ICML 2022): cluster the pool (with the images
  already labelled) into n + labelled clusters with k-means, and take the most typical
  image (the densest: smallest mean distance to its nearest neighbours) of each of the n
  largest clusters that hold no labelled image. With few labels a model's uncertainty is
  noise, and typical images are what a classifier learns most from (the paper's
  low-budget regime).
- **uncertain**: the images the model is least sure of (`Task.uncertainty`: 1 - the
  margin of the two likeliest classes; each label's entropy for label sets; the spread of
  the probe's cross-validation fits for numbers).
- **diverse**: uncertainty and diversity together, as BADGE (Ash et al., ICLR 2020) does:
  among the n x CANDIDATES most uncertain images, k-means++ seeding weighted by the
  uncertainty (scikit-learn's `kmeans_plusplus`), so one batch does not hold near-copies.
- **random**: a seeded sample, the baseline every other method must beat.
- **auto**: typical while there is no model or the median class (target) has fewer than
  TYPICAL_BELOW labels (`Task.labels_per_output`); diverse from there.

The model whose uncertainty counts is the run's (`--run`: its fine-tuned backbone and
head), else the converged probe (frozen/probe.py) fitted on the labelled images' features.
The labelled images are the run's (its splits.csv, from whatever folder it was trained),
those of `--labelled` / `--csv`, and the filled-in rows of the output CSV (`output`): the
second round of the labelling loop never asks again for what the first one got. The pool
is found and checked by data/pool.py: files that do not decode (when checked, or when
their features are computed) are skipped and listed, and images already labelled, those
the run left out by --exclude (its excluded.txt), files with the same bytes as either,
and near-copies (features with cosine similarity >= NEAR_COPY to a labelled image's, and
COPY_CLOSER times closer to it than the median labelled image is to its nearest labelled
neighbour: in a feature space where distinct images sit at 0.99, random weights say, 0.98
is no copy) are never suggested. Nothing here branches on the label shape: the Task says what uncertainty
is, how many fits it needs, how a prediction reads and which CSV column holds labels.
"""

from __future__ import annotations

import logging
import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from sklearn.cluster import KMeans, MiniBatchKMeans, kmeans_plusplus
from sklearn.decomposition import PCA

from visiontune.bundle import load_bundle
from visiontune.config import SUGGEST_METHODS, DataConfig, RunConfig
from visiontune.data.items import TEST, DataSource, excluded_lines
from visiontune.data.pool import reason_counts, unlabelled_pool
from visiontune.data.sources import load_items
from visiontune.data.tables import suggestion_table
from visiontune.data.webdata import is_shard_item, split_item
from visiontune.errors import ConfigError, DataError
from visiontune.files import write_csv
from visiontune.frozen.features import FeatureExtractor
from visiontune.frozen.probe import fit_probe, fold_fits, probe_outputs
from visiontune.models.classifier import create_classifier
from visiontune.rundir import RunDir
from visiontune.tasks.base import Task
from visiontune.tasks.catalog import make_task, task_class
from visiontune.tasks.labels import SINGLE

log = logging.getLogger(__name__)

METHODS = SUGGEST_METHODS
TYPICAL_BELOW = 5  # labels per class (median) under which auto picks typical images
NEAR_COPY = 0.98  # cosine similarity of features at which a pool image counts as a copy of a labelled one
COPY_CLOSER = 4  # ... and how many times closer than labelled images are to each other (median, in 1 - cosine)
CANDIDATES = 10  # diverse: picks among the n x CANDIDATES most uncertain images
EMBED_DIMS = 64  # typical: k-means runs on the features' first principal components
DENSITY_NEIGHBOURS = 20  # typicality: mean distance to this many nearest neighbours (TypiClust's k)
COVERED_CLUSTERS = 400  # typical: at most this many extra clusters for the labelled images (k-means' cost)
PCA_SAMPLE = 10_000  # the principal components are fitted on a random sample of this many images
LARGE_POOL = 50_000  # pools larger than this are clustered by mini-batch k-means
DENSITY_SAMPLE = 2000  # typicality is measured on at most this many images of one cluster


@dataclass
class Suggestion:
    path: str
    reason: str
    score: float  # typicality (typical), uncertainty (uncertain, diverse); 0 for random
    prediction: str = ""  # the model's label, as a pre-filled suggestion ("" without a model)


@dataclass
class Suggestions:
    rows: list[Suggestion]
    method: str  # the method that ran (auto resolved)
    why: str  # why that method
    pool: int  # images considered, after the exclusions
    labelled: int  # images already labelled
    label_column: str = "label"  # the CSV column train --csv reads labels from (the task's)
    task: str = "single-label"
    excluded: list[tuple[str, str]] = field(default_factory=list)  # (path, why) left out of the pool
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (path, why) pool files that do not decode

    def write_csv(self, path: str | os.PathLike[str]) -> int:
        """path, an empty label column to fill in (the task form's `label_column`, by whose name
        `train --csv` and `review --label` read the task under --task auto), the model's
        prediction, reason, score: `visiontune train --csv` reads the rows whose label is
        filled in (an empty cell is a row not labelled yet: `Form.parse_answer`). The rows of an
        earlier file at `path` whose label is filled in are kept, first (nothing labelled is
        lost); returns how many."""
        kept = filled_rows(path)
        write_csv(path, ["path", self.label_column, "prediction", "reason", "score"],  # a formula cell gets a quote
                  [*kept, *([r.path, "", r.prediction, r.reason, f"{r.score:.6g}"] for r in self.rows)])
        return len(kept)

    def format(self, skipped: bool = True) -> str:
        """The summary: the method, the pool, the first suggestions; with `skipped`, the
        files that cannot be read too (the CLI prints those to stderr: `skipped_lines`)."""
        lines = [f"suggested {len(self.rows)} of {self.pool} unlabelled images ({self.labelled} already labelled) by "
                 f"{self.method}: {self.why}"]
        if self.excluded:
            lines.append(f"left out of the pool: {len(self.excluded)} ({reason_counts(self.excluded)})")
        lines += self.skipped_lines() if skipped else []
        lines += [f"  {r.path}  {r.reason}" + (f"  (model: {r.prediction})" if r.prediction else "")
                  for r in self.rows[:10]]
        if len(self.rows) > 10:
            lines.append(f"  ... {len(self.rows) - 10} more")
        return "\n".join(lines)

    def skipped_lines(self) -> list[str]:
        """The pool's files that cannot be read, a count and the first ten with why ([] if none)."""
        return excluded_lines(self.unreadable, "skipped", "files that cannot be read")


@dataclass
class _Known:
    """What is known before ranking: the feature model, the task, the labelled images."""

    cfg: RunConfig
    backbone_name: str
    backbone: torch.nn.Module
    preprocess: Any
    task: Task | None  # None: no labels and no run
    paths: list[str]  # labelled images (every split: none of them is suggested)
    labels: list[Any]  # of the labelled train + valid images, what a probe may fit
    fit_rows: list[int]  # their rows in `paths`
    head: torch.nn.Module | None = None  # the run's head
    left_out: list[str] = field(default_factory=list)  # what the run left out by --exclude: never suggested


def suggest(pool: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], *,
            run: str | os.PathLike[str] | None = None, labelled: str | os.PathLike[str] | None = None,
            csv: str | None = None, output: str | os.PathLike[str] | None = None, n: int = 100,
            method: str = "auto", config: RunConfig | None = None, **overrides: Any) -> Suggestions:
    """Rank the images of `pool` (folders searched recursively, or files) and return the `n`
    to label next. `run`: a trained run (its model's uncertainty; its splits.csv images
    count as labelled, those it left out by --exclude are never suggested). `labelled` /
    `csv`: images labelled so far (a folder tree or a CSV, as `train` reads them).
    `output`: the suggestions CSV the result will be written to (`Suggestions.write_csv`):
    its filled-in rows count as labelled as well. `overrides`: run options (backbone,
    image_size, seed, cache_dir...) for the frozen model when there is no run."""
    if method not in METHODS:
        raise ConfigError(f"--method {method!r}: choose one of {', '.join(METHODS)}")
    if n < 1:
        raise ConfigError(f"--n {n}: ask for at least one image")
    filled = bool(output) and bool(filled_rows(output))  # an output of another shape is refused before any work
    known = _known(run, labelled, csv, output if filled else None, config, overrides)
    paths, excluded, unreadable = _pool_paths(pool, known)
    _require_pool(paths, pool, excluded + unreadable)
    extractor = FeatureExtractor.for_run(known.backbone_name, known.backbone, known.preprocess, known.cfg)
    pool_feats, paths, gone = extractor.readable(paths)
    unreadable += gone  # removed or replaced since the check: skipped and listed as the check's are
    _require_pool(paths, pool, excluded + unreadable)
    lab_feats = extractor.features(known.paths)
    lab_feats = lab_feats if len(known.paths) else np.zeros((0, pool_feats.shape[1]), np.float32)
    copies, bar = _near_copies(pool_feats, lab_feats)
    keep = ~copies
    excluded += [(p, f"a near-copy of a labelled image (cosine >= {bar:.3g})") for p, k in zip(paths, keep) if not k]
    paths, pool_feats = [p for p, k in zip(paths, keep) if k], pool_feats[keep]
    _require_pool(paths, pool, excluded)
    members, predicted = _members(known, pool_feats, lab_feats)
    chosen, why = choose_method(method, known, members is not None)
    uncertainty = known.task.uncertainty(members) if members is not None and known.task else None
    picks, scores, reasons = rank(pool_feats, min(n, len(paths)), chosen, uncertainty=uncertainty,
                                  labelled=lab_feats, seed=known.cfg.seed)
    rows = [Suggestion(paths[i], r, float(s), _prediction(known, predicted, i)) for i, s, r in zip(picks, scores, reasons)]
    shape = type(known.task) if known.task else task_class(known.cfg.data.task if known.cfg.data.task != "auto"
                                                               else SINGLE)
    return Suggestions(rows, chosen, why, len(paths), len(known.paths), shape.form.label_column, shape.name, excluded,
                       unreadable)


def _require_pool(paths: list[str], pool: Any, excluded: list[tuple[str, str]]) -> None:
    if not paths:
        raise DataError(f"no unlabelled images in {pool}: every image there is labelled already or was left out "
                        f"({reason_counts(excluded) or 'no image files'})")


def filled_rows(path: str | os.PathLike[str]) -> list[list[str]]:
    """The rows of a suggestions CSV at `path` whose label is filled in ([] if there is no
    file). A file of another shape is refused rather than overwritten."""
    if not os.path.isfile(path):
        return []
    table = suggestion_table(path)
    if table is None:
        raise ConfigError(f"--output {path} exists and is not a suggestions CSV (path,label,prediction,...): choose "
                          "another --output, so that nothing in it is overwritten")
    rows, label_i = table
    return [r for r in rows[1:] if len(r) > label_i and r[label_i].strip()]


def rank(features: np.ndarray, n: int, method: str, *, uncertainty: np.ndarray | None = None,
         labelled: np.ndarray | None = None, seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The `n` rows of `features` (N, D) to label next by `method` (not auto), their scores and
    why each: the core of `suggest`, on features alone (bench/label_efficiency.py calls it)."""
    n = min(n, len(features))
    if method == "random":
        picks = np.random.default_rng(seed).choice(len(features), n, replace=False)
        return picks, np.zeros(n), ["random"] * n
    if method == "typical":
        return typical(features, n, labelled, seed)
    if uncertainty is None:
        raise ConfigError(f"--method {method} needs a model: a run (--run) or labelled images (--labelled/--csv)")
    if method == "uncertain":
        picks = np.argsort(-uncertainty, kind="stable")[:n]
        return picks, uncertainty[picks], [f"uncertain ({uncertainty[i]:.3g})" for i in picks]
    picks = diverse(features, uncertainty, n, seed)
    return picks, uncertainty[picks], [f"uncertain ({uncertainty[i]:.3g}) and unlike the other picks" for i in picks]


def typical(features: np.ndarray, n: int, labelled: np.ndarray | None = None,
            seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """TypiClust: the most typical image of each of the n largest clusters without a label.
    Where fewer clusters hold pool images (some hold only labelled ones, or k-means left
    some empty), the clusters are gone through again for their next most typical image,
    so that n images come back (every image when the pool has no more)."""
    n = min(n, len(features))
    lab = labelled if labelled is not None else np.zeros((0, features.shape[1]), np.float32)
    x = _embedding(np.concatenate([features, lab]) if len(lab) else features, seed)
    k = min(len(features), n + min(len(lab), COVERED_CLUSTERS))
    clusters = _kmeans(k, len(x), seed).fit_predict(x)
    mine, covered = clusters[:len(features)], set(clusters[len(features):].tolist())
    members = {c: np.flatnonzero(mine == c) for c in range(k)}
    order = sorted((c for c in range(k) if len(members[c])),
                   key=lambda c: (c in covered, -len(members[c])))  # uncovered first, largest first
    ranked: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    picks, scores, reasons = [], [], []
    for depth in range(max((len(members[c]) for c in order), default=0)):
        for c in (c for c in order if len(members[c]) > depth):
            if len(picks) == n:
                return np.array(picks, dtype=np.int64), np.array(scores), reasons
            if c not in ranked:
                ranked[c] = _by_typicality(x[members[c]], seed)
            rows, typicality = ranked[c]
            picks.append(members[c][rows[depth]])
            scores.append(typicality[depth])
            reasons.append(_typical_reason(len(members[c]), c in covered, depth))
    return np.array(picks, dtype=np.int64), np.array(scores), reasons


def _typical_reason(size: int, covered: bool, depth: int) -> str:
    which = "typical" if depth == 0 else f"the {_ordinal(depth + 1)} most typical"
    return f"{which} of a cluster of {size} images" + (" (holds labelled images)" if covered else " with no label yet")


def _ordinal(i: int) -> str:
    return f"{i}{'th' if 10 <= i % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(i % 10, 'th')}"


def diverse(features: np.ndarray, uncertainty: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """`n` rows among the n x CANDIDATES most uncertain, by k-means++ seeding on the
    normalised features weighted by uncertainty: far from the picks so far, and unsure."""
    candidates = np.argsort(-uncertainty, kind="stable")[:min(len(features), max(n, CANDIDATES * n))]
    x = _normalised(features[candidates])
    _, chosen = kmeans_plusplus(x, n, sample_weight=uncertainty[candidates] + 1e-6, random_state=seed)
    return candidates[chosen]


def choose_method(method: str, known: _Known, has_model: bool) -> tuple[str, str]:
    """auto resolved, and why, in words."""
    if method != "auto":
        if method in ("uncertain", "diverse") and not has_model:
            raise ConfigError(f"--method {method} needs a model: a run (--run) or labelled images (--labelled/--csv)")
        return method, "as asked"
    if not has_model or known.task is None:
        return auto_method(None)
    counts = list(known.task.labels_per_output(known.labels).values())
    return auto_method(statistics.median(counts), known.task.wording.units[0])


def auto_method(per_class: float | None, unit: str = "class") -> tuple[str, str]:
    """What auto picks with `per_class` labels per class (the median; None: no model), and why."""
    if per_class is None:
        return "typical", "nothing is labelled yet, so the most typical image of each cluster of the pool (TypiClust)"
    if per_class < TYPICAL_BELOW:
        return "typical", (f"{per_class:g} labels per {unit} (median) is under {TYPICAL_BELOW}, where a model's "
                           "uncertainty is still noise, so typical images of unlabelled clusters (TypiClust)")
    return "diverse", (f"{per_class:g} labels per {unit} (median), so the model's least sure images, spread over "
                       "the pool (uncertainty-weighted k-means++)")


def _known(run: str | os.PathLike[str] | None, labelled: str | os.PathLike[str] | None, csv_path: str | None,
           output: str | os.PathLike[str] | None, config: RunConfig | None, overrides: dict[str, Any]) -> _Known:
    """The feature model, the task and the labelled images, from a run and/or labelled data
    (a folder, a CSV, the output's filled-in rows)."""
    if run is not None:
        bundle = load_bundle(run)
        cfg = RunConfig.create(bundle.config, **overrides) if overrides else (bundle.config or RunConfig())
        known = _Known(cfg, cfg.model.backbone, bundle.model.backbone, bundle.preprocess, bundle.task, [], [], [],
                       bundle.model.head.eval(), RunDir(bundle.path).left_out())
        _add_labelled(known, RunDir(bundle.path).splits(bundle.task, cfg.data.label_delim), f"the run {run}")
    else:
        cfg = RunConfig.create(config, **overrides)
        with torch.random.fork_rng(devices=[]):  # --weights none: the same random features, so the same suggestions, per seed
            torch.manual_seed(cfg.seed)
            model, pre = create_classifier(cfg.model, 1)
        known = _Known(cfg, cfg.model.backbone, model.backbone, pre, None, [], [], [])
    tables = ([(str(labelled or ""), csv_path)] if labelled is not None or csv_path else []) + \
        ([("", str(output))] if output else [])
    for root, table in tables:
        task = known.task.name if known.task else cfg.data.task
        source = load_items(DataConfig(path=root, csv=table, task=task, valid_pct=0.0,
                                       label_delim=cfg.data.label_delim), cfg.seed, min_classes=1,
                            cache_dir=cfg.runtime.cache_dir)
        _add_source(known, source, fixed=run is not None)
    if known.task is not None and run is None:
        known.task.fit_labels(known.labels)
    return known


def _add_source(known: _Known, source: DataSource, fixed: bool) -> None:
    """The labelled images of `source`; the first one sets the task, later ones add the
    classes the task lacks (unless `fixed`: a run's head has its classes)."""
    if known.task is None:
        known.task = make_task(source.task, source.classes)
    elif not fixed and (new := known.task.unknown_labels([it.label for it in source.items])):
        known.task = make_task(known.task.name, sorted([*known.task.classes, *new]))
    _add_labelled(known, [(it.path, it.label, it.split) for it in source.items], source.root or "the labels")


def _add_labelled(known: _Known, items: list[tuple[str, Any, str]], where: str) -> None:
    """Add the images of `items` not added yet (by resolved path); only the train and valid
    ones whose labels the task knows are what a probe may fit."""
    seen = {os.path.realpath(p) for p in known.paths}
    missing = []
    for path, label, split in items:
        if not os.path.isfile(split_item(path)[0] if is_shard_item(path) else path):
            missing.append(path)
        elif os.path.realpath(path) not in seen:
            seen.add(os.path.realpath(path))
            if split != TEST and (known.task is None or not known.task.unknown_labels([label])):
                known.fit_rows.append(len(known.paths))
                known.labels.append(label)
            known.paths.append(path)
    if missing:
        log.warning("%d labelled images of %s are not found from here (e.g. %s): a copy of one in the pool can "
                    "be suggested", len(missing), where, missing[0])


def _pool_paths(pool: Any, known: _Known) -> tuple[list[str], list[tuple[str, str]], list[tuple[str, str]]]:
    """The pool's images (data/pool.py: checked, less the labelled ones and those the run
    left out by --exclude, by path or by the same bytes, and exact copies within the pool),
    as absolute paths; (path, why) for what was left out, and for the files that cannot be
    read."""
    inputs = [str(pool)] if isinstance(pool, (str, os.PathLike)) else [str(p) for p in pool]
    found = unlabelled_pool(inputs, known.paths, known.cfg.runtime.cache_dir, left_out=known.left_out)
    paths = [p if is_shard_item(p) else os.path.abspath(p) for p in found.paths]  # the CSV reads back from anywhere
    return paths, found.excluded, found.unreadable


def _members(known: _Known, pool: np.ndarray, lab: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(the fits' outputs on the pool (M, N, outputs), the prediction to pre-fill (N, outputs)):
    the run's head, and where the task reads uncertainty from several fits (or there is no
    run) the probe fitted on the labelled train + valid features. (None, None): no model."""
    task = known.task
    predicted = None
    if known.head is not None:
        with torch.no_grad():
            predicted = task.probabilities(known.head(torch.from_numpy(pool))).numpy()
        if task.ensemble == 1:
            return predicted[None], predicted
    if task is None or len(known.labels) < 2:
        return None, predicted
    members = probe_members(lab[known.fit_rows], task.encode(known.labels).numpy(), task, pool, known.cfg.seed)
    return members, predicted if predicted is not None else members.mean(axis=0)


def probe_members(x: np.ndarray, y: np.ndarray, task: Task, pool: np.ndarray, seed: int = 0) -> np.ndarray:
    """(M, N, outputs): the converged probe fitted on labelled features `x`, `y` (encoded),
    applied to `pool`; M = `task.ensemble` fits (one on every row, or one per CV fold)."""
    if task.ensemble == 1:
        return probe_outputs(fit_probe(x, y, task, seed=seed), pool, task)[None]
    fits, _ = fold_fits(x, y, task, seed, task.ensemble)
    return np.stack([probe_outputs(fit, pool, task) for _, fit in fits])


def _prediction(known: _Known, predicted: np.ndarray | None, row: int) -> str:
    if predicted is None or known.task is None:
        return ""
    return known.cfg.data.label_delim.join(known.task.decode(predicted[row:row + 1], 1)[0].labels)


def _near_copies(pool: np.ndarray, lab: np.ndarray, chunk: int = 4096,
                 sample: int = 2048) -> tuple[np.ndarray, float]:
    """Pool rows whose features are near-copies of a labelled image's, and the cosine
    similarity that counted as one: NEAR_COPY, or, where that is higher, the similarity
    COPY_CLOSER times closer (in 1 - cosine) than the median labelled image is to its nearest
    other labelled image (of up to `sample` of them). A feature space in which distinct
    images are all alike (random weights, a tiny model) so does not call every pool image a
    copy."""
    out = np.zeros(len(pool), dtype=bool)
    if not len(lab):
        return out, NEAR_COPY
    lab_n = _normalised(lab)
    bar = max(NEAR_COPY, 1 - (1 - _typical_neighbour(lab_n, sample, chunk)) / COPY_CLOSER)
    for start in range(0, len(pool), chunk):
        out[start:start + chunk] = (_normalised(pool[start:start + chunk]) @ lab_n.T).max(axis=1) >= bar
    return out, bar


def _typical_neighbour(lab_n: np.ndarray, sample: int, chunk: int) -> float:
    """The median cosine similarity of a labelled image to its nearest other labelled image
    (-1 with fewer than two)."""
    if len(lab_n) < 2:
        return -1.0
    rows = np.random.default_rng(0).choice(len(lab_n), min(sample, len(lab_n)), replace=False)
    nearest = np.full(len(rows), -1.0, dtype=np.float32)
    for start in range(0, len(lab_n), chunk):
        sims = lab_n[rows] @ lab_n[start:start + chunk].T
        own = rows[:, None] == np.arange(start, start + sims.shape[1])[None, :]
        sims[own] = -1.0
        nearest = np.maximum(nearest, sims.max(axis=1))
    return float(np.median(nearest))


def _normalised(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-12)


def _embedding(x: np.ndarray, seed: int) -> np.ndarray:
    """Normalised features, reduced to their EMBED_DIMS first principal components."""
    x = _normalised(x)
    dims = min(EMBED_DIMS, x.shape[1], len(x))
    if dims < x.shape[1] and len(x) > dims:
        rng = np.random.default_rng(seed)
        sample = x[rng.choice(len(x), PCA_SAMPLE, replace=False)] if len(x) > PCA_SAMPLE else x
        x = PCA(dims, svd_solver="randomized", random_state=seed).fit(sample).transform(x).astype(np.float32)
    return x


def _kmeans(k: int, rows: int, seed: int) -> Any:
    """Lloyd's k-means (k-means++ start); mini-batch k-means past LARGE_POOL rows, where
    full passes would take most of the ranking's time."""
    if rows > LARGE_POOL:
        return MiniBatchKMeans(k, n_init=3, batch_size=4096, random_state=seed)
    return KMeans(k, n_init=1, max_iter=100, random_state=seed)


def _by_typicality(x: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows of `x`, most typical first; their typicality): the inverse of the mean distance
    to the nearest neighbours, measured on a random DENSITY_SAMPLE rows of a large cluster
    (the rows outside the sample follow, typicality 0)."""
    if len(x) == 1:
        return np.zeros(1, dtype=np.int64), np.zeros(1)
    rows = np.arange(len(x))
    if len(x) > DENSITY_SAMPLE:
        rows = np.sort(np.random.default_rng(seed).choice(len(x), DENSITY_SAMPLE, replace=False))
    sub = x[rows]
    sq = (sub * sub).sum(axis=1)
    dist = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2 * sub @ sub.T, 0))
    k = min(DENSITY_NEIGHBOURS, len(sub) - 1)
    nearest = np.partition(dist, k, axis=1)[:, :k + 1]  # the k nearest and the image itself (distance 0)
    typicality = 1 / (nearest.sum(axis=1) / k + 1e-12)
    order = np.argsort(-typicality, kind="stable")
    rest = np.setdiff1d(np.arange(len(x)), rows)
    return np.concatenate([rows[order], rest]), np.concatenate([typicality[order], np.zeros(len(rest))])
