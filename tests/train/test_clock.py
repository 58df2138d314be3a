"""The run's clock: the time used over every session, its record, and the schedule's
timings carried across a resume."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from visiontune.rundir import CLOCK_FILE
from visiontune.train.clock import HEARTBEAT_S, Clock
from visiontune.train.schedules import WSD_DECAY


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
