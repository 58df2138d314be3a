"""The run directory: everything `predict`, `evaluate` and `--resume` need, loaded safely.

    <run>/model.safetensors   best weights; metadata holds backbone, head, classes, preprocess, task
    <run>/config.yaml         the resolved RunConfig
    <run>/classes.json        class names in output order
    <run>/preprocess.json     input size, mean/std, interpolation, crop_pct
    <run>/history.jsonl|.csv  one row per epoch
    <run>/metrics.json        final validation metrics
    <run>/environment.json    versions, machine, seed, the working folder (splits.csv's relative
                              paths are relative to it)
    <run>/splits.csv          every image with its label and split
    <run>/excluded.txt        files left out and why (path TAB reason per line)
    <run>/checkpoints/last.pt full training state for --resume (tensors only)

Every file is written atomically (temporary file + fsync + rename): a crash leaves either
the previous file or the new one, never a torn one. Loading reads safetensors and
`torch.load(weights_only=True)` only, so no file can execute code.
"""

from __future__ import annotations

import json
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
import torchvision
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from visiontune.config import ModelConfig, RunConfig, checked_dict
from visiontune.data.items import LISTED_IN_EXCLUDE
from visiontune.data.preprocess import Preprocess
from visiontune.errors import VisiontuneError
from visiontune.files import atomic_write, read_csv_dicts, write_text
from visiontune.models.classifier import Classifier, create_classifier
from visiontune.tasks.base import Task
from visiontune.tasks.catalog import make_task
from visiontune.version import __version__

MODEL_FILE = "model.safetensors"
LAST_CHECKPOINT = "checkpoints/last.pt"
FORMAT_VERSION = 1


def save_model(path: str | os.PathLike[str], model: Classifier, task: Task, pre: Preprocess,
               model_cfg: ModelConfig) -> None:
    """Weights plus everything needed to rebuild and use them, in one safetensors file."""
    meta = {
        "format_version": FORMAT_VERSION,
        "backbone": model_cfg.backbone,
        "head_hidden": model_cfg.head_hidden,
        "head_dropout": model_cfg.head_dropout,
        "classes": list(task.classes),
        "preprocess": pre.to_dict(),
        **task.metadata(),
    }
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"visiontune": json.dumps(meta)}))


@dataclass
class Bundle:
    model: Any  # a Classifier, or an exported model behind the same call (deploy/export.py)
    task: Task
    preprocess: Preprocess
    path: str
    config: RunConfig | None = None

    @property
    def classes(self) -> list[str]:
        return self.task.classes


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
    file = model_file(path)
    try:
        with safe_open(str(file), framework="pt") as fh:
            raw = (fh.metadata() or {}).get("visiontune")
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error for a file of another format
        raise VisiontuneError(f"{str(file)!r} is not a safetensors file of a visiontune run ({exc}); give the run "
                              f"directory (an exported .onnx / .pt2 file predicts and evaluates, but this command "
                              "needs the run's weights)") from None
    if raw is None:
        raise VisiontuneError(f"{str(file)!r} is not a visiontune model (no metadata)")
    meta = json.loads(raw)
    pre = Preprocess.from_dict(meta["preprocess"])
    model_cfg = ModelConfig(
        backbone=meta["backbone"], weights="none", image_size=pre.input_size,
        head_hidden=int(meta["head_hidden"]), head_dropout=float(meta["head_dropout"]),
    )
    task = make_task(meta.get("task", "single-label"), list(meta["classes"]), meta)
    model, _ = create_classifier(model_cfg, task.num_outputs)  # the head's width is the task's
    model.load_state_dict(load_file(str(file)), strict=True)
    model.to(device, memory_format=torch.channels_last).eval()  # inputs follow in run_eval
    cfg_path = file.parent / "config.yaml"
    cfg = read_config(cfg_path) if cfg_path.is_file() else None
    return Bundle(model, task, pre, str(file.parent), cfg)


WORKING_FOLDER = "working_folder"  # environment.json: the folder the run was trained from


def run_splits(run: str | os.PathLike[str], task: Task, delim: str = " ") -> list[tuple[str, Any, str]]:
    """(path, label, split) of every image the run was trained, validated and tested on
    (its splits.csv), labels in the task's shape; [] when the run has no splits.csv."""
    path = Path(run) / "splits.csv"
    if not path.is_file():
        return []
    base = working_folder(run)
    return [(from_folder(base, r["path"]), task.parse_label(r["label"], delim, "splits.csv"), r["split"])
            for r in read_csv_dicts(path)]


def run_left_out(run: str | os.PathLike[str]) -> list[str]:
    """The files the run's data left out by the user's choice (`--exclude`: in its data, or
    in its --unlabeled pool), as its excluded.txt lists them (path TAB reason), read from
    the current folder; [] when the run has no excluded.txt."""
    path = Path(run) / "excluded.txt"
    if not path.is_file():
        return []
    base = working_folder(run)
    rows = (line.rpartition("\t") for line in path.read_text(encoding="utf-8").splitlines())
    return [from_folder(base, file) for file, _, why in rows if file and why.startswith(LISTED_IN_EXCLUDE)]


def working_folder(run: str | os.PathLike[str]) -> str | None:
    """The folder the run was trained from (environment.json), which its splits.csv's
    relative paths are relative to; None for a run that did not record it."""
    try:
        with open(Path(run) / "environment.json", encoding="utf-8") as fh:
            folder = json.load(fh).get(WORKING_FOLDER)
    except (OSError, ValueError, AttributeError):
        return None
    return folder if isinstance(folder, str) and folder else None


def from_folder(base: str | None, path: str) -> str:
    """A path written relative to the folder `base` (a run's splits.csv: its working
    folder; interpret's views: the folder interpret ran in) as it reads from the current
    folder: a relative one joined to `base` when that is another folder (`suggest --run`,
    `interpret`, `review` from elsewhere), else as written."""
    if base is None or os.path.isabs(path) or os.path.abspath(base) == os.getcwd():
        return path
    return os.path.join(base, path)


def read_config(path: str | os.PathLike[str], strict: bool = False) -> RunConfig:
    """The RunConfig in a YAML file. `strict` (a user's --config): every key must be an
    option (in its section or flat); else keys from newer versions are ignored (a run's
    own config.yaml)."""
    with open(path, encoding="utf-8") as fh:
        raw = yaml.safe_load(fh) or {}
    return RunConfig.from_dict(checked_dict(raw, str(path)) if strict else raw)


def write_config(run_dir: Path, cfg: RunConfig) -> None:
    write_text(run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def environment(cfg: RunConfig, device: str) -> dict[str, Any]:
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
        WORKING_FOLDER: os.getcwd(),  # splits.csv's relative paths are relative to it (run_splits)
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
