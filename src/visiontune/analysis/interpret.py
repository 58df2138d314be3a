"""`visiontune interpret RUN [DATA]`: look at the model and the data.

Writes into `<run>/interpret/`: confusion matrix (counts + normalised, PNG + CSV), per-class
report, most-confused pairs, top losses (grid + CSV), suspected mislabels over the whole
dataset (grid + CSV), exact / near duplicates with leakage across splits, Grad-CAM on the
top losses, first-layer filters, training curves, and a self-contained `report.html`.
Each artefact is one function below; `interpret` calls them in order.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from visiontune import display
from visiontune.analysis.duplicates import DuplicatePair, find_duplicates
from visiontune.analysis.mislabels import (
    Suspect,
    flag_method,
    rank_mislabels,
    rank_outliers,
    rank_residuals,
)
from visiontune.analysis.report import write_report
from visiontune.analysis.saliency import first_layer_filters, grad_cam
from visiontune.bundle import Bundle, load_bundle
from visiontune.config import DataConfig, RunConfig
from visiontune.data.images import check_image, load_rgb
from visiontune.data.items import TEST, TRAIN, VALID
from visiontune.data.loaders import eval_dataset, make_loader
from visiontune.data.sources import load_items
from visiontune.data.transforms import eval_side, eval_transform
from visiontune.errors import DataError, VisiontuneError
from visiontune.files import read_csv, read_csv_dicts, write_csv, write_json
from visiontune.frozen.features import FeatureExtractor, cache_for
from visiontune.frozen.probe import oof_outputs
from visiontune.plots import save_confusion, save_curves, save_filters, save_grid, save_residuals
from visiontune.rundir import RunDir, Views
from visiontune.runtime.device import resolve_device
from visiontune.runtime.inference import EvalOutput, run_eval
from visiontune.tasks.base import Decoded, Report
from visiontune.tasks.labels import Label
from visiontune.train.tracking import log_artifact_to_run

log = logging.getLogger(__name__)

Items = list[tuple[str, Label, str]]  # (path, label, split)


@dataclass
class InterpretResult:
    out_dir: str
    files: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    suspects: list[Suspect] = field(default_factory=list)
    outliers: list[tuple[str, float]] = field(default_factory=list)  # (path, atypicality), most odd first
    duplicates: list[DuplicatePair] = field(default_factory=list)
    leaks: int = 0
    mislabel_method: str = ""
    evaluated_on: str = ""  # which images the metrics are of (the training images, said so, when no others)

    def format(self) -> str:
        flagged = sum(s.flagged for s in self.suspects)
        exact = sum(d.kind == "exact" for d in self.duplicates)
        return "\n".join([
            f"{self.evaluated_on}: " + "  ".join(f"{k} {v:.4f}" for k, v in self.metrics.items()),
            f"suspected mislabels: {flagged} flagged of {len(self.suspects)} ranked ({self.mislabel_method})",
            "most atypical images: " + ", ".join(f"{Path(p).name} ({s:.2f})" for p, s in self.outliers[:3]),
            f"duplicates: {len(self.duplicates)} pairs ({exact} exact, {len(self.duplicates) - exact} near); "
            f"{self.leaks} across splits (leakage)",
            f"artefacts in {self.out_dir}: " + ", ".join(sorted(self.files)),
        ])

    def _repr_html_(self) -> str:
        """The summary, then every figure inline (Jupyter)."""
        figures = "".join(display.image(path, title=name.removesuffix(".png").replace("_", " "))
                          for name, path in sorted(self.figures().items()))
        return display.metrics_table(self.metrics, "interpretation") + display.pre(self.format()) + figures

    def figures(self) -> dict[str, str]:
        """name -> path of every figure written (confusion, top losses, Grad-CAM, curves...)."""
        return {name: path for name, path in self.files.items() if name.endswith(".png")}


@dataclass
class Context:
    """What every artefact function needs: the run, its model, where to write, whether the
    long passes (the model's outputs, the features) show a progress bar."""

    run: Path
    bundle: Bundle
    device: Any
    out: Path
    items: Items
    progress: bool = False

    @property
    def views(self) -> Views:
        """The files interpret writes into `out` (RUN/interpret/)."""
        return Views(self.out)


def interpret(run: str | os.PathLike[str], data: str | os.PathLike[str] | None = None, *, top_n: int = 16,
              oof: str | os.PathLike[str] | None = None, device: str = "auto", batch_size: int = 64,
              num_workers: int | None = None, saliency: list[str] | None = None,
              mislabels_in_test: bool = False, output: str | os.PathLike[str] | None = None,
              progress: bool = False) -> InterpretResult:
    """Write every view into `<run>/interpret/` (or the folder `output`); `saliency` lists extra images to explain
    with Grad-CAM (`gradcam_chosen.png`). Suspected mislabels are looked for among the
    images training could use (train + valid), and in test too with `mislabels_in_test`."""
    ctx = _context(Path(run), data, device, output, progress)
    if oof:
        _check_oof(oof, ctx.bundle.task)  # before the work, not after it
    for image in saliency or []:
        if (why := check_image(image)) is not None:
            raise DataError(f"--saliency {image}: {why}; give image files to explain")
    write_json(ctx.views.source, {"data": data_key(data), "folder": os.getcwd()})  # what review reads the views by
    res = InterpretResult(str(ctx.out))
    paths, out, res.evaluated_on = evaluate_split(ctx, batch_size, num_workers)
    res.metrics = ctx.bundle.task.metrics(out.targets, out.probs)
    report = ctx.bundle.task.report(out.targets, out.probs)
    write_confusion(ctx, report, out)
    order = write_top_losses(ctx, paths, out, top_n)
    write_saliency(ctx.views.gradcam, ctx, [paths[i] for i in order[:8]])
    if saliency:
        write_saliency(ctx.views.gradcam_chosen, ctx, [str(p) for p in saliency])
    feats = _features(ctx)
    res.outliers = write_outliers(ctx, feats)
    res.suspects = write_mislabels(ctx, feats, oof, mislabels_in_test)
    res.mislabel_method = flag_method()
    res.duplicates, res.leaks = write_duplicates(ctx)
    write_curves(ctx)
    write_report(ctx.views.report, ctx.run, res, ctx.items, ctx.bundle.task, report.rows, report.confused)
    log_artifact_to_run(ctx.run, ctx.views.report)  # a run tracked with MLflow gets the report
    res.files = {p.name: str(p) for p in sorted(ctx.out.iterdir()) if p.is_file()}
    return res


def data_key(data: str | os.PathLike[str] | None) -> str | None:
    """The data interpret looked at, as RUN/interpret/source.json records it (Views.source) (None: the run's own images)."""
    return os.path.realpath(data) if data else None


def _context(run: Path, data: str | os.PathLike[str] | None, device: str,
             output: str | os.PathLike[str] | None = None, progress: bool = False) -> Context:
    dev = resolve_device(device)
    bundle = load_bundle(run, dev)
    items = items_of(run, str(data) if data else None, bundle)
    out = Path(output) if output else RunDir(run).views.path
    out.mkdir(parents=True, exist_ok=True)
    return Context(run, bundle, dev, out, [it for it in items if not bundle.task.unknown_labels([it[1]])], progress)


def items_of(run: Path, data: str | None, bundle: Bundle) -> Items:
    """(path, label, split) of the run's own images (splits.csv), or of `data`, in the
    run's task shape."""
    cfg = bundle.config or RunConfig()
    delim = cfg.data.label_delim
    if data is None:
        return RunDir(run).splits(bundle.task, delim)
    source = load_items(DataConfig(path=str(data), valid_pct=cfg.data.valid_pct, task=bundle.task.name,
                                   label_delim=delim), cfg.seed, min_classes=1)
    return [(it.path, it.label, it.split) for it in source.items]


SPLIT_NAMES = {VALID: "on the validation images", TEST: "on the test images",
               TRAIN: "on the training images (no validation or test images: optimistic, the model trained on them)"}


def evaluate_split(ctx: Context, batch_size: int, num_workers: int | None) -> tuple[list[str], EvalOutput, str]:
    """The model's outputs on the validation split (else test, else train), and which."""
    splits = {s for _, _, s in ctx.items}
    split = VALID if VALID in splits else TEST if TEST in splits else TRAIN
    chosen = [it for it in ctx.items if it[2] == split]
    task = ctx.bundle.task
    paths = [p for p, _, _ in chosen]
    ds = eval_dataset(paths, task.encode([lb for _, lb, _ in chosen]), ctx.bundle.preprocess)
    out = run_eval(ctx.bundle.model, make_loader(ds, batch_size, num_workers, ctx.device), ctx.device, task,
                   ctx.progress)
    out.require_all(len(paths), paths)
    return paths, out, SPLIT_NAMES[split]


def write_confusion(ctx: Context, report: Report, out: EvalOutput) -> None:
    """confusion.png/.csv (+ confusion_normalized.csv for classes x classes), per_class.csv,
    most_confused.csv. Multi-label: one row of TP/FP/FN/TN per label. A task without a
    confusion matrix (regression): residuals.png (predicted vs true, residual by target)
    and per_class.csv with the task's rows (residuals by target range)."""
    classes, matrix = ctx.bundle.classes, report.confusion
    if matrix is None:
        save_residuals(ctx.views.residuals, out.targets, out.probs, classes[0])
        write_csv(ctx.views.per_class, list(report.rows[0]) if report.rows else [],
                  [list(r.values()) for r in report.rows])
        return
    columns = list(report.columns) if report.columns else None
    save_confusion(ctx.views.confusion, matrix, classes, columns)
    header = ["actual \\ predicted" if columns is None else "label", *(columns or classes)]
    write_csv(ctx.views.confusion_csv, header, [[c, *row.tolist()] for c, row in zip(classes, matrix)])
    if columns is None:
        norm = matrix / np.maximum(1, matrix.sum(1, keepdims=True))
        write_csv(ctx.views.confusion_normalized, header,
                  [[c, *[f"{v:.4f}" for v in row]] for c, row in zip(classes, norm)])
    write_csv(ctx.views.per_class, list(report.rows[0]), [list(r.values()) for r in report.rows])
    write_csv(ctx.views.most_confused, ["actual", "predicted", "count"],
              [[a, p, c] for c, a, p in report.confused])


def write_top_losses(ctx: Context, paths: list[str], out: EvalOutput, top_n: int) -> np.ndarray:
    """top_losses.csv/.png: the `top_n` images the model gets most wrong (`suggested`: the
    model's label for each, as a table cell); returns their rows."""
    task = ctx.bundle.task
    losses = task.sample_losses(out.targets, out.probs)
    order = np.argsort(-losses)[:top_n]
    shown = [(paths[i], *task.describe(out.targets[i], out.probs[i]), losses[i], float(out.probs[i].max()))
             for i in order]
    delim = _delim(ctx)
    suggested = [task.label_text(task.label_of(task.decode(out.probs[i:i + 1], 1)[0]), delim) for i in order]
    write_csv(ctx.views.top_losses, ["path", "actual", "predicted", "loss", "prob_predicted", "suggested"],
              [[p, actual, pred, f"{loss:.4f}", f"{prob:.4f}", label]
               for (p, pred, actual, loss, prob), label in zip(shown, suggested)])
    _grid(ctx.views.top_losses_png, [s[0] for s in shown],
          [f"{pred}/{actual} loss {loss:.2f} p {prob:.2f}" for _, pred, actual, loss, prob in shown],
          ctx.bundle.preprocess.input_size)
    return order


def write_saliency(target: Path, ctx: Context, paths: list[str]) -> None:
    """filters.png and a Grad-CAM grid of `paths` at `target` (skipped with a warning for
    backbones without a spatial feature map)."""
    try:
        save_filters(ctx.views.filters, first_layer_filters(ctx.bundle.model))
        images, heats, titles = [], [], []
        for p in paths:
            for shown, heat, title in explain(ctx.bundle, ctx.device, p):
                images.append(shown)
                heats.append(heat)
                titles.append(title)
        if images:
            save_grid(target, images, titles, overlays=heats)
    except VisiontuneError as exc:
        log.warning("saliency skipped: %s", exc)


def explain(bundle: Bundle, device: torch.device, path: str) -> list[tuple[np.ndarray, np.ndarray, str]]:
    """(the image as the model sees it, its Grad-CAM heat map, title) for each output the
    model predicts for the image at `path` (label sets: up to 3); VisiontuneError for a
    backbone without a spatial feature map."""
    tf, side, size = eval_transform(bundle.preprocess), eval_side(bundle.preprocess), bundle.preprocess.input_size
    image = load_rgb(path, side)
    x = tf(image).unsqueeze(0).to(device)
    shown = np.asarray(image.resize((size, size), Image.BILINEAR))
    return [(shown, grad_cam(bundle.model, x, bundle.task.index[name])[0], f"Grad-CAM: {name}")
            for name in bundle.task.explained(_decoded(bundle, x))]


def _decoded(bundle: Bundle, x: torch.Tensor) -> Decoded:
    """The task's decoding of the model's prediction for the one image `x`."""
    with torch.inference_mode():
        probs = bundle.task.probabilities(bundle.model.eval()(x)).float().cpu().numpy()
    return bundle.task.decode(probs, 1)[0]


def _features(ctx: Context) -> np.ndarray:
    """Frozen backbone features of every item (from the feature cache when present)."""
    cfg = ctx.bundle.config
    backbone = cfg.model.backbone if cfg else "model"
    cache_dir = cfg.runtime.cache_dir if cfg else None
    cache = cache_for(backbone, ctx.bundle.model.backbone, ctx.bundle.preprocess, cache_dir)
    extractor = FeatureExtractor(ctx.bundle.model.backbone, ctx.bundle.preprocess, ctx.device, cache,
                                 engine=cfg.runtime.engine if cfg else "auto", cache_dir=cache_dir,
                                 progress=ctx.progress)
    return extractor.features([p for p, _, _ in ctx.items])


def write_outliers(ctx: Context, feats: np.ndarray) -> list[tuple[str, float]]:
    """outliers.csv/.png: every image by atypicality in feature space, most odd first; with
    the model's OOD score (models/novelty.py) when it has one, and `unknown` for the images
    outside the training split past its threshold (unusual images in the user's own data:
    review lists them first among the outliers)."""
    odd = rank_outliers(feats)
    order = np.argsort(-odd)
    items = ctx.items
    text = ctx.bundle.task.label_text
    ood, unknown = _ood_scores(ctx, feats)
    write_csv(ctx.views.outliers, ["rank", "path", "label", "atypicality", "ood_score", "unknown"],
              [[k + 1, items[i][0], text(items[i][1], _delim(ctx)), f"{odd[i]:.4f}",
                "" if ood is None else f"{ood[i]:.4f}", "" if ood is None else str(bool(unknown[i])).lower()]
               for k, i in enumerate(order)])
    _grid(ctx.views.outliers_png, [items[i][0] for i in order[:8]],
          [f"{items[i][1]} atypicality {odd[i]:.2f}" for i in order[:8]], ctx.bundle.preprocess.input_size)
    return [(items[i][0], float(odd[i])) for i in order]


def _ood_scores(ctx: Context, feats: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
    """Each image's OOD score from its features, and whether it is past the run's threshold
    (training images never are: they are what the bank was drawn from); (None, all False)
    for a model without a bank."""
    novelty, fitted = getattr(ctx.bundle.model, "novelty", None), (ctx.bundle.uncertainty or {}).get("ood")
    if novelty is None or not fitted or not len(feats):
        return None, np.zeros(len(feats), dtype=bool)
    with torch.inference_mode():
        x = torch.as_tensor(np.asarray(feats, dtype=np.float32)).to(novelty.bank.device)
        scores = novelty(x, ctx.bundle.model.outputs(x)).cpu().numpy()
    outside_train = np.array([split != TRAIN for _, _, split in ctx.items])
    return scores, outside_train & (scores > fitted["threshold"])


def _check_oof(oof: str | os.PathLike[str], task: Any) -> None:
    """DataError unless `oof` is a CSV with the columns of cv's oof.csv for this task."""
    if not os.path.isfile(oof):
        raise DataError(f"--oof {oof}: no such file (it is the oof.csv that `visiontune cv DATA` writes into its "
                        "folder, cv's out-of-fold probabilities)")
    rows = read_csv(oof)
    missing = [c for c in ("path", "label", *task.output.oof_columns()) if c not in (rows[0] if rows else [])]
    if missing:
        raise DataError(f"--oof {oof}: no column {', '.join(missing)}; give the oof.csv of `visiontune cv` on this "
                        "run's data and classes (path, label, fold, predicted, one probability per class)")


def write_mislabels(ctx: Context, feats: np.ndarray, oof: str | os.PathLike[str] | None,
                    include_test: bool = False) -> list[Suspect]:
    """mislabels.csv/.png: images ranked by out-of-fold self-confidence (from `oof`, else a
    cross-validated probe on `feats`), among train + valid (+ test with `include_test`)."""
    classes, task = ctx.bundle.classes, ctx.bundle.task
    cfg = ctx.bundle.config or RunConfig()
    if oof:
        rows = read_csv_dicts(oof)
        paths = [r["path"] for r in rows]
        labels: list[Label] = [task.parse_label(r["label"], cfg.data.label_delim, str(oof)) for r in rows]
        probs = np.array([[float(r[column]) for column in task.output.oof_columns()] for r in rows])
    else:  # out of fold from the converged probe (bench/mislabels.py: more precise than a fixed-C probe)
        keep = [i for i, (_, _, split) in enumerate(ctx.items) if include_test or split != TEST]
        paths, labels = [ctx.items[i][0] for i in keep], [ctx.items[i][1] for i in keep]
        probs, _ = oof_outputs(feats[keep], task.encode(labels).numpy(), task, cfg.seed)
    if task.confusable:
        suspects = rank_mislabels(paths, labels, probs, classes)
    else:  # numbers have no classes to confuse: suspicious targets by out-of-fold residuals
        suspects = rank_residuals(paths, task.encode(labels).numpy(), probs, task)
    write_csv(ctx.views.mislabels,
              ["rank", "path", "label", "suspected", "p_label", "p_suspected", "flagged", "suggested"],
              [[k + 1, s.path, s.label, s.predicted, f"{s.p_label:.4f}", f"{s.p_predicted:.4f}", s.flagged,
                task.label_text(s.suggested, cfg.data.label_delim)] for k, s in enumerate(suspects)])
    top = suspects[:16]
    _grid(ctx.views.mislabels_png, [s.path for s in top],
          [f"label {s.label} p {s.p_label:.2f} -> {s.predicted}?" for s in top], ctx.bundle.preprocess.input_size)
    return suspects


def _delim(ctx: Context) -> str:
    return ctx.bundle.config.data.label_delim if ctx.bundle.config else " "


def write_duplicates(ctx: Context) -> tuple[list[DuplicatePair], int]:
    """duplicates.csv: exact and near duplicates; pairs across splits are leakage."""
    pairs = find_duplicates([(p, s) for p, _, s in ctx.items])
    write_csv(ctx.views.duplicates, ["a", "b", "split_a", "split_b", "kind", "hamming", "crosses_splits"],
              [[d.a, d.b, d.split_a, d.split_b, d.kind, d.distance, d.crosses_splits] for d in pairs])
    leaks = sum(d.crosses_splits for d in pairs)
    if leaks:
        log.warning("LEAKAGE: %d duplicate pairs cross train/valid/test splits (see duplicates.csv); "
                    "validation scores are optimistic until they are removed", leaks)
    return pairs, leaks


def write_curves(ctx: Context) -> None:
    """curves.png from the run's history.jsonl, when it has one."""
    history = RunDir(ctx.run).read_history()
    if history:
        save_curves(ctx.views.curves, history)


def _thumb(path: str, size: int) -> np.ndarray:
    im = load_rgb(path)
    im.thumbnail((size, size))
    return np.asarray(im)


def _grid(path: Path, paths: list[str], titles: list[str], size: int) -> None:
    save_grid(path, [_thumb(p, max(96, size)) for p in paths], titles)
