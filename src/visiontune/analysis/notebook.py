"""`show_batch`: training images as the model sees them, with their labels (fastai's
`dls.show_batch`), as a matplotlib Figure that Jupyter displays inline."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from visiontune.config import RunConfig
from visiontune.data.images import load_rgb
from visiontune.data.items import TRAIN
from visiontune.data.preprocess import Preprocess
from visiontune.data.sources import resolve_inputs
from visiontune.data.transforms import train_transform
from visiontune.models.classifier import create_classifier
from visiontune.plots import grid_figure
from visiontune.rundir import RunDir
from visiontune.tasks.labels import label_text


def show_batch(data_or_run: str | os.PathLike[str], n: int = 16, *, cols: int = 4, seed: int = 0,
               **overrides: Any) -> Figure:
    """`n` training images after the training transform (augmentation preset, crop, flip;
    heavy's mixup mixes whole batches and is not shown), un-normalised, titled with their
    labels. `data_or_run`: a data folder (options as for `fit`, e.g. `augment="medium"`,
    `image_size=224`) or a run directory (its config and data)."""
    cfg, source = _inputs(Path(data_or_run), overrides)
    pre = _preprocess(Path(data_or_run), cfg)
    a = cfg.augmentation
    transform = train_transform(pre, a.augment, a.hflip, a.min_scale)
    items = source.split(TRAIN) or source.items
    rng = random.Random(seed)
    chosen = rng.sample(items, min(n, len(items)))
    random.seed(seed)  # the transforms draw from the global generators
    np.random.seed(seed)
    torch.manual_seed(seed)
    images = [_unnormalise(transform(load_rgb(it.path)), pre) for it in chosen]
    titles = [label_text(it.label, ", ") or "(no label)" for it in chosen]
    return grid_figure(images, titles, cols=cols)


def _inputs(target: Path, overrides: dict[str, Any]) -> tuple[RunConfig, Any]:
    if (saved := RunDir(target).read_config()) is not None:
        return resolve_inputs(None, saved, None, overrides)
    return resolve_inputs(target, None, None, {"progress": False, **overrides})


def _preprocess(target: Path, cfg: RunConfig) -> Preprocess:
    if (saved := RunDir(target).read_preprocess()) is not None:
        return saved
    from dataclasses import replace

    _, pre = create_classifier(replace(cfg.model, weights="none"), 2)  # the backbone's own preprocessing
    return pre


def _unnormalise(x: Any, pre: Preprocess) -> np.ndarray:
    mean, std = np.array(pre.mean).reshape(3, 1, 1), np.array(pre.std).reshape(3, 1, 1)
    return np.clip((x.numpy() * std + mean).transpose(1, 2, 0), 0, 1)
