"""Load test of `visiontune serve` on localhost (bounded: it stops by itself).

    python -m bench.serve_load [--run RUN] [--clients 16] [--requests 10] [--rounds 2] [--coverage 0.9]
    python -m bench.serve_load --smoke    # a tiny run on tiny data, 2 clients x 2 requests, 1 round

Starts `visiontune serve RUN` in a subprocess (default RUN: a feature-extract Lite0 run at
224 px trained here on scikit-image's faces / non-faces), then `--clients` concurrent
clients each POST `--requests` real JPEG photos to /api/predict while a probe GETs the page
every 100 ms. Prints POST latency p50/p99, throughput, the page's worst latency during the
load, and every status code seen (no error and no 500 expected).

Each variant is served in turn, `--rounds` times alternating (plain, set, no-ood, plain, ...),
so a machine whose load drifts weighs on all alike: "plain" answers as serve does by default
(with the run's out-of-distribution score when its model has a bank: models/novelty.py),
"set" with `--coverage` (each answer's prediction set), "no-ood" from a copy of the run whose
model has no bank (no score, no "unknown"). The ratios set / plain and plain / no-ood of
throughput and p99 are measured in the same run (the issue's target: the OOD score costs
under 10% of an answer's time).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from PIL import Image

from bench.harness import SMOKE_MODEL, Recorder, parser, tiny_folders


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _default_run(work: Path) -> str:
    import visiontune as vt
    from visiontune.demo import write_lfw_subset

    data = write_lfw_subset(work / "lfw")
    return vt.fit(data, strategy="feature-extract", output=str(work / "runs"), progress=False).run_dir


def _photo() -> bytes:
    from skimage import data

    buf = io.BytesIO()
    Image.fromarray(data.chelsea()).save(buf, format="JPEG", quality=90)  # a 451 x 300 photo
    return buf.getvalue()


async def _client(client: httpx.AsyncClient, url: str, photo: bytes, n: int, out: list[tuple[float, int]]) -> None:
    for _ in range(n):
        started = time.perf_counter()
        r = await client.post(url, files={"file": ("cat.jpg", photo, "image/jpeg")}, timeout=120)
        out.append((time.perf_counter() - started, r.status_code))


async def _probe(client: httpx.AsyncClient, url: str, stop: asyncio.Event, out: list[float]) -> None:
    while not stop.is_set():
        started = time.perf_counter()
        await client.get(url, timeout=120)
        out.append(time.perf_counter() - started)
        await asyncio.sleep(0.1)


async def _load(base: str, clients: int, requests: int) -> dict:
    photo, posts, pages, stop = _photo(), [], [], asyncio.Event()
    limits = httpx.Limits(max_connections=clients + 2)
    async with httpx.AsyncClient(limits=limits) as client:
        probe = asyncio.create_task(_probe(client, base + "/", stop, pages))
        started = time.perf_counter()
        await asyncio.gather(*(_client(client, base + "/api/predict", photo, requests, posts) for _ in range(clients)))
        wall = time.perf_counter() - started
        stop.set()
        await probe
    latencies = sorted(t for t, _ in posts)
    codes: dict[int, int] = {}
    for _, code in posts:
        codes[code] = codes.get(code, 0) + 1
    return {"requests": len(posts), "wall_s": wall, "throughput_rps": len(posts) / wall, "latencies": latencies,
            "p50_s": statistics.median(latencies), "p99_s": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
            "page_worst_s": max(pages), "page_median_s": statistics.median(pages), "codes": codes}


def _tiny_run(work: Path) -> str:
    """--smoke: the tiny model on tiny generated folders."""
    import visiontune as vt

    data = tiny_folders(work / "data", per_class=30)  # 12 validation images: enough to fit the sets (10)
    return vt.fit(str(data), strategy="feature-extract", epochs=1, output=str(work / "runs"), **SMOKE_MODEL).run_dir


VARIANTS = ("plain", "set", "no-ood")


def _without_bank(run: str, target: Path) -> str:
    """A copy of `run` whose model has no bank of training features: the same weights,
    calibration and sets, no OOD score (the "no-ood" variant)."""
    from visiontune.bundle import load_bundle
    from visiontune.rundir import RunDir

    shutil.copytree(run, target)
    bundle = load_bundle(run)
    bundle.model.novelty = None
    bundle.model.uncertainty = {k: v for k, v in bundle.model.uncertainty.items() if k != "ood"}
    RunDir(target).write_model(bundle.model, bundle.task, bundle.preprocess, bundle.config.model)
    return str(target)


def _serve_and_load(run: str, coverage: float | None, clients: int, requests: int) -> dict:
    """One variant: a server of its own, loaded, stopped."""
    port = _free_port()
    launch = f"from visiontune.deploy.serve import serve; serve({run!r}, port={port}, coverage={coverage!r})"
    server = subprocess.Popen([sys.executable, "-c", launch])
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_until_up(base, server)
        return asyncio.run(_load(base, clients, requests))
    finally:
        server.terminate()
        server.wait(timeout=30)


def _wait_until_up(base: str, server: subprocess.Popen, timeout: float = 120) -> None:
    """Until the page answers (or the server exits, or `timeout` s pass). One client for
    every try: `httpx.get` builds a client, and its SSL context (~0.2 s of CPU), per call,
    which took the CPU from the server starting up."""
    deadline = time.time() + timeout
    with httpx.Client() as client:
        while time.time() < deadline and server.poll() is None:
            try:
                client.get(base + "/", timeout=2)
                return
            except httpx.HTTPError:
                time.sleep(0.2)


def _pooled(results: list[dict]) -> dict:
    """The rounds of one variant as one load: every latency, the requests over the summed wall time."""
    latencies = sorted(t for r in results for t in r["latencies"])
    codes: dict[int, int] = {}
    for r in results:
        for code, n in r["codes"].items():
            codes[code] = codes.get(code, 0) + n
    wall = sum(r["wall_s"] for r in results)
    return {"requests": len(latencies), "wall_s": wall, "throughput_rps": len(latencies) / wall,
            "p50_s": statistics.median(latencies), "p99_s": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
            "page_worst_s": max(r["page_worst_s"] for r in results),
            "page_median_s": statistics.median(r["page_median_s"] for r in results), "codes": codes}


def main(argv: list[str] | None = None) -> None:
    ap = parser(__doc__)
    ap.add_argument("--run")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2, help="times each variant is served, alternating")
    ap.add_argument("--coverage", type=float, default=0.9, help="the 'set' variant's --coverage")
    args = ap.parse_args(argv)
    if args.smoke:
        args.clients, args.requests, args.rounds = 2, 2, 1
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        run = args.run or (_tiny_run if args.smoke else _default_run)(Path(tmp))
        served = {"plain": run, "set": run, "no-ood": _without_bank(run, Path(tmp) / "no-ood")}
        for _ in range(args.rounds):
            for variant in VARIANTS:
                coverage = args.coverage if variant == "set" else None
                runs[variant].append(_serve_and_load(served[variant], coverage, args.clients, args.requests))
    pooled = {v: _pooled(r) for v, r in runs.items()}
    _report(args, argv, pooled)


def _report(args: argparse.Namespace, argv: list[str] | None, pooled: dict[str, dict]) -> None:
    record = Recorder("serve_load", args.smoke, argv)
    load = f"{args.clients} clients x {args.requests} requests x {args.rounds} rounds"
    for variant, result in pooled.items():
        label = {"plain": "", "set": f" with --coverage {args.coverage}", "no-ood": " without the OOD score"}[variant]
        print(f"{variant}: {load}: {result['requests']} answered in {result['wall_s']:.1f} s = "
              f"{result['throughput_rps']:.1f} req/s; latency p50 {result['p50_s']:.2f} s, p99 {result['p99_s']:.2f} s; "
              f"page during the load: median {result['page_median_s'] * 1000:.0f} ms, worst "
              f"{result['page_worst_s'] * 1000:.0f} ms; status codes {result['codes']}")
        note = f"{load}; status codes {result['codes']}"
        record(f"POST /api/predict latency p50{label}", result["p50_s"], "s", note=note)
        record(f"POST /api/predict latency p99{label}", result["p99_s"], "s", note=note)
        record(f"throughput{label}", result["throughput_rps"], "requests/s", note=note)
    plain = pooled["plain"]
    for other, what in (("set", f"with --coverage {args.coverage} / without"),
                        ("no-ood", "with the OOD score / without")):
        a, b = (pooled[other], plain) if other == "set" else (plain, pooled[other])
        ratios = {"throughput": a["throughput_rps"] / b["throughput_rps"], "p99": a["p99_s"] / b["p99_s"]}
        print(f"{what}, same machine: throughput x{ratios['throughput']:.3f}, p99 x{ratios['p99']:.3f}")
        for name, value in ratios.items():
            record(f"{name} {what}", value, "ratio", note=f"{load}, alternating")
    bad = {code: n for r in pooled.values() for code, n in r["codes"].items() if code != 200}
    if bad:
        raise SystemExit(f"status codes other than 200: {bad}")


if __name__ == "__main__":
    main()
