"""A real multi-label set from photos we have, and what visiontune makes of it.

    python -m bench.multilabel [--train 400] [--test 200] [--seed 0]
    python -m bench.multilabel --smoke   # mosaics of generated tiles, the tiny model, 2 epochs each

Mosaics of 2 x 2 tiles (224 px): each tile is blank (p = 0.3) or a photo of an ant or a
bee (hymenoptera) or a face or a non-face (scikit-image's lfw_subset); the labels are the
set of classes present (possibly none). Train mosaics use hymenoptera's train photos and
60% of lfw; test mosaics only hymenoptera's val photos and the other 40% of lfw, so no
photo is in both. The test split is fixed and never used for any choice.

For feature-extract and gradual, thresholds tuned on the validation split (carved from
train by iterative stratification): test mAP (threshold-free), macro-F1 with the global
0.5 threshold and with the tuned ones, samples-F1, subset accuracy, wall time. `--smoke`
draws the tiles from generated images of four colours instead of photos.
"""

from __future__ import annotations

import csv
import logging
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

import visiontune as vt
from bench.harness import SMOKE_MODEL, Recorder, parser, tiny_folders
from visiontune.data.images import load_rgb
from visiontune.demo import write_lfw_subset
from visiontune.tasks.multi_label import MultiLabel

TILE = 112
CLASSES = ("ants", "bees", "face", "nonface")


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


def _generated(root: Path) -> dict[str, dict[str, list[Path]]]:
    """--smoke: split -> class -> generated tiles (a colour per class), no tile in both splits."""
    tiny_folders(root, classes=len(CLASSES), per_class=4, side=32, splits=("train", "test"))
    return {split: {cls: sorted((root / split / f"c{k}").glob("*.jpg")) for k, cls in enumerate(CLASSES)}
            for split in ("train", "test")}


def build(root: Path, hymenoptera: Path | None, n_train: int, n_test: int, seed: int) -> Path:
    """root/mosaics/*.jpg and root/labels.csv; tiles of photos, or generated ones without `hymenoptera`."""
    rng = random.Random(seed)
    sources = (_sources(hymenoptera, write_lfw_subset(root / "lfw"), seed) if hymenoptera
               else _generated(root / "tiles"))
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


def run(root: Path, strategy: str, epochs: int, seed: int, model: dict) -> dict[str, float]:
    started = time.perf_counter()
    r = vt.fit(root, csv="labels.csv", strategy=strategy, epochs=epochs, thresholds="tuned", seed=seed,
               output=str(root / "runs"), name=strategy, **{"progress": False, **model})
    seconds = time.perf_counter() - started
    tuned = vt.evaluate(r.run_dir, root, csv="labels.csv")  # the CSV's test split, tuned thresholds
    plain = MultiLabel(tuned.classes).metrics(tuned.targets, tuned.probs)  # the same outputs, 0.5 everywhere
    return {"mAP": tuned.metrics["mAP"], "macro_f1 (0.5)": plain["macro_f1"],
            "macro_f1 (tuned)": tuned.metrics["macro_f1"], "samples_f1 (tuned)": tuned.metrics["samples_f1"],
            "subset acc (tuned)": tuned.metrics["subset_accuracy"], "wall s": seconds}


def main(argv: list[str] | None = None) -> int:
    default = Path(__file__).resolve().parents[2] / "shared" / "data" / "hymenoptera"
    ap = parser(__doc__)
    ap.add_argument("--hymenoptera", default=str(default))
    ap.add_argument("--train", type=int, default=400)
    ap.add_argument("--test", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    record, model, epochs = Recorder("multilabel", args.smoke, argv), {}, {"feature-extract": 10, "gradual": 6}
    if args.smoke:  # generated tiles, 48 + 16 mosaics, the tiny model, 2 epochs each
        args.hymenoptera, args.train, args.test, model = None, 48, 16, dict(SMOKE_MODEL)
        epochs = {"feature-extract": 2, "gradual": 2}
    root = build(Path(tempfile.mkdtemp(prefix="vt-mosaics-")), args.hymenoptera and Path(args.hymenoptera),
                 args.train, args.test, args.seed)
    labels = [r["labels"].split() for r in csv.DictReader(open(root / "labels.csv"))]
    print(f"{len(labels)} mosaics ({args.train} train+valid, {args.test} test), labels per image "
          f"{np.mean([len(x) for x in labels]):.2f}, none: {sum(not x for x in labels)}; "
          f"{time.strftime('%Y-%m-%d %H:%M')}")
    results = {s: run(root, s, e, args.seed, model) for s, e in epochs.items()}
    keys = list(next(iter(results.values())))
    print("| strategy | " + " | ".join(keys) + " |")
    print("|---|" + "---|" * len(keys))
    for strategy, row in results.items():
        print(f"| {strategy} | " + " | ".join(f"{row[k]:.1f}" if k == "wall s" else f"{row[k]:.4f}" for k in keys)
              + " |")
        for key in ("mAP", "macro_f1 (0.5)", "macro_f1 (tuned)"):
            record(f"{strategy}: test {key}", row[key], note=f"{args.train} + {args.test} mosaics, "
                                                              f"{epochs[strategy]} epochs, {row['wall s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
