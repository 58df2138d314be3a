"""Grad-CAM overlays and first-layer filters.

Grad-CAM (Selvaraju et al. 2017): the last 4-D activation of the backbone (recorded with
forward hooks, so any CNN works) weighted by the spatially averaged gradient of the class
score, ReLU, upsampled onto the input.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from visiontune.errors import VisiontuneError


def grad_cam(model: nn.Module, x: torch.Tensor, target: int | None = None) -> tuple[np.ndarray, int]:
    """(heat map in [0, 1] of x's size, class explained) for one image tensor (1, 3, H, W)."""
    activations: list[torch.Tensor] = []

    def record(_module: nn.Module, _inp: object, out: object) -> None:
        # the last spatial map: pooling layers emit (B, C, 1, 1), which explains nothing
        if isinstance(out, torch.Tensor) and out.ndim == 4 and out.requires_grad and out.shape[-1] * out.shape[-2] > 1:
            activations.append(out)

    backbone = getattr(model, "backbone", model)
    handles = [m.register_forward_hook(record) for m in backbone.modules() if not list(m.children())]
    model.eval()
    try:
        with torch.enable_grad():
            x = x.clone().requires_grad_(True)
            logits = model(x)
            if not activations:
                raise VisiontuneError("Grad-CAM needs a convolutional backbone (no 4-D feature map found)")
            fmap = activations[-1]
            cls = int(logits.argmax(1)) if target is None else target
            (grad,) = torch.autograd.grad(logits[0, cls], fmap)
    finally:
        for h in handles:
            h.remove()
    if fmap.shape[1] != grad.shape[1]:
        raise VisiontuneError("Grad-CAM: unexpected feature map layout")
    weights = grad.mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * fmap).sum(1, keepdim=True))
    cam = nn.functional.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
    cam = cam.detach()
    cam = (cam - cam.min()) / (cam.max() - cam.min() + 1e-8)
    return cam.cpu().numpy(), cls


def first_layer_filters(model: nn.Module) -> np.ndarray:
    """The first Conv2d's kernels as an (N, k, k, 3) array scaled to [0, 1] per filter."""
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d) and m.in_channels == 3), None)
    if conv is None:
        raise VisiontuneError("no RGB Conv2d in this model to show filters of")
    w = conv.weight.detach().float().cpu().numpy().transpose(0, 2, 3, 1)
    lo = w.min(axis=(1, 2, 3), keepdims=True)
    hi = w.max(axis=(1, 2, 3), keepdims=True)
    return (w - lo) / (hi - lo + 1e-8)
