"""`visiontune interpret RUN [DATA]`: look at the model and the data.

Writes into `<run>/interpret/`: confusion matrix (counts + normalised, PNG + CSV), per-class
report, most-confused pairs, top losses (grid + CSV), suspected mislabels over the whole
dataset (grid + CSV), exact / near duplicates with leakage across splits, Grad-CAM on the
top losses, first-layer filters, training curves, and a self-contained `report.html`.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from visiontune.bundle import write_csv
from visiontune.data import TEST, TRAIN, VALID

log = logging.getLogger(__name__)


@dataclass
class InterpretResult:
    out_dir: str
    files: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    suspects: list[Any] = field(default_factory=list)
    outliers: list[tuple[str, float]] = field(default_factory=list)  # (path, atypicality), most odd first
    duplicates: list[Any] = field(default_factory=list)
    leaks: int = 0

    def format(self) -> str:
        flagged = sum(s.flagged for s in self.suspects)
        exact = sum(d.kind == "exact" for d in self.duplicates)
        return "\n".join([
            "  ".join(f"{k} {v:.4f}" for k, v in self.metrics.items()),
            f"suspected mislabels: {flagged} flagged (confident learning) of {len(self.suspects)} ranked",
            "most atypical images: " + ", ".join(f"{Path(p).name} ({s:.2f})" for p, s in self.outliers[:3]),
            f"duplicates: {len(self.duplicates)} pairs ({exact} exact, {len(self.duplicates) - exact} near); "
            f"{self.leaks} across splits (leakage)",
            f"artefacts in {self.out_dir}: " + ", ".join(sorted(self.files)),
        ])


def _items(run: Path, data: str | None, seed: int, valid_pct: float) -> list[tuple[str, str, str]]:
    if data is None:
        with open(run / "splits.csv", newline="") as fh:
            return [(r["path"], r["label"], r["split"]) for r in csv.DictReader(fh)]
    from visiontune.config import DataConfig
    from visiontune.data import load_items

    source = load_items(DataConfig(path=str(data), valid_pct=valid_pct), seed, min_classes=1)
    return [(it.path, it.label, it.split) for it in source.items]


def interpret(run: str | os.PathLike[str], data: str | os.PathLike[str] | None = None, *, top_n: int = 16,
              oof: str | os.PathLike[str] | None = None, device: str = "auto", batch_size: int = 64,
              num_workers: int | None = None, saliency: list[str] | None = None) -> InterpretResult:
    """Write every view into `<run>/interpret/`; `saliency` lists extra images to explain
    with Grad-CAM (`gradcam_chosen.png`)."""
    from visiontune.bundle import load_bundle
    from visiontune.duplicates import find_duplicates
    from visiontune.loaders import eval_dataset, make_loader
    from visiontune.metrics import classification_metrics, confusion, per_class_report
    from visiontune.plots import save_confusion, save_curves
    from visiontune.trainer import resolve_device, run_eval

    run = Path(run)
    dev = resolve_device(device)
    bundle = load_bundle(run, dev)
    cfg = bundle.config
    items = _items(run, str(data) if data else None, cfg.seed if cfg else 0, cfg.data.valid_pct if cfg else 0.2)
    known = {c: i for i, c in enumerate(bundle.classes)}
    items = [it for it in items if it[1] in known]
    out = run / "interpret"
    out.mkdir(parents=True, exist_ok=True)
    res = InterpretResult(str(out))
    classes = bundle.classes

    split = VALID if any(s == VALID for _, _, s in items) else TEST if any(s == TEST for _, _, s in items) else TRAIN
    evald = [it for it in items if it[2] == split]
    ds = eval_dataset([p for p, _, _ in evald], [known[lb] for _, lb, _ in evald], bundle.preprocess)
    ev = run_eval(bundle.model, make_loader(ds, batch_size, num_workers, dev), dev)
    n = len(classes)
    res.metrics = classification_metrics(ev.targets, ev.preds, n)
    matrix = confusion(ev.targets, ev.preds, n)
    save_confusion(out / "confusion.png", matrix, classes)
    write_csv(out / "confusion.csv", ["actual \\ predicted", *classes], [[c, *row.tolist()] for c, row in zip(classes, matrix)])
    norm = matrix / np.maximum(1, matrix.sum(1, keepdims=True))
    write_csv(out / "confusion_normalized.csv", ["actual \\ predicted", *classes],
               [[c, *[f"{v:.4f}" for v in row]] for c, row in zip(classes, norm)])
    report = per_class_report(ev.targets, ev.preds, classes)
    write_csv(out / "per_class.csv", list(report[0]), [list(r.values()) for r in report])
    pairs = sorted(((int(matrix[i, j]), classes[i], classes[j]) for i in range(n) for j in range(n)
                    if i != j and matrix[i, j] > 0), reverse=True)
    write_csv(out / "most_confused.csv", ["actual", "predicted", "count"], [[a, p, c] for c, a, p in pairs])

    losses = -np.log(np.clip(ev.probs[np.arange(len(ev.targets)), ev.targets], 1e-12, 1.0))
    order = np.argsort(-losses)[:top_n]
    write_csv(out / "top_losses.csv", ["path", "actual", "predicted", "loss", "prob_predicted"],
               [[ds.paths[i], classes[ev.targets[i]], classes[ev.preds[i]], f"{losses[i]:.4f}",
                 f"{ev.probs[i, ev.preds[i]]:.4f}"] for i in order])
    _grid(out / "top_losses.png", [ds.paths[i] for i in order],
          [f"{classes[ev.preds[i]]}/{classes[ev.targets[i]]} loss {losses[i]:.2f} p {ev.probs[i, ev.preds[i]]:.2f}"
           for i in order], bundle.preprocess.input_size)
    _saliency(out / "gradcam.png", bundle, [ds.paths[i] for i in order[:8]], dev)
    if saliency:
        _saliency(out / "gradcam_chosen.png", bundle, [str(p) for p in saliency], dev)

    res.suspects, res.outliers = _mislabels(out, bundle, items, oof, dev, cfg)
    res.duplicates, res.leaks = _duplicates(out, items, find_duplicates)
    history_file = run / "history.jsonl"
    if history_file.is_file():
        history = [json.loads(line) for line in history_file.read_text().splitlines() if line.strip()]
        if history:
            save_curves(out / "curves.png", history)
    from visiontune.report import write_report

    write_report(out / "report.html", run, res, items, classes, report, pairs)
    res.files = {p.name: str(p) for p in sorted(out.iterdir()) if p.is_file()}
    return res


def _thumb(path: str, size: int) -> np.ndarray:
    from visiontune.images import load_rgb

    im = load_rgb(path)
    im.thumbnail((size, size))
    return np.asarray(im)


def _grid(path: Path, paths: list[str], titles: list[str], size: int) -> None:
    from visiontune.plots import save_grid

    save_grid(path, [_thumb(p, max(96, size)) for p in paths], titles)


def _saliency(target: Path, bundle: Any, paths: list[str], dev: Any) -> None:
    from PIL import Image

    from visiontune.errors import VisiontuneError
    from visiontune.images import load_rgb
    from visiontune.plots import save_filters, save_grid
    from visiontune.saliency import first_layer_filters, grad_cam
    from visiontune.transforms import eval_side, eval_transform

    tf, side = eval_transform(bundle.preprocess), eval_side(bundle.preprocess)
    try:
        save_filters(target.parent / "filters.png", first_layer_filters(bundle.model))
        images, heats, titles = [], [], []
        size = bundle.preprocess.input_size
        for p in paths:
            image = load_rgb(p, side)
            heat, cls = grad_cam(bundle.model, tf(image).unsqueeze(0).to(dev))
            shown = np.asarray(image.resize((size, size), Image.BILINEAR))
            images.append(shown)
            heats.append(heat)
            titles.append(f"Grad-CAM: {bundle.classes[cls]}")
        if images:
            save_grid(target, images, titles, overlays=heats)
    except VisiontuneError as exc:
        log.warning("saliency skipped: %s", exc)


def _mislabels(out: Path, bundle: Any, items: list[tuple[str, str, str]], oof: Any, dev: Any,
               cfg: Any) -> tuple[list[Any], list[tuple[str, float]]]:
    from visiontune.features import cache_for, extract_features
    from visiontune.mislabels import oof_probabilities, rank_mislabels, rank_outliers

    classes = bundle.classes
    paths, labels = [p for p, _, _ in items], [lb for _, lb, _ in items]
    backbone = cfg.model.backbone if cfg else "model"
    cache = cache_for(backbone, bundle.model.backbone, bundle.preprocess, cfg.train.cache_dir if cfg else None)
    feats = extract_features(bundle.model.backbone, paths, bundle.preprocess, dev, cache)[0].numpy()
    odd = rank_outliers(feats)
    order = np.argsort(-odd)
    write_csv(out / "outliers.csv", ["rank", "path", "label", "atypicality"],
               [[k + 1, paths[i], labels[i], f"{odd[i]:.4f}"] for k, i in enumerate(order)])
    _grid(out / "outliers.png", [paths[i] for i in order[:8]],
          [f"{labels[i]} atypicality {odd[i]:.2f}" for i in order[:8]], bundle.preprocess.input_size)
    if oof:
        with open(oof, newline="") as fh:
            rows = list(csv.DictReader(fh))
        paths, labels = [r["path"] for r in rows], [r["label"] for r in rows]
        probs = np.array([[float(r[f"prob_{c}"]) for c in classes] for r in rows])
    else:
        probs = oof_probabilities(feats, labels, classes, cfg.seed if cfg else 0)
    suspects = rank_mislabels(paths, labels, probs, classes)
    write_csv(out / "mislabels.csv", ["rank", "path", "label", "suspected", "p_label", "p_suspected", "flagged"],
               [[k + 1, s.path, s.label, s.predicted, f"{s.p_label:.4f}", f"{s.p_predicted:.4f}", s.flagged]
                for k, s in enumerate(suspects)])
    top = suspects[:16]
    _grid(out / "mislabels.png", [s.path for s in top],
          [f"label {s.label} p {s.p_label:.2f} -> {s.predicted}?" for s in top], bundle.preprocess.input_size)
    return suspects, [(items[i][0], float(odd[i])) for i in order]


def _duplicates(out: Path, items: list[tuple[str, str, str]], find: Any) -> tuple[list[Any], int]:
    pairs = find([(p, s) for p, _, s in items])
    write_csv(out / "duplicates.csv", ["a", "b", "split_a", "split_b", "kind", "hamming", "crosses_splits"],
               [[d.a, d.b, d.split_a, d.split_b, d.kind, d.distance, d.crosses_splits] for d in pairs])
    leaks = sum(d.crosses_splits for d in pairs)
    if leaks:
        log.warning("LEAKAGE: %d duplicate pairs cross train/valid/test splits (see duplicates.csv); "
                    "validation scores are optimistic until they are removed", leaks)
    return pairs, leaks
