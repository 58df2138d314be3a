"""A real multi-label set from photos we have, and what visiontune makes of it.

    python bench/multilabel.py [--train 400] [--test 200] [--seed 0]

Mosaics of 2 x 2 tiles (224 px): each tile is blank (p = 0.3) or a photo of an ant or a
bee (hymenoptera) or a face or a non-face (scikit-image's lfw_subset); the labels are the
set of classes present (possibly none). Train mosaics use hymenoptera's train photos and
60% of lfw; test mosaics only hymenoptera's val photos and the other 40% of lfw, so no
photo is in both. The test split is fixed and never used for any choice.

For feature-extract and gradual, thresholds tuned on the validation split (carved from
train by iterative stratification): test mAP (threshold-free), macro-F1 with the global
0.5 threshold and with the tuned ones, samples-F1, subset accuracy, wall time.
"""

from __future__ import annotations

import argparse
import csv
import logging
import random
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

import visiontune as vt
from visiontune.data.images import load_rgb
from visiontune.demo import write_lfw_subset
from visiontune.tasks.multi_label import MultiLabel

TILE = 112


def _sources(hymenoptera: Path, lfw: Path, seed: int) -> dict[str, dict[str, list[Path]]]:
    """split -> class -> photos; no photo in both splits."""
    rng = random.Random(seed)
    out: dict[str, dict[str, list[Path]]] = {"train": {}, "test": {}}
    for cls in ("ants", "bees"):
        out["train"][cls] = sorted((hymenoptera / "train" / cls).glob("*.jpg"))
        out["test"][cls] = sorted((hymenoptera / "val" / cls).glob("*.jpg"))
    for cls, folder in (("face", "faces"), ("nonface", "non-faces")):
        photos = sorted((lfw / "train" / folder).glob("*.png")) + sorted((lfw / "test" / folder).glob("*.png"))
        rng.shuffle(photos)
        cut = int(0.6 * len(photos))
        out["train"][cls], out["test"][cls] = photos[:cut], photos[cut:]
    return out


def _mosaic(rng: random.Random, photos: dict[str, list[Path]]) -> tuple[Image.Image, list[str]]:
    canvas = Image.new("RGB", (2 * TILE, 2 * TILE), (128, 128, 128))
    labels: set[str] = set()
    for q in range(4):
        if rng.random() < 0.3:
            continue
        cls = rng.choice(sorted(photos))
        tile = load_rgb(rng.choice(photos[cls])).resize((TILE, TILE), Image.BICUBIC)
        canvas.paste(tile, ((q % 2) * TILE, (q // 2) * TILE))
        labels.add(cls)
    return canvas, sorted(labels)


def build(root: Path, hymenoptera: Path, n_train: int, n_test: int, seed: int) -> Path:
    rng = random.Random(seed)
    sources = _sources(hymenoptera, write_lfw_subset(root / "lfw"), seed)
    rows = [["path", "labels", "split"]]
    for split, n in (("train", n_train), ("test", n_test)):
        for i in range(n):
            image, labels = _mosaic(rng, sources[split])
            rel = f"mosaics/{split}_{i:04d}.jpg"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            image.save(root / rel, quality=92)
            rows.append([rel, " ".join(labels), "test" if split == "test" else ""])
    with open(root / "labels.csv", "w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    return root


def run(root: Path, strategy: str, epochs: int, seed: int) -> dict[str, float]:
    started = time.perf_counter()
    r = vt.fit(root, csv="labels.csv", strategy=strategy, epochs=epochs, thresholds="tuned", seed=seed,
               progress=False, output=str(root / "runs"), name=strategy)
    seconds = time.perf_counter() - started
    tuned = vt.evaluate(r.run_dir, root, csv="labels.csv")  # the CSV's test split, tuned thresholds
    plain = MultiLabel(tuned.classes).metrics(tuned.targets, tuned.probs)  # the same outputs, 0.5 everywhere
    return {"mAP": tuned.metrics["mAP"], "macro_f1 (0.5)": plain["macro_f1"],
            "macro_f1 (tuned)": tuned.metrics["macro_f1"], "samples_f1 (tuned)": tuned.metrics["samples_f1"],
            "subset acc (tuned)": tuned.metrics["subset_accuracy"], "wall s": seconds}


def main() -> None:
    default = Path(__file__).resolve().parents[2] / "shared" / "data" / "hymenoptera"
    ap = argparse.ArgumentParser()
    ap.add_argument("--hymenoptera", default=str(default))
    ap.add_argument("--train", type=int, default=400)
    ap.add_argument("--test", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    root = build(Path(tempfile.mkdtemp(prefix="vt-mosaics-")), Path(args.hymenoptera), args.train, args.test,
                 args.seed)
    labels = [r["labels"].split() for r in csv.DictReader(open(root / "labels.csv"))]
    print(f"{len(labels)} mosaics ({args.train} train+valid, {args.test} test), labels per image "
          f"{np.mean([len(x) for x in labels]):.2f}, none: {sum(not x for x in labels)}; "
          f"{time.strftime('%Y-%m-%d %H:%M')}")
    results = {s: run(root, s, e, args.seed) for s, e in (("feature-extract", 10), ("gradual", 6))}
    keys = list(next(iter(results.values())))
    print("| strategy | " + " | ".join(keys) + " |")
    print("|---|" + "---|" * len(keys))
    for strategy, row in results.items():
        print(f"| {strategy} | " + " | ".join(f"{row[k]:.1f}" if k == "wall s" else f"{row[k]:.4f}" for k in keys)
              + " |")


if __name__ == "__main__":
    main()
