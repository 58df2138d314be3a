"""Scale soak (issue 21): the shard, torchrun, cache and resume paths on a data set large
enough for the cases that only happen at scale, checked sample by sample.

    python -m bench.soak WORK [--images 50000] [--processes 3] [--workers 2]
    python -m bench.soak --smoke   # 300 images, stages 1-5 in this process (6 and 8 need torchrun
                                   # and review servers; 7 needs more images than the tiny model
                                   # calls near-copies: skipped, and said so)

1. Generate IMAGES 64 px JPEGs whose class (10) is visible in the pixels (bench/scale.py's
   generator), as a folder split 80/10/10 into train/valid/test.
2. `visiontune shard` them with --shard-bytes small enough that the writer starts most
   shards by size, not by count; check that dataset.json and index.csv name every tar on
   disk and every sample once.
3. Train on the shards under `torchrun --nproc-per-node PROCESSES` (gloo, CPU) with WORKERS
   DataLoader workers per process (a tiny timm model at 32 px: the soak checks the
   plumbing, not accuracy): every process must take the same, nonzero number of steps.
4. Predict the test shards listed in shuffled order (2 workers): every sample exactly once,
   and each prediction equal, file by file, to the prediction from the folder.
5. cv (3 folds, --selection last) on the shards: every out-of-fold row equal to its fold's
   model's prediction of that row's own file.
6. The same training again, one process SIGKILLed mid-epoch 2, then `--resume`: the
   history and weights must equal the uninterrupted run's.
7. An unlabelled pool of new images (max(300, IMAGES / 100)) with copies of 20 validation
   images and of 10 pool images under other names, a truncated JPEG and a text file named
   .jpg: `suggest --run` (on the shard-trained run) picks only new images (50, or all that
   are not near-copies of labelled ones) and lists what it left out and why; `train
   --unlabeled` on the shards pseudo-labels exactly the new images.
8. Review decisions (check_review): a folder with mislabels, byte-copies, a comma in a
   name and broken files; two review pages on one run decide from 4 threads at once, one
   is SIGKILLed half way and restarted, three decisions change: the log holds each
   image's last decision, the files `train` reads are derived from it, and `train
   --relabel --exclude` applies every one.

Prints one line per check and a JSON summary (also WORK/soak.json) and records how many
checks passed; exit status 1 when a check fails. Training and the review pages run in
their own processes; nothing is shared with other benches.
"""

from __future__ import annotations

import concurrent.futures
import csv
import json
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
from safetensors.torch import load_file

import visiontune as vt
from bench.harness import ROOT, Recorder, parser
from bench.scale import make_images  # bench/scale.py's generator
from visiontune import cli
from visiontune.analysis.decisions import CORRECTIONS, EXCLUDE, KEPT, REVIEW_DIR, Decisions
from visiontune.data.webdata import read_members
from visiontune.files import read_csv_dicts
from visiontune.selection.suggest import suggest
from visiontune.train.callbacks import Callback

RECIPE = {"backbone": "timm:test_efficientnet", "weights": "none", "image_size": 32, "strategy": "finetune",
          "batch_size": 96, "progress": False, "patience": 0, "lr": 3e-3, "augment": "none", "seed": 7}
EPOCHS = 3


def _torchrun(processes: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}", *args]


def _env(cache: Path) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)  # the worker imports bench
    return {**os.environ, "VISIONTUNE_OFFLINE": "1", "OMP_NUM_THREADS": "1", "VISIONTUNE_CACHE": str(cache),
            "PYTHONPATH": path}


def make_data(work: Path, n: int) -> Path:
    """WORK/data/{train,valid,test}/<class>/*.jpg."""
    data = work / "data"
    if (data / "done").is_file():
        return data
    shutil.rmtree(data, ignore_errors=True)
    flat = work / "flat"
    paths = make_images(flat, n)
    rng = random.Random(0)
    for p in map(Path, paths):
        split = "test" if rng.random() < 0.1 else "valid" if rng.random() < 1 / 9 else "train"
        target = data / split / p.parent.name / p.name
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(p, target)
    shutil.rmtree(flat)
    (data / "done").write_text("")
    return data


def shard(work: Path, data: Path, report: dict, per_shard: int = 150) -> Path:
    """`visiontune shard` (cli.main, in this process), about `per_shard` samples a shard by size."""
    shards = work / "shards"
    shutil.rmtree(shards, ignore_errors=True)
    sizes = [p.stat().st_size for p in data.rglob("*.jpg")]
    shard_bytes = int(np.mean(sizes) * per_shard)  # the writer starts most shards by size; --size by count
    count = per_shard * 1000 // 150
    started = time.perf_counter()
    if cli.main(["-q", "shard", str(data), "--output", str(shards), "--size", str(count), "--shard-bytes",
                 str(shard_bytes)]) != 0:
        raise RuntimeError("visiontune shard failed")
    described = json.loads((shards / "dataset.json").read_text())
    listed = sorted(s for part in described["splits"].values() for s in part["shards"])
    on_disk = sorted(p.name for p in shards.glob("*.tar"))
    with open(shards / "index.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    by_count = sum(-(-part["samples"] // count) for part in described["splits"].values())
    report["shard"] = {"seconds": time.perf_counter() - started, "tars": len(on_disk), "tars_by_count_alone": by_count,
                       "samples": len(rows), "shard_bytes": shard_bytes}
    check(report, "index names every tar on disk", listed == on_disk and {r["shard"] for r in rows} == set(on_disk))
    check(report, "the writer split shards by size", len(on_disk) > 2 * by_count)
    check(report, "every sample indexed once", len({r["key"] for r in rows}) == len(rows) == len(sizes))
    return shards


class Steps(Callback):
    """The optimizer steps of each epoch."""

    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_epoch_start(self, trainer) -> None:
        self.steps.append(0)

    def on_step_end(self, trainer) -> None:
        self.steps[-1] += 1


def worker(args: dict) -> None:
    """One training process: vt.fit (or its resume), its steps and history to OUTPUT/<name>-steps<rank>.json."""
    steps = Steps()
    if "resume" in args:
        result = vt.fit(resume=args["resume"], callbacks=[steps])
    else:
        result = vt.fit(**args, callbacks=[steps])
    rank = int(os.environ.get("RANK", 0))
    out = os.path.join(args["output"], f"{os.path.basename(args.get('resume') or args['name'])}-steps{rank}.json")
    with open(out, "w") as fh:
        json.dump({"steps": steps.steps, "history": result.history}, fh)


WORKER = "import json, sys\nfrom bench.soak import worker\nworker(json.loads(sys.argv[1]))\n"


def train(work: Path, shards: Path, name: str, processes: int, workers: int, kill_at: float | None = None,
          report: dict | None = None) -> Path:
    """The torchrun training `name`; with `kill_at`, one process is SIGKILLed that many
    seconds into its second epoch (what happened goes into `report`) and the run resumed."""
    out = work / "runs"
    out.mkdir(parents=True, exist_ok=True)
    args = {"data": str(shards), "output": str(out), "name": name, "epochs": EPOCHS, "num_workers": workers, **RECIPE}
    if processes == 1 and kill_at is None:  # --smoke: one process, this one
        worker(args)
        return out / name
    (work / "worker.py").write_text(WORKER)
    cmd = _torchrun(processes, str(work / "worker.py"), json.dumps(args))
    env = _env(work / "cache")
    if kill_at is None:
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
        return out / name
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    history = out / name / "history.jsonl"
    while proc.poll() is None and not (history.is_file() and history.read_text().count("\n") >= 1):
        time.sleep(0.2)
    time.sleep(kill_at)
    victims = subprocess.run(["pgrep", "-f", "-P", str(proc.pid), "worker.py"], capture_output=True, text=True)
    pids = [int(p) for p in victims.stdout.split()]
    killed = proc.poll() is None and bool(pids)
    if killed:
        os.kill(pids[-1], signal.SIGKILL)  # one rank dies; torchrun stops the others
    proc.wait()
    if report is not None:
        report.update(killed=killed, torchrun_status=proc.returncode,
                      epochs_logged_at_kill=history.read_text().count("\n") if history.is_file() else 0)
    resume = {"resume": str(out / name), "output": str(out)}
    subprocess.run(_torchrun(processes, str(work / "worker.py"), json.dumps(resume)), check=True, env=env,
                   stdout=subprocess.DEVNULL)
    return out / name


def check(report: dict, what: str, ok: bool, detail: object = "") -> None:
    report.setdefault("checks", {})[what] = bool(ok)
    print(f"{'PASS' if ok else 'FAIL'}  {what}" + (f"  ({detail})" if detail else ""), flush=True)


def original_paths(tars: list[Path]) -> dict[str, str]:
    return {f"{t}#{k}": json.loads(m["json"])["path"] for t in tars for k, m in read_members(str(t), ("json",)).items()}


def check_training(report: dict, run: Path, processes: int) -> None:
    ranks = [json.loads((run.parent / f"{run.name}-steps{r}.json").read_text()) for r in range(processes)]
    steps = [r["steps"] for r in ranks]
    report["train"] = {"steps_per_rank": steps, "history": ranks[0]["history"]}
    check(report, "every process took the same nonzero steps", all(s == steps[0] for s in steps) and min(steps[0]) > 0,
          steps[0])


def check_predict(report: dict, run: Path, shards: Path, data: Path) -> None:
    tars = sorted(shards.glob("test-*.tar"))
    random.Random(1).shuffle(tars)
    started = time.perf_counter()
    preds, skipped = vt.predict(run, [str(t) for t in tars], num_workers=2, batch_size=256)
    origin = original_paths(tars)
    files, _ = vt.predict(run, [origin[p.path] for p in preds], batch_size=256)
    probs = {p.path: np.array([p.probs[c] for c in sorted(p.probs)]) for p in files}
    diff = max(float(np.abs(np.array([p.probs[c] for c in sorted(p.probs)]) - probs[origin[p.path]]).max())
               for p in preds)
    report["predict"] = {"samples": len(preds), "seconds": time.perf_counter() - started, "max_abs_diff": diff}
    check(report, "every test sample predicted exactly once",
          len(preds) == len(origin) == len({p.path for p in preds}) and not skipped, len(preds))
    check(report, "every shard prediction equals its file's", diff < 1e-5, f"max |diff| {diff:.1e}")


def check_cv(report: dict, work: Path, shards: Path, workers: int) -> None:
    started = time.perf_counter()
    result = vt.cross_validate(str(shards), folds=3, selection="last",
                               **{**RECIPE, "epochs": 1, "num_workers": workers, "output": str(work / "cv"), "name": "cv"})
    rows = list(csv.DictReader(open(result.oof_path)))
    origin = original_paths(sorted(shards.glob("*.tar")))
    worst = 0.0
    for fold in (1, 2, 3):
        mine = [r for r in rows if r["fold"] == str(fold)]
        preds, _ = vt.predict(Path(result.out_dir) / f"fold{fold}", [origin[r["path"]] for r in mine], batch_size=256)
        for row, pred in zip(mine, preds):
            worst = max(worst, max(abs(float(row[f"prob_{c}"]) - pred.probs[c]) for c in result.classes))
    report["cv"] = {"rows": len(rows), "seconds": time.perf_counter() - started, "max_abs_diff": worst,
                    "mean": result.mean}
    check(report, "every out-of-fold row equals its file's prediction", worst < 1e-5 and len(rows) > 0,
          f"{len(rows)} rows, max |diff| {worst:.1e}")


def check_resume(report: dict, work: Path, shards: Path, processes: int, workers: int, reference: Path) -> None:
    started = time.perf_counter()
    kill: dict = {}
    crashed = train(work, shards, "crashed", processes, workers, kill_at=3.0, report=kill)
    a, b = load_file(str(reference / "model.safetensors")), load_file(str(crashed / "model.safetensors"))
    weights = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    h1 = [json.loads(x) for x in (reference / "history.jsonl").read_text().splitlines()]
    h2 = [json.loads(x) for x in (crashed / "history.jsonl").read_text().splitlines()]
    losses = max(abs(x[k] - y[k]) for x, y in zip(h1, h2) for k in ("train_loss", "val_loss"))
    report["resume"] = {"seconds": time.perf_counter() - started, "max_weight_diff": weights,
                        "max_loss_diff": losses, "epochs": len(h2), **kill}
    check(report, "a process was killed mid-run (torchrun failed)", kill["killed"] and kill["torchrun_status"] != 0
          and 1 <= kill["epochs_logged_at_kill"] < EPOCHS, kill)
    check(report, "killed mid-epoch and resumed = uninterrupted", len(h1) == len(h2) == EPOCHS and weights < 1e-4
          and losses < 1e-4, f"weights {weights:.1e}, losses {losses:.1e}")


def make_pool(work: Path, data: Path, n: int) -> Path:
    """WORK/pool: new/ (n images of another seed), zz_copies/ (20 validation images and 10
    of new/ under other names; sorted after new/, so the originals are the ones kept) and
    broken/ (a truncated JPEG, a text file named .jpg)."""
    pool = work / "pool"
    shutil.rmtree(pool, ignore_errors=True)
    fresh = make_images(pool / "new", n, seed=1)
    copies = pool / "zz_copies"
    copies.mkdir(parents=True)
    for i, path in enumerate(sorted((data / "valid").rglob("*.jpg"))[:20]):
        shutil.copy(path, copies / f"valid_{i}.jpg")
    for i, path in enumerate(fresh[:10]):
        shutil.copy(path, copies / f"again_{i}.jpg")
    (pool / "broken").mkdir()
    whole = Path(fresh[0]).read_bytes()
    (pool / "broken" / "truncated.jpg").write_bytes(whole[:len(whole) // 2])
    (pool / "broken" / "notes.jpg").write_text("a shopping list, not a photo\n")
    return pool


def check_pool(report: dict, work: Path, data: Path, shards: Path, run: Path, images: int, workers: int) -> None:
    started = time.perf_counter()
    pool = make_pool(work, data, max(300, images // 100))
    fresh = {os.path.realpath(p) for p in (pool / "new").rglob("*.jpg")}
    result = suggest(pool, run=run, n=50, method="diverse")
    why: dict[str, int] = {}
    for _, reason in result.excluded:
        why[reason] = why.get(reason, 0) + 1
    check(report, "suggest picks only new pool images", 0 < len(result.rows) == min(50, result.pool)
          and all(os.path.realpath(r.path) in fresh for r in result.rows), f"{len(result.rows)} of {result.pool}")
    check(report, "suggest leaves out copies of the run's images and of pool images",
          why.get("the same bytes as a labelled image") == 20 and why.get("the same bytes as another pool image") == 10,
          why)
    check(report, "suggest skips and lists the unreadable pool files",
          sorted(Path(p).name for p, _ in result.unreadable) == ["notes.jpg", "truncated.jpg"], result.unreadable)
    learnt = vt.fit(str(shards), unlabeled=str(pool), **{**RECIPE, "strategy": "feature-extract", "epochs": 1,
                                                          "num_workers": workers, "output": str(work / "runs"),
                                                          "name": "pool"})
    with open(Path(learnt.run_dir) / "pseudo_labels.csv", newline="") as fh:
        rows = [os.path.realpath(r["path"]) for r in csv.DictReader(fh)]
    report["pool"] = {"images": len(fresh), "left_out": why, "seconds": time.perf_counter() - started}
    check(report, "--unlabeled pseudo-labels exactly the new pool images", sorted(rows) == sorted(fresh), len(rows))


def make_review_data(work: Path, data: Path, per_class: int) -> Path:
    """WORK/review_data/<class>/: `per_class` validation images of each class, with what a
    real folder holds: 3 images of c0 filed under c1 (mislabels), 5 byte-copies under other
    names, a copy whose name holds a comma, a truncated JPEG and a text file named .jpg."""
    root = work / "review_data"
    shutil.rmtree(root, ignore_errors=True)
    for folder in sorted(p for p in (data / "valid").iterdir() if p.is_dir()):
        (root / folder.name).mkdir(parents=True)
        for path in sorted(folder.glob("*.jpg"))[:per_class]:
            shutil.copy(path, root / folder.name / path.name)
    for path in sorted((data / "valid" / "c0").glob("*.jpg"))[per_class:per_class + 3]:
        shutil.copy(path, root / "c1" / f"filed_wrong_{path.name}")
    firsts = sorted(root.rglob("*.jpg"))
    for i, path in enumerate(firsts[:5]):
        shutil.copy(path, path.parent / f"zz_copy_{i}.jpg")
    shutil.copy(firsts[5], firsts[5].parent / "zz_one, two.jpg")
    whole = firsts[6].read_bytes()
    (root / "c2" / "truncated.jpg").write_bytes(whole[:len(whole) // 2])
    (root / "c3" / "notes.jpg").write_text("a shopping list, not a photo\n")
    return root


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _review_server(work: Path, run: Path, data: Path) -> tuple[subprocess.Popen, str]:
    """`visiontune review RUN DATA` on a free port, once it answers."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "visiontune", "review", str(run), str(data), "--port", str(port)],
                            env=_env(work / "cache"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.perf_counter() + 600
    while time.perf_counter() < deadline and proc.poll() is None:
        try:
            urllib.request.urlopen(url + "/api/queue", timeout=5).read()
            return proc, url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"review server on {url} did not start (status {proc.poll()})")


def _call(url: str, path: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def _decisions(queue: list[dict], classes: list[str]) -> list[tuple[dict, str, str]]:
    """(case, action, label) for every case: relabel to the next class, exclude, keep, in turn."""
    out = []
    for i, case in enumerate(queue):
        action = ("relabel", "exclude", "keep")[i % 3]
        label = classes[(classes.index(case["given"]) + 1) % len(classes)] if action == "relabel" else ""
        out.append((case, action, label))
    return out


def check_review(report: dict, work: Path, data: Path, workers: int) -> None:
    """8. Review decisions over a folder with mislabels, copies, a comma and broken files:
    two review pages on one run take decisions from 4 threads at once, one page is
    SIGKILLed half way and started again, three decisions are changed; the log holds each
    image's last decision, the files train reads are derived from it, and `train --relabel
    --exclude` applies every one (no listed path matching nothing)."""
    started = time.perf_counter()
    folder = make_review_data(work, data, 30)
    run = Path(vt.fit(str(folder), **{**RECIPE, "strategy": "feature-extract", "epochs": 1, "num_workers": workers,
                                      "output": str(work / "runs"), "name": "review"}).run_dir)
    first, url1 = _review_server(work, run, folder)
    second, url2 = _review_server(work, run, folder)
    queue = _call(url1, "/api/queue")
    planned = _decisions(queue["items"], queue["classes"])
    half = len(planned) // 2

    def post(job: tuple[int, tuple[dict, str, str]]) -> None:
        i, (case, action, label) = job
        target = (url1 if i % 2 else url2) if i < half else url2
        _call(target, "/api/decide", {"index": case["index"], "action": action, "label": label})

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        list(pool.map(post, enumerate(planned[:half])))
    first.send_signal(signal.SIGKILL)
    first.wait()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        list(pool.map(post, [(half + i, job) for i, job in enumerate(planned[half:])]))
    first, url1 = _review_server(work, run, folder)
    changed = [(case, "exclude", "") for case, action, _ in planned[:3] if action != "exclude"]
    for case, action, label in changed:
        _call(url1, "/api/decide", {"index": case["index"], "action": action, "label": label})
    for proc in (first, second):
        proc.terminate()
        proc.wait()
    expected = {case["path"]: (action, label) for case, action, label in [*planned, *changed]}
    latest = {p: (d, label) for p, (d, label) in Decisions(run).latest().items()}
    review = run / REVIEW_DIR
    corrections = {r["path"]: r["label"] for r in read_csv_dicts(review / CORRECTIONS)}
    excluded = {r["path"] for r in read_csv_dicts(review / EXCLUDE)}
    kept = {r["path"] for r in read_csv_dicts(review / KEPT)}
    check(report, "the decision log holds each image's last decision, none lost or doubled",
          latest == expected and len(expected) == len(queue["items"]), f"{len(latest)} of {len(expected)}")
    check(report, "corrections.csv, exclude.txt and kept.txt are what the log says",
          corrections == {p: lb for p, (a, lb) in expected.items() if a == "relabel"}
          and excluded == {p for p, (a, _) in expected.items() if a == "exclude"}
          and kept == {p for p, (a, _) in expected.items() if a == "keep"}, (len(corrections), len(excluded), len(kept)))
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logging.getLogger("visiontune").addHandler(handler)
    try:
        source = vt.api.load_items(vt.config.RunConfig.create(None, path=str(folder), relabel=str(review / CORRECTIONS),
                                                              exclude=str(review / EXCLUDE)).data)
    finally:
        logging.getLogger("visiontune").removeHandler(handler)
    labels = {os.path.realpath(it.path): it.label for it in source.items}
    left_out = {os.path.realpath(p): why for p, why in source.excluded}
    check(report, "train --relabel --exclude applies every decision",
          all(labels.get(os.path.realpath(p)) == lb for p, lb in corrections.items())
          and all("--exclude" in left_out.get(os.path.realpath(p), "") for p in excluded)
          and not any("not in the data" in r.getMessage() for r in records),
          f"{len(corrections)} relabelled, {len(excluded)} excluded")
    check(report, "the broken files are left out and said so",
          {Path(p).name for p, why in source.excluded if "--exclude" not in why} >= {"truncated.jpg", "notes.jpg"})
    report["review"] = {"cases": len(queue["items"]), "decisions": len(planned) + len(changed),
                        "seconds": time.perf_counter() - started}


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__)
    ap.add_argument("work", nargs="?")
    ap.add_argument("--images", type=int, default=50_000)
    ap.add_argument("--processes", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    a = ap.parse_args(argv)
    record = Recorder("soak", a.smoke, argv)
    if a.smoke:  # 300 images, one process (this one), no DataLoader workers for training
        a.work, a.images, a.processes, a.workers = a.work or tempfile.mkdtemp(prefix="vt-bench-soak-"), 300, 1, 0
    elif a.work is None:
        ap.error("WORK is required (or --smoke)")
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(work / "runs", ignore_errors=True)
    shutil.rmtree(work / "cv", ignore_errors=True)
    report: dict = {"images": a.images, "processes": a.processes, "workers": a.workers, "cpus": os.cpu_count(),
                    "date": time.strftime("%Y-%m-%d %H:%M")}
    started = time.perf_counter()
    stages = stages_run(report, work, a)
    report["seconds"] = time.perf_counter() - started
    (work / "soak.json").write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "train"}, indent=2))
    checks = report["checks"]
    record(f"checks passed, {a.images:,} images (stages {stages})", f"{sum(checks.values())} of {len(checks)}",
           note=f"{a.processes} processes, {a.workers} workers, {report['seconds']:.0f} s"
                + ("; stages 6 (torchrun, SIGKILL, resume), 7 (pool) and 8 (review pages) skipped: --smoke"
                   if a.smoke else ""))
    return 0 if all(checks.values()) else 1


def stages_run(report: dict, work: Path, a) -> str:
    """The stages (all of them; --smoke: those that need no torchrun and no servers); which ran."""
    data = make_data(work, a.images)
    shards = shard(work, data, report, per_shard=15 if a.smoke else 150)
    t = time.perf_counter()
    run = train(work, shards, "calm", a.processes, a.workers)
    report["train_seconds"] = time.perf_counter() - t
    check_training(report, run, a.processes)
    check_predict(report, run, shards, data)
    check_cv(report, work, shards, a.workers)
    if a.smoke:
        print("SKIP  stages 6 (a rank SIGKILLed under torchrun, then --resume), 7 (the unlabelled pool: on 300 "
              "images every new one is a near-copy to the tiny model) and 8 (review pages): --smoke")
        return "1-5"
    check_resume(report, work, shards, a.processes, a.workers, run)
    check_pool(report, work, data, shards, run, a.images, a.workers)
    check_review(report, work, data, a.workers)
    return "1-8"


if __name__ == "__main__":
    sys.exit(main())
