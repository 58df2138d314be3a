"""Calibration and prediction sets on the suite's real sets (issue 36): each set's test
split, never used for any choice, scored by a model trained on its train split, calibrated
and given its sets on its valid split.

    python -m bench.suite prepare OUT                 # the sets, once (bench/suite.py)
    python -m bench.uncertainty OUT [--recipe gradual] [--only NAME ...]
    python -m bench.uncertainty --smoke               # a generated set, the tiny model

Per set: ECE (15 bins) and NLL on test before and after calibration; at coverage 0.90 and
0.95 the empirical test coverage, the mean set size and the selective accuracy (accuracy
where the set is one class) with the share of such images. Targets (the issue): ECE after
<= 0.03 on every set; coverage within 2 points of the target on every set with at least
200 test images (fewer: the coverage of a few dozen images moves by several points by
chance, and the row says so).
"""

from __future__ import annotations

import logging
import sys
import tempfile
from pathlib import Path

import visiontune as vt
from bench.harness import SMOKE_MODEL, Recorder, parser, tiny_folders
from bench.suite import RECIPES, SETS

COVERAGES = (0.9, 0.95)
TARGET_ECE = 0.03
ENOUGH_TEST = 200  # images: below, a coverage within 2 points is not expected by chance alone


def measure(data: Path, name: str, recipe: str, out: Path, record: Recorder, model: dict | None = None) -> None:
    """Train `recipe` on `data`'s train/valid, then score its test split (figures -> `record`)."""
    size = SETS.get(name, 32)
    run = vt.fit(data, seed=0, output=str(out / "runs" / name), name=f"{recipe}-uncertainty",
                 **{"image_size": size, "batch_size": 32, "progress": False, **RECIPES[recipe], **(model or {})})
    first = vt.evaluate(run.run_dir, data)
    m = first.metrics
    n = len(first.paths)
    small = "" if n >= ENOUGH_TEST else f" (test: {n} images, under {ENOUGH_TEST})"
    record(f"{name} {recipe}: test ECE before calibration", round(m.get("ece_uncalibrated", m["ece"]), 4))
    record(f"{name} {recipe}: test ECE after calibration", round(m["ece"], 4),
           note=f"target <= {TARGET_ECE}: {'met' if m['ece'] <= TARGET_ECE else 'missed'}")
    record(f"{name} {recipe}: test NLL before / after", f"{m.get('nll_uncalibrated', m['nll']):.4f} / {m['nll']:.4f}")
    for coverage in COVERAGES:
        c = vt.evaluate(run.run_dir, data, coverage=coverage).metrics
        within = abs(c["coverage"] - coverage) <= 0.02
        record(f"{name} {recipe}: test coverage at {coverage}", round(c["coverage"], 4),
               note=f"within 2 points: {'yes' if within else 'no'}{small}")
        record(f"{name} {recipe}: mean set size at {coverage}", round(c["mean_set_size"], 3))
        record(f"{name} {recipe}: selective accuracy / share single at {coverage}",
               f"{c['selective_accuracy']:.4f} / {c['single_share']:.3f}")


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__)
    ap.add_argument("out", nargs="?", help="a folder prepared by `python -m bench.suite prepare OUT`")
    ap.add_argument("--recipe", default="fe-probe", choices=list(RECIPES))
    ap.add_argument("--only", nargs="+", choices=list(SETS))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    record = Recorder("uncertainty", args.smoke, argv)
    if args.smoke:
        out = Path(tempfile.mkdtemp(prefix="vt-bench-uncertainty-"))
        tiny_folders(out / "tiny", classes=3, per_class=12, splits=("train", "valid", "test"))
        measure(out / "tiny", "tiny", "fe-probe", out, record, {**SMOKE_MODEL, "epochs": 1})
        return 0
    if args.out is None:
        ap.error("OUT is required (or --smoke)")
    out = Path(args.out)
    for name in args.only or list(SETS):
        measure(out / name, name, args.recipe, out, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
