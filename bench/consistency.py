"""FixMatch's consistency term (issue 25): gradual with and without `--unlabeled`, few labels.

    python -m bench.consistency SUITE [--sets hymenoptera faces] [--per-class 5] [--seeds 0 1]
                                      [--epochs 5] [--threshold 0.95] [--ablate] [--select]
    python -m bench.consistency --smoke   # a generated 2-class set, the tiny model, 2 epochs

SUITE is bench/suite.py's folder. For each set and seed, `--per-class` training images per
class are drawn at random (seeded) and labelled; the set's validation split stays labelled
(early stopping and the best epoch; the same for both arms); the rest of the training
split is the pool. Two runs of `visiontune train --strategy gradual` (as `vt.fit`, in this
process): without the pool, and with `--unlabeled SET/train` (the labelled images are left out of the
pool by the run itself), so the frozen phase gets label spreading and the fine-tuning phase
the consistency term. `--ablate` adds two controls: the pool with
`--consistency-threshold 1` (no pool image passes: label spreading in the frozen phase and
the pool-long epochs, without the term), and the labels alone for as many optimizer steps
as the pool's epochs take (with the pool an epoch cycles the labelled images along the
whole pool, so it has more labelled steps). `visiontune evaluate RUN SET/test` (`vt.evaluate`)
scores each; the test split is never looked at by any choice. Prints one row per run and the
differences, and records each arm's accuracy and its difference to the labels alone.

`--select` is the protocol for choosing (the threshold, whether to use the term): the
validation split is neither labelled nor in the pool, each run validates on a fifth of
its own labelled images (`--valid-pct 0.2`), and the score is the suite's validation
split; the test split is not read.
"""

from __future__ import annotations

import csv
import random
import sys
import tempfile
import time
from pathlib import Path

import visiontune as vt
from bench.harness import SMOKE_MODEL, Recorder, parser, tiny_folders

SIZES = {"hymenoptera": 224, "faces": 128, "digits": 64, "waves": 64}


def labelled_csv(root: Path, per_class: int, seed: int, out: Path, with_valid: bool = True) -> Path:
    """path,label,split: `per_class` random training images per class, and every valid image
    (`with_valid`; else no split column: the run splits its own labelled images)."""
    rng = random.Random(seed)
    rows = []
    for folder in sorted(p for p in (root / "train").iterdir() if p.is_dir()):
        files = sorted(str(f) for f in folder.iterdir() if f.is_file())
        rows += [(f, folder.name, "train") for f in rng.sample(files, min(per_class, len(files)))]
    for folder in sorted(p for p in (root / "valid").iterdir() if p.is_dir() and with_valid):
        rows += [(str(f), folder.name, "valid") for f in sorted(folder.iterdir()) if f.is_file()]
    with open(out, "w", newline="") as fh:
        csv.writer(fh).writerows([("path", "label", "split") if with_valid else ("path", "label"),
                                  *(r if with_valid else r[:2] for r in rows)])
    return out


def _same_steps(root: Path, per_class: int, epochs: int, batch: int = 32) -> int:
    """gradual's epochs (one probe epoch, then fine-tuning) for the labelled images alone to
    take as many fine-tuning steps as with the pool (whose epochs are pool-long)."""
    classes = [p for p in (root / "train").iterdir() if p.is_dir()]
    labelled = sum(min(per_class, len(list(c.iterdir()))) for c in classes)
    pool = sum(len(list(c.iterdir())) for c in classes) - labelled
    return 1 + (epochs - 1) * -(-pool // batch) // -(-labelled // batch)


def run(root: Path, table: Path, out: Path, tag: str, options: dict) -> float:
    """One `train --strategy gradual` run (vt.fit); its wall seconds."""
    started = time.perf_counter()
    vt.fit(root, csv=str(table), strategy="gradual", output=str(out), name=tag, **{"progress": False, **options})
    return time.perf_counter() - started


def test_accuracy(run_dir: Path, test: Path) -> float:
    return float(vt.evaluate(run_dir, test).metrics["accuracy"])


def arms(root: Path, args) -> dict[str, dict]:
    """The runs to compare: their vt.fit options beyond the common ones."""
    pool = {"unlabeled": str(root / "train")}
    out = {"labels only": {}, "with the pool": {**pool, "consistency_threshold": args.threshold}}
    if args.ablate:
        out["pool, no term"] = {**pool, "consistency_threshold": 1.0}
        out["labels, same steps"] = {"epochs": _same_steps(root, args.per_class, args.epochs)}
    return out


def compare(name: str, seed: int, args, record: Recorder, model: dict) -> None:
    """Each arm on one set and seed, scored on the test split (the validation split with --select)."""
    root = args.suite / name
    table = labelled_csv(root, args.per_class, seed, args.work / f"{name}-{seed}.csv", not args.select)
    scored = root / ("valid" if args.select else "test")
    scores = {}
    for n, (arm, extra) in enumerate(arms(root, args).items()):
        tag = f"{name}-{seed}-{n}"
        options = {"epochs": args.epochs, "image_size": SIZES.get(name, 32), "seed": seed, **model, **extra}
        seconds = run(root, table, args.work / "runs", tag, options)
        scores[arm] = test_accuracy(args.work / "runs" / tag, scored)
        print(f"{name:12s} seed {seed}  {arm:14s} {scored.name} accuracy {scores[arm]:.4f}  ({seconds:.0f} s)",
              flush=True)
        record(f"{arm}, {name}, seed {seed}, {args.per_class} labels per class", scores[arm],
               note=f"{scored.name} accuracy; gradual x{args.epochs}, threshold {args.threshold}, {seconds:.0f} s")
    base = scores["labels only"]
    for arm, v in scores.items():
        if arm != "labels only":
            record(f"{arm} - labels only, {name}, seed {seed}", 100 * (v - base), f"points of {scored.name} accuracy")
    print(f"{name:12s} seed {seed}  " + ", ".join(f"{arm} - labels only: {100 * (v - base):+.1f}"
                                                  for arm, v in scores.items() if arm != "labels only")
          + " points", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__)
    ap.add_argument("suite", type=Path, nargs="?")
    ap.add_argument("--work", type=Path, default=Path("/tmp/consistency"))
    ap.add_argument("--sets", nargs="+", default=["hymenoptera", "faces"])
    ap.add_argument("--per-class", type=int, default=5)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--threshold", type=float, default=0.95)
    ap.add_argument("--ablate", action="store_true", help="also the pool without the consistency term")
    ap.add_argument("--select", action="store_true", help="score on the validation split, which no run sees")
    args = ap.parse_args(argv)
    record, model = Recorder("consistency", args.smoke, argv), {}
    if args.smoke:  # one generated set (train/valid/test), 3 labels per class, the tiny model
        args.work = Path(tempfile.mkdtemp(prefix="vt-bench-consistency-"))
        args.suite, args.sets, args.per_class, args.epochs = args.work / "suite", ["tiny"], 3, 2
        tiny_folders(args.suite / "tiny", per_class=8, splits=("train", "valid", "test"))
        model = dict(SMOKE_MODEL)
    elif args.suite is None:
        ap.error("SUITE is required (or --smoke)")
    args.work.mkdir(parents=True, exist_ok=True)
    print(f"{time.strftime('%Y-%m-%d %H:%M')}  gradual, {args.epochs} epochs, {args.per_class} labels per class, "
          f"threshold {args.threshold}", flush=True)
    for name in args.sets:
        for seed in args.seeds:
            compare(name, seed, args, record, model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
