"""int8 ONNX: `visiontune export RUN --format onnx --int8 [--max-drop 1] [--calibration 256]`.

ONNX Runtime's quantisation tools turn the fp32 export (RUN/model.onnx) into
RUN/model.int8.onnx, which `predict RUN/model.int8.onnx` (ONNX Runtime) runs:

1. **Static** (first): weights int8 per channel, activations uint8, in the QDQ format;
   activation ranges calibrated (min/max) on about `calibration` of the run's validation
   images, a stratified sample (data/splits.stratified_sample: every class, whatever the
   order of splits.csv), preprocessed as the model sees them. An image that cannot be read
   is an error (never a blank image in the ranges). The graph is prepared first with
   `quant_pre_process` (shape inference, fusions).
2. **Dynamic** (the fallback, when static fails or loses too much): int8 weights,
   activations quantised on the fly; no calibration.

Each candidate is scored on the run's validation split against the fp32 export, by the
task's `score_metric` (accuracy; mAP for label sets; R² for numbers), in points (x100):
on the validation images the calibration did not use when at least `calibration` of them
are left (a split of 2 x `calibration` images or more), else on the whole split, the
calibration images included, and the output says so (holding half of a small split out
would make one image worth several points of drop). The first whose drop is at most
`max_drop` is kept; when none is, no int8 file is left (an earlier one is removed), the
fp32 export stays, and `Int8Refused` says by how much each lost. The file carries the
fp32 export's metadata (classes, preprocessing, task, the weights' digest) plus
`quantization`: `load_exported` refuses it once the weights beside it change (a resume, a
retrain), and a new export removes an int8 file of other weights first.
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

from visiontune.bundle import model_file
from visiontune.data.hf import is_hf
from visiontune.data.images import check_image
from visiontune.data.items import VALID
from visiontune.data.loaders import eval_dataset, make_loader
from visiontune.data.splits import stratified_sample
from visiontune.data.webdata import is_shard_item
from visiontune.deploy.export import ExportResult, export, load_exported
from visiontune.errors import ConfigError, VisiontuneError
from visiontune.files import write_bytes
from visiontune.rundir import RunDir
from visiontune.runtime.device import resolve_device
from visiontune.runtime.inference import progress, run_eval
from visiontune.tasks.base import unreadable_rows

log = logging.getLogger(__name__)

METHODS = ("static", "dynamic")
TAIL_OPS = {"Mul", "Add", "Sub", "Div", "Softmax", "Sigmoid", "Identity", "Cast"}  # output_tail's: calibration, export_module


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
    calibration: int = 0  # validation images that calibrated static int8 (a stratified sample)
    held_out: bool = False  # True: none of them is among the images scored

    def drop(self, method: str) -> float:
        """Points (x100) the method lost against fp32 on the validation split."""
        return 100.0 * (self.fp32 - self.scores[method])

    def lines(self) -> list[str]:
        out = [f"validation {self.metric} on {self.images} images: fp32 {self.fp32:.4f}"]
        if self.held_out:
            out.append(f"  (static int8 calibrated on {self.calibration} other validation images, a stratified sample)")
        else:
            out.append(f"  (static int8 calibrated on {self.calibration} of these images, a stratified sample: too few "
                       "to hold some out, so its drop may look smaller than on new images)")
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
                max_drop: float = 1.0, calibration: int = 256, show_progress: bool = False) -> ExportResult:
    """`export(run, "onnx", output)` and then `quantize` it: the result's `int8` says how it
    went; Int8Refused (the fp32 file kept) when every method loses more than `max_drop`.
    `show_progress`: a bar (stderr, on a terminal) for each pass over the validation images."""
    if format != "onnx":
        raise ConfigError(f"--int8 quantises ONNX models; use --format onnx (not {format})")
    _require_tools()  # before the fp32 export, not after it
    _check_calibration(calibration)
    result = export(run, "onnx", output)
    result.int8 = quantize(result.path, model_file(run).parent, max_drop=max_drop, calibration=calibration,
                           show_progress=show_progress)
    return result


def quantize(fp32: str | os.PathLike[str], run: str | os.PathLike[str], target: str | os.PathLike[str] | None = None,
             max_drop: float = 1.0, calibration: int = 256, batch_size: int = 32,
             show_progress: bool = False) -> Int8Result:
    """RUN's fp32 ONNX export `fp32` as int8 at `target` (default: beside it, model.int8.onnx),
    checked on the run's validation split; Int8Refused when every method loses more than
    `max_drop` points (no int8 file is left then). An int8 file of other weights at
    `target` is removed first, whatever the outcome. `show_progress`: a bar for reading the
    calibration images, for static int8's calibration and for each scoring pass."""
    _require_tools()
    _check_calibration(calibration)
    fp32, run = Path(fp32), Path(run)
    target = Path(target) if target else RunDir.int8_of(fp32)
    bundle = load_exported(fp32)  # refused when it is not of the weights beside it
    _remove_stale(target, _onnx_meta(fp32).get("weights_digest", ""))
    task = bundle.task
    config = RunDir(run).read_config()
    valid = _validation(run, task, config.data.label_delim if config else " ")
    calibrate, scored = _calibration_split(task, valid, calibration, config.seed if config else 0)
    inputs = _calibration_inputs(_shown(_loader(calibrate, bundle, batch_size), show_progress, "int8 read calibration"),
                                 [p for p, _ in calibrate], run)
    loader = _loader(scored, bundle, batch_size)
    fp32_score = _score(bundle.model, _shown(loader, show_progress, "int8 score fp32"), task, [p for p, _ in scored], run)
    result = Int8Result(None, None, task.score_metric, fp32_score,
                        images=len(scored), calibration=len(calibrate), held_out=len(scored) < len(valid),
                        sizes={"fp32": fp32.stat().st_size})
    with tempfile.TemporaryDirectory(prefix="visiontune-int8-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        _prepare(fp32, prepared)
        for method in METHODS:
            candidate = Path(tmp) / f"{method}.onnx"
            if _candidate(method, (prepared, candidate, fp32), inputs, loader, task, result, show_progress) and \
                    result.drop(method) <= max_drop:
                write_bytes(target, candidate.read_bytes())
                result.path, result.method, result.sizes["int8"] = str(target), method, target.stat().st_size
                return result
    removed = _remove_stale(target, None)  # this export's answer is "none": an earlier int8 file goes too
    raise Int8Refused("\n".join([*result.lines(), f"int8 refused: every method lost more than --max-drop {max_drop:g} "
                                 f"points on the validation split; the fp32 export {fp32} is kept (a larger "
                                 "--max-drop accepts the loss)" + (f"; the earlier int8 file {target} was removed"
                                                                   if removed else "")]))


def _require_tools() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime.quantization  # noqa: F401
    except ImportError:
        raise VisiontuneError("int8 export needs onnx and onnxruntime: pip install 'visiontune[export]'") from None


def _candidate(method: str, files: tuple[Path, Path, Path], inputs: list[np.ndarray], loader: Any, task: Any,
               result: Int8Result, show_progress: bool = False) -> bool:
    """Quantise the prepared graph by `method` into the candidate file (`files`: prepared,
    candidate, fp32) and score it into `result`; False (the error recorded) when ONNX
    Runtime cannot apply the method to this graph."""
    prepared, candidate, fp32 = files
    try:
        if method == "static":
            _static(prepared, candidate, iter(_shown(inputs, show_progress, "int8 calibrate static")))
        else:
            _dynamic(prepared, candidate)
        _copy_metadata(fp32, candidate, method)
        result.scores[method] = _score(load_exported(candidate).model,
                                       _shown(loader, show_progress, f"int8 score {method}"), task)
    except Exception as exc:  # noqa: BLE001 - a method ORT cannot apply to this graph: try the next
        result.errors[method] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        log.warning("int8 %s quantisation failed (%s)", method, result.errors[method])
        return False
    log.info("int8 %s: validation %s %.4f vs fp32 %.4f", method, task.score_metric, result.scores[method], result.fp32)
    return True


def _shown(batches: Any, show_progress: bool, desc: str) -> Any:
    """`batches` (a loader, a list) behind a progress bar named `desc` when `show_progress`."""
    return progress(batches, show_progress, desc, len(batches))


def _check_calibration(calibration: int) -> None:
    if calibration < 1:
        raise ConfigError(f"--calibration {calibration}: calibrate on at least 1 validation image (default 256)")


def _validation(run: Path, task: Any, delim: str) -> list[tuple[str, Any]]:
    splits = RunDir(run).splits_file
    valid = [(p, y) for p, y, split in RunDir(run).splits(task, delim) if split == VALID and not task.unknown_labels([y])]
    if not valid:
        raise VisiontuneError(f"int8 needs the run's validation images to calibrate and check it: {splits} "
                              "has no valid rows (train with a validation split: a valid/ folder or --valid-pct; a "
                              "run on too few labels to hold one out cannot be checked, label more)")
    return valid


def _calibration_split(task: Any, valid: list[tuple[str, Any]], limit: int,
                       seed: int) -> tuple[list[tuple[str, Any]], list[tuple[str, Any]]]:
    """(the images that calibrate, the images that score): a stratified sample of about
    `limit` validation images (data/splits.stratified_sample over the task's strata: every
    class is in it, whatever the order of splits.csv) calibrates; when at least `limit`
    others are left, they alone score the drop (the calibration never sees them), else the
    whole split does (Int8Result.lines says so)."""
    rows = stratified_sample(task.strata([y for _, y in valid]), limit, seed, at_least=1)
    if rows is None:
        return valid, valid
    chosen = set(rows.tolist())
    calibrate = [v for i, v in enumerate(valid) if i in chosen]
    others = [v for i, v in enumerate(valid) if i not in chosen]
    return calibrate, (others if len(others) >= limit else valid)


def _loader(rows: list[tuple[str, Any]], bundle: Any, batch_size: int) -> Any:
    dataset = eval_dataset([p for p, _ in rows], bundle.task.encode([y for _, y in rows]), bundle.preprocess,
                           mark_unreadable=True)
    return make_loader(dataset, batch_size, 0, resolve_device("cpu"))


def _require_read(paths: list[str], bad: np.ndarray, run: Path, what: str) -> None:
    """VisiontuneError naming the images (rows `bad` of `paths`) the reader marked
    unreadable: a blank image would otherwise stand in for each."""
    if not len(bad):
        return
    shown = [f"{paths[i]} ({'a sample in a shard' if is_shard_item(paths[i]) else check_image(paths[i]) or 'unreadable'})"
             for i in sorted(bad.tolist())[:3]]
    raise VisiontuneError(f"int8: {len(bad)} of the {len(paths)} validation images that {what} cannot be read, e.g. "
                          f"{'; '.join(shown)}. {_how_to_restore(run)}, then export again")


def _how_to_restore(run: Path) -> str:
    """How the run's images come back: a Hugging Face dataset's are written into the cache
    again by any command that reads it; files are put back where splits.csv says."""
    config = RunDir(run).read_config()
    if config is not None and is_hf(config.data.path):
        return (f"They are the images of the Hugging Face dataset {config.data.path}, which the cache no longer "
                f"holds (`visiontune cache clear`): any command that reads the dataset writes them again, e.g. "
                f"`visiontune evaluate {run} {config.data.path}`")
    return f"Put them back where {run}/splits.csv says they are (or retrain on the data where it is now)"


def _score(model: Any, loader: Any, task: Any, paths: list[str] | None = None, run: Path | None = None) -> float:
    """The task's score metric over `loader`; with `paths`, an unreadable image is an error."""
    out = run_eval(model, loader, resolve_device("cpu"), task, channels_last=False)
    bad = unreadable_rows(out.targets)
    if paths is not None and run is not None:
        _require_read(paths, out.ids[bad], run, "score the drop")
    return float(task.metrics(out.targets[~bad], out.probs[~bad])[task.score_metric])


def _calibration_inputs(loader: Any, paths: list[str], run: Path) -> list[np.ndarray]:
    """The calibration images as ONNX Runtime's calibrator reads them (preprocessed
    batches), read before any method runs: an unreadable image is an error, never a blank
    image among the ranges (nor a 'static failed' that falls back to dynamic)."""
    batches, bad = [], []
    for images, targets, rows in loader:
        marked = unreadable_rows(targets)
        bad += np.asarray(rows)[marked.numpy() if hasattr(marked, "numpy") else marked].tolist()
        batches.append(images[~marked].numpy().astype(np.float32))
    _require_read(paths, np.asarray(bad, dtype=np.int64), run, "calibrate")
    return [b for b in batches if len(b)]


def _remove_stale(target: Path, digest: str | None) -> bool:
    """Remove the int8 file visiontune wrote at `target` when it records other weights
    than `digest` (None: whatever weights it is of); True when one was removed. A file
    that is not a visiontune int8 export is left alone."""
    meta = _onnx_meta(target) if target.is_file() else {}
    if "quantization" not in meta or (digest is not None and meta.get("weights_digest", "") == digest):
        return False
    target.unlink()
    if digest is not None:
        log.warning("removed %s: it was quantised from other weights than the fp32 export's", target)
    return True


def _onnx_meta(path: Path) -> dict[str, str]:
    """An ONNX file's metadata_props ({} when it cannot be read)."""
    import onnx

    try:
        return {m.key: m.value for m in onnx.load(str(path), load_external_data=False).metadata_props}
    except Exception:  # noqa: BLE001 - not an ONNX file: no metadata
        return {}


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
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    nodes_to_exclude=output_tail(prepared))


def output_tail(path: Path) -> list[str]:
    """The head's last weighted layer and the nodes after it: the calibration's scale and
    bias and the task's output map (softmax, sigmoid, a number's real units). Static int8
    leaves them in float (the head is a small share of the weights): quantised, each
    probability (each number) was rounded to 1 of 256 levels over its range (rows of
    probabilities summed to 0.99, a class's 0.001 became 0, a regression answered 67
    distinct numbers for 80 images)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    made_by = {out: node for node in graph.node for out in node.output}
    tail, tensor = [], graph.output[0].name
    while (node := made_by.get(tensor)) is not None and node.op_type in TAIL_OPS:
        tail.append(node.name)
        inputs = [i for i in node.input if i in made_by]  # the chain's input (the others are constants)
        if len(inputs) != 1:
            break
        tensor = inputs[0]
    if node is not None and node.op_type in ("Gemm", "MatMul"):
        tail.append(node.name)  # its output quantised would be the same 256 levels, before the map
    return tail


def _dynamic(prepared: Path, out: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(prepared), str(out), weight_type=QuantType.QInt8)


def _copy_metadata(fp32: Path, candidate: Path, method: str) -> None:
    """The fp32 export's metadata (classes, preprocessing, task, weights digest) on the int8
    file, plus how it was quantised."""
    import onnx

    model = onnx.load(str(candidate))
    onnx.helper.set_model_props(model, {**_onnx_meta(fp32), "quantization": f"int8 {method} (onnxruntime.quantization)"})
    onnx.save(model, str(candidate))
