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
