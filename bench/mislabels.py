"""How well suspected mislabels are flagged, on real photos with known flips.

    python -m bench.mislabels [DATA] [--flip 0.1] [--seed 0]
    python -m bench.mislabels --smoke    # generated train/ val/ folders, the tiny model, 3 folds

DATA (default ../shared/data/hymenoptera): its train + val images are pooled and `--flip`
of their labels flipped to another class (seeded). Out-of-fold probabilities come from
(a) a 5-fold scikit-learn logistic-regression probe (C = 0.1) on frozen Lite0 features,
(c) the converged probe (frozen/probe.py, C by its own CV once, then one fit per fold) on the
same features, and (b) `visiontune cv` (feature-extract, 5 folds, epochs chosen inside each fold). For each,
the flags of cleanlab's find_label_issues and of the plain confident-joint off-diagonal are
scored against the true flips: flagged, precision, recall, and where the flips rank by
self-confidence; each method's precision and recall are recorded.
"""

from __future__ import annotations

import csv
import logging
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from bench.harness import SMOKE_MODEL, Recorder, parser, tiny_folders
from visiontune.analysis.mislabels import flag_label_issues, flag_method, off_diagonal
from visiontune.config import ModelConfig
from visiontune.data.sources import collect_images
from visiontune.data.splits import fold_count, fold_pairs
from visiontune.frozen.features import FeatureExtractor, cache_for
from visiontune.frozen.probe import oof_outputs
from visiontune.models.classifier import create_classifier
from visiontune.runtime.device import resolve_device
from visiontune.selection.cv import cross_validate
from visiontune.tasks.single_label import SingleLabel


def oof_probabilities(features: np.ndarray, labels: list[str], classes: list[str], seed: int = 0,
                      folds: int = 5) -> np.ndarray:
    """The reference: out-of-fold class probabilities of a scikit-learn logistic-regression
    probe (standardised features, C = 0.1, interpret's default before the converged probe)."""
    y = np.array([classes.index(lb) for lb in labels])
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
    raw = cross_val_predict(probe, features, y, cv=fold_pairs(y, fold_count(labels, folds), seed),
                            method="predict_proba")
    probs = np.zeros((len(y), len(classes)))
    probs[:, sorted(set(y.tolist()))] = raw
    return probs


def noisy_table(data: Path, out: Path, flip: float, seed: int) -> tuple[list[str], list[str], set[int], list[str]]:
    """CSV path,label of every train + val image with `flip` of the labels changed."""
    items = []
    for split in ("train", "val"):
        for cls in sorted(p.name for p in (data / split).iterdir() if p.is_dir()):
            paths, _ = collect_images([str(data / split / cls)])
            items += [(p, cls) for p in paths]
    classes = sorted({c for _, c in items})
    rng = random.Random(seed)
    flipped = set(rng.sample(range(len(items)), round(flip * len(items))))
    labels = [rng.choice([c for c in classes if c != lb]) if i in flipped else lb for i, (_, lb) in enumerate(items)]
    with open(out, "w", newline="") as fh:
        csv.writer(fh).writerows([("path", "label"), *((p, lb) for (p, _), lb in zip(items, labels))])
    return [p for p, _ in items], labels, flipped, classes


def score(name: str, labels: list[str], probs: np.ndarray, classes: list[str], flipped: set[int],
          record: Recorder) -> None:
    y = np.array([classes.index(lb) for lb in labels])
    order = np.argsort(probs[np.arange(len(y)), y], kind="stable")
    ranks = sorted(int(np.flatnonzero(order == i)[0]) + 1 for i in flipped)
    print(f"{name}: flips ranked by self-confidence at median {np.median(ranks):.0f}, "
          f"{sum(r <= 2 * len(flipped) for r in ranks)}/{len(flipped)} within the first {2 * len(flipped)}")
    for method, mask in (("cleanlab find_label_issues", flag_label_issues(y, probs)),
                         ("confident-joint off-diagonal", off_diagonal(y, probs))):
        found = set(np.flatnonzero(mask).tolist())
        hits = len(found & flipped)
        print(f"  {method:<30} flagged {len(found):4d}   precision {hits / max(1, len(found)):.2f}   "
              f"recall {hits / len(flipped):.2f}")
        short = name.split(",")[0]
        note = f"{len(labels)} images, {len(flipped)} flipped, {len(found)} flagged"
        record(f"{short}, {method}: precision", hits / max(1, len(found)), note=note)
        record(f"{short}, {method}: recall", hits / len(flipped), note=note)


def main(argv: list[str] | None = None) -> int:
    default = Path(__file__).resolve().parents[2] / "shared" / "data" / "hymenoptera"
    ap = parser(__doc__)
    ap.add_argument("data", nargs="?", default=str(default))
    ap.add_argument("--flip", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    record, work = Recorder("mislabels", args.smoke, argv), Path(tempfile.mkdtemp(prefix="vt-mislabels-"))
    model, folds, epochs = {}, 5, 10
    if args.smoke:  # 2 x 20 generated images, 4 of them flipped; the tiny model; 3 folds of 2 epochs
        args.data, model, folds, epochs = str(tiny_folders(work / "data", per_class=10, splits=("train", "val"))), \
            dict(SMOKE_MODEL), 3, 2
    paths, labels, flipped, classes = noisy_table(Path(args.data), work / "noisy.csv", args.flip, args.seed)
    print(f"{len(paths)} images, {len(flipped)} labels flipped (seed {args.seed}); flags by {flag_method()}; "
          f"{time.strftime('%Y-%m-%d %H:%M')}")
    feats = frozen_features(paths, len(classes), model)
    started = time.perf_counter()
    sk = oof_probabilities(feats, labels, classes, args.seed, folds)
    took = time.perf_counter() - started
    score(f"(a) {folds}-fold scikit-learn probe (C = 0.1) on frozen features, {took:.1f}s", labels, sk, classes,
          flipped, record)
    task = SingleLabel(classes)
    started = time.perf_counter()
    converged, c = oof_outputs(feats, task.encode(labels).numpy(), task, args.seed, folds)
    took = time.perf_counter() - started
    score(f"(c) {folds}-fold converged probe (C = {c:g} by its CV) on frozen features, {took:.1f}s", labels,
          converged, classes, flipped, record)
    cv = cross_validate(args.data, csv=str(work / "noisy.csv"), folds=folds, strategy="feature-extract",
                        output=str(work / "cv"), seed=args.seed, **{"epochs": epochs, "progress": False, **model})
    order = {p: i for i, p in enumerate(cv.paths)}
    probs = np.zeros((len(paths), len(classes)))
    for i, p in enumerate(paths):
        probs[i] = cv.oof_probs[order[p]]
    score("(b) visiontune cv out-of-fold", labels, probs, classes, flipped, record)
    return 0


def frozen_features(paths: list[str], num_classes: int, model: dict) -> np.ndarray:
    """The backbone's features of every image (`model`: the backbone, weights and size; default Lite0)."""
    cfg = ModelConfig(**{k: model[k] for k in ("backbone", "weights", "image_size") if k in model})
    classifier, pre = create_classifier(cfg, num_classes)
    cache = cache_for(cfg.backbone, classifier.backbone, pre, os.environ.get("VISIONTUNE_CACHE"))
    return FeatureExtractor(classifier.backbone, pre, resolve_device("auto"), cache).extract(paths)[0].numpy()


if __name__ == "__main__":
    sys.exit(main())
