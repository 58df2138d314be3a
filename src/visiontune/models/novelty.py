""""None of my classes": how unlike the training images an image is, inside the model.

`Novelty` holds a bank of L2-normalised pooled features of training images (float16; a
stratified, seeded sample of at most BANK, computed after training with the weights the run
keeps: train/calibrate.py). It scores an image by two measures, each put in units of its
spread on the validation split, and keeps the larger: the Euclidean distance of its
normalised features to the k-th nearest bank image (Sun et al. 2022, "Out-of-distribution
detection with deep nearest neighbors": large for images unlike any training image), and
the energy of its calibrated logits (Liu et al. 2020: large when no known class fits, which
catches an unseen class that looks like the known ones; the distance alone missed most of
those, bench/ood.py). On unit vectors the distance is sqrt(2 - 2 cos), so the search is one matrix
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


ENERGIES = ("none", "softmax", "sigmoid")  # how a shape's logits give an energy (stored as its index)


def energy(logits: torch.Tensor, kind: int) -> torch.Tensor:
    """The energy of each row of logits, higher for less confident outputs: -logsumexp for
    one class of many (Liu et al. 2020), -sum softplus for independent labels (Wang et al.
    2021's JointEnergy); zeros for a shape with no such notion (kind 0)."""
    if kind == 1:
        return -torch.logsumexp(logits.float(), dim=1)
    if kind == 2:
        return -F.softplus(logits.float()).sum(dim=1)
    return torch.zeros_like(logits[:, 0], dtype=torch.float32)  # traced without a fixed batch size


class Novelty(nn.Module):
    """(features, calibrated logits) -> one OOD score per image: the larger of two, each in
    units of its own spread on the validation split (0 at the median, 1 at the 95th
    percentile: `scale`): the distance of the features' unit vector to the k-th nearest unit
    vector of the bank (Sun et al. 2022: catches images unlike any training image), and the
    energy of the logits (Liu et al. 2020: catches an unseen class that looks like the known
    ones, where the features are near). A shape without an energy (`energy_kind` "none":
    regression) scores by the distance alone. Weights saved with a bank and no scale (the
    first version) score by the raw distance, as their threshold expects."""

    def __init__(self, bank: torch.Tensor, k: int, energy_kind: str = "none",
                 scale: torch.Tensor | None = None) -> None:
        super().__init__()
        if not 1 <= k <= len(bank):
            raise ValueError(f"k={k} needs a bank of at least k rows (it has {len(bank)})")
        self.register_buffer("bank", F.normalize(bank.float(), dim=1).to(torch.float16))
        self.register_buffer("k", torch.tensor(k, dtype=torch.int64))
        self.register_buffer("energy_kind", torch.tensor(ENERGIES.index(energy_kind), dtype=torch.int64))
        self.register_buffer("scale", torch.tensor([[0.0, 1.0], [0.0, 1.0]]) if scale is None else scale.float())
        self.neighbour = int(k)  # Python ints: the graph's top-k and its energy are constants
        self.kind = ENERGIES.index(energy_kind)

    def distance(self, features: torch.Tensor) -> torch.Tensor:
        """The distance (0 to 2) of each unit vector to its k-th nearest in the bank."""
        unit = F.normalize(features.float(), dim=1)
        similarity = unit @ self.bank.float().T
        kth = similarity.topk(self.neighbour, dim=1).values[:, -1]
        return (2 - 2 * kth).clamp(min=0).sqrt()

    def parts(self, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """(images, 2): the distance and the energy, before scaling."""
        return torch.stack([self.distance(features), energy(logits, self.kind)], dim=1)

    def forward(self, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        near = (self.distance(features) - self.scale[0, 0]) / self.scale[0, 1]
        if not self.kind:
            return near
        return torch.maximum(near, (energy(logits, self.kind) - self.scale[1, 0]) / self.scale[1, 1])

    @classmethod
    def of_state(cls, state: dict[str, torch.Tensor], prefix: str = "novelty.") -> Novelty | None:
        """The module a state dict holds (its `novelty.bank`, `novelty.k` and, when fitted
        with them, `novelty.energy_kind` and `novelty.scale`), or None."""
        if f"{prefix}bank" not in state:
            return None
        kind = int(state.get(f"{prefix}energy_kind", torch.tensor(0)))
        return cls(state[f"{prefix}bank"], int(state[f"{prefix}k"]), ENERGIES[kind], state.get(f"{prefix}scale"))

    def size_bytes(self) -> int:
        return self.bank.numel() * self.bank.element_size()


def spread(values: np.ndarray, share: float = PASS_SHARE) -> tuple[float, float]:
    """(median, share-quantile - median) of a score on the validation split: the centre and
    unit that put the distance and the energy on one scale (a unit of at least 1e-6)."""
    values = np.asarray(values, dtype=np.float64)
    centre = float(np.median(values))
    return centre, max(float(np.quantile(values, share)) - centre, 1e-6)


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
        logits = self.model.outputs(features)
        return self.output_module(logits), self.model.novelty(features, logits)
