"""The run's clock: the one owner of the time a run has used and of its time budget.

A run's time is counted over every session: a resumed run goes on from the seconds the
earlier sessions used (`used_before`), so `--resume` keeps what is left of `--time-budget`
however the run was stopped. Under a budget the clock keeps a record, RUN/clock.json
({"budget_s", "used_s"}), written when the run directory opens, every HEARTBEAT_S by a
thread of its own (feature extraction, the probe's fit and the steps alike) and on the way
out: a run killed before its first checkpoint, or minutes after its last one, is charged
the time it used, to within HEARTBEAT_S (SIGKILL) or exactly (Ctrl-C, an exception).

It decides what the deadline asks of the trainer: when feature extraction stops
(`extraction_deadline`: `reserve_s` before the deadline, the probe's fit needs that
long), whether one more step leaves time to validate (`validation_estimate`,
`out_of_time`), and whether the run ends after an epoch (`ends_run`).

It also holds what the time-decided schedule (warmup-stable-decay by the clock,
train/schedules.py) reads: when the current phase began and how long its epochs took, and
a decay begun early (`decay_now`), all in the run's own seconds and saved in the
checkpoint, so a resumed run continues its schedule from the progress it had instead of
warming up again; `wsd_factor` turns that progress into the next step's learning rate and
says whether the peak is still held (`holding_peak`: early stopping waits) and whether
the decay is complete (`decayed`: no further step).
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

from visiontune.rundir import RunDir
from visiontune.train.schedules import WSD_DECAY, wsd_factor

log = logging.getLogger(__name__)

HEARTBEAT_S = 2.0  # the record's period: a SIGKILL loses at most this much of the time used
SAVE_MARGIN_S = 0.5  # kept after the last validation under a deadline: writing the run's files


class Clock:
    """The seconds a run has used (over every session), when its budget ends in this
    process's `time.perf_counter()` (`deadline`; None without a budget), and the current
    phase's timings for the schedule that follows the clock. `reserve_s`: feature
    extraction stops this long before the deadline (the probe's fit needs it); `finish_s`:
    training stops this long before it (the work after training needs it: the OOD score's
    feature pass, train/calibrate.fit_ood)."""

    def __init__(self, budget_s: float | None = None, started: float | None = None, used_before: float = 0.0,
                 reserve_s: float = 0.0, finish_s: float = 0.0):
        self.budget_s = budget_s
        self.started = time.perf_counter() if started is None else started  # when this session's count began
        self.used_before = used_before  # seconds the earlier sessions of the run used
        self.reserve_s = reserve_s
        self.finish_s = finish_s
        self.validation_s = 0.0  # how long this session's last validation took
        self.holding_peak = False  # a time-decided schedule before its decay: early stopping waits (callbacks.py)
        self.decayed = False  # the time-decided schedule finished its decay: no further step
        self.phase = -1  # the phase the timings below are of
        self.phase_started = 0.0  # the run's seconds when it began
        self.epoch_seconds: list[float] = []  # its epochs' measured times (training + validation)
        self.decay_window: tuple[float, float] | None = None  # (start, end) of a decay begun early, run seconds
        self._record: RunDir | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None
        self._warned = False

    @classmethod
    def resumed(cls, run_dir: Path, budget_s: float | None, started: float | None = None,
                reserve_s: float = 0.0, finish_s: float = 0.0) -> Clock:
        """The clock of the run in `run_dir`, going on from the seconds its record says
        it used (0 when it has none: a run without a budget, or from before the record)."""
        used = 0.0
        try:
            used = RunDir(run_dir).read_clock()
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("%s cannot be read (%s); the time used before counts from the last checkpoint",
                        RunDir(run_dir).clock_file, exc)
        return cls(budget_s, started, used, reserve_s, finish_s)

    # -- the time used, and the budget -------------------------------------------------
    def used(self) -> float:
        """Seconds the run has used so far, over every session."""
        return self.at(time.perf_counter())

    def at(self, moment: float) -> float:
        """The run's seconds at `moment` (a `time.perf_counter()` of this session)."""
        return self.used_before + moment - self.started

    @property
    def deadline(self) -> float | None:
        """When the budget ends, in this process's `time.perf_counter()` (None: no budget)."""
        return None if self.budget_s is None else self.started + self.budget_s - self.used_before

    @property
    def extraction_deadline(self) -> float | None:
        """When feature extraction stops, in `time.perf_counter()`: `reserve_s` before the
        deadline, so that the probe's fit ends in time (None: no budget)."""
        deadline = self.deadline
        return None if deadline is None else deadline - self.reserve_s

    def left(self) -> float | None:
        """Seconds of the budget left (None: no budget)."""
        return None if self.budget_s is None else self.budget_s - self.used()

    def out_of_time(self, still_needed: float = 0.0) -> bool:
        """Past the deadline once `still_needed` more seconds, and the work after training
        (`finish_s`), are spent (no budget: never)."""
        deadline = self.deadline
        return deadline is not None and time.perf_counter() + still_needed + self.finish_s > deadline

    def charge(self, seconds: float) -> None:
        """Count `seconds` more as used before this session (a checkpoint from before the
        record knew more than it: the larger count wins)."""
        self.used_before = max(self.used_before, seconds)

    # -- the record --------------------------------------------------------------------
    def keep_record(self, run_dir: Path) -> None:
        """Under a budget: RUN/clock.json now, then every HEARTBEAT_S until `stop`."""
        if self.budget_s is None or self._beat is not None:
            return
        self._record = RunDir(run_dir)
        self._write()
        self._stop.clear()
        self._beat = threading.Thread(target=self._beat_loop, name="visiontune-clock", daemon=True)
        self._beat.start()

    def stop(self) -> None:
        """End the heartbeat and write the record once more: the time used to the end."""
        if self._beat is not None:
            self._stop.set()
            self._beat.join()
            self._beat = None
        if self._record is not None:
            self._write()

    def _beat_loop(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            self._write()

    def _write(self) -> None:
        """The record, atomically; a record that cannot be written is said once and costs
        only its accuracy (a resumed run then counts from the last checkpoint)."""
        with self._lock:
            try:
                self._record.write_clock(self.budget_s, round(self.used(), 3))
            except OSError as exc:
                if not self._warned:
                    log.warning("time budget: %s cannot be written (%s); a resumed run would count the time used "
                                "from its last checkpoint", self._record.clock_file, exc)
                self._warned = True

    # -- what the deadline asks of the epochs ---------------------------------------------
    def validated(self, seconds: float) -> None:
        """The last validation took `seconds`: what the next one is expected to take."""
        self.validation_s = seconds

    def validation_estimate(self, images: int, trained: int, seconds: float) -> float:
        """Seconds validating `images` will take: the last validation's, or, where that ran
        on cached features and this phase runs on images, a third of a training step per
        image (`trained` images took `seconds` so far this epoch)."""
        return max(self.validation_s, images * seconds / max(1, trained) / 3)

    def ends_run(self, epoch: int, next_epoch_s: float, timed: bool) -> str | None:
        """Why the run ends after `epoch` (1-based), in a line for the log, or None: the
        time-decided decay is complete, or, in a phase whose learning rate does not follow
        the clock (`timed`), another epoch of `next_epoch_s` would end past the deadline."""
        if self.decayed:
            return (f"time budget: the learning rate's decay ended with epoch {epoch} (warmup-stable-decay, timed to "
                    "the deadline); stopping with the best weights")
        if self.out_of_time(next_epoch_s) and not timed:
            return "time budget: the next epoch would end after the deadline; stopping with the best weights"
        return None

    # -- the time-decided schedule --------------------------------------------------------
    def follows(self, schedule: str, probe: bool) -> bool:
        """Whether a phase's learning rate follows the clock: warmup-stable-decay (`schedule`)
        under a budget, in a phase whose weights train by steps (not the converged `probe`)."""
        return self.budget_s is not None and schedule == "wsd" and not probe

    def timed_factor(self, validation_s: float, epochs_left: int, loop_started: float) -> float | None:
        """The next step's peak-LR multiplier under warmup-stable-decay by the clock, from the
        phase's progress in time (`phase_progress`); None once its decay is complete. Says
        whether the peak is still held (`holding_peak`) and the decay done (`decayed`)."""
        progress = self.phase_progress(validation_s, epochs_left, loop_started)
        self.decayed = progress >= 1.0
        self.holding_peak = progress < 1.0 - WSD_DECAY
        return None if self.decayed else wsd_factor(progress)

    def enter_phase(self, index: int) -> None:
        """The phase `index` runs now: its timings start afresh unless they are its own
        (a resumed run continues the phase its checkpoint was in)."""
        if index != self.phase:
            self.phase, self.phase_started, self.epoch_seconds, self.decay_window = index, self.used(), [], None

    def end_epoch(self, seconds: float) -> None:
        self.epoch_seconds.append(seconds)

    def per_epoch(self) -> float:
        """The current phase's mean epoch time so far (0.0 before its first epoch)."""
        return sum(self.epoch_seconds) / len(self.epoch_seconds) if self.epoch_seconds else 0.0

    def phase_progress(self, validation_s: float, epochs_left: int, loop_started: float) -> float:
        """How far through its time the current phase is (0..1; past 1: its decay is done).
        It ends when the last validation (`validation_s`) must start to end by the deadline,
        or, where its `epochs_left` (counting the current one, begun at `loop_started`)
        run out first by the epoch times measured so far, when they do; a decay begun early
        goes through its window, or by the clock if that is further."""
        now = self.used()
        end = float(self.budget_s or 0.0) - validation_s - self.finish_s - SAVE_MARGIN_S
        if self.epoch_seconds:
            end = min(end, self.at(loop_started) + epochs_left * self.per_epoch() - validation_s)
        progress = (now - self.phase_started) / max(1e-9, end - self.phase_started)
        if self.decay_window is not None:
            start, stop = self.decay_window
            progress = max(progress, 1.0 - WSD_DECAY + WSD_DECAY * (now - start) / (stop - start))
        return progress

    def decay_now(self) -> float:
        """Begin the decay at the next step instead of when the time left equals its length
        (EarlyStopping calls it when validation has stalled at the peak LR): it takes
        WSD_DECAY of the phase as it now ends, at least one epoch, and the run ends after
        it; returns its expected seconds. Kept in the checkpoint: a resumed run goes on
        decaying."""
        self.holding_peak = False
        now = self.used()
        length = max(self.per_epoch(), (now - self.phase_started) * WSD_DECAY / (1.0 - WSD_DECAY), 1e-3)
        self.decay_window = (now, now + length)
        return length

    # -- resumability ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"phase": self.phase, "phase_started": self.phase_started, "epoch_seconds": list(self.epoch_seconds),
                "decay_window": list(self.decay_window) if self.decay_window is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.phase = int(state.get("phase", -1))
        self.phase_started = float(state.get("phase_started", 0.0))
        self.epoch_seconds = [float(s) for s in state.get("epoch_seconds", [])]
        window = state.get("decay_window")
        self.decay_window = (float(window[0]), float(window[1])) if window else None
