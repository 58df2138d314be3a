"""Scoring and prediction with a trained run: `evaluate`, `predict`, `predict_stream` and
their results. This module never imports the training loop (a test checks which
modules a prediction loads): a served or deployed model needs only the bundle, the
data readers and the runtime. `visiontune.api` re-exports every name.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from visiontune import display
from visiontune.bundle import Bundle, OodRequest, SetRequest, load_bundle
from visiontune.config import DataConfig
from visiontune.data.images import check_image
from visiontune.data.items import TEST, TRAIN, VALID
from visiontune.data.loaders import eval_dataset, make_loader
from visiontune.data.sources import collect_images, load_items
from visiontune.data.webdata import is_shard_item
from visiontune.deploy.export import load_exported, onnx_engine
from visiontune.deploy.formats import is_exported
from visiontune.errors import ConfigError, DataError
from visiontune.rundir import RunDir
from visiontune.runtime.device import resolve_device
from visiontune.runtime.engine import OnnxModule
from visiontune.runtime.inference import Batch, EvalOutput, eval_batches, run_eval
from visiontune.tasks.base import Decoded, unreadable_rows
from visiontune.tasks.catalog import make_task
from visiontune.tasks.conformal import SetPrediction

log = logging.getLogger(__name__)


# -- evaluate ---------------------------------------------------------------------------
@dataclass
class EvalResult:
    metrics: dict[str, float]
    report: list[dict[str, Any]]
    confusion: np.ndarray
    classes: list[str]
    paths: list[str]
    targets: np.ndarray
    probs: np.ndarray
    excluded: list[tuple[str, str]]
    text: str = ""  # the task's per-class table and confusion matrix

    def format(self) -> str:
        head = "  ".join(f"{k} {v:.4f}" for k, v in self.metrics.items())
        return f"{head}\nimages: {len(self.paths)}\n\n{self.text}"

    def _repr_html_(self) -> str:
        keys = list(dict.fromkeys(k for row in self.report for k in row))
        return (display.metrics_table(self.metrics, f"{len(self.paths)} images")
                + display.table([[row.get(k, "") for k in keys] for row in self.report], keys, "per class"))


def evaluate(run: str | os.PathLike[str], data: str | os.PathLike[str], *, csv: str | None = None,
             label_delim: str | None = None, batch_size: int = 64, device: str = "auto",
             num_workers: int | None = None, progress: bool = False, tta: bool = False,
             coverage: float | None = None) -> EvalResult:
    """Score a trained run on labelled images: class subfolders (a dataset root with a test/
    or valid/ folder uses that split) or a `csv` of path,label(s)[,split] (its test split,
    else valid, else every row). Labels are read in the run's task shape. `tta`: average
    the logits of 4 views per image (data/transforms.py). The metrics include the
    calibration's: ECE (15 bins) and NLL of the probabilities as predict gives them, and of
    the uncalibrated ones (`*_uncalibrated`). `coverage`: also the prediction sets' empirical
    coverage, mean size (interval width) and, for classes, selective accuracy. A run that
    scores how unlike its training images an image is (models/novelty.py) also reports
    `unknown_share`: the share of images past its OOD threshold (about 5% for images like
    the validation split's)."""
    dev = resolve_device(device)
    bundle = load_bundle(run, dev)
    sets = SetRequest.of(bundle, coverage)
    delim = label_delim or (bundle.config.data.label_delim if bundle.config else " ")
    # each file is decoded once: undecodable ones are marked while reading, not checked first
    source = load_items(DataConfig(path=str(data), csv=csv, valid_pct=0.0, verify_images=False, label_delim=delim,
                                   task=bundle.task.name), min_classes=1)
    split = TEST if source.split(TEST) else VALID if source.split(VALID) else TRAIN
    items = source.split(split)
    unknown = bundle.task.unknown_labels([it.label for it in items])
    if unknown:
        raise DataError(f"{str(data)!r} has classes {unknown} that the model does not know; "
                        f"it knows {bundle.task.classes}")
    paths = [it.path for it in items]
    ds = eval_dataset(paths, bundle.task.encode([it.label for it in items]), bundle.preprocess, mark_unreadable=True,
                      tta=tta)
    out = run_eval(bundle.model, make_loader(ds, batch_size, num_workers, dev), dev, bundle.task, progress)
    out.require_all(len(paths), paths)  # rows in the order of `items`, whatever order shards were read in
    paths, unreadable = _drop_unreadable_rows(paths, out)  # run_eval's loss leaves them out
    metrics = {**bundle.task.metrics(out.targets, out.probs), "loss": out.loss,
               **calibration_figures(bundle, out.targets, out.probs)}
    if sets is not None and len(out.targets):
        metrics.update(bundle.task.conformal.assess(out.targets, out.probs, sets.fitted, sets.coverage))
    ood = OodRequest.of(bundle)
    if ood is not None and out.ood is not None and len(out.ood):
        metrics["unknown_share"] = float((out.ood > ood.threshold).mean())  # past the run's OOD threshold
    report = bundle.task.report(out.targets, out.probs)
    return EvalResult(metrics, report.rows, report.confusion, bundle.task.classes, paths, out.targets, out.probs,
                      source.excluded + unreadable, report.text)


def calibration_figures(bundle: Bundle, targets: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """ECE and NLL of `probs` (what the model gives, calibrated when the run fitted it), and of
    the same outputs with the calibration undone (`ece_uncalibrated`, `nll_uncalibrated`);
    nothing for a task without probabilities, or no labelled rows. The reliability diagram
    of both goes to RUN/reliability_evaluated.png (a run that cannot be written to: skipped)."""
    calibrator = bundle.task.calibrator
    if calibrator.kind == "none" or not len(targets):
        return {}
    figures = {"ece": calibrator.ece(targets, probs), "nll": calibrator.nll(targets, probs)}
    curves = {"as predicted": calibrator.reliability(targets, probs)}
    layer = getattr(bundle.model, "calibration", None)
    if layer is not None and layer.fitted:
        scale, bias = layer.scale.cpu().numpy().astype(np.float64), layer.bias.cpu().numpy().astype(np.float64)
        raw = calibrator.probabilities(calibrator.raw(probs), 1 / scale, -bias / scale)
        figures.update(ece_uncalibrated=calibrator.ece(targets, raw), nll_uncalibrated=calibrator.nll(targets, raw))
        curves["uncalibrated"] = calibrator.reliability(targets, raw)
    eces = {"as predicted": figures["ece"], "uncalibrated": figures.get("ece_uncalibrated", 0.0)}
    from visiontune.plots import (
        save_reliability,  # matplotlib: evaluate's only, kept out of predict's start-up
    )

    try:
        save_reliability(RunDir(bundle.path).evaluated_reliability, curves, eces, calibrator.outcome)
    except OSError as exc:
        log.warning("evaluate: the reliability diagram was not written (%s)", exc)
    return figures


# -- predict ----------------------------------------------------------------------------
@dataclass
class Prediction:
    """One image's prediction: the one record the CLI prints and writes and serve returns
    (the task formats it: `line`, `record`, its CSV row)."""

    path: str
    label: str  # the predicted class; multi-label: the predicted labels joined by the run's --label-delim ("" for
    # none); regression: the number as text
    prob: float  # its probability; multi-label: the highest among the predicted labels (0 for none); regression: the
    # number
    top_k: list[tuple[str, float]]  # the most probable labels, best first
    labels: list[str] = field(default_factory=list)  # every predicted label (multi-label: above its threshold)
    probs: dict[str, float] = field(default_factory=dict, repr=False)  # every class's probability
    task: str = "single-label"
    value: float | None = None  # regression: the predicted number
    decoded: Any = field(default=None, repr=False)  # the task's Decoded
    task_obj: Any = field(default=None, repr=False, compare=False)

    @property
    def set(self) -> SetPrediction | None:
        """predict --coverage: the prediction set (classes, labels, or a number's interval)."""
        return self.decoded.prediction_set if self.decoded is not None else None

    def line(self) -> str:
        task, decoded = self._task_and_decoded()
        return task.output.line(self.path, decoded)

    def record(self) -> dict[str, Any]:
        task, decoded = self._task_and_decoded()
        return {"path": self.path, **task.output.record(decoded)}

    def _task_and_decoded(self) -> tuple[Any, Decoded]:
        """What predict made this from; for one built by hand, rebuilt from its fields."""
        if self.decoded is not None and self.task_obj is not None:
            return self.task_obj, self.decoded
        labels = self.labels or ([self.label] if self.label else [])
        probs = [self.value] if self.value is not None else [self.probs.get(lb, self.prob) for lb in labels]
        task = make_task(self.task, list(self.probs) or [lb for lb, _ in self.top_k] or labels)
        return task, Decoded(labels, probs, self.top_k, self.value, self.probs)


def predict(run: str | os.PathLike[str], inputs: list[str | os.PathLike[str]] | str | os.PathLike[str], *,
            top_k: int = 3, batch_size: int = 64, device: str = "auto", num_workers: int | None = None,
            tta: bool = False, engine: str = "auto", coverage: float | None = None,
            abstain: bool = False, ood_threshold: float | None = None) -> tuple[list[Prediction], list[tuple[str, str]]]:
    """Classify image files and folders (searched recursively) with a run directory, its
    model.safetensors, or an exported .onnx / .pt2 / .ts file. Returns the predictions and
    the (path, reason) of inputs that were skipped (hidden, not images, unreadable). `tta`:
    average the logits of 4 views per image. For many images, `predict_stream` yields them
    one at a time instead of holding the list.

    `engine` (CPU only): "auto" runs ONNX Runtime when the run has a current model.onnx or
    when onnxruntime is installed and there are at least 2,000 images (exporting model.onnx
    once, ~10 s for Lite0), else PyTorch; "onnx" / "torch" force one.

    `coverage` (e.g. 0.9): each prediction also carries its prediction set (`Prediction.set`):
    the classes (labels; a number's interval) that hold the truth for that share of images,
    from the run's held-out outputs (tasks/conformal.py). `abstain` (single-label, with
    `coverage`): a set of more than one class answers "not sure: a or b".

    A run whose model holds a bank of training features (models/novelty.py) scores each
    image (`Prediction.decoded.ood_score`: the distance to its k-th nearest training image)
    and answers "unknown" past the threshold set on its validation split (95% of those
    images pass); `ood_threshold` replaces that threshold."""
    stream = predict_stream(run, inputs, top_k=top_k, batch_size=batch_size, device=device,
                            num_workers=num_workers, tta=tta, engine=engine, coverage=coverage, abstain=abstain,
                            ood_threshold=ood_threshold)
    preds = list(stream)
    return preds, stream.skipped


class PredictionStream:
    """Predictions one image at a time as the model produces them: memory stays flat however
    many images there are. One pass. Files come in input order; samples of shards in the
    order their shards are read (DataLoader workers interleave them): each prediction is
    paired with its own image by the row the loader yields with it, never by position.
    `len()` is the number of images found; `skipped` holds the (path, reason) of inputs
    left out, complete once the stream is exhausted (unreadable files are found while
    decoding)."""

    def __init__(self, paths: list[str], skipped: list[tuple[str, str]], task: Any,
                 batches: Iterator[Batch], top_k: int, label_delim: str = " ", sets: SetRequest | None = None,
                 ood: OodRequest | None = None) -> None:
        self.paths, self.skipped, self.task = paths, skipped, task
        self.label_delim = label_delim  # joins a multi-label prediction's labels (no label name holds it)
        self.sets = sets  # --coverage: the held-out scores, the coverage asked, --abstain
        self.ood = ood  # the OOD threshold, when the model scores images (None: no score, no "unknown")
        self._predictions = self._run(batches, top_k)

    def __len__(self) -> int:
        return len(self.paths)

    def __iter__(self) -> Iterator[Prediction]:
        return self._predictions

    def _run(self, batches: Iterator[Batch], top_k: int) -> Iterator[Prediction]:
        task, read = self.task, np.zeros(len(self.paths), dtype=bool)
        for probs, targets, rows, _, _, scores in batches:
            read[rows] = True
            bad = unreadable_rows(targets)
            self.skipped.extend(_unreadable([self.paths[i] for i in rows[bad]]))
            decoded = task.decode(probs[~bad], top_k)
            if self.sets is not None:
                self.sets.attach(task, probs[~bad], decoded)
            if self.ood is not None and scores is not None:
                self.ood.attach(scores[~bad], decoded)
            for i, d in zip(rows[~bad], decoded):
                yield Prediction(self.paths[i], self.label_delim.join(d.labels), max(d.probs, default=0.0), d.ranked,
                                 d.labels, d.scores, task.name, d.value, d, task)
        self.skipped.extend((self.paths[i], "not read: its shard does not hold it") for i in np.flatnonzero(~read))


def predict_stream(run: str | os.PathLike[str], inputs: list[str | os.PathLike[str]] | str | os.PathLike[str], *,
                   top_k: int = 3, batch_size: int = 64, device: str = "auto", num_workers: int | None = None,
                   tta: bool = False, engine: str = "auto", coverage: float | None = None,
                   abstain: bool = False, ood_threshold: float | None = None,
                   progress: bool = False) -> PredictionStream:
    """`predict`, streamed: the model is loaded and the inputs listed now; iterating the
    result classifies the images batch by batch (see PredictionStream), with a progress bar
    of the batches on a terminal's stderr when `progress`."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    if abstain and coverage is None:
        raise ConfigError("--abstain answers 'not sure' when the prediction set holds more than one class: give "
                          "--coverage too (e.g. --coverage 0.9)")
    paths, skipped = collect_images([str(p) for p in inputs])
    dev, bundle, channels_last = _predictor(run, device, engine, len(paths))
    sets, ood = SetRequest.of(bundle, coverage, abstain), OodRequest.of(bundle, ood_threshold)
    batches: Iterator[Batch] = iter(())
    if paths:
        ds = eval_dataset(paths, None, bundle.preprocess, mark_unreadable=True, tta=tta)  # each file decoded once
        batches = eval_batches(bundle.model, make_loader(ds, batch_size, num_workers, dev), dev, bundle.task,
                               progress, channels_last=channels_last)
    return PredictionStream(paths, skipped, bundle.task, batches, top_k, _label_delim(run, bundle), sets, ood)


def _label_delim(run: str | os.PathLike[str], bundle: Bundle) -> str:
    """The delimiter the run wrote label sets with (its config; " " for an exported file)."""
    config = bundle.config
    if config is None:
        config = RunDir(run).read_config()
    return config.data.label_delim if config is not None else " "


def _predictor(run: str | os.PathLike[str], device: str, engine: str = "torch",
               images: int = 0) -> tuple[Any, Bundle, bool]:
    """(device of the inputs, bundle, channels_last) for a run directory or an exported
    file; on a CPU, a run directory may run as ONNX (see `predict`'s `engine`). An exported
    file runs on the CPU unless `device` names another (an ONNX session then uses that
    device's provider, its inputs stay on the CPU)."""
    dev = resolve_device("cpu" if device == "auto" and is_exported(run) else device)
    if is_exported(run):
        bundle = load_exported(run, device=dev)
        return (resolve_device("cpu") if isinstance(bundle.model, OnnxModule) else dev), bundle, False
    if engine == "onnx" and dev.type != "cpu":
        raise ConfigError(f"engine 'onnx' runs on the CPU only; use --device cpu or --engine torch (device: {dev})")
    exported = onnx_engine(run, engine, images) if dev.type == "cpu" else None
    if exported is not None:
        return dev, exported, False
    return dev, load_bundle(run, dev), True


def _drop_unreadable_rows(paths: list[str], out: EvalOutput) -> tuple[list[str], list[tuple[str, str]]]:
    """Leave the rows ImageDataset / ShardStream marked UNREADABLE out of `out` (in place);
    return the paths of the rows kept and (path, reason) of the others."""
    bad = unreadable_rows(out.targets)
    unreadable = _unreadable([paths[i] for i in out.ids[bad]])
    if unreadable:
        out.keep(~bad)
    return [paths[i] for i in out.ids], unreadable


def _unreadable(paths: list[str]) -> list[tuple[str, str]]:
    """(path, why it did not decode) of files (or shard samples) the reader marked UNREADABLE."""
    return [(p, "cannot decode (a sample in a shard)" if is_shard_item(p) else check_image(p) or "cannot decode")
            for p in paths]


