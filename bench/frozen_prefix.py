"""freeze-k on Lite0 at 224 px (half the layer groups frozen: stem and blocks 0-2): what
the frozen blocks' eager forward costs in a training step, and the same blocks in ONNX
Runtime (what runtime/prefix.py runs them in). 2 threads, batch 32, synthetic tensors.

    python -m bench.frozen_prefix [--smoke]

`--smoke`: the tiny model (timm's test_efficientnet, no weights), batch 2 at 64 px, one
timing each, on the caller's torch threads.

The end-to-end comparison is two `visiontune train DATA --strategy freeze-k --epochs 3
--engine auto|torch` runs, alternated (bench/RESULTS.md, issue 23).
"""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np
import torch

from bench.harness import Recorder, parser
from visiontune.config import ModelConfig
from visiontune.cpus import usable_cpus
from visiontune.models.classifier import backbone_groups, create_classifier
from visiontune.train.plan import set_train_modes


def per_batch(fn, repeats: int = 3) -> float:
    fn()
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - started) / repeats * 1000


def main(argv: list[str] | None = None) -> None:
    import onnxruntime as ort

    args = parser(__doc__).parse_args(argv)
    record = Recorder("frozen_prefix", args.smoke, argv)
    batch, side, rounds = (2, 64, 1) if args.smoke else (32, 224, 2)
    if not args.smoke:  # --smoke's tensors are tiny: the caller's threads (the suite's one), as the other smokes
        torch.set_num_threads(usable_cpus())
    cfg = ModelConfig(backbone="timm:test_efficientnet", weights="none") if args.smoke else ModelConfig()
    name = "test_efficientnet" if args.smoke else "Lite0"
    model, _ = create_classifier(cfg, 2)
    print("layer groups:", [n for n, _ in backbone_groups(model)])
    bb = model.backbone
    prefix = torch.nn.Sequential(bb.conv_stem, bb.bn1, *bb.blocks[:1 if args.smoke else 3])
    prefix.requires_grad_(False)
    model.train().to(memory_format=torch.channels_last)
    set_train_modes(model, "eval", "eval")
    x = torch.randn(batch, 3, side, side).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (batch,))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    def eager_prefix() -> None:
        with torch.no_grad():
            prefix(x)

    path = os.path.join(tempfile.mkdtemp(), "prefix.onnx")
    torch.onnx.export(prefix, x[:2].contiguous(), path, dynamo=True,
                      dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: np.ascontiguousarray(x.numpy())}
    for _ in range(rounds):  # alternated: this machine's speed drifts
        s, p = per_batch(step), per_batch(eager_prefix)
        o = per_batch(lambda: session.run(None, feed))
        print(f"freeze-k step {s:.0f} ms, frozen blocks' eager forward {p:.0f} ms ({p / s:.0%} of the step), "
              f"the same blocks in ONNX Runtime {o:.0f} ms ({p / o:.1f}x)")
    record("frozen blocks' eager forward / freeze-k step", p / s, "x", note=f"{name}, batch {batch}, {side} px")
    record("frozen blocks, eager / ONNX Runtime", p / o, "x", note=f"{name}, batch {batch}, {side} px")


if __name__ == "__main__":
    main()
