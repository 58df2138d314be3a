"""The options of the commands that use a run or a model: predict, evaluate, interpret,
suggest, serve, export and review. One frozen dataclass per command, each option one
`option(...)` field as the run's are (config.py): help, bounds, choices and flag.

The CLI adds their arguments with the same code as train's (cli.py `add_command_options`,
`_add_option`); `from_args` builds a command's config from the parsed arguments and checks
every bound and choice (`config.check_fields`, as `RunConfig.validate` does), and
commands.py reads the config, not the raw arguments. So a new option of a command is one
field here.

An option several commands offer is declared once:
- an option that is also a run option (--device, --engine, --backbone, --csv,
  --label-delim...) is that field (`run_option`: its help, choices and bounds; a command
  may say what it means there in its own words and default to None, "not given");
- the options several use-commands share are a group of their own, one dataclass whose
  fields a command's help lists where the group stands: `InferenceOptions` (--tta,
  --batch-size, --device), `TopK`, and the listening options of the commands that serve a
  page (`listen_options`: --host, --port, --allowed-host).

This module imports no torch: `visiontune CMD --help` stays instant.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

from visiontune.config import (
    CACHE_DIR_DEFAULT,
    DEFAULT_BACKBONE,
    SUGGEST_METHODS,
    check_fields,
    option,
    option_fields,
    option_key,
)
from visiontune.deploy.formats import FORMATS, files_text

T = TypeVar("T")


def argument(help: str, *, nargs: str | None = None, metavar: str | None = None, required: bool = True) -> Any:
    """A positional argument (RUN, DATA, IMAGE...) as a field: required unless `nargs` is '?'
    (default None). `nargs='+'` values are kept as a tuple."""
    meta = {**option(None, help, metavar=metavar).metadata, "positional": True, "nargs": nargs}
    return field(metadata=meta) if required and nargs != "?" else field(default=None, metadata=meta)


def run_option(key: str, **changes: Any) -> Any:
    """The run option `key` (its config.py field: help, choices, bounds, parsing) as an
    option of a use-command; `changes` replace its default or metadata (e.g. the help in the
    command's words, default=None for an override passed on only when given)."""
    source = next(f for _, f in option_fields() if option_key(f) == key)
    default = changes.pop("default", source.default)
    return field(default=default, metadata={**source.metadata, **changes})


def help_of(key: str) -> str:
    """The help of the run option `key`, for a command that adds its own default to it."""
    return next(f for _, f in option_fields() if option_key(f) == key).metadata["help"]


def group(cls: type) -> Any:
    """A group of options shared by several commands, listed where the field stands."""
    return field(default_factory=cls, metadata={"group": True})


def repeated(help: str, *, metavar: str | None = None) -> Any:
    """An option that may be given several times (argparse's append); a tuple, () by default."""
    return field(default=(), metadata={**option((), help, metavar=metavar).metadata, "append": True})


# -- groups shared by several commands ------------------------------------------------------
@dataclass(frozen=True)
class InferenceOptions:
    """How a run's model reads images: predict and evaluate."""

    tta: bool = option(False, "test-time augmentation: average 4 views per image (center, mirrored, whole image, "
                              "mirrored); ~4x the time")
    batch_size: int = option(64, "images per forward pass", ge=1)
    device: str = run_option("device")


@dataclass(frozen=True)
class TopK:
    """How many labels an answer shows: predict and serve."""

    top_k: int = option(3, "most probable labels shown per image", ge=1)


@dataclass(frozen=True)
class Coverage:
    """Prediction sets with a guarantee: predict, evaluate and serve."""

    coverage: float | None = option(None, "also give each image's prediction set: the classes (labels; a number's "
                                          "interval) that hold the true one for this share of images, e.g. 0.9 "
                                          "(split conformal on the run's validation split)", gt=0.0, lt=1.0,
                                    metavar="SHARE")


@dataclass(frozen=True)
class Progress:
    """The progress bar of the commands that take a while (stderr, on a terminal; -q hides it too)."""

    progress: bool = run_option("progress")


@dataclass(frozen=True)
class Abstain:
    abstain: bool = option(False, "single-label, with --coverage: answer 'not sure: a or b' when the set holds more "
                                  "than one class")


def listen_options(port: int, what: str) -> type:
    """The options of a command that serves a page (visiontune.web): --host, --port (default
    `port`) and --allowed-host, whose help says what the page can do (`what`)."""
    return dataclasses.make_dataclass("ListenOptions", [
        ("host", str, option("127.0.0.1", "address to listen on: 127.0.0.1 is this machine only; 0.0.0.0 every "
                                          "network interface, so anyone who can reach the port can use the page")),
        ("port", int, option(port, "port to listen on", ge=0, le=65535)),
        ("allowed_host", tuple, repeated(
            "also answer requests addressed to NAME (this machine's name or address as others type it, without "
            "port: a URL or port given is reduced to the name; '*.example.com' a domain, '*' any; repeatable). "
            f"Only localhost, 127.0.0.1, [::1] and --host are answered otherwise (400): {what}, and another web "
            "site must not reach it through DNS rebinding", metavar="NAME")),
    ], frozen=True)


SERVE_LISTEN = listen_options(8000, "the page uses the model")
REVIEW_LISTEN = listen_options(8001, "the page can relabel")


# -- the commands ---------------------------------------------------------------------------
@dataclass(frozen=True)
class PredictConfig:
    run: str = argument(f"run directory, its model.safetensors, or an exported {files_text()} (a .ts file runs "
                        "TorchScript code when loaded: use only .ts files you trust; prefer .onnx)")
    inputs: tuple[str, ...] = argument("image files and/or folders (searched recursively)", nargs="+")
    top: TopK = group(TopK)
    output: str | None = option(None, "file: also write the predictions to a .csv or .json file, row by row as they come "
                                      "(the file is replaced only when complete). In the CSV, a label a spreadsheet "
                                      "would run as a formula (starting with = + - @) is written with a leading ' "
                                      "(visiontune reads it back without it)", metavar="FILE")
    inference: InferenceOptions = group(InferenceOptions)
    sets: Coverage = group(Coverage)
    abstain: Abstain = group(Abstain)
    shown: Progress = group(Progress)
    ood_threshold: float | None = option(None, "answer 'unknown' for images whose out-of-distribution score (distance "
                                               "to the k-th nearest training image's features, 0 to 2) is past this "
                                               "value, instead of the run's own threshold (set so that 95 in 100 of its "
                                               "validation images pass)", ge=0.0, metavar="SCORE")
    engine: str = run_option("engine", help="CPU inference engine. auto: ONNX Runtime when the run has a current "
                                            "model.onnx, or when onnxruntime is installed and there are >= 2000 images "
                                            "(model.onnx is exported into the run once); else PyTorch")


@dataclass(frozen=True)
class EvaluateConfig:
    run: str = argument("run directory (or its model.safetensors)")
    data: str = argument("class-folder tree (a dataset root uses its test/ or valid/ split), or the folder the --csv "
                         "paths are relative to")
    csv: str | None = run_option("csv", help="CSV of path,label(s)[,split]: its test split, else valid, else every row")
    label_delim: str | None = run_option("label_delim", default=None,
                                         help="separator of a multi-label CSV's labels (default: the run's)")
    inference: InferenceOptions = group(InferenceOptions)
    sets: Coverage = group(Coverage)
    shown: Progress = group(Progress)
    output: str | None = option(None, "file: write metrics, report and confusion matrix to this .json file",
                                metavar="FILE")


@dataclass(frozen=True)
class InterpretConfig:
    run: str = argument("run directory")
    data: str | None = argument("data folder (default: the run's own splits.csv)", nargs="?")
    oof: str | None = option(None, "out-of-fold probabilities from `visiontune cv` (oof.csv) for the mislabel "
                                   "ranking")
    top_n: int = option(16, "images in each gallery (top losses, suspected mislabels)", ge=1)
    saliency: tuple[str, ...] | None = field(default=None, metadata={
        **option(None, "also explain these images with Grad-CAM", metavar="IMAGE").metadata, "nargs": "+"})
    mislabels_in_test: bool = option(False, "also look for mislabels among test images (default: train + valid, "
                                            "what training uses)")
    device: str = run_option("device")
    shown: Progress = group(Progress)
    output: str | None = option(None, "folder for the views, report.html and the CSVs (default: RUN/interpret/, "
                                      "where `review RUN` reads them)", metavar="FOLDER")


@dataclass(frozen=True)
class SuggestModel:
    """suggest's run options, each passed on only when given (else the run's, or the default)."""

    backbone: str | None = run_option("backbone", default=None, help="frozen model without --run (default: "
                                                                      f"{DEFAULT_BACKBONE})")
    weights: str | None = run_option("weights", default=None, help="its weights (default: pretrained)")
    image_size: int | None = run_option("image_size", help="its input size (default: the backbone's own)")
    task: str | None = run_option("task", default=None, help="shape of the --labeled labels (default: auto)")
    label_delim: str | None = run_option("label_delim", default=None, help="separator of label sets (default: a space)")
    device: str | None = run_option("device", default=None, help=help_of("device") + " (default: --run's, else auto)")
    engine: str | None = run_option("engine", default=None, help="what computes the features on the CPU, as "
                                                                  "train --engine (default: auto)")
    cache_dir: str | None = run_option("cache_dir", help="root of the feature cache " + CACHE_DIR_DEFAULT)
    seed: int | None = run_option("seed", default=None, help="seed of k-means and random (default: 0)")


@dataclass(frozen=True)
class SuggestConfig:
    pool: tuple[str, ...] = argument("folders (searched recursively) and files of unlabelled images (files that do "
                                     "not decode are skipped and listed)", nargs="+")
    run: str | None = option(None, "a trained run: its model's uncertainty; its own images count as labelled, and "
                                   "those it left out by --exclude (and their copies) are never suggested")
    labeled: str | None = option(None, "images labelled so far: a folder as train reads it, or the folder --csv "
                                       "paths are relative to", metavar="DATA", also=("--labelled",))
    csv: str | None = run_option("csv", help="labels so far: a CSV of path,label (e.g. a filled-in to_label.csv)")
    n: int = option(100, "images to suggest", ge=1)
    method: str = option("auto", "auto: typical while the median class (target) has under 5 labels (or nothing is "
                                 "labelled), else diverse; typical: the most typical image of each unlabelled cluster "
                                 "(TypiClust); uncertain: the model's least sure; diverse: least sure and unlike each "
                                 "other (uncertainty-weighted k-means++); random: a seeded sample",
                         choices=SUGGEST_METHODS)
    output: str = option("to_label.csv", "file: the CSV to write: path, the task's label column (label; labels for label sets, "
                                         "an image with none written (none); value for numbers; empty: not labelled "
                                         "yet, fill it in), prediction, reason, score; the rows filled in so far are "
                                         "kept first and count as labelled, besides --run, --labeled and --csv",
                         metavar="FILE")
    frozen: SuggestModel = group(SuggestModel)
    shown: Progress = group(Progress)

    def overrides(self) -> dict[str, Any]:
        """The run options given (backbone, image_size, seed...): the frozen model's, or on
        top of --run's config; and the progress bar's."""
        given = {k: v for k, v in dataclasses.asdict(self.frozen).items() if v is not None}
        return {**given, "progress": self.shown.progress}


@dataclass(frozen=True)
class ServeConfig:
    run: str = argument("run directory")
    listen: Any = group(SERVE_LISTEN)
    top: TopK = group(TopK)
    max_pixels: int = option(50_000_000, "refuse images whose header announces more pixels (413), before decoding",
                             ge=1)
    max_pending: int = option(64, "requests decoding or waiting for the model at once; more get 503 + "
                                  "Retry-After", ge=1)
    sets: Coverage = group(Coverage)
    drift_window: int = option(200, "/metrics' share of unknown answers (unlike the training images) is taken over "
                                    "the last N answers, and the drift warning judged once per N", metavar="N", ge=1)
    drift_margin: float = option(0.1, "log a drift warning when that share exceeds the validation split's (5%% when "
                                      "the run stored none) by this much", metavar="SHARE", ge=0.0, le=1.0)


@dataclass(frozen=True)
class ExportConfig:
    run: str = argument("run directory")
    format: str = option("onnx", FORMATS.choices_help() + "; default", choices=FORMATS.names)
    output: str | None = option(None, "file to write (a folder for --format timm, whose layout is several files) "
                                      "(default: " + files_text("RUN/", ", ", " or ") + ")", metavar="PATH")
    int8: bool = option(False, "onnx: also write MODEL.int8.onnx, quantised by ONNX Runtime (static, calibrated on "
                               "the run's validation images; dynamic as the fallback) and checked on the validation "
                               "split against fp32")
    max_drop: float = option(1.0, "--int8: refuse the int8 model (keeping fp32) when its validation score (accuracy; "
                                  "mAP; R²) is this many points under fp32's", metavar="POINTS")
    calibration: int = option(256, "--int8: about N validation images (a stratified sample) calibrate the activation "
                                   "ranges; with 2 x N or more, the drop is scored on the others", metavar="N", ge=1)
    shown: Progress = group(Progress)  # --int8's passes over the validation images


@dataclass(frozen=True)
class ReviewConfig:
    run: str | None = argument("a run directory: review what interpret flagged (interpret runs first if it has not)",
                               nargs="?")
    data: str | None = argument("with RUN: the data interpret looks at (default: the run's own images)", nargs="?")
    label: str | None = option(None, "instead of RUN: the CSV `suggest` wrote (to_label.csv); each answer is merged "
                                     "into it at once (rows added and labels typed meanwhile are kept)", metavar="CSV")
    classes: str | None = option(None, "comma-separated class names for the buttons and keys (default: the labels "
                                       "and guesses in the CSV)")
    task: str = run_option("task", help="--label: the shape of the CSV's labels, which says how a label is given (a "
                                        "class chosen, the labels of a set toggled, a number typed); auto: as train "
                                        "--csv reads the file (a 'labels' column holds label sets, a 'value' column "
                                        "numbers, else classes)")
    label_delim: str = run_option("label_delim", help="--label: separator of the labels of a set")
    output: str | None = option(None, "file: --label's answers go into this CSV, a copy of --label made when it does "
                                      "not exist yet (an existing one is reviewed on), and --label stays as it is "
                                      "(default: --label itself). A run's decisions always go into RUN/review/, "
                                      "where train --relabel/--exclude read them", metavar="FILE")
    listen: Any = group(REVIEW_LISTEN)


# Each use-command's config: cli.py adds its arguments, commands.py reads it.
COMMAND_CONFIGS: dict[str, type] = {
    "predict": PredictConfig, "evaluate": EvaluateConfig, "interpret": InterpretConfig, "suggest": SuggestConfig,
    "serve": ServeConfig, "export": ExportConfig, "review": ReviewConfig,
}


def command_fields(cls: type) -> Iterator[dataclasses.Field[Any]]:
    """Every option and argument of a command's config, groups' fields in the group's place."""
    for f in fields(cls):
        if f.metadata.get("group"):
            yield from command_fields(type(f.default_factory()))
        else:
            yield f


def from_args(cls: type[T], args: argparse.Namespace) -> T:
    """The config of a command from its parsed arguments (an option not given keeps its
    default), every bound and choice checked: a ConfigError names the option, the value and
    what is valid."""
    values: dict[str, Any] = {}
    for f in fields(cls):
        if f.metadata.get("group"):
            values[f.name] = from_args(type(f.default_factory()), args)
            continue
        value = getattr(args, option_key(f), None)
        if value is not None:
            values[f.name] = tuple(value) if isinstance(value, list) else value
    cfg = cls(**values)
    check_fields(cfg)
    return cfg
