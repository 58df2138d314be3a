"""The run directory: everything `predict`, `evaluate` and `--resume` need, loaded safely.

    <run>/model.safetensors   best weights; metadata holds backbone, head, classes, preprocess
    <run>/config.yaml         the resolved RunConfig
    <run>/classes.json        class names in output order
    <run>/preprocess.json     input size, mean/std, interpolation, crop_pct
    <run>/history.jsonl|.csv  one row per epoch
    <run>/metrics.json        final validation metrics
    <run>/environment.json    versions, machine, seed
    <run>/splits.csv          every image with its label and split
    <run>/excluded.txt        files left out and why
    <run>/checkpoints/last.pt full training state for --resume (tensors only)

Every file is written atomically (temporary file + fsync + rename): a crash leaves either
the previous file or the new one, never a torn one. Loading reads safetensors and
`torch.load(weights_only=True)` only, so no file can execute code.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import yaml

from visiontune.config import ModelConfig, RunConfig
from visiontune.errors import VisiontuneError
from visiontune.models import Classifier, Preprocess, create_classifier

MODEL_FILE = "model.safetensors"
LAST_CHECKPOINT = "checkpoints/last.pt"
FORMAT_VERSION = 1


def atomic_write(path: str | os.PathLike[str], write: Callable[[str], None]) -> None:
    """Call `write(tmp_path)`, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_text(path: str | os.PathLike[str], text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)

    atomic_write(path, write)


def write_csv(path: str | os.PathLike[str], header: list[str], rows: Any) -> None:
    """A header and rows as CSV, written atomically."""
    import csv
    import io

    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows(rows)
    write_text(path, buf.getvalue())


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def save_model(path: str | os.PathLike[str], model: Classifier, classes: list[str], pre: Preprocess,
               model_cfg: ModelConfig) -> None:
    """Weights plus everything needed to rebuild and use them, in one safetensors file."""
    from safetensors.torch import save_file

    meta = {
        "format_version": FORMAT_VERSION,
        "backbone": model_cfg.backbone,
        "head_hidden": model_cfg.head_hidden,
        "head_dropout": model_cfg.head_dropout,
        "classes": list(classes),
        "preprocess": pre.to_dict(),
    }
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"visiontune": json.dumps(meta)}))


@dataclass
class Bundle:
    model: Classifier
    classes: list[str]
    preprocess: Preprocess
    path: str
    config: RunConfig | None = None


def model_file(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    if p.is_dir():
        p = p / MODEL_FILE
    if not p.is_file():
        raise VisiontuneError(
            f"no model at {str(path)!r}: expected a run directory holding {MODEL_FILE} "
            "(written by `visiontune train`) or the .safetensors file itself"
        )
    return p


def load_bundle(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> Bundle:
    """Rebuild the trained classifier from a run directory or its model.safetensors."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    file = model_file(path)
    with safe_open(str(file), framework="pt") as fh:
        raw = (fh.metadata() or {}).get("visiontune")
    if raw is None:
        raise VisiontuneError(f"{str(file)!r} is not a visiontune model (no metadata)")
    meta = json.loads(raw)
    pre = Preprocess.from_dict(meta["preprocess"])
    model_cfg = ModelConfig(
        backbone=meta["backbone"], weights="none", image_size=pre.input_size,
        head_hidden=int(meta["head_hidden"]), head_dropout=float(meta["head_dropout"]),
    )
    model, _ = create_classifier(model_cfg, len(meta["classes"]))
    model.load_state_dict(load_file(str(file)), strict=True)
    model.to(device, memory_format=torch.channels_last).eval()  # inputs follow in run_eval
    cfg_path = file.parent / "config.yaml"
    cfg = read_config(cfg_path) if cfg_path.is_file() else None
    return Bundle(model, list(meta["classes"]), pre, str(file.parent), cfg)


def read_config(path: str | os.PathLike[str]) -> RunConfig:
    with open(path, encoding="utf-8") as fh:
        return RunConfig.from_dict(yaml.safe_load(fh) or {})


def write_config(run_dir: Path, cfg: RunConfig) -> None:
    write_text(run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def environment(cfg: RunConfig, device: str) -> dict[str, Any]:
    import timm
    import torchvision

    from visiontune import __version__

    return {
        "visiontune": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "seed": cfg.seed,
    }


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise VisiontuneError(f"no checkpoint at {str(path)!r}; nothing to resume") from None
    except Exception as exc:  # noqa: BLE001 - refuse anything that is not plain tensors/containers
        raise VisiontuneError(f"refusing to load {str(path)!r}: {type(exc).__name__}: {exc}") from None


def run_model_config(cfg: RunConfig, image_size: int) -> ModelConfig:
    """The model part of `cfg` for rebuilding without downloading (weights come from file)."""
    return replace(cfg.model, weights="none", image_size=image_size)
