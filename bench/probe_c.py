"""How the converged probe picks C, against scikit-learn's LogisticRegressionCV (issue 23).

    python -m bench.probe_c SUITE [--sets hymenoptera faces digits waves] [--outer 5] [--per-class 5,10]
    python -m bench.probe_c --smoke   # a generated set, the tiny model, 2 outer folds, 3 per class, 3 variants

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
`LogisticRegressionCV(Cs=10)` on the same features (its default: accuracy picks C). Each
variant's mean selection and test accuracy over the sets are recorded.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegressionCV
from sklearn.model_selection import StratifiedKFold

from bench.harness import SMOKE_MODEL, Recorder, parser, tiny_folders
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


def features(root: Path, name: str, model: dict | None = None):
    cfg = RunConfig.create(None, path=str(root / name), **{"image_size": SIZES.get(name, 32), "progress": False,
                                                           **(model or {})})
    source = load_items(cfg.data, cache_dir=cfg.runtime.cache_dir)
    setup = prepare_run(cfg, source)
    backbone = setup.model.backbone
    cache = cache_for(cfg.model.backbone, backbone, setup.preprocess, cfg.runtime.cache_dir)
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


@contextlib.contextmanager
def search(refine: int, criterion: str):
    """The probe's C search set to REFINE and CRITERION for the block, then put back."""
    saved = probe.REFINE, probe.CRITERION
    probe.REFINE, probe.CRITERION = refine, criterion
    try:
        yield
    finally:
        probe.REFINE, probe.CRITERION = saved


def run_variant(variant, xtr, ytr, task, start, seed=0):
    refine, criterion, prior = VARIANTS[variant]
    with search(refine, criterion):
        return fit_probe(xtr, ytr, task, start=start if prior else None, seed=seed)


def lrcv(xtr, ytr, seed=0, folds=5):
    return LogisticRegressionCV(Cs=10, cv=StratifiedKFold(folds, shuffle=True, random_state=seed), scoring="accuracy",
                                max_iter=2000).fit(xtr, ytr)


def fitted(n: str, xtr, ytr, task, start, folds: int = 5):
    """(accuracy function of (x, y), C) of variant `n` (or LogisticRegressionCV) fitted on xtr."""
    if n in VARIANTS:
        fit = run_variant(n, xtr, ytr, task, start)
        return (lambda x, y: probe_accuracy(fit, x, y)), fit.c
    m = lrcv(xtr, ytr, folds=folds)
    return (lambda x, y: float(m.score(x, y))), float(m.C_[0])


def fitted_score(n: str, xtr, ytr, xte, yte, task, start, folds: int = 5) -> float:
    return fitted(n, xtr, ytr, task, start, folds)[0](xte, yte)


def small_data(n: str, pool_x, pool_y, task, start, per_class: str) -> list[float]:
    """Accuracy on the rest of the pool of variant `n` fitted on `per_class` images per class, 3 seeds each."""
    small = []
    for k in [int(v) for v in per_class.split(",") if v]:
        for seed in range(3):
            rng = np.random.default_rng(seed)
            pick = np.concatenate([rng.choice(np.flatnonzero(pool_y == cls), k, replace=False)
                                   for cls in np.unique(pool_y)])
            rest = np.setdiff1d(np.arange(len(pool_y)), pick)
            small.append(fitted_score(n, pool_x[pick], pool_y[pick], pool_x[rest], pool_y[rest], task, start,
                                      folds=min(5, k)))
    return small


def one_set(a, name: str, names: list[str], rows: dict, smalls: dict, model: dict | None) -> None:
    """Every variant on one suite set: selection, small data, valid and test (rows[variant][set])."""
    data, task, start = features(a.suite, name, model)
    (xtr, ytr), (xva, yva), (xte, yte) = data["train"], data["valid"], data["test"]
    pool_x, pool_y = np.concatenate([xtr, xva]), np.concatenate([ytr, yva])
    outer = list(StratifiedKFold(a.outer, shuffle=True, random_state=1).split(pool_x, pool_y))
    for n in names:
        started = time.perf_counter()
        sel = [fitted_score(n, pool_x[tr], pool_y[tr], pool_x[te], pool_y[te], task, start)
               for tr, te in ([] if a.small_only else outer)]
        valid = test = c = float("nan")
        if not a.small_only:
            accuracy, c = fitted(n, xtr, ytr, task, start)
            valid, test = accuracy(xva, yva), accuracy(xte, yte)
        small = small_data(n, pool_x, pool_y, task, start, a.per_class)
        if small:
            print(f"{name:12s} {n:30s} small data ({a.per_class} per class x 3 seeds): "
                  + " ".join(f"{v:.3f}" for v in small) + f"  mean {np.mean(small):.4f}", flush=True)
        rows[n][name] = (float(np.mean(sel)) if sel else float("nan"), valid, test, c, time.perf_counter() - started)
        smalls.setdefault(n, {})[name] = float(np.mean(small)) if small else float("nan")
        print(f"{name:12s} {n:30s} selection {rows[n][name][0]:.4f}  valid {valid:.4f}  test {test:.4f}  "
              f"C {c:.4g}  ({time.perf_counter() - started:.1f} s)", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__)
    ap.add_argument("suite", type=Path, nargs="?")
    ap.add_argument("--sets", nargs="+", default=list(SIZES))
    ap.add_argument("--outer", type=int, default=5)
    ap.add_argument("--per-class", default="", help="also small-data selection: comma-separated images per class")
    ap.add_argument("--small-only", action="store_true", help="only the small-data selection")
    ap.add_argument("--variants", nargs="+", help="only the variants whose names contain one of these")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    record, model = Recorder("probe_c", a.smoke, argv), None
    if a.smoke:  # a generated set of 2 x 12 images a split, the tiny model
        a.suite = Path(tempfile.mkdtemp(prefix="vt-bench-probe-c-"))
        tiny_folders(a.suite / "tiny", per_class=12, splits=("train", "valid", "test"))
        a.sets, a.outer, a.per_class, model = ["tiny"], 2, "3", dict(SMOKE_MODEL)
        a.variants = ["(before)", "(now)", "LogisticRegressionCV"]  # the old, the current and the reference
    elif a.suite is None:
        ap.error("SUITE is required (or --smoke)")
    names = [n for n in [*VARIANTS, "LogisticRegressionCV(Cs=10)"] if not a.variants or any(v in n for v in a.variants)]
    rows: dict = {n: {} for n in names}
    smalls: dict[str, dict[str, float]] = {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning)  # scikit-learn's convergence notes at tiny C
        warnings.filterwarnings("ignore", message=".*converge.*")
        warnings.filterwarnings("ignore", category=FutureWarning, module="sklearn")  # LogisticRegressionCV's defaults
        for name in a.sets:
            one_set(a, name, names, rows, smalls, model)
    print(f"\n{time.strftime('%Y-%m-%d %H:%M')}, {torch.get_num_threads()} threads\n")
    tables(a, names, rows, smalls, record)
    return 0


def tables(a, names: list[str], rows: dict, smalls: dict, record: Recorder) -> None:
    print("| variant | " + " | ".join(f"{s} sel / valid / test (C)" for s in a.sets) + " | mean sel | mean test |")
    print("|---|" + "---|" * (len(a.sets) + 2))
    for n in names:
        cells = [f"{rows[n][s][0]:.3f} / {rows[n][s][1]:.3f} / {rows[n][s][2]:.3f} ({rows[n][s][3]:.3g})"
                 for s in a.sets]
        sel, test = np.mean([rows[n][s][0] for s in a.sets]), np.mean([rows[n][s][2] for s in a.sets])
        print(f"| {n} | " + " | ".join(cells) + f" | {sel:.4f} | {test:.4f} |")
        record(f"{n}: mean selection accuracy, {len(a.sets)} sets", float(sel), note=f"{a.outer} outer folds")
        record(f"{n}: mean test accuracy, {len(a.sets)} sets", float(test))
    if a.per_class:
        print(f"\nsmall data ({a.per_class} images per class, 3 seeds each), accuracy on the rest of the pool:\n")
        print("| variant | " + " | ".join(a.sets) + " | mean |\n|---|" + "---|" * (len(a.sets) + 1))
        for n in names:
            mean = np.mean([smalls[n][s] for s in a.sets])
            print(f"| {n} | " + " | ".join(f"{smalls[n][s]:.4f}" for s in a.sets) + f" | {mean:.4f} |")
            record(f"{n}: small data ({a.per_class} per class) accuracy, mean of {len(a.sets)} sets", float(mean))


if __name__ == "__main__":
    sys.exit(main())
