"""Training under torchrun on CPU processes (gloo): 2 processes end with the same weights as
1 process with the same global batch and only rank 0 writes; 3 processes agree on
out-of-memory micro-batches, draw their own augmentations and end with the same (best)
weights; every collective tensor lives on the training device."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import ddp_worker
import pytest
import torch
from safetensors.torch import load_file

import visiontune as vt
from conftest import make_class_folders, make_multilabel_data
from visiontune.cli import main

ARGS = ["--backbone", "timm:test_efficientnet", "--weights", "none", "--image-size", "32", "--epochs", "3",
        "--strategy", "gradual", "--freeze-epochs", "1", "--batch-size", "8", "--num-workers", "0", "--no-progress",
        "--patience", "0", "--no-augment", "--trainable-bn", "eval", "--lr", "1e-2", "--seed", "1"]


WORKER = Path(__file__).parent / "ddp_worker.py"


def _torchrun() -> list[str]:
    exe = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    return [exe] if exe else [sys.executable, "-m", "torch.distributed.run"]


@pytest.mark.slow
@pytest.mark.parametrize("task", ["single-label", "multi-label"])
def test_two_gloo_processes_match_one_process(tmp_path: Path, task: str) -> None:
    if task == "single-label":
        data, extra = make_class_folders(tmp_path / "d", {"red": 10, "green": 10}), []  # 16 train, 4 valid
    else:
        data, extra = make_multilabel_data(tmp_path / "d", n=24), ["--csv", "labels.csv", "--valid-pct", "0.25"]
    env = {**os.environ, "VISIONTUNE_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    for n in (1, 2):  # both under torchrun: one plain process samples its batches in another order
        subprocess.run([*_torchrun(), "--standalone", f"--nproc_per_node={n}", "-m", "visiontune", "-q", "train",
                        str(data), *ARGS, *extra, "--output", str(tmp_path / f"w{n}"), "--name", "run"],
                       env=env, check=True, capture_output=True, timeout=300)
    one, two = tmp_path / "w1" / "run", tmp_path / "w2" / "run"
    assert sorted(p.name for p in (tmp_path / "w2").iterdir()) == ["run"]  # rank 1 wrote nothing
    a, b = load_file(str(one / "model.safetensors")), load_file(str(two / "model.safetensors"))
    assert max(float((a[k].float() - b[k].float()).abs().max()) for k in a) < 1e-4
    h1 = [json.loads(x) for x in (one / "history.jsonl").read_text().splitlines()]
    h2 = [json.loads(x) for x in (two / "history.jsonl").read_text().splitlines()]
    assert [r["val_loss"] for r in h2] == pytest.approx([r["val_loss"] for r in h1], abs=1e-4)
    assert json.loads((two / "environment.json").read_text())["world_size"] == 2


def _train(n: int, args: list[str], env: dict[str, str] | None = None) -> None:
    """`visiontune train ARGS` in `n` torchrun processes; n=1, in this process (a torchrun
    launcher and its one process would import torch twice more): a reference for runs
    whose result does not depend on the order of the batches."""
    env = {**os.environ, "VISIONTUNE_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    if n == 1:
        with pytest.MonkeyPatch.context() as patch:
            for name, value in env.items():
                patch.setenv(name, value)
            assert main(["-q", "train", *args]) == 0
        return
    subprocess.run([*_torchrun(), "--standalone", f"--nproc_per_node={n}", "-m", "visiontune", "-q", "train", *args],
                   env=env, check=True, capture_output=True, timeout=300)


def _launch(n: int, data: Path | str, out: Path, scenario: str, *extra: str) -> list[dict]:
    env = {**os.environ, "VISIONTUNE_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*_torchrun(), "--standalone", f"--nproc_per_node={n}", str(WORKER), str(data), str(out),
                           scenario, *extra], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    # the process group visiontune started is destroyed before the interpreter exits: gloo's
    # threads otherwise abort a process at exit now and then ("terminate called without an
    # active exception", SIGABRT, after a finished run)
    assert [json.loads((out / f"exit{r}.json").read_text()) for r in range(n)] == [{"group_alive": False}] * n
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(n)]


@pytest.mark.slow
def test_three_processes_agree_on_oom_micro_batches_seeds_and_best_weights(tmp_path: Path) -> None:
    # 36 images: 28 train (+ padding to 36 for 3 x 12), 8 valid; 3 processes of 4 images per step
    data = make_class_folders(tmp_path / "d", {"red": 18, "green": 18})
    plain = _launch(3, data, tmp_path / "plain", "")
    oom = _launch(3, data, tmp_path / "oom", "oom1")
    # 4. rank 1 ran out of memory; every process continued with the same micro-batches
    assert {r["micro"] for r in oom} == {2} and {r["micro"] for r in plain} == {None}
    # ... and the run equals the one without out-of-memory (micro-batching is exact, BN fixed)
    assert [h["val_loss"] for h in oom[0]["history"]] == pytest.approx([h["val_loss"] for h in plain[0]["history"]],
                                                                       abs=1e-5)
    # 2. each process draws its own augmentation stream, reproducibly
    for epoch in range(3):
        assert len({r["rng"][epoch] for r in plain}) == 3
    assert [r["rng"] for r in plain] == [r["rng"] for r in oom]
    # 3. best epoch 1 (min_delta huge) restored by rank 0 from its file, then shared: all equal
    assert all(r["best_epoch"] == 1 for r in oom)
    best = load_file(str(tmp_path / "oom" / "runs" / "run" / "model.safetensors"))
    for rank in range(3):
        held = load_file(str(tmp_path / "oom" / f"rank{rank}.safetensors"))
        trained = [k for k in best if not k.startswith("novelty.")]  # the OOD bank: fitted and written by rank 0 only
        assert all(torch.equal(held[k], best[k]) for k in trained), rank


class Recorded(Exception):
    """Raised by the recording collectives: meta tensors hold no values to go on with."""


def _recording(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, torch.device]]:
    seen: list[tuple[str, torch.device]] = []

    def record(name: str):
        def collective(tensor: torch.Tensor, *args, **kwargs) -> None:
            seen.append((name, tensor.device))
            raise Recorded

        return collective

    for name in ("all_reduce", "broadcast"):
        monkeypatch.setattr(torch.distributed, name, record(name))
    return seen


def test_every_collective_tensor_is_on_the_training_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """NCCL has no CPU tensors: the helpers build theirs on the device they are given (a
    meta device here, so a CPU default would show)."""
    from visiontune.runtime import distributed as D

    seen = _recording(monkeypatch)
    env, meta = D.DistEnv(rank=0, world_size=2, launched=True), torch.device("meta")
    model = torch.nn.Linear(3, 2).to(meta)
    model.weight.grad = torch.zeros_like(model.weight)
    calls = [lambda: D.reduce_totals(1.0, 2, env, meta), lambda: D.agree_step(False, False, 4, env, meta),
             lambda: D.average_gradients(list(model.parameters()), env, meta),
             lambda: D.broadcast_state(model, env, meta)]
    for call in calls:
        with pytest.raises(Recorded):
            call()
    assert [d for _, d in seen] == [meta] * len(calls)


def test_the_trainer_passes_the_models_device_to_every_collective(split_data: Path, tiny: dict,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from visiontune.runtime import distributed as D
    from visiontune.train import trainer as T

    devices: list[torch.device] = []
    for name in ("reduce_totals", "agree_step", "average_gradients", "broadcast_state"):
        real = getattr(D, name)

        def spy(*args, _real=real, **kwargs):
            devices.append(args[-1])
            return _real(*args, **kwargs)

        monkeypatch.setattr(T, name, spy)
    r = vt.fit(split_data, **dict(tiny, strategy="finetune", epochs=1, output=str(split_data.parent / "runs")))
    param_device = next(r.model.parameters()).device
    assert len(devices) > 3 and set(devices) == {param_device}


def test_seeds_differ_by_rank_and_rank_zero_keeps_the_single_process_seed() -> None:
    from visiontune.train.trainer import epoch_seed

    assert epoch_seed(3, 2) == epoch_seed(3, 2, rank=0)
    assert len({epoch_seed(3, 2, rank) for rank in range(8)}) == 8


@pytest.mark.slow
def test_two_processes_extract_each_image_once_and_match_one_process(tmp_path: Path) -> None:
    """A frozen phase under torchrun: each process extracts its share of the images into the
    shared feature cache, then both fit the head on all of them, as one process does."""
    import sqlite3

    import numpy as np

    data = make_class_folders(tmp_path / "d", {"red": 10, "green": 10})  # 16 train, 4 valid
    args = ["--backbone", "timm:test_efficientnet", "--weights", "none", "--image-size", "32",
            "--strategy", "feature-extract", "--batch-size", "8", "--num-workers", "0", "--no-progress", "--seed", "1"]
    for n in (1, 2):
        _train(n, [str(data), *args, "--output", str(tmp_path / f"w{n}"), "--name", "run"],
               {"VISIONTUNE_CACHE": str(tmp_path / f"cache{n}")})
    store = next((tmp_path / "cache2" / "features").iterdir())
    rows = sum(np.load(s, mmap_mode="r").shape[0] for s in store.glob("shard-*.npy"))
    with sqlite3.connect(store / "index.sqlite") as db:
        indexed = db.execute("SELECT COUNT(*) FROM vectors").fetchone()[0]
    assert rows == indexed == 20  # each of the 20 images computed once, by one of the two processes
    a = load_file(str(tmp_path / "w1" / "run" / "model.safetensors"))
    b = load_file(str(tmp_path / "w2" / "run" / "model.safetensors"))
    assert max(float((a[k].float() - b[k].float()).abs().max()) for k in a) < 1e-5


def _uneven_shards(data: Path, out: Path, sizes: list[int]) -> tuple[str, str]:
    """data/train and data/valid written as tar shards of `sizes` samples (labels in .txt),
    training samples in a seeded random order; returns (train pattern, valid pattern)."""
    import random

    import webdataset as wds

    train = sorted((data / "train").rglob("*.png"))
    random.Random(0).shuffle(train)
    assert sum(sizes) == len(train)
    out.mkdir()
    start = 0
    for shard, size in enumerate(sizes):
        with wds.TarWriter(str(out / f"train-{shard:06d}.tar")) as sink:
            for i, png in enumerate(train[start:start + size]):
                sink.write({"__key__": f"{i:06d}", "png": png.read_bytes(), "txt": png.parent.name.encode()})
        start += size
    with wds.TarWriter(str(out / "valid-000000.tar")) as sink:
        for i, png in enumerate(sorted((data / "valid").rglob("*.png"))):
            sink.write({"__key__": f"{i:06d}", "png": png.read_bytes(), "txt": png.parent.name.encode()})
    return str(out / f"train-{{000000..{len(sizes) - 1:06d}}}.tar"), str(out / "valid-000000.tar")


@pytest.mark.slow
def test_three_processes_over_few_or_uneven_shards_all_train_the_same_nonzero_steps(tmp_path: Path) -> None:
    """2 shards for 3 processes (samples spread), and 7 uneven shards that restart their keys
    read by 2 DataLoader workers per process: every process takes the same, nonzero number
    of steps each epoch, and the run ends where one process ends."""
    from visiontune.config import DataConfig
    from visiontune.data.sources import load_items
    from visiontune.data.webdata import write_shards

    data = tmp_path / "d"
    make_class_folders(data / "train", {"red": 12, "green": 12, "blue": 12}, 0)
    make_class_folders(data / "valid", {"red": 3, "green": 3, "blue": 3}, 100)
    write_shards(load_items(DataConfig(path=str(data))), tmp_path / "two", size=18)
    one, _ = ddp_worker.train(str(data), tmp_path / "one", "shards")  # one process: this one
    two = _launch(3, tmp_path / "two", tmp_path / "r2", "shards")
    train7, valid7 = _uneven_shards(data, tmp_path / "seven", [6, 5, 7, 4, 6, 1, 7])  # whole shards: 12 each
    seven = _launch(3, train7, tmp_path / "r7", "shards workers2", valid7)
    for ranks in (two, seven):
        steps = [r["steps"] for r in ranks]
        assert steps == [one["steps"]] * 3 and min(one["steps"]) > 0, steps  # as many as one process takes
        final, reference = ranks[0]["history"][-1], one["history"][-1]
        for key in ("train_loss", "val_loss"):
            assert final[key] == pytest.approx(reference[key], abs=0.05), key
        timeless = [[{k: v for k, v in h.items() if k != "seconds"} for h in r["history"]] for r in ranks]
        assert timeless[1:] == [timeless[0]] * 2  # the metrics of gathered validation: every process agrees


@pytest.mark.slow
def test_a_frozen_phase_with_fewer_validation_images_than_processes_finishes(tmp_path: Path) -> None:
    """3 processes, 2 validation images: a frozen phase (features extracted by the processes,
    the probe) and then a fine-tuning phase (images) each validate and finish: one gradual
    run of one epoch each (one launch of 3 processes, not two)."""
    data = tmp_path / "d"
    make_class_folders(data / "train", {"red": 6, "green": 6}, 0)
    make_class_folders(data / "valid", {"red": 1, "green": 1}, 100)
    env = {**os.environ, "VISIONTUNE_OFFLINE": "1", "OMP_NUM_THREADS": "1", "VISIONTUNE_CACHE": str(tmp_path / "c")}
    done = subprocess.run([*_torchrun(), "--standalone", "--nproc_per_node=3", "-m", "visiontune", "-q", "train",
                           str(data), "--backbone", "timm:test_efficientnet", "--weights", "none", "--image-size",
                           "32", "--strategy", "gradual", "--freeze-epochs", "1", "--epochs", "2", "--batch-size",
                           "6", "--num-workers", "0", "--no-progress", "--output", str(tmp_path / "runs"),
                           "--name", "run"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    run = tmp_path / "runs" / "run"
    assert (run / "model.safetensors").is_file()
    history = [json.loads(x) for x in (run / "history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2] and all(h["accuracy"] in (0.0, 0.5, 1.0) for h in history)
    assert any((tmp_path / "c" / "features").rglob("index.sqlite"))  # the frozen phase validated on features


@pytest.mark.slow
def test_two_processes_count_the_whole_unlabelled_pool(tmp_path: Path) -> None:
    """--unlabeled under torchrun: each process takes its share of the pool (a
    DistributedSampler, 2 workers each); the consistency counts that rank 0 logs and writes
    are merged over both, so consistency.csv counts the whole pool each epoch (before:
    rank 0's half), and both processes hold the same weights. 15 pool images: the sampler
    gives each process 8 (one image twice); the counts are by the images' rows, so they
    say 15 (they said "16 views of the 15 pool images")."""
    import csv

    data = make_class_folders(tmp_path / "d", {"red": 12, "green": 12})
    make_class_folders(tmp_path / "pool", {"red": 8, "green": 7}, start_seed=300)
    ranks = _launch(2, data, tmp_path / "out", "pool workers2")
    assert ranks[0]["steps"] == ranks[1]["steps"]
    with open(tmp_path / "out" / "runs" / "run" / "consistency.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    assert all(r["seen"] == r["passed"] == "15" for r in rows), rows
    assert all(int(r["red"]) + int(r["green"]) == 15 for r in rows)
    a, b = (load_file(str(tmp_path / "out" / f"rank{r}.safetensors")) for r in (0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a if not k.startswith("novelty."))  # the bank: rank 0's only
