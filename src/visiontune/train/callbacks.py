"""Callbacks: a handful of events with no-op defaults and a typed state.

Events: on_fit_start, on_epoch_start, on_step_end (after each optimizer step of an
epoch on images or features; not the converged probe), on_epoch_end, on_fit_end. Each receives the trainer
(`TrainerView`: its state, model, config, clock...). A callback that wants to stop training
raises `StopTraining`: the run ends when the current epoch ends (the other callbacks still
see that epoch's end). `state_dict()` / `load_state_dict()` make a callback resumable.
Early stopping and the best checkpoint compare epochs by the run's `Objective`
(tasks/objective.py); the checkpoint keeps only epochs whose weights may be kept
(`state.candidate`: under warmup-stable-decay those in or after its decay, train/schedules.keepable),
and says which it kept and why (`Checkpoint.why`). Early stopping ends a run whose
fine-tuning has not beaten the converged probe within `probe_patience` epochs. This
module does not import the trainer: the trainer imports it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Protocol

from safetensors.torch import load_file

from visiontune.models.classifier import load_weights
from visiontune.rundir import RunDir
from visiontune.runtime.inference import EvalOutput
from visiontune.tasks.objective import VAL_LOSS, Objective
from visiontune.train.clock import Clock

log = logging.getLogger(__name__)

NON_METRIC_KEYS = ("epoch", "phase", "lr", "seconds", "candidate")  # history columns that are not metrics


def metrics_of(row: dict[str, Any], keep_train_loss: bool = False) -> dict[str, float]:
    """The metrics in one history row (the losses and validation metrics), without the
    bookkeeping columns; `train_loss` only when `keep_train_loss`."""
    drop = NON_METRIC_KEYS if keep_train_loss else (*NON_METRIC_KEYS, "train_loss")
    return {k: v for k, v in row.items() if k not in drop}


class TrainerView(Protocol):
    """What callbacks may use of the trainer."""

    state: Any  # TrainState: epoch, history, metrics, last_eval
    model: Any
    optimizer: Any
    cfg: Any
    task: Any
    preprocess: Any
    total_epochs: int
    env: Any  # DistEnv: rank, world size
    run_dir: Path  # os.devnull on processes other than rank 0
    clock: Clock  # the time budget: holding_peak (EarlyStopping waits), decay_now
    plan: Any  # Plan: the phases (which epoch a converged probe fitted)

    def save_checkpoint(self, path: Path) -> None: ...
    def broadcast_weights(self) -> None: ...
    def chosen_model(self) -> Any: ...
    def adopt_chosen_weights(self) -> None: ...


def _best_state(state: dict[str, Any]) -> dict[str, Any]:
    """The saved `Best` in a callback's state: "best", or "tracker" in checkpoints written
    before it was named for what it holds."""
    return state.get("best", state.get("tracker", {}))


class StopTraining(Exception):  # noqa: N818 - a request, like StopIteration, not an error
    """Raised by a callback to end the run when the current epoch ends, with the best weights."""


class Callback:
    def on_fit_start(self, trainer: TrainerView) -> None: ...
    def on_epoch_start(self, trainer: TrainerView) -> None: ...
    def on_step_end(self, trainer: TrainerView) -> None: ...
    def on_epoch_end(self, trainer: TrainerView) -> None: ...
    def on_fit_end(self, trainer: TrainerView) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Best:
    """The best value of the run's objective so far and its epoch (early stopping's and the
    checkpoint's): an epoch is better when it beats the best by more than `min_delta`."""

    def __init__(self, objective: Objective, min_delta: float = 0.0) -> None:
        self.objective, self.min_delta = objective, min_delta
        self.value: float | None = None
        self.tie: float | None = None  # the best epoch's tie-break (validation loss), when the objective has one
        self.epoch = -1

    def update(self, metrics: dict[str, float], epoch: int) -> bool:
        """Record this epoch's value; True when it improves on the best so far (or ties it
        with a lower tie-break)."""
        v, tie = self.objective.value(metrics), self.objective.tie(metrics)
        better = self.objective.improves(v, self.value, self.min_delta, tie, self.tie)
        if better:
            self.value, self.tie, self.epoch = v, tie, epoch
        return better

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.value, "best_tie": self.tie, "best_epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value, self.tie, self.epoch = state.get("best"), state.get("best_tie"), int(state.get("best_epoch", -1))


def _probe_epoch(trainer: TrainerView, epoch: int) -> bool:
    """Whether `epoch` was a converged probe's (the head fitted on frozen features)."""
    return epoch >= 0 and bool(trainer.plan.phases[trainer.plan.phase_index(epoch)].probe)


PEAK_PATIENCE = 2  # x patience: epochs without improvement at a time-decided schedule's peak LR before its decay


class EarlyStopping(Callback):
    """Stop (raise StopTraining) when the `objective` has not improved for `patience`
    epochs, or, after a converged probe, when `probe_patience` epochs of fine-tuning have
    not beaten it (fine-tuning that cannot pay: the run ends with the probe's weights).
    Under a time-decided schedule (warmup-stable-decay by the clock, --time-budget) the
    peak LR's epochs say little of where the decay ends, so there it does not stop: it
    begins the decay early (`Clock.decay_now`) after PEAK_PATIENCE x `patience` epochs
    without improvement at the peak, or after `probe_patience` when the best is still the
    probe's, and the run ends after the decay (whose epochs may still beat the probe)
    instead of spending the budget at a peak that no longer improves. `reason`: why it
    stopped or began the decay ("" when it did neither)."""

    def __init__(self, objective: Objective = VAL_LOSS, patience: int = 3,
                 min_delta: float = 0.0, probe_patience: int = 0) -> None:
        self.best = Best(objective, min_delta)
        self.patience, self.probe_patience = patience, probe_patience
        self.wait = 0  # epochs without improvement since the decay began (or, without a time-decided schedule, at all)
        self.peak_wait = 0  # epochs without improvement at a time-decided schedule's peak
        self.stopped_epoch: int | None = None
        self.reason = ""

    def on_epoch_end(self, trainer: TrainerView) -> None:
        state = trainer.state
        best = self.best
        if best.update(state.metrics, state.epoch):
            self.wait = self.peak_wait = 0
            return
        if self._probe_unbeaten(trainer):
            self._fine_tuning_cannot_pay(trainer)
            return
        if trainer.clock.holding_peak:  # warmup-stable-decay by the clock, before its decay: the decay's own patience
            self.peak_wait += 1
            if self.patience and self.peak_wait >= PEAK_PATIENCE * self.patience:
                self._decay_now(trainer, f"{best.objective.metric} has not improved for {self.peak_wait} epochs at "
                                         "the peak learning rate")
            return
        self.wait += 1
        if self.patience and self.wait >= self.patience:
            self._stop(trainer, f"{best.objective.metric} has not improved for {self.wait} epochs (best "
                                f"{best.value:.4f} at epoch {best.epoch + 1})")

    def _probe_unbeaten(self, trainer: TrainerView) -> bool:
        """The best epoch is still the converged probe's, `probe_patience` epochs on."""
        epochs = trainer.state.epoch - self.best.epoch
        return bool(self.probe_patience) and _probe_epoch(trainer, self.best.epoch) and epochs >= self.probe_patience

    def _fine_tuning_cannot_pay(self, trainer: TrainerView) -> None:
        """Fine-tuning has not beaten the probe: at a time-decided peak the decay begins now
        (once; its epochs are the last chance), in a time-decided decay the clock ends the
        run after it, else the run stops here with the probe's weights."""
        epochs, metric = trainer.state.epoch - self.best.epoch, self.best.objective.metric
        said = f"fine-tuning has not beaten the converged probe's {metric} in {epochs} epochs"
        if trainer.clock.holding_peak:
            self._decay_now(trainer, f"{said} at the peak learning rate")
        elif not trainer.clock.follows(trainer.cfg.train.schedule, False):
            self._stop(trainer, f"{said} ({self.best.value:.4f} at epoch {self.best.epoch + 1}); the run ends with the "
                                "probe's weights")

    def _decay_now(self, trainer: TrainerView, why: str) -> None:
        seconds = trainer.clock.decay_now()
        self.reason = f"{why}: the decay began early"
        log.info("time budget: %s (best %.4f at epoch %d%s); the decay begins now and the run ends after it (about "
                 "%.0f s)", why, self.best.value, self.best.epoch + 1,
                 ", the converged probe's" if _probe_epoch(trainer, self.best.epoch) else "", seconds)

    def _stop(self, trainer: TrainerView, why: str) -> None:
        self.stopped_epoch, self.reason = trainer.state.epoch, why
        log.info("early stopping: %s", why)
        raise StopTraining(why)

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best.state_dict(), "wait": self.wait, "peak_wait": self.peak_wait, "reason": self.reason}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best.load_state_dict(_best_state(state))
        self.wait, self.peak_wait = int(state.get("wait", 0)), int(state.get("peak_wait", 0))
        self.reason = str(state.get("reason", ""))


class Checkpoint(Callback):
    """The weights the run ends with -> `<run>/model.safetensors`; full state ->
    `<run>/checkpoints/last.pt`.

    With `restore_best` (the default) that is the best epoch's weights among those that
    may be kept (`state.candidate`: under warmup-stable-decay, the epochs in or after its
    decay and the converged probe's, never those at the peak LR), written when the
    objective improves and restored at the end; without it, the last epoch's (written
    every epoch). `why`: which weights the run ended with and why, in a line (logged at
    the end, and in metrics.json).
    """

    def __init__(self, run_dir: Path, objective: Objective, restore_best: bool = True,
                 min_delta: float = 0.0, write: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.write = write  # False in processes other than rank 0: track, never write
        self.best = Best(objective, min_delta)  # same notion of "better" as EarlyStopping
        self.restore_best = restore_best
        self.best_eval: EvalOutput | None = None  # validation outputs (probabilities) of the best epoch
        self.passed_over = 0  # epochs that were not candidates (warmup-stable-decay before its decay)
        self.why = ""

    def on_epoch_end(self, trainer: TrainerView) -> None:
        state = trainer.state
        self.passed_over += not state.candidate
        improved = state.candidate and self.best.update(state.metrics, state.epoch)
        if improved:
            self.best_eval = state.last_eval
        if not self.write:
            return
        if improved or not self.restore_best:  # the EMA's weights when they validated better
            RunDir(self.run_dir).write_model(trainer.chosen_model(), trainer.task, trainer.preprocess, trainer.cfg.model)
        trainer.save_checkpoint(RunDir(self.run_dir).last_checkpoint)

    def on_fit_end(self, trainer: TrainerView) -> None:
        """Rank 0 reads the best weights back; every process then takes rank 0's (the
        best epochs agree: validation metrics are reduced over the processes). Says which
        weights the run ends with, and why (`why`)."""
        best = self.best
        self.why = self._why(trainer)
        log.info("kept %s", self.why)
        history = trainer.state.history
        if not self.restore_best or best.epoch < 0 or best.epoch == trainer.state.epoch:
            trainer.adopt_chosen_weights()  # the last epoch's: the EMA's when they were better
            if self.restore_best and best.epoch < 0 and history:  # no epoch could be kept: the last recorded is
                best.epoch, best.value = len(history) - 1, history[-1].get(best.objective.metric)
                self.best_eval = trainer.state.last_eval
            return
        if self.write:
            load_weights(trainer.model, load_file(str(RunDir(self.run_dir).model)))
        trainer.broadcast_weights()

    def _why(self, trainer: TrainerView) -> str:
        """Which epoch's weights the run ends with and why, in words."""
        best, last = self.best, trainer.state.epoch
        if not self.restore_best:
            return f"the last epoch's weights (epoch {last + 1}; --no-restore-best)"
        if best.epoch < 0:
            return (f"the last epoch's weights (epoch {last + 1}): no epoch could be kept by {best.objective.metric}"
                    f"{' (none ended inside a warmup-stable-decay decay)' if self.passed_over else ''}")
        said = f"epoch {best.epoch + 1}'s weights ({best.objective.metric}={best.value:.4f})"
        if _probe_epoch(trainer, best.epoch) and last > best.epoch:
            return (f"{said}, the converged probe's: fine-tuning did not beat it on validation in "
                    f"{last - best.epoch} epochs")
        if self.passed_over:
            return (f"{said}: the best of the epochs in or after the warmup-stable-decay decay ({self.passed_over} "
                    "warming up or at the peak learning rate passed over)")
        return f"{said}: the best on validation" + ("" if best.epoch < last else ", the last epoch")

    def state_dict(self) -> dict[str, Any]:
        """The best so far (`Best`) and the best epoch's validation outputs (tensors: a
        checkpoint holds no pickled objects), so a resumed run tunes thresholds and reports probabilities of
        the epoch whose weights it keeps."""
        outputs = {} if self.best_eval is None else self.best_eval.state_dict()
        return {"best": self.best.state_dict(), "best_eval": outputs, "passed_over": self.passed_over}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best.load_state_dict(_best_state(state))
        self.passed_over = int(state.get("passed_over", 0))
        self.best_eval = EvalOutput.of_state(state.get("best_eval"))


class HistoryLogger(Callback):
    """`history.jsonl` and `history.csv`: one row per epoch, rewritten atomically."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)

    def on_epoch_end(self, trainer: TrainerView) -> None:
        RunDir(self.run_dir).write_history(trainer.state.history)


class EpochPrinter(Callback):
    """One log line per epoch with losses, metrics and time."""

    def on_epoch_end(self, trainer: TrainerView) -> None:
        row = trainer.state.history[-1]
        shown = " ".join(f"{k}={v:.4f}" for k, v in metrics_of(row, keep_train_loss=True).items()
                         if isinstance(v, float))
        log.info("epoch %d/%d [%s] %s (%.1fs)", row["epoch"], trainer.total_epochs, row["phase"], shown, row["seconds"])
