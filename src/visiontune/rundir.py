"""The run directory's layout: the name of every file a run keeps, and the reading and
writing of each one, in one class (`RunDir`). Every file is written atomically (files.py:
temporary file + fsync + rename), so a crash leaves the previous file or the new one, never
a torn one. A new run artifact is one property or method here; tests/test_architecture.py
checks that no other module spells a run file's name.

    RUN/model.safetensors     best weights; metadata holds backbone, head, classes, preprocess, task
    RUN/config.yaml           the resolved RunConfig
    RUN/classes.json          class names in output order
    RUN/preprocess.json       input size, mean/std, interpolation, crop_pct
    RUN/history.jsonl|.csv    one row per epoch
    RUN/metrics.json          final validation metrics
    RUN/environment.json      versions, machine, seed, the working folder (splits.csv's relative
                              paths are relative to it)
    RUN/splits.csv            every image with its label and split
    RUN/excluded.txt          files left out and why (path TAB reason per line)
    RUN/checkpoints/last.pt   full training state for --resume (tensors only)
    RUN/thresholds.json       --thresholds tuned: the per-label thresholds and where they were chosen
    RUN/calibration.json      the calibration fitted on the validation split: temperature(s), ECE and
                              NLL before and after, the prediction sets' held-out size (train/calibrate.py)
    RUN/reliability.png       the reliability diagram of the validation split, before and after
    RUN/reliability_evaluated.png   the same for the data the last `evaluate` scored
    RUN/warm_start.json       --init-from: what the weights were started from
    RUN/tracking.json         the tracked runs of the trackers that keep one (MLflow, W&B)
    RUN/time_budget.json      --time-budget: the plan, and the time taken
    RUN/clock.json            --time-budget: the seconds used over every session (train/clock.py)
    RUN/pseudo_labels.csv     --unlabeled: every pool image's pseudo-label
    RUN/consistency.csv       --unlabeled in phases that train the backbone: per-epoch counts
    RUN/model.onnx|.pt2|.ts   exports (deploy/export.py), named after the weights file: `RunDir.exported`
    RUN/model.int8.onnx       export --int8 (deploy/quantize.py): `RunDir.int8_of`
    RUN/timm/                 export --format timm, timm's Hub layout (deploy/hub.py)
    RUN/tensorboard/          --tracker tensorboard's event files (train/tracking.py)
    RUN/interpret/            interpret's views (`Views`)
    RUN/review/               review decisions (`Review`; analysis/decisions.py)
    CV/oof.csv, CV/cv_summary.json, COMPARE/compare.md|json: what cv and compare keep

Loading reads `torch.load(weights_only=True)` only, so no file can execute code.
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import save_file

from visiontune.config import ModelConfig, RunConfig, checked_dict
from visiontune.data.items import LISTED_IN_EXCLUDE
from visiontune.data.preprocess import Preprocess
from visiontune.deploy.formats import suffix
from visiontune.errors import ConfigError, VisiontuneError
from visiontune.files import (
    atomic_write,
    claim_dir,
    read_csv,
    read_csv_dicts,
    write_csv,
    write_json,
    write_text,
)
from visiontune.tasks.base import Task

MODEL_FILE = "model.safetensors"
LAST_CHECKPOINT = "checkpoints/last.pt"
CLOCK_FILE = "clock.json"
REVIEW_DIR, VIEWS_DIR = "review", "interpret"
INT8 = ".int8"  # an int8 export's infix: model.onnx -> model.int8.onnx
WORKING_FOLDER = "working_folder"  # environment.json: the folder the run was trained from
FORMAT_VERSION = 1  # of the metadata in model.safetensors


def _file(name: str) -> property:
    """A read-only property: the path of the file `name` in the folder."""
    return property(lambda self: self.path / name, doc=f"FOLDER/{name}")


def run_name(*what: str) -> str:
    """The name a run directory gets without --name: the local time, then `what`
    (`20250101-120000-resnet18-gradual`, `...-cv-gradual`, `...-compare`)."""
    return "-".join([time.strftime("%Y%m%d-%H%M%S"), *what])


def read_config(path: str | os.PathLike[str], strict: bool = False) -> RunConfig:
    """The RunConfig in a YAML file. `strict` (a user's --config): every key must be an
    option (in its section or flat); else keys from newer versions are ignored (a run's
    own config.yaml). A file that cannot be read or is not YAML is a ConfigError naming it."""
    try:
        with open(path, encoding="utf-8") as fh:
            raw = yaml.safe_load(fh) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"config {path}: cannot be read as YAML ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''}); give a config.yaml, e.g. a run's") from None
    return RunConfig.from_dict(checked_dict(raw, str(path)) if strict else raw)


def save_checkpoint(path: str | os.PathLike[str], state: dict[str, Any]) -> None:
    """A training state (tensors and plain containers), written atomically."""
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A checkpoint read with `weights_only=True`: anything but tensors and plain
    containers is refused (VisiontuneError), as is a missing file."""
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise VisiontuneError(f"no checkpoint at {str(path)!r}; nothing to resume") from None
    except Exception as exc:  # noqa: BLE001 - refuse anything that is not plain tensors/containers
        raise VisiontuneError(f"refusing to load {str(path)!r}: {type(exc).__name__}: {exc}") from None


def from_folder(base: str | None, path: str) -> str:
    """A path written relative to the folder `base` (a run's splits.csv: its working
    folder; interpret's views: the folder interpret ran in) as it reads from the current
    folder: a relative one joined to `base` when that is another folder (`suggest --run`,
    `interpret`, `review` from elsewhere), else as written."""
    if base is None or os.path.isabs(path) or os.path.abspath(base) == os.getcwd():
        return path
    return os.path.join(base, path)


def _json_or(path: Path, default: Any) -> Any:
    """The JSON in `path`, or `default` when it does not exist."""
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else default


class Views:
    """RUN/interpret/: what `interpret` writes and `review` and the report read."""

    source = _file("source.json")  # {"data": the DATA looked at (null: the run's own), "folder": where it ran}
    report = _file("report.html")
    curves = _file("curves.png")
    confusion = _file("confusion.png")
    confusion_csv = _file("confusion.csv")
    confusion_normalized = _file("confusion_normalized.csv")
    per_class = _file("per_class.csv")
    most_confused = _file("most_confused.csv")
    residuals = _file("residuals.png")
    top_losses = _file("top_losses.csv")
    top_losses_png = _file("top_losses.png")
    gradcam = _file("gradcam.png")
    gradcam_chosen = _file("gradcam_chosen.png")
    filters = _file("filters.png")
    outliers = _file("outliers.csv")
    outliers_png = _file("outliers.png")
    mislabels = _file("mislabels.csv")
    mislabels_png = _file("mislabels.png")
    duplicates = _file("duplicates.csv")

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)


class Review:
    """RUN/review/: the review decisions (analysis/decisions.py writes and reads them; it
    keys its record of the derived files by these names)."""

    LOG = "decisions.jsonl"  # the append-only decision log: the truth
    CORRECTIONS = "corrections.csv"  # derived from the log: what `train --relabel` reads
    EXCLUDE = "exclude.txt"  # derived: what `train --exclude` reads
    KEPT = "kept.txt"  # derived: the images looked at and kept
    DERIVED = "derived.json"  # {file name: its identity when the derived files were last written}
    log, corrections, exclude, kept, derived = (_file(n) for n in (LOG, CORRECTIONS, EXCLUDE, KEPT, DERIVED))
    gradcam = _file("gradcam")  # the page's Grad-CAMs, by image and weights identity

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)


class RunDir:
    """One run directory (see the module docstring): each file's path, and its reading and
    writing. Readers of a file a run may lack say so (None, {} or [])."""

    model = _file(MODEL_FILE)
    config_file = _file("config.yaml")
    classes_file = _file("classes.json")
    preprocess_file = _file("preprocess.json")
    environment_file = _file("environment.json")
    splits_file = _file("splits.csv")
    excluded_file = _file("excluded.txt")
    metrics_file = _file("metrics.json")
    history_jsonl = _file("history.jsonl")
    history_csv = _file("history.csv")
    thresholds_file = _file("thresholds.json")
    calibration_file = _file("calibration.json")
    reliability = _file("reliability.png")
    evaluated_reliability = _file("reliability_evaluated.png")  # the last `evaluate`'s
    warm_start_file = _file("warm_start.json")
    tracking_file = _file("tracking.json")
    time_budget_file = _file("time_budget.json")
    clock_file = _file(CLOCK_FILE)
    last_checkpoint = _file(LAST_CHECKPOINT)
    pseudo_labels = _file("pseudo_labels.csv")
    consistency = _file("consistency.csv")  # --unlabeled: `record_consistency`
    oof = _file("oof.csv")  # cv: out-of-fold probabilities (selection/cv.py)
    cv_summary_file = _file("cv_summary.json")
    compare_md = _file("compare.md")
    compare_json = _file("compare.json")
    timm_folder = _file("timm")  # export --format timm: timm's Hub layout (deploy/hub.py)
    tensorboard = _file("tensorboard")  # --tracker tensorboard's event files (train/tracking.py)

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    @classmethod
    def claim(cls, parent: str | os.PathLike[str], name: str | None, *what: str) -> RunDir:
        """A new run directory in `parent` no other run has: `name` (--name), else
        `run_name(*what)`, with -2, -3... when taken (an exclusive mkdir: two runs started
        in the same second never share one)."""
        return cls(claim_dir(parent, name or run_name(*what)))

    @property
    def views(self) -> Views:
        return Views(self.path / VIEWS_DIR)

    @property
    def review(self) -> Review:
        return Review(self.path / REVIEW_DIR)

    def tracked_files(self) -> list[Path]:
        """What a tracker keeps of a finished run (those that exist)."""
        files = (self.model, self.config_file, self.metrics_file, self.thresholds_file)
        return [p for p in files if p.is_file()]

    # -- config, classes, preprocessing, environment --------------------------------------
    def read_config(self) -> RunConfig | None:
        """The run's RunConfig (None: the folder has no config.yaml)."""
        return read_config(self.config_file) if self.config_file.is_file() else None

    def write_config(self, cfg: RunConfig) -> None:
        write_text(self.config_file, yaml.safe_dump(cfg.to_dict(), sort_keys=False))

    def read_classes(self) -> list[str] | None:
        return _json_or(self.classes_file, None)

    def write_classes(self, classes: list[str]) -> None:
        write_json(self.classes_file, classes)

    def read_preprocess(self) -> Preprocess | None:
        raw = _json_or(self.preprocess_file, None)
        return None if raw is None else Preprocess.from_dict(raw)

    def write_preprocess(self, pre: Preprocess) -> None:
        write_json(self.preprocess_file, pre.to_dict())

    def write_environment(self, env: dict[str, Any]) -> None:
        """environment.json; `env` names the working folder under WORKING_FOLDER."""
        write_json(self.environment_file, env)

    def working_folder(self) -> str | None:
        """The folder the run was trained from (environment.json), which its splits.csv's
        relative paths are relative to; None for a run that did not record it."""
        try:
            with open(self.environment_file, encoding="utf-8") as fh:
                folder = json.load(fh).get(WORKING_FOLDER)
        except (OSError, ValueError, AttributeError):
            return None
        return folder if isinstance(folder, str) and folder else None

    # -- the data: splits and what was left out --------------------------------------------
    def write_splits(self, rows: Iterable[tuple[str, str, str]]) -> None:
        """splits.csv: (path, label as text, split) of every image."""
        write_csv(self.splits_file, ["path", "label", "split"], rows)

    def split_rows(self) -> list[dict[str, str]]:
        """splits.csv's rows as written ({path, label, split}; [] when the run has none)."""
        return read_csv_dicts(self.splits_file) if self.splits_file.is_file() else []

    def splits(self, task: Task, delim: str = " ") -> list[tuple[str, Any, str]]:
        """(path, label, split) of every image the run was trained, validated and tested on,
        labels in the task's shape, paths as they read from the current folder; [] when
        the run has no splits.csv."""
        rows = self.split_rows()
        base = self.working_folder() if rows else None
        return [(from_folder(base, r["path"]), task.parse_label(r["label"], delim, self.splits_file.name), r["split"])
                for r in rows]

    def write_excluded(self, rows: Iterable[tuple[str, str]]) -> None:
        """excluded.txt: (path, why) of every file the data left out, one per line."""
        write_text(self.excluded_file, "".join(f"{path}\t{why}\n" for path, why in rows))

    def left_out(self) -> list[str]:
        """The files the run's data left out by the user's choice (`--exclude`: in its data,
        or in its --unlabeled pool), as its excluded.txt lists them, read from the current
        folder; [] when the run has no excluded.txt."""
        if not self.excluded_file.is_file():
            return []
        base = self.working_folder()
        rows = (line.rpartition("\t") for line in self.excluded_file.read_text(encoding="utf-8").splitlines())
        return [from_folder(base, file) for file, _, why in rows if file and why.startswith(LISTED_IN_EXCLUDE)]

    # -- results ------------------------------------------------------------------------------
    def read_metrics(self) -> dict[str, Any]:
        """metrics.json ({} when the run has none)."""
        return _json_or(self.metrics_file, {})

    def write_metrics(self, metrics: dict[str, Any]) -> None:
        write_json(self.metrics_file, metrics)

    def read_history(self) -> list[dict[str, Any]]:
        """One row per epoch, from history.jsonl ([] when the run has none)."""
        if not self.history_jsonl.is_file():
            return []
        return [json.loads(line) for line in self.history_jsonl.read_text(encoding="utf-8").splitlines() if line.strip()]

    def write_history(self, rows: list[dict[str, Any]]) -> None:
        """history.jsonl and history.csv, one row per epoch (columns: every key seen)."""
        write_text(self.history_jsonl, "".join(json.dumps(r) + "\n" for r in rows))
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        writer.writeheader()
        writer.writerows(rows)
        write_text(self.history_csv, buf.getvalue())

    def record_consistency(self, epoch: int, counts: list[int], columns: list[str]) -> None:
        """consistency.csv: this epoch's row after the rows of the epochs before it (a resumed
        run replaces what it runs again)."""
        rows = [r for r in read_csv(self.consistency)[1:] if r and int(r[0]) < epoch] \
            if self.consistency.is_file() else []
        write_csv(self.consistency, ["epoch", *columns], [*rows, [epoch, *counts]])

    def write_calibration(self, record: dict[str, Any]) -> None:
        write_json(self.calibration_file, record)

    def read_calibration(self) -> dict[str, Any]:
        return _json_or(self.calibration_file, {})

    def write_thresholds(self, thresholds: dict[str, Any]) -> None:
        write_json(self.thresholds_file, thresholds)

    def write_warm_start(self, warm_start: dict[str, Any]) -> None:
        write_json(self.warm_start_file, warm_start)

    def write_pseudo_labels(self, rows: Iterable[tuple[str, str, str, int]]) -> None:
        """pseudo_labels.csv: (path, pseudo-label as text, confidence, whether it joined the fit)."""
        write_csv(self.pseudo_labels, ["path", "label", "confidence", "used"], rows)

    def write_cv_summary(self, summary: dict[str, Any]) -> None:
        write_json(self.cv_summary_file, summary)

    def write_compare(self, table: str, rows: list[dict[str, Any]]) -> None:
        """compare.md (the table as printed) and compare.json (its rows)."""
        write_text(self.compare_md, table + "\n")
        write_json(self.compare_json, rows)

    # -- tracking, the time budget and the clock -------------------------------------------
    def tracked(self, backend: str) -> dict[str, str] | None:
        """What tracking.json records of `backend`'s run, if anything."""
        try:
            return dict(json.loads(self.tracking_file.read_text(encoding="utf-8"))[backend])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def record_tracking(self, backend: str, entry: dict[str, str]) -> None:
        """Add `backend`'s entry to tracking.json, keeping the other backends'."""
        try:
            recorded = json.loads(self.tracking_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            recorded = {}
        write_json(self.tracking_file, {**(recorded if isinstance(recorded, dict) else {}), backend: entry})

    def read_time_budget(self) -> dict[str, Any]:
        """time_budget.json ({} when the run has none)."""
        return _json_or(self.time_budget_file, {})

    def write_time_budget(self, plan: dict[str, Any]) -> None:
        write_json(self.time_budget_file, plan)

    def read_clock(self) -> float:
        """The seconds clock.json says the run used (OSError, ValueError, KeyError or
        TypeError when it cannot say)."""
        return float(json.loads(self.clock_file.read_text(encoding="utf-8"))["used_s"])

    def write_clock(self, budget_s: float | None, used_s: float) -> None:
        write_json(self.clock_file, {"budget_s": budget_s, "used_s": used_s})

    # -- weights and checkpoints ---------------------------------------------------------
    def write_model(self, model: torch.nn.Module, task: Task, pre: Preprocess, model_cfg: ModelConfig) -> None:
        """model.safetensors: the weights plus everything needed to rebuild and use them
        (backbone, head, classes, preprocessing, the task's metadata)."""
        meta = {
            "format_version": FORMAT_VERSION,
            "backbone": model_cfg.backbone,
            "head_hidden": model_cfg.head_hidden,
            "head_dropout": model_cfg.head_dropout,
            "classes": list(task.classes),
            "preprocess": pre.to_dict(),
            **task.metadata(),
        }
        if getattr(model, "uncertainty", None):
            meta["uncertainty"] = model.uncertainty  # fitted calibration and prediction sets (train/calibrate.py)
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
        atomic_write(self.model, lambda tmp: save_file(tensors, tmp, metadata={"visiontune": json.dumps(meta)}))

    def write_checkpoint(self, state: dict[str, Any]) -> None:
        save_checkpoint(self.last_checkpoint, state)

    # -- exports: named after the weights file they are of -------------------------------------
    # An export may be of a weights file outside any run directory (`export w.safetensors`),
    # so the names are a rule on the weights file's name (a run's: `RunDir.exported(run.model, fmt)`).
    @staticmethod
    def exported(weights: str | os.PathLike[str], format: str) -> Path:
        """Where an export of the weights file `weights` in `format` goes by default: beside
        it, named after it (model.safetensors -> model.onnx; w.safetensors -> w.pt2)."""
        return Path(weights).with_suffix(suffix(format))

    @staticmethod
    def int8_of(fp32: str | os.PathLike[str]) -> Path:
        """Where the int8 model of the fp32 ONNX file `fp32` goes: model.onnx -> model.int8.onnx."""
        p = Path(fp32)
        return p.with_name(p.stem + INT8 + suffix("onnx"))

    @staticmethod
    def is_int8(path: str | os.PathLike[str]) -> bool:
        """Whether `path` is named as an int8 export (model.int8.onnx)."""
        p = Path(path)
        return p.name.endswith(INT8 + p.suffix)

    @staticmethod
    def fp32_of(path: str | os.PathLike[str]) -> Path:
        """The fp32 export an export's name is of: model.int8.onnx -> model.onnx (an fp32
        export: itself)."""
        p = Path(path)
        return p.with_name(p.name.replace(INT8 + p.suffix, p.suffix))

    @staticmethod
    def weights_named_in(export: str | os.PathLike[str]) -> Path:
        """The weights file an export's name says it is of, beside it: model.onnx,
        model.int8.onnx, model.pt2 -> model.safetensors (whether or not it exists)."""
        p = Path(export)
        stem = p.name[:-len(p.suffix)] if p.suffix else p.name
        return p.with_name(stem.removesuffix(INT8) + Path(MODEL_FILE).suffix)

    @staticmethod
    def named_after(export: str | os.PathLike[str], weights: str | os.PathLike[str]) -> bool:
        """Whether `export` has the name an export of `weights` gets by default (beside it,
        its stem), not one given with --output."""
        p, w = Path(export), Path(weights)
        return p.parent == w.parent and p.stem == w.stem

    def read_checkpoint(self) -> dict[str, Any] | None:
        """The last checkpoint (None when the run has none yet); see `load_checkpoint`."""
        return load_checkpoint(self.last_checkpoint) if self.last_checkpoint.is_file() else None

