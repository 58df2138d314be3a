"""Training loaders: each sample's order and augmentation come from (seed, rank, epoch,
pass, position) through SeededSampler, whatever the worker processes do."""

from __future__ import annotations

import random
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import WeightedRandomSampler

from conftest import make_class_folders
from visiontune.data.loaders import (
    SeededSampler,
    eval_dataset,
    make_loader,
    read_ahead,
    seeded_randomness,
    train_dataset,
)
from visiontune.data.preprocess import Preprocess


def _pairs(sampler: SeededSampler) -> list[tuple[int, int]]:
    return list(sampler)


def test_the_order_and_seeds_depend_on_epoch_and_pass_only() -> None:
    a, b = SeededSampler(range(10), seed=3), SeededSampler(range(10), seed=3)
    a.set_epoch(2)
    b.set_epoch(2)
    first = _pairs(a)
    assert first == _pairs(b)  # the same epoch and pass: the same seeds
    assert sorted(i for i, _ in first) == list(range(10))
    second_pass = _pairs(a)
    assert {s for _, s in second_pass}.isdisjoint(s for _, s in first)  # a pass again: new seeds
    a.set_epoch(2)
    assert _pairs(a) == first  # set_epoch starts the epoch's passes again (a resumed run)
    a.set_epoch(3)
    assert _pairs(a) != first
    assert _pairs(SeededSampler(range(10), seed=3, rank=1)) != _pairs(SeededSampler(range(10), seed=3))


def test_a_shared_generator_drawn_elsewhere_does_not_move_the_order() -> None:
    """The wrapped sampler draws from the SeededSampler's own generator, reseeded each pass:
    draws made elsewhere in between (another loader, prefetching) change nothing."""
    weights = torch.tensor([1.0, 1.0, 4.0, 1.0])
    a = SeededSampler(WeightedRandomSampler(weights, 8, generator=torch.Generator()), seed=1)
    b = SeededSampler(WeightedRandomSampler(weights, 8), seed=1)
    reference = list(a)
    torch.rand(100, generator=a.generator)  # drawn elsewhere
    b.passes = a.passes = 0
    assert list(a) == reference == list(b)


def test_seeded_randomness_gives_the_global_generators_back() -> None:
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    expected = (torch.rand(1).item(), random.random(), np.random.rand())
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    with seeded_randomness(12345):
        inside = (torch.rand(1).item(), random.random(), np.random.rand())
    assert (torch.rand(1).item(), random.random(), np.random.rand()) == expected
    with seeded_randomness(12345):
        assert (torch.rand(1).item(), random.random(), np.random.rand()) == inside


def test_workers_kept_across_epochs_give_the_batches_of_no_workers(tmp_path: Path) -> None:
    """Two epochs through a loader with 2 worker processes kept between them
    (persistent_workers) yield the same augmented batches as the same loader with none."""
    data = make_class_folders(tmp_path / "d", {"red": 6, "green": 5})
    paths = sorted(str(p) for p in data.rglob("*.png"))
    pre = Preprocess(input_size=32, interpolation="bilinear", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    dataset = train_dataset(paths, torch.zeros(len(paths), dtype=torch.long), pre, "medium", 0.5, 0.35, False)
    epochs = {}
    for workers in (0, 2):
        loader = make_loader(dataset, 4, workers, shuffle=True, seed=7, persistent=True)
        assert loader.persistent_workers == (workers > 0)
        batches = []
        for epoch in range(2):
            loader.sampler.set_epoch(epoch)
            batches += [(x, rows) for x, _, rows in loader]
        epochs[workers] = batches
    assert len(epochs[0]) == len(epochs[2]) == 6
    for (x0, r0), (x2, r2) in zip(epochs[0], epochs[2]):
        assert torch.equal(r0, r2) and torch.equal(x0, x2)
    assert not torch.equal(epochs[0][0][0], epochs[0][3][0])  # the second epoch is not the first again


@pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")  # 3 workers asked on 2 cores
def test_no_more_workers_than_batches_and_none_for_one(tmp_path: Path) -> None:
    """The default on a 16-core GPU host is 15 workers: a one-image prediction started them
    all. A loader of known length takes at most one per batch, and none for one batch."""
    data = make_class_folders(tmp_path / "d", {"red": 5, "green": 5})
    paths = sorted(str(p) for p in data.rglob("*.png"))
    pre = Preprocess(input_size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    dataset = eval_dataset(paths, None, pre)
    assert make_loader(eval_dataset(paths[:1], None, pre), 64, 15).num_workers == 0
    assert make_loader(dataset, 64, 15).num_workers == 0  # 10 images: one batch
    assert make_loader(dataset, 4, 15).num_workers == 3  # 3 batches
    assert make_loader(dataset, 4, 2).num_workers == 2
    assert [len(x) for x, _, _ in make_loader(dataset, 4, 2)] == [4, 4, 2]


class _Recording(torch.utils.data.Dataset):
    """Records which thread read each item; item `fail` raises."""

    def __init__(self, n: int, fail: int | None = None) -> None:
        self.n, self.fail, self.threads = n, fail, []  # type: int, int | None, list[str]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int | tuple[int, int]) -> torch.Tensor:
        i = i[0] if isinstance(i, tuple) else i  # (index, seed) from a SeededSampler
        self.threads.append(threading.current_thread().name)
        if i == self.fail:
            raise OSError(f"image {i} is truncated")
        return torch.tensor([i])


def _live_readers() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name == "visiontune-read-ahead"]


def test_read_ahead_gives_the_loaders_batches_read_by_another_thread() -> None:
    data = _Recording(10)
    loader = make_loader(data, 3, 0)
    assert [b.tolist() for b in read_ahead(loader)] == [b.tolist() for b in loader]
    assert set(data.threads) == {"visiontune-read-ahead", "MainThread"}  # the first pass read ahead, the second not
    assert not _live_readers()


def test_read_ahead_raises_the_loaders_error_and_stops_when_the_reader_stops() -> None:
    with pytest.raises(OSError, match="image 4 is truncated"):
        for _ in read_ahead(make_loader(_Recording(10, fail=4), 2, 0)):
            pass
    assert not _live_readers()
    data = _Recording(400)
    for i, _ in enumerate(read_ahead(make_loader(data, 2, 0), depth=2)):
        if i == 0:
            assert len(data.threads) == 2  # the first batch alone, read here
        if i == 2:
            break  # a deadline: the thread stops instead of reading all 200 batches
    assert not _live_readers()
    assert 6 <= len(data.threads) < 20 and "visiontune-read-ahead" in data.threads


def test_read_ahead_leaves_a_loader_with_workers_to_its_workers() -> None:
    loader = make_loader(_Recording(8), 2, 2)
    assert loader.num_workers == 2
    assert [b.tolist() for b in read_ahead(loader)] == [[[0], [1]], [[2], [3]], [[4], [5]], [[6], [7]]]


def test_read_ahead_reads_a_seeded_training_loader_in_the_main_thread() -> None:
    """Its augmentation seeds the global generators (seeded_randomness) in the main process."""
    data = _Recording(8)
    loader = torch.utils.data.DataLoader(data, batch_size=2, sampler=SeededSampler(range(8), seed=0))
    assert sorted(int(i) for b in read_ahead(loader) for i in b[:, 0]) == list(range(8))
    assert set(data.threads) == {"MainThread"}
