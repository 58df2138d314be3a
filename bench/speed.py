"""Overhead of visiontune over the raw model, on one machine, in one run.

    /usr/bin/time -v python -m bench.speed [--smoke] [--images 256] [--image-size 224] [--batch-size 32]
        [--workers auto,0,2] [--repeats 2] [--large 32] [--compile] [--bf16] [--int8-run RUN]
        [--compile-modes default,max-autotune-no-cudagraphs]

a. training img/s: `visiontune` fine-tuning (finetune: every parameter trains; images
   decoded from JPEG files, augmentation on, no validation) vs a raw PyTorch step (forward,
   backward, AdamW step) on synthetic tensors of the same model, batch and size. "loop" is
   the mean of the epochs after the first (what an epoch costs), "command" divides all
   images of all epochs by the whole `fit` call (model build, data scan, run files, first
   epoch included). Raw and visiontune alternate `--repeats` times; the median is kept,
   because this machine's speed drifts by +-20% over minutes.
   `--workers` lists DataLoader worker settings to compare ("auto" = the default).
   `--compile` adds a run with `compile=True` (torch.compile) and a raw compiled step;
   `--bf16` times the raw step under bf16 autocast against fp32 (2 steps each);
   `--compile-modes` times the raw step compiled in each torch.compile mode against eager.
c. inference img/s: `visiontune.predict` (--engine onnx, and --engine torch) over the folder vs raw `model(x)` on synthetic
   tensors (the call after a warm-up call; loading the run is included, and also
   reported alone);
   ONNX Runtime vs eager on the same tensors.
d. `--large N`: N generated 4000x3000 JPEGs (phone-photo size), one epoch with the
   decoded-image cache off, then epochs with it on (first fills it, second reads it).
e. int8 (`export --int8`): eager PyTorch vs ONNX Runtime fp32 vs ONNX Runtime int8 on the
   same tensors (img/s, the median of `--repeats`), the files' sizes, and the validation
   score of fp32 and int8 as export reports it. `--int8-run RUN` uses a trained run (real
   images: the score means something); else a feature-extract run on the generated JPEGs.
Both sides use the same threads, channels_last and fixed BatchNorm statistics. Section a
also reports the step's FLOP rate (the model's FLOPs per training image, counted by
torch.utils.flop_counter, x img/s) as a fraction of this CPU's fp32 matrix-product rate.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import visiontune as vt
from bench.harness import Recorder, parser
from visiontune.config import ModelConfig
from visiontune.models.classifier import create_classifier


def make_jpegs(root: Path, n: int, width: int = 400, height: int = 300, seed: int = 0, flat: bool = False) -> Path:
    """Photo-like JPEGs (smooth colour fields plus noise), two classes (`flat`: one folder
    with no classes, an unlabelled pool)."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        cls = "" if flat else "a" if i % 2 else "b"
        (root / cls).mkdir(parents=True, exist_ok=True)
        coarse = Image.fromarray(rng.integers(0, 255, (height // 50 + 1, width // 50 + 1, 3), dtype=np.uint8))
        arr = np.asarray(coarse.resize((width, height), Image.BICUBIC)).astype(np.int16)
        arr = np.clip(arr + rng.integers(-20, 20, arr.shape), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(root / cls / f"{i:05d}.jpg", quality=90)
    return root


def raw_model(compiled: bool | str = False) -> torch.nn.Module:
    """Lite0 as visiontune fine-tunes it; `compiled`: torch.compile'd (a string: its mode)."""
    from visiontune.train.plan import set_train_modes

    model, _ = create_classifier(ModelConfig(), 2)
    model.train().to(memory_format=torch.channels_last)
    set_train_modes(model, "eval", "eval")  # as visiontune fine-tunes pretrained weights (--trainable-bn auto)
    if not compiled:
        return model
    return torch.compile(model, mode=compiled) if isinstance(compiled, str) else torch.compile(model)


def raw_train(size: int, batch: int, images: int, compiled: bool | str = False, bf16: bool = False) -> float:
    model = raw_model(compiled)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    steps = max(2, images // batch)
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (batch,))
    for i in range(steps + 1):
        if i == 1:
            started = time.perf_counter()  # first step warms up (and compiles)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return steps * batch / (time.perf_counter() - started)


def train_flops_per_image(size: int) -> float:
    """FLOPs of one training image through the raw model: 3x its forward (forward, and a
    backward of about twice the forward), counted by torch.utils.flop_counter."""
    from torch.utils.flop_counter import FlopCounterMode

    model = raw_model().eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(2, 3, size, size))
    return 3 * counter.get_total_flops() / 2


def matmul_flops(n: int = 2048, repeats: int = 5) -> float:
    """This CPU's fp32 matrix-product rate (FLOP/s), the practical peak a step is measured against."""
    a = torch.randn(n, n)
    a @ a
    started = time.perf_counter()
    for _ in range(repeats):
        a @ a
    return repeats * 2 * n ** 3 / (time.perf_counter() - started)


def vt_train(data: Path, out: Path, size: int, batch: int, images: int, epochs: int, **opts) -> tuple[float, float]:
    """(loop img/s over the epochs after the first, whole-command img/s)."""
    started = time.perf_counter()
    r = vt.fit(data, strategy="finetune", epochs=epochs, image_size=size, batch_size=batch, valid_pct=0.0,
               progress=False, output=str(out), patience=0, **opts)
    whole = images * epochs / (time.perf_counter() - started)
    loop = images / statistics.mean(row["seconds"] for row in r.history[1:])
    return loop, whole


@torch.inference_mode()
def raw_infer(model: torch.nn.Module, size: int, batch: int, images: int) -> float:
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    model(x)
    steps = max(2, images // batch)
    started = time.perf_counter()
    for _ in range(steps):
        model(x)
    return steps * batch / (time.perf_counter() - started)


def median(values: list[float]) -> float:
    return statistics.median(values)


def section_training(args: argparse.Namespace, data: Path, work: Path) -> None:
    size, batch, n = args.image_size, args.batch_size, args.images
    raws: list[float] = []
    ours: dict[str, list[tuple[float, float]]] = {w: [] for w in args.workers.split(",")}
    for _ in range(args.repeats):
        raws.append(raw_train(size, batch, n))
        for w in ours:
            opts = {} if w == "auto" else {"num_workers": int(w)}
            ours[w].append(vt_train(data, work / "runs", size, batch, n, args.epochs, **opts))
    raw = median(raws)
    flops, peak = train_flops_per_image(size), matmul_flops()
    print(f"a. training: raw step {raw:6.1f} img/s (runs: {', '.join(f'{v:.1f}' for v in raws)}); "
          f"{flops / 1e9:.2f} GFLOP per training image: {raw * flops / 1e9:.1f} GFLOP/s, "
          f"{raw * flops / peak:.1%} of this CPU's fp32 matrix-product rate ({peak / 1e9:.0f} GFLOP/s)", flush=True)
    for w, runs in ours.items():
        loop, whole = median([r[0] for r in runs]), median([r[1] for r in runs])
        print(f"   visiontune workers={w:<4} loop {loop:6.1f} img/s  ratio {loop / raw:.3f}   "
              f"command {whole:6.1f} img/s  ratio {whole / raw:.3f}   "
              f"({loop * flops / peak:.1%} of the matrix-product rate)", flush=True)
        args.record(f"fine-tuning loop / raw step, img/s, workers={w}", loop / raw, "x",
                    note=f"Lite0, {size} px, batch {batch}, {n} JPEGs, median of {args.repeats}")
    if args.bf16:
        fp32, bf16 = raw_train(size, batch, 2 * batch), raw_train(size, batch, 2 * batch, bf16=True)
        print(f"   precision: raw step fp32 {fp32:6.1f} img/s   bf16 autocast {bf16:6.1f} img/s   "
              f"ratio {bf16 / fp32:.3f}", flush=True)
    for mode in filter(None, args.compile_modes.split(",")):  # the raw step only, against eager just before it
        eager = raw_train(size, batch, n)
        started = time.perf_counter()
        compiled = raw_train(size, batch, n, compiled=mode)
        print(f"   torch.compile mode={mode}: raw step {compiled:6.1f} img/s against eager {eager:6.1f} "
              f"({compiled / eager:.3f}x; {time.perf_counter() - started:.0f} s with compiling)", flush=True)
    if args.compile:
        started = time.perf_counter()
        raw_c = raw_train(size, batch, n, compiled=True)
        raw_c_s = time.perf_counter() - started
        started = time.perf_counter()
        loop, whole = vt_train(data, work / "runs", size, batch, n, args.epochs, compile=True)
        print(f"   compiled: raw step {raw_c:6.1f} img/s ({raw_c / raw:.3f}x eager; {raw_c_s:.0f} s with compiling)   "
              f"visiontune loop {loop:6.1f} img/s  ratio {loop / raw_c:.3f} to compiled raw, {loop / raw:.3f} to "
              f"eager raw ({time.perf_counter() - started:.0f} s for {args.epochs} epochs with compiling)", flush=True)


def section_inference(args: argparse.Namespace, data: Path, work: Path) -> str:
    size, batch, n = args.image_size, args.batch_size, args.images
    r = vt.fit(data, strategy="feature-extract", epochs=1, image_size=size, valid_pct=0.0, progress=False,
               output=str(work / "runs"), patience=0)
    bundle = vt.bundle.load_bundle(r.run_dir)
    bundle.model.to(memory_format=torch.channels_last)
    lines = []
    raws, ours, loads, torch_engine = [], [], [], []
    for _ in range(args.repeats):
        raws.append(raw_infer(bundle.model, size, batch, n))
        vt.predict(r.run_dir, data, batch_size=batch, engine="onnx")  # warm-up: page cache; exports model.onnx once
        started = time.perf_counter()
        preds, _ = vt.predict(r.run_dir, data, batch_size=batch, engine="onnx")
        ours.append(len(preds) / (time.perf_counter() - started))
        started = time.perf_counter()
        preds, _ = vt.predict(r.run_dir, data, batch_size=batch, engine="torch")
        torch_engine.append(len(preds) / (time.perf_counter() - started))
        started = time.perf_counter()
        vt.bundle.load_bundle(r.run_dir)
        loads.append(time.perf_counter() - started)
    raw_i, ours_i, load_s = median(raws), median(ours), median(loads)
    pipe_i = n / (n / ours_i - load_s)
    lines.append(f"c. inference: predict {ours_i:6.1f} img/s   raw model {raw_i:6.1f} img/s   ratio {ours_i / raw_i:.3f}"
                 f"   (runs: predict {', '.join(f'{v:.1f}' for v in ours)}; raw {', '.join(f'{v:.1f}' for v in raws)})")
    lines.append(f"   (predict --engine onnx = ONNX Runtime, model.onnx exported by the warm-up call; "
                 f"--engine torch {median(torch_engine):6.1f} img/s, ratio {median(torch_engine) / raw_i:.3f})")
    lines.append(f"   of which loading the run {load_s:.2f} s; predict without it {pipe_i:6.1f} img/s   "
                 f"ratio {pipe_i / raw_i:.3f}")
    try:
        from visiontune.deploy.export import export, load_exported

        onnx = load_exported(export(r.run_dir, "onnx").path).model
        x = torch.randn(batch, 3, size, size)
        onnx(x)
        steps = max(2, n // batch)
        started = time.perf_counter()
        for _ in range(steps):
            onnx(x)
        ort_i = steps * batch / (time.perf_counter() - started)
        lines.append(f"   ONNX Runtime {ort_i:6.1f} img/s   eager {raw_i:6.1f} img/s   ratio {ort_i / raw_i:.3f}")
        exported = export(r.run_dir, "onnx").path
        started = time.perf_counter()
        preds, _ = vt.predict(exported, data, batch_size=batch)
        lines.append(f"   predict with the .onnx file {len(preds) / (time.perf_counter() - started):6.1f} img/s")
    except vt.VisiontuneError as exc:
        lines.append(f"   ONNX Runtime: skipped ({exc})")
    return "\n".join(lines)


def _loop(model: torch.nn.Module, x: torch.Tensor, images: int) -> float:
    model(x)
    steps = max(2, images // len(x))
    started = time.perf_counter()
    for _ in range(steps):
        model(x)
    return steps * len(x) / (time.perf_counter() - started)


def section_int8(args: argparse.Namespace, data: Path, work: Path) -> str:
    from visiontune.deploy.export import load_exported
    from visiontune.deploy.quantize import export_int8

    run = args.int8_run or vt.fit(data, strategy="feature-extract", epochs=1, image_size=args.image_size,
                                  valid_pct=0.25, progress=False, output=str(work / "runs"), patience=0).run_dir
    result = export_int8(run, "onnx", output=str(work / "int8" / "model.onnx"), max_drop=100.0)
    q = result.int8
    bundle = vt.bundle.load_bundle(run)
    bundle.model.to(memory_format=torch.channels_last)
    size = bundle.preprocess.input_size
    fp32, int8 = load_exported(result.path).model, load_exported(q.path).model
    x = torch.randn(args.batch_size, 3, size, size)
    eager, f, i = [], [], []
    with torch.inference_mode():
        for _ in range(args.repeats):
            eager.append(_loop(bundle.model, x.contiguous(memory_format=torch.channels_last), args.images))
            f.append(_loop(fp32, x, args.images))
            i.append(_loop(int8, x, args.images))
    e_i, f_i, i_i = median(eager), median(f), median(i)
    note = f"{q.method}, {size} px, batch {args.batch_size}, median of {args.repeats}"
    args.record("int8 ONNX Runtime / fp32 ONNX Runtime, img/s", i_i / f_i, "x", note=note)
    args.record("int8 ONNX Runtime / eager PyTorch, img/s", i_i / e_i, "x", note=note)
    args.record("int8 file size / fp32 file size", q.sizes["int8"] / q.sizes["fp32"], "x", note=note)
    return "\n".join([
        f"e. int8 ({q.method}, {size}px, batch {args.batch_size}): eager {e_i:6.1f} img/s   ONNX fp32 {f_i:6.1f} img/s "
        f"({f_i / e_i:.2f}x eager)   ONNX int8 {i_i:6.1f} img/s ({i_i / f_i:.2f}x fp32, {i_i / e_i:.2f}x eager)",
        f"   size: fp32 {q.sizes['fp32'] / 1e6:.1f} MB, int8 {q.sizes['int8'] / 1e6:.1f} MB "
        f"({q.sizes['int8'] / q.sizes['fp32']:.2f}x)   run: {run}",
        *[f"   {line}" for line in q.lines()[:-1]]])


def section_large(args: argparse.Namespace, work: Path) -> str:
    data = make_jpegs(work / "large", args.large, 4000, 3000)
    mb = sum(p.stat().st_size for p in data.rglob("*.jpg")) / 1e6
    size, batch = args.image_size, args.batch_size
    common = {"strategy": "finetune", "image_size": size, "batch_size": batch, "valid_pct": 0.0, "progress": False,
              "output": str(work / "runs"), "patience": 0}
    off = vt.fit(data, epochs=2, image_cache=False, **common)
    on = vt.fit(data, epochs=3, image_cache=True, **common)
    s_off = statistics.mean(row["seconds"] for row in off.history)
    cold, warm = on.history[0]["seconds"], statistics.mean(row["seconds"] for row in on.history[1:])
    return (f"d. {args.large} JPEGs of 4000x3000 ({mb:.0f} MB): epoch without the image cache {s_off:6.1f} s "
            f"({args.large / s_off:.1f} img/s); with it: first epoch {cold:6.1f} s, later epochs {warm:6.1f} s "
            f"({args.large / warm:.1f} img/s), {s_off / warm:.2f}x faster")


def main(argv: list[str] | None = None) -> None:
    ap = parser(__doc__)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--workers", default="auto", help="comma-separated DataLoader worker settings to compare")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--large", type=int, default=0, help="also time N 4000x3000 JPEGs with and without the image cache")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile")
    ap.add_argument("--bf16", action="store_true", help="also time the raw step under bf16 autocast")
    ap.add_argument("--compile-modes", default="", help="comma-separated torch.compile modes whose raw step to time "
                                                        "against eager, e.g. default,max-autotune-no-cudagraphs")
    ap.add_argument("--int8-run", help="section e on this trained run (default: one on the generated JPEGs)")
    ap.add_argument("--skip", default="", help="comma-separated sections to skip: a,c,e")
    args = ap.parse_args(argv)
    if args.smoke:  # section a on 8 JPEGs at 32 px, one repeat
        args.images, args.image_size, args.batch_size, args.epochs, args.repeats = 8, 32, 4, 2, 1
        args.skip, args.workers, args.large = "c,e", "0", 0
    args.record = Recorder("speed", args.smoke, argv)
    logging.basicConfig(level=logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="vt-speed-"))
    os.environ.setdefault("VISIONTUNE_CACHE", str(work / "cache"))
    data = make_jpegs(work / "data", args.images)
    print(f"{os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}, {args.image_size}px, "
          f"batch {args.batch_size}, {args.images} JPEG images (400x300), {time.strftime('%Y-%m-%d %H:%M')}", flush=True)
    skip = set(args.skip.split(","))
    if "a" not in skip:
        section_training(args, data, work)
    if "c" not in skip:
        print(section_inference(args, data, work), flush=True)
    if args.large:
        print(section_large(args, work), flush=True)
    if "e" not in skip:
        print(section_int8(args, data, work), flush=True)


if __name__ == "__main__":
    main()
