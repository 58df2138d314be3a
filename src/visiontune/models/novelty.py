""""None of my classes": how unlike the training images an image is, inside the model.

`NearestNeighbours` holds a bank of L2-normalised pooled features of training images
(float16; a stratified, seeded sample of at most BANK, computed after training with the
weights the run keeps: train/calibrate.py) and scores an image by the Euclidean distance of
its normalised features to the k-th nearest of them (Sun et al. 2022, "Out-of-distribution
detection with deep nearest neighbors"): small for images like the training ones, large for
the rest. On unit vectors that distance is sqrt(2 - 2 cos), so the search is one matrix
product and a top-k: written here, not with scikit-learn's NearestNeighbors or faiss,
because the score must run inside the model's graph (predict, serve, and the exported ONNX,
pt2 and TorchScript files output it beside the probabilities), and at BANK = 2048 rows an
exact product costs ~2.6 MFLOP per image for Lite0's 1280 features (under 1% of the
backbone's forward pass): no index structure pays for itself at that size.

The module is registered on the Classifier (`model.novelty`) only when fitted; weights saved
without a bank load without it (models/classifier.load_weights) and predict gives no score.
`scored(model, x)` is the one call that returns (outputs, score or None) for a Classifier
and for an exported model alike.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

BANK = 2048  # training images whose features the bank keeps at most (a stratified, seeded sample)
K = 10  # the neighbour whose distance is the score (Sun et al.'s k for a ~1% sample of ImageNet)
PASS_SHARE = 0.95  # the threshold lets this share of the validation images pass


def neighbour_k(bank_size: int) -> int:
    """The k of a bank of `bank_size` images: K, fewer for a small bank (a tenth of it, at
    least 1), so that the k-th neighbour is still a near one."""
    return max(1, min(K, bank_size // 10))


class NearestNeighbours(nn.Module):
    """Features -> the distance of their unit vector to the k-th nearest unit vector of the
    bank (one number per image; 0 to 2)."""

    def __init__(self, bank: torch.Tensor, k: int) -> None:
        super().__init__()
        if not 1 <= k <= len(bank):
            raise ValueError(f"k={k} needs a bank of at least k rows (it has {len(bank)})")
        self.register_buffer("bank", F.normalize(bank.float(), dim=1).to(torch.float16))
        self.register_buffer("k", torch.tensor(k, dtype=torch.int64))
        self.neighbour = int(k)  # a Python int: the graph's top-k is a constant

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        unit = F.normalize(features.float(), dim=1)
        similarity = unit @ self.bank.float().T
        kth = similarity.topk(self.neighbour, dim=1).values[:, -1]
        return (2 - 2 * kth).clamp(min=0).sqrt()

    @classmethod
    def of_state(cls, state: dict[str, torch.Tensor], prefix: str = "novelty.") -> NearestNeighbours | None:
        """The module a state dict holds (its `novelty.bank` and `novelty.k`), or None."""
        if f"{prefix}bank" not in state:
            return None
        return cls(state[f"{prefix}bank"], int(state[f"{prefix}k"]))

    def size_bytes(self) -> int:
        return self.bank.numel() * self.bank.element_size()


def scored(model: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(outputs, OOD score or None) of a batch: a model with a `scored` method (a Classifier,
    an exported model's wrapper) gives both, any other model its outputs alone."""
    method = getattr(model, "scored", None)
    return method(x) if method is not None else (model(x), None)


def threshold(scores: np.ndarray, share: float = PASS_SHARE) -> float:
    """The score at or under which `share` of `scores` lie (the validation images that pass)."""
    return float(np.quantile(np.asarray(scores, dtype=np.float64), share, method="higher"))


class ScoredGraph(nn.Module):
    """What export traces for a model with a bank: image -> (mapped outputs, OOD score), so
    the exported file has a second output "ood_score"."""

    def __init__(self, model: nn.Module, output_module: nn.Module) -> None:
        super().__init__()
        self.model, self.output_module = model, output_module

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.model.backbone(x)
        return self.output_module(self.model.outputs(features)), self.model.novelty(features)
