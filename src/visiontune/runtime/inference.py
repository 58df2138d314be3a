"""Running a model over a loader without gradients: loss, targets and probabilities, in
micro-batches that halve themselves after an out-of-memory error."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from visiontune.data.loaders import read_ahead
from visiontune.errors import DataError
from visiontune.models.novelty import scored
from visiontune.runtime.batchsize import MicroBatcher, free_device_memory, is_oom
from visiontune.runtime.device import autocast, to_device
from visiontune.tasks.base import Task, known_rows

# one batch of eval_batches: probabilities, targets, row numbers, loss sum, labelled count, OOD scores (or None)
Batch = tuple[np.ndarray, np.ndarray, np.ndarray, float, float, "np.ndarray | None"]


@dataclass
class EvalOutput:
    """Outputs over a list of images, one row per image in the list's order: loaders may
    read in any order (shards, workers, processes); rows are put back by each image's own
    row number (`ids`)."""

    loss: float  # mean loss over the labelled rows (NaN when none)
    targets: np.ndarray  # one row per image; markers for unlabelled / unreadable (tasks/base.py)
    probs: np.ndarray
    ids: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # each row's place in the list
    ood: np.ndarray | None = None  # each row's OOD score (models/novelty.py); None: the model has no bank

    def state_dict(self) -> dict[str, Any]:
        """Its rows as tensors, for a checkpoint (which holds no pickled objects)."""
        return {"loss": self.loss, "targets": torch.from_numpy(np.asarray(self.targets)),
                "probs": torch.from_numpy(np.asarray(self.probs)), "ids": torch.from_numpy(np.asarray(self.ids))}

    @classmethod
    def of_state(cls, state: dict[str, Any] | None) -> EvalOutput | None:
        """The outputs `state_dict` kept (None for an empty or missing state)."""
        if not state:
            return None
        return cls(float(state["loss"]), state["targets"].numpy(), state["probs"].numpy(), state["ids"].numpy())

    def keep(self, mask: np.ndarray) -> None:
        self.targets, self.probs, self.ids = self.targets[mask], self.probs[mask], self.ids[mask]
        self.ood = None if self.ood is None else self.ood[mask]

    def require_all(self, n: int, names: Sequence[str] | None = None) -> None:
        """Every row 0..n-1 exactly once, else DataError naming what was not read (a shard
        index that names samples its tar files lack, a sample read twice)."""
        if len(self.ids) == n and np.array_equal(self.ids, np.arange(n)):
            return
        missing = sorted(set(range(n)) - set(self.ids.tolist()))
        twice = len(self.ids) - len(set(self.ids.tolist()))
        example = f" (e.g. {names[missing[0]]})" if names is not None and missing else ""
        raise DataError(f"{len(missing)} of {n} images were not read{example} and {twice} were read twice; "
                        "if they come from shards, the shards do not hold what their index lists: write them again "
                        "with `visiontune shard`")


def ordered(loss: float, targets: list[np.ndarray], probs: list[np.ndarray], ids: list[np.ndarray],
            ood: list[np.ndarray] | None = None) -> EvalOutput:
    """Parts read in any order, as one output sorted by row number."""
    row_ids = np.concatenate(ids).astype(np.int64)
    order = np.argsort(row_ids, kind="stable")
    return EvalOutput(loss, np.concatenate(targets)[order], np.concatenate(probs)[order], row_ids[order],
                      np.concatenate(ood)[order] if ood else None)


def merge_outputs(parts: list[tuple[float, np.ndarray, np.ndarray, np.ndarray]]) -> EvalOutput:
    """Outputs of several processes as one, rows in list order: (loss sum, targets, probs,
    ids) each (a process may have had no rows)."""
    full = [p for p in parts if len(p[1])] or parts[:1]
    n = sum(len(t) for _, t, _, _ in full)
    return ordered(sum(s for s, _, _, _ in full) / max(1, n) if n else float("nan"), [t for _, t, _, _ in full],
                   [p for _, _, p, _ in full], [i for _, _, _, i in full])


def progress(loader: Any, enabled: bool, desc: str, total: int | None = None) -> Any:
    if not enabled:
        return loader
    return tqdm(loader, desc=desc, total=total, leave=False, dynamic_ncols=True, disable=None)


def forward_chunks(model: nn.Module, x: torch.Tensor, micro: MicroBatcher, device: torch.device,
                   precision: str) -> torch.Tensor:
    """model(x) in micro-batches (under no_grad/inference mode); halves them on out-of-memory."""
    return forward_scored(model, x, micro, device, precision, score=False)[0]


def forward_scored(model: nn.Module, x: torch.Tensor, micro: MicroBatcher, device: torch.device, precision: str,
                   score: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(model(x), the OOD score of each image or None when the model has no bank:
    models/novelty.scored) in micro-batches; halves them on out-of-memory. `score=False`:
    the outputs alone."""
    while True:
        try:
            with autocast(device, precision):
                parts = [scored(model, c) if score else (model(c), None) for c in x.split(micro.chunks(len(x)))]
            outputs = torch.cat([o.float() for o, _ in parts])
            return outputs, None if parts[0][1] is None else torch.cat([s.float() for _, s in parts])
        except Exception as exc:  # noqa: BLE001 - only out-of-memory is retried
            if not is_oom(exc):
                raise
        free_device_memory(device)
        micro.shrink(len(x), "in evaluation")


@torch.inference_mode()
def eval_batches(model: nn.Module, loader: DataLoader, device: torch.device, task: Task, show_progress: bool = False,
                 channels_last: bool = True, precision: str = "auto",
                 micro: MicroBatcher | None = None) -> Iterator[Batch]:
    """Per batch, in the order the loader reads: the task's probabilities, the targets
    (markers for unlabelled / unreadable rows), each row's number in the caller's list (the
    loader's datasets yield it: ImageDataset, ShardStream, FeatureDataset), the summed loss
    over its labelled rows and their count, and each image's OOD score (None when the model
    has no bank: models/novelty.py; with test-time augmentation, the eval view's, the view
    its threshold was set on: the mean over the views has a narrower spread)."""
    model.eval()
    micro = micro or MicroBatcher()
    criterion = task.loss()
    total = len(loader) if hasattr(loader, "__len__") else None  # type: ignore[arg-type]
    for x, y, ids in progress(read_ahead(loader), show_progress, "eval", total):
        views = x.shape[1] if x.ndim == 5 else 0  # test-time augmentation: (B, V, 3, H, W)
        x, y = to_device(x.flatten(0, 1) if views else x, device, channels_last), y.to(device)
        logits, ood = forward_scored(model, x, micro, device, precision)
        if views:
            logits = task.average_views(logits.view(-1, views, logits.shape[-1]))  # the logits averaged
            ood = None if ood is None else ood.view(-1, views)[:, 0]  # the eval view's: its threshold's scale
        known = known_rows(y)  # NO_LABEL (predict) and UNREADABLE rows carry no loss
        total, count = 0.0, 0.0
        if known.any():
            total = criterion.total(logits[known], y[known]).item()
            count = float(criterion.norm(y[known]).item())
        yield (task.probabilities(logits).cpu().numpy(), y.cpu().numpy(), np.asarray(ids), total, count,
               None if ood is None else ood.cpu().numpy())


def run_eval(model: nn.Module, loader: DataLoader, device: torch.device, task: Task, show_progress: bool = False,
             channels_last: bool = True, precision: str = "auto", micro: MicroBatcher | None = None) -> EvalOutput:
    """The task's mean loss over labelled rows, all targets and the task's probabilities
    (and the OOD scores of a model with a bank), rows in the order of the loader's list (by row number, whatever order it read in)."""
    total, count, probs, targets, ids, ood = 0.0, 0.0, [], [], [], []
    for p, y, i, batch_total, batch_count, score in eval_batches(model, loader, device, task, show_progress,
                                                                 channels_last, precision, micro):
        total, count = total + batch_total, count + batch_count
        probs.append(p)
        targets.append(y)
        ids.append(i)
        if score is not None:
            ood.append(score)
    if not probs:
        return EvalOutput(float("nan"), np.zeros(0, dtype=int), np.zeros((0, task.num_outputs)))
    return ordered(total / count if count else float("nan"), targets, probs, ids, ood)
