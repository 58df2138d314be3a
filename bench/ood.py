"""Out-of-distribution scores side by side, on images the model never saw.

The shipped score (models/novelty.py: the larger of the k-th nearest neighbour distance, Sun
et al. 2022, and the energy of the logits, Liu et al. 2020, each in units of its validation
spread) against each of its two parts alone and the maximum softmax probability.

    python -m bench.suite prepare SUITE      # the sets as train/ valid/ test/ folders
    python -m bench.ood SUITE                # -> bench/results/ood.csv
    python -m bench.ood --smoke              # generated colour squares, the tiny model

Cases (each model trained with the feature-extract recipe, default backbone, seed 0; every
threshold and choice made on the training and validation splits; the figures on test
splits only):
- far: the hymenoptera model (ants, bees) on hymenoptera's test images (in) against digits'
  test images (out), and the digits model against hymenoptera's test images.
- near: digits trained without one class (HELD_OUT), its test images of the other classes
  (in) against those of the held-out class (out).
Figures: AUROC (out-of-distribution as the positive class; scikit-learn) and FPR at 95% TPR
(the share of out-of-distribution images that pass where 95% of the in-distribution ones
pass) per score; the share of in-distribution test images past the shipped threshold (set on
the validation split: ~5% expected); the seconds train/calibrate.fit_ood added to the run;
the bank's size and the score's cost per image at 10^5 training images (the bank caps it).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score, roc_curve

import visiontune as vt
from bench.harness import SMOKE_MODEL, Recorder, parser, tiny_folders
from bench.suite import prepare_digits, prepare_hymenoptera
from visiontune.bundle import load_bundle
from visiontune.data.loaders import eval_dataset, make_loader
from visiontune.data.sources import collect_images
from visiontune.models.novelty import BANK, Novelty, neighbour_k

HELD_OUT = "9"  # the digit left out of the near case's training
SCORES = ("shipped", "knn", "energy", "msp")  # each: higher = less like the training images


def scores(run: Path, folder: Path, limit: int = 400) -> dict[str, np.ndarray]:
    """Each score of every image under `folder` (at most `limit`, a seeded sample)."""
    paths, _ = collect_images([str(folder)])
    if len(paths) > limit:
        paths = [paths[i] for i in sorted(np.random.default_rng(0).choice(len(paths), limit, replace=False))]
    model = load_bundle(run).model
    loader = make_loader(eval_dataset(paths, None, load_bundle(run).preprocess), 32, 0, torch.device("cpu"))
    shipped, parts, logits = [], [], []
    with torch.inference_mode():
        for x, _, _ in loader:
            features = model.backbone(x)
            z = model.outputs(features)  # the calibrated logits, as the shipped score reads them
            shipped.append(model.novelty(features, z))
            parts.append(model.novelty.parts(features, z))
            logits.append(z)
    z, parts = torch.cat(logits), torch.cat(parts).numpy()
    return {"shipped": torch.cat(shipped).numpy(), "knn": parts[:, 0], "msp": -torch.softmax(z, 1).max(1).values.numpy(),
            "energy": parts[:, 1]}  # Liu et al.'s E(x) = -T logsumexp(z / T), T = 1 (of the calibrated logits)


def figures(inside: np.ndarray, outside: np.ndarray) -> tuple[float, float]:
    """(AUROC with the outside images as positives, FPR of the outside images at 95% TPR of the inside ones)."""
    y = np.r_[np.zeros(len(inside)), np.ones(len(outside))]
    s = np.r_[inside, outside]
    fpr, tpr, _ = roc_curve(1 - y, -s)  # inside as positives: how many outside pass when 95% of inside do
    return float(roc_auc_score(y, s)), float(fpr[np.searchsorted(tpr, 0.95)])


def train(data: Path, runs: Path, model: dict) -> tuple[Path, float]:
    started = time.perf_counter()
    result = vt.fit(data, **{"strategy": "feature-extract", "seed": 0, "progress": False, **model,
                             "output": str(runs)})
    return Path(result.run_dir), time.perf_counter() - started


def compare(record: Recorder, case: str, run: Path, inside: Path, outside: Path) -> None:
    """The figures of one case: each score's AUROC and FPR@95, and the shipped threshold's pass rate."""
    a, b = scores(run, inside), scores(run, outside)
    for name in SCORES:
        auroc, fpr = figures(a[name], b[name])
        record(f"{case}: {name} AUROC", auroc)
        record(f"{case}: {name} FPR at 95% TPR", 100 * fpr, "%")
        print(f"{case:40s} {name:7s} AUROC {auroc:.3f}  FPR@95 {100 * fpr:5.1f}%", flush=True)
    fitted = load_bundle(run).uncertainty["ood"]
    record(f"{case}: in-distribution test images past the shipped threshold",
           100 * (a["shipped"] > fitted["threshold"]).mean(), "%", "the threshold lets 95% of the validation images pass")
    record(f"{case}: out-of-distribution images answered unknown", 100 * (b["shipped"] > fitted["threshold"]).mean(), "%")


def fit_cost(record: Recorder, name: str, run: Path, seconds: float) -> None:
    fitted = load_bundle(run).uncertainty["ood"]
    record(f"{name}: OOD bank and threshold fit", fitted["seconds"], "s",
           f"bank {fitted['bank']} images, {fitted['valid_images']} validation images; whole run {seconds:.1f} s")


def index_cost(record: Recorder, features: int = 1280, train_images: int = 100_000, bank: int = BANK) -> None:
    """The bank's size and the score's cost per image (batch 64, this CPU) at `train_images`
    training images: capped at `bank`, and uncapped for comparison."""
    x = torch.randn(64, features)
    for name, rows in (("bank of BANK", min(bank, train_images)), ("every training image", train_images)):
        module = Novelty(torch.randn(rows, features), neighbour_k(rows), "softmax")
        logits = torch.randn(len(x), 10)
        with torch.inference_mode():
            module(x, logits)
            started, repeats = time.perf_counter(), 5
            for _ in range(repeats):
                module(x, logits)
        per_image = (time.perf_counter() - started) / repeats / len(x) * 1000
        note = f"{train_images} training images, {features} features, float16"
        record(f"kNN score at 1e5 training images, {name}: index size", module.size_bytes() / 1e6, "MB", note)
        record(f"kNN score at 1e5 training images, {name}: cost", per_image, "ms/image", note + ", batch 64")
        print(f"{name}: {rows} rows, {module.size_bytes() / 1e6:.1f} MB, {per_image:.3f} ms/image", flush=True)


def held_out_copy(source: Path, target: Path, held_out: str, splits: tuple[str, ...] = ("train", "valid")) -> Path:
    """`source`'s `splits` without the class `held_out` (its test images stay: the near OOD)."""
    for split in splits:
        for folder in (source / split).iterdir():
            if folder.name != held_out:
                shutil.copytree(folder, target / split / folder.name, dirs_exist_ok=True)
    return target


def smoke_sets(work: Path) -> tuple[Path, Path]:
    """Two generated 'sets': 4 colours (c3 held out plays the near case), and noise images."""
    colours = tiny_folders(work / "colours", classes=4, per_class=10, splits=("train", "valid", "test"))
    noise = work / "noise" / "test" / "x"
    noise.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for i in range(10):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(noise / f"n{i}.png")
    return colours, noise.parent.parent


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("suite", nargs="?", help="the folder `python -m bench.suite prepare` wrote (made if missing)")
    p.add_argument("--shared", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    args = p.parse_args(argv)
    record = Recorder("ood", args.smoke, argv)
    work = Path(tempfile.mkdtemp(prefix="vt-bench-ood-"))
    if args.smoke:
        model = dict(SMOKE_MODEL, epochs=2)
        first, second = smoke_sets(work)
        near_class, near_set = "c3", first
    else:
        if args.suite is None:
            p.error("SUITE is required (or --smoke)")
        suite, model = Path(args.suite), {}
        first, second, near_class, near_set = suite / "hymenoptera", suite / "digits", HELD_OUT, suite / "digits"
        if not first.is_dir():
            prepare_hymenoptera(first, Path(args.shared))
        if not second.is_dir():
            prepare_digits(second)
    run_first, seconds = train(first, work / "runs", model)
    fit_cost(record, first.name, run_first, seconds)
    compare(record, f"far: {first.name} model, {second.name} images", run_first, first / "test", second / "test")
    if not args.smoke:
        run_second, seconds = train(second, work / "runs", model)
        fit_cost(record, second.name, run_second, seconds)
        compare(record, f"far: {second.name} model, {first.name} images", run_second, second / "test", first / "test")
    run_near, _ = train(held_out_copy(near_set, work / "near", near_class), work / "runs", model)
    inside = held_out_copy(near_set, work / "near-in", near_class, ("test",)) / "test"
    compare(record, f"near: {near_set.name} without {near_class}", run_near, inside, near_set / "test" / near_class)
    index_cost(record, *((64, 5000, 512) if args.smoke else ()))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
