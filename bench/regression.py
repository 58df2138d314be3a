"""Image regression on real photos: counting bees in 3x3 mosaics (issue 22).

    pip install fastai   # for the comparison only; not a visiontune dependency
    python -m bench.regression WORK [--train 480 --valid 120 --test 300] [--epochs 5] [--no-fastai]
    python -m bench.regression --smoke   # mosaics of generated tiles, the tiny model, no fastai

The data: 224 px mosaics of 3x3 tiles, N of them (0-9, uniform) random crops of real bee
photos (hymenoptera, ../shared/data), the rest a plain grey with noise; target = N.
Training and validation mosaics use the photos of hymenoptera's train split, the test
mosaics only those of its val split, so no photo is in both. The test split is scored
once at the end; no choice looks at it.

Runs, each from a cold start in this process with the packaged Lite0 weights:
- visiontune `--task regression --strategy feature-extract` (the converged probe: ridge
  regression on frozen features, alpha by cross-validation);
- visiontune `--task regression --strategy gradual --epochs E`;
- fastai: a `RegressionBlock` learner, the same Lite0 body, a linear head, MSE,
  `fine_tune(E - 1, freeze_epochs=1)`, the same seed, size and batch size.
Both keep the last epoch's weights (visiontune: restore_best off, no early stopping).
Prints MAE, RMSE, R^2 on the test mosaics and the wall time of each, and records them.
`--smoke` draws the tiles from generated images instead of bee photos and leaves fastai out.
"""

from __future__ import annotations

import csv
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

import visiontune as vt
from bench.harness import SMOKE_MODEL, Recorder, parser, tiny_folders

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "hymenoptera"
SIZE, GRID = 224, 3
TILE = SIZE // GRID


def _tile(photo: Path, rng: random.Random) -> Image.Image:
    im = Image.open(photo).convert("RGB")
    side = min(im.size)
    crop = int(side * rng.uniform(0.6, 1.0))
    x, y = rng.randint(0, im.size[0] - crop), rng.randint(0, im.size[1] - crop)
    return im.crop((x, y, x + crop, y + crop)).resize((TILE, TILE), Image.BILINEAR)


def mosaic(photos: list[Path], count: int, rng: random.Random) -> Image.Image:
    canvas = np.clip(np.full((SIZE, SIZE, 3), 128.0) + np.random.default_rng(rng.randint(0, 2**31)).normal(
        0, 8, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(canvas)
    for cell in rng.sample(range(GRID * GRID), count):
        image.paste(_tile(rng.choice(photos), rng), ((cell % GRID) * TILE, (cell // GRID) * TILE))
    return image


def make_data(root: Path, n_train: int, n_valid: int, n_test: int, seed: int = 0, photos: Path = SHARED,
              held_out_valid: bool = False) -> Path:
    """root/images/*.jpg and root/targets.csv: mosaics of crops of PHOTOS/{train,val}/bees.
    Train and valid mosaics tile the train photos, test mosaics the val photos; with
    `held_out_valid`, valid mosaics tile the val photos too: valid and test are then draws
    of one generator from one pool of photos the model never trained on, exchangeable, as
    a conformal interval's guarantee assumes (valid mosaics of the training photos are
    easier than test's; valid and test from two halves of the val photos differ by which
    photos fell in which half)."""
    if (root / "targets.csv").is_file():
        return root
    rng = random.Random(seed)
    fit_photos = sorted((photos / "train" / "bees").glob("*.jpg"))
    test_photos = sorted((photos / "val" / "bees").glob("*.jpg"))
    valid_photos = fit_photos
    if held_out_valid:
        valid_photos = test_photos
    rows = [["path", "count", "split"]]
    (root / "images").mkdir(parents=True, exist_ok=True)
    for split, n, photos in (("train", n_train, fit_photos), ("valid", n_valid, valid_photos),
                             ("test", n_test, test_photos)):
        for i in range(n):
            count = rng.randint(0, GRID * GRID)
            name = f"images/{split}_{i:04d}.jpg"
            mosaic(photos, count, rng).save(root / name, quality=90)
            rows.append([name, str(count), split])
    with open(root / "targets.csv", "w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    return root


def scores(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    return {"mae": mean_absolute_error(y, p), "rmse": math.sqrt(mean_squared_error(y, p)), "r2": r2_score(y, p)}


def run_visiontune(data: Path, strategy: str, epochs: int, bs: int, seed: int, out: Path,
                   model: dict) -> tuple[dict, float]:
    started = time.perf_counter()
    run = vt.fit(data, csv="targets.csv", task="regression", strategy=strategy, epochs=epochs, seed=seed,
                 restore_best=False, output=str(out), **{"batch_size": bs, "patience": 0, "progress": False, **model})
    seconds = time.perf_counter() - started
    result = vt.evaluate(run.run_dir, data, csv="targets.csv")  # the test split
    return scores(result.targets.reshape(-1), result.probs.reshape(-1)), seconds


def run_fastai(data: Path, epochs: int, bs: int, seed: int) -> tuple[dict, float]:
    import pandas as pd
    import torch
    from fastai.vision.all import (
        ColReader,
        DataBlock,
        ImageBlock,
        Learner,
        MSELossFlat,
        Normalize,
        RegressionBlock,
        Resize,
        params,
        set_seed,
    )

    from visiontune.models.backbones import create_source_model

    set_seed(seed, reproducible=True)
    df = pd.read_csv(data / "targets.csv")
    fit_df = df[df.split != "test"].reset_index(drop=True)
    fit_df["is_valid"] = fit_df.split == "valid"
    started = time.perf_counter()
    block = DataBlock(blocks=(ImageBlock, RegressionBlock), get_x=ColReader("path", pref=str(data) + os.sep),
                      get_y=ColReader("count"), splitter=lambda d: (list(np.flatnonzero(~d.is_valid.values)),
                                                                     list(np.flatnonzero(d.is_valid.values))),
                      item_tfms=Resize(SIZE), batch_tfms=Normalize.from_stats([0.5] * 3, [0.5] * 3))
    dls = block.dataloaders(fit_df, bs=bs, num_workers=0)
    body, width, _, _ = create_source_model("timm:tf_efficientnet_lite0", "pretrained")
    model = torch.nn.Sequential(body, torch.nn.Linear(width, 1))
    learn = Learner(dls, model, loss_func=MSELossFlat(), splitter=lambda m: [params(m[0]), params(m[1])])
    with learn.no_bar(), learn.no_logging():
        learn.fine_tune(epochs - 1, 2e-3, freeze_epochs=1)
    seconds = time.perf_counter() - started
    test = df[df.split == "test"]
    test_dl = dls.test_dl([str(data / p) for p in test.path])
    preds, _ = learn.get_preds(dl=test_dl)
    return scores(test["count"].to_numpy(float), preds.reshape(-1).numpy()), seconds


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("work", nargs="?")
    p.add_argument("--train", type=int, default=480)
    p.add_argument("--valid", type=int, default=120)
    p.add_argument("--test", type=int, default=300)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-fastai", action="store_true")
    args = p.parse_args(argv)
    record, model, photos = Recorder("regression", args.smoke, argv), {}, SHARED
    if args.smoke:  # generated "bee" tiles, 24 / 8 / 12 mosaics, the tiny model, gradual x2, no fastai
        args.work, args.train, args.valid, args.test, args.epochs = tempfile.mkdtemp(prefix="vt-bench-regr-"), 24, 8, \
            12, 2
        args.no_fastai, model = True, dict(SMOKE_MODEL)
        photos = tiny_folders(Path(args.work) / "photos", classes=1, per_class=6, side=48, splits=("train", "val"))
        for split in ("train", "val"):
            (photos / split / "c0").rename(photos / split / "bees")
    elif args.work is None:
        p.error("WORK is required (or --smoke)")
    work = Path(args.work)
    data = make_data(work / "mosaics", args.train, args.valid, args.test, args.seed, photos)
    rows = []
    for name, strategy, epochs in (("visiontune feature-extract (ridge probe)", "feature-extract", 1),
                                   (f"visiontune gradual x{args.epochs}", "gradual", args.epochs)):
        m, s = run_visiontune(data, strategy, epochs, args.batch_size, args.seed, work / "runs", model)
        rows.append((name, m, s))
        print(f"{name}: {m} in {s:.1f}s", flush=True)
    if not args.no_fastai:
        m, s = run_fastai(data, args.epochs, args.batch_size, args.seed)
        rows.append((f"fastai RegressionBlock fine_tune({args.epochs - 1}, freeze_epochs=1)", m, s))
    print(f"\n{args.train} train / {args.valid} valid / {args.test} test mosaics, {time.strftime('%Y-%m-%d %H:%M')}, "
          f"{os.cpu_count()} CPUs, python {sys.version.split()[0]}\n")
    print("| run | test MAE | test RMSE | test R^2 | wall s |\n|---|---|---|---|---|")
    for name, m, s in rows:
        print(f"| {name} | {m['mae']:.3f} | {m['rmse']:.3f} | {m['r2']:.3f} | {s:.1f} |")
        note = f"{args.train} / {args.valid} / {args.test} mosaics, {s:.0f} s"
        record(f"{name}: test MAE", m["mae"], "objects", note=note)
        record(f"{name}: test R^2", m["r2"], note=note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
