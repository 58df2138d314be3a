"""Peak memory as the data set grows: the same run on 1k and 20k generated images.

    /usr/bin/time -v python -m bench.memory [--sizes 1000,20000] [--image-size 64]
    python -m bench.memory --smoke    # 20 images at 32 px, the tiny model, on one thread

Each size runs in a fresh process: `gradual` with 2 epochs on the default Lite0 (epoch 1:
head on cached features, which stream into a memory-mapped matrix; epoch 2: the whole
model on images streamed through the DataLoader), 20% validation. Printed per size: peak
RSS of the process (VmHWM), the RSS after importing torch, timm and visiontune, the peaks
of anonymous and of file-backed RSS (sampled every 20 ms; mapped feature pages are
file-backed: the kernel may drop them), the size the feature matrices would take in RAM,
and the wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from bench.harness import ROOT, SMOKE_MODEL, Recorder, parser


def status(key: str) -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def make_images(root: Path, n: int, classes: int = 10, side: int = 96) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        c = i % classes
        folder = root / f"class{c}"
        folder.mkdir(parents=True, exist_ok=True)
        base = np.array([(c * 37) % 256, (c * 91) % 256, (c * 53) % 256], dtype=np.int16)
        arr = np.clip(base + rng.integers(-60, 60, (side, side, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(folder / f"{i:06d}.jpg", quality=85)
    return root


def child(data: str, size: int, out: str, model: dict) -> None:
    import threading

    import timm  # noqa: F401 - imported before the baseline is taken
    import torch  # noqa: F401

    import visiontune as vt
    import visiontune.api  # noqa: F401

    baseline = status("VmRSS")
    peaks = {"RssAnon": 0, "RssFile": 0}
    stop = threading.Event()

    def sample() -> None:  # the peak of each kind of RSS, every 20 ms
        while not stop.wait(0.02):
            for key in peaks:
                peaks[key] = max(peaks[key], status(key))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    r = vt.fit(data, strategy="gradual", epochs=2, output=out, **{"image_size": size, "progress": False, "patience": 0,
                                                                   **model})
    stop.set()
    sampler.join()
    n = sum(1 for _ in Path(data).rglob("*.jpg"))
    print(json.dumps({"images": n, "seconds": time.perf_counter() - started, "peak": status("VmHWM"),
                      "baseline": baseline, "anon": peaks["RssAnon"], "file": peaks["RssFile"],
                      "features_bytes": n * 1280 * 4, "accuracy": r.metrics.get("accuracy")}))


def main(argv: list[str] | None = None) -> None:
    ap = parser(__doc__)
    ap.add_argument("--sizes", default="1000,20000")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # --smoke's child: the tiny model
    args = ap.parse_args(argv)
    if args.smoke:
        args.sizes, args.image_size = "20", 32
    record = Recorder("memory", args.smoke, argv)
    if args.child:
        child(args.child, args.image_size, tempfile.mkdtemp(prefix="vt-mem-runs-"), SMOKE_MODEL if args.tiny else {})
        return
    work = Path(tempfile.mkdtemp(prefix="vt-mem-"))
    env = {**os.environ, "VISIONTUNE_CACHE": str(work / "cache"), **({"OMP_NUM_THREADS": "1"} if args.smoke else {})}
    mib = 2**20
    print(f"{os.cpu_count()} CPU cores, Lite0 at {args.image_size}px, gradual 2 epochs, {time.strftime('%Y-%m-%d %H:%M')}")
    print("images  peak RSS  after imports  growth  peak RssAnon  peak RssFile  features in RAM would be  wall s  acc")
    for n in (int(s) for s in args.sizes.split(",")):
        data = make_images(work / f"data{n}", n)
        proc = subprocess.run([sys.executable, "-m", "bench.memory", "--child", str(data), "--image-size",
                               str(args.image_size), *(["--tiny"] if args.smoke else [])], env=env, capture_output=True, text=True, check=False, cwd=ROOT)
        if proc.returncode:
            print(proc.stderr[-3000:])
            raise SystemExit(proc.returncode)
        m = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{m['images']:6d}  {m['peak'] / mib:6.0f} MiB  {m['baseline'] / mib:9.0f} MiB  "
              f"{(m['peak'] - m['baseline']) / mib:5.0f} MiB  {m['anon'] / mib:8.0f} MiB  {m['file'] / mib:8.0f} MiB  "
              f"{m['features_bytes'] / mib:20.0f} MiB  {m['seconds']:6.1f}  {m['accuracy']:.3f}", flush=True)
        note = f"Lite0 at {args.image_size} px, gradual 2 epochs, {m['seconds']:.1f} s"
        record(f"peak RSS, {n} images", m["peak"] / mib, "MiB", note=note)
        record(f"peak anonymous RSS, {n} images", m["anon"] / mib, "MiB", note=note)


if __name__ == "__main__":
    main()
