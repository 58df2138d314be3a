"""The resolved configuration of a run: frozen dataclasses, the single source of truth.

A `RunConfig` is built from Python keyword overrides (`RunConfig.create(epochs=3)`) or by
the CLI, is written into every run directory as `config.yaml`, and is read back by
`predict`, `evaluate` and `--resume`.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field, fields
from typing import Any

from visiontune.errors import ConfigError

STRATEGIES = ("feature-extract", "finetune", "freeze-k", "gradual", "scratch")
OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("onecycle", "cosine", "step", "constant")
DEFAULT_BACKBONE = "timm:tf_efficientnet_lite0"


@dataclass(frozen=True)
class DataConfig:
    """Where the images are and how labels and splits are found."""

    path: str = ""
    csv: str | None = None  # CSV of path,label[,split]; paths relative to the CSV's folder
    csv_path_col: str | None = None  # default: a column named path/file/filename/image, else 1st
    csv_label_col: str | None = None  # default: a column named label/class/target, else 2nd
    label_regex: str | None = None  # label = group 1 of this regex matched on the file name
    label_func: str | None = None  # name of the Python function used (recorded, not re-run)
    valid_pct: float = 0.2  # used when the data has no valid/ split
    relabel: str | None = None  # CSV path,label: corrected labels, applied without touching files
    exclude: str | None = None  # file of paths (one per line, or a CSV's first column) to leave out
    verify_images: bool = True  # decode every image once while scanning; excludes corrupt ones


@dataclass(frozen=True)
class ModelConfig:
    """Which backbone, which weights, which head, which input size."""

    backbone: str = DEFAULT_BACKBONE  # "timm:<name>", "torchvision:<name>" or a bare timm name
    weights: str = "pretrained"  # pretrained | none | path to .pth/.pt/.safetensors
    image_size: int | None = None  # None: the backbone's own input size
    head_hidden: int = 0  # 0: one linear layer; N: linear(N) + ReLU + dropout + linear
    head_dropout: float = 0.0
    head_init_gain: float = 0.1  # xavier gain of the final layer (small: starting loss ~ ln C)
    warm_start: bool = True  # head rows of classes named like ImageNet classes start from those rows


@dataclass(frozen=True)
class StrategyConfig:
    """What trains, and at which learning rate relative to `TrainConfig.lr`."""

    name: str = "gradual"
    head_lr_mult: float = 10.0  # head LR / backbone LR (d2l 14.2: 10x for the new layer)
    freeze: int | None = None  # freeze-k: leading backbone layer groups kept frozen; None: half of them
    freeze_epochs: int = 1  # gradual: head-only epochs before unfreezing
    layer_lr_ratio: float = 10.0  # gradual: last / first backbone group LR after unfreezing
    unfreeze_lr_scale: float = 0.5  # gradual: LR scale after unfreezing (fastai halves it)
    frozen_bn: str = "eval"  # BatchNorm in frozen groups: eval (keep statistics) | train
    trainable_bn: str = "auto"  # BatchNorm in training groups: train | eval | auto (eval when pretrained)


@dataclass(frozen=True)
class TrainConfig:
    """How the loop runs."""

    epochs: int = 5  # total, all phases included
    batch_size: int | str = 32  # or "auto": the largest that fits (see batchsize.py)
    lr: float | None = None  # peak LR of the head; None: 2e-3 (adamw, as fastai) or 1e-2 (sgd)
    optimizer: str = "adamw"
    momentum: float = 0.9
    weight_decay: float | None = None  # None: 0.01 (adamw) or 1e-4 (sgd); never on 1-D params
    schedule: str = "onecycle"
    pct_start: float = 0.25  # onecycle / cosine warm-up fraction of each phase
    step_size: int = 2  # step schedule: epochs between LR drops
    gamma: float = 0.1  # step schedule: LR factor per drop
    label_smoothing: float = 0.0
    balance: str = "none"  # none | weights (class-weighted loss) | oversample (weighted sampler)
    monitor: str = "auto"  # early stopping / best checkpoint metric; auto: val_loss (macro_f1 if imbalanced)
    mode: str = "auto"  # min | max | auto (min for *loss*, max otherwise)
    patience: int = 3  # epochs without improvement before stopping; 0 disables
    min_delta: float = 0.0
    restore_best: bool = True
    augment: bool = True  # random resized crop + flip on train images
    hflip: float = 0.5
    min_scale: float = 0.35  # random resized crop: smallest area fraction
    num_workers: int | None = None  # None: chosen from the machine
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    channels_last: bool = True  # NHWC memory format: ~2x faster depthwise convs on CPU
    precision: str = "auto"  # auto | fp32 | bf16 | fp16: autocast; auto = bf16 (fp16) on CUDA, fp32 on CPU
    compile: bool = False  # torch.compile the model for unfrozen phases
    image_cache: bool = True  # keep large images decoded and resized on disk between epochs
    feature_cache: bool = True  # frozen-backbone phases train the head on cached features
    cache_dir: str | None = None  # None: $VISIONTUNE_CACHE or ~/.cache/visiontune
    progress: bool = True

    def resolved_lr(self) -> float:
        if self.lr is not None:
            return self.lr
        return 2e-3 if self.optimizer == "adamw" else 1e-2

    def resolved_weight_decay(self) -> float:
        if self.weight_decay is not None:
            return self.weight_decay
        return 0.01 if self.optimizer == "adamw" else 1e-4


@dataclass(frozen=True)
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    seed: int = 0
    output: str = "runs"  # parent folder of run directories
    name: str | None = None  # run directory name; None: time + backbone + strategy

    @classmethod
    def create(cls, base: RunConfig | None = None, **overrides: Any) -> RunConfig:
        """Return `base` (or the defaults) with flat overrides such as `epochs=3`.

        Keys are field names of any section (`lr`, `backbone`, `valid_pct`...); the strategy
        name is `strategy`. Unknown keys raise a ConfigError with the closest valid names.
        """
        cfg = base or cls()
        sections = {"data": cfg.data, "model": cfg.model, "strategy": cfg.strategy, "train": cfg.train}
        changes: dict[str, dict[str, Any]] = {k: {} for k in sections}
        top: dict[str, Any] = {}
        for key, value in overrides.items():
            if key == "strategy":
                changes["strategy"]["name"] = value
                continue
            if key in ("seed", "output", "name"):
                top[key] = value
                continue
            owner = next((s for s, obj in sections.items() if key in _field_names(obj)), None)
            if owner is None:
                raise ConfigError(f"unknown option {key!r}; did you mean {_suggest(key)}?")
            changes[owner][key] = value
        new = {s: dataclasses.replace(obj, **changes[s]) for s, obj in sections.items()}
        if new["strategy"].name == "scratch" and new["model"].weights == "pretrained":
            new["model"] = dataclasses.replace(new["model"], weights="none")  # scratch = random init
        result = dataclasses.replace(cfg, **new, **top)
        result.validate()
        return result

    def bn_modes(self) -> tuple[str, str]:
        """(frozen_bn, trainable_bn) with 'auto' resolved: pretrained weights keep their
        BatchNorm statistics (Keras' fine-tuning advice); random init must learn them."""
        trainable = self.strategy.trainable_bn
        if trainable == "auto":
            trainable = "train" if self.model.weights == "none" else "eval"
        return self.strategy.frozen_bn, trainable

    def validate(self) -> None:
        """Raise ConfigError for values no run can use."""
        s, t, d = self.strategy, self.train, self.data
        _check_choice("strategy", s.name, STRATEGIES + ("auto",))
        _check_choice("optimizer", t.optimizer, OPTIMIZERS)
        _check_choice("schedule", t.schedule, SCHEDULES)
        _check_choice("frozen_bn", s.frozen_bn, ("eval", "train"))
        _check_choice("trainable_bn", s.trainable_bn, ("auto", "eval", "train"))
        _check_choice("mode", t.mode, ("auto", "min", "max"))
        _check_choice("balance", t.balance, ("none", "weights", "oversample"))
        if t.epochs < 1:
            raise ConfigError(f"epochs must be >= 1, got {t.epochs}")
        if t.batch_size != "auto" and (isinstance(t.batch_size, bool) or not isinstance(t.batch_size, int)
                                       or t.batch_size < 1):
            raise ConfigError(f"batch_size must be an integer >= 1 or 'auto', got {t.batch_size!r}")
        _check_choice("precision", t.precision, PRECISIONS)
        if not 0.0 <= d.valid_pct < 1.0:
            raise ConfigError(f"valid_pct must be in [0, 1), got {d.valid_pct}")
        if s.name == "gradual" and t.epochs <= s.freeze_epochs:
            raise ConfigError(
                f"strategy 'gradual' trains the head for freeze_epochs={s.freeze_epochs} and then"
                f" the whole model, so epochs must exceed it (got epochs={t.epochs});"
                " raise --epochs or lower --freeze-epochs"
            )
        if s.name == "freeze-k" and s.freeze is not None and s.freeze < 0:
            raise ConfigError(f"freeze must be >= 0, got {s.freeze}")
        if s.head_lr_mult <= 0 or s.layer_lr_ratio <= 0:
            raise ConfigError("head_lr_mult and layer_lr_ratio must be > 0")
        if t.lr is not None and t.lr <= 0:
            raise ConfigError(f"lr must be > 0, got {t.lr}")
        if s.name == "scratch" and self.model.weights not in ("none", "pretrained"):
            raise ConfigError(
                "strategy 'scratch' trains from random initialisation; drop --weights "
                f"{self.model.weights!r} or pick another strategy"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RunConfig:
        """Rebuild from `to_dict()` output; unknown keys (from newer versions) are ignored."""
        parts = {
            "data": DataConfig,
            "model": ModelConfig,
            "strategy": StrategyConfig,
            "train": TrainConfig,
        }
        kwargs: dict[str, Any] = {}
        for name, klass in parts.items():
            section = raw.get(name) or {}
            known = {f.name for f in fields(klass)}
            kwargs[name] = klass(**{k: v for k, v in section.items() if k in known})
        for key in ("seed", "output", "name"):
            if key in raw:
                kwargs[key] = raw[key]
        return cls(**kwargs)


PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def _field_names(obj: Any) -> set[str]:
    return {f.name for f in fields(obj)}


def _all_option_names() -> list[str]:
    names = ["strategy", "seed", "output", "name"]
    for klass in (DataConfig, ModelConfig, StrategyConfig, TrainConfig):
        names += [f.name for f in fields(klass) if f.name != "name"]
    return names


def _suggest(key: str) -> str:
    close = difflib.get_close_matches(key, _all_option_names(), n=3)
    return ", ".join(repr(c) for c in close) if close else "one of " + ", ".join(_all_option_names())


def _check_choice(what: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ConfigError(f"{what} {value!r} is not valid; choose one of: {', '.join(valid)}")
