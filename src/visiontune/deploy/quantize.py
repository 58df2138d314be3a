"""int8 ONNX: `visiontune export RUN --format onnx --int8 [--max-drop 1] [--calibration 256]`.

ONNX Runtime's quantisation tools turn the fp32 export (RUN/model.onnx) into
RUN/model.int8.onnx, which `predict RUN/model.int8.onnx` (ONNX Runtime) runs:

1. **Static** (first): weights int8 per channel, activations uint8, in the QDQ format;
   activation ranges calibrated (min/max) on up to `calibration` of the run's validation
   images, preprocessed as the model sees them. The graph is prepared first with
   `quant_pre_process` (shape inference, fusions).
2. **Dynamic** (the fallback, when static fails or loses too much): int8 weights,
   activations quantised on the fly; no calibration.

Each candidate is scored on the run's validation split against the fp32 export, by the
task's `score_metric` (accuracy; mAP for label sets; R² for numbers), in points (x100).
The first whose drop is at most `max_drop` is kept; when none is, nothing is written,
the fp32 export stays, and `Int8Refused` says by how much each lost. The file carries the
fp32 export's metadata (classes, preprocessing, task) plus `quantization`.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from visiontune.bundle import model_file, read_config, run_splits
from visiontune.data.items import VALID
from visiontune.data.loaders import eval_dataset, make_loader
from visiontune.deploy.export import ExportResult, export, load_exported
from visiontune.errors import ConfigError, VisiontuneError
from visiontune.files import atomic_write
from visiontune.runtime.device import resolve_device
from visiontune.runtime.inference import run_eval
from visiontune.tasks.base import unreadable_rows

log = logging.getLogger(__name__)

METHODS = ("static", "dynamic")


class Int8Refused(VisiontuneError):
    """No int8 model within the allowed drop (the fp32 export is kept)."""


@dataclass
class Int8Result:
    path: str | None  # the int8 file; None when refused
    method: str | None  # "static" or "dynamic"
    metric: str
    fp32: float  # the fp32 export's score on the validation split
    scores: dict[str, float] = field(default_factory=dict)  # each method tried -> its score (NaN: it failed)
    errors: dict[str, str] = field(default_factory=dict)  # a method that failed -> why
    images: int = 0  # validation images scored
    sizes: dict[str, int] = field(default_factory=dict)  # "fp32"/"int8" -> bytes

    def drop(self, method: str) -> float:
        """Points (x100) the method lost against fp32 on the validation split."""
        return 100.0 * (self.fp32 - self.scores[method])

    def lines(self) -> list[str]:
        out = [f"validation {self.metric} on {self.images} images: fp32 {self.fp32:.4f}"]
        for method in METHODS:
            if method in self.errors:
                out.append(f"  {method} int8: failed ({self.errors[method]})")
            elif method in self.scores:
                out.append(f"  {method} int8: {self.scores[method]:.4f} ({0.0 - self.drop(method):+.2f} points)")
        if self.path:
            out.append(f"int8 ({self.method}): {self.path}  ({self.sizes['int8'] / 1e6:.1f} MB, fp32 "
                       f"{self.sizes['fp32'] / 1e6:.1f} MB)")
        return out


def export_int8(run: str | os.PathLike[str], format: str = "onnx", output: str | os.PathLike[str] | None = None,
                max_drop: float = 1.0, calibration: int = 256) -> ExportResult:
    """`export(run, "onnx", output)` and then `quantize` it: the result's `int8` says how it
    went; Int8Refused (the fp32 file kept) when every method loses more than `max_drop`."""
    if format != "onnx":
        raise ConfigError(f"--int8 quantises ONNX models; use --format onnx (not {format})")
    _require_tools()  # before the fp32 export, not after it
    result = export(run, "onnx", output)
    result.int8 = quantize(result.path, model_file(run).parent, max_drop=max_drop, calibration=calibration)
    return result


def quantize(fp32: str | os.PathLike[str], run: str | os.PathLike[str], target: str | os.PathLike[str] | None = None,
             max_drop: float = 1.0, calibration: int = 256, batch_size: int = 32) -> Int8Result:
    """RUN's fp32 ONNX export `fp32` as int8 at `target` (default: beside it, model.int8.onnx),
    checked on the run's validation split; Int8Refused when every method loses more than
    `max_drop` points (nothing is written then)."""
    _require_tools()
    fp32, run = Path(fp32), Path(run)
    target = Path(target) if target else fp32.with_name(fp32.stem + ".int8.onnx")
    bundle = load_exported(fp32)
    task = bundle.task
    delim = read_config(run / "config.yaml").data.label_delim if (run / "config.yaml").is_file() else " "
    valid = [(p, y) for p, y, split in run_splits(run, task, delim) if split == VALID and not task.unknown_labels([y])]
    if not valid:
        raise VisiontuneError(f"int8 needs the run's validation images to calibrate and check it: {run}/splits.csv "
                              "has no valid rows (train with a validation split, e.g. --valid-pct 0.2)")
    paths = [p for p, _ in valid]
    loader = make_loader(eval_dataset(paths, task.encode([y for _, y in valid]), bundle.preprocess,
                                      mark_unreadable=True), batch_size, 0, resolve_device("cpu"))
    result = Int8Result(None, None, task.score_metric, _score(bundle.model, loader, task), images=len(paths),
                        sizes={"fp32": fp32.stat().st_size})
    with tempfile.TemporaryDirectory(prefix="visiontune-int8-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        _prepare(fp32, prepared)
        for method in METHODS:
            candidate = Path(tmp) / f"{method}.onnx"
            try:
                if method == "static":
                    _static(prepared, candidate, _calibration_batches(loader, calibration))
                else:
                    _dynamic(prepared, candidate)
                _copy_metadata(fp32, candidate, method)
                result.scores[method] = _score(load_exported(candidate).model, loader, task)
            except Exception as exc:  # noqa: BLE001 - a method ORT cannot apply to this graph: try the next
                result.errors[method] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
                log.warning("int8 %s quantisation failed (%s)", method, result.errors[method])
                continue
            log.info("int8 %s: validation %s %.4f vs fp32 %.4f", method, task.score_metric, result.scores[method],
                     result.fp32)
            if result.drop(method) <= max_drop:
                atomic_write(target, lambda out, c=candidate: Path(out).write_bytes(c.read_bytes()))
                result.path, result.method, result.sizes["int8"] = str(target), method, target.stat().st_size
                return result
    raise Int8Refused("\n".join([*result.lines(), f"int8 refused: every method lost more than --max-drop {max_drop:g} "
                                 f"points on the validation split; the fp32 export {fp32} is kept (a larger "
                                 "--max-drop accepts the loss)"]))


def _require_tools() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime.quantization  # noqa: F401
    except ImportError:
        raise VisiontuneError("int8 export needs onnx and onnxruntime: pip install 'visiontune[export]'") from None


def _score(model: Any, loader: Any, task: Any) -> float:
    out = run_eval(model, loader, resolve_device("cpu"), task, channels_last=False)
    keep = ~unreadable_rows(out.targets)
    return float(task.metrics(out.targets[keep], out.probs[keep])[task.score_metric])


def _calibration_batches(loader: Any, limit: int) -> Iterator[np.ndarray]:
    seen = 0
    for batch in loader:
        images = batch[0].numpy().astype(np.float32)
        yield images[:max(0, limit - seen)]
        seen += len(images)
        if seen >= limit:
            return


def _prepare(fp32: Path, out: Path) -> None:
    """ORT's recommended pre-processing (shape inference, graph optimisation); the graph as
    it is when that fails (it is an optimisation, not a requirement)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        quant_pre_process(str(fp32), str(out), skip_symbolic_shape=True)
    except Exception as exc:  # noqa: BLE001
        log.info("int8: quant_pre_process skipped (%s)", exc)
        out.write_bytes(fp32.read_bytes())


def _static(prepared: Path, out: Path, batches: Iterator[np.ndarray]) -> None:
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    name = onnx.load(str(prepared), load_external_data=False).graph.input[0].name

    class Reader(CalibrationDataReader):
        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(batches, None)
            return None if batch is None or not len(batch) else {name: batch}

    quantize_static(str(prepared), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)


def _dynamic(prepared: Path, out: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(prepared), str(out), weight_type=QuantType.QInt8)


def _copy_metadata(fp32: Path, candidate: Path, method: str) -> None:
    """The fp32 export's metadata (classes, preprocessing, task, weights digest) on the int8
    file, plus how it was quantised."""
    import onnx

    source = {m.key: m.value for m in onnx.load(str(fp32), load_external_data=False).metadata_props}
    model = onnx.load(str(candidate))
    onnx.helper.set_model_props(model, {**source, "quantization": f"int8 {method} (onnxruntime.quantization)"})
    onnx.save(model, str(candidate))
