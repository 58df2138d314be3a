"""The run's clock: the time used over every session, its record, and the schedule's
timings carried across a resume."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from visiontune.rundir import CLOCK_FILE
from visiontune.train.clock import HEARTBEAT_S, Clock
from visiontune.train.schedules import ONECYCLE_DIV, WSD_DECAY


def test_the_record_keeps_the_time_used_while_the_run_goes_and_a_resumed_clock_goes_on_from_it(
        tmp_path: Path) -> None:
    clock = Clock(budget_s=100.0, started=time.perf_counter() - 30.0)  # 30 s of planning before the run directory
    clock.keep_record(tmp_path)
    assert json.loads((tmp_path / CLOCK_FILE).read_text()) == {"budget_s": 100.0, "used_s": pytest.approx(30, abs=0.5)}
    time.sleep(HEARTBEAT_S + 0.5)  # no checkpoint, no epoch end: the heartbeat alone writes
    assert json.loads((tmp_path / CLOCK_FILE).read_text())["used_s"] >= 30 + HEARTBEAT_S
    clock.stop()
    used = json.loads((tmp_path / CLOCK_FILE).read_text())["used_s"]
    assert used == pytest.approx(clock.used(), abs=0.05)  # on the way out: to the end

    resumed = Clock.resumed(tmp_path, 100.0)
    assert resumed.used_before == used and resumed.left() == pytest.approx(100.0 - used, abs=0.1)
    assert resumed.deadline == pytest.approx(time.perf_counter() + 100.0 - used, abs=0.1)
    resumed.charge(10.0)  # a checkpoint that knew less does not lower the count
    assert resumed.used_before == used
    assert Clock.resumed(tmp_path / "elsewhere", 100.0).used_before == 0.0  # no record: nothing known
    unbudgeted = Clock()
    unbudgeted.keep_record(tmp_path / "plain")
    unbudgeted.stop()
    assert unbudgeted.deadline is None and not unbudgeted.out_of_time(1e9)
    assert not (tmp_path / "plain" / CLOCK_FILE).exists()  # the record is the budget's


def test_the_schedules_progress_and_an_early_decay_go_on_after_a_resume(tmp_path: Path) -> None:
    """The phase's start, its epoch times and a decay begun early are in the run's own
    seconds and travel in the checkpoint: the resumed clock continues from the progress the
    run had (plus the time spent since), never from 0."""
    clock = Clock(budget_s=4.0)
    clock.enter_phase(1)
    time.sleep(0.4)
    clock.end_epoch(0.4)
    before = clock.phase_progress(0.0, 10, time.perf_counter())
    assert 0.05 < before < 0.5
    clock.keep_record(tmp_path)
    clock.stop()
    state = clock.state_dict()

    resumed = Clock.resumed(tmp_path, 4.0)
    resumed.load_state_dict(state)
    resumed.enter_phase(1)  # the phase the checkpoint was in: its timings stay
    after = resumed.phase_progress(0.0, 10, time.perf_counter())
    assert before <= after <= before + 0.05
    resumed.enter_phase(2)  # a new phase starts afresh
    assert resumed.phase_progress(0.0, 10, time.perf_counter()) == pytest.approx(0.0, abs=0.01)

    clock = Clock(budget_s=100.0)
    clock.enter_phase(1)
    clock.end_epoch(2.0)
    assert clock.decay_now() == pytest.approx(2.0)  # validation stalled at the peak: a decay of one epoch begins
    time.sleep(0.1)
    state, used = clock.state_dict(), clock.used()
    resumed = Clock(100.0, used_before=used)
    resumed.load_state_dict(state)
    resumed.enter_phase(1)
    decayed = resumed.phase_progress(0.0, 100, time.perf_counter())
    assert 1.0 - WSD_DECAY < decayed < 1.0 - WSD_DECAY / 2  # early in its decay, where it was: not back at the peak


def test_feature_extraction_stops_the_reserve_before_the_deadline_and_a_resumed_clock_keeps_it(
        tmp_path: Path) -> None:
    clock = Clock(budget_s=100.0, reserve_s=7.0)
    assert clock.extraction_deadline == pytest.approx(clock.deadline - 7.0)
    clock.charge(40.0)  # a checkpoint's count, read after the clock was built: the data reads it when it extracts
    assert clock.extraction_deadline == pytest.approx(time.perf_counter() + 60.0 - 7.0, abs=0.1)
    clock.keep_record(tmp_path)
    clock.stop()
    assert Clock.resumed(tmp_path, 100.0, reserve_s=7.0).extraction_deadline == pytest.approx(
        time.perf_counter() + 100.0 - clock.used() - 7.0, abs=0.1)
    assert Clock(reserve_s=7.0).extraction_deadline is None  # no budget: extraction runs to the end


def test_the_validation_estimate_is_the_last_validation_or_a_third_of_a_step_per_image() -> None:
    clock = Clock(budget_s=100.0)
    assert clock.validation_estimate(30, trained=60, seconds=6.0) == pytest.approx(1.0)  # 30 x 0.1 s / 3
    clock.validated(2.5)
    assert clock.validation_estimate(30, trained=60, seconds=6.0) == 2.5
    assert clock.validation_estimate(0, trained=0, seconds=0.0) == 2.5


def test_only_warmup_stable_decay_under_a_budget_in_a_phase_of_steps_follows_the_clock() -> None:
    budgeted = Clock(budget_s=100.0)
    assert budgeted.follows("wsd", probe=False)
    assert not budgeted.follows("wsd", probe=True) and not budgeted.follows("cosine", probe=False)
    assert not Clock().follows("wsd", probe=False)


def test_the_timed_factor_holds_the_peak_then_decays_and_says_when_it_is_done() -> None:
    clock = Clock(budget_s=10.0, started=time.perf_counter() - 5.0)  # half the budget used
    clock.enter_phase(0)  # the phase begins now and ends SAVE_MARGIN_S before the deadline: 4.5 s
    assert clock.timed_factor(0.0, 10, time.perf_counter()) == pytest.approx(1 / ONECYCLE_DIV, rel=0.05)
    assert clock.holding_peak and not clock.decayed  # warming up counts as before the decay
    clock.started -= 2.0  # 2 s of the phase's 4.5 s gone: at the peak
    assert clock.timed_factor(0.0, 10, time.perf_counter()) == 1.0 and clock.holding_peak
    clock.started -= 2.0  # 4 of 4.5 s: in the decay
    factor = clock.timed_factor(0.0, 10, time.perf_counter())
    assert factor is not None and factor < 1.0 and not clock.holding_peak and not clock.decayed
    clock.started -= 1.0  # past the end: the decay is complete, no further step
    assert clock.timed_factor(0.0, 10, time.perf_counter()) is None and clock.decayed
    assert clock.ends_run(3, 0.0, timed=True).startswith("time budget: the learning rate's decay ended with epoch 3")


def test_an_early_decay_ends_the_peak_at_once() -> None:
    clock = Clock(budget_s=100.0)
    clock.enter_phase(1)
    clock.end_epoch(1.0)
    clock.holding_peak = True
    clock.decay_now()
    assert not clock.holding_peak and clock.decay_window is not None


def test_the_run_ends_after_an_epoch_when_the_next_would_end_past_the_deadline_unless_the_clock_times_it() -> None:
    clock = Clock(budget_s=10.0, started=time.perf_counter() - 5.0)
    assert clock.ends_run(2, 1.0, timed=False) is None  # 5 s left, an epoch of 1 s fits
    assert clock.ends_run(2, 6.0, timed=False) == \
        "time budget: the next epoch would end after the deadline; stopping with the best weights"
    assert clock.ends_run(2, 6.0, timed=True) is None  # its schedule, not whole epochs, ends a timed phase
    assert Clock().ends_run(2, 1e9, timed=False) is None  # no budget: only the plan ends the run
