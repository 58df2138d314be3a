"""visiontune's frozen path (feature-extract, cached features) vs fastai's frozen training
(`learn.freeze(); learn.fit(...)`) on the same data, epochs, image size and backbone weights
(EfficientNet-Lite0, the packaged ImageNet weights, mean = std = 0.5).

    pip install fastai   # bench only; not a visiontune dependency
    python bench/fastai_frozen.py [DATA] [--epochs 10] [--image-size 224]

Prints both wall times (visiontune with a cold and a warm feature cache), their ratio and
both validation accuracies.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

import visiontune as vt
from visiontune.models import create_source_model


def run_fastai(data: str, epochs: int, size: int, lr: float, bs: int) -> tuple[float, float]:
    from fastai.vision.all import (
        CrossEntropyLossFlat,
        ImageDataLoaders,
        Learner,
        Normalize,
        Resize,
        accuracy,
        params,
    )

    started = time.perf_counter()
    dls = ImageDataLoaders.from_folder(data, train="train", valid="val", item_tfms=Resize(size), bs=bs,
                                       batch_tfms=Normalize.from_stats([0.5] * 3, [0.5] * 3), num_workers=0)
    body, width, _, _ = create_source_model("timm:tf_efficientnet_lite0", "pretrained")
    model = torch.nn.Sequential(body, torch.nn.Linear(width, dls.c))
    learn = Learner(dls, model, loss_func=CrossEntropyLossFlat(), metrics=accuracy,
                    splitter=lambda m: [params(m[0]), params(m[1])])
    learn.freeze()
    with learn.no_bar(), learn.no_logging():
        learn.fit(epochs, lr)
    acc = float(learn.validate()[1])
    return time.perf_counter() - started, acc


def run_visiontune(data: str, epochs: int, size: int, lr: float, bs: int) -> tuple[float, float]:
    started = time.perf_counter()
    r = vt.fit(data, strategy="feature-extract", epochs=epochs, image_size=size, lr=lr, batch_size=bs,
               patience=0, progress=False, warm_start=False,  # random head init, as fastai's
               output=os.path.join(tempfile.gettempdir(), "vt-bench-runs"))
    return time.perf_counter() - started, r.metrics["accuracy"]


def main() -> None:
    default = Path(__file__).resolve().parents[2] / "shared" / "data" / "hymenoptera"
    ap = argparse.ArgumentParser()
    ap.add_argument("data", nargs="?", default=str(default))
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    cache = tempfile.mkdtemp(prefix="vt-cache-")
    os.environ["VISIONTUNE_CACHE"] = cache
    try:
        common = (args.data, args.epochs, args.image_size, args.lr, args.batch_size)
        fa_s, fa_acc = run_fastai(*common)
        cold_s, cold_acc = run_visiontune(*common)
        warm_s, warm_acc = run_visiontune(*common)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    print(f"frozen backbone, {args.epochs} epochs, {args.image_size}px, lr {args.lr}, batch {args.batch_size}, "
          f"{os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}")
    print(f"fastai   learn.freeze(); learn.fit   {fa_s:7.1f} s   val accuracy {fa_acc:.4f}")
    print(f"visiontune feature-extract (cold)  {cold_s:7.1f} s   val accuracy {cold_acc:.4f}   "
          f"ratio {cold_s / fa_s:.3f}")
    print(f"visiontune feature-extract (warm)  {warm_s:7.1f} s   val accuracy {warm_acc:.4f}   "
          f"ratio {warm_s / fa_s:.3f}")


if __name__ == "__main__":
    main()
