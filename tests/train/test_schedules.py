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
