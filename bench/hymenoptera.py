"""Real-data check of the core strategies on hymenoptera (ants vs bees), default backbone.

    python -m bench.hymenoptera [DATA] [--image-size 224] [--strategies feature-extract,gradual,scratch]
                                [--epochs N] [--freeze-epochs N] [--set KEY=VALUE ...] [--smoke]

Prints, per strategy: best validation accuracy, macro-F1, val loss, epochs run, wall time.
DATA defaults to ../shared/data/hymenoptera (a train/ + val/ class-folder tree).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path

import visiontune as vt
from bench.harness import SMOKE_MODEL, Recorder, parser, tiny_folders

EPOCHS = {"feature-extract": 10, "finetune": 6, "freeze-k": 6, "gradual": 6, "scratch": 6}


def main(argv: list[str] | None = None) -> None:
    default = Path(__file__).resolve().parents[2] / "shared" / "data" / "hymenoptera"
    ap = parser(__doc__)
    ap.add_argument("data", nargs="?", default=str(default))
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--strategies", default="feature-extract,gradual,scratch")
    ap.add_argument("--output", default="runs/bench-hymenoptera")
    ap.add_argument("--epochs", type=int, help="epochs for every strategy (default: per strategy)")
    ap.add_argument("--freeze-epochs", type=int, default=1, help="gradual: head-only epochs (1)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="any other RunConfig field for every strategy, e.g. --set unfreeze_lr_scale=0.2")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    record, model = Recorder("hymenoptera", args.smoke, argv), {}
    if args.smoke:  # tiny generated folders, a tiny model, one epoch each
        work = Path(tempfile.mkdtemp(prefix="vt-bench-hym-"))
        args.data, args.output, args.epochs = str(tiny_folders(work / "data", splits=("train", "val"))), str(work), 2
        model = dict(SMOKE_MODEL)
        args.image_size = model.pop("image_size")
    rows = []
    for strategy in args.strategies.split(","):
        started = time.perf_counter()
        extra = {"freeze_epochs": args.freeze_epochs} if strategy == "gradual" else {}
        extra.update(model)
        extra.update({k: _number(v) for k, v in (item.split("=", 1) for item in args.set)})
        r = vt.fit(args.data, strategy=strategy, epochs=args.epochs or EPOCHS[strategy], image_size=args.image_size,
                   output=args.output, seed=0, **{"progress": False, **extra})
        best = max(h.get("accuracy", 0.0) for h in r.history)
        rows.append((strategy, r.metrics["accuracy"], best, r.metrics["macro_f1"], r.metrics["val_loss"],
                     len(r.history), r.best_epoch, time.perf_counter() - started))
        record(f"{strategy}: validation accuracy (best checkpoint)", r.metrics["accuracy"],
               note=f"{args.image_size} px, {len(r.history)} epochs, {rows[-1][-1]:.1f} s")
    print(f"\nhymenoptera, tf_efficientnet_lite0 (packaged ImageNet weights), {args.image_size}px, "
          f"{os.cpu_count()} CPU cores")
    print(f"{'strategy':<16} {'acc(best ckpt)':>14} {'max acc':>8} {'macro_f1':>9} {'val_loss':>9} "
          f"{'epochs':>6} {'best':>5} {'wall s':>7}")
    for s, acc, best, f1, loss, n, be, secs in rows:
        print(f"{s:<16} {acc:>14.4f} {best:>8.4f} {f1:>9.4f} {loss:>9.4f} {n:>6} {be:>5} {secs:>7.1f}")


def _number(text: str) -> float | int | str:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


if __name__ == "__main__":
    main()
