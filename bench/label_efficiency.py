"""Label efficiency (issue 25): `suggest`'s picks against random picks, with a simulated annotator.

    python -m bench.label_efficiency SUITE [--sets hymenoptera faces digits waves] [--seeds 3]
                                          [--budgets 1,2,5,10,20] [--plot bench/label_efficiency.png]
    python -m bench.label_efficiency --smoke   # a generated set, the tiny model, budgets 1,2; --scale 500

SUITE is bench/suite.py's folder (train/valid/test per set). The pool is each set's train and
valid images with their labels hidden; the test split is scored and never looked at by any
choice. Frozen features come from the suite's backbone (packaged Lite0 weights) through
visiontune's feature cache, so each set is extracted once.

For each seed the annotator starts from nothing and, round by round, labels what the
method asks for until the pool holds 1, 2, 5, 10, 20 labels per class on average
(budget x classes images in all):
- suggest: `selection/suggest.py` as the command runs it: auto (typical while the median
  class has fewer than 5 labels, then diverse: the probe's uncertainty, spread by
  k-means++), with the images labelled so far as `labelled`;
- random: the same number of images drawn at random from what is not labelled yet.
After each round the converged probe (frozen/probe.py, its own C search) is fitted on the
labelled images and scored on the test split (accuracy). The learner is the probe only:
gradual fine-tuning at every round would take hours on this CPU. With `--unlabeled`, each
method again with the rest of the pool as unlabelled images, fitted as `train --unlabeled`
fits the probe (train/pseudo.py: spread labels, the surest share chosen by CV on the
labelled images). `--select` chooses variants without the test split: the pool is the
train split and the score is the validation split's.

    python -m bench.label_efficiency --scale 100000

times the ranking alone on ROWS generated 1280-d features (100 Gaussian clusters; the
default backbone's width): typical with nothing labelled, typical with 1,000 labelled
images, and diverse with the probe fitted on those 1,000 (10 classes), 100 picks each.
"""

from __future__ import annotations

import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.harness import SMOKE_MODEL, Recorder, parser, tiny_folders
from visiontune.config import RunConfig
from visiontune.data.sources import load_items
from visiontune.frozen.features import FeatureExtractor
from visiontune.frozen.probe import fit_probe, probe_outputs
from visiontune.selection.suggest import auto_method, probe_members, rank
from visiontune.tasks.catalog import make_task
from visiontune.train.pseudo import with_pool
from visiontune.train.setup import prepare_run

METHODS = ["suggest", "random"]
SIZES = {"hymenoptera": 224, "faces": 128, "digits": 64, "waves": 64}


def features(root: Path, name: str, model: dict | None = None):
    """{split: (features, encoded targets)} of one suite set, and its task (`model`: RunConfig
    overrides for another backbone, as --smoke's tiny one)."""
    cfg = RunConfig.create(None, path=str(root / name), **{"image_size": SIZES.get(name, 32), "progress": False,
                                                           **(model or {})})
    source = load_items(cfg.data, cache_dir=cfg.runtime.cache_dir)
    setup = prepare_run(cfg, source)
    out = {}
    for split in ("train", "valid", "test"):
        items = [it for it in source.items if it.split == split]
        x = FeatureExtractor.for_run(cfg.model.backbone, setup.model.backbone, setup.preprocess,
                                     cfg).features([it.path for it in items])
        out[split] = (x, setup.task.encode([it.label for it in items]).numpy())
    return out, setup.task


def score(task, x, y, xt, yt, seed, pool=None) -> float:
    """Test accuracy (the task's score) of the probe fitted on the labelled rows; with
    `pool` (unlabelled features), as `train --unlabeled` fits it (train/pseudo.py)."""
    if len(np.unique(y)) < 2:  # one class seen: the probe can only say that class
        return float((yt == y[0]).mean())
    c = None
    if pool is not None:
        x, y, _, report = with_pool(x, y, pool, task, lambda a, b, c, g: fit_probe(a, b, task, seed=seed, c=c,
                                                                                   groups=g), seed)
        c = report.c
    fit = fit_probe(x, y, task, seed=seed, c=c)
    return float(task.metrics(yt, probe_outputs(fit, xt, task))[task.score_metric])


def next_round(method: str, pool: np.ndarray, labelled: list[int], y: np.ndarray, task, n: int,
               seed: int) -> tuple[list[int], str]:
    """The `n` pool rows to label next by `method` ("suggest": auto, as the command runs)."""
    free = np.setdiff1d(np.arange(len(pool)), labelled)
    if method == "random":
        return free[np.random.default_rng(seed + 1000 * len(labelled)).permutation(len(free))[:n]].tolist(), "random"
    counts = np.bincount(y[labelled], minlength=task.num_outputs) if labelled else None
    chosen, _ = auto_method(float(statistics.median(counts)) if labelled and len(np.unique(y[labelled])) > 1 else None)
    uncertainty = None
    if chosen == "diverse":
        uncertainty = task.uncertainty(probe_members(pool[labelled], y[labelled], task, pool[free], seed))
    picks, _, _ = rank(pool[free], n, chosen, uncertainty=uncertainty, labelled=pool[labelled], seed=seed)
    return free[picks].tolist(), chosen


def curve(data, task, method: str, budgets: list[int], seed: int, select: bool = False,
          unlabeled: bool = False) -> list[tuple[int, float, str]]:
    """Accuracy after each round. `select`: the pool is the train split and the score is the
    validation split's (how variants are chosen; the test split is not read)."""
    (xa, ya), (xb, yb) = data["train"], data["valid"]
    pool, y = (xa, ya) if select else (np.concatenate([xa, xb]), np.concatenate([ya, yb]))
    xt, yt = data["valid"] if select else data["test"]
    labelled: list[int] = []
    out = []
    for per_class in budgets:
        n = per_class * task.num_outputs - len(labelled)
        picks, chosen = next_round(method, pool, labelled, y, task, n, seed)
        labelled += picks
        rest = np.delete(pool, labelled, axis=0) if unlabeled else None
        out.append((per_class, score(task, pool[labelled], y[labelled], xt, yt, seed, rest), chosen))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__)
    ap.add_argument("suite", type=Path, nargs="?")
    ap.add_argument("--scale", type=int, metavar="ROWS", help="time the ranking of ROWS generated features instead")
    ap.add_argument("--sets", nargs="+", default=list(SIZES))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--budgets", default="1,2,5,10,20")
    ap.add_argument("--select", action="store_true", help="choose variants: pool = train split, scored on the "
                    "validation split (the test split is not read)")
    ap.add_argument("--unlabeled", action="store_true", help="also each method with the rest of the pool as "
                    "unlabelled images (train --unlabeled's pseudo-labels, train/pseudo.py)")
    ap.add_argument("--plot", type=Path, default=Path(__file__).with_name("label_efficiency.png"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    record, model = Recorder("label_efficiency", args.smoke, argv), None
    if args.smoke:  # a generated set of 3 classes, one seed, the tiny model; then a small --scale
        work = Path(tempfile.mkdtemp(prefix="vt-bench-labeleff-"))
        tiny_folders(work / "tiny", classes=3, per_class=6, splits=("train", "valid", "test"))
        args.suite, args.sets, args.seeds, args.budgets, args.plot = work, ["tiny"], 1, "1,2", work / "curve.png"
        model = dict(SMOKE_MODEL)
    elif args.scale:
        return scale(args.scale, record)
    elif args.suite is None:
        ap.error("SUITE is required (or --scale ROWS, or --smoke)")
    budgets = [int(b) for b in args.budgets.split(",")]
    methods = [*METHODS, *(["suggest+pool", "random+pool"] if args.unlabeled else [])]
    results = {}
    for name in args.sets:
        results.update(run_set(args, name, methods, budgets, model))
    table(results, args.sets, budgets, methods, record)
    plot(results, args.sets, budgets, args.plot, methods)
    if args.smoke:
        scale(500, record, dim=64, labelled=60, n=20)
    return 0


def run_set(args, name: str, methods: list[str], budgets: list[int], model: dict | None) -> dict:
    """{(set, method): accuracy per budget, one list per seed} of one suite set."""
    started = time.perf_counter()
    data, task = features(args.suite, name, model)
    results = {}
    for method in methods:
        runs = [curve(data, task, method.split("+")[0], budgets, seed, args.select, method.endswith("+pool"))
                for seed in range(args.seeds)]
        results[name, method] = [[acc for _, acc, _ in run] for run in runs]
        if method == "suggest":
            print(f"{name}: suggest's method by round: {[c for _, _, c in runs[0]]}")
    print(f"{name}: {len(data['train'][1]) + len(data['valid'][1])} pool images, {task.num_outputs} classes, "
          f"{len(data['test'][1])} test ({time.perf_counter() - started:.0f}s)", flush=True)
    return results


def scale(rows: int, record: Recorder, dim: int = 1280, labelled: int = 1000, n: int = 100) -> int:
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 1, (100, dim)).astype(np.float32)
    which = rng.integers(0, 100, rows + labelled)
    x = centres[which] + rng.normal(0, 0.7, (rows + labelled, dim)).astype(np.float32)
    pool, lab, y = x[:rows], x[rows:], which[rows:] % 10  # 10 classes of 10 clusters each
    task = make_task("single-label", [str(c) for c in range(10)])
    for what, run in (("typical, nothing labelled", lambda: rank(pool, n, "typical")),
                      (f"typical, {labelled} labelled", lambda: rank(pool, n, "typical", labelled=lab)),
                      (f"diverse, probe on {labelled} labelled", lambda: rank(
                          pool, n, "diverse", uncertainty=task.uncertainty(probe_members(lab, y, task, pool))))):
        started = time.perf_counter()
        run()
        seconds = time.perf_counter() - started
        print(f"| rank {rows:,} pool features: {what} | {seconds:.1f} s |", flush=True)
        record(f"rank {rows:,} pool features ({dim}-d), {n} picks: {what}", seconds, "s")
    return 0


def table(results, sets: list[str], budgets: list[int], methods: list[str], record: Recorder) -> None:
    print("\n| set | method | " + " | ".join(f"{b}/class" for b in budgets) + " |")
    print("|---|---|" + "---|" * len(budgets))
    for name in sets:
        for method in methods:
            runs = np.array(results[name, method])
            print(f"| {name} | {method} | " + " | ".join(f"{m:.3f} ± {s:.3f}" for m, s in
                                                         zip(runs.mean(0), runs.std(0))) + " |")
        gain = np.array(results[name, "suggest"]).mean(0) - np.array(results[name, "random"]).mean(0)
        print(f"| {name} | gain (points) | " + " | ".join(f"{100 * g:+.1f}" for g in gain) + " |")
    mean_gain = np.mean([np.array(results[s, "suggest"]).mean(0) - np.array(results[s, "random"]).mean(0)
                         for s in sets], axis=0)
    print("| **mean over sets** | gain (points) | " + " | ".join(f"**{100 * g:+.1f}**" for g in mean_gain) + " |")
    for budget, gain in zip(budgets, mean_gain):
        record(f"suggest - random, {budget} labels per class (mean of {len(sets)} sets x "
               f"{len(results[sets[0], 'suggest'])} seeds)", 100 * gain, "points of test accuracy")
    for method in (m for m in methods if m.endswith("+pool")):
        base = method.split("+")[0]
        gains = [np.array(results[s, method]).mean(0) - np.array(results[s, base]).mean(0) for s in sets]
        for name, gain in zip(sets, gains):
            print(f"| {name} | {method} over {base} (points) | " + " | ".join(f"{100 * g:+.1f}" for g in gain) + " |")


def plot(results, sets: list[str], budgets: list[int], path: Path, methods: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(sets), figsize=(3.2 * len(sets), 3), squeeze=False)
    for ax, name in zip(axes[0], sets):
        for method, style in zip(methods, ("o-", "s--", "^-", "v--")):
            runs = np.array(results[name, method])
            ax.errorbar(budgets, runs.mean(0), yerr=runs.std(0), fmt=style, capsize=2, label=method)
        ax.set_xscale("log")
        ax.set_xticks(budgets, [str(b) for b in budgets])
        ax.set_title(name)
        ax.set_xlabel("labels per class")
    axes[0][0].set_ylabel("test accuracy (probe)")
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


if __name__ == "__main__":
    sys.exit(main())
