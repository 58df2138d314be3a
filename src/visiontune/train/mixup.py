"""Mixup / cutmix for the heavy augmentation preset, timm's `Mixup` as its ImageNet
recipes set it (data/transforms.py lists the presets)."""

from __future__ import annotations

import logging

from timm.data import Mixup

from visiontune.config import RunConfig
from visiontune.tasks.base import Task

log = logging.getLogger(__name__)

MIXUP_ALPHA, CUTMIX_ALPHA = 0.8, 1.0  # timm's ImageNet recipes


def mixup_for(cfg: RunConfig, task: Task) -> Mixup | None:
    """Mixup or cutmix (each batch one or the other) with soft targets for --augment heavy.
    Label smoothing is applied here, to the mixed targets (the soft-target loss has none)."""
    if cfg.augmentation.augment != "heavy":
        return None
    if task.mixup_targets is None:
        log.info("--augment heavy: no mixup / cutmix for the %s task (its targets do not mix as classes do)", task.name)
        return None
    return Mixup(mixup_alpha=MIXUP_ALPHA, cutmix_alpha=CUTMIX_ALPHA, switch_prob=0.5, mode="batch",
                 label_smoothing=cfg.outputs.label_smoothing, num_classes=task.num_outputs,
                 multi_label=task.mixup_targets == "multi-hot")
