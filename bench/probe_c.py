"""How the converged probe picks C, against scikit-learn's LogisticRegressionCV (issue 23).

    python bench/probe_c.py SUITE [--sets hymenoptera faces digits waves] [--outer 5]

SUITE is bench/suite.py's folder (train/valid/test per set). Frozen features of each
set's images (the suite's backbone and image size, through visiontune's feature cache),
then each probe variant is fitted on the training split alone; every choice of C is made
by cross-validation inside what it is fitted on:

- selection (what picks the variant): the training and validation splits pooled, `--outer`
  stratified folds; each variant is fitted on four fifths and scored on the fifth (the
  suite's validation data used many times over, never the test split);
- small data (`--per-class 5,10,20`): random subsets of the pooled training and validation
  splits with that many images per class (3 seeds), each variant fitted on the subset and
  scored on the rest of the pool: where the choice of C matters most (still no test split);
- report: fitted on the training split, scored on the validation split and on the test
  split (the test split only reports).

Variants: the probe's search (decade grid, or refined to a quarter decade) by held-out
loss or by the task's score (accuracy); with and without the pull towards the head's
warm start (ImageNet rows for classes it names); scikit-learn's
`LogisticRegressionCV(Cs=10)` on the same features (its default: accuracy picks C).
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from visiontune.config import RunConfig
from visiontune.data.sources import load_items
from visiontune.frozen import probe
from visiontune.frozen.features import FeatureExtractor, cache_for
from visiontune.frozen.probe import fit_probe, head_linear
from visiontune.train.setup import prepare_run

SIZES = {"hymenoptera": 224, "faces": 128, "digits": 64, "waves": 64}
VARIANTS = {  # name: (REFINE, CRITERION, prior)
    "decade, loss, prior (before)": (0, "loss", True),
    "quarter, loss, prior": (2, "loss", True),
    "decade, accuracy, prior": (0, "metric", True),
    "quarter, accuracy, prior": (2, "metric", True),
    "quarter, loss, no prior": (2, "loss", False),
    "quarter, accuracy within 1 SE then loss, prior (now)": (2, "metric-1se", True),
}


def features(root: Path, name: str):
    cfg = RunConfig.create(None, path=str(root / name), image_size=SIZES[name], progress=False)
    source = load_items(cfg.data, cache_dir=cfg.train.cache_dir)
    setup = prepare_run(cfg, source)
    backbone = setup.model.backbone
    cache = cache_for(cfg.model.backbone, backbone, setup.preprocess, cfg.train.cache_dir)
    out = {}
    for split in ("train", "valid", "test"):
        items = [it for it in source.items if it.split == split]
        if split == "test" and not items:
            items = load_items(RunConfig.create(None, path=str(root / name / "test")).data).items
        extractor = FeatureExtractor(backbone, setup.preprocess, setup.device, cache, 64, 0, True)
        x, _ = extractor.extract([it.path for it in items])
        y = setup.task.encode([it.label for it in items]).numpy()
        out[split] = (np.asarray(x), y)
    return out, setup.task, head_linear(setup.model.head)


def probe_accuracy(fit, x, y) -> float:
    return float(((x @ fit.weight.T + fit.bias).argmax(1) == y).mean())


def run_variant(variant, xtr, ytr, task, start, seed=0):
    refine, criterion, prior = VARIANTS[variant]
    probe.REFINE, probe.CRITERION = refine, criterion
    return fit_probe(xtr, ytr, task, start=start if prior else None, seed=seed)


def lrcv(xtr, ytr, seed=0, folds=5):
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import StratifiedKFold

    return LogisticRegressionCV(Cs=10, cv=StratifiedKFold(folds, shuffle=True, random_state=seed), scoring="accuracy",
                                max_iter=2000).fit(xtr, ytr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("suite", type=Path)
    ap.add_argument("--sets", nargs="+", default=list(SIZES))
    ap.add_argument("--outer", type=int, default=5)
    ap.add_argument("--per-class", default="", help="also small-data selection: comma-separated images per class")
    ap.add_argument("--small-only", action="store_true", help="only the small-data selection")
    ap.add_argument("--variants", nargs="+", help="only the variants whose names contain one of these")
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore", category=UserWarning)  # scikit-learn's convergence notes at tiny C
    warnings.filterwarnings("ignore", message=".*converge.*")
    from sklearn.model_selection import StratifiedKFold

    names = [n for n in [*VARIANTS, "LogisticRegressionCV(Cs=10)"] if not a.variants or any(v in n for v in a.variants)]
    rows = {n: {} for n in names}
    smalls: dict[str, dict[str, float]] = {}
    for name in a.sets:
        data, task, start = features(a.suite, name)
        (xtr, ytr), (xva, yva), (xte, yte) = data["train"], data["valid"], data["test"]
        pool_x, pool_y = np.concatenate([xtr, xva]), np.concatenate([ytr, yva])
        outer = list(StratifiedKFold(a.outer, shuffle=True, random_state=1).split(pool_x, pool_y))
        for n in names:
            started = time.perf_counter()
            sel = []
            for tr, te in [] if a.small_only else outer:
                if n in VARIANTS:
                    sel.append(probe_accuracy(run_variant(n, pool_x[tr], pool_y[tr], task, start), pool_x[te], pool_y[te]))
                else:
                    sel.append(float(lrcv(pool_x[tr], pool_y[tr]).score(pool_x[te], pool_y[te])))
            if a.small_only:
                valid = test = c = float("nan")
            elif n in VARIANTS:
                fit = run_variant(n, xtr, ytr, task, start)
                valid, test, c = probe_accuracy(fit, xva, yva), probe_accuracy(fit, xte, yte), fit.c
            else:
                m = lrcv(xtr, ytr)
                valid, test, c = float(m.score(xva, yva)), float(m.score(xte, yte)), float(m.C_[0])
            small = []
            for k in [int(v) for v in a.per_class.split(",") if v]:
                for seed in range(3):
                    rng = np.random.default_rng(seed)
                    pick = np.concatenate([rng.choice(np.flatnonzero(pool_y == cls), k, replace=False)
                                           for cls in np.unique(pool_y)])
                    rest = np.setdiff1d(np.arange(len(pool_y)), pick)
                    if n in VARIANTS:
                        small.append(probe_accuracy(run_variant(n, pool_x[pick], pool_y[pick], task, start),
                                                    pool_x[rest], pool_y[rest]))
                    else:
                        small.append(float(lrcv(pool_x[pick], pool_y[pick], folds=min(5, k)).score(pool_x[rest],
                                                                                                     pool_y[rest])))
            if small:
                print(f"{name:12s} {n:30s} small data ({a.per_class} per class x 3 seeds): "
                      + " ".join(f"{v:.3f}" for v in small) + f"  mean {np.mean(small):.4f}", flush=True)
            rows[n][name] = (float(np.mean(sel)) if sel else float("nan"), valid, test, c, time.perf_counter() - started)
            smalls.setdefault(n, {})[name] = float(np.mean(small)) if small else float("nan")
            print(f"{name:12s} {n:30s} selection {np.mean(sel):.4f}  valid {valid:.4f}  test {test:.4f}  "
                  f"C {c:.4g}  ({time.perf_counter() - started:.1f} s)", flush=True)
    print(f"\n{time.strftime('%Y-%m-%d %H:%M')}, {torch.get_num_threads()} threads\n")
    print("| variant | " + " | ".join(f"{s} sel / valid / test (C)" for s in a.sets) + " | mean sel | mean test |")
    print("|---|" + "---|" * (len(a.sets) + 2))
    for n in names:
        cells = [f"{rows[n][s][0]:.3f} / {rows[n][s][1]:.3f} / {rows[n][s][2]:.3f} ({rows[n][s][3]:.3g})"
                 for s in a.sets]
        print(f"| {n} | " + " | ".join(cells) + f" | {np.mean([rows[n][s][0] for s in a.sets]):.4f} | "
              f"{np.mean([rows[n][s][2] for s in a.sets]):.4f} |")
    if a.per_class:
        print(f"\nsmall data ({a.per_class} images per class, 3 seeds each), accuracy on the rest of the pool:\n")
        print("| variant | " + " | ".join(a.sets) + " | mean |\n|---|" + "---|" * (len(a.sets) + 1))
        for n in names:
            print(f"| {n} | " + " | ".join(f"{smalls[n][s]:.4f}" for s in a.sets)
                  + f" | {np.mean([smalls[n][s] for s in a.sets]):.4f} |")


if __name__ == "__main__":
    main()
