"""What a backbone's weights expect of an image: input size, normalisation, resize
interpolation and crop fraction. Built by the backbone sources (models/), consumed by the
transforms and stored with every trained model."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Preprocess:
    """What the weights expect: input size, normalisation, resize interpolation, crop."""

    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"
    crop_pct: float = 0.875

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Preprocess:
        return cls(
            input_size=int(raw["input_size"]),
            mean=tuple(float(v) for v in raw["mean"]),  # type: ignore[arg-type]
            std=tuple(float(v) for v in raw["std"]),  # type: ignore[arg-type]
            interpolation=str(raw.get("interpolation", "bilinear")),
            crop_pct=float(raw.get("crop_pct", 0.875)),
        )

    def resized(self, input_size: int) -> Preprocess:
        return Preprocess(input_size, self.mean, self.std, self.interpolation, self.crop_pct)
