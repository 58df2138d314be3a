"""Train and eval pipelines from the backbone's own preprocessing (`Preprocess`).

eval: resize to input_size / crop_pct, center crop, normalise. train, by preset:

| preset | what it adds |
|---|---|
| none   | the eval pipeline |
| light  | random resized crop (area `min_scale`..1) + horizontal flip |
| medium | light + RandAugment (timm `rand-m9-mstd0.5-inc1-mmax9`: magnitude 9, noise std 0.5, at most 9) + random erasing (p 0.25, per-pixel noise), timm's `create_transform` |
| heavy  | medium + mixup (alpha 0.8) / cutmix (alpha 1.0) on each batch with soft targets (timm `Mixup`, applied by the trainer) |

TTA (`tta_transform`): the eval view, its mirror image, the whole image (no crop) and its
mirror, stacked; the model's logits are averaged over them.

Two steps are fused for speed with the same result: the eval resize + center crop is one
PIL resize of just the cropped region (`ResizeCenterCrop`, within 2 grey levels of
torchvision's Resize + CenterCrop (rounding), ~45% faster), and uint8 -> float ->
normalise is one pass (`ToNormalizedTensor`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from timm.data import create_transform
from torchvision.transforms import v2 as T

from visiontune.data.preprocess import Preprocess

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


_PIL_RESAMPLE = {
    "bilinear": Image.BILINEAR,
    "bicubic": Image.BICUBIC,
    "nearest": Image.NEAREST,
    "lanczos": Image.LANCZOS,
    "box": Image.BOX,
    "hamming": Image.HAMMING,
}


class ResizeCenterCrop:
    """torchvision's `Resize(side)` then `CenterCrop(size)` on a PIL image, as one resize of
    the region the crop keeps: the same output grid and filter scale, so the same pixels
    up to rounding (<= 2 levels, bicubic; <= 1 bilinear), with ~45% less resampling work.
    Tensors, and images the crop would pad, take the two-step path."""

    def __init__(self, side: int, size: int, interpolation: str = "bilinear") -> None:
        self.side, self.size, self.interpolation = side, size, interpolation
        self._two_step = T.Compose([T.Resize(side, interpolation=interpolation_mode(interpolation), antialias=True),
                                    T.CenterCrop(size)])

    def __call__(self, image: Image.Image) -> Image.Image:
        if not isinstance(image, Image.Image):
            return self._two_step(image)
        w, h = image.size
        if w <= h:  # torchvision's output size: shorter side = side, longer side truncated
            out_w, out_h = self.side, int(self.side * h / w)
        else:
            out_w, out_h = int(self.side * w / h), self.side
        if out_w < self.size or out_h < self.size:  # the crop pads: leave that to torchvision
            return self._two_step(image)
        top, left = int(round((out_h - self.size) / 2.0)), int(round((out_w - self.size) / 2.0))
        sx, sy = w / out_w, h / out_h
        box = (left * sx, top * sy, (left + self.size) * sx, (top + self.size) * sy)
        return image.resize((self.size, self.size), _PIL_RESAMPLE.get(self.interpolation, Image.BILINEAR), box=box)


class ToNormalizedTensor:
    """PIL RGB image -> float32 (3, H, W) tensor (x / 255 - mean) / std in one pass
    (HWC in memory, a channels_last-strided view)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.shift = torch.tensor([255.0 * m for m in mean])
        self.scale = torch.tensor([1.0 / (255.0 * s) for s in std])

    def __call__(self, image: Image.Image) -> torch.Tensor:
        hwc = torch.from_numpy(np.array(image, dtype=np.uint8)).float()
        return hwc.sub_(self.shift).mul_(self.scale).permute(2, 0, 1)  # broadcast over the contiguous last axis


def _to_tensor(pre: Preprocess) -> list:
    return [ToNormalizedTensor(pre.mean, pre.std)]


def eval_side(pre: Preprocess) -> int:
    """Shorter side the eval pipeline resizes to before its center crop."""
    return int(round(pre.input_size / pre.crop_pct))


def train_side(pre: Preprocess) -> int:
    """Shorter side training images are first brought down to (fastai's presizing): 2x the
    input, so a random crop of >= 1/4 of the area still has input-size resolution."""
    return 2 * pre.input_size


def eval_transform(pre: Preprocess) -> T.Compose:
    return T.Compose([ResizeCenterCrop(eval_side(pre), pre.input_size, pre.interpolation), *_to_tensor(pre)])


TTA_VIEWS = 4


class TTAViews:
    """(TTA_VIEWS, 3, H, W): the eval view, its mirror, the whole image resized to the input
    (shorter side, then the centre: crop_pct 1) and its mirror (fastai's `tta` spirit)."""

    def __init__(self, pre: Preprocess) -> None:
        self.center = eval_transform(pre)
        self.whole = T.Compose([ResizeCenterCrop(pre.input_size, pre.input_size, pre.interpolation), *_to_tensor(pre)])

    def __call__(self, image: Image.Image) -> torch.Tensor:
        center, whole = self.center(image), self.whole(image)
        return torch.stack([center, center.flip(-1), whole, whole.flip(-1)])


def tta_transform(pre: Preprocess) -> TTAViews:
    return TTAViews(pre)


def train_transform(pre: Preprocess, augment: str = "light", hflip: float = 0.5,
                    min_scale: float = 0.35) -> Callable[[Image.Image], torch.Tensor]:
    if augment == "none":
        return eval_transform(pre)
    if augment in ("medium", "heavy"):  # heavy's mixup / cutmix happens on batches, in the trainer
        return create_transform(pre.input_size, is_training=True, scale=(min_scale, 1.0), hflip=hflip,
                                auto_augment="rand-m9-mstd0.5-inc1-mmax9", interpolation=pre.interpolation,
                                mean=pre.mean, std=pre.std, re_prob=0.25, re_mode="pixel", re_count=1)
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
