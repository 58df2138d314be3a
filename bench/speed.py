"""Overhead of visiontune over the raw model, on one machine, in one run.

    python bench/speed.py [--images 128] [--image-size 224] [--batch-size 32]

a. training img/s: `visiontune` fine-tuning (finetune, all parameters train, images decoded
   from JPEG files, augmentation on, no validation) vs a raw PyTorch step (forward,
   backward, AdamW step) on synthetic tensors of the same model, batch and size;
c. inference img/s: `visiontune.predict` over a folder vs raw `model(x)` on synthetic
   tensors; and ONNX Runtime vs eager on the same tensors.
Both sides use the same threads and channels_last. Prints the ratios.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import visiontune as vt
from visiontune.config import ModelConfig
from visiontune.models import create_classifier


def make_jpegs(root: Path, n: int, size: int = 400) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        cls = "a" if i % 2 else "b"
        (root / cls).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (size * 3 // 4, size, 3), dtype=np.uint8)).save(
            root / cls / f"{i:05d}.jpg", quality=90)
    return root


def raw_train(size: int, batch: int, steps: int) -> float:
    from visiontune.strategy import set_batchnorm_modes

    model, _ = create_classifier(ModelConfig(), 2)
    model.train().to(memory_format=torch.channels_last)
    set_batchnorm_modes(model, "eval", "eval")  # as visiontune fine-tunes pretrained weights (--trainable-bn auto)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (batch,))
    for i in range(steps + 1):
        if i == 1:
            started = time.perf_counter()  # first step warms up
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return steps * batch / (time.perf_counter() - started)


@torch.inference_mode()
def raw_infer(model: torch.nn.Module, size: int, batch: int, steps: int) -> float:
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    model(x)
    started = time.perf_counter()
    for _ in range(steps):
        model(x)
    return steps * batch / (time.perf_counter() - started)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    size, batch = args.image_size, args.batch_size
    work = Path(tempfile.mkdtemp(prefix="vt-speed-"))
    data = make_jpegs(work / "data", args.images)
    print(f"{os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}, {size}px, batch {batch}, "
          f"{args.images} JPEG images (400x300)")

    raw = raw_train(size, batch, steps=max(2, args.images // batch))
    r = vt.fit(data, strategy="finetune", epochs=2, image_size=size, batch_size=batch, valid_pct=0.0,
               progress=False, output=str(work / "runs"), patience=0)
    ours = args.images / r.history[-1]["seconds"]  # second epoch: warm
    print(f"a. training   visiontune {ours:6.1f} img/s   raw step {raw:6.1f} img/s   ratio {ours / raw:.3f}")

    bundle = vt.bundle.load_bundle(r.run_dir)
    raw_i = raw_infer(bundle.model, size, batch, steps=max(2, args.images // batch))
    vt.predict(r.run_dir, data, batch_size=batch)  # warm-up
    started = time.perf_counter()
    preds, _ = vt.predict(r.run_dir, data, batch_size=batch)
    ours_i = len(preds) / (time.perf_counter() - started)
    print(f"c. inference  predict    {ours_i:6.1f} img/s   raw model {raw_i:6.1f} img/s   ratio {ours_i / raw_i:.3f}")
    try:
        from visiontune.export import export, load_exported

        onnx = load_exported(export(r.run_dir, "onnx").path).model
        x = torch.randn(batch, 3, size, size)
        onnx(x)
        started = time.perf_counter()
        for _ in range(3):
            onnx(x)
        ort_i = 3 * batch / (time.perf_counter() - started)
        print(f"   ONNX Runtime {ort_i:6.1f} img/s   eager {raw_i:6.1f} img/s   ratio {ort_i / raw_i:.3f}")
    except vt.VisiontuneError as exc:
        print(f"   ONNX Runtime: skipped ({exc})")


if __name__ == "__main__":
    main()
