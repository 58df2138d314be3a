"""The public face: fit, evaluate, predict, inspect. The CLI is a thin layer over these."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from visiontune.config import RunConfig
from visiontune.data import TEST, TRAIN, VALID, DataSource, LabelFunc, load_items
from visiontune.errors import ConfigError, DataError, VisiontuneError

log = logging.getLogger(__name__)


@dataclass
class FitResult:
    run_dir: str
    classes: list[str]
    metrics: dict[str, float]
    history: list[dict[str, Any]]
    best_epoch: int
    stopped_early: bool
    seconds: float
    trainable_params: int = 0  # most parameters training in any phase
    valid_probs: np.ndarray | None = field(repr=False, default=None)  # rows follow data.split("valid")
    model: Any = field(repr=False, default=None)
    data: DataSource | None = field(repr=False, default=None)


def fit(
    data: str | os.PathLike[str] | None = None,
    *,
    config: RunConfig | None = None,
    label_func: LabelFunc | None = None,
    resume: str | os.PathLike[str] | None = None,
    callbacks: list[Any] | None = None,
    **overrides: Any,
) -> FitResult:
    """Fine-tune a pretrained backbone on the images at `data`; return the run's results.

    Options are RunConfig field names, e.g. `fit("images/", strategy="gradual", epochs=5,
    backbone="timm:resnet50", lr=1e-3)`. `label_func(path) -> label` takes labels from file
    names (fastai style). `resume="runs/<run>"` continues an interrupted run from its last
    checkpoint (pass `epochs=` to extend it).
    """
    from visiontune.bundle import LAST_CHECKPOINT, load_checkpoint, read_config

    started = time.perf_counter()
    if resume is not None:
        run_dir = Path(resume)
        base = read_config(run_dir / "config.yaml") if (run_dir / "config.yaml").is_file() else None
        if base is None:
            raise VisiontuneError(f"{str(resume)!r} is not a run directory (no config.yaml)")
        if data is not None:
            overrides["path"] = str(data)
        cfg = RunConfig.create(base, **overrides)
        if (run_dir / LAST_CHECKPOINT).is_file():
            ckpt = load_checkpoint(run_dir / LAST_CHECKPOINT)
        else:  # killed before its first epoch ended: start that run again, in place
            log.warning("%s has no checkpoint yet: training it from the beginning", run_dir)
            ckpt = None
    else:
        if data is not None:
            overrides["path"] = str(data)
        if label_func is not None:
            overrides.setdefault("label_func", getattr(label_func, "__name__", "function"))
        cfg = RunConfig.create(config, **overrides)
        if not cfg.data.path and not cfg.data.csv:
            raise ConfigError("no data given: pass a folder of images (or csv=...)")
        run_dir, ckpt = None, None
    source = load_items(cfg.data, cfg.seed, label_func)
    if cfg.strategy.name == "auto":
        from visiontune.advisor import advise_source

        advice = advise_source(cfg, source)
        log.info("advisor: %s", advice.explanation)
        cfg = RunConfig.create(cfg, strategy=advice.strategy)
    return fit_source(cfg, source, run_dir=run_dir, ckpt=ckpt, callbacks=callbacks, started=started)


def fit_source(cfg: RunConfig, source: DataSource, *, run_dir: Path | None = None,
               ckpt: dict[str, Any] | None = None, callbacks: list[Any] | None = None,
               started: float | None = None) -> FitResult:
    """Train on already loaded and split items (`cv` and `compare` build these per fold)."""
    return _fit(cfg, source, run_dir, ckpt, callbacks or [], time.perf_counter() if started is None else started)


def _fit(cfg: RunConfig, source: DataSource, run_dir: Path | None, ckpt: dict[str, Any] | None,
         extra_callbacks: list[Any], started: float) -> FitResult:
    import torch

    from visiontune.bundle import environment, write_config, write_json
    from visiontune.callbacks import Checkpoint, EarlyStopping, EpochPrinter, HistoryLogger
    from visiontune.trainer import Trainer

    log.info("%s", source.summary())
    if ckpt is not None and run_dir is not None:
        _check_same_classes(run_dir, source.classes)
    model, pre, plan, optimizer, data, device = prepare_run(cfg, source, resuming=ckpt is not None)
    cfg = data.cfg  # with --batch-size auto resolved
    t = cfg.train

    monitor = resolve_monitor(t.monitor, source)
    mode = t.mode if t.mode != "auto" else ("min" if "loss" in monitor else "max")
    if not source.split(VALID) and monitor != "train_loss":
        log.warning("no validation images: monitoring train_loss instead of %s", monitor)
        monitor, mode = "train_loss", "min"
    main = data.env.is_main  # under torchrun only rank 0 writes
    if run_dir is None:
        run_dir = _new_run_dir(cfg) if main else Path(os.devnull)
        if main:
            _write_run_files(run_dir, cfg, source, pre, device)
    elif main:
        write_config(run_dir, cfg)
    if model.warm_start and main:
        write_json(run_dir / "warm_start.json", model.warm_start)
    checkpoint = Checkpoint(run_dir, monitor, mode, t.restore_best, t.min_delta, write=main)
    callbacks: list[Any] = [EpochPrinter(), checkpoint, HistoryLogger(run_dir)] if main else [checkpoint]
    stopper = EarlyStopping(monitor, mode, t.patience, t.min_delta) if t.patience > 0 else None
    if stopper:
        callbacks.insert(1 if main else 0, stopper)  # before the checkpoint, which saves its state
    callbacks += extra_callbacks

    criterion = torch.nn.CrossEntropyLoss(weight=data.class_weights(), label_smoothing=t.label_smoothing)
    trainer = Trainer(model, plan, optimizer, data, cfg, source.classes, pre, callbacks, device, data.generator,
                      criterion, data.env)
    start_epoch = trainer.restore(ckpt) if ckpt is not None else 0
    log.info("run directory: %s", run_dir)
    log.info("strategy %s: %s trainable of %s parameters at start", cfg.strategy.name,
             f"{_count_phase(model, plan, 0):,}", f"{sum(p.numel() for p in model.parameters()):,}")
    state = trainer.fit(start_epoch)

    # The model now holds the best epoch's weights (restore_best) or the last ones: report those.
    best_epoch = checkpoint.tracker.best_epoch + 1
    held = best_epoch if t.restore_best and best_epoch > 0 else len(state.history)
    row = state.history[held - 1] if state.history else {}
    final = {k: float(v) for k, v in row.items() if k not in ("epoch", "phase", "lr", "seconds", "train_loss")}
    if main:
        write_json(run_dir / "metrics.json", {**final, "epoch": held, "best_epoch": best_epoch,
                                              "epochs_run": len(state.history)})
        write_json(run_dir / "environment.json", {**environment(cfg, str(device)), "world_size": data.env.world_size})
    return FitResult(
        run_dir=str(run_dir), classes=source.classes, metrics=final, history=state.history,
        best_epoch=best_epoch, stopped_early=bool(stopper and stopper.stopped_epoch is not None),
        seconds=time.perf_counter() - started,
        trainable_params=max(_count_phase(model, plan, i) for i in range(len(plan.phases))),
        valid_probs=_held_probs(checkpoint, trainer, t.restore_best), model=model, data=source,
    )


def _held_probs(checkpoint: Any, trainer: Any, restore_best: bool) -> np.ndarray | None:
    out = checkpoint.best_eval if restore_best and checkpoint.best_eval is not None else trainer.state.last_eval
    return None if out is None else out.probs


def prepare_run(cfg: RunConfig, source: DataSource, resuming: bool = False) -> tuple[Any, ...]:
    """Model, preprocessing, plan, optimizer, per-phase data and device for `cfg` on `source`
    (`data.cfg` is `cfg` with `batch_size="auto"` resolved)."""
    import torch

    from visiontune import distributed
    from visiontune.models import create_classifier
    from visiontune.rundata import RunData
    from visiontune.strategy import build_optimizer, make_plan
    from visiontune.trainer import prepare_model, resolve_device, resolve_precision, seed_everything

    env = distributed.from_env()
    device = distributed.device_for(env, resolve_device(cfg.train.device))
    distributed.init(env, device)
    seed_everything(cfg.seed)  # the same initial weights in every process
    model_cfg = replace(cfg.model, weights="none") if resuming else cfg.model  # weights come from the checkpoint
    model, pre = create_classifier(model_cfg, len(source.classes), source.classes)
    prepare_model(model, device, cfg.train.channels_last)
    if cfg.train.batch_size == "auto":
        from visiontune.batchsize import auto_batch_size

        found = auto_batch_size(model, pre.input_size, len(source.split(TRAIN)), device, cfg.train.channels_last,
                                resolve_precision(cfg.train.precision, device))
        if env.launched:  # each process takes batch_size / world_size images
            found *= env.world_size
        cfg = RunConfig.create(cfg, batch_size=found)
    plan = make_plan(model, cfg.strategy, cfg.train)
    optimizer = build_optimizer(model, plan, cfg.train)
    data = RunData(cfg, source, model, pre, plan, device, torch.Generator(), env)
    return model, pre, plan, optimizer, data, device


IMBALANCE_WARN_RATIO = 3.0


def resolve_monitor(monitor: str, source: DataSource) -> str:
    """'auto': val_loss, or macro_f1 when the training classes are imbalanced (largest /
    smallest > 3), where accuracy and loss reward ignoring the small classes."""
    if monitor != "auto":
        return monitor
    ratio = source.imbalance_ratio()
    if ratio > IMBALANCE_WARN_RATIO:
        log.warning("classes are imbalanced (largest/smallest = %.1f): accuracy is misleading; "
                    "early stopping monitors macro_f1 (set --monitor to override; --balance weights|oversample "
                    "to rebalance)", ratio)
        return "macro_f1"
    return "val_loss"


def _count_phase(model: Any, plan: Any, index: int = 0) -> int:
    params = dict(model.named_parameters())
    phase = plan.phases[index]
    return sum(params[n].numel() for gi, g in enumerate(plan.groups) if phase.trainable[gi] for n in g.param_names)


def _check_same_classes(run_dir: Path, classes: list[str]) -> None:
    import json

    saved = json.loads((run_dir / "classes.json").read_text())
    if saved != classes:
        raise DataError(f"the data now has classes {classes} but the run to resume has {saved}")


def _new_run_dir(cfg: RunConfig) -> Path:
    parent = Path(cfg.output)
    if cfg.name:
        name = cfg.name
    else:
        arch = cfg.model.backbone.split(":")[-1]
        name = f"{time.strftime('%Y%m%d-%H%M%S')}-{arch}-{cfg.strategy.name}"
    run_dir = parent / name
    suffix = 1
    while (run_dir / "config.yaml").exists():
        suffix += 1
        run_dir = parent / f"{name}-{suffix}"
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def _write_run_files(run_dir: Path, cfg: RunConfig, source: DataSource, pre: Any, device: Any) -> None:
    from visiontune.bundle import environment, write_config, write_csv, write_json, write_text

    write_config(run_dir, cfg)
    write_json(run_dir / "classes.json", source.classes)
    write_json(run_dir / "preprocess.json", pre.to_dict())
    write_json(run_dir / "environment.json", environment(cfg, str(device)))
    write_csv(run_dir / "splits.csv", ["path", "label", "split"], ((it.path, it.label, it.split) for it in source.items))
    excluded = [f"{p}\t{why}" for p, why in source.excluded] + [f"{p}\thidden" for p in source.hidden]
    write_text(run_dir / "excluded.txt", "".join(line + "\n" for line in excluded))


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

    def format(self) -> str:
        from visiontune.metrics import format_report

        head = "  ".join(f"{k} {v:.4f}" for k, v in self.metrics.items())
        return f"{head}\nimages: {len(self.paths)}\n\n" + format_report(self.report, self.confusion, self.classes)


def evaluate(run: str | os.PathLike[str], data: str | os.PathLike[str], *, batch_size: int = 64,
             device: str = "auto", num_workers: int | None = None, progress: bool = False) -> EvalResult:
    """Score a trained run on a labelled folder (class subfolders; a dataset root with a
    test/ or valid/ folder uses that split)."""
    from visiontune.bundle import load_bundle
    from visiontune.config import DataConfig
    from visiontune.loaders import eval_dataset, make_loader
    from visiontune.metrics import classification_metrics, confusion, per_class_report
    from visiontune.trainer import resolve_device, run_eval

    dev = resolve_device(device)
    bundle = load_bundle(run, dev)
    # each file is decoded once: undecodable ones are marked while reading, not checked first
    source = load_items(DataConfig(path=str(data), valid_pct=0.0, verify_images=False), min_classes=1)
    split = TEST if source.split(TEST) else VALID if source.split(VALID) else TRAIN
    items = source.split(split)
    known = {c: i for i, c in enumerate(bundle.classes)}
    unknown = sorted({it.label for it in items} - set(known))
    if unknown:
        raise DataError(f"{str(data)!r} has classes {unknown} that the model does not know; it knows {bundle.classes}")
    ds = eval_dataset([it.path for it in items], [known[it.label] for it in items], bundle.preprocess,
                      mark_unreadable=True)
    out = run_eval(bundle.model, make_loader(ds, batch_size, num_workers, dev), dev, progress)
    paths, unreadable = _drop_unreadable_rows(ds.paths, out)  # run_eval's loss already leaves them out
    excluded = source.excluded + unreadable
    n = len(bundle.classes)
    metrics = {"accuracy": float("nan"), "macro_f1": float("nan")}
    metrics.update(classification_metrics(out.targets, out.preds, n))
    metrics["loss"] = out.loss
    return EvalResult(metrics, per_class_report(out.targets, out.preds, bundle.classes),
                      confusion(out.targets, out.preds, n), bundle.classes, paths, out.targets, out.probs, excluded)


# -- predict ----------------------------------------------------------------------------
@dataclass
class Prediction:
    path: str
    label: str
    prob: float
    top_k: list[tuple[str, float]]


def predict(run: str | os.PathLike[str], inputs: list[str | os.PathLike[str]] | str | os.PathLike[str], *,
            top_k: int = 3, batch_size: int = 64, device: str = "auto", num_workers: int | None = None,
            ) -> tuple[list[Prediction], list[tuple[str, str]]]:
    """Classify image files and folders (searched recursively) with a run directory, its
    model.safetensors, or an exported .onnx / .ts file. Returns the predictions and the
    (path, reason) of inputs that were skipped (hidden, not images, unreadable)."""
    import torch

    from visiontune.bundle import load_bundle
    from visiontune.loaders import eval_dataset, make_loader
    from visiontune.trainer import resolve_device, run_eval

    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    paths, skipped = collect_images([str(p) for p in inputs])
    if str(run).endswith((".onnx", ".ts")):
        from visiontune.export import load_exported

        dev, bundle, channels_last = resolve_device("cpu"), load_exported(run), False
    else:
        dev = resolve_device(device)
        bundle, channels_last = load_bundle(run, dev), True
    if not paths:
        return [], skipped
    ds = eval_dataset(paths, None, bundle.preprocess, mark_unreadable=True)  # each file decoded once
    out = run_eval(bundle.model, make_loader(ds, batch_size, num_workers, dev), dev, channels_last=channels_last)
    paths, unreadable = _drop_unreadable_rows(paths, out)
    skipped += unreadable
    k = max(1, min(top_k, len(bundle.classes)))
    values, indices = torch.from_numpy(out.probs).topk(k, dim=1)
    preds = []
    for path, vals, idxs in zip(paths, values.tolist(), indices.tolist()):
        ranked = [(bundle.classes[i], float(v)) for v, i in zip(vals, idxs)]
        preds.append(Prediction(path, ranked[0][0], ranked[0][1], ranked))
    return preds, skipped


def _drop_unreadable_rows(paths: list[str], out: Any) -> tuple[list[str], list[tuple[str, str]]]:
    """Leave the files ImageDataset marked UNREADABLE out of `out` (in place) and `paths`;
    return the kept paths and (path, reason) of the others."""
    from visiontune.images import check_image
    from visiontune.loaders import UNREADABLE

    bad = out.targets == UNREADABLE
    if not bad.any():
        return paths, []
    out.targets, out.probs = out.targets[~bad], out.probs[~bad]
    return ([p for p, b in zip(paths, bad) if not b],
            [(p, check_image(p) or "cannot decode") for p, b in zip(paths, bad) if b])


def collect_images(inputs: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Image files among `inputs` (folders searched recursively, as `train` scans them, by
    name: decoding is left to the reader, which reports files that fail); (path, reason)
    for everything skipped."""
    from visiontune.data import walk_images

    found: list[str] = []
    skipped: list[tuple[str, str]] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            scan = DataSource(root=item, classes=[], items=[])
            found += walk_images(scan, p)
            skipped += [(h, "hidden") for h in scan.hidden] + scan.excluded
        elif p.is_file():
            found.append(str(p))
        else:
            skipped.append((item, "no such file or folder"))
    return found, skipped


# -- inspect ----------------------------------------------------------------------------
def inspect(target: str, *, strategy: str = "gradual", num_classes: int = 2, depth: int = 2,
            weights: str = "none", parameters: bool = False, **overrides: Any) -> str:
    """Text view of a model: module tree with parameter counts, layer groups and which of
    them train in each phase of `strategy`, and every optimizer group's learning rate;
    with `parameters=True` also every named parameter and what `state_dict()` holds.

    `target` is a backbone name (built with `weights`, random by default: the structure
    does not depend on them) or a run directory.
    """
    from visiontune.inspection import describe
    from visiontune.models import create_classifier

    if Path(target).is_dir() or target.endswith(".safetensors"):
        from visiontune.bundle import load_bundle

        bundle = load_bundle(target)
        base = bundle.config or RunConfig()
        cfg = RunConfig.create(base, strategy=strategy if "strategy" not in overrides else overrides.pop("strategy"),
                               **overrides)
        model = bundle.model
    else:
        cfg = RunConfig.create(None, backbone=target, weights=weights, strategy=strategy, **overrides)
        model, _ = create_classifier(cfg.model, num_classes)
    return describe(model, cfg, depth, parameters)

