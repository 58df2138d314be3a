"""The classifier: a backbone without its classifier -> pooled features -> a new head.

`create_classifier(ModelConfig, num_outputs)` returns a `Classifier` and the `Preprocess`
the backbone's weights expect. Backbones come from the sources in backbones.py.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from timm.models import group_parameters
from torch import nn

from visiontune.config import ModelConfig
from visiontune.data.preprocess import Preprocess
from visiontune.models.backbones import create_source_model
from visiontune.models.novelty import Novelty
from visiontune.models.warmstart import warm_start_rows
from visiontune.tasks.calibration import OutputCalibration

log = logging.getLogger(__name__)


class Classifier(nn.Module):
    """`backbone` maps images to pooled features; `head` maps features to class logits;
    `calibration` rescales them per output once the run has fitted it (tasks/calibration.py;
    the identity until then, and during training); `novelty`, once fitted, scores how unlike
    the training images an image is (models/novelty.py; None until then)."""

    def __init__(self, backbone: nn.Module, head: nn.Module, num_features: int, num_outputs: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.calibration = OutputCalibration(num_outputs)
        self.num_features = num_features
        self.warm_start: dict[str, int] = {}  # class -> ImageNet row its head row started from
        self.uncertainty: dict[str, Any] = {}  # what the run fitted on held-out outputs (calibration, sets, ood)
        self.novelty: Novelty | None = None  # registered as a submodule when set

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.outputs(self.backbone(x))

    def outputs(self, features: torch.Tensor) -> torch.Tensor:
        """The calibrated logits of pooled features (what `forward` gives for images)."""
        return self.calibration(self.head(features))

    def on_features(self) -> nn.Module:
        """What runs on pooled features, as one module: the head, then the calibration (what
        `outputs` computes): held-out images scored on cached features get the probabilities
        the model predicts."""
        return nn.Sequential(self.head, self.calibration)

    def scored(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the calibrated logits, the OOD score of each image or None without a bank)."""
        features = self.backbone(x)
        logits = self.outputs(features)
        return logits, None if self.novelty is None else self.novelty(features, logits)


def load_weights(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """`model.load_state_dict(state)`, strict, except that a Classifier's weights saved before
    calibration existed (no calibration.* entries) load as uncalibrated, and that a bank of
    training features (novelty.*: models/novelty.py) is registered when the weights hold
    one; weights without it load without it."""
    if isinstance(model, Classifier):
        model.novelty = Novelty.of_state(state)
        if model.novelty is not None:  # a bank saved before the energy and scale: their defaults
            state = {**{f"novelty.{k}": v for k, v in model.novelty.state_dict().items()}, **state}
    calibration = getattr(model, "calibration", None)
    if isinstance(calibration, OutputCalibration) and not any(k.startswith("calibration.") for k in state):
        state = {**state, **{f"calibration.{k}": torch.ones_like(v) if k == "scale" else torch.zeros_like(v)
                             for k, v in calibration.state_dict().items()}}
    model.load_state_dict(state, strict=True)


def create_classifier(cfg: ModelConfig, num_outputs: int,
                      classes: list[str] | None = None) -> tuple[Classifier, Preprocess]:
    """The pretrained (or random) backbone without its classifier, plus a new head.

    With `classes` and `cfg.warm_start`, head rows of classes named like ImageNet classes
    start from the source classifier's rows; `model.warm_start` records the matches."""
    body, num_features, pre, source_head = create_source_model(cfg.backbone, cfg.weights, cfg.image_size,
                                                               cfg.drop_path, cfg.trust_pickle)
    head = build_head(num_features, num_outputs, cfg.head_hidden, cfg.head_dropout, cfg.head_init_gain)
    model = Classifier(body, head, num_features, num_outputs)
    if classes and cfg.warm_start and cfg.weights != "none" and source_head is not None and not cfg.head_hidden:
        model.warm_start = warm_start_rows(head[-1], source_head, classes)
        if model.warm_start:
            log.info("warm start: head rows from ImageNet classes %s", model.warm_start)
    return model, pre


def build_head(num_features: int, num_outputs: int, hidden: int = 0, dropout: float = 0.0,
               init_gain: float = 0.1) -> nn.Sequential:
    """A new head: [dropout] -> [linear(hidden) -> ReLU -> dropout] -> linear(num_outputs).

    Xavier-uniform weights and zero biases; the final layer's gain is small so the starting
    loss sits near ln(num_outputs) instead of large random logits.
    """
    layers: list[nn.Module] = []
    width = num_features
    if hidden:
        layers += [nn.Linear(width, hidden), nn.ReLU(inplace=True)]
        if dropout:
            layers.append(nn.Dropout(dropout))
        width = hidden
    elif dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(width, num_outputs))
    for i, layer in enumerate(layers):
        if isinstance(layer, nn.Linear):
            last = i == len(layers) - 1
            gain = init_gain if last else math.sqrt(2.0)
            nn.init.xavier_uniform_(layer.weight, gain=gain)
            nn.init.zeros_(layer.bias)
    return nn.Sequential(*layers)


def backbone_groups(model: Classifier, fine: bool = False) -> list[tuple[str, list[str]]]:
    """Layer groups of the backbone, input side first, as (name, parameter names).

    timm models use their own `group_matcher`: coarse (stem, each stage, final conv), or
    with `fine` one group per block (what timm's layer-wise LR decay uses); other models
    use their top-level children, opening `features`/`encoder`/`layers` containers.
    """
    body = model.backbone
    if hasattr(body, "group_matcher"):
        raw = group_parameters(body, body.group_matcher(coarse=not fine))
        groups = [list(raw[k]) for k in sorted(raw)]
    else:
        groups = _module_groups(body, "")
    named = [(_group_name(g), ["backbone." + n for n in g]) for g in groups if g]
    return named


_OPEN = {"features", "encoder", "layers", "blocks", "stages", "trunk"}


def _module_groups(module: nn.Module, prefix: str) -> list[list[str]]:
    groups: list[list[str]] = []
    direct = [prefix + n for n, _ in module.named_parameters(recurse=False)]
    if direct:
        groups.append(direct)
    for name, child in module.named_children():
        if child is None or not any(True for _ in child.parameters()):
            continue
        if name in _OPEN:
            groups += _module_groups(child, f"{prefix}{name}.")
        else:
            groups.append([f"{prefix}{name}.{n}" for n, _ in child.named_parameters()])
    return groups


def _group_name(names: list[str]) -> str:
    parts = [n.split(".") for n in names]
    common: list[str] = []
    for pieces in zip(*[p[:-1] for p in parts]):
        if len(set(pieces)) != 1:
            break
        common.append(pieces[0])
    if common:
        return ".".join(common)
    tops: list[str] = []
    for p in parts:
        top = ".".join(p[:2]) if len(p) > 2 and p[1].isdigit() else p[0]
        if top not in tops:
            tops.append(top)
    return "+".join(tops[:3]) + ("+..." if len(tops) > 3 else "")
