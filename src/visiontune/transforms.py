"""Train and eval pipelines from the backbone's own preprocessing (`Preprocess`).

train: random resized crop (scale `min_scale`..1) + horizontal flip, or the eval pipeline
when augmentation is off; eval: resize to input_size / crop_pct, center crop, normalise.
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2 as T

from visiontune.models import Preprocess

_INTERPOLATION = {
    "bilinear": T.InterpolationMode.BILINEAR,
    "bicubic": T.InterpolationMode.BICUBIC,
    "nearest": T.InterpolationMode.NEAREST,
    "lanczos": T.InterpolationMode.LANCZOS,
    "box": T.InterpolationMode.BOX,
    "hamming": T.InterpolationMode.HAMMING,
}


def interpolation_mode(name: str) -> T.InterpolationMode:
    return _INTERPOLATION.get(name, T.InterpolationMode.BILINEAR)


def _to_tensor(pre: Preprocess) -> list[T.Transform]:
    return [T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(list(pre.mean), list(pre.std))]


def eval_side(pre: Preprocess) -> int:
    """Shorter side the eval pipeline resizes to before its center crop."""
    return int(round(pre.input_size / pre.crop_pct))


def train_side(pre: Preprocess) -> int:
    """Shorter side training images are first brought down to (fastai's presizing): 2x the
    input, so a random crop of >= 1/4 of the area still has input-size resolution."""
    return 2 * pre.input_size


def eval_transform(pre: Preprocess) -> T.Compose:
    resize = eval_side(pre)
    return T.Compose(
        [
            T.Resize(resize, interpolation=interpolation_mode(pre.interpolation), antialias=True),
            T.CenterCrop(pre.input_size),
            *_to_tensor(pre),
        ]
    )


def train_transform(pre: Preprocess, augment: bool = True, hflip: float = 0.5, min_scale: float = 0.35) -> T.Compose:
    if not augment:
        return eval_transform(pre)
    steps: list[T.Transform] = [
        T.RandomResizedCrop(
            pre.input_size,
            scale=(min_scale, 1.0),
            interpolation=interpolation_mode(pre.interpolation),
            antialias=True,
        )
    ]
    if hflip > 0:
        steps.append(T.RandomHorizontalFlip(hflip))
    return T.Compose(steps + _to_tensor(pre))
