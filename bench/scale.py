"""How cost grows with data: generated 64 px JPEGs at 1k / 10k / 100k images.

    python -m bench.scale run WORK --sizes 1000,10000    # each size in a fresh process -> WORK/scale.jsonl
    python -m bench.scale run WORK --sizes 100000        # the large point, separately (~15 min on 2 cores)
    python -m bench.scale table WORK                     # markdown table + WORK/scale.png (cost vs size)
    python -m bench.scale --smoke                        # 40 images in this process, the tiny model

Per size (10 classes of coloured, textured images; default backbone with its packaged
Lite0 weights, batch 64, caches under WORK/<size>/cache, nothing shared between sizes):
- scan cold / cached: `data.scan.scan` over every file (decode + digest, parallel), then
  again with the scan cache warm;
- features: a feature-extract run with a cold feature cache minus the same run with it
  warm (= extracting and storing every image's features);
- fe 5 epochs: that warm run (scan cached, features cached, 5 SGD epochs on the head;
  --probe sgd, the literal "5-epoch" run) and the converged probe (the default);
- fine-tune 1 epoch: on a fixed 2k-image subset (constant work: per-epoch overhead must
  not depend on the size of the data set around it);
- predict: every image through `visiontune.predict` (engine auto: ONNX Runtime, exported
  once);
- peak RSS of the process (its own; scan worker processes are separate), also as peak
  anonymous memory (RssAnon, sampled: without the file-backed pages of memory-mapped
  features, which the kernel may drop), and the files the caches and runs created.

Targets (issue 15): time per image at 100k <= 1.2x the 1k figure for every stage, RSS
growth <= 10%, cached re-scan >= 20x faster than cold. Each size's ms per image of every
stage and its peak anonymous memory are recorded.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from bench.harness import ROOT, SMOKE_MODEL, Recorder, parser

CLASSES = 10
FINETUNE_SUBSET = 2000


def make_images(root: Path, n: int, seed: int = 0) -> list[str]:
    """n JPEGs of 64x64 in CLASSES folders: class hue + random texture + a random bar."""
    rng = np.random.default_rng(seed)
    hues = np.linspace(0, 255, CLASSES, endpoint=False)
    paths = []
    for k in range(CLASSES):
        (root / f"c{k}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        k = i % CLASSES
        base = np.array([hues[k], 255 - hues[k], (hues[k] * 3) % 255])
        img = np.clip(base + rng.normal(0, 40, (64, 64, 3)), 0, 255)
        r = rng.integers(0, 48)
        img[r:r + 16, :, k % 3] = 255 - img[r:r + 16, :, k % 3]
        path = root / f"c{k}" / f"{i:07d}.jpg"
        Image.fromarray(img.astype(np.uint8)).save(path, quality=90)
        paths.append(str(path))
    return paths


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class AnonPeak:
    """Peak anonymous memory (RssAnon: heap, tensors), sampled every 20 ms. ru_maxrss also
    counts file-backed pages mapped and touched (the memory-mapped feature matrix, shard
    reads), which the kernel can drop at any time; anonymous memory is what must fit."""

    def __init__(self) -> None:
        self.peak = self.now()
        self.stopped = threading.Event()
        threading.Thread(target=self._watch, daemon=True).start()

    def stop(self) -> None:
        self.stopped.set()

    @staticmethod
    def now() -> float:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) / 1024
        return 0.0

    def _watch(self) -> None:
        while not self.stopped.wait(0.02):
            self.peak = max(self.peak, self.now())


def count_files(*dirs: Path) -> int:
    return sum(len(files) for d in dirs if d.exists() for _, _, files in os.walk(d))


def measure(work: Path, n: int, model: dict | None = None, engine: str = "auto") -> dict:
    """All stages for one size, in this (fresh) process (`model`: RunConfig overrides for
    another backbone than the default, as --smoke's tiny one; `engine`: predict's)."""
    import visiontune as vt  # after the baseline RSS of a fresh process: imported here on purpose
    from visiontune.data.scan import scan, scan_cache

    base = work / str(n)
    shutil.rmtree(base, ignore_errors=True)
    data, cache, runs = base / "data", base / "cache", base / "runs"
    started = time.perf_counter()
    paths = make_images(data, n)
    row: dict = {"images": n, "generate_s": time.perf_counter() - started, "date": time.strftime("%Y-%m-%d %H:%M"),
                 "cpus": os.cpu_count()}
    rss0 = peak_rss_mb()
    anon = AnonPeak()

    def timed(name: str, fn):
        t = time.perf_counter()
        out = fn()
        row[f"{name}_s"] = time.perf_counter() - t
        row[f"{name}_rss_mb"], row[f"{name}_anon_mb"] = peak_rss_mb(), anon.peak
        print(f"{n:>7} {name:<16} {row[f'{name}_s']:8.2f} s  peak RSS {row[f'{name}_rss_mb']:6.0f} MB, "
              f"anonymous {anon.peak:6.0f} MB", flush=True)
        return out

    timed("scan_cold", lambda: scan(paths, scan_cache(cache)))
    timed("scan_cached", lambda: scan(paths, scan_cache(cache)))
    common = {"image_size": 64, "batch_size": 64, "valid_pct": 0.1, "progress": False, "patience": 0,
              "cache_dir": str(cache), "output": str(runs), "seed": 0, **(model or {})}
    fe = {"strategy": "feature-extract", "epochs": 5, "probe": "sgd", **common}
    timed("fe_cold", lambda: vt.fit(data, **fe))
    result = timed("fe_5_epochs", lambda: vt.fit(data, **fe))
    row["features_s"] = row["fe_cold_s"] - row["fe_5_epochs_s"]
    row["fe_valid_accuracy"] = result.history[-1].get("val_accuracy")
    timed("probe", lambda: vt.fit(data, **{**fe, "probe": "converged"}))
    subset = base / "subset"
    for p in paths[:FINETUNE_SUBSET]:
        target = subset / Path(p).parent.name / Path(p).name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(p)
    timed("finetune_1_epoch", lambda: vt.fit(subset, **{**common, "strategy": "finetune", "epochs": 1,
                                                         "valid_pct": 0.0}))
    preds, _ = timed("predict", lambda: vt.predict(result.run_dir, data, batch_size=64, engine=engine))
    assert len(preds) == n
    anon.stop()
    row.update(rss_before_mb=rss0, peak_rss_mb=peak_rss_mb(), peak_anon_mb=anon.peak,
               files_created=count_files(cache, runs),
               cache_files=count_files(cache))
    return row


STAGES = [("scan_cold", "scan, cold"), ("scan_cached", "scan, cached"), ("features", "features"),
          ("fe_5_epochs", "fe 5 epochs"), ("probe", "fe + converged probe"),
          ("finetune_1_epoch", "fine-tune 1 epoch (2k)"), ("predict", "predict")]


def per_image(row: dict, stage: str) -> float:
    count = FINETUNE_SUBSET if stage == "finetune_1_epoch" else row["images"]
    return 1000 * row[f"{stage}_s"] / min(count, row["images"])


def table(work: Path) -> str:
    rows = {}
    for line in (work / "scale.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows[row["images"]] = row  # the latest measurement of each size
    sizes = sorted(rows)
    first, last = rows[sizes[0]], rows[sizes[-1]]
    head = "| stage (ms per image) | " + " | ".join(f"{s:,}" for s in sizes) + f" | {sizes[-1]:,} / {sizes[0]:,} |"
    out = [head, "|" + "---|" * (len(sizes) + 2)]
    for stage, name in STAGES:
        cells = [f"{per_image(rows[s], stage):.3f}" for s in sizes]
        out.append(f"| {name} | " + " | ".join(cells) + f" | {per_image(last, stage) / per_image(first, stage):.2f}x |")
    out.append("| peak RSS (MB) | " + " | ".join(f"{rows[s]['peak_rss_mb']:.0f}" for s in sizes)
               + f" | {last['peak_rss_mb'] / first['peak_rss_mb']:.2f}x |")
    if all("peak_anon_mb" in rows[s] for s in sizes):
        out.append("| peak anonymous RSS (MB) | " + " | ".join(f"{rows[s]['peak_anon_mb']:.0f}" for s in sizes)
                   + f" | {last['peak_anon_mb'] / first['peak_anon_mb']:.2f}x |")
    out.append("| files created (caches + runs) | " + " | ".join(str(rows[s]["files_created"]) for s in sizes) + " | |")
    out.append("| cached re-scan speed-up | " + " | ".join(
        f"{rows[s]['scan_cold_s'] / rows[s]['scan_cached_s']:.0f}x" for s in sizes) + " | |")
    plot(rows, sizes, work / "scale.png")
    return "\n".join(out)


def plot(rows: dict, sizes: list[int], path: Path) -> None:
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    for stage, name in STAGES:
        ax.plot(sizes, [rows[s][f"{stage}_s"] for s in sizes], marker="o", label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("images")
    ax.set_ylabel("seconds")
    ax.set_title("visiontune cost against data size (64 px, 2 CPU cores)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def record_row(record: Recorder, row: dict) -> None:
    """One size's ms per image of each stage, and its peak anonymous memory."""
    n = row["images"]
    for stage, name in STAGES:
        record(f"{name}, {n:,} images", per_image(row, stage), "ms per image", note=f"{row[f'{stage}_s']:.2f} s")
    record(f"peak anonymous memory, {n:,} images", row["peak_anon_mb"], "MB")


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__)
    ap.add_argument("command", nargs="?", choices=("run", "measure", "table"))
    ap.add_argument("work", type=Path, nargs="?")
    ap.add_argument("--sizes", default="1000,10000")
    args = ap.parse_args(argv)
    record = Recorder("scale", args.smoke, argv)
    if args.smoke:  # 40 images in this process, the tiny model, predict on the torch engine
        work = Path(tempfile.mkdtemp(prefix="vt-bench-scale-"))
        model = {k: SMOKE_MODEL[k] for k in ("backbone", "weights", "image_size", "batch_size", "num_workers")}
        row = measure(work, 40, model, engine="torch")
        with open(work / "scale.jsonl", "a") as fh:
            fh.write(json.dumps(row) + "\n")
        print(table(work))
        record_row(record, row)
        return 0
    if args.command is None or args.work is None:
        ap.error("COMMAND and WORK are required (or --smoke)")
    args.work.mkdir(parents=True, exist_ok=True)
    if args.command == "measure":  # one size, in a child process
        row = measure(args.work, int(args.sizes))
        with open(args.work / "scale.jsonl", "a") as fh:
            fh.write(json.dumps(row) + "\n")
        record_row(record, row)
    elif args.command == "run":
        for size in args.sizes.split(","):
            subprocess.run([sys.executable, "-m", "bench.scale", "measure", str(args.work), "--sizes", size],
                           check=True, cwd=ROOT)
    else:
        print(table(args.work))
    return 0


if __name__ == "__main__":
    sys.exit(main())
