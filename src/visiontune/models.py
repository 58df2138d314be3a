"""Backbones by name, their weights and preprocessing, and the new classification head.

`create_classifier(ModelConfig, num_classes)` returns a `Classifier` (backbone -> pooled
features -> head) and the `Preprocess` the backbone's weights expect.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from visiontune import weights as W
from visiontune.config import ModelConfig
from visiontune.errors import ConfigError, WeightsUnavailableError

log = logging.getLogger(__name__)

SOURCES = ("timm", "torchvision")


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


class Classifier(nn.Module):
    """`backbone` maps images to pooled features; `head` maps features to class logits."""

    def __init__(self, backbone: nn.Module, head: nn.Module, num_features: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.num_features = num_features
        self.warm_start: dict[str, int] = {}  # class -> ImageNet row its head row started from

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def parse_backbone(name: str) -> tuple[str, str]:
    """'timm:resnet50' -> ('timm', 'resnet50'); a bare name is a timm name."""
    source, sep, arch = name.partition(":")
    if not sep:
        return "timm", name
    if source not in SOURCES:
        raise ConfigError(f"backbone source {source!r} unknown in {name!r}; use timm:<name> or torchvision:<name>")
    return source, arch


def create_classifier(cfg: ModelConfig, num_classes: int,
                      classes: list[str] | None = None) -> tuple[Classifier, Preprocess]:
    """The pretrained (or random) backbone without its classifier, plus a new head.

    With `classes` and `cfg.warm_start`, head rows of classes named like ImageNet classes
    start from the source classifier's rows; `model.warm_start` records the matches."""
    body, num_features, pre, source_head = create_source_model(cfg.backbone, cfg.weights)
    if cfg.image_size:
        pre = Preprocess(cfg.image_size, pre.mean, pre.std, pre.interpolation, pre.crop_pct)
    head = build_head(num_features, num_classes, cfg.head_hidden, cfg.head_dropout, cfg.head_init_gain)
    model = Classifier(body, head, num_features)
    if classes and cfg.warm_start and cfg.weights != "none" and source_head is not None and not cfg.head_hidden:
        from visiontune.warmstart import warm_start_rows

        model.warm_start = warm_start_rows(head[-1], source_head, classes)
        if model.warm_start:
            log.info("warm start: head rows from ImageNet classes %s", model.warm_start)
    return model, pre


def create_source_model(backbone: str, weights: str) -> tuple[nn.Module, int, Preprocess, nn.Module | None]:
    """Build `backbone` with `weights`; return (body without classifier, feature width,
    preprocessing, the source classifier layer or None)."""
    source, arch = parse_backbone(backbone)
    if source == "timm":
        model, pre = _timm_model(arch, weights)
        classifier = model.get_classifier()
        source_head = classifier if isinstance(classifier, nn.Linear) else None
        model.reset_classifier(0)
        return model, int(model.num_features), pre, source_head
    model, pre = _torchvision_model(arch, weights)
    linear, num_features = _strip_last_linear(model)
    return model, num_features, pre, linear


def create_imagenet_model(backbone: str, weights: str = "pretrained") -> tuple[nn.Module, Preprocess]:
    """The source model with its original classifier (e.g. ImageNet-1k logits)."""
    source, arch = parse_backbone(backbone)
    return _timm_model(arch, weights) if source == "timm" else _torchvision_model(arch, weights)


def _timm_model(arch: str, weights: str) -> tuple[nn.Module, Preprocess]:
    import timm

    if not timm.is_model(arch):
        close = timm.list_models(f"*{arch.split('_')[0]}*")[:8]
        raise ConfigError(f"timm has no model {arch!r}; similar names: {close or 'none'} (timm.list_models())")
    model = None
    if weights == "pretrained":
        model = _timm_pretrained(arch)
    else:
        model = timm.create_model(arch, pretrained=False)
        if weights != "none":
            _load_file_into(model, weights, arch)
    cfg = timm.data.resolve_data_config({}, model=model)
    pre = Preprocess(
        input_size=int(cfg["input_size"][-1]),
        mean=tuple(cfg["mean"]),
        std=tuple(cfg["std"]),
        interpolation=str(cfg.get("interpolation", "bilinear")),
        crop_pct=float(cfg.get("crop_pct", 0.875)),
    )
    return model, pre


def _timm_pretrained(arch: str) -> nn.Module:
    import timm

    packaged = W.packaged_weights_file(arch)
    if packaged:
        model = timm.create_model(arch, pretrained=False)
        state = W.map_lukemelas_to_timm(W.read_state_dict(packaged), model)
        missing, unexpected = model.load_state_dict(state, strict=False)
        bad = [k for k in missing if not k.endswith("num_batches_tracked")] + list(unexpected)
        if bad:
            raise WeightsUnavailableError(f"packaged weights for {arch} do not fit timm's model: {bad[:5]}")
        log.info("loaded packaged ImageNet weights for %s from %s", arch, packaged)
        return model
    cached = W.timm_hub_file(arch)
    if cached:
        return timm.create_model(arch, pretrained=True, pretrained_cfg_overlay={"file": cached})
    if not W.hub_reachable("huggingface.co"):
        raise WeightsUnavailableError(W.offline_help(f"timm:{arch}"))
    return timm.create_model(arch, pretrained=True)


def _torchvision_model(arch: str, weights: str) -> tuple[nn.Module, Preprocess]:
    import torchvision

    if arch not in torchvision.models.list_models(module=torchvision.models):
        raise ConfigError(
            f"torchvision has no classification model {arch!r}; choose from "
            f"{', '.join(torchvision.models.list_models(module=torchvision.models)[:12])}, ..."
        )
    default = torchvision.models.get_model_weights(arch).DEFAULT
    if weights == "pretrained":
        if not W.torchvision_weights_cached(default) and not W.hub_reachable("download.pytorch.org"):
            raise WeightsUnavailableError(W.offline_help(f"torchvision:{arch}"))
        model = torchvision.models.get_model(arch, weights=default)
    else:
        model = torchvision.models.get_model(arch, weights=None)
        if weights != "none":
            _load_file_into(model, weights, arch)
    _drop_aux_heads(model)
    t = default.transforms()
    pre = Preprocess(
        input_size=int(t.crop_size[0]),
        mean=tuple(t.mean),
        std=tuple(t.std),
        interpolation=str(t.interpolation.value),
        crop_pct=float(t.crop_size[0]) / float(t.resize_size[0]),
    )
    return model, pre


def _drop_aux_heads(model: nn.Module) -> None:
    """GoogLeNet / Inception-v3 train-time auxiliary classifiers are not used here."""
    if hasattr(model, "aux_logits"):
        model.aux_logits = False
        for name in ("aux1", "aux2", "AuxLogits"):
            if hasattr(model, name):
                setattr(model, name, None)


def _strip_last_linear(model: nn.Module) -> tuple[nn.Linear, int]:
    """Replace the model's last nn.Linear (its classifier) by Identity."""
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ConfigError(f"cannot find a linear classifier in {type(model).__name__}")
    name, linear = linears[-1]
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, nn.Identity())
    return linear, int(linear.in_features)


def _load_file_into(model: nn.Module, path: str, arch: str) -> None:
    """Load a local state dict; classifier rows of another shape are dropped, not forced."""
    state = W.strip_prefixes(W.read_state_dict(path))
    if W.is_lukemelas_state_dict(state):
        state = W.map_lukemelas_to_timm(state, model)
    own = model.state_dict()
    fitting = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    skipped = sorted(set(state) - set(fitting))
    missing = [k for k in own if k not in fitting and not k.endswith("num_batches_tracked")]
    if not fitting or len(missing) > 0.5 * len(own):
        raise WeightsUnavailableError(
            f"weights file {path!r} does not fit {arch}: {len(fitting)} of {len(own)} tensors "
            f"match (e.g. missing {missing[:3]}, unexpected {skipped[:3]}); check --backbone"
        )
    model.load_state_dict(fitting, strict=False)
    if missing or skipped:
        log.warning("%s: %d tensors kept at init (absent from the file or of another shape, e.g. a "
                    "classifier), %d tensors of the file unused: %s", path, len(missing), len(skipped),
                    sorted(set(missing + skipped))[:4])


def build_head(num_features: int, num_classes: int, hidden: int = 0, dropout: float = 0.0,
               init_gain: float = 0.1) -> nn.Sequential:
    """A new head: [dropout] -> [linear(hidden) -> ReLU -> dropout] -> linear(num_classes).

    Xavier-uniform weights and zero biases; the final layer's gain is small so the starting
    loss sits near ln(num_classes) instead of large random logits.
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
    layers.append(nn.Linear(width, num_classes))
    for i, layer in enumerate(layers):
        if isinstance(layer, nn.Linear):
            last = i == len(layers) - 1
            gain = init_gain if last else math.sqrt(2.0)
            nn.init.xavier_uniform_(layer.weight, gain=gain)
            nn.init.zeros_(layer.bias)
    return nn.Sequential(*layers)


def backbone_groups(model: Classifier) -> list[tuple[str, list[str]]]:
    """Layer groups of the backbone, input side first, as (name, parameter names).

    timm models use their own coarse `group_matcher` (stem, each stage, final conv);
    other models use their top-level children, opening `features`/`encoder`/`layers`
    containers into their members.
    """
    body = model.backbone
    if hasattr(body, "group_matcher"):
        from timm.models import group_parameters

        raw = group_parameters(body, body.group_matcher(coarse=True))
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
