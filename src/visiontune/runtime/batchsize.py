"""Batch sizes that fit: `--batch-size auto`, and what to do after an out-of-memory error.

- `auto_batch_size`: the largest power of two whose training step (every parameter
  trainable, the run's image size and precision) fits the device. On CUDA each candidate
  step is run and an out-of-memory error ends the doubling search (Lightning's "power"
  search). A CPU has no catchable out-of-memory error (the kernel kills the process), so
  the memory of one step is measured at two batch sizes (peak RSS, reset between them) and
  extrapolated to half of the memory the machine has available. The result is capped at
  AUTO_MAX and at a batch that still gives MIN_STEPS optimizer steps per epoch (a batch as
  large as the data set would fit, but would leave one step per epoch); on CUDA the search
  stops at that cap, since each candidate costs a real step.
- `MicroBatcher`: the trainer splits each batch into micro-batches and accumulates their
  gradients; after an out-of-memory error it halves the micro-batch and repeats the step,
  so the effective batch (one optimizer step per loader batch) and the learning rate stay
  the same. Exact when BatchNorm statistics are fixed (the default for pretrained weights).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

from visiontune.errors import ConfigError, VisiontuneError
from visiontune.runtime.device import autocast, eval_mode, to_device

log = logging.getLogger(__name__)

AUTO_MAX = 256
MIN_STEPS = 8
MEMORY_SHARE = 0.5  # of the available memory a CPU training step may use


def is_oom(exc: BaseException) -> bool:
    """CUDA/MPS out-of-memory errors, and the CPU allocator failing a large allocation."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    msg = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in msg or "can't allocate memory" in msg)


def free_device_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def floor_pow2(n: int) -> int:
    return 1 << (max(1, n).bit_length() - 1)


def largest_fitting(fits: Callable[[int], bool], limit: int) -> int:
    """Largest power of two b <= limit with fits(b), doubling from 1; 0 when not even 1 fits."""
    best, b = 0, 1
    while b <= limit:
        if not fits(b):
            break
        best, b = b, b * 2
    return best


def _trial_step(model: nn.Module, batch: int, size: int, device: torch.device, channels_last: bool,
                precision: str) -> None:
    """One forward and backward pass with every parameter trainable; in eval mode, so
    BatchNorm statistics are untouched; gradients are dropped afterwards."""
    flags = [p.requires_grad for p in model.parameters()]
    try:
        for p in model.parameters():
            p.requires_grad_(True)
        x = to_device(torch.randn(batch, 3, size, size), device, channels_last)
        with eval_mode(model):
            with autocast(device, precision):
                out = model(x)
            out.float().logsumexp(dim=1).mean().backward()
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
            p.grad = None


def _proc_bytes(file: str, key: str) -> int | None:
    """The `key:  N kB` line of a /proc file, in bytes; None where there is none (not Linux)."""
    try:
        with open(file, encoding="ascii") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def available_memory() -> int | None:
    return _proc_bytes("/proc/meminfo", "MemAvailable")


def step_memory(model: nn.Module, batch: int, size: int, device: torch.device, channels_last: bool,
                precision: str) -> int | None:
    """Bytes one CPU training step of `batch` images adds to the process's peak RSS."""
    if not _reset_peak_rss():
        return None
    before = _proc_bytes("/proc/self/status", "VmRSS")
    _trial_step(model, batch, size, device, channels_last, precision)
    peak = _proc_bytes("/proc/self/status", "VmHWM")
    return None if before is None or peak is None else max(0, peak - before)


def auto_batch_size(model: nn.Module, size: int, n_train: int, device: torch.device, channels_last: bool = True,
                    precision: str = "fp32") -> int:
    """The batch size `--batch-size auto` trains with (see the module docstring)."""
    cap = min(AUTO_MAX, floor_pow2(n_train // MIN_STEPS))
    if device.type == "cuda":
        fitting, how = cuda_search(model, size, cap, device, channels_last, precision)
    else:
        estimate = _cpu_estimate(model, size, device, channels_last, precision)
        if estimate is None:
            log.warning("batch size auto: cannot measure memory on this system; using 32")
            return 32
        fitting, how = estimate
    if fitting < 1:
        raise ConfigError(f"not even one {size}px image fits a training step on {device}; "
                          "use a smaller --image-size or backbone")
    chosen = min(fitting, cap)
    log.info("batch size auto: %d (%s; capped at %d = min(%d, %d training images / %d steps per epoch))",
             chosen, how, cap, AUTO_MAX, n_train, MIN_STEPS)
    return chosen


def cuda_search(model: nn.Module, size: int, cap: int, device: torch.device, channels_last: bool,
                 precision: str) -> tuple[int, str]:
    """The largest batch (a power of two up to CAP) whose real training step of MODEL at
    SIZE px fits on the CUDA DEVICE, by a doubling search stopped by the first out-of-memory
    error or the cap; returns (batch, how it was found) for the log."""
    def fits(b: int) -> bool:
        try:
            _trial_step(model, b, size, device, channels_last, precision)
            return True
        except Exception as exc:  # noqa: BLE001 - only out-of-memory ends the search
            if not is_oom(exc):
                raise
        free_device_memory(device)
        return False

    fitting = largest_fitting(fits, cap)  # a real step per candidate: none beyond the cap
    free_device_memory(device)
    return fitting, f"largest that fits on {device}, trying up to the cap: {fitting}"


def _cpu_estimate(model: nn.Module, size: int, device: torch.device, channels_last: bool,
                  precision: str) -> tuple[int, str] | None:
    """Peak memory of steps of 2 and 4 images, extrapolated to MEMORY_SHARE of the available
    memory; None where memory cannot be measured."""
    small, large = 2, 4
    m_small = step_memory(model, small, size, device, channels_last, precision)
    m_large = step_memory(model, large, size, device, channels_last, precision)
    avail = available_memory()
    if m_small is None or m_large is None or avail is None:
        return None
    per_image = max(1, (m_large - m_small) // (large - small))
    fixed = max(0, m_small - small * per_image)
    budget = int(avail * MEMORY_SHARE)
    fitting = largest_fitting(lambda b: fixed + b * per_image <= budget, 1 << 16)
    return fitting, (f"a step needs ~{fixed / 2**20:.0f} MiB + {per_image / 2**20:.1f} MiB per image; "
                     f"largest within half the available {avail / 2**30:.1f} GiB: {fitting}")


class MicroBatcher:
    """How many images go through the model at once; halves itself on out-of-memory."""

    def __init__(self) -> None:
        self.size: int | None = None  # None: the whole loader batch

    def chunks(self, n: int) -> int:
        return n if self.size is None else min(self.size, n)

    def halved(self, n: int) -> int:
        """The micro-batch size to propose after an out-of-memory error (0: none left)."""
        return self.chunks(n) // 2

    def shrink(self, n: int, where: str) -> None:
        self.adopt(self.halved(n), n, where)

    def adopt(self, size: int, n: int, where: str) -> None:
        """Continue with micro-batches of `size` (agreed by every process) after an
        out-of-memory error; 0 means not even one image fits."""
        current = self.chunks(n)
        if size < 1:
            raise VisiontuneError(f"out of memory {where} even one image at a time; use a smaller --image-size "
                                  "or backbone, or another device")
        self.size = size
        steps = -(-n // self.size)
        log.warning("out of memory %s with %d images at once: continuing with micro-batches of %d, gradients of %d "
                    "accumulated per optimizer step (effective batch %d and learning rate unchanged)",
                    where, current, self.size, steps, n)

