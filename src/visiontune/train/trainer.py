"""HOW a run proceeds: a readable epoch loop over the strategy's phases, with callbacks."""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from timm.utils import ModelEmaV3
from torch import nn

from visiontune.data.items import TRAIN
from visiontune.errors import ConfigError, DataError, VisiontuneError
from visiontune.frozen.probe import (
    ProbeFit,
    describe_folds,
    fit_probe,
    head_linear,
    held_out_logits,
    load_into,
    validation_folds,
)
from visiontune.frozen.probememo import ProbeMemory, probe_key
from visiontune.models.classifier import load_weights
from visiontune.rundir import RunDir, save_checkpoint
from visiontune.runtime.batchsize import MicroBatcher, free_device_memory, is_oom
from visiontune.runtime.device import autocast, batch_norm_for, resolve_precision, seed_everything, to_device
from visiontune.runtime.distributed import (
    agree_step,
    average_gradients,
    broadcast_state,
    broadcast_tensors,
    gather,
    reduce_totals,
    training_norm_buffers,
)
from visiontune.runtime.inference import EvalOutput, merge_outputs, progress, run_eval
from visiontune.runtime.prefix import frozen_prefix
from visiontune.tasks.objective import VAL_LOSS, Objective
from visiontune.train.callbacks import Callback, StopTraining, metrics_of
from visiontune.train.consistency import Consistency, Paired
from visiontune.train.mixup import mixup_for
from visiontune.train.plan import apply_phase, set_train_modes
from visiontune.train.pseudo import PseudoLabels, with_pool
from visiontune.train.rundata import PhaseData
from visiontune.train.schedules import keepable, lr_factor
from visiontune.train.setup import RunSetup

log = logging.getLogger(__name__)


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """The seed of one epoch's randomness in one process (rank 0: the single-process seed)."""
    return seed * 100_003 + epoch + rank * 1_000_000_007


class TrainingDivergedError(VisiontuneError):
    """The loss became NaN or infinite."""


@dataclass
class TrainState:
    epoch: int = -1  # index of the current (or last finished) epoch, 0-based
    global_step: int = 0
    phase: int = -1
    history: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    last_eval: EvalOutput | None = None  # validation outputs of the current epoch
    ema_better: bool = False  # this epoch's EMA weights validated better than the raw ones
    candidate: bool = True  # this epoch's weights may be kept (warmup-stable-decay: only in or after its decay)

    @property
    def should_stop(self) -> bool:
        return False

    @should_stop.setter
    def should_stop(self, value: bool) -> None:  # the old way a callback stopped a run: say the new one
        raise ConfigError("trainer.state.should_stop no longer stops a run: raise "
                          "visiontune.train.callbacks.StopTraining from the callback instead (the run ends when "
                          "the epoch ends, every callback seeing that end)")


class Trainer:
    """Runs `plan` on `model`: per epoch, pick the phase, train, validate, call back.

    Built complete: `objective` says which of the raw and the EMA weights validated better
    (default: the lower val_loss); `run_dir` is where the run's files go (default
    os.devnull: written nowhere, as on processes other than rank 0). The run's clock (the
    time used, the budget, the phase's timings) is `setup.clock`."""

    def __init__(self, setup: RunSetup, callbacks: list[Callback], objective: Objective | None = None,
                 run_dir: Path | None = None) -> None:
        self.setup = setup
        self.clock = setup.clock
        self.objective = objective if objective is not None else VAL_LOSS
        self.run_dir = Path(run_dir) if run_dir is not None else Path(os.devnull)
        self.model, self.plan, self.optimizer = setup.model, setup.plan, setup.optimizer
        self.data = setup.data  # phase index -> PhaseData
        self.cfg, self.task, self.preprocess = setup.cfg, setup.task, setup.preprocess
        self.classes = setup.task.classes
        self.callbacks, self.device, self.env = callbacks, setup.device, setup.env
        self.generator = setup.data.generator
        self.criterion_weights = setup.data.class_weights()  # --balance weights (None: none); the probe's too
        self.criterion = setup.task.loss(self.criterion_weights, setup.cfg.outputs.label_smoothing)
        self.state = TrainState()
        self.total_epochs = sum(p.epochs for p in self.plan.phases)
        self.precision = resolve_precision(self.cfg.runtime.precision, self.device)
        use_scaler = self.precision == "fp16" and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler(self.device.type) if use_scaler else None
        self.micro = MicroBatcher()
        self._stop: StopTraining | None = None  # a callback asked to end the run when this epoch ends
        self._prefix_net: nn.Module | None = None  # this phase's frozen leading blocks in ONNX Runtime (freeze-k)
        self._cv_eval: EvalOutput | None = None  # the probe's cross-validated outputs, where no split was held out
        self.consistency = Consistency(self.task, self.criterion, self.cfg.data.consistency_threshold, self.device,
                                       self.precision, self.cfg.runtime.channels_last) if self.cfg.data.unlabeled else None
        self.mixup = mixup_for(self.cfg, self.task)
        self.soft_criterion = setup.task.loss(setup.data.class_weights()) if self.mixup else None  # smoothing: in mixup
        self.ema = ModelEmaV3(self.model, decay=self.cfg.train.ema_decay, use_warmup=True) if self.cfg.train.ema \
            else None
        self.compiled: nn.Module | None = None
        self.compile_ok = False  # a compiled step has run: later errors are not compile failures
        if self.cfg.runtime.compile:
            if self.env.launched:
                log.warning("--compile is ignored under torchrun")
            else:
                self.compiled = torch.compile(self.model)

    # -- the loop -------------------------------------------------------------------
    def fit(self, start_epoch: int = 0) -> TrainState:
        """Train from `start_epoch` to the plan's end, or until the run stops: a callback
        raised StopTraining, or the clock ends it (`Clock.ends_run`, said in the log)."""
        self.broadcast_weights()  # identical by construction; made certain under torchrun
        self._emit("on_fit_start")
        for epoch in range(start_epoch, self.total_epochs):
            if not self._run_epoch(epoch):
                break
        self._emit("on_fit_end")
        return self.state

    def _run_epoch(self, epoch: int) -> bool:
        """Train, validate, record and call back one epoch; False when the run ends with it
        (a callback's StopTraining, the clock), or before it: the clock left no time for its
        first step (said why; nothing new to validate or record)."""
        self.state.epoch = epoch
        self.enter_phase(self.plan.phase_index(epoch))
        self._seed_epoch(epoch)
        self._emit("on_epoch_start")
        started = time.perf_counter()
        train_loss = self.train_one_epoch(epoch)
        if train_loss is None:
            return False
        self.state.metrics = self._validate(train_loss)
        self.state.history.append(self._history_row(epoch, started))
        self.clock.end_epoch(time.perf_counter() - started)
        self._emit("on_epoch_end")
        why = self.clock.ends_run(epoch + 1, time.perf_counter() - started, self._timed(self.state.phase))
        if why is not None:
            log.info("%s", why)
        stop, self._stop = self._stop, None
        return why is None and stop is None

    def train_one_epoch(self, epoch: int) -> float | None:
        """The epoch's mean training loss; None when the clock ends the run before its
        first step (the deadline, or a time-decided schedule's decay already complete):
        no epoch to validate or record, the run ends with its best weights. An epoch that
        reads no image without the clock stopping it is an error: the data yielded nothing."""
        phase_i = self.plan.phase_index(epoch)
        data = self.data.for_phase(phase_i)
        self.state.candidate = True  # a converged probe's fit, or an epoch of a schedule that keeps any (below)
        if self.plan.phases[phase_i].probe:
            return self.fit_probe(data)
        batches = Paired(data.train, data.pool_views if self.consistency is not None else None)
        steps = max(1, len(batches))
        self.train_mode()
        running, seen = 0.0, 0
        if self.consistency is not None:
            self.consistency.reset()
        bar = progress(batches, self.cfg.runtime.progress, f"epoch {epoch + 1}/{self.total_epochs}")
        loop_started = time.perf_counter()
        for i, (x, y, views) in enumerate(bar):  # views: --unlabeled's pool batch (weak, strong), else None
            factor = self._step_factor(data, epoch, i, steps, seen, loop_started)
            if factor is None:  # the clock ends the epoch here (said why)
                if i == 0:  # the clock, not the data: nothing trained, nothing new to validate
                    return None
                break
            for group in self.optimizer.param_groups:
                group["lr"] = group["peak_lr"] * factor
            loss = self._step(data, x, y, views, f"epoch {epoch + 1}, step {i + 1}")
            running += loss * len(y)
            seen += len(y)
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{running / seen:.4f}")
        if self.consistency is not None:
            self.consistency.sum_over_processes(self.env, self.device)  # every process, before any may skip
            if self.consistency.seen:
                log.info("epoch %d %s", epoch + 1, self.consistency.summary(len(data.pool_views.dataset)))
                if (run := self._written_run()) is not None:
                    self.consistency.record(run, epoch + 1)
        running, images = reduce_totals(running, seen, self.env, self.device)
        if images == 0:  # the loop ran to its end (the clock returned above): the data yielded nothing
            raise DataError(f"epoch {epoch + 1} read no training image{' on any process' if self.env.parallel else ''}"
                            f" ({len(data.train)} steps planned): the training data yielded nothing. Check that the "
                            "shards hold the samples their index lists")
        return running / max(1, images)

    def _step(self, data: PhaseData, x: torch.Tensor, y: torch.Tensor,
              views: tuple[torch.Tensor, torch.Tensor] | None, where: str) -> float:
        """One optimizer step on a training batch (mixed by mixup when on), with the pool's
        views when given; its mean loss. A non-finite loss stops the run."""
        x, y = to_device(x, self.device, self.cfg.runtime.channels_last), y.to(self.device, non_blocking=True)
        soft = self.mixup is not None and not data.on_features and len(y) % 2 == 0  # timm mixes pairs
        if soft:
            x, y = self.mixup(x, y)  # type: ignore[misc]
        loss = self.train_step(self.net_for(data), x, y, soft=soft, views=views)
        if not np.isfinite(loss):
            raise TrainingDivergedError(f"loss became {loss} at {where}; lower --lr (the last good checkpoint is "
                                        "kept in the run directory)")
        self.state.global_step += 1
        self._emit("on_step_end")
        return loss

    def _step_factor(self, data: PhaseData, epoch: int, i: int, steps: int, seen: int,
                     loop_started: float) -> float | None:
        """The peak-LR multiplier of step `i` of `epoch`, or None when the clock ends the
        epoch before it (said in the log): validating after one more step would end past
        the deadline, or the time-decided decay is complete."""
        validation = self._validation_estimate(data, seen, time.perf_counter() - loop_started)
        if self.clock.out_of_time(validation):
            if i == 0:
                log.info("time budget: no time for a step of epoch %d (validating it takes ~%.1f s, %.1f s are left); "
                         "stopping with the best weights", epoch + 1, validation, max(0.0, self.clock.left() or 0.0))
            else:
                log.info("time budget: ending epoch %d after %d of %d steps to validate in time", epoch + 1, i, steps)
            return None
        phase_i = self.plan.phase_index(epoch)
        epoch_in_phase, phase = epoch - self.plan.phase_start(phase_i), self.plan.phases[phase_i]
        if not self._timed(phase_i):  # by the phase's progress in steps
            progress = (epoch_in_phase * steps + i) / (phase.epochs * steps)
            self.state.candidate = keepable(self.cfg.train.schedule, progress)  # of the epoch's last step so far
            return lr_factor(self.cfg.train, progress, epoch_in_phase)
        factor = self.clock.timed_factor(validation, phase.epochs - epoch_in_phase, loop_started)  # in time
        self.state.candidate = not self.clock.holding_peak  # warming up or at the peak: not weights to keep
        if factor is None and i == 0:
            log.info("time budget: the learning rate's decay ended with epoch %d (warmup-stable-decay, timed to the "
                     "deadline); stopping with the best weights", epoch)
        elif factor is None:
            log.info("time budget: the decay is complete after %d of %d steps of epoch %d", i, steps, epoch + 1)
        return factor

    def _validation_estimate(self, data: PhaseData, trained: int, seconds: float) -> float:
        """Seconds the coming validation will take (`Clock.validation_estimate`)."""
        return self.clock.validation_estimate(len(data.valid.dataset) if data.valid is not None else 0, trained,
                                              seconds)

    def _timed(self, phase_index: int) -> bool:
        """Whether this phase's learning rate follows the clock (`Clock.follows`)."""
        return self.clock.follows(self.cfg.train.schedule, bool(self.plan.phases[phase_index].probe))

    def fit_probe(self, data: PhaseData) -> float:
        """Fit the head to convergence on this phase's training features (frozen/probe.py;
        its C search keeps the run's groups whole), with --unlabeled's pseudo-labelled pool
        rows (train/pseudo.py); return its training loss."""
        feats, targets, _ = data.train.dataset.tensors  # type: ignore[attr-defined]
        start = head_linear(self.model.head)  # warm-started rows are the prior the fit is pulled towards
        x, y, groups, c = np.asarray(feats), targets.numpy(), data.groups, None

        def fit(a: np.ndarray, b: np.ndarray, c: float | None, g: list[str] | None) -> ProbeFit:
            return fit_probe(a, b, self.task, start=start, weights=self.criterion_weights, seed=self.cfg.seed,
                             groups=g, deadline=self.clock.deadline, c=c)

        if data.pool is not None:
            x, y, groups, pseudo = with_pool(x, y, data.pool, self.task, fit, self.cfg.seed, groups)
            c = pseudo.c
            log.info("%s", pseudo.describe(self.task))
            self._write_pseudo_labels(data.pool_paths, pseudo)
        key = probe_key(x, y, self.task, start, self.criterion_weights, self.cfg.seed, groups)
        fit_, remembered = ProbeMemory(self.cfg.runtime.cache_dir).fit(
            key, lambda: fit(x, y, c, groups),
            storable=lambda: self.clock.deadline is None)  # a fit a deadline cut short is not remembered
        load_into(self.model.head, fit_)
        log.info("converged probe: %d feature vectors, L2 towards the head's start with C = %g (%s)%s", len(y),
                 fit_.c, f"{fit_.folds}-fold CV" if fit_.folds else
                 "chosen on the labelled rows before the pool joined" if c is not None else "too few images or groups to cross-validate",
                 "; remembered from an earlier run on the same features (frozen/probememo.py)" if remembered else "")
        if data.valid is None and self.data.source.no_validation:  # too few labels to hold out: CV validates
            self._cv_eval = self._cross_validate(np.asarray(feats), targets.numpy(), data.groups, start,
                                                 data.pool is not None)
        return self._head_loss(feats, targets)

    def _cross_validate(self, x: np.ndarray, y: np.ndarray, groups: list[str] | None, start: nn.Linear,
                        pooled: bool) -> EvalOutput:
        """The converged probe's outputs on each labelled image from fits without it, each
        choosing its own C (frozen/probe.validation_folds: leave one out at the smallest):
        the run's validation when no split could be held out. A budget's deadline ends it
        after the fold it is in (the figure is then of the rows held out so far)."""
        folds = validation_folds(self.task.strata(y), self.cfg.seed, groups)

        def fit(rows: np.ndarray) -> ProbeFit:
            return fit_probe(x[rows], y[rows], self.task, start=start, weights=self.criterion_weights,
                             seed=self.cfg.seed, groups=None if groups is None else [groups[i] for i in rows])

        logits, rows = held_out_logits(x, folds, fit, stop=lambda: self.clock.out_of_time(0.0))
        target, logits_t = torch.as_tensor(y[rows]), torch.from_numpy(logits)
        loss = float(self.criterion.total(logits_t, target)) / max(float(self.criterion.norm(target)), 1e-12)
        log.info("validation: the converged probe's %s on %s labelled images (no split could be held out)%s%s",
                 describe_folds(folds, len(y)), f"the {len(y)}" if len(rows) == len(y) else f"{len(rows)} of the {len(y)}",
                 "; the time budget ended it early" if len(rows) < len(y) else "",
                 "; fitted without the pool's pseudo-labelled rows, which joined the fit kept" if pooled else "")
        return EvalOutput(loss, y[rows], self.task.probabilities(logits_t).numpy(), rows)

    def _written_run(self) -> RunDir | None:
        """The run directory, for the process that writes it (None on the others)."""
        return None if not self.env.is_main or str(self.run_dir) == os.devnull else RunDir(self.run_dir)

    def _write_pseudo_labels(self, paths: list[str], pseudo: PseudoLabels) -> None:
        """<run>/pseudo_labels.csv: every pool image, its pseudo-label, confidence, and whether it joined."""
        if (run := self._written_run()) is None:
            return
        delim = self.cfg.data.label_delim
        rows = ((p, delim.join(d.labels), f"{conf:.6g}", int(kept)) for p, d, conf, kept in
                zip(paths, pseudo.decoded(self.task), pseudo.confidence, pseudo.kept))
        run.write_pseudo_labels(rows)

    @torch.inference_mode()
    def _head_loss(self, feats: torch.Tensor, targets: torch.Tensor, chunk: int = 8192) -> float:
        """The head's mean training loss over the features, a chunk at a time on the device
        (the whole matrix never is)."""
        total, norm = 0.0, 0.0
        for x, y in zip(feats.split(chunk), targets.split(chunk)):
            y = y.to(self.device)
            logits = self.model.head(torch.as_tensor(np.asarray(x)).to(self.device)).float()
            total += float(self.criterion.total(logits, y).item())
            norm += float(self.criterion.norm(y).item())
        return total / max(norm, 1e-12)

    def net_for(self, data: PhaseData) -> nn.Module:
        """What the batches go through: the head alone on cached features, else the model
        (compiled with --compile; its frozen leading blocks in ONNX Runtime where
        runtime/prefix.py can)."""
        if data.on_features:
            return self.model.head
        if self.compiled is not None:
            return self.compiled
        return self._prefix_net if self._prefix_net is not None else self.model

    def train_step(self, net: nn.Module, x: torch.Tensor, y: torch.Tensor, soft: bool = False,
                   views: tuple[torch.Tensor, torch.Tensor] | None = None) -> float:
        """One optimizer step on the batch (x, y); returns its mean loss (a non-finite loss
        on any process skips the step everywhere). The batch goes through in micro-batches
        whose gradients add up to the whole batch's; after an out-of-memory error on any
        process, every process halves its micro-batches to the same size and the step
        starts again (see runtime/distributed.py). `soft`: `y` are mixed (mixup) targets;
        `views`: a pool batch whose consistency term (train/consistency.py) joins the step."""
        criterion = self.soft_criterion if soft and self.soft_criterion is not None else self.criterion
        while True:
            try:
                loss, oom = self._backward(net, x, y, criterion, views)
            except Exception as exc:  # noqa: BLE001 - a first compiled step that fails falls back to eager
                if not self._compile_failed(net, exc):
                    raise
                net = self.model
                continue
            self.compile_ok = self.compile_ok or net is self.compiled
            proposal = self.micro.halved(len(y)) if oom else self.micro.chunks(len(y))
            agreed = agree_step(oom, not oom and not math.isfinite(loss), proposal, self.env, self.device)
            if agreed.out_of_memory:
                self.micro.adopt(agreed.micro_size, len(y), "in a training step")
                continue
            if agreed.non_finite:  # no step: the weights stay as they were
                self.optimizer.zero_grad(set_to_none=True)
                return loss if not math.isfinite(loss) else float("nan")
            self._apply_step()
            return loss

    def _backward(self, net: nn.Module, x: torch.Tensor, y: torch.Tensor, criterion: Any,
                  views: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[float, bool]:
        """Forward and backward of every micro-batch (and of the pool batch's consistency
        term), gradients summed, no collective: (the labelled batch's mean loss, whether
        this process ran out of memory)."""
        self.optimizer.zero_grad(set_to_none=True)
        try:
            loss = self._accumulate(net, x, y, criterion)
            if views is not None and self.consistency is not None and math.isfinite(loss):
                term = self.consistency.backward(net, views, self.micro.chunks(len(views[0])), self.scaler)
                if not math.isfinite(term):  # a step is taken only when every loss in it is finite
                    return term, False
            return loss, False
        except Exception as exc:  # noqa: BLE001 - only out-of-memory is handled here
            if not is_oom(exc):
                raise
        self.optimizer.zero_grad(set_to_none=True)
        free_device_memory(self.device)
        return float("nan"), True

    def _compile_failed(self, net: nn.Module, exc: Exception) -> bool:
        """True (and eager from now on) when `exc` comes from a compiled model's first step."""
        if net is not self.compiled or self.compiled is None or self.compile_ok:
            return False
        log.warning("torch.compile failed (%s: %s); training without it", type(exc).__name__,
                    str(exc).splitlines()[0] if str(exc) else "")
        self.compiled = None
        self.optimizer.zero_grad(set_to_none=True)
        return True

    def _accumulate(self, net: nn.Module, x: torch.Tensor, y: torch.Tensor, criterion: Any = None) -> float:
        criterion = criterion or self.criterion
        size = self.micro.chunks(len(y))
        whole = size >= len(y)
        total = 0.0
        for xs, ys in zip(x.split(size), y.split(size)):
            with autocast(self.device, self.precision), batch_norm_for(net, len(xs)):
                logits = net(xs)
            loss = criterion(logits.float(), ys) if whole else criterion.total(logits.float(), ys) / criterion.norm(y)
            if not torch.isfinite(loss):
                return float(loss.item())
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
            else:
                loss.backward()
            total += loss.item()
        return total

    def _apply_step(self) -> None:
        """Average the gradients over the processes, step, and share training BatchNorm
        statistics from rank 0 (all no-ops on one process)."""
        average_gradients([p for p in self.model.parameters() if p.requires_grad], self.env, self.device)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if self.env.parallel:
            broadcast_tensors(training_norm_buffers(self.model), self.env, self.device)
        if self.ema is not None:
            self.ema.update(self.model, step=self.state.global_step)

    # -- pieces ---------------------------------------------------------------------
    def enter_phase(self, index: int) -> None:
        if index != self.state.phase:
            apply_phase(self.model, self.optimizer, self.plan, index)
            self.state.phase = index
            phase = self.plan.phases[index]
            log.info("phase %d/%d: %s (%d epochs)", index + 1, len(self.plan.phases), phase.name, phase.epochs)
            self._prefix_net = self._frozen_prefix(phase)
        self.clock.enter_phase(index)  # its timings start afresh, unless a resumed run is still in it

    def _frozen_prefix(self, phase: Any) -> nn.Module | None:
        """freeze-k's frozen leading blocks as one ONNX Runtime session for this phase's
        training steps (runtime/prefix.py); None: the steps run the model in PyTorch (also
        under --compile, under torchrun, and in a head-only phase)."""
        if phase.probe or self.compiled is not None or self.env.launched:
            return None
        r = self.cfg.runtime
        images = len(self.data.source.split(TRAIN)) * phase.epochs
        self.train_mode()  # the modes its steps run in: what is frozen and in eval mode can leave PyTorch
        try:
            return frozen_prefix(self.model, self.preprocess.input_size, self.device, r.engine, r.cache_dir, images,
                                 r.channels_last)
        except Exception as exc:  # noqa: BLE001 - a model the prefix cannot be traced in: PyTorch runs it all
            log.warning("freeze-k: the frozen blocks stay in PyTorch (%s: %s)", type(exc).__name__, exc)
            return None

    def _seed_epoch(self, epoch: int) -> None:
        """Each epoch's shuffling, augmentation and dropout depend on (seed, epoch, rank) only,
        so a resumed run repeats exactly what the uninterrupted one would have done, and
        under torchrun each process draws its own augmentations (the DistributedSampler's
        shuffle stays common: it is seeded by (seed, epoch) on its own). An image's
        augmentation is seeded by its own (seed, rank, epoch, position) through the loader's
        SeededSampler (data/loaders.py), whatever worker process decodes it."""
        seed_everything(epoch_seed(self.cfg.seed, epoch, self.env.rank))
        if self.generator is not None:
            self.generator.manual_seed(epoch_seed(self.cfg.seed, epoch))
        data = self.data.for_phase(self.plan.phase_index(epoch))
        for loader in (data.train, data.pool_views):
            for seeded in (getattr(loader, "sampler", None), getattr(loader, "dataset", None)):  # sampler or stream
                if hasattr(seeded, "set_epoch"):
                    seeded.set_epoch(epoch)

    def _validate(self, train_loss: float) -> dict[str, float]:
        """Validation metrics of this epoch's weights; with --ema also of the EMA weights,
        and the better of the two (by the monitored metric) is what the epoch holds."""
        metrics = {"train_loss": train_loss}
        data = self.data.for_phase(self.state.phase)
        self.state.ema_better = False
        if data.valid is None:  # no validation split (the same on every process)
            if self._cv_eval is None:
                return metrics
            self.state.last_eval, self._cv_eval = self._cv_eval, None  # the probe's cross-validation stands in
            return {**metrics, **self._scores(self.state.last_eval)}
        started = time.perf_counter()
        out, scores = self._evaluate(self.net_for(data), data)
        self.clock.validated(time.perf_counter() - started)
        if self.ema is not None:
            ema_out, ema_scores = self._evaluate(self.ema.module.head if data.on_features else self.ema.module, data)
            metrics.update({f"ema_{k}": v for k, v in ema_scores.items()})
            if self.objective.better(ema_scores, scores):
                out, scores, self.state.ema_better = ema_out, ema_scores, True
        self.state.last_eval = out
        return {**metrics, **scores}

    def _evaluate(self, net: nn.Module, data: PhaseData) -> tuple[EvalOutput, dict[str, float]]:
        out = run_eval(net, data.valid, self.device, self.task, channels_last=self.cfg.runtime.channels_last,
                       precision=self.precision, micro=self.micro)
        if self.env.launched:  # each process validated its part: rows put back in order
            out = merge_outputs(gather((out.loss * len(out.targets) if len(out.targets) else 0.0, out.targets,
                                        out.probs, out.ids), self.env))
        if data.valid_rows:
            out.require_all(data.valid_rows)
        return out, self._scores(out)

    def _scores(self, out: EvalOutput) -> dict[str, float]:
        """An epoch's validation figures: the loss, the task's metrics, and the loss after a
        temperature fitted on these outputs (`Task.calibrated_loss`): each a monitor."""
        return {"val_loss": out.loss, **self.task.metrics(out.targets, out.probs),
                **self.task.calibrated_loss(out.targets, out.probs)}

    def chosen_model(self) -> nn.Module:
        """The weights this epoch holds: the EMA's when they validated better."""
        return self.ema.module if self.state.ema_better and self.ema is not None else self.model

    def adopt_chosen_weights(self) -> None:
        """Let the model take the EMA weights when those are what the run ends with."""
        if self.state.ema_better and self.ema is not None:
            self.model.load_state_dict(self.ema.module.state_dict())

    def _history_row(self, epoch: int, started: float) -> dict[str, Any]:
        lrs = [g["peak_lr"] for g in self.optimizer.param_groups if g["peak_lr"] > 0]
        return {
            "epoch": epoch + 1,
            "phase": self.plan.phases[self.state.phase].name,
            **{k: float(v) for k, v in self.state.metrics.items()},
            "lr": float(max(lrs)) if lrs else 0.0,
            "candidate": self.state.candidate,
            "seconds": round(time.perf_counter() - started, 3),
        }

    def train_mode(self) -> None:
        """Training mode for what trains; eval mode for every frozen module (plan.set_train_modes)."""
        self.model.train()
        set_train_modes(self.model, *self.cfg.bn_modes())

    def broadcast_weights(self) -> None:
        """Every process takes rank 0's parameters and buffers (no-op on one process)."""
        broadcast_state(self.model, self.env, self.device)

    def _emit(self, event: str) -> None:
        """Call every callback's `event`; one raising StopTraining ends the run when the
        current epoch ends (the other callbacks still see the event)."""
        for cb in self.callbacks:
            try:
                getattr(cb, event)(self)
            except StopTraining as stop:
                self._stop = self._stop or stop

    # -- resumability -----------------------------------------------------------------
    def checkpoint_state(self) -> dict[str, Any]:
        return {
            "format_version": 1,
            "epoch": self.state.epoch,
            "global_step": self.state.global_step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else {},
            "ema": self.ema.module.state_dict() if self.ema is not None else {},
            "history": self.state.history,
            "last_eval": self.state.last_eval.state_dict() if self.state.last_eval is not None else {},
            "ema_better": self.state.ema_better,
            "callbacks": {type(cb).__name__: cb.state_dict() for cb in self.callbacks},
            "elapsed_s": self.elapsed(),
            "clock": self.clock.state_dict(),
        }

    def elapsed(self) -> float:
        """Seconds the run has taken so far, over every time it was resumed."""
        return self.clock.used()

    def save_checkpoint(self, path: Path) -> None:
        save_checkpoint(path, self.checkpoint_state())

    def restore(self, ckpt: dict[str, Any]) -> int:
        """Load a checkpoint; return the epoch to continue from."""
        load_weights(self.model, ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        if self.ema is not None and ckpt.get("ema"):
            load_weights(self.ema.module, ckpt["ema"])
        self.state.history = list(ckpt.get("history", []))
        # the last epoch as it ended: a run resumed after it finished ends with these weights and outputs
        self.state.epoch, self.state.ema_better = int(ckpt["epoch"]), bool(ckpt.get("ema_better", False))
        self.state.last_eval = EvalOutput.of_state(ckpt.get("last_eval"))
        self.state.global_step = int(ckpt.get("global_step", 0))
        self.clock.charge(float(ckpt.get("elapsed_s", 0.0)))  # a record, when the run has one, knows more
        self.clock.load_state_dict(ckpt.get("clock", {}))
        saved = ckpt.get("callbacks", {})
        for cb in self.callbacks:
            cb.load_state_dict(saved.get(type(cb).__name__, {}))
        if self.state.history:
            self.state.metrics = metrics_of(self.state.history[-1], keep_train_loss=True)
        return int(ckpt["epoch"]) + 1
