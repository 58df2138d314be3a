"""The export formats by name: each one's help line, file suffix and writer (imported when a
run is exported: the list itself needs no torch, so `export --help` and predict's check for
an exported file read it). Adding a format = its writer and a line here."""

from __future__ import annotations

import os
from typing import Any

from visiontune.registry import Registry

# name -> its writer: (model, example, target, metadata, opset) -> None; a `folder` format's
# writer takes (run, output) and returns (folder, max |difference|)
FORMATS: Registry[Any] = Registry("export format")
FORMATS.lazy("onnx", "visiontune.deploy.export:export_onnx", "torch.export-based exporter; ONNX Runtime",
             suffix=".onnx")
FORMATS.lazy("pt2", "visiontune.deploy.export:export_pt2", "torch.export program: torch.export.load(F).module()",
             suffix=".pt2")
FORMATS.lazy("timm", "visiontune.deploy.hub:export_timm", "folder in timm's Hub layout: "
             "timm.create_model('local-dir:DIR', pretrained=True)", suffix="", folder=True)
FORMATS.lazy("torchscript", "visiontune.deploy.export:export_torchscript", "legacy", suffix=".ts")


def suffix(name: str) -> str:
    """The file suffix of format `name` ("" for a folder)."""
    return str(FORMATS.meta(name).get("suffix", ""))


def exported_suffixes() -> tuple[str, ...]:
    """The suffixes of the files predict and evaluate load as an exported model."""
    return tuple(s for s in map(suffix, FORMATS) if s)


def is_exported(path: str | os.PathLike[str]) -> bool:
    """Whether `path` names an exported model file (by its suffix)."""
    return str(path).endswith(exported_suffixes())


def format_of(path_suffix: str, default: str = "onnx") -> str:
    """The format whose files end in `path_suffix` (`default` for none)."""
    return next((name for name in FORMATS if suffix(name) and suffix(name) == path_suffix), default)


def files_text(run: str = "", sep: str = " / ", last: str = " / ", names: bool = True) -> str:
    """The exported files, e.g. 'model.onnx / model.pt2 / model.ts' (with `run`:
    'RUN/model.onnx', a folder format as 'RUN/timm/'; `names=False`: '.onnx, .pt2 or .ts')."""
    stem = f"{run}model" if names else ""
    files = [f"{stem}{suffix(n)}" if suffix(n) else f"{run}{n}/" for n in FORMATS if suffix(n) or run]
    return sep.join(files[:-1]) + last + files[-1]
