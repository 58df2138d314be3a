"""The benchmark harness: every bench script records its figures here, one row each.

A row of `bench/results/<bench>.csv` holds the figure's name, its value and unit, when and
on which commit it was measured, the versions and hardware it ran on, the command that
measured it and a short note. Rows are appended: a new measurement of a figure supersedes
the older one on the generated page (`python -m bench.report`), and the older row stays in
the file and in git. `--smoke` runs a bench on tiny generated data in seconds; its rows go
to a temporary folder (or `$VISIONTUNE_BENCH_RESULTS`), never into bench/results.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
FIELDS = ("figure", "value", "unit", "date", "commit", "versions", "hardware", "command", "note")
PACKAGES = ("visiontune", "torch", "timm", "onnxruntime")
SMOKE_MODEL = {"backbone": "timm:test_efficientnet", "weights": "none", "image_size": 32, "batch_size": 8,
               "num_workers": 0, "progress": False, "patience": 0}


def parser(doc: str | None) -> argparse.ArgumentParser:
    """An argument parser described by the script's docstring, with `--smoke`."""
    ap = argparse.ArgumentParser(description=(doc or "").strip().splitlines()[0] if doc else None,
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=doc)
    ap.add_argument("--smoke", action="store_true",
                    help="run on tiny generated data in seconds (CI); rows go to a temporary folder")
    return ap


def results_dir(smoke: bool) -> Path:
    """Where rows go: `$VISIONTUNE_BENCH_RESULTS` when set, a temporary folder under
    `--smoke`, else bench/results."""
    if os.environ.get("VISIONTUNE_BENCH_RESULTS"):
        return Path(os.environ["VISIONTUNE_BENCH_RESULTS"])
    return Path(tempfile.gettempdir()) / "visiontune-bench-smoke" if smoke else RESULTS


def commit() -> str:
    """The checkout's short commit, with `+dirty` when tracked files differ from it."""
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    return head + ("+dirty" if head and dirty else "")


def versions() -> str:
    """python and the installed versions of the packages a figure depends on."""
    found = [f"python {platform.python_version()}"]
    for name in PACKAGES:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pass
    return "; ".join(found)


FEATURES = {"avx512_vnni": "AVX-512 VNNI", "avx_vnni": "AVX-VNNI", "avx512_bf16": "AVX-512 BF16", "amx_tile": "AMX"}


def hardware() -> str:
    """`N CPU cores (MODEL, FEATURES), M GB; GPU`: the CPU model, the instruction sets that
    change figures (int8 and bf16 speed need VNNI, AVX-512 BF16 or AMX), memory, and the GPU
    when torch sees one (torch is not imported here). bench/report.py reads this form."""
    cpu, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            info = fh.read().splitlines()
        cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), cpu)
        flags = set(next((line.split(":", 1)[1].split() for line in info if line.startswith("flags")), []))
    except OSError:
        pass
    text = f"{os.cpu_count()} CPU cores ({', '.join([cpu, *(v for k, v in FEATURES.items() if k in flags)])})"
    try:
        text += f", {round(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30)} GB"
    except (AttributeError, ValueError, OSError):  # no sysconf on Windows
        pass
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        text += f"; {torch.cuda.get_device_name()}"
    return text


class Recorder:
    """Appends a bench's figures to `<results>/<bench>.csv`, each row with its provenance."""

    def __init__(self, bench: str, smoke: bool = False, argv: list[str] | None = None) -> None:
        self.bench, self.smoke = bench, smoke
        self.path = results_dir(smoke) / f"{bench}.csv"
        args = sys.argv[1:] if argv is None else argv
        self.command = " ".join(["python -m", f"bench.{bench}", *args])
        self.context = {"commit": commit(), "versions": versions()}

    def __call__(self, figure: str, value: float | int | str, unit: str = "", note: str = "") -> None:
        """Append one row: FIGURE = VALUE UNIT, measured now by this command."""
        row = {"figure": figure, "value": _rounded(value), "unit": unit, "date": time.strftime("%Y-%m-%d %H:%M"),
               "hardware": hardware(), "command": self.command, "note": note, **self.context}
        append_row(self.path, row)


def append_row(path: Path, row: dict) -> None:
    """Append ROW to the CSV at PATH (with the header when the file is new)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.is_file() or path.stat().st_size == 0
    with open(path, "a", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        writer.writerow({k: row.get(k, "") for k in FIELDS})


def read_rows(path: Path) -> list[dict]:
    """The rows of one results file, oldest first."""
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _rounded(value: float | int | str) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:.1f}"
    return str(value)


COLORS = ((220, 40, 40), (40, 200, 60), (40, 60, 220), (128, 128, 128))


def tiny_folders(root: Path, classes: int = 2, per_class: int = 8, side: int = 40, splits: tuple[str, ...] = (),
                 seed: int = 0) -> Path:
    """root/[split/]c<k>/<k>_<i>.jpg: noisy images whose colour gives the class, for --smoke."""
    rng = np.random.default_rng(seed)
    for split in splits or ("",):
        for k in range(classes):
            folder = root / split / f"c{k}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                arr = np.array(COLORS[k % len(COLORS)], dtype=np.float64) + rng.normal(0, 25, (side, side, 3))
                Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(folder / f"{k}_{i:03d}.jpg", quality=90)
    return root
