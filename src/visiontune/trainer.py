"""HOW a run proceeds: a readable epoch loop over the strategy's phases, with callbacks."""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from visiontune.batchsize import MicroBatcher, free_device_memory, is_oom
from visiontune.bundle import save_checkpoint
from visiontune.callbacks import Callback
from visiontune.config import RunConfig
from visiontune.distributed import DistEnv, gather, reduce_mean
from visiontune.errors import VisiontuneError
from visiontune.metrics import classification_metrics
from visiontune.models import Classifier, Preprocess
from visiontune.schedules import lr_factor
from visiontune.strategy import Plan, apply_phase, set_batchnorm_modes

log = logging.getLogger(__name__)


class TrainingDivergedError(VisiontuneError):
    """The loss became NaN or infinite."""


@dataclass
class PhaseData:
    """What one phase trains and validates on: image loaders, or cached-feature loaders
    (`on_features`), in which case only `model.head` runs."""

    train: DataLoader
    valid: DataLoader | None
    on_features: bool = False


@dataclass
class EvalOutput:
    loss: float
    targets: np.ndarray
    probs: np.ndarray

    @property
    def preds(self) -> np.ndarray:
        return self.probs.argmax(axis=1) if len(self.probs) else np.zeros(0, dtype=int)


@dataclass
class TrainState:
    epoch: int = -1  # index of the current (or last finished) epoch, 0-based
    global_step: int = 0
    phase: int = -1
    history: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    should_stop: bool = False
    last_eval: EvalOutput | None = None  # validation outputs of the current epoch


def _merge(parts: list[tuple[float, np.ndarray, np.ndarray]]) -> EvalOutput:
    """Validation outputs of all processes as one."""
    n = sum(len(t) for _, t, _ in parts)
    return EvalOutput(sum(s for s, _, _ in parts) / max(1, n), np.concatenate([t for _, t, _ in parts]),
                      np.concatenate([p for _, _, p in parts]))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(name)


def prepare_model(model: nn.Module, device: torch.device, channels_last: bool) -> nn.Module:
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def to_device(x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    fmt = torch.channels_last if channels_last and x.ndim == 4 else torch.contiguous_format
    return x.to(device, non_blocking=True, memory_format=fmt)


def resolve_precision(name: str, device: torch.device) -> str:
    """'auto': bf16 on CUDA (fp16 where bf16 is not supported), fp32 elsewhere: on a CPU
    without native bf16 (AVX2 only) autocast made a Lite0 step ~10x slower (measured)."""
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    precision = resolve_precision(precision, device)
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def forward_chunks(model: nn.Module, x: torch.Tensor, micro: MicroBatcher, device: torch.device,
                   precision: str) -> torch.Tensor:
    """model(x) in micro-batches (under no_grad/inference mode); halves them on out-of-memory."""
    while True:
        try:
            with autocast(device, precision):
                return torch.cat([model(c).float() for c in x.split(micro.chunks(len(x)))])
        except Exception as exc:  # noqa: BLE001 - only out-of-memory is retried
            if not is_oom(exc):
                raise
        free_device_memory(device)
        micro.shrink(len(x), "in evaluation")


@torch.inference_mode()
def run_eval(model: nn.Module, loader: DataLoader, device: torch.device, progress: bool = False,
             channels_last: bool = True, precision: str = "auto", micro: MicroBatcher | None = None) -> EvalOutput:
    """Mean cross-entropy, targets and softmax probabilities over `loader`."""
    model.eval()
    micro = micro or MicroBatcher()
    total, count, probs, targets = 0.0, 0, [], []
    for x, y in _progress(loader, progress, "eval"):
        x, y = to_device(x, device, channels_last), y.to(device)
        logits = forward_chunks(model, x, micro, device, precision)
        known = y >= 0  # -1: no label (predict); UNREADABLE: a file that did not decode
        if known.any():
            total += nn.functional.cross_entropy(logits[known], y[known], reduction="sum").item()
            count += int(known.sum())
        probs.append(logits.softmax(dim=1).cpu())
        targets.append(y.cpu())
    if not probs:
        return EvalOutput(float("nan"), np.zeros(0, dtype=int), np.zeros((0, 0)))
    return EvalOutput(total / max(1, count), torch.cat(targets).numpy(), torch.cat(probs).numpy())


def _progress(loader: DataLoader, enabled: bool, desc: str) -> Any:
    if not enabled:
        return loader
    from tqdm.auto import tqdm

    return tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, disable=None)


class Trainer:
    """Runs `plan` on `model`: per epoch, pick the phase, train, validate, call back."""

    def __init__(
        self,
        model: Classifier,
        plan: Plan,
        optimizer: torch.optim.Optimizer,
        data: Callable[[int], PhaseData],
        cfg: RunConfig,
        classes: list[str],
        preprocess: Preprocess,
        callbacks: list[Callback],
        device: torch.device,
        generator: torch.Generator | None = None,
        criterion: nn.Module | None = None,
        env: DistEnv | None = None,
    ) -> None:
        self.model, self.plan, self.optimizer = model, plan, optimizer
        self.data = data  # phase index -> PhaseData
        self.cfg, self.classes, self.preprocess = cfg, classes, preprocess
        self.callbacks, self.device, self.generator = callbacks, device, generator
        self.criterion = criterion or nn.CrossEntropyLoss(label_smoothing=cfg.train.label_smoothing)
        self.state = TrainState()
        self.env = env or DistEnv()
        self.ddp: nn.Module | None = None  # DistributedDataParallel wrapper under torchrun
        self.total_epochs = sum(p.epochs for p in plan.phases)
        self.precision = resolve_precision(cfg.train.precision, device)
        self.scaler = torch.amp.GradScaler(device.type) if self.precision == "fp16" and device.type == "cuda" else None
        self.micro = MicroBatcher()
        self.compiled: nn.Module | None = None
        self.compile_ok = False  # a compiled step has run: later errors are not compile failures
        if cfg.train.compile:
            if self.env.launched:
                log.warning("--compile is ignored under torchrun")
            else:
                self.compiled = torch.compile(model)

    # -- the loop -------------------------------------------------------------------
    def fit(self, start_epoch: int = 0) -> TrainState:
        self._emit("on_fit_start")
        for epoch in range(start_epoch, self.total_epochs):
            self.state.epoch = epoch
            self._enter_phase(self.plan.phase_index(epoch))
            self._seed_epoch(epoch)
            self._emit("on_epoch_start")
            started = time.perf_counter()
            train_loss = self.train_one_epoch(epoch)
            self.state.metrics = self._validate(train_loss)
            self.state.history.append(self._history_row(epoch, started))
            self._emit("on_epoch_end")
            if self.state.should_stop:
                break
        self._emit("on_fit_end")
        return self.state

    def train_one_epoch(self, epoch: int) -> float:
        phase_i = self.plan.phase_index(epoch)
        phase = self.plan.phases[phase_i]
        epoch_in_phase = epoch - self.plan.phase_start(phase_i)
        data = self.data(phase_i)
        steps = max(1, len(data.train))
        total_steps = phase.epochs * steps
        self.model.train()
        set_batchnorm_modes(self.model, *self.cfg.bn_modes())
        running, seen = 0.0, 0
        bar = _progress(data.train, self.cfg.train.progress, f"epoch {epoch + 1}/{self.total_epochs}")
        for i, (x, y) in enumerate(bar):
            factor = lr_factor(self.cfg.train, (epoch_in_phase * steps + i) / total_steps, epoch_in_phase)
            for group in self.optimizer.param_groups:
                group["lr"] = group["peak_lr"] * factor
            x, y = to_device(x, self.device, self.cfg.train.channels_last), y.to(self.device, non_blocking=True)
            loss = self.train_step(self._net(data), x, y)
            if not np.isfinite(loss):
                raise TrainingDivergedError(
                    f"loss became {loss} at epoch {epoch + 1}, step {i + 1}; lower --lr "
                    "(the last good checkpoint is kept in the run directory)"
                )
            self.state.global_step += 1
            running += loss * len(y)
            seen += len(y)
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{running / seen:.4f}")
        return reduce_mean(running, seen, self.env)

    def _net(self, data: PhaseData, training: bool = True) -> nn.Module:
        """What the batches go through: the head alone on cached features, else the model
        (compiled with --compile; for training steps wrapped by DDP under torchrun)."""
        if data.on_features:
            return self.model.head
        if training and self.ddp is not None:
            return self.ddp
        return self.compiled if self.compiled is not None else self.model

    def train_step(self, net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
        """One optimizer step on the batch (x, y); returns its mean loss (a non-finite loss
        skips the step). The batch goes through in micro-batches whose gradients add up to
        the whole batch's; after an out-of-memory error they are halved and the step starts
        again."""
        while True:
            try:
                loss = self._accumulate(net, x, y)
                self.compile_ok = self.compile_ok or net is self.compiled
                return loss
            except Exception as exc:  # noqa: BLE001 - out-of-memory and compile failures are handled
                if is_oom(exc):
                    oom = True
                elif net is self.compiled and self.compiled is not None and not self.compile_ok:
                    log.warning("torch.compile failed (%s: %s); training without it", type(exc).__name__,
                                str(exc).splitlines()[0] if str(exc) else "")
                    self.compiled, oom = None, False
                else:
                    raise
            self.optimizer.zero_grad(set_to_none=True)
            if oom:
                free_device_memory(self.device)
                self.micro.shrink(len(y), "in a training step")
            else:
                net = self.model  # --compile is off under torchrun: no DDP wrapper to keep

    def _accumulate(self, net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        size = self.micro.chunks(len(y))
        whole = size >= len(y)
        total = 0.0
        for xs, ys in zip(x.split(size), y.split(size)):
            with autocast(self.device, self.precision):
                logits = net(xs)
            loss = self.criterion(logits.float(), ys) if whole else self._part_loss(logits.float(), ys, y)
            if not torch.isfinite(loss):  # no step: the weights stay as they were
                self.optimizer.zero_grad(set_to_none=True)
                return float(loss.item())
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
            else:
                loss.backward()
            total += loss.item()
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        return total

    def _part_loss(self, logits: torch.Tensor, ys: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """This micro-batch's share of the whole batch's mean loss: the shares sum to it."""
        c = self.criterion
        if isinstance(c, nn.CrossEntropyLoss):
            denom = c.weight[y].sum() if c.weight is not None else torch.tensor(float(len(y)))
            return nn.functional.cross_entropy(logits, ys, weight=c.weight, label_smoothing=c.label_smoothing,
                                               reduction="sum") / denom
        return c(logits, ys) * (len(ys) / len(y))

    # -- pieces ---------------------------------------------------------------------
    def _enter_phase(self, index: int) -> None:
        if index != self.state.phase:
            apply_phase(self.model, self.optimizer, self.plan, index)
            self.state.phase = index
            if self.env.launched and any(p.requires_grad for p in self.model.parameters()):
                # DDP registers the parameters that train when it is built: rebuild it per phase
                from torch.nn.parallel import DistributedDataParallel

                self.ddp = DistributedDataParallel(self.model)
            phase = self.plan.phases[index]
            log.info("phase %d/%d: %s (%d epochs)", index + 1, len(self.plan.phases), phase.name, phase.epochs)

    def _seed_epoch(self, epoch: int) -> None:
        """Each epoch's shuffling, augmentation and dropout depend on (seed, epoch) only, so
        a resumed run repeats exactly what the uninterrupted one would have done."""
        epoch_seed = self.cfg.seed * 100_003 + epoch
        seed_everything(epoch_seed)
        if self.generator is not None:
            self.generator.manual_seed(epoch_seed)
        sampler = getattr(self.data(self.plan.phase_index(epoch)).train, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)

    def _validate(self, train_loss: float) -> dict[str, float]:
        metrics = {"train_loss": train_loss}
        data = self.data(self.state.phase)
        if data.valid is not None and len(data.valid.dataset) > 0:
            out = run_eval(self._net(data, training=False), data.valid, self.device, channels_last=self.cfg.train.channels_last,
                           precision=self.precision, micro=self.micro)
            if self.env.launched:
                out = _merge(gather((out.loss * len(out.targets), out.targets, out.probs), self.env))
            self.state.last_eval = out
            metrics["val_loss"] = out.loss
            metrics.update(classification_metrics(out.targets, out.preds, len(self.classes)))
        return metrics

    def _history_row(self, epoch: int, started: float) -> dict[str, Any]:
        lrs = [g["peak_lr"] for g in self.optimizer.param_groups if g["peak_lr"] > 0]
        return {
            "epoch": epoch + 1,
            "phase": self.plan.phases[self.state.phase].name,
            **{k: float(v) for k, v in self.state.metrics.items()},
            "lr": float(max(lrs)) if lrs else 0.0,
            "seconds": round(time.perf_counter() - started, 3),
        }

    def _emit(self, event: str) -> None:
        for cb in self.callbacks:
            getattr(cb, event)(self)

    # -- resumability -----------------------------------------------------------------
    def checkpoint_state(self) -> dict[str, Any]:
        return {
            "format_version": 1,
            "epoch": self.state.epoch,
            "global_step": self.state.global_step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "history": self.state.history,
            "callbacks": {type(cb).__name__: cb.state_dict() for cb in self.callbacks},
        }

    def save_checkpoint(self, path: Path) -> None:
        save_checkpoint(path, self.checkpoint_state())

    def restore(self, ckpt: dict[str, Any]) -> int:
        """Load a checkpoint; return the epoch to continue from."""
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.state.history = list(ckpt.get("history", []))
        self.state.global_step = int(ckpt.get("global_step", 0))
        saved = ckpt.get("callbacks", {})
        for cb in self.callbacks:
            cb.load_state_dict(saved.get(type(cb).__name__, {}))
        if self.state.history:
            last = self.state.history[-1]
            self.state.metrics = {k: v for k, v in last.items() if k not in ("epoch", "phase", "lr", "seconds")}
        return int(ckpt["epoch"]) + 1
