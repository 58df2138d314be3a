"""The public face: fit, evaluate, predict, inspect. The CLI is a thin layer over these."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from visiontune import display
from visiontune.analysis.inspection import describe
from visiontune.bundle import LAST_CHECKPOINT, Bundle, load_bundle, load_checkpoint, read_config
from visiontune.config import DataConfig, RunConfig
from visiontune.data.images import check_image
from visiontune.data.items import TEST, TRAIN, VALID, DataSource, LabelFunc
from visiontune.data.labels import label_counts
from visiontune.data.loaders import eval_dataset, make_loader
from visiontune.data.sources import collect_images, load_items, resolve_inputs
from visiontune.data.webdata import is_shard_item
from visiontune.deploy.export import load_exported, onnx_engine
from visiontune.errors import ConfigError, DataError, VisiontuneError
from visiontune.files import write_json
from visiontune.models.classifier import create_classifier
from visiontune.runtime.device import resolve_device
from visiontune.runtime.inference import EvalOutput, eval_batches, run_eval
from visiontune.selection.advisor import resolve_strategy
from visiontune.selection.budget import BudgetPlan, plan_budget
from visiontune.tasks.base import UNREADABLE, row_markers
from visiontune.train.callbacks import Callback
from visiontune.train.session import FitResult, train_run

log = logging.getLogger(__name__)

__all__ = ["EvalResult", "FitResult", "Prediction", "PredictionStream", "evaluate", "fit", "inspect", "predict",
           "predict_stream"]


def fit(
    data: str | os.PathLike[str] | None = None,
    *,
    config: RunConfig | None = None,
    label_func: LabelFunc | None = None,
    resume: str | os.PathLike[str] | None = None,
    callbacks: list[Callback] | None = None,
    started: float | None = None,
    **overrides: Any,
) -> FitResult:
    """Fine-tune a pretrained backbone on the images at `data`; return the run's results.

    Options are RunConfig field names, e.g. `fit("images/", strategy="gradual", epochs=5,
    backbone="timm:resnet50", lr=1e-3)`. `label_func(path) -> label` takes labels from file
    names (fastai style). `resume="runs/<run>"` continues an interrupted run from its last
    checkpoint (pass `epochs=` to extend it). `started` (time.perf_counter()): when the
    clock of `time_budget` began (default: now; the CLI passes when the command began).
    """
    if resume is not None:
        return _resume(Path(resume), data, label_func, callbacks, overrides)
    started = time.perf_counter() if started is None else started
    cfg, source = resolve_inputs(data, config, label_func, overrides)
    if cfg.train.time_budget:
        return _fit_in_time(cfg, source, callbacks, started)
    return train_run(resolve_strategy(cfg, source), source, callbacks=callbacks, started=started)


def _fit_in_time(cfg: RunConfig, source: DataSource, callbacks: list[Callback] | None, started: float) -> FitResult:
    """--time-budget: measure, plan, train with a deadline (selection/budget.py)."""
    budget = float(cfg.train.time_budget or 0)
    plan = plan_budget(cfg, source, budget, started)
    log.info("time budget %.0f s: %s for %d epochs at %d px (expected %.0f s): %s", budget, plan.strategy,
             plan.epochs, plan.image_size, plan.expected_s, "; ".join(plan.reasons))
    result = train_run(RunConfig.create(cfg, **plan.overrides()), source,
                       callbacks=[*(callbacks or []), _PlanWriter(plan)], started=started, deadline=started + budget,
                       reserve_s=plan.reserve_s)
    write_json(Path(result.run_dir) / "time_budget.json",
               {**plan.as_dict(), "actual_s": time.perf_counter() - started})
    return result


class _PlanWriter(Callback):
    """time_budget.json (the plan) into the run directory when training starts, so a run
    killed on the way and resumed still has it (completed with the time taken at the end)."""

    def __init__(self, plan: BudgetPlan) -> None:
        self.plan = plan

    def on_fit_start(self, trainer: Any) -> None:
        if trainer.env.is_main:
            write_json(Path(trainer.run_dir) / "time_budget.json", self.plan.as_dict())


def _resume(run_dir: Path, data: str | os.PathLike[str] | None, label_func: LabelFunc | None,
            callbacks: list[Callback] | None, overrides: dict[str, Any]) -> FitResult:
    if not (run_dir / "config.yaml").is_file():
        raise VisiontuneError(f"{str(run_dir)!r} is not a run directory (no config.yaml)")
    if data is not None:
        overrides["path"] = str(data)
    cfg = RunConfig.create(read_config(run_dir / "config.yaml"), **overrides)
    if (run_dir / LAST_CHECKPOINT).is_file():
        ckpt = load_checkpoint(run_dir / LAST_CHECKPOINT)
    else:  # killed before its first epoch ended: start that run again, in place
        log.warning("%s has no checkpoint yet: training it from the beginning", run_dir)
        ckpt = None
    budget_file = run_dir / "time_budget.json"
    plan = json.loads(budget_file.read_text()) if cfg.train.time_budget and budget_file.is_file() else {}
    result = train_run(cfg, load_items(cfg.data, cfg.seed, label_func, cache_dir=cfg.train.cache_dir),
                       run_dir=run_dir, ckpt=ckpt, callbacks=callbacks, reserve_s=float(plan.get("reserve_s", 0.0)))
    if plan:  # the plan, with the time taken over every session
        write_json(budget_file, {**plan, "actual_s": result.seconds, "resumed": True})
    return result


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
             num_workers: int | None = None, progress: bool = False, tta: bool = False) -> EvalResult:
    """Score a trained run on labelled images: class subfolders (a dataset root with a test/
    or valid/ folder uses that split) or a `csv` of path,label(s)[,split] (its test split,
    else valid, else every row). Labels are read in the run's task shape. `tta`: average
    the logits of 4 views per image (data/transforms.py)."""
    dev = resolve_device(device)
    bundle = load_bundle(run, dev)
    delim = label_delim or (bundle.config.data.label_delim if bundle.config else " ")
    # each file is decoded once: undecodable ones are marked while reading, not checked first
    source = load_items(DataConfig(path=str(data), csv=csv, valid_pct=0.0, verify_images=False, label_delim=delim,
                                   task=bundle.task.name), min_classes=1)
    split = TEST if source.split(TEST) else VALID if source.split(VALID) else TRAIN
    items = source.split(split)
    unknown = sorted(set(label_counts(it.label for it in items)) - set(bundle.task.classes))
    if unknown:
        raise DataError(f"{str(data)!r} has classes {unknown} that the model does not know; "
                        f"it knows {bundle.task.classes}")
    paths = [it.path for it in items]
    ds = eval_dataset(paths, bundle.task.encode([it.label for it in items]), bundle.preprocess, mark_unreadable=True,
                      tta=tta)
    out = run_eval(bundle.model, make_loader(ds, batch_size, num_workers, dev), dev, bundle.task, progress)
    out.require_all(len(paths), paths)  # rows in the order of `items`, whatever order shards were read in
    paths, unreadable = _drop_unreadable_rows(paths, out)  # run_eval's loss leaves them out
    metrics = {**bundle.task.metrics(out.targets, out.probs), "loss": out.loss}
    report = bundle.task.report(out.targets, out.probs)
    return EvalResult(metrics, report.rows, report.confusion, bundle.task.classes, paths, out.targets, out.probs,
                      source.excluded + unreadable, report.text)


# -- predict ----------------------------------------------------------------------------
@dataclass
class Prediction:
    path: str
    label: str  # the predicted class; multi-label: the predicted labels joined by the run's --label-delim ("" for none)
    prob: float  # its probability; multi-label: the highest among the predicted labels (0 for none)
    top_k: list[tuple[str, float]]  # the most probable labels, best first
    labels: list[str] = field(default_factory=list)  # every predicted label (multi-label: above its threshold)
    probs: dict[str, float] = field(default_factory=dict, repr=False)  # every class's probability
    task: str = "single-label"


def predict(run: str | os.PathLike[str], inputs: list[str | os.PathLike[str]] | str | os.PathLike[str], *,
            top_k: int = 3, batch_size: int = 64, device: str = "auto", num_workers: int | None = None,
            tta: bool = False, engine: str = "auto") -> tuple[list[Prediction], list[tuple[str, str]]]:
    """Classify image files and folders (searched recursively) with a run directory, its
    model.safetensors, or an exported .onnx / .pt2 / .ts file. Returns the predictions and
    the (path, reason) of inputs that were skipped (hidden, not images, unreadable). `tta`:
    average the logits of 4 views per image. For many images, `predict_stream` yields them
    one at a time instead of holding the list.

    `engine` (CPU only): "auto" runs ONNX Runtime when the run has a current model.onnx or
    when onnxruntime is installed and there are at least 2,000 images (exporting model.onnx
    once, ~10 s for Lite0), else PyTorch; "onnx" / "torch" force one."""
    stream = predict_stream(run, inputs, top_k=top_k, batch_size=batch_size, device=device,
                            num_workers=num_workers, tta=tta, engine=engine)
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
                 batches: Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, float, float]], top_k: int,
                 label_delim: str = " ") -> None:
        self.paths, self.skipped, self.task = paths, skipped, task
        self.label_delim = label_delim  # joins a multi-label prediction's labels (no label name holds it)
        self._predictions = self._run(batches, top_k)

    def __len__(self) -> int:
        return len(self.paths)

    def __iter__(self) -> Iterator[Prediction]:
        return self._predictions

    def _run(self, batches: Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, float, float]],
             top_k: int) -> Iterator[Prediction]:
        task, read = self.task, np.zeros(len(self.paths), dtype=bool)
        for probs, targets, rows, _, _ in batches:
            read[rows] = True
            bad = row_markers(targets) == UNREADABLE
            self.skipped.extend(_unreadable([self.paths[i] for i in rows[bad]]))
            for i, d, row in zip(rows[~bad], task.decode(probs[~bad], top_k), probs[~bad]):
                yield Prediction(self.paths[i], self.label_delim.join(d.labels), max(d.probs, default=0.0), d.ranked,
                                 d.labels,
                                 dict(zip(task.classes, map(float, row))), task.name)
        self.skipped.extend((self.paths[i], "not read: its shard does not hold it") for i in np.flatnonzero(~read))


def predict_stream(run: str | os.PathLike[str], inputs: list[str | os.PathLike[str]] | str | os.PathLike[str], *,
                   top_k: int = 3, batch_size: int = 64, device: str = "auto", num_workers: int | None = None,
                   tta: bool = False, engine: str = "auto") -> PredictionStream:
    """`predict`, streamed: the model is loaded and the inputs listed now; iterating the
    result classifies the images batch by batch (see PredictionStream)."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    paths, skipped = collect_images([str(p) for p in inputs])
    dev, bundle, channels_last = _predictor(run, device, engine, len(paths))
    batches: Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, float, float]] = iter(())
    if paths:
        ds = eval_dataset(paths, None, bundle.preprocess, mark_unreadable=True, tta=tta)  # each file decoded once
        batches = eval_batches(bundle.model, make_loader(ds, batch_size, num_workers, dev), dev, bundle.task,
                               channels_last=channels_last)
    return PredictionStream(paths, skipped, bundle.task, batches, top_k, _label_delim(run, bundle))


def _label_delim(run: str | os.PathLike[str], bundle: Bundle) -> str:
    """The delimiter the run wrote label sets with (its config; " " for an exported file)."""
    config = bundle.config
    if config is None and Path(run, "config.yaml").is_file():
        config = read_config(Path(run, "config.yaml"))
    return config.data.label_delim if config is not None else " "


def _predictor(run: str | os.PathLike[str], device: str, engine: str = "torch",
               images: int = 0) -> tuple[Any, Bundle, bool]:
    """(device, bundle, channels_last) for a run directory or an exported file (CPU);
    on a CPU, a run directory may run as ONNX (see `predict`'s `engine`)."""
    if str(run).endswith((".onnx", ".pt2", ".ts")):
        return resolve_device("cpu"), load_exported(run), False
    dev = resolve_device(device)
    if engine == "onnx" and dev.type != "cpu":
        raise ConfigError(f"engine 'onnx' runs on the CPU only; use --device cpu or --engine torch (device: {dev})")
    exported = onnx_engine(run, engine, images) if dev.type == "cpu" else None
    if exported is not None:
        return dev, exported, False
    return dev, load_bundle(run, dev), True


def _drop_unreadable_rows(paths: list[str], out: EvalOutput) -> tuple[list[str], list[tuple[str, str]]]:
    """Leave the rows ImageDataset / ShardStream marked UNREADABLE out of `out` (in place);
    return the paths of the rows kept and (path, reason) of the others."""
    bad = row_markers(out.targets) == UNREADABLE
    unreadable = _unreadable([paths[i] for i in out.ids[bad]])
    if unreadable:
        out.keep(~bad)
    return [paths[i] for i in out.ids], unreadable


def _unreadable(paths: list[str]) -> list[tuple[str, str]]:
    """(path, why it did not decode) of files (or shard samples) the reader marked UNREADABLE."""
    return [(p, "cannot decode (a sample in a shard)" if is_shard_item(p) else check_image(p) or "cannot decode")
            for p in paths]


# -- inspect ----------------------------------------------------------------------------
def inspect(target: str, *, strategy: str = "gradual", num_classes: int = 2, depth: int = 2,
            weights: str = "none", parameters: bool = False, **overrides: Any) -> str:
    """Text view of a model: module tree with parameter counts, layer groups and which of
    them train in each phase of `strategy`, and every optimizer group's learning rate;
    with `parameters=True` also every named parameter and what `state_dict()` holds.

    `target` is a backbone name (built with `weights`, random by default: the structure
    does not depend on them) or a run directory.
    """
    if Path(target).is_dir() or target.endswith(".safetensors"):
        bundle = load_bundle(target)
        cfg = RunConfig.create(bundle.config or RunConfig(), strategy=overrides.pop("strategy", strategy),
                               **overrides)
        return describe(bundle.model, cfg, depth, parameters)
    cfg = RunConfig.create(None, backbone=target, weights=weights, strategy=strategy, **overrides)
    model, _ = create_classifier(cfg.model, num_classes)
    return describe(model, cfg, depth, parameters)

