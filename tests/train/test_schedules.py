from __future__ import annotations

import pytest

from visiontune.config import TrainConfig
from visiontune.train.schedules import ONECYCLE_DIV, ONECYCLE_DIV_FINAL, lr_factor


def test_onecycle_warms_up_then_anneals() -> None:
    t = TrainConfig(schedule="onecycle", pct_start=0.25)
    assert lr_factor(t, 0.0, 0) == pytest.approx(1 / ONECYCLE_DIV)
    assert lr_factor(t, 0.25, 0) == pytest.approx(1.0)
    assert lr_factor(t, 1.0, 0) == pytest.approx(1 / ONECYCLE_DIV_FINAL)
    ups = [lr_factor(t, p / 100, 0) for p in range(0, 26)]
    downs = [lr_factor(t, p / 100, 0) for p in range(25, 101)]
    assert ups == sorted(ups) and downs == sorted(downs, reverse=True)


def test_cosine_step_constant() -> None:
    assert lr_factor(TrainConfig(schedule="cosine"), 0.5, 0) == pytest.approx(0.5)
    assert lr_factor(TrainConfig(schedule="cosine"), 1.0, 0) == pytest.approx(0.0)
    step = TrainConfig(schedule="step", step_size=2, gamma=0.1)
    assert [lr_factor(step, 0, e) for e in range(5)] == pytest.approx([1, 1, 0.1, 0.1, 0.01])
    assert lr_factor(TrainConfig(schedule="constant"), 0.7, 3) == 1.0


def test_warmup_stable_decay_holds_the_peak_then_decays_in_its_last_fifth() -> None:
    from visiontune.train.schedules import WSD_DECAY, WSD_WARMUP

    t = TrainConfig(schedule="wsd")
    assert lr_factor(t, 0.0, 0) == pytest.approx(1 / ONECYCLE_DIV)
    assert all(lr_factor(t, p, 0) == 1.0 for p in (WSD_WARMUP, 0.5, 1 - WSD_DECAY))
    decay = [lr_factor(t, 1 - WSD_DECAY + WSD_DECAY * i / 20, 0) for i in range(21)]
    assert decay == sorted(decay, reverse=True) and decay[-1] == pytest.approx(1 / ONECYCLE_DIV_FINAL)


class _PeakTrainer:
    """What EarlyStopping sees of a trainer under a time-decided schedule: validation
    metrics per epoch, whether the peak LR is held, and decay_now."""

    def __init__(self) -> None:
        from types import SimpleNamespace

        self.state = SimpleNamespace(metrics={}, epoch=-1, should_stop=False)
        self.holding_peak = True
        self.plan = SimpleNamespace(phases=[SimpleNamespace(probe=True), SimpleNamespace(probe=False)],
                                    phase_index=lambda epoch: 0 if epoch == 0 else 1)
        self.decays = 0

    def decay_now(self) -> float:
        self.decays += 1
        self.holding_peak = False
        return 1.0

    def epoch(self, val_loss: float, peak: bool | None = None) -> None:
        if peak is not None:
            self.holding_peak = peak
        self.state.epoch += 1
        self.state.metrics = {"val_loss": val_loss}


def test_a_stall_at_the_peak_begins_the_decay_and_the_decay_gets_its_own_patience() -> None:
    from visiontune.train.callbacks import PEAK_PATIENCE, EarlyStopping

    stopper, t = EarlyStopping(patience=2), _PeakTrainer()
    for loss in (0.5, 0.6, 0.7, 0.6):  # the probe's 0.5, then 3 epochs worse at the peak (< 2 x 2)
        t.epoch(loss)
        stopper.on_epoch_end(t)
    assert t.decays == 0 and not t.state.should_stop
    t.epoch(0.7, peak=False)  # the clock begins the decay: its first epoch without improvement is 1 of 2, not 4
    stopper.on_epoch_end(t)
    assert not t.state.should_stop
    t.epoch(0.7)
    stopper.on_epoch_end(t)
    assert t.state.should_stop  # patience 2 in the decay

    stopper, t = EarlyStopping(patience=2), _PeakTrainer()
    for loss in (0.5, *[0.6] * PEAK_PATIENCE * 2):  # 2 x patience epochs worse at the peak: the decay begins now
        t.epoch(loss)
        stopper.on_epoch_end(t)
    assert t.decays == 1 and not t.state.should_stop
    t.epoch(0.6)
    stopper.on_epoch_end(t)
    assert not t.state.should_stop  # the decay's own patience counts from its start
