"""`train --unlabeled POOL` in phases that train the backbone: FixMatch's consistency term
(train/consistency.py). An epoch covers the whole pool; the images whose weak view's
pseudo-label passes the threshold count, per class, and change the training."""

from __future__ import annotations

import csv
import logging
import re
from pathlib import Path

import pytest
import torch

import visiontune as vt
from conftest import TINY, make_class_folders, make_multilabel_data
from visiontune.train.callbacks import Callback


class Steps(Callback):
    def __init__(self) -> None:
        self.n = 0

    def on_step_end(self, trainer) -> None:
        self.n += 1


def test_each_epoch_covers_the_pool_and_what_passes_the_threshold_counts(tmp_path: Path,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    data = make_class_folders(tmp_path / "data", {"red": 6, "green": 6})
    pool = make_class_folders(tmp_path / "pool", {"red": 20, "green": 20}, start_seed=300)
    opts = dict(TINY, strategy="finetune", epochs=2, lr=1e-2, valid_pct=0.25, output=str(tmp_path / "runs"))
    steps = Steps()
    with caplog.at_level(logging.INFO, logger="visiontune"):
        everything = vt.fit(data, unlabeled=str(pool), consistency_threshold=0.0, callbacks=[steps], **opts)
    assert steps.n == 2 * 5  # 9 labelled images (2 batches of 8) cycle along 40 pool images (5 batches)
    lines = [m for m in caplog.messages if "consistency:" in m]
    assert len(lines) == 2 and all("40 of 40 pool images passed the 0 confidence" in m for m in lines)
    counts = [int(n) for n in re.findall(r"(?:green|red) (\d+)", lines[0])]
    assert sum(counts) == 40  # each image counted once, as the class its weak view says
    with open(Path(everything.run_dir) / "consistency.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["epoch"] for r in rows] == ["1", "2"] and all(r["seen"] == r["passed"] == "40" for r in rows)
    assert int(rows[0]["green"]) + int(rows[0]["red"]) == 40
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="visiontune"):
        nothing = vt.fit(data, unlabeled=str(pool), consistency_threshold=1.0, **opts)
    assert any("0 of 40 pool images passed the 1 confidence" in m for m in caplog.messages)
    weights = [vt.bundle.load_bundle(r.run_dir).model.head[-1].weight for r in (everything, nothing)]
    assert not torch.allclose(*weights)  # the term trained the model


def test_label_sets_count_each_label(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = make_multilabel_data(tmp_path / "ml", n=24)
    pool = make_multilabel_data(tmp_path / "pool", n=40, seed=5) / "images"
    with caplog.at_level(logging.INFO, logger="visiontune"):
        vt.fit(root, csv="labels.csv", unlabeled=str(pool), consistency_threshold=0.0, strategy="finetune",
               epochs=1, output=str(tmp_path / "runs"), **TINY)
    (line,) = [m for m in caplog.messages if "consistency:" in m]
    assert "40 of 40 pool images passed" in line and re.search(r"\((blue|green|red) \d+", line)



def test_a_step_retried_after_out_of_memory_counts_its_pool_images_once(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The first strong-view forward runs out of memory once: the step starts again with
    smaller micro-batches, and the pool images of that step are counted once, not twice."""
    from visiontune.models.classifier import Classifier

    forward, state = Classifier.forward, {"after_no_grad": False, "raised": False}

    def once(self: Classifier, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and state["after_no_grad"] and not state["raised"]:
            state["raised"] = True  # the strong view's forward, right after the weak view's
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        state["after_no_grad"] = not torch.is_grad_enabled()
        return forward(self, x)

    monkeypatch.setattr(Classifier, "forward", once)
    data = make_class_folders(tmp_path / "data", {"red": 6, "green": 6})
    pool = make_class_folders(tmp_path / "pool", {"red": 20, "green": 20}, start_seed=300)
    run = vt.fit(data, unlabeled=str(pool), consistency_threshold=0.0, **dict(
        TINY, strategy="finetune", epochs=1, valid_pct=0.25, output=str(tmp_path / "runs")))
    assert state["raised"]
    with open(Path(run.run_dir) / "consistency.csv", newline="") as fh:
        (row,) = list(csv.DictReader(fh))
    assert row["seen"] == row["passed"] == "40"


def test_one_pool_image_past_the_threshold_trains_with_the_batch_statistics_of_its_whole_batch() -> None:
    """Issue 34 item 18: the strong view went through the model with only the images past
    the threshold; one such image made a BatchNorm batch of one (a failure at 1x1 maps or
    BatchNorm1d, else one image's statistics). The strong views go through as the batch
    they came in, the loss counts the images past the threshold."""
    from torch import nn

    from visiontune.tasks.catalog import make_task
    from visiontune.train.consistency import Consistency, PoolBatch

    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2)).train()
    task = make_task("single-label", ["a", "b"])
    weak, strong = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)
    with torch.no_grad():
        confidence = torch.softmax(net(weak), dim=1).max(dim=1).values.sort(descending=True).values
    threshold = float(confidence[:2].mean())  # exactly one image passes
    term = Consistency(task, task.loss(), threshold, torch.device("cpu"), "fp32", channels_last=False)
    value = term.backward(net, PoolBatch(weak, strong, torch.arange(4), 0), chunk=4)
    passed = [row for (_, row), classes in term.outcomes.items() if classes is not None]
    assert len(term.outcomes) == 4 and len(passed) == 1 and value > 0
    assert net[1].weight.grad is not None and torch.isfinite(net[1].weight.grad).all()


def test_a_pool_batch_of_one_image_trains(tmp_path: Path) -> None:
    """Issue 34 item 18: 9 pool images in batches of 8 leave a pool batch of one; with
    BatchNorm training its statistics at the 1x1 maps of the last blocks its weak and strong
    forwards failed."""
    data = make_class_folders(tmp_path / "data", {"red": 6, "green": 6})
    pool = make_class_folders(tmp_path / "pool", {"red": 5, "green": 4}, start_seed=300)
    r = vt.fit(data, unlabeled=str(pool), consistency_threshold=0.0, strategy="finetune", epochs=1,
               trainable_bn="train", valid_pct=0.25, output=str(tmp_path / "runs"), **TINY)
    assert len(r.history) == 1 and r.history[0]["train_loss"] > 0
