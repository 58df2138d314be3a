"""The frozen path (features + converged probe) cold and warm, by engine (issue 23).

    python -m bench.frozen WORK [--images 1000] [--image-size 224] [--repeats 1]
    python -m bench.frozen --smoke    # 8 JPEGs at 32 px, the tiny model, the cold and warm runs only

N photo-like 400x300 JPEGs (bench/speed.py's, two classes), `feature-extract` at the
backbone's 224 px, each run a fresh process (`visiontune -q train`), timed whole:
0. with `--before SRC`: the package of an older source tree, cold caches (the reference);
1. `--engine torch`, cold caches: the frozen path without ONNX Runtime;
2. `--engine auto`, cold caches and no export yet: ONNX Runtime, the backbone exported on
   the way (once per weights, into the cache);
3. `--engine auto`, cold feature cache, the export already there (what every later data
   set with this backbone pays);
4. an unchanged re-run of 3 (features and probe remembered).
Also the backbone's own speed on the same tensors: eager vs the ONNX Runtime session
(batch 64, after a warm-up), and the export's time; OpenVINO on the same export when it
is installed (`--engines-only`: this part alone).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.harness import Recorder, parser
from bench.speed import make_jpegs

SMOKE = ("--backbone", "timm:test_efficientnet", "--weights", "none", "--num-workers", "0")  # the tiny model


def run(data: Path, out: Path, cache: Path, engine: str | None, size: int, src: str | None = None,
        extra: tuple[str, ...] = ()) -> float:
    """Seconds of one `visiontune -q train` (`engine` None: the flag left out; `src`: the
    package from that source tree, e.g. a worktree of an older commit; `extra`: more flags)."""
    env = {**os.environ, "VISIONTUNE_CACHE": str(cache), "VISIONTUNE_OFFLINE": "1",
           **({"PYTHONPATH": src} if src else {})}
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "visiontune", "-q", "train", str(data), "--strategy", "feature-extract",
                    "--image-size", str(size), *(["--engine", engine] if engine else []), "--output", str(out),
                    "--valid-pct", "0.2", *extra], check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def engine_speed(size: int, cache: Path) -> tuple[float, float, float, dict[str, tuple[float, float]] | None]:
    """(eager img/s, ONNX Runtime img/s, export seconds, OpenVINO's {precision: (img/s, max
    |difference| to eager / the features' scale)} or None when it is not installed) of
    Lite0's backbone."""
    import torch

    from visiontune.config import ModelConfig
    from visiontune.models.classifier import create_classifier
    from visiontune.runtime.engine import frozen_engine

    model, _ = create_classifier(ModelConfig(), 2)
    backbone = model.backbone.eval().to(memory_format=torch.channels_last)
    started = time.perf_counter()
    session = frozen_engine(backbone, size, torch.device("cpu"), "onnx", cache)
    export_s = time.perf_counter() - started
    x = torch.randn(64, 3, size, size).contiguous(memory_format=torch.channels_last)
    nets = [backbone, session]
    try:  # OpenVINO on the same export, when installed (issue 23: adopt it only if it is worth a dependency)
        import numpy as np
        import openvino

        [onnx_file] = (cache / "engines").glob("*.onnx")
        for precision in ("f32", None):  # None: its default (bf16 on a CPU that has it)
            compiled = openvino.Core().compile_model(str(onnx_file), "CPU", {"PERFORMANCE_HINT": "LATENCY", **(
                {"INFERENCE_PRECISION_HINT": precision} if precision else {})})
            nets.append(lambda t, c=compiled: torch.from_numpy(c(np.ascontiguousarray(t.numpy()))[0]))
    except ImportError:
        pass
    rates, outputs = [], []
    with torch.inference_mode():
        for net in nets:
            outputs.append(net(x).float())
            started = time.perf_counter()
            for _ in range(3):
                net(x)
            rates.append(3 * 64 / (time.perf_counter() - started))
    openvino_rates = None
    if len(rates) > 2:
        scale = float(outputs[0].abs().max())
        openvino_rates = {f"OpenVINO {name}": (rate, float((out - outputs[0]).abs().max()) / scale)
                          for name, rate, out in zip(("f32", "default precision"), rates[2:], outputs[2:])}
    return rates[0], rates[1], export_s, openvino_rates


def _openvino(rates: dict[str, tuple[float, float]] | None, eager: float) -> str:
    if not rates:
        return "; OpenVINO not installed"
    return "".join(f"; {name} {rate:.1f} img/s ({rate / eager:.2f}x, features off by {diff:.1e} of their scale)"
                   for name, (rate, diff) in rates.items())


def main(argv: list[str] | None = None) -> None:
    ap = parser(__doc__)
    ap.add_argument("work", type=Path, nargs="?")
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--engines-only", action="store_true", help="only the backbone's speed by engine")
    ap.add_argument("--before", help="also time a cold run of the package in this source tree (an older commit's "
                                     "src/, e.g. from `git worktree add`): the reference the ratios divide")
    a = ap.parse_args(argv)
    record = Recorder("frozen", a.smoke, argv)
    if a.smoke:
        a.work, a.images, a.image_size = Path(tempfile.mkdtemp(prefix="vt-bench-frozen-")), 8, 32
    elif a.work is None:
        ap.error("WORK is required (or --smoke)")
    size = a.image_size
    if a.engines_only:
        eager, ort, export_s, ov = engine_speed(size, a.work / "engine-speed")
        print(f"backbone alone, batch 64: eager {eager:.1f} img/s, ONNX Runtime {ort:.1f} img/s ({ort / eager:.2f}x)"
              + _openvino(ov, eager))
        return
    data = a.work / "data"
    if not data.is_dir():
        make_jpegs(data, a.images)
    print(f"{a.images} JPEGs of 400x300, feature-extract at {size} px, {os.cpu_count()} CPUs, "
          f"{time.strftime('%Y-%m-%d %H:%M')}", flush=True)
    rows = []
    if a.before:
        shutil.rmtree(a.work / "cache-before", ignore_errors=True)
        rows.append(("before (older source), cold", run(data, a.work / "runs", a.work / "cache-before", None, size,
                                                        a.before)))
        print(f"  {rows[-1][0]:40s} {rows[-1][1]:7.1f} s", flush=True)
    runs = (("torch, cold", "torch", False), ("auto, cold, export on the way", "auto", False),
            ("auto, cold features, export cached", "auto", True))
    for name, engine, keep_export in runs[:1] if a.smoke else runs:
        cache = a.work / "cache"
        if keep_export and (cache / "engines").is_dir():
            shutil.move(str(cache / "engines"), str(a.work / "engines.keep"))
        shutil.rmtree(cache, ignore_errors=True)
        if keep_export:
            cache.mkdir()
            shutil.move(str(a.work / "engines.keep"), str(cache / "engines"))
        rows.append((name, run(data, a.work / "runs", cache, engine, size, extra=SMOKE if a.smoke else ())))
        print(f"  {name:40s} {rows[-1][1]:7.1f} s", flush=True)
    rows.append(("unchanged re-run", run(data, a.work / "runs", a.work / "cache", "auto", size,
                                         extra=SMOKE if a.smoke else ())))
    print(f"  {'unchanged re-run':40s} {rows[-1][1]:7.1f} s", flush=True)
    for name, seconds in rows:
        record(f"feature-extract command, {a.images} JPEGs at {size} px: {name}", seconds, "s")
    if a.smoke:
        return
    eager, ort, export_s, ov = engine_speed(size, a.work / "engine-speed")
    base = rows[0][1]
    print(f"\n| run | seconds | {rows[0][0]} / this |\n|---|---|---|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.1f} | {base / seconds:.2f}x |")
    print(f"\nbackbone alone, batch 64: eager {eager:.1f} img/s, ONNX Runtime {ort:.1f} img/s ({ort / eager:.2f}x); "
          f"export + check {export_s:.1f} s" + _openvino(ov, eager))


if __name__ == "__main__":
    main()
