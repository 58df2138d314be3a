"""Devices, precision (autocast), memory format and seeds."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn


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
