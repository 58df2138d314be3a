from __future__ import annotations

import time
from pathlib import Path

import pytest

from visiontune.config import TrainConfig
from visiontune.train.callbacks import Callback
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
    metrics per epoch, and the run's clock (whether the peak LR is held; decay_now)."""

    def __init__(self) -> None:
        from types import SimpleNamespace

        from visiontune.train.clock import Clock

        self.state = SimpleNamespace(metrics={}, epoch=-1)
        self.clock = Clock(budget_s=100.0)
        self.clock.enter_phase(1)
        self.clock.end_epoch(1.0)
        self.clock.holding_peak = True  # what the clock's timed_factor says at the peak
        self.plan = SimpleNamespace(phases=[SimpleNamespace(probe=True), SimpleNamespace(probe=False)],
                                    phase_index=lambda epoch: 0 if epoch == 0 else 1)

    @property
    def decays(self) -> int:
        return int(self.clock.decay_window is not None)

    def epoch(self, val_loss: float, peak: bool | None = None) -> None:
        if peak is not None:
            self.clock.holding_peak = peak
        self.state.epoch += 1
        self.state.metrics = {"val_loss": val_loss}


def test_a_stall_at_the_peak_begins_the_decay_and_the_decay_gets_its_own_patience() -> None:
    from visiontune.train.callbacks import PEAK_PATIENCE, EarlyStopping, StopTraining

    stopper, t = EarlyStopping(patience=2), _PeakTrainer()
    for loss in (0.5, 0.6, 0.7, 0.6):  # the probe's 0.5, then 3 epochs worse at the peak (< 2 x 2)
        t.epoch(loss)
        stopper.on_epoch_end(t)
    assert t.decays == 0
    t.epoch(0.7, peak=False)  # the clock begins the decay: its first epoch without improvement is 1 of 2, not 4
    stopper.on_epoch_end(t)
    t.epoch(0.7)
    with pytest.raises(StopTraining):  # patience 2 in the decay
        stopper.on_epoch_end(t)
    assert stopper.stopped_epoch == t.state.epoch

    stopper, t = EarlyStopping(patience=2), _PeakTrainer()
    for loss in (0.5, *[0.6] * PEAK_PATIENCE * 2):  # 2 x patience epochs worse at the peak: the decay begins now
        t.epoch(loss)
        stopper.on_epoch_end(t)
    assert t.decays == 1 and not t.clock.holding_peak and stopper.stopped_epoch is None
    t.epoch(0.6)
    stopper.on_epoch_end(t)  # the decay's own patience counts from its start: no StopTraining yet
    assert stopper.stopped_epoch is None


class _LearningRates(Callback):
    """The LR factor (lr / peak lr) of every step, by global step; `stop_when(trainer,
    factor)` True: raise there, as a crash would (the last checkpoint is on disk)."""

    def __init__(self, stop_when=None, slow_s: float = 0.0) -> None:
        self.factors: dict[int, float] = {}
        self.stop_when, self.slow_s = stop_when, slow_s

    def on_step_end(self, trainer) -> None:
        group = trainer.optimizer.param_groups[-1]
        factor = group["lr"] / group["peak_lr"]
        self.factors[trainer.state.global_step] = factor
        time.sleep(self.slow_s)  # a slower machine
        if self.stop_when is not None and self.stop_when(trainer, factor):
            raise _Crash


class _Crash(Exception):
    pass


def test_a_resumed_step_based_wsd_run_lands_on_the_same_learning_rates(flat_data: Path, tmp_path: Path,
                                                                      tiny: dict) -> None:
    """README: a resumed run lands on exactly the same LR. Step-based wsd: every step after
    the resume has the factor the uninterrupted run had at that step."""
    import visiontune as vt

    options = dict(tiny, strategy="finetune", epochs=6, schedule="wsd")
    calm = _LearningRates()
    vt.fit(flat_data, callbacks=[calm], **dict(options, output=str(tmp_path / "calm")))
    crashed = _LearningRates(stop_when=lambda trainer, _: trainer.state.epoch == 5)  # in the decay
    with pytest.raises(_Crash):
        vt.fit(flat_data, callbacks=[crashed], **dict(options, output=str(tmp_path / "crashy")))
    (run,) = (tmp_path / "crashy").iterdir()
    resumed = _LearningRates()
    vt.fit(resume=str(run), callbacks=[resumed])
    first = min(resumed.factors)
    assert calm.factors[first] < 1.0  # resumed in the decay
    assert resumed.factors == pytest.approx({s: calm.factors[s] for s in resumed.factors}, abs=1e-12)
    assert max(resumed.factors) == max(calm.factors)


@pytest.mark.xdist_group("deadlines")  # a real clock: with the other deadline tests, one at a time
def test_a_resumed_clock_driven_wsd_run_goes_on_from_its_progress_instead_of_warming_up_again(
        flat_data: Path, tmp_path: Path, tiny: dict) -> None:
    """Issue 34: under a time budget wsd follows the clock; a resumed run restarted its
    phase's clock, so it warmed up again from peak / 25. "The same LR" for the clock-driven
    schedule: the factor of the run's progress in its own time, counted over every session
    (the time after the last checkpoint and the resumed session's start-up included: both
    were spent). Crashed at the peak, a third of the way through the phase, the run resumes
    at the peak, and from there its LR only goes down: no second warm-up."""
    import visiontune as vt
    from visiontune.data.sources import load_items
    from visiontune.train.clock import Clock
    from visiontune.train.session import train_run

    budget = 12.0
    cfg = vt.RunConfig.create(None, path=str(flat_data), **dict(tiny, strategy="finetune", epochs=30, schedule="wsd",
                                                                time_budget=budget, output=str(tmp_path / "r")))
    crashed = _LearningRates(stop_when=lambda trainer, f: trainer.clock.used() > budget * 0.3 and f == 1.0,
                             slow_s=0.2)  # 30 epochs take longer than the budget: the deadline ends the run
    with pytest.raises(_Crash):
        train_run(cfg, load_items(cfg.data), callbacks=[crashed], clock=Clock(budget))
    assert min(crashed.factors.values()) < 0.5  # it warmed up, then held the peak
    (run,) = (tmp_path / "r").iterdir()
    resumed = _LearningRates(slow_s=0.2)
    result = vt.fit(resume=str(run), callbacks=[resumed])
    factors = [resumed.factors[s] for s in sorted(resumed.factors)]
    assert factors[0] == 1.0  # at the peak, where it was: not peak / 25
    assert all(b <= a for a, b in zip(factors, factors[1:]))  # the peak, then (time permitting) the decay
    assert result.seconds <= budget * 1.05 + 1.0
