"""Backbone sources: where a backbone named "<source>:<arch>" comes from, with its weights
and the preprocessing those weights expect.

Each source is a `BackboneSource` in `SOURCES` ("timm", "torchvision"): `build` returns
the model with its original classifier and the `Preprocess`; `strip` removes that
classifier and returns (body, feature width, the removed linear layer or None). A bare
name is a timm name. Adding a source = a class here and its line in `SOURCES`.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import timm
import torch
import torchvision
from torch import nn

from visiontune.data.preprocess import Preprocess
from visiontune.errors import ConfigError, WeightsUnavailableError
from visiontune.models import weights as W
from visiontune.registry import Registry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuildSpec:
    """What to build: the architecture, its weights (pretrained | none | a file), the input
    size when it is not the weights' own, and the stochastic-depth rate."""

    arch: str
    weights: str = "pretrained"
    image_size: int | None = None
    drop_path: float = 0.0
    trust_pickle: bool = False  # a local-dir:/hf-hub: folder may load pickle weights (see _require_safe_weights)


class BackboneSource(Protocol):
    def build(self, spec: BuildSpec) -> tuple[nn.Module, Preprocess]:
        """The source model with its original classifier, and its preprocessing."""

    def strip(self, model: nn.Module) -> tuple[nn.Module, int, nn.Linear | None]:
        """(body emitting pooled features, feature width, the removed classifier if linear)."""


class TimmSource:
    """timm's model registry; weights: packaged (offline) > local hub cache > download.
    Models with a fixed input size (ViTs) are created for `image_size` (timm resamples
    their position embeddings from the pretrained ones)."""

    def build(self, spec: BuildSpec) -> tuple[nn.Module, Preprocess]:
        return _timm_model(spec)

    def strip(self, model: nn.Module) -> tuple[nn.Module, int, nn.Linear | None]:
        classifier = model.get_classifier()
        source_head = classifier if isinstance(classifier, nn.Linear) else None
        model.reset_classifier(0)
        return model, int(model.num_features), source_head


class TorchvisionSource:
    """torchvision's classification models and their weights enums."""

    def build(self, spec: BuildSpec) -> tuple[nn.Module, Preprocess]:
        if spec.drop_path:
            raise ConfigError("--drop-path sets timm's drop_path_rate; torchvision backbones do not take it")
        return _torchvision_model(spec.arch, spec.weights)

    def strip(self, model: nn.Module) -> tuple[nn.Module, int, nn.Linear | None]:
        linear, num_features = _strip_last_linear(model)
        return model, num_features, linear


SOURCES: Registry[BackboneSource] = Registry("backbone source", {"timm": TimmSource(),
                                                                  "torchvision": TorchvisionSource()})


def parse_backbone(name: str) -> tuple[str, str]:
    """'timm:resnet50' -> ('timm', 'resnet50'); a bare name is a timm name."""
    source, sep, arch = name.partition(":")
    if not sep:
        return "timm", name
    if source not in SOURCES:
        raise ConfigError(f"backbone source {source!r} unknown in {name!r}; use "
                          + " or ".join(f"{s}:<name>" for s in SOURCES))
    return source, arch


def create_source_model(backbone: str, weights: str, image_size: int | None = None, drop_path: float = 0.0,
                        trust_pickle: bool = False) -> tuple[nn.Module, int, Preprocess, nn.Linear | None]:
    """Build `backbone` with `weights` (for `image_size` when given); return (body without
    classifier, feature width, preprocessing, the source classifier layer or None). A
    backbone that cannot take `image_size` is a ConfigError here, before any training."""
    source, arch = parse_backbone(backbone)
    model, pre = SOURCES[source].build(BuildSpec(arch, weights, image_size, drop_path, trust_pickle))
    body, num_features, head = SOURCES[source].strip(model)
    if image_size and image_size != pre.input_size:
        check_input_size(body, image_size, backbone, pre.input_size)
        pre = pre.resized(image_size)
    return body, num_features, pre, head


def create_imagenet_model(backbone: str, weights: str = "pretrained") -> tuple[nn.Module, Preprocess]:
    """The source model with its original classifier (e.g. ImageNet-1k logits)."""
    source, arch = parse_backbone(backbone)
    return SOURCES[source].build(BuildSpec(arch, weights))


@torch.no_grad()
def check_input_size(body: nn.Module, size: int, name: str, native: int) -> None:
    """One forward pass of a blank image at `size`: a model fixed to its native size fails
    here with a clear error instead of at the first training step."""
    was_training = body.training
    body.eval()
    try:
        body(torch.zeros(1, 3, size, size))
    except Exception as exc:  # noqa: BLE001 - any failure means this size does not fit
        raise ConfigError(f"{name} cannot take {size} px inputs ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''}); it was built for {native} px: "
                          f"drop --image-size or choose a backbone that resizes (e.g. timm's ViTs)") from None
    finally:
        body.train(was_training)


def _timm_kwargs(spec: BuildSpec) -> dict[str, Any]:
    """create_model options: drop_path_rate, and img_size for fixed-size models (ViTs)."""
    kwargs: dict[str, Any] = {"drop_path_rate": spec.drop_path} if spec.drop_path else {}
    cfg = timm.models.get_pretrained_cfg(spec.arch)
    if spec.image_size and cfg is not None and getattr(cfg, "fixed_input_size", False):
        kwargs["img_size"] = spec.image_size
    return kwargs


def _timm_model(spec: BuildSpec) -> tuple[nn.Module, Preprocess]:
    arch, weights = spec.arch, spec.weights
    if not timm.is_model(arch):
        close = timm.list_models(f"*{arch.split('_')[0]}*")[:8]
        raise ConfigError(f"timm has no model {arch!r}; similar names: {close or 'none'} (timm.list_models())")
    kwargs = _timm_kwargs(spec)
    if weights == "pretrained":
        model = _timm_pretrained(arch, kwargs)
    elif weights.startswith(HUB_PREFIXES):
        model = _timm_hub_folder(arch, weights, kwargs, spec.trust_pickle)
    else:
        model = timm.create_model(arch, pretrained=False, **kwargs)
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
    return model, (pre.resized(spec.image_size) if "img_size" in kwargs else pre)  # type: ignore[arg-type]


HUB_PREFIXES = ("local-dir:", "hf-hub:")


def _timm_hub_folder(arch: str, weights: str, kwargs: dict[str, Any], trust_pickle: bool = False) -> nn.Module:
    """Weights from a folder in timm's Hub layout (`visiontune export --format timm`, timm's
    save_for_hf): `local-dir:DIR` on disk, `hf-hub:user/name` from the Hub (online only).
    Only safetensors, unless `trust_pickle` (see _require_safe_weights)."""
    kind, _, where = weights.partition(":")
    if kind == "local-dir" and not (Path(where) / "config.json").is_file():
        raise ConfigError(f"--weights {weights}: {where} has no config.json; give a folder written by "
                          "`visiontune export --format timm` or timm's save_for_hf")
    if kind == "hf-hub" and not W.hub_reachable("huggingface.co"):
        raise WeightsUnavailableError(f"--weights {weights}: huggingface.co is not reachable from this machine. "
                                      "Download the repository where you are online and pass "
                                      "--weights local-dir:<folder>")
    if not trust_pickle:
        _require_safe_weights(weights, _folder_files(kind, where))
    model = timm.create_model(weights, pretrained=True, **kwargs)
    stored = model.pretrained_cfg.get("architecture")
    if stored and stored != arch:
        raise ConfigError(f"--weights {weights} holds a {stored}, not a {arch}: use --backbone timm:{stored}")
    return model


SAFE_WEIGHTS = ("model.safetensors", "open_clip_model.safetensors")  # what timm's hub loader reads first
PICKLE_SUFFIXES = (".bin", ".pth", ".pt", ".pkl", ".ckpt")


def _folder_files(kind: str, where: str) -> list[str]:
    """The file names in a local-dir folder or an hf-hub repository."""
    if kind == "local-dir":
        return sorted(p.name for p in Path(where).iterdir())
    from huggingface_hub import list_repo_files

    return sorted(Path(f).name for f in list_repo_files(where))


def _require_safe_weights(weights: str, files: list[str]) -> None:
    """timm loads a folder's model.safetensors when there is one; otherwise its pickle file
    (pytorch_model.bin), and older timm releases did so with torch.load(weights_only=False),
    which runs whatever code the pickle holds. A folder with pickle weights only is refused
    unless the user trusts it (--trust-pickle)."""
    if any(name in files for name in SAFE_WEIGHTS):
        return
    pickles = [f for f in files if f.endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise ConfigError(f"--weights {weights} holds pickle weights only ({', '.join(pickles[:3])}); loading a pickle "
                          "can run code. Convert them to model.safetensors (safetensors.torch.save_file), or pass "
                          "--trust-pickle if you trust whoever made them")


def _timm_pretrained(arch: str, kwargs: dict[str, Any]) -> nn.Module:
    packaged = W.packaged_weights_file(arch)
    if packaged:
        model = timm.create_model(arch, pretrained=False, **kwargs)
        state = W.map_lukemelas_to_timm(W.read_state_dict(packaged), model)
        missing, unexpected = model.load_state_dict(state, strict=False)
        bad = [k for k in missing if not k.endswith("num_batches_tracked")] + list(unexpected)
        if bad:
            raise WeightsUnavailableError(f"packaged weights for {arch} do not fit timm's model: {bad[:5]}")
        log.info("loaded packaged ImageNet weights for %s from %s", arch, packaged)
        return model
    cached = W.timm_hub_file(arch)
    if cached:
        return timm.create_model(arch, pretrained=True, pretrained_cfg_overlay={"file": cached}, **kwargs)
    if not W.hub_reachable("huggingface.co"):
        raise WeightsUnavailableError(W.offline_help(f"timm:{arch}"))
    return timm.create_model(arch, pretrained=True, **kwargs)


def _torchvision_model(arch: str, weights: str) -> tuple[nn.Module, Preprocess]:
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
        # GoogLeNet / Inception-v3 warn that their default init will change: choose it (the
        # future default; the old one samples a truncated normal through scipy, slowly)
        extra = {"init_weights": False} if arch in ("googlenet", "inception_v3") else {}
        model = torchvision.models.get_model(arch, weights=None, **extra)
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
    else:  # timm's own adaptation (e.g. ViT position embeddings resampled to this input size)
        adapt = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
        if adapt is not None:
            state = adapt(state, model)
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


