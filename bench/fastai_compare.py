"""visiontune vs fastai on the same data, epochs, image size and backbone weights
(EfficientNet-Lite0, the packaged ImageNet weights, mean = std = 0.5), one machine, one run.

    pip install fastai   # bench only; not a visiontune dependency
    /usr/bin/time -v python -m bench.fastai_compare [DATA] --mode frozen [--epochs 10]
    /usr/bin/time -v python -m bench.fastai_compare [DATA] --mode fine_tune [--epochs 6]
    python -m bench.fastai_compare --smoke   # generated folders, the tiny model, both modes;
                                             # the fastai half is skipped (and said so) without fastai

frozen:    fastai `learn.freeze(); learn.fit(epochs, lr)` vs visiontune `feature-extract`
           (cached features) with a cold and a warm feature cache.
fine_tune: fastai `learn.fine_tune(epochs - 1, lr)` (1 frozen epoch, then epochs - 1
           unfrozen at half the LR, discriminative) vs visiontune `gradual` with `--epochs
           epochs` (the same 1 + (epochs - 1) split), with and without the head warm start.

Like is compared with like: both sides run every epoch and keep the last epoch's weights
(visiontune with restore_best off, no early stopping), and the headline is last epoch vs
last epoch. The best epoch of each side by validation accuracy is printed too, for both
alike, marked as chosen on the split it is measured on (optimistic for both). Prints wall
times, the ratio to fastai, and for fine_tune the time each visiontune run took to first
reach fastai's last-epoch accuracy (from the start of the call: model build, data scan and
feature pass included). Both heads start random unless the warm start says otherwise;
fastai keeps its defaults (BatchNorm trains). DATA defaults to ../shared/data/hymenoptera.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

import visiontune as vt
from bench.harness import SMOKE_MODEL, Recorder, parser, tiny_folders
from visiontune.models.backbones import create_source_model
from visiontune.train.callbacks import Callback

BACKBONE = ("timm:tf_efficientnet_lite0", "pretrained")  # fastai's body: visiontune's default backbone


def fastai_learner(folder: str | os.PathLike, valid: str, size: int, bs: int, cbs: tuple = (),
                   seed: int | None = None, backbone: tuple[str, str] = BACKBONE):
    """A fastai Learner on FOLDER/train and FOLDER/<valid>: the same packaged Lite0 body as
    visiontune's default, a linear head, Lite0's 0.5/0.5 normalisation, no workers. With SEED,
    fastai's `set_seed` first (head init, shuffling and augmentation repeat run to run)."""
    from fastai.vision.all import (
        CrossEntropyLossFlat,
        ImageDataLoaders,
        Learner,
        Normalize,
        Resize,
        accuracy,
        params,
        set_seed,
    )

    if seed is not None:
        set_seed(seed, reproducible=True)
    dls = ImageDataLoaders.from_folder(folder, train="train", valid=valid, item_tfms=Resize(size), bs=bs,
                                       batch_tfms=Normalize.from_stats([0.5] * 3, [0.5] * 3), num_workers=0,
                                       seed=seed)
    body, width, _, _ = create_source_model(*backbone)
    model = torch.nn.Sequential(body, torch.nn.Linear(width, dls.c))
    return Learner(dls, model, loss_func=CrossEntropyLossFlat(), metrics=accuracy,
                   splitter=lambda m: [params(m[0]), params(m[1])], cbs=list(cbs))


def run_fastai(data: str, mode: str, epochs: int, size: int, lr: float, bs: int, model: dict
               ) -> tuple[float, float, list]:
    """(wall s, final val accuracy, [(s since start, val accuracy) per epoch])."""
    from fastai.callback.core import Callback as FastaiCallback

    started = time.perf_counter()
    curve: list[tuple[float, float]] = []

    class FastaiClock(FastaiCallback):
        order = 100  # after the recorder has the epoch's metrics

        def after_epoch(self) -> None:
            curve.append((time.perf_counter() - started, float(self.recorder.values[-1][-1])))  # accuracy

    backbone = (model["backbone"], model["weights"]) if model else BACKBONE
    learn = fastai_learner(data, "val", size, bs, cbs=(FastaiClock(),), backbone=backbone)
    with learn.no_bar(), learn.no_logging():
        if mode == "frozen":
            learn.freeze()
            learn.fit(epochs, lr)
        else:
            learn.fine_tune(epochs - 1, lr, freeze_epochs=1)
    acc = float(learn.validate()[1])
    return time.perf_counter() - started, acc, curve[:epochs]  # validate() ends an "epoch" too


class Clock(Callback):
    """visiontune callback: (s since start, val accuracy) at each epoch's end."""

    def __init__(self, started: float) -> None:
        self.started, self.curve = started, []

    def on_epoch_end(self, trainer) -> None:
        self.curve.append((time.perf_counter() - self.started, trainer.state.metrics.get("accuracy", float("nan"))))


def run_visiontune(data: str, mode: str, epochs: int, size: int, lr: float, bs: int, model: dict,
                   warm_start: bool) -> tuple[float, float, list]:
    started = time.perf_counter()
    clock = Clock(started)
    strategy = "feature-extract" if mode == "frozen" else "gradual"
    options = {"image_size": size, "batch_size": bs, "patience": 0, "progress": False, **model}
    r = vt.fit(data, strategy=strategy, epochs=epochs, lr=lr, restore_best=False, warm_start=warm_start,
               callbacks=[clock], output=os.path.join(tempfile.gettempdir(), "vt-bench-runs"), **options)
    return time.perf_counter() - started, r.metrics["accuracy"], clock.curve  # the last epoch's


def best_of(curve: list[tuple[float, float]]) -> str:
    k = max(range(len(curve)), key=lambda i: curve[i][1])
    return f"{curve[k][1]:.4f} (epoch {k + 1})"


def first_reaching(curve: list[tuple[float, float]], target: float) -> str:
    for k, (s, acc) in enumerate(curve):
        if acc >= target - 1e-9:
            return f"{s:6.1f} s (epoch {k + 1}, acc {acc:.4f})"
    return "never"


def compare(args, mode: str, epochs: int, model: dict, record: Recorder) -> None:
    """One mode: fastai (when installed) and the visiontune runs, printed and recorded."""
    cache = tempfile.mkdtemp(prefix="vt-cache-")
    os.environ["VISIONTUNE_CACHE"] = cache
    common = (args.data, mode, epochs, args.image_size, args.lr, args.batch_size, model)
    fastai = None
    try:
        if importlib.util.find_spec("fastai") is not None:
            fastai = run_fastai(*common)
        if mode == "frozen":  # random heads on both sides; the second run finds the cache warm
            runs = {"feature-extract (cold cache)": run_visiontune(*common, warm_start=False),
                    "feature-extract (warm cache)": run_visiontune(*common, warm_start=False)}
        else:  # each run starts from an empty cache
            runs = {"gradual (defaults: warm start)": run_visiontune(*common, warm_start=True)}
            shutil.rmtree(cache, ignore_errors=True)
            runs["gradual --no-warm-start"] = run_visiontune(*common, warm_start=False)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    print(f"{mode}, {epochs} epochs, {args.image_size}px, lr {args.lr}, batch {args.batch_size}, "
          f"{os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}, {time.strftime('%Y-%m-%d %H:%M')}")
    report(mode, epochs, fastai, runs, record)


def report(mode: str, epochs: int, fastai: tuple | None, runs: dict, record: Recorder) -> None:
    what = "learn.freeze(); learn.fit" if mode == "frozen" else f"learn.fine_tune({epochs - 1}, freeze_epochs=1)"
    print("val accuracy: last epoch vs last epoch; 'best' = best epoch chosen on that same split, both sides")
    if fastai is None:
        print("fastai is not installed: the fastai half was SKIPPED (pip install fastai); visiontune's runs only")
    else:
        fa_s, fa_acc, fa_curve = fastai
        print(f"fastai {what:<34} {fa_s:7.1f} s   last {fa_acc:.4f}   best {best_of(fa_curve)}   per epoch: "
              + ", ".join(f"{a:.3f}@{s:.0f}s" for s, a in fa_curve))
        record(f"{mode}: fastai {what}, final val accuracy", fa_acc, note=f"{epochs} epochs, {fa_s:.1f} s")
    for name, (s, acc, curve) in runs.items():
        line = f"visiontune {name:<32} {s:7.1f} s   last {acc:.4f}   best {best_of(curve)}"
        note = f"{epochs} epochs, {s:.1f} s"
        if fastai is not None:
            line += f"   ratio {s / fastai[0]:.3f}"
            record(f"{mode}: visiontune {name} / fastai wall time", s / fastai[0], "x")
            if mode == "fine_tune":
                line += f"   reaches fastai's {fastai[1]:.4f} at {first_reaching(curve, fastai[1])}"
                note += f"; reaches fastai's accuracy at {first_reaching(curve, fastai[1])}"
        record(f"{mode}: visiontune {name}, final val accuracy", acc, note=note)
        print(line + "   per epoch: " + ", ".join(f"{a:.3f}@{s:.0f}s" for s, a in curve))


def main(argv: list[str] | None = None) -> int:
    default = Path(__file__).resolve().parents[2] / "shared" / "data" / "hymenoptera"
    ap = parser(__doc__)
    ap.add_argument("data", nargs="?", default=str(default))
    ap.add_argument("--mode", choices=("frozen", "fine_tune"), default="frozen")
    ap.add_argument("--epochs", type=int, help="total epochs (frozen: 10, fine_tune: 6 = 1 frozen + 5)")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    record, model, modes = Recorder("fastai_compare", args.smoke, argv), {}, [args.mode]
    if args.smoke:  # generated train/ val/ folders, the tiny model, 2 epochs of each mode
        work = Path(tempfile.mkdtemp(prefix="vt-bench-fastai-"))
        args.data, args.epochs, modes = str(tiny_folders(work / "data", splits=("train", "val"))), 2, ["frozen",
                                                                                                      "fine_tune"]
        model = {k: SMOKE_MODEL[k] for k in ("backbone", "weights", "num_workers")}
        args.image_size, args.batch_size = SMOKE_MODEL["image_size"], SMOKE_MODEL["batch_size"]
    for mode in modes:
        compare(args, mode, args.epochs or (10 if mode == "frozen" else 6), model, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
