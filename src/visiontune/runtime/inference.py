"""Running a model over a loader without gradients: loss, targets and probabilities, in
micro-batches that halve themselves after an out-of-memory error."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from visiontune.runtime.batchsize import MicroBatcher, free_device_memory, is_oom
from visiontune.runtime.device import autocast, to_device
from visiontune.tasks.base import Task, row_markers


@dataclass
class EvalOutput:
    loss: float  # mean loss over the labelled rows (NaN when none)
    targets: np.ndarray  # one row per image; negative markers for unlabelled / unreadable
    probs: np.ndarray

    def keep(self, mask: np.ndarray) -> None:
        self.targets, self.probs = self.targets[mask], self.probs[mask]


def merge_outputs(parts: list[tuple[float, np.ndarray, np.ndarray]]) -> EvalOutput:
    """Outputs of several processes as one: (loss sum, targets, probs) each."""
    n = sum(len(t) for _, t, _ in parts)
    return EvalOutput(sum(s for s, _, _ in parts) / max(1, n), np.concatenate([t for _, t, _ in parts]),
                      np.concatenate([p for _, _, p in parts]))


def progress(loader: Any, enabled: bool, desc: str) -> Any:
    if not enabled:
        return loader
    return tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, disable=None)


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
def eval_batches(model: nn.Module, loader: DataLoader, device: torch.device, task: Task, show_progress: bool = False,
                 channels_last: bool = True, precision: str = "auto",
                 micro: MicroBatcher | None = None) -> Iterator[tuple[np.ndarray, np.ndarray, float, float]]:
    """Per batch, in loader order: the task's probabilities, the targets (markers for
    unlabelled / unreadable rows), the summed loss over its labelled rows and their count."""
    model.eval()
    micro = micro or MicroBatcher()
    criterion = task.loss()
    for x, y in progress(loader, show_progress, "eval"):
        views = x.shape[1] if x.ndim == 5 else 0  # test-time augmentation: (B, V, 3, H, W)
        x, y = to_device(x.flatten(0, 1) if views else x, device, channels_last), y.to(device)
        logits = forward_chunks(model, x, micro, device, precision)
        if views:
            logits = logits.view(-1, views, logits.shape[-1]).mean(dim=1)  # logits averaged over the views
        known = row_markers(y) >= 0  # NO_LABEL (predict) and UNREADABLE rows carry no loss
        total, count = 0.0, 0.0
        if known.any():
            total = criterion.total(logits[known], y[known]).item()
            count = float(criterion.norm(y[known]).item())
        yield task.probabilities(logits).cpu().numpy(), y.cpu().numpy(), total, count


def run_eval(model: nn.Module, loader: DataLoader, device: torch.device, task: Task, show_progress: bool = False,
             channels_last: bool = True, precision: str = "auto", micro: MicroBatcher | None = None) -> EvalOutput:
    """The task's mean loss over labelled rows, all targets and the task's probabilities."""
    total, count, probs, targets = 0.0, 0.0, [], []
    for p, y, batch_total, batch_count in eval_batches(model, loader, device, task, show_progress, channels_last,
                                                       precision, micro):
        total, count = total + batch_total, count + batch_count
        probs.append(p)
        targets.append(y)
    if not probs:
        return EvalOutput(float("nan"), np.zeros(0, dtype=int), np.zeros((0, task.num_classes)))
    return EvalOutput(total / count if count else float("nan"), np.concatenate(targets), np.concatenate(probs))
