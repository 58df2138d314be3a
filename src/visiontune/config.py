"""The resolved configuration of a run: frozen dataclasses, the single source of truth.

A `RunConfig` is built from Python keyword overrides (`RunConfig.create(epochs=3)`) or by
the CLI, is written into every run directory as `config.yaml`, and is read back by
`predict`, `evaluate` and `--resume`.

Every option is one `option(...)` field below: its default, its help text, its bounds or
choices and (where it differs from `--field-name`) its command-line flag. The CLI builds
its run options from these fields (`cli.add_run_options`) and `validate` checks every bound and
choice, so a new option is one line here.

The options stand in sections by concern, side by side in `RunConfig`: `data`, `model`,
`strategy`, `train` (the loop), `outputs` (how the task's outputs are trained and read),
`augmentation`, `runtime`, `tracking` and `budget`. Python keywords, flags and flat YAML
keys name an option alone (`epochs`, `device`), whatever its section; a config.yaml in the
layout before these sections (everything but data, model and strategy under `train:`) is
read by `old_layout_moved`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from typing import Any

from visiontune.errors import ConfigError
from visiontune.registry import Registry
from visiontune.tasks.catalog import task_choices
from visiontune.train.strategies import STRATEGIES, get_strategy, strategy_choices

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("onecycle", "cosine", "step", "constant", "wsd")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
AUGMENT_PRESETS = ("none", "light", "medium", "heavy")  # data/transforms.py says what each adds


def _augment_preset(value: Any) -> Any:
    """Configs from before the presets said augment: true / false."""
    return {True: "light", False: "none"}.get(value, value) if isinstance(value, bool) else value
DEFAULT_BACKBONE = "timm:tf_efficientnet_lite0"
# where the caches live without --cache-dir (caches.cache_root), as every --cache-dir's help says it
CACHE_DIR_DEFAULT = "(default: $VISIONTUNE_CACHE, else $XDG_CACHE_HOME/visiontune, else ~/.cache/visiontune)"


def option(default: Any, help: str, *, choices: tuple[str, ...] | Callable[[], tuple[str, ...]] | None = None,
           ge: float | None = None, gt: float | None = None, le: float | None = None, lt: float | None = None,
           flag: str | None = None, key: str | None = None, cli: bool = True, metavar: str | None = None,
           parse: Callable[[str], Any] | None = None, aliases: dict[str, Any] | None = None,
           coerce: Callable[[Any], Any] | None = None, nargs: int | None = None, off: str | None = None,
           also: tuple[str, ...] = ()) -> Any:
    """A config field with its documentation: `help` (shown by --help), `choices` (a tuple
    or a function returning one, e.g. the strategy registry), bounds (`ge`/`gt`/`le`/`lt`,
    checked by `validate`; None values are not checked), `flag` (default `--field-name`;
    booleans get `--no-field-name` when they default to True: `help` says what the field
    means when true, and `off` what that flag does), `key` (the flat name in
    `RunConfig.create` and the CLI; default the field name), `cli=False` for Python-only
    options, `parse` for values argparse cannot type from the annotation, `aliases` for
    extra flags that set a fixed value (e.g. {"--no-augment": "none"}) and `coerce` for
    values older configs spelled differently, `nargs` for a flag taking several values (each
    parsed by `parse`), `also` for other spellings of the flag (e.g. ("--unlabelled",)),
    accepted alike and shown beside it in --help."""
    meta = {"help": help, "choices": choices, "ge": ge, "gt": gt, "le": le, "lt": lt, "flag": flag, "key": key,
            "cli": cli, "metavar": metavar, "parse": parse, "aliases": aliases or {}, "coerce": coerce, "nargs": nargs,
            "off": off, "also": also}
    return field(default=default, metadata=meta)


# `visiontune suggest --method` (selection/suggest.py); here so that --help needs no torch
SUGGEST_METHODS = ("auto", "typical", "uncertain", "diverse", "random")

TRACKERS: Registry[Any] = Registry("tracker")  # --track's names; each loads its train/tracking.py class
TRACKERS.lazy("tensorboard", "visiontune.train.tracking:TensorBoardTracker",
              "TensorBoard event files in the run directory")
TRACKERS.lazy("mlflow", "visiontune.train.tracking:MlflowTracker",
              "an MLflow run (MLFLOW_TRACKING_URI, else sqlite:///RUNS/mlflow.db)")
TRACKERS.lazy("wandb", "visiontune.train.tracking:WandbTracker",
              "a Weights & Biases run (files in RUN/wandb; WANDB_MODE=offline to sync later)")

# --engine's names: what runs frozen forward passes and predict on the CPU (runtime/engine.py)
ENGINES: Registry[str] = Registry("engine")
ENGINES.add("auto", "auto", "ONNX Runtime when installed and worth its one export, else PyTorch")
ENGINES.add("torch", "torch", "PyTorch")
ENGINES.add("onnx", "onnx", "ONNX Runtime on the backbone exported once into the cache, checked against PyTorch")


def parse_track(value: Any) -> str:
    """'tensorboard,mlflow' / ['mlflow'] / '' -> normalised 'tensorboard,mlflow' (checked)."""
    names = value if isinstance(value, (list, tuple)) else str(value or "").replace(" ", ",").split(",")
    names = [n.strip().lower() for n in names if n and n.strip() and n.strip().lower() != "none"]
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise ConfigError(f"--track {','.join(unknown)}: unknown tracker; choose from {', '.join(TRACKERS)} "
                          "(comma-separated)")
    return ",".join(dict.fromkeys(names))


def parse_duration(text: Any) -> float | None:
    """'10m', '90s', '1h30m', '2h', '30d' or plain seconds -> seconds."""
    if text is None or isinstance(text, (int, float)):
        return None if text is None else float(text)
    value = str(text).strip().lower()
    units, total, number = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0}, 0.0, ""
    for ch in value:
        if ch.isdigit() or ch == ".":
            number += ch
        elif ch in units and number:
            total, number = total + float(number) * units[ch], ""
        else:
            raise ValueError(f"expected a duration like 10m, 90s, 1h30m or 30d, got {text!r}")
    return total + (float(number) if number else 0.0)


def parse_batch_size(text: str) -> int | str:
    """`--batch-size`: a whole number >= 1 or 'auto'."""
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"expected a whole number or 'auto', got {text!r}") from None
    if value < 1:
        raise ValueError(f"must be >= 1, got {value}")
    return value


@dataclass(frozen=True)
class DataConfig:
    """Where the images are and how labels and splits are found."""

    path: str = option("", "folder of images, shards, or a Hugging Face dataset (hf:NAME[:CONFIG] or a "
                           "save_to_disk folder): the DATA argument", cli=False)
    csv: str | None = option(None, "CSV of path,label[,split] (paths relative to DATA or the CSV's folder)")
    csv_path_col: str | None = option(None, "CSV column holding the paths (default: path, file, filename or image, else "
                                                    "the 1st)")
    csv_label_col: str | None = option(None, "CSV column holding the labels (default: label, class or target, else the "
                                                     "2nd)")
    image_col: str | None = option(None, "Hugging Face dataset: the image column (default: the one of type Image)")
    label_col: str | None = option(None, "Hugging Face dataset: the label column (default: the first ClassLabel, "
                                         "else one named label/labels/class/target/tags)")
    label_regex: str | None = option(None, r"label = group 1 of this regex on the file name, e.g. '^(.+)_\d+\.jpg$'")
    task: str = option("auto", "single-label (one class per image), multi-label (a set of labels, maybe empty) or "
                               "regression (a number per image: a CSV column, a --label-regex capture, a label "
                               "function's value); auto: multi-label for a CSV 'labels'/'tags' column or a label "
                               "function returning lists, regression for one returning floats", choices=task_choices)
    label_delim: str = option(" ", "separator of the labels in a multi-label CSV cell (a space, as fastai's)")
    label_func: str | None = option(None, "name of the Python label function used (recorded, not re-run)", cli=False)
    valid_pct: float = option(0.2, "validation fraction when there is no valid/ folder", ge=0.0, lt=1.0)
    relabel: str | None = option(None, "CSV path,label of corrected labels (your files stay untouched)")
    unlabeled: str | None = option(None, "folder of unlabelled images (searched recursively). Frozen phases "
                                   "(feature-extract, gradual's first): the labels spread over the frozen features' "
                                   "nearest neighbours, and the share of the pool that spreading is surest of (chosen "
                                   "by cross-validation on the training split) joins the converged probe's fit "
                                   "(pseudo_labels.csv in the run); phases that train the backbone: FixMatch's "
                                   "consistency term (see --consistency-threshold)", also=("--unlabelled",),
                                   metavar="FOLDER")
    consistency_threshold: float = option(0.95, "--unlabeled, phases that train the backbone: a pool image's "
                                                "pseudo-label (from its weakly augmented view) counts in the loss "
                                                "of its strongly augmented view when the model is this sure "
                                                "(FixMatch's value)", ge=0.0, le=1.0)
    exclude: str | None = option(None, "file listing images to leave out: a CSV whose header names the path "
                                       "column (as review writes exclude.txt: path), or one path per line, as "
                                       "written (no header; a comma is part of the path); those of the --unlabeled "
                                       "pool, and their copies, stay out of the pool")
    valid: str | None = option(None, "validation shards when DATA is a shard pattern, e.g. "
                                      "'shards/valid-{0000..0009}.tar' (without it, --valid-pct of the training samples)")
    groups: str | None = option(None, "CSV of path,group: images of one group (a recording, a patient) stay in "
                                      "one split and one fold (default: DATA/groups.csv when present)")
    verify_images: bool = option(True, "decode every image while scanning, and check for byte-identical copies "
                                       "across splits", flag="--no-verify",
                                 off="skip decoding every image while scanning (and the check for byte-identical "
                                     "copies across splits): a labelled file that does not decode then stops the "
                                     "run, naming it; pool files that do not are skipped and listed")


@dataclass(frozen=True)
class ModelConfig:
    """Which backbone, which weights, which head, which input size."""

    backbone: str = option(DEFAULT_BACKBONE, "timm:<name>, torchvision:<name> or a bare timm name")
    weights: str = option("pretrained", "pretrained | none | PATH to a .pth/.pt/.safetensors state dict | "
                                        "local-dir:DIR or hf-hub:USER/NAME (a folder in timm's Hub layout, e.g. from "
                                        "export --format timm)")
    trust_pickle: bool = option(False, "let --weights local-dir:/hf-hub: load .bin/.pth pickle weights when the "
                                       "folder has no safetensors (a pickle can run code: only files you trust)")
    image_size: int | None = option(None, "input size in pixels (default: the backbone's own)", ge=8)
    drop_path: float = option(0.0, "stochastic depth rate of a timm backbone (timm's drop_path_rate)", ge=0.0, lt=1.0)
    head_hidden: int = option(0, "hidden units in the head; 0: a single linear layer", ge=0)
    head_dropout: float = option(0.0, "dropout in the head", ge=0.0, lt=1.0)
    head_init_gain: float = option(0.1, "xavier gain of the head's last layer (small: starting loss ~ ln C)", gt=0.0)
    warm_start: bool = option(True, "start the head rows of ImageNet-named classes (e.g. 'ant') from the source "
                                    "classifier", off="do not start head rows of ImageNet-named classes (e.g. 'ant') "
                                                     "from the source classifier")


@dataclass(frozen=True)
class StrategyConfig:
    """What trains, and at which learning rate relative to `TrainConfig.lr`."""

    name: str = option("gradual", "what trains (see 'strategies' below); auto: ask the advisor",
                       choices=strategy_choices, key="strategy")
    head_lr_mult: float = option(10.0, "head LR / backbone LR (d2l 14.2: 10x for the new layer)", gt=0.0)
    freeze: int | None = option(None, "freeze-k: leading backbone layer groups kept frozen (default: half)", ge=0)
    freeze_epochs: int = option(1, "gradual: head-only epochs before unfreezing", ge=0)
    probe: str = option("converged", "how head-only phases fit the head while the backbone is frozen: converged "
                                     "(logistic regression to convergence on the features, L2 chosen by k-fold CV; "
                                     "one pass, --epochs does not apply to it) or sgd (epochs of the optimizer)",
                        choices=("converged", "sgd"))
    layer_lr_ratio: float = option(10.0, "gradual: last / first backbone group LR after unfreezing", gt=0.0)
    layer_decay: float | None = option(None, "layer-wise LR decay instead of the discriminative LRs: layer groups "
                                              "per block, group i of n at lr x decay^(n - i) (timm's; 0.75 is the "
                                              "usual recipe for ViTs)", gt=0.0, le=1.0)
    unfreeze_lr_scale: float = option(0.5, "gradual: LR scale after unfreezing (fastai halves it)", gt=0.0)
    frozen_bn: str = option("eval", "BatchNorm in frozen groups: eval keeps the statistics", choices=("eval", "train"))
    trainable_bn: str = option("auto", "BatchNorm statistics in training groups; auto: eval with pretrained weights",
                               choices=("auto", "eval", "train"))


@dataclass(frozen=True)
class TrainConfig:
    """The loop: how long, at which learning rate, with which optimizer and schedule, when it
    stops and which weights it ends with (the best epoch's, an EMA of them)."""

    epochs: int = option(5, "total epochs, all phases", ge=1)
    batch_size: int | str = option(32, "images per optimizer step; auto: the largest that fits the device, capped "
                                       "at 256 and at 1/8 of the training images", metavar="N|auto",
                                   parse=parse_batch_size)
    lr: float | None = option(None, "peak LR of the head; the backbone gets lr / --head-lr-mult "
                                    "(default: 2e-3 adamw, 1e-2 sgd)", gt=0.0)
    optimizer: str = option("adamw", "optimizer", choices=OPTIMIZERS)
    momentum: float = option(0.9, "SGD momentum (Nesterov when > 0)", ge=0.0, lt=1.0)
    weight_decay: float | None = option(None, "never on biases/norms (default: 0.01 with adamw, 1e-4 with sgd)",
                                        ge=0.0)
    schedule: str = option("onecycle", "LR schedule within each phase; wsd = warmup-stable-decay, whose decay "
                                       "under --time-budget starts when the time left equals its length, or "
                                       "when validation stalls at the peak for 2 x --patience epochs (the "
                                       "budget's choice)", choices=SCHEDULES)
    pct_start: float = option(0.25, "onecycle warm-up fraction of each phase", ge=0.0, lt=1.0)
    step_size: int = option(2, "step schedule: epochs between LR drops", ge=1)
    gamma: float = option(0.1, "step schedule: LR factor per drop", gt=0.0, le=1.0)
    monitor: str = option("auto", "metric for early stopping and the best checkpoint "
                                  "(auto: val_loss, or macro_f1 when classes are imbalanced); any metric of the "
                                  "task, e.g. accuracy (ties: the lower val_loss) or calibrated_loss (val_loss "
                                  "after a temperature fitted on each epoch's validation outputs)")
    mode: str = option("auto", "direction of --monitor (auto: min for losses, max otherwise)",
                       choices=("auto", "min", "max"))
    patience: int = option(3, "epochs without improvement before stopping; 0: never", ge=0)
    probe_patience: int = option(2, "after the converged probe (gradual): epochs of fine-tuning that must beat it "
                                    "on validation, or the run ends with the probe's weights and says so (under "
                                    "--time-budget the decay begins instead); 0: only --patience applies; "
                                    "--patience 0 turns both off", ge=0)
    min_delta: float = option(0.0, "smallest change of --monitor that counts as an improvement", ge=0.0)
    restore_best: bool = option(True, "end with the best epoch's weights",
                                off="end with the last epoch's weights instead of the best ones")
    ema: bool = option(False, "also keep an exponential moving average of the weights (timm's ModelEmaV3, with "
                              "warm-up); each epoch validates both and keeps the better")
    ema_decay: float = option(0.999, "EMA decay (the warm-up starts lower)", gt=0.0, lt=1.0)

    def resolved_lr(self) -> float:
        if self.lr is not None:
            return self.lr
        return 2e-3 if self.optimizer == "adamw" else 1e-2

    def resolved_weight_decay(self) -> float:
        if self.weight_decay is not None:
            return self.weight_decay
        return 0.01 if self.optimizer == "adamw" else 1e-4


@dataclass(frozen=True)
class OutputConfig:
    """How the task's outputs are trained and read: the loss and its label smoothing, class
    balance, regression's loss and range, multi-label thresholds (the Task takes them)."""

    label_smoothing: float = option(0.0, "label smoothing of the loss", ge=0.0, lt=1.0)
    loss: str = option("mse", "regression: the loss on standardised targets (huber: delta 1 std, robust to outliers)",
                       choices=("mse", "huber"))
    target_range: tuple[float, float] | None = option(
        None, "regression: squash the output into LOW..HIGH by a sigmoid (fastai's y_range)", nargs=2,
        metavar=("LOW", "HIGH"), parse=float, coerce=lambda v: tuple(float(x) for x in v) if v is not None else None)
    thresholds: str = option("global", "multi-label: one --threshold for every label (global), or per label the "
                                       "one with the best F1 on the validation split (tuned)",
                             choices=("global", "tuned"))
    threshold: float = option(0.5, "multi-label: probability above which a label is predicted", gt=0.0, lt=1.0)
    balance: str = option("none", "class-weighted loss or oversampling of small classes",
                          choices=("none", "weights", "oversample"))


@dataclass(frozen=True)
class AugmentConfig:
    """How training images are augmented (data/transforms.py; mixup for heavy)."""

    augment: str = option("light", "augmentation of training images: none, light (random resized crop + flip), "
                                   "medium (+ RandAugment, random erasing), heavy (+ mixup / cutmix): timm's",
                          choices=AUGMENT_PRESETS, aliases={"--no-augment": "none"}, coerce=_augment_preset)
    hflip: float = option(0.5, "probability of a horizontal flip", ge=0.0, le=1.0)
    min_scale: float = option(0.35, "random resized crop: smallest area fraction", gt=0.0, le=1.0)


@dataclass(frozen=True)
class RuntimeConfig:
    """Where and how the tensors run: device, precision, engine, compile, data-loader workers,
    the caches and progress bars."""

    num_workers: int | None = option(None, "DataLoader worker processes (default: from the device and the cores "
                                           "this process may use, a container's CPU limit included: CPU with <= 4 "
                                           "cores 0, then 1 per 8 cores; GPU: cores - 1, at most 16; never more than batches, "
                                           "none for one batch); training loaders keep theirs across epochs", ge=0)
    device: str = option("auto", "auto | cpu | cuda | cuda:N | mps: auto takes the GPU (cuda), else Apple "
                                 "Silicon's (mps), else the CPU; cuda:N the N-th GPU (cuda:0 first)")
    channels_last: bool = option(True, "NHWC (channels-last) memory format: ~2x faster for depthwise convs on CPU",
                                 off="keep NCHW memory format (NHWC is ~2x faster for depthwise convs on CPU)")
    precision: str = option("auto", "autocast: auto = bf16 (fp16 without bf16) on CUDA, fp32 on CPU",
                            choices=PRECISIONS)
    engine: str = option("auto", "what runs frozen forward passes (features of a frozen backbone, freeze-k's "
                                 "frozen blocks) on the CPU: "
                                 "auto = ONNX Runtime when installed (exported once per weights into the cache, "
                                 "checked against PyTorch), torch, onnx", choices=ENGINES.names)
    compile: bool = option(False, "torch.compile the model for unfrozen phases (slow first step; falls back if "
                                  "it fails)")
    image_cache: bool = option(True, "keep large training images decoded and downsized (to 2x the input size) on "
                                     "disk", off="decode training images every epoch instead of keeping large ones "
                                                 "decoded and downsized (to 2x the input size) on disk")
    feature_cache: bool = option(True, "frozen phases run on cached backbone features",
                                 off="frozen phases run on augmented images instead of cached features")
    cache_dir: str | None = option(None, "root of the feature and image caches " + CACHE_DIR_DEFAULT)
    progress: bool = option(True, "progress bars", off="no progress bars")


@dataclass(frozen=True)
class TrackingConfig:
    """Where a run's parameters and metrics are also sent (train/tracking.py)."""

    track: str = option("", "experiment tracking, comma-separated: tensorboard (event files in RUN/tensorboard), "
                            "mlflow ($MLFLOW_TRACKING_URI, else RUNS/mlflow.db beside the runs), wandb ($WANDB_PROJECT, "
                            "$WANDB_MODE) (default: none)", parse=parse_track,
                        coerce=parse_track, metavar="BACKENDS")


@dataclass(frozen=True)
class BudgetConfig:
    """A wall-time budget for `train` (planning/budget.py plans within it; train/clock.py keeps it)."""

    time_budget: float | None = option(None, "train the best model that fits this wall time here (10m, 1h, "
                                             "seconds): costs are measured, then strategy, image size and epochs "
                                             "planned, and the run stops on time with the best weights so far "
                                             "(train only; cv, compare, advise and lr-find refuse it)",
                                       gt=0.0, parse=parse_duration, coerce=parse_duration, metavar="DURATION")


SECTION_TITLES = {"data": "data", "model": "model", "strategy": "strategy", "train": "training", "outputs": "outputs",
                  "augmentation": "augmentation", "runtime": "runtime", "tracking": "tracking", "budget": "time budget",
                  "": "run"}

# Before issue 35 the `train` section held every option of the sections below as well: a
# config.yaml written then (a run on a user's disk, a user's --config file) has them under
# `train:`. `old_layout_moved` reads such a file in today's layout; only that is written.
MOVED_FROM_TRAIN = {f.name: section for section, cls in (
    ("outputs", OutputConfig), ("augmentation", AugmentConfig), ("runtime", RuntimeConfig), ("tracking", TrackingConfig),
    ("budget", BudgetConfig)) for f in fields(cls)}


def old_layout_moved(raw: Any) -> Any:
    """`raw` (a config read from YAML) with the keys the old layout kept under `train:`
    moved to their sections (`train: {device: cpu}` -> `runtime: {device: cpu}`); a key
    that the file also gives in its new section keeps that section's value. Anything that
    is not a mapping is returned as it is (checked_dict says what is wrong with it)."""
    train = raw.get("train") if isinstance(raw, dict) else None
    if not isinstance(train, dict) or not any(k in MOVED_FROM_TRAIN for k in train):
        return raw
    out = {**raw, "train": {k: v for k, v in train.items() if k not in MOVED_FROM_TRAIN}}
    for key, value in train.items():
        if key in MOVED_FROM_TRAIN:
            section = out.get(MOVED_FROM_TRAIN[key])
            section = section if isinstance(section, dict) else {}
            out[MOVED_FROM_TRAIN[key]] = {key: value, **section}
    return out


@dataclass(frozen=True)
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    outputs: OutputConfig = field(default_factory=OutputConfig)
    augmentation: AugmentConfig = field(default_factory=AugmentConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    seed: int = option(0, "random seed of splits, initialisation, shuffling and augmentation", ge=0)
    output: str = option("runs", "folder: the parent of run directories (each run writes several files)",
                         metavar="FOLDER")
    name: str | None = option(None, "run directory name (default: time-backbone-strategy)")

    @classmethod
    def create(cls, base: RunConfig | None = None, **overrides: Any) -> RunConfig:
        """Return `base` (or the defaults) with flat overrides such as `epochs=3`.

        Keys are the options' flat names (`lr`, `backbone`, `valid_pct`...; the strategy
        name is `strategy`). Unknown keys raise a ConfigError with the closest valid names.
        """
        cfg = base or cls()
        index = option_index()
        changes: dict[str, dict[str, Any]] = {s: {} for s in SECTION_TITLES}
        for key, value in overrides.items():
            if key not in index:
                raise ConfigError(f"unknown option {key!r}; did you mean {_suggest(key)}?")
            section, name = index[key]
            changes[section][name] = _coerced(section, name, value)
        top = changes.pop("")
        new = {s: dataclasses.replace(getattr(cfg, s), **changes[s]) for s in changes}
        chosen = STRATEGIES.get(new["strategy"].name)
        if chosen is not None and chosen.random_init and new["model"].weights == "pretrained":
            new["model"] = dataclasses.replace(new["model"], weights="none")  # e.g. scratch = random init
        result = dataclasses.replace(cfg, **new, **top)
        result.validate()
        return result

    def refuse_time_budget(self, command: str, measures: str) -> None:
        """Only `train` takes a time budget (ConfigError elsewhere): `cv`, `compare`, `advise`
        and `lr-find` measure a configuration, while under a budget the clock chooses the
        strategy, image size and epochs and cuts each training where this machine's load puts
        the deadline, so the figures would measure no one configuration (and splitting the
        budget over folds would train weaker models than `train --time-budget` does)."""
        if self.budget.time_budget:
            raise ConfigError(f"{command} does not take --time-budget ({self.budget.time_budget:g} s): it {measures}, "
                              "while a time budget lets the clock choose the strategy, image size and epochs and "
                              "cuts each training where this machine's load puts the deadline. Leave --time-budget "
                              "out (or the time_budget key of --config) and set --epochs; to measure what `train "
                              "--time-budget` chose, pass the strategy, epochs and image size from its run's "
                              "time_budget.json")

    def bn_modes(self) -> tuple[str, str]:
        """(frozen_bn, trainable_bn) with 'auto' resolved: pretrained weights keep their
        BatchNorm statistics (Keras' fine-tuning advice); random init must learn them."""
        trainable = self.strategy.trainable_bn
        if trainable == "auto":
            trainable = "train" if self.model.weights == "none" else "eval"
        return self.strategy.frozen_bn, trainable

    def validate(self) -> None:
        """Raise ConfigError for values no run can use: every field's choices and bounds,
        then what the chosen strategy requires."""
        for section, obj in (*((s, getattr(self, s)) for s in SECTION_TITLES if s), ("", self)):
            check_fields(obj, section)
        t = self.train
        if t.batch_size != "auto" and (isinstance(t.batch_size, bool) or not isinstance(t.batch_size, int)
                                       or t.batch_size < 1):
            raise ConfigError(f"batch_size must be an integer >= 1 or 'auto', got {t.batch_size!r}")
        if self.strategy.name != "auto":
            problem = get_strategy(self.strategy.name).check
            why = problem(self) if problem else None
            if why:
                raise ConfigError(why)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RunConfig:
        """Rebuild from `to_dict()` output, or from a config.yaml in the layout before issue 35
        (`old_layout_moved`); unknown keys (from newer versions) are ignored."""
        kwargs: dict[str, Any] = {}
        raw = old_layout_moved(raw)
        for f in fields(cls):
            if f.name in SECTION_TITLES:
                section = raw.get(f.name) or {}
                known = {g.name for g in fields(f.default_factory)}  # type: ignore[arg-type]
                kwargs[f.name] = f.default_factory(**{k: _coerced(f.name, k, v)  # type: ignore[misc]
                                                      for k, v in section.items() if k in known})
            elif f.name in raw:
                kwargs[f.name] = raw[f.name]
        return cls(**kwargs)


def checked_dict(raw: Any, where: str) -> dict[str, Any]:
    """A user's YAML config checked key by key, in `to_dict()`'s shape: a section's keys
    under it (`train: {epochs: 10}`) or flat, as on the command line (`epochs: 10`). An
    unknown key is a ConfigError that names the closest known one, never silently ignored.
    The layout before issue 35 (`train: {epochs: 10, device: cpu}`) is read as today's."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of option names to values, got {type(raw).__name__}")
    raw = old_layout_moved(raw)
    sections = {f.name: {g.name for g in fields(f.default_factory)}  # type: ignore[arg-type]
                for f in fields(RunConfig) if f.name in SECTION_TITLES}
    top = {f.name for f in fields(RunConfig)} - set(sections)
    flat = {n: s for s, names in sections.items() for n in names}
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key in sections:
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: section {key!r} must be a mapping of its options")
            for name in value:
                if name not in sections[key]:  # under train: also the old layout's names (see MOVED_FROM_TRAIN)
                    known = sections[key] | (set(MOVED_FROM_TRAIN) if key == "train" else set())
                    close = difflib.get_close_matches(str(name), sorted(known), n=3)
                    raise ConfigError(f"{where}: unknown option {name!r} in section {key!r}"
                                      + (f"; did you mean {', '.join(repr(c) for c in close)}?" if close else
                                         f"; its options: {', '.join(sorted(sections[key]))}"))
            out.setdefault(key, {}).update(value)
        elif key in top:
            out[key] = value
        elif key in flat:
            out.setdefault(flat[key], {})[key] = value
        else:
            close = difflib.get_close_matches(str(key), sorted(top | set(flat) | set(sections)), n=3)
            raise ConfigError(f"{where}: unknown option {key!r}"
                              + (f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""))
    return out


def _coerced(section: str, name: str, value: Any) -> Any:
    field_ = next((f for s, f in option_fields() if s == section and f.name == name), None)
    coerce = field_.metadata.get("coerce") if field_ is not None else None
    return coerce(value) if coerce else value


def option_fields(section: type | None = None) -> Iterator[tuple[str, dataclasses.Field[Any]]]:
    """(section name, field) of every option: each section's fields, then the run's own
    (section ""). With `section`, only that dataclass's fields (section "")."""
    if section is not None:
        yield from (("", f) for f in fields(section))
        return
    for f in fields(RunConfig):
        if f.name in SECTION_TITLES:
            yield from ((f.name, g) for g in fields(f.default_factory))  # type: ignore[arg-type]
        else:
            yield "", f


def option_key(f: dataclasses.Field[Any]) -> str:
    return f.metadata.get("key") or f.name


def cli_option_keys() -> list[str]:
    """Flat keys of the options the command line offers."""
    return [option_key(f) for _, f in option_fields() if f.metadata.get("cli", True)]


def option_index() -> dict[str, tuple[str, str]]:
    """Flat option key -> (section, field name)."""
    return {option_key(f): (section, f.name) for section, f in option_fields()}


def choices_of(f: dataclasses.Field[Any]) -> tuple[str, ...] | None:
    choices = f.metadata.get("choices")
    return choices() if callable(choices) else choices


_BOUNDS = {"ge": (">=", lambda v, b: v >= b), "gt": (">", lambda v, b: v > b),
           "le": ("<=", lambda v, b: v <= b), "lt": ("<", lambda v, b: v < b)}


def check_fields(obj: Any, section: str = "") -> None:
    """Every choice and bound that `obj`'s option fields declare; a ConfigError names the
    option, what it got and what is valid."""
    for f in fields(obj):
        if not f.metadata or f.name in SECTION_TITLES:
            continue
        value, key = getattr(obj, f.name), option_key(f)
        choices = choices_of(f)  # None where None is the default: not given (a command's override)
        if choices is not None and value not in choices and not (value is None and f.default is None):
            raise ConfigError(f"{key} {value!r} is not valid; choose one of: {', '.join(choices)}")
        if value is None or isinstance(value, (str, bool)):
            continue
        for bound, (sign, ok) in _BOUNDS.items():
            limit = f.metadata.get(bound)
            if limit is not None and (math.isnan(value) or not ok(value, limit)):
                raise ConfigError(f"{key} must be {sign} {limit:g}, got {value}")


def _suggest(key: str) -> str:
    names = list(option_index())
    close = difflib.get_close_matches(key, names, n=3)
    return ", ".join(repr(c) for c in close) if close else "one of " + ", ".join(names)


# -- options that a run's other choices leave without effect --------------------------------
def _loop_free(cfg: RunConfig) -> bool:
    """feature-extract with the converged probe: the head is one logistic-regression fit on
    the frozen features (L2 chosen by cross-validation), no epochs of an optimizer."""
    return cfg.strategy.name == "feature-extract" and cfg.strategy.probe == "converged"


_PROBE = (lambda cfg: not _loop_free(cfg),
          "feature-extract's converged probe fits the head in one pass, with no optimizer, schedule or epochs "
          "(--probe sgd trains the head for --epochs with them)")
# option key -> (does it apply to this resolved config, what it applies with). Read by `ineffective`.
APPLIES: dict[str, tuple[Callable[[RunConfig], bool], str]] = {
    **{key: _PROBE for key in ("epochs", "lr", "optimizer", "momentum", "weight_decay", "schedule", "pct_start",
                               "step_size", "gamma", "patience", "min_delta")},
    "head_lr_mult": (lambda cfg: cfg.strategy.name != "feature-extract",
                     "it sets the backbone's LR, and feature-extract trains the head alone"),
    "step_size": (lambda cfg: _PROBE[0](cfg) and cfg.train.schedule == "step", "it applies with --schedule step"),
    "gamma": (lambda cfg: _PROBE[0](cfg) and cfg.train.schedule == "step", "it applies with --schedule step"),
    "pct_start": (lambda cfg: _PROBE[0](cfg) and cfg.train.schedule == "onecycle",
                  "it applies with --schedule onecycle"),
    "momentum": (lambda cfg: _PROBE[0](cfg) and cfg.train.optimizer == "sgd", "it applies with --optimizer sgd"),
    "ema_decay": (lambda cfg: cfg.train.ema, "it applies with --ema"),
    "freeze": (lambda cfg: cfg.strategy.name == "freeze-k", "it applies with --strategy freeze-k"),
    **{key: (lambda cfg: cfg.strategy.name == "gradual", "it applies with --strategy gradual")
       for key in ("freeze_epochs", "layer_lr_ratio", "unfreeze_lr_scale")},
    "consistency_threshold": (lambda cfg: cfg.data.unlabeled is not None, "it applies with --unlabeled"),
}


def ineffective(cfg: RunConfig, given: Iterator[str] | Any) -> list[str]:
    """One line per option in `given` (flat keys: what the user passed) that `cfg`, the run's
    resolved config (strategy 'auto' already chosen), leaves without effect, saying why."""
    lines = []
    for key in given:
        applies, why = APPLIES.get(key, (None, ""))
        if applies is not None and not applies(cfg):
            flag = "--" + key.replace("_", "-")
            lines.append(f"{flag} has no effect in this run: {why}")
    return lines
