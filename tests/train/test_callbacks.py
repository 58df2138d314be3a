"""The callbacks' contract: the best epoch by the run's Objective, and stopping by
raising StopTraining (the run ends when the epoch ends; every callback sees that end)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

import visiontune as vt
from visiontune.errors import ConfigError
from visiontune.tasks.objective import Objective
from visiontune.train.callbacks import Best, Callback, StopTraining


def test_the_best_epoch_follows_the_objective_and_survives_a_resume() -> None:
    best = Best(Objective("accuracy", "max"), min_delta=0.05)
    assert [best.update({"accuracy": a}, e) for e, a in enumerate((0.5, 0.52, 0.6, math.nan, 0.58))] == \
        [True, False, True, False, False]
    assert (best.value, best.epoch) == (0.6, 2)
    again = Best(Objective("accuracy", "max"))
    again.load_state_dict(best.state_dict())
    assert (again.value, again.epoch) == (0.6, 2)


class _Events(Callback):
    """Every event it sees, as (event, epoch); raises StopTraining in `stop_in` at epoch `at`."""

    def __init__(self, seen: list[tuple[str, int]], stop_in: str = "", at: int = -1) -> None:
        self.seen, self.stop_in, self.at = seen, stop_in, at

    def _see(self, event: str, trainer) -> None:
        self.seen.append((event, trainer.state.epoch))
        if event == self.stop_in and trainer.state.epoch == self.at:
            raise StopTraining(f"planted in {event}")

    def on_epoch_start(self, trainer) -> None:
        self._see("start", trainer)

    def on_step_end(self, trainer) -> None:
        self._see("step", trainer)

    def on_epoch_end(self, trainer) -> None:
        self._see("end", trainer)

    def on_fit_end(self, trainer) -> None:
        self._see("fit_end", trainer)


def test_stop_training_ends_the_run_when_the_epoch_ends_and_every_callback_sees_it(flat_data: Path, tmp_path: Path,
                                                                                 tiny: dict) -> None:
    kw = dict(tiny, strategy="finetune", epochs=4, output=str(tmp_path / "runs"))
    for stop_in in ("end", "step"):  # from a step: that epoch still runs to its end
        first, after = [], []
        r = vt.fit(flat_data, name=stop_in, **kw, callbacks=[_Events(first, stop_in, at=1), _Events(after)])
        assert len(r.history) == 2 and (Path(r.run_dir) / "model.safetensors").is_file()
        assert [e for e in after if e[0] != "step"] == [("start", 0), ("end", 0), ("start", 1), ("end", 1),
                                                        ("fit_end", 1)]
        assert sum(e == ("step", 1) for e in after) == 3  # 24 images, 20% held out, batches of 8
        assert not r.stopped_early  # early stopping did not stop it: a callback did


class _OldStop(Callback):
    def on_epoch_end(self, trainer) -> None:
        trainer.state.should_stop = True  # how a callback stopped a run before StopTraining


def test_the_old_stop_flag_is_an_error_that_names_stop_training(flat_data: Path, tmp_path: Path, tiny: dict) -> None:
    """Setting trainer.state.should_stop once stopped a run; now nothing reads it, so it
    must not be silently ignored (the run would train every epoch)."""
    with pytest.raises(ConfigError, match="raise visiontune.train.callbacks.StopTraining"):
        vt.fit(flat_data, **dict(tiny, strategy="finetune", epochs=3, output=str(tmp_path / "runs")),
               callbacks=[_OldStop()])
