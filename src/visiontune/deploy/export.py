"""Export a trained run, carrying its labels and preprocessing.

    visiontune export runs/<run> --format onnx          -> runs/<run>/model.onnx
    visiontune export runs/<run> --format onnx --int8   -> also runs/<run>/model.int8.onnx (deploy/quantize.py)
    visiontune export runs/<run> --format pt2           -> runs/<run>/model.pt2
    visiontune export runs/<run> --format timm          -> runs/<run>/timm/ (deploy/hub.py)
    visiontune export runs/<run> --format torchscript   -> runs/<run>/model.ts (legacy)

ONNX goes through PyTorch's `torch.export`-based exporter (`dynamo=True`, the default
since PyTorch 2.9; the TorchScript-based one is legacy). `pt2` is the `torch.export`
program itself (`torch.export.save`): `torch.export.load(path).module()` runs it without
visiontune or the model's Python code. TorchScript stays for old consumers only
(`torch.jit` is deprecated upstream).

The class names, input size, mean/std, interpolation, crop fraction and task travel inside
the file (ONNX `metadata_props`; a `visiontune.json` extra file in pt2 and TorchScript),
so `predict` can use the exported file alone. Each export is checked against the eager
model on a batch of inputs and the max absolute difference of the logits is reported.

A model with a bank of training features (models/novelty.py) exports with a second output,
"ood_score" (the graph is `ScoredGraph`), checked against the eager score the same way;
`load_exported`'s model hands both to predict (`scored`), its `forward` the first alone.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.export.passes import move_to_device_pass

from visiontune.bundle import Bundle, load_bundle, model_file
from visiontune.data.preprocess import Preprocess
from visiontune.deploy.formats import FORMATS, files_text, format_of
from visiontune.errors import VisiontuneError
from visiontune.files import atomic_write, file_digest
from visiontune.models.novelty import ScoredGraph, scored
from visiontune.rundir import RunDir
from visiontune.runtime.engine import check_engine, onnx_available, onnx_session, write_onnx
from visiontune.tasks.catalog import make_task
from visiontune.version import __version__

log = logging.getLogger(__name__)

PARITY_TOLERANCE = 1e-3


@dataclass
class ExportResult:
    path: str
    format: str
    max_abs_diff: float
    int8: Any = None  # deploy/quantize.Int8Result (quantize.export_int8)


def _metadata(bundle: Bundle, weights: Path) -> dict[str, str]:
    cfg = bundle.config
    return {
        "visiontune_version": __version__,
        "classes": json.dumps(bundle.classes),
        "preprocess": json.dumps(bundle.preprocess.to_dict()),
        "backbone": cfg.model.backbone if cfg else "",
        # export_module is inside: the file outputs the (calibrated) probabilities, or real units
        "task": json.dumps({**bundle.task.metadata(), "outputs_mapped": True, "outputs": bundle.task.exported_outputs}),
        "uncertainty": json.dumps(bundle.uncertainty or {}),  # the prediction sets' held-out scores
        "weights_digest": file_digest(weights),  # which weights file this export is of (onnx_engine)
    }


def export(run: str | os.PathLike[str], format: str = "onnx", output: str | os.PathLike[str] | None = None,
           opset: int = 18) -> ExportResult:
    """Export the run (see the module docstring); int8: deploy/quantize.export_int8."""
    writer = FORMATS.find(format)  # ConfigError naming the formats for another
    if FORMATS.meta(format).get("folder"):
        folder, diff = writer(run, output)
        return ExportResult(str(folder), format, diff)
    weights = model_file(run)
    bundle = load_bundle(weights)
    model = _graph(bundle.model.to(memory_format=torch.contiguous_format).eval(), bundle.task.export_module())
    size = bundle.preprocess.input_size
    example = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    target = Path(output) if output else RunDir.exported(weights, format)  # model.safetensors -> model.onnx
    meta = _metadata(bundle, weights)
    writer(model, example, target, meta, opset)
    exported = load_exported(target, check_weights=False)  # of these weights: just written
    check = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        diff = _parity(model(check), scored(exported.model, check))
    if diff > PARITY_TOLERANCE:
        raise VisiontuneError(f"exported {format} differs from the eager model by {diff:.2e} (> {PARITY_TOLERANCE})")
    log.info("exported %s to %s; max |eager - exported| = %.2e", format, target, diff)
    return ExportResult(str(target), format, diff)


def _graph(model: nn.Module, output_module: nn.Module) -> nn.Module:
    """What is exported: images -> probabilities (regression: real units), and the OOD score
    as a second output when the model has a bank."""
    if getattr(model, "novelty", None) is not None:
        return ScoredGraph(model, output_module).eval()
    return nn.Sequential(model, output_module).eval()


def _parity(eager: torch.Tensor | tuple[torch.Tensor, ...], exported: tuple[torch.Tensor, Any]) -> float:
    """The largest |eager - exported| over the outputs (and the OOD score, when there is one)."""
    eager = eager if isinstance(eager, tuple) else (eager,)
    if len(eager) > 1 and exported[1] is None:
        raise VisiontuneError("the exported file lost the model's OOD score output")
    return max(float((e - x).abs().max()) for e, x in zip(eager, exported))


def export_onnx(model: nn.Module, example: torch.Tensor, target: Path, meta: dict[str, str], opset: int) -> None:
    """FORMATS' "onnx" writer (runtime/engine.write_onnx: the one ONNX writer); a
    ScoredGraph's second output is named "ood_score"."""
    names = ("logits", "ood_score") if isinstance(model, ScoredGraph) else "logits"
    write_onnx(model, example, target, meta, opset, output_name=names)


def export_pt2(model: nn.Module, example: torch.Tensor, target: Path, meta: dict[str, str], opset: int) -> None:
    """FORMATS' "pt2" writer: the torch.export program, a batch dimension free."""
    program = torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    atomic_write(target, lambda tmp: torch.export.save(program, tmp, extra_files={"visiontune.json": json.dumps(meta)}))


def export_torchscript(model: nn.Module, example: torch.Tensor, target: Path, meta: dict[str, str],
                       opset: int) -> None:
    """FORMATS' "torchscript" writer (the legacy format)."""
    with warnings.catch_warnings():  # the legacy format, kept on purpose: torch.jit's deprecation is known
        warnings.simplefilter("ignore", (DeprecationWarning, FutureWarning))
        traced = torch.jit.trace(model, example)
        atomic_write(target, lambda tmp: torch.jit.save(traced, tmp,
                                                        _extra_files={"visiontune.json": json.dumps(meta)}))


class _ProgramModule(nn.Module):
    """A torch.export program's module (or a TorchScript module) behind the interface
    `run_eval` uses: `forward` gives the first output, `scored` the OOD score too (None for
    a file without one). A program's module refuses .eval()/.train() (its graph is fixed in
    eval mode), so it is kept as a plain attribute, not a registered submodule."""

    def __init__(self, program_module: Any) -> None:
        super().__init__()
        object.__setattr__(self, "program", program_module)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scored(x)[0]

    def scored(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = self.program(x.contiguous())
        return (out[0], out[1]) if isinstance(out, (tuple, list)) else (out, None)


def load_exported(path: str | os.PathLike[str], check_weights: bool = True,
                  device: torch.device | None = None) -> Bundle:
    """A `Bundle` (model, classes, preprocess) from an exported .onnx, .pt2 or .ts file, run
    on `device` (default the CPU): an ONNX Runtime session with that device's provider
    (runtime/engine.onnx_session), a program or TorchScript module moved there.
    `check_weights`: an export beside the weights file it names (a run directory's
    model.onnx, model.int8.onnx, model.pt2 -> model.safetensors) must record that file's
    digest; one made before a resume or a retrain is refused (`require_current`)."""
    p, device = Path(path), device or torch.device("cpu")
    if p.suffix == ".onnx":
        try:
            import onnx
            import onnxruntime  # noqa: F401 - onnx_session's
        except ImportError:
            raise VisiontuneError("running ONNX needs onnxruntime: pip install 'visiontune[export]'") from None
        meta = {m.key: m.value for m in onnx.load(str(p), load_external_data=False).metadata_props}
        model: nn.Module = onnx_session(p, device)
    elif p.suffix == ".pt2":
        extra = {"visiontune.json": ""}
        program = torch.export.load(str(p), extra_files=extra)
        model = _ProgramModule(move_to_device_pass(program, device).module() if device.type != "cpu" else
                               program.module())
        meta = json.loads(extra["visiontune.json"] or "{}")
    elif p.suffix in (".ts", ".pt"):
        extra = {"visiontune.json": ""}
        with warnings.catch_warnings():  # legacy format (see the module docstring)
            warnings.simplefilter("ignore", (DeprecationWarning, FutureWarning))
            model = _ProgramModule(torch.jit.load(str(p), map_location=device, _extra_files=extra).eval())
        meta = json.loads(extra["visiontune.json"] or "{}")
    else:
        raise VisiontuneError(f"{str(p)!r}: not an exported model ({files_text(sep=', ', last=' or ', names=False)})")
    if "classes" not in meta:
        raise VisiontuneError(f"{str(p)!r} carries no visiontune metadata (classes, preprocessing); re-export it")
    if check_weights:
        require_current(p, meta.get("weights_digest"))
    task_meta = json.loads(meta.get("task", "{}"))
    task = make_task(task_meta.get("task", "single-label"), json.loads(meta["classes"]), task_meta)
    return Bundle(model, task, Preprocess.from_dict(json.loads(meta["preprocess"])), str(p.parent),
                  uncertainty=json.loads(meta.get("uncertainty") or "{}"))


def weights_beside(path: str | os.PathLike[str]) -> Path | None:
    """The weights file an export is named after, when it is beside it: RUN/model.onnx,
    RUN/model.int8.onnx and RUN/model.pt2 are of RUN/model.safetensors."""
    weights = RunDir.weights_named_in(path)
    return weights if weights.is_file() else None


def require_current(path: str | os.PathLike[str], recorded: str | None) -> None:
    """Refuse the export `path` when the weights file beside it (`weights_beside`) is not
    the one it was made from: `recorded` is the digest the export carries. An export of
    weights that are not beside it (copied elsewhere), or from before digests were
    recorded, cannot be checked and is allowed."""
    p = Path(path)
    weights = weights_beside(p)
    if weights is None or not recorded or recorded == file_digest(weights):
        return
    fp32 = RunDir.fp32_of(p)
    fmt = format_of(p.suffix)
    output = "" if RunDir.named_after(fp32, weights) else f" --output {fp32}"
    run = p.parent if weights == RunDir(p.parent).model else weights
    raise VisiontuneError(
        f"{p} was exported from other weights than {weights} beside it (the run was resumed or retrained, or its "
        f"weights replaced, since): it would predict with the old model. Re-export it: visiontune export "
        f"{run} --format {fmt}{output}{' --int8' if RunDir.is_int8(p) else ''}")


# -- ONNX Runtime as a predict engine ---------------------------------------------------
# Below this many images `engine="auto"` does not export: the one-time export (~10 s for Lite0
# with the torch.export-based exporter) saves ~10 ms per image at 224 px but ~0.6 ms at 64 px.
ONNX_MIN_IMAGES = 2000
def current_onnx(weights: str | os.PathLike[str]) -> Path | None:
    """The ONNX export of the weights file `weights` (beside it: model.safetensors ->
    model.onnx) when it was exported from exactly these weights: the digest of the weights
    it records must match the file's now (a resumed, retrained or replaced model makes an
    old export stale, whatever the files' times say)."""
    onnx_file = RunDir.exported(weights, "onnx")
    if not onnx_file.is_file() or not Path(weights).is_file():
        return None
    try:
        import onnx

        recorded = {m.key: m.value for m in onnx.load(str(onnx_file), load_external_data=False).metadata_props}
    except Exception:  # noqa: BLE001 - an unreadable export is no export
        return None
    return onnx_file if recorded.get("weights_digest") == file_digest(weights) else None


def onnx_engine(run: str | os.PathLike[str], engine: str, images: int) -> Bundle | None:
    """The run as an ONNX Runtime bundle when `engine` asks for it, else None (PyTorch).

    "onnx": always (exports the weights file once, beside it: model.safetensors ->
    model.onnx, if missing or not of these weights). "auto": when a current export exists,
    or when onnx + onnxruntime are installed and there are at least ONNX_MIN_IMAGES images;
    an export that fails then falls back to PyTorch with a warning. bench/RESULTS.md has the
    measured speed of ONNX Runtime against eager PyTorch on this CPU.
    """
    if check_engine(engine) == "torch":
        return None
    weights = model_file(run)  # the run's model.safetensors, or the weights file asked for
    existing = current_onnx(weights) if onnx_available() else None
    if engine == "auto" and (not onnx_available() or (existing is None and images < ONNX_MIN_IMAGES)):
        return None
    try:
        return load_exported(existing or export(weights, "onnx").path, check_weights=False)  # current by now
    except (VisiontuneError, OSError) as exc:
        if engine == "onnx":
            raise
        log.warning("predicting with PyTorch: ONNX Runtime not usable for %s (%s)", weights, exc)
        return None
