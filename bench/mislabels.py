"""How well suspected mislabels are flagged, on real photos with known flips.

    python bench/mislabels.py [DATA] [--flip 0.1] [--seed 0]

DATA (default ../shared/data/hymenoptera): its train + val images are pooled and `--flip`
of their labels flipped to another class (seeded). Out-of-fold probabilities come from
(a) interpret's default, a 5-fold logistic-regression probe on frozen Lite0 features, and
(b) `visiontune cv` (feature-extract, 5 folds, epochs chosen inside each fold). For each,
the flags of cleanlab's find_label_issues and of the plain confident-joint off-diagonal are
scored against the true flips: flagged, precision, recall, and where the flips rank by
self-confidence.
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import random
import tempfile
import time
from pathlib import Path

import numpy as np

from visiontune.analysis.mislabels import _off_diagonal, flag_label_issues, flag_method, oof_probabilities
from visiontune.config import ModelConfig
from visiontune.data.sources import collect_images
from visiontune.models.classifier import create_classifier
from visiontune.runtime.device import resolve_device
from visiontune.selection.cv import cross_validate
from visiontune.train.features import cache_for, extract_features


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


def score(name: str, labels: list[str], probs: np.ndarray, classes: list[str], flipped: set[int]) -> None:
    y = np.array([classes.index(lb) for lb in labels])
    order = np.argsort(probs[np.arange(len(y)), y], kind="stable")
    ranks = sorted(int(np.flatnonzero(order == i)[0]) + 1 for i in flipped)
    print(f"{name}: flips ranked by self-confidence at median {np.median(ranks):.0f}, "
          f"{sum(r <= 2 * len(flipped) for r in ranks)}/{len(flipped)} within the first {2 * len(flipped)}")
    for method, mask in (("cleanlab find_label_issues", flag_label_issues(y, probs)),
                         ("confident-joint off-diagonal", _off_diagonal(y, probs))):
        found = set(np.flatnonzero(mask).tolist())
        hits = len(found & flipped)
        print(f"  {method:<30} flagged {len(found):4d}   precision {hits / max(1, len(found)):.2f}   "
              f"recall {hits / len(flipped):.2f}")


def main() -> None:
    default = Path(__file__).resolve().parents[2] / "shared" / "data" / "hymenoptera"
    ap = argparse.ArgumentParser()
    ap.add_argument("data", nargs="?", default=str(default))
    ap.add_argument("--flip", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="vt-mislabels-"))
    paths, labels, flipped, classes = noisy_table(Path(args.data), work / "noisy.csv", args.flip, args.seed)
    print(f"{len(paths)} images, {len(flipped)} labels flipped (seed {args.seed}); flags by {flag_method()}; "
          f"{time.strftime('%Y-%m-%d %H:%M')}")
    model, pre = create_classifier(ModelConfig(), len(classes))
    device = resolve_device("auto")
    cache = cache_for(ModelConfig().backbone, model.backbone, pre, os.environ.get("VISIONTUNE_CACHE"))
    feats = extract_features(model.backbone, paths, pre, device, cache)[0].numpy()
    score("(a) 5-fold probe on frozen features", labels, oof_probabilities(feats, labels, classes, args.seed),
          classes, flipped)
    cv = cross_validate(args.data, csv=str(work / "noisy.csv"), folds=5, strategy="feature-extract", epochs=10,
                        progress=False, output=str(work / "cv"), seed=args.seed)
    order = {p: i for i, p in enumerate(cv.paths)}
    probs = np.zeros((len(paths), len(classes)))
    for i, p in enumerate(paths):
        probs[i] = cv.oof_probs[order[p]]
    score("(b) visiontune cv out-of-fold", labels, probs, classes, flipped)


if __name__ == "__main__":
    main()
