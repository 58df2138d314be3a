"""The frozen leading blocks of a partly frozen backbone (freeze-k) as one ONNX Runtime
session, forward only, while the rest trains in PyTorch.

With half of Lite0's layer groups frozen (stem and blocks 0-2, where the 224 px maps are
largest), their eager forward is 31-42% of a training step on this CPU, and ONNX Runtime
runs it 3.8-5.0x faster: freeze-k's epochs 1.35x faster (bench/frozen_prefix.py,
bench/RESULTS.md, issue 23). The blocks are frozen and in eval mode
(train/plan.set_train_modes), so the session computes the same function: it is built by
`runtime/engine.frozen_engine` (exported once per weights digest into the cache, checked
against eager), and the whole backbone with the session in place is checked against the
backbone without it before any step uses it. Any failure leaves the phase in PyTorch.

The backbone must run its leading modules as a chain (each one's output the next one's
input): true of timm's and torchvision's CNNs, whose forward runs its children in order
(nn.Sequential stages opened here); where it is not, the check refuses.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

import torch
from torch import nn

from visiontune.runtime.device import eval_mode
from visiontune.runtime.engine import FEATURE_TOLERANCE, frozen_engine

log = logging.getLogger(__name__)

_STOCHASTIC = ("Dropout", "DropPath", "DropBlock")  # module class names whose training mode changes the output


class FrozenPrefix(nn.Module):
    """`model(x)` with the backbone's frozen leading modules replaced, for this call, by
    one session: the first returns the session's output, the others pass it on.

    The model is a registered submodule, so what is asked of the wrapper reaches it:
    `eval()` (validation runs the model in eval mode: no dropout, stochastic depth or
    BatchNorm statistics moved by validation images), `modules()` (the BatchNorm layers of
    a one-image batch, trainer.batch_norm_for). Its parameters are the model's own."""

    def __init__(self, model: nn.Module, modules: list[nn.Module], session: nn.Module, channels_last: bool) -> None:
        super().__init__()
        self.model = model
        self._parts = (modules, session)  # a tuple: not registered (the modules are the model's; the session is ours)
        self.channels_last = channels_last
        self.names: list[str] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with self._in_place():
            return self.model(x)

    @contextlib.contextmanager
    def _in_place(self) -> Iterator[None]:
        modules, session = self._parts

        def first(x: torch.Tensor) -> torch.Tensor:
            out = session(x)
            return out.contiguous(memory_format=torch.channels_last) if self.channels_last and out.ndim == 4 else out

        modules[0].forward = first
        for module in modules[1:]:
            module.forward = _passed_on
        try:
            yield
        finally:
            for module in modules:
                del module.forward


def _passed_on(x: torch.Tensor) -> torch.Tensor:
    return x


def frozen_prefix(model: nn.Module, image_size: int, device: torch.device, engine: str,
                  cache_dir: str | os.PathLike[str] | None, images: int, channels_last: bool) -> FrozenPrefix | None:
    """What a training step runs `model` through in this phase: a FrozenPrefix when the
    backbone's leading modules are frozen, ONNX Runtime is the engine and the check passes;
    else None (PyTorch). `images`: how many the phase will put through (the export must pay)."""
    if device.type != "cpu" or engine == "torch":
        return None
    named = _leading_frozen(model.backbone, image_size)  # type: ignore[union-attr]
    if not named:
        return None
    chain = nn.Sequential(*[m for _, m in named])
    session = frozen_engine(chain, image_size, device, engine, cache_dir, images)  # each module's mode kept
    if session is chain:  # no ONNX Runtime here, or too few images to pay for the export
        return None
    net = FrozenPrefix(model, [m for _, m in named], session, channels_last)
    net.names = [n for n, _ in named]
    if not _same_output(model, net, image_size):
        log.warning("freeze-k: the frozen blocks stay in PyTorch (the backbone does not run them as a chain)")
        return None
    log.info("frozen blocks %s run forward-only in ONNX Runtime in this phase", ", ".join(net.names))
    return net


def _leading_frozen(backbone: nn.Module, image_size: int) -> list[tuple[str, nn.Module]]:
    """The backbone's leading modules in call order (children, nn.Sequential opened) up to
    the first that trains or is random in training mode; [] when none holds parameters."""
    chain = _children(backbone, "")
    order: list[str] = []
    hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: order.append(n) if n not in order else None)
             for n, m in chain]
    try:
        with eval_mode(backbone), torch.inference_mode():
            backbone(torch.zeros(1, 3, image_size, image_size))
    finally:
        for hook in hooks:
            hook.remove()
    by_name = dict(chain)
    prefix: list[tuple[str, nn.Module]] = []
    for name in order:
        module = by_name[name]
        if any(p.requires_grad for p in module.parameters()) or _random_in_training(module):
            break
        prefix.append((name, module))
    while prefix and not any(True for _ in prefix[-1][1].parameters()):  # end on a frozen block, not an activation
        prefix.pop()
    return prefix


def _children(module: nn.Module, prefix: str) -> list[tuple[str, nn.Module]]:
    out: list[tuple[str, nn.Module]] = []
    for name, child in module.named_children():
        if isinstance(child, nn.Sequential):
            out += _children(child, f"{prefix}{name}.")
        else:
            out.append((prefix + name, child))
    return out


def _random_in_training(module: nn.Module) -> bool:
    """Whether a module of `module` in training mode draws random numbers or updates
    statistics (dropout, stochastic depth, BatchNorm that trains its statistics)."""
    return any(m.training and (type(m).__name__.startswith(_STOCHASTIC) or
                               isinstance(m, nn.modules.batchnorm._BatchNorm))
               for m in module.modules())


def _same_output(model: nn.Module, net: FrozenPrefix, image_size: int) -> bool:
    """The backbone's output with the session in place against without it (eval mode, a
    fixed random batch), within the engine's tolerance."""
    backbone = model.backbone  # type: ignore[union-attr]
    x = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    with eval_mode(backbone), torch.inference_mode():
        eager = backbone(x).float()
        with net._in_place():
            ours = backbone(x).float()
    diff = float((eager - ours).abs().max()) / max(1.0, float(eager.abs().max()))
    return ours.shape == eager.shape and diff <= FEATURE_TOLERANCE
