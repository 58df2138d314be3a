"""What a run keeps (issue 37): the epoch each monitor picks, post-decay weights under
warmup-stable-decay, and a run that ends with the converged probe when fine-tuning
cannot beat it, saying why."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

import visiontune as vt
from visiontune.errors import ConfigError
from visiontune.tasks.catalog import make_task
from visiontune.train.callbacks import Best, Checkpoint
from visiontune.train.clock import Clock

# A known history: (val_loss, accuracy, calibrated_loss) per epoch.
HISTORY = [(0.50, 0.80, 0.45), (0.45, 0.80, 0.44), (0.60, 0.85, 0.40), (0.55, 0.85, 0.42)]


def _picked(monitor: str, history=HISTORY) -> int:
    objective = make_task("single-label", ["a", "b"]).objective(monitor)
    best = Best(objective)
    for epoch, (loss, acc, calibrated) in enumerate(history):
        best.update({"val_loss": loss, "accuracy": acc, "calibrated_loss": calibrated}, epoch)
    return best.epoch


def test_each_monitor_picks_the_epoch_it_should_on_a_known_history() -> None:
    assert _picked("val_loss") == 1  # the lowest loss
    assert _picked("accuracy") == 3  # 0.85 twice: the tie goes to the lower validation loss (0.55 < 0.60)
    assert _picked("calibrated_loss") == 2  # the loss once over-confidence is taken out
    assert make_task("single-label", ["a", "b"]).objective("accuracy").tie_break == "val_loss"
    assert make_task("single-label", ["a", "b"]).objective("val_loss").tie_break == ""


def test_the_tie_break_survives_a_resume() -> None:
    objective = make_task("single-label", ["a", "b"]).objective("accuracy")
    best = Best(objective)
    best.update({"accuracy": 0.8, "val_loss": 0.5}, 0)
    again = Best(objective)
    again.load_state_dict(best.state_dict())
    assert not again.update({"accuracy": 0.8, "val_loss": 0.6}, 1)  # same accuracy, higher loss: not better
    assert again.update({"accuracy": 0.8, "val_loss": 0.4}, 2) and again.epoch == 2


def test_a_number_has_no_calibrated_loss_to_monitor() -> None:
    with pytest.raises(ConfigError, match="calibrated_loss"):
        make_task("regression", ["y"]).objective("calibrated_loss")
    assert "calibrated_loss" in make_task("multi-label", ["a", "b"]).monitors()


@pytest.fixture(scope="module")
def halves(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two classes told apart by which half of the image is bright: random frozen features
    (pooled over the image) separate them barely, fine-tuning learns it."""
    root = tmp_path_factory.mktemp("halves")
    rng = np.random.default_rng(0)
    for name in ("left", "right"):
        for i in range(20):
            arr = rng.normal(128, 30, (40, 40, 3))
            arr[:, :20] += 60 if name == "left" else 0
            arr[:, 20:] += 60 if name == "right" else 0
            (root / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(root / name / f"{i}.png")
    return root


def test_the_monitors_choose_from_the_history_the_run_recorded(halves: Path, tmp_path: Path, tiny: dict) -> None:
    """Each epoch records the loss after a temperature fitted on its validation outputs
    (never above the loss itself: T = 1 is among those tried); --monitor calibrated_loss
    keeps its lowest, --monitor accuracy its highest accuracy, ties to the lower loss."""
    options = dict(tiny, strategy="finetune", epochs=5, lr=0.01, output=str(tmp_path))
    calibrated = vt.fit(halves, monitor="calibrated_loss", name="calibrated", **options)
    rows = calibrated.history
    assert all(r["calibrated_loss"] <= r["val_loss"] + 1e-6 for r in rows)
    assert calibrated.best_epoch == 1 + min(range(len(rows)), key=lambda i: rows[i]["calibrated_loss"])
    accurate = vt.fit(halves, monitor="accuracy", name="accuracy", **options)
    rows = accurate.history
    assert accurate.best_epoch == 1 + min(range(len(rows)), key=lambda i: (-rows[i]["accuracy"], rows[i]["val_loss"]))


class _Decaying:
    """What the checkpoint sees of a trainer: per epoch its validation metrics and whether
    its weights are a candidate (warmup-stable-decay: in or after its decay)."""

    def __init__(self) -> None:
        self.state = SimpleNamespace(metrics={}, epoch=-1, candidate=True, last_eval=None, history=[])
        self.plan = SimpleNamespace(phases=[SimpleNamespace(probe=False)], phase_index=lambda epoch: 0)
        self.clock = Clock()

    def epoch(self, val_loss: float, candidate: bool) -> None:
        self.state.epoch += 1
        self.state.metrics, self.state.candidate = {"val_loss": val_loss}, candidate
        self.state.history.append(self.state.metrics)

    def adopt_chosen_weights(self) -> None: ...

    def broadcast_weights(self) -> None: ...


def test_under_warmup_stable_decay_the_run_keeps_post_decay_weights_not_the_best_at_the_peak(tmp_path: Path) -> None:
    checkpoint = Checkpoint(tmp_path, make_task("single-label", ["a", "b"]).objective("val_loss"), write=False)
    trainer = _Decaying()
    for loss, candidate in ((0.7, False), (0.30, False), (0.35, False), (0.40, True), (0.38, True)):
        trainer.epoch(loss, candidate)  # the lowest loss (0.30) at the peak LR; the decay's best is 0.38
        checkpoint.on_epoch_end(trainer)
    checkpoint.on_fit_end(trainer)
    assert checkpoint.best.epoch == 4 and checkpoint.best.value == 0.38
    assert "after the warmup-stable-decay decay (3 warming up or at the peak learning rate passed over)" \
        in checkpoint.why


def test_a_wsd_run_marks_only_its_decay_epochs_as_weights_to_keep(flat_data: Path, tmp_path: Path,
                                                                    tiny: dict) -> None:
    """10 epochs, the decay in the last fifth: epochs 9 and 10 are the candidates, and the
    kept epoch is the best of those by validation."""
    r = vt.fit(flat_data, **dict(tiny, strategy="finetune", epochs=10, schedule="wsd", lr=0.01,
                                 output=str(tmp_path)))
    assert [row["candidate"] for row in r.history] == [False] * 8 + [True] * 2
    assert r.best_epoch == min((9, 10), key=lambda e: r.history[e - 1]["val_loss"])
    assert "warmup-stable-decay decay" in json.loads((Path(r.run_dir) / "metrics.json").read_text())["kept"]


def test_a_run_whose_fine_tuning_cannot_beat_the_probe_ends_with_the_probe_and_says_why(
        halves: Path, tmp_path: Path, tiny: dict, caplog: pytest.LogCaptureFixture) -> None:
    """gradual, 8 epochs planned, fine-tuning at a learning rate far too low to change
    anything measurable (min_delta 1e-3): after --probe-patience 2 epochs that did not beat
    the probe the run ends, keeps the probe's weights and says so in one line."""
    with caplog.at_level(logging.INFO, logger="visiontune"):
        r = vt.fit(halves, **dict(tiny, strategy="gradual", epochs=8, patience=3, probe_patience=2, lr=1e-9,
                                  min_delta=1e-3, trainable_bn="eval", output=str(tmp_path)))
    assert len(r.history) == 3 and r.best_epoch == 1 and r.stopped_early
    said = [rec.getMessage() for rec in caplog.records if "the converged probe's: fine-tuning did not beat it" in
            rec.getMessage()]
    assert len(said) == 1 and said[0].startswith("kept epoch 1's weights")
    metrics = json.loads((Path(r.run_dir) / "metrics.json").read_text())
    assert metrics["kept"] == r.why_kept and "converged probe's" in metrics["kept"]
    assert metrics["stopped"].startswith("fine-tuning has not beaten the converged probe's val_loss in 2 epochs")


def test_a_run_whose_fine_tuning_beats_the_probe_goes_on(halves: Path, tmp_path: Path, tiny: dict) -> None:
    r = vt.fit(halves, **dict(tiny, strategy="gradual", epochs=6, patience=3, probe_patience=2, lr=0.01,
                              output=str(tmp_path)))
    probe = r.history[0]["val_loss"]
    assert min(row["val_loss"] for row in r.history[1:3]) < probe  # fine-tuning beat it within its patience
    assert len(r.history) == 6 and r.best_epoch > 1 and "converged probe" not in r.why_kept
