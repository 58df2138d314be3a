"""Devices (which exist here, and a clear refusal of one that does not), precision
(autocast), memory format and seeds."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from visiontune.errors import ConfigError


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


DEVICES = "auto, cpu, cuda, cuda:N or mps"


def resolve_device(name: str) -> torch.device:
    """'auto': CUDA when PyTorch sees a GPU, else Apple Silicon's GPU (mps), else the CPU. A
    device named outright must exist here: else a ConfigError says which devices do."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r} is not a device; use {DEVICES}") from None
    _require_present(device)
    return device


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def available_devices() -> list[str]:
    """The devices PyTorch can run on here: cpu, cuda:0..N-1, mps."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return ["cpu", *(f"cuda:{i}" for i in range(gpus)), *(["mps"] if _mps_available() else [])]


def _require_present(device: torch.device) -> None:
    here = ", ".join(available_devices())
    if device.type == "cuda":
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if gpus == 0:
            built = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a build without CUDA"
            raise ConfigError(f"--device {device}: PyTorch sees no CUDA GPU here (torch {torch.__version__}, {built}); "
                              f"devices here: {here}. Use --device auto or cpu, or install a CUDA build of torch "
                              f"(docs/guides/platforms.md)")
        if device.index is not None and device.index >= gpus:
            raise ConfigError(f"--device {device}: there are {gpus} CUDA GPU(s) here; devices here: {here}")
    elif device.type == "mps" and not _mps_available():
        raise ConfigError(f"--device mps: Apple Silicon's GPU is not available here (it needs an M-series Mac, macOS "
                          f"12.3 or newer and a torch built with MPS); devices here: {here}. Use --device auto or cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"--device {device}: visiontune runs on {DEVICES}; devices here: {here}")


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


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """`module` in eval mode inside the block; afterwards every submodule back in its own
    mode (a partly frozen model mixes them: `module.train(was_training)` would not)."""
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        yield
    finally:
        for m, training in modes.items():
            m.train(training)


@contextlib.contextmanager
def batch_norm_for(net: nn.Module, images: int) -> Iterator[None]:
    """A (micro-)batch of one image (the tail of an epoch, of a worker's stream, of a
    micro-batched step) cannot give BatchNorm batch statistics: for it, the BatchNorm
    layers in training mode use their running statistics, as at inference, instead of
    failing; the image still trains the weights, and no process skips a step."""
    training = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training] \
        if images == 1 else []
    for m in training:
        m.eval()
    try:
        yield
    finally:
        for m in training:
            m.train()
