"""Peak memory of predict on many images: the streamed CLI against the list-returning API.

    python -m bench.predict_memory RUN DATA [--engine onnx]
    python -m bench.predict_memory --smoke     # a tiny run trained here on tiny data, one thread

Each in a fresh process, RssAnon of /proc/PID/status sampled every 20 ms (anonymous memory:
what the process allocated, without the model file and libraries mapped from disk):
- stream: `visiontune predict RUN DATA --output P.csv` (rows printed and written as they come)
- list:   `vt.predict(RUN, DATA)` (every Prediction held, ~1.5 KB each)
Run it on the same run with a small and a large DATA (bench/scale.py makes both) to see
growth with the image count. Linux only (reads /proc).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.harness import SMOKE_MODEL, Recorder, parser, tiny_folders


def peak_anon_mb(cmd: list[str], env: dict | None = None) -> tuple[float, float]:
    """(peak anonymous RSS in MB, wall seconds) of CMD, sampled every 20 ms."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    peak = 0
    while proc.poll() is None:
        try:
            with open(f"/proc/{proc.pid}/status") as fh:
                for line in fh:
                    if line.startswith("RssAnon:"):
                        peak = max(peak, int(line.split()[1]))
        except OSError:
            pass
        time.sleep(0.02)
    if proc.returncode:
        sys.exit(f"{cmd[:4]} failed:\n{proc.stderr.read().decode()[-2000:]}")
    return peak / 1024, time.perf_counter() - started


def tiny_run(work: Path) -> tuple[str, str]:
    """--smoke: a feature-extract run of the tiny model on tiny generated folders."""
    import visiontune as vt

    data = tiny_folders(work / "data")
    run = vt.fit(str(data), strategy="feature-extract", epochs=1, output=str(work / "runs"), **SMOKE_MODEL)
    return str(run.run_dir), str(data)


def main(argv: list[str] | None = None) -> None:
    ap = parser(__doc__)
    ap.add_argument("run", nargs="?")
    ap.add_argument("data", nargs="?")
    ap.add_argument("--engine", default="onnx", choices=("auto", "onnx", "torch"))
    args = ap.parse_args(argv)
    record = Recorder("predict_memory", args.smoke, argv)
    if args.smoke:  # the torch engine: no export to wait for
        args.engine = "torch"
        args.run, args.data = tiny_run(Path(tempfile.mkdtemp(prefix="vt-bench-pm-")))
    elif not (args.run and args.data):
        ap.error("RUN and DATA are required (or --smoke)")
    env = {**os.environ, "OMP_NUM_THREADS": "1"} if args.smoke else None  # tiny tensors: threads only wait
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "p.csv"
        stream = peak_anon_mb([sys.executable, "-m", "visiontune", "predict", args.run, args.data,
                               "--engine", args.engine, "--output", str(out)], env)
        rows = sum(1 for _ in open(out)) - 1
    code = (f"import visiontune as vt; p, _ = vt.predict({args.run!r}, {args.data!r}, engine={args.engine!r}); "
            f"print(len(p))")
    listed = peak_anon_mb([sys.executable, "-c", code], env)
    print(f"{rows} images, engine {args.engine}")
    print(f"stream (CLI --output): peak anonymous {stream[0]:7.0f} MB, {stream[1]:6.1f} s")
    print(f"list (vt.predict):     peak anonymous {listed[0]:7.0f} MB, {listed[1]:6.1f} s")
    print(f"stream / list memory: {stream[0] / listed[0]:.2f}x")
    record(f"peak anonymous memory, streamed CLI predict, {rows} images", stream[0], "MB", note=f"engine {args.engine}")
    record(f"peak anonymous memory, vt.predict list, {rows} images", listed[0], "MB", note=f"engine {args.engine}")


if __name__ == "__main__":
    main()
