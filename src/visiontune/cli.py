"""The `visiontune` command: the parser, and a dispatcher to the command bodies.

The run options (train, cv, compare, advise, lr-find) and the options of the commands
that use a run (predict, evaluate, interpret, suggest, serve, export, review:
command_config.py) are built by the same code from the config fields' metadata
(`config.option`), so an option exists in one place. This module imports only the config
and the strategy registry (no torch), so `--help` is instant; the command bodies
(`visiontune.commands`) are imported when a command runs.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import textwrap
import time
from collections.abc import Sequence
from typing import Any

from visiontune.caches import cache_areas
from visiontune.command_config import (
    EvaluateConfig,
    ExportConfig,
    InterpretConfig,
    PredictConfig,
    ReviewConfig,
    ServeConfig,
    SuggestConfig,
    command_fields,
)
from visiontune.config import (
    CACHE_DIR_DEFAULT,
    SECTION_TITLES,
    DataConfig,
    choices_of,
    option_fields,
    option_key,
)
from visiontune.errors import VisiontuneError
from visiontune.train.strategies import describe_strategies, strategy_names
from visiontune.version import __version__

EXAMPLES = """examples:
  visiontune train my_images --strategy gradual --epochs 5
  visiontune predict runs/<run> photo.jpg photos/
  visiontune evaluate runs/<run> my_images/val
  visiontune inspect tf_efficientnet_lite0 --strategy freeze-k --freeze 3
"""


# The environment variables visiontune reads, in one place: `visiontune --help` lists them and
# the generated CLI reference (docs/cli.md) shows them (tests/test_cli.py checks that every one
# the code reads is here).
ENVIRONMENT = {
    "VISIONTUNE_CACHE": "root of the caches (features, decoded images, probe fits, ONNX exports, datasets); "
                        "default $XDG_CACHE_HOME/visiontune, else ~/.cache/visiontune; --cache-dir overrides it",
    "XDG_CACHE_HOME": "where the cache lives when $VISIONTUNE_CACHE is not set (~/.cache)",
    "VISIONTUNE_CACHE_MAX": "the cache's size cap, e.g. 20G, 500M (0: no cap); least recently used entries are "
                            "removed after a run past it (default: 10G)",
    "VISIONTUNE_LOCK_WAIT": "seconds to wait for a cache another process holds locked before going on without it "
                            "(default: 60)",
    "VISIONTUNE_OFFLINE": "1: never reach the network for pretrained weights (as HF_HUB_OFFLINE=1)",
    "HF_HUB_OFFLINE": "1: Hugging Face weights and datasets from the local cache only",
    "HF_ENDPOINT": "the Hugging Face Hub's address (a mirror)",
    "MLFLOW_TRACKING_URI": "--track mlflow: where runs are logged (default: sqlite:///RUNS/mlflow.db)",
    "MLFLOW_EXPERIMENT_NAME": "--track mlflow: the experiment (default: visiontune)",
    "WANDB_PROJECT": "--track wandb: the project (default: visiontune)",
    "WANDB_LOG_MODEL": "--track wandb: end or true uploads the model at the end",
    "WANDB_MODE": "--track wandb: offline keeps the run local, to sync later",
    "RANK, WORLD_SIZE, LOCAL_RANK": "set by torchrun: train runs as one of several processes",
}

# What `visiontune` exits with, every command alike (tests/test_cli.py checks each).
EXIT_CODES = {
    0: "done",
    1: "a failure of ours: a bug, or nothing could be done (e.g. predict found no image it could read)",
    2: "your input: a bad option or value, a missing or unreadable file, data that cannot train; also export "
       "--int8 refused because the int8 model lost more than your --max-drop (the fp32 export is written)",
    130: "interrupted (Ctrl+C); a run keeps its last finished epoch (train --resume RUN)",
}


def _listed(title: str, entries: dict[Any, str]) -> str:
    """'title:' and one wrapped entry per line, the names in a column (the --help epilogs)."""
    width = max(len(str(name)) for name in entries)
    return f"{title}:\n" + "\n".join(
        textwrap.fill(text, 100, initial_indent=f"  {str(name):>{width}s}  " if isinstance(name, int) else
                      f"  {name:{width}s}  ", subsequent_indent=" " * (width + 4)) for name, text in entries.items())


def environment_text() -> str:
    """The environment variables (ENVIRONMENT), as `visiontune --help` and docs/cli.md list them."""
    return _listed("environment", ENVIRONMENT)


def exit_codes_text() -> str:
    """The exit status of every command (EXIT_CODES), as `visiontune --help` and docs/cli.md list them."""
    return _listed("exit status", EXIT_CODES)


def epilog() -> str:
    return f"strategies:\n{describe_strategies()}\n\n{EXAMPLES}"


STREAMS = ("Results go to stdout, messages (progress bars, warnings, errors) to stderr, in every command: -q keeps "
           "warnings and results only, --no-progress (or output that is not a terminal) hides the progress bars.")


def root_epilog() -> str:
    """`visiontune --help`'s epilog: the strategies, examples, environment and exit status."""
    return (f"{epilog()}\n{textwrap.fill(STREAMS, 100)}\n\n{environment_text()}\n\n{exit_codes_text()}\n")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every --help shows an option's default the same way: ' (5)' after its help, whether
    argparse holds the default (the hand-written options) or the config does (`_shown`);
    none for a flag or an option without a default."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        help = action.help or ""
        if action.nargs == 0 or action.default in (None, argparse.SUPPRESS) or not action.option_strings:
            return help
        return help + _shown(action.default).replace("%", "%%")


def _annotation_type(f: Any) -> Any:
    parse = f.metadata.get("parse")
    if parse is not None:
        def typed(text: str) -> Any:
            try:
                return parse(text)
            except ValueError as exc:
                raise argparse.ArgumentTypeError(str(exc)) from None
        return typed
    kind = _type_name(f)
    return int if kind.startswith("int") else float if kind.startswith("float") else str


def _type_name(f: Any) -> str:
    """The field's annotation as text ("int | None"), whether a string or a type."""
    return f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))


def _add_option(group: Any, f: Any) -> None:
    meta, key = f.metadata, option_key(f)
    if meta.get("positional"):  # a command's RUN, DATA...: command_config.argument
        group.add_argument(f.name, help=meta["help"], metavar=meta.get("metavar"),
                           **({"nargs": meta["nargs"]} if meta.get("nargs") else {}))
        return
    name = "--" + f.name.replace("_", "-")
    if _type_name(f) == "bool":
        flag = meta.get("flag") or (f"--no-{f.name.replace('_', '-')}" if f.default else name)
        group.add_argument(flag, dest=key, action="store_false" if f.default else "store_true", default=None,
                           help=meta.get("off") or meta["help"] if f.default else meta["help"])
        return
    flag = meta.get("flag") or ("--" + key.replace("_", "-"))
    if meta.get("append"):  # given once per value: command_config.repeated
        group.add_argument(flag, dest=key, action="append", default=None, metavar=meta.get("metavar"),
                           help=meta["help"])
        return
    group.add_argument(flag, *meta.get("also", ()), dest=key, type=_annotation_type(f), choices=choices_of(f),
                       default=None,
                       metavar=meta.get("metavar"), help=meta["help"] + _shown(f.default),
                       **({"nargs": meta["nargs"]} if meta.get("nargs") else {}))
    for alias, value in (meta.get("aliases") or {}).items():
        group.add_argument(alias, dest=key, action="store_const", const=value, help=f"same as {flag} {value}")


def _shown(default: Any) -> str:
    """A default as every --help shows it after the help: ' (default: 5)'; a blank one as
    ' (default: ' ')', none for None, '' or () (the help then says what happens, in the same
    words: '(default: the backbone's own)')."""
    if default is None or default == "" or default == ():
        return ""
    return f" (default: {default!r})" if isinstance(default, str) and not default.strip() else f" (default: {default})"


def add_command_options(p: argparse.ArgumentParser, config: type) -> None:
    """A use-command's arguments and options (predict, serve...), one per field of its
    config (command_config.py), made by the code that makes the run options."""
    for f in command_fields(config):
        _add_option(p, f)


def add_run_options(p: argparse.ArgumentParser, section: type | None = None, command: str = "") -> None:
    """Every CLI option of the run configuration (or of one `section` dataclass), one
    argument group per section, but those `command` does not use (`NOT_USED`): they are
    left out of its --help and still accepted, with a warning that they do nothing."""
    groups: dict[str, Any] = {}
    for name, f in option_fields(section):
        if not f.metadata or not f.metadata.get("cli", True):
            continue
        if option_key(f) in NOT_USED.get(command, ()):
            _add_unused(p, f, command)
            continue
        if name not in groups:
            groups[name] = p.add_argument_group(SECTION_TITLES.get(name, name))
        _add_option(groups[name], f)
    groups.setdefault("", p.add_argument_group("run")).add_argument(
        "--config", metavar="YAML", help="start from this config.yaml (e.g. a run's); keys in sections (train: {epochs: 10}) or flat "
                    "(epochs: 10); an unknown key is an error naming the closest; not with --resume")


# The training loop's options: what advise, which trains nothing, has no use for.
_LOOP = frozenset({"lr", "schedule", "pct_start", "step_size", "gamma", "momentum", "weight_decay", "patience",
                   "monitor", "mode", "min_delta", "restore_best", "ema", "ema_decay", "freeze", "layer_lr_ratio",
                   "unfreeze_lr_scale", "frozen_bn", "trainable_bn", "consistency_threshold", "thresholds",
                   "probe_patience"})
# Run options a run command does not read (tests/test_cli.py runs each command and checks that
# every other option it accepts is read): left out of its --help; given, they are accepted with
# a warning (old scripts passed them) and have no effect. advise times one fine-tuning step, so
# what shapes that step (optimizer, BatchNorm modes, EMA) stays.
NOT_USED: dict[str, frozenset[str]] = {
    "advise": _LOOP - {"lr", "weight_decay", "frozen_bn", "trainable_bn", "ema"} | {"output", "name", "track"},
    "lr-find": _LOOP - {"lr", "momentum", "weight_decay", "freeze", "frozen_bn", "trainable_bn", "ema"}
               | {"name", "track"},
    "shard": frozenset({"unlabeled", "consistency_threshold"}),
}


def _add_unused(p: argparse.ArgumentParser, f: Any, command: str) -> None:
    """A run option `command` does not use: hidden from --help, accepted (with its value, if
    it takes one) and answered with a warning, so a script that passed it keeps working."""
    meta, key = f.metadata, option_key(f)
    flag = meta.get("flag") or "--" + key.replace("_", "-")
    if _type_name(f) == "bool":
        flag = meta.get("flag") or (f"--no-{f.name.replace('_', '-')}" if f.default else flag)
    takes = 0 if _type_name(f) == "bool" else meta.get("nargs")
    p.add_argument(flag, *meta.get("also", ()), dest=f"unused_{key}", action=_Unused, command=command, nargs=takes,
                   help=argparse.SUPPRESS)
    for alias in meta.get("aliases") or {}:
        p.add_argument(alias, dest=f"unused_{key}", action=_Unused, command=command, nargs=0, help=argparse.SUPPRESS)


class _Unused(argparse.Action):
    """A flag the command accepts and ignores: one warning line (stderr) when given."""

    def __init__(self, *args: Any, command: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.command = command

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        print(f"warning: {self.command} does not use {option_string}: it has no effect here (accepted so that old "
              "scripts keep working; leave it out)", file=sys.stderr)


def _add_training_commands(sub: Any) -> None:
    p = sub.add_parser("train", help="fine-tune a backbone on a folder of images",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=epilog())
    p.add_argument("data", nargs="?", help="folder: <class>/ subfolders, or train/ + valid|val/ (+ test/)")
    p.add_argument("--resume", metavar="RUN", help="continue RUN from its last checkpoint")
    add_run_options(p)

    p = sub.add_parser("cv", help="stratified k-fold cross-validation with out-of-fold probabilities")
    p.add_argument("data", help="folder of images (train + valid images are pooled; test/ stays out)")
    p.add_argument("--folds", type=int, default=5, help="folds: each image is held out once")
    p.add_argument("--selection", choices=("inner", "last"), default="inner",
                   help="how each fold chooses its epoch: inner (an inner validation split of the fold's training "
                        "part) or last (a fixed budget, last epoch); the held-out fold is never looked at (inner)")
    add_run_options(p)

    p = sub.add_parser("advise", help="measure the data and the task similarity, recommend a strategy")
    p.add_argument("data", help="folder of images")
    add_run_options(p, command="advise")

    p = sub.add_parser("lr-find", help="learning-rate range test: suggested LR and a plot")
    p.add_argument("data", help="folder of images")
    p.add_argument("--plot", default=None, metavar="FILE",
                   help="the plot's file (default: lr_find.png in --output's folder)")
    p.add_argument("--num-iter", type=int, default=100, help="steps of the range test, each at a higher LR")
    add_run_options(p, command="lr-find")

    p = sub.add_parser("compare", help="every strategy on the same split, seed and epochs, in one table")
    p.add_argument("data", help="folder of images")
    p.add_argument("--strategies", default=",".join(strategy_names()),
                   help="comma-separated strategies to compare")
    p.add_argument("--folds", type=int, help="cross-validate each strategy: mean +- std")
    add_run_options(p)


def _add_suggest_command(sub: Any) -> None:
    p = sub.add_parser("suggest", help="which unlabelled images to label next (typical images first, then the "
                       "model's least sure ones, spread out), written to a CSV that train --csv reads back")
    add_command_options(p, SuggestConfig)


def _add_review_command(sub: Any) -> None:
    p = sub.add_parser("review", help="in the browser: a run's suspected mislabels, top losses, duplicates and "
                       "outliers (keep / relabel / exclude, into RUN/review/ for train --relabel/--exclude), or "
                       "--label: the images of a suggestions CSV to label one by one")
    add_command_options(p, ReviewConfig)


def _add_use_commands(sub: Any) -> None:
    p = sub.add_parser("predict", help="classify image files and folders with a trained run")
    add_command_options(p, PredictConfig)

    p = sub.add_parser("evaluate", help="metrics, per-class (per-label) report and confusion on labelled images")
    add_command_options(p, EvaluateConfig)

    p = sub.add_parser("serve", help="web page + JSON API on localhost: drop an image, see the top-k labels")
    add_command_options(p, ServeConfig)


def _add_share_commands(sub: Any) -> None:
    p = sub.add_parser("export", help="ONNX, torch.export (pt2), timm/Hub folder or TorchScript, with class names "
                       "and preprocessing inside; checked against the eager model")
    add_command_options(p, ExportConfig)

    p = sub.add_parser("push", help="upload the run to the Hugging Face Hub in timm's layout (needs a network "
                       "and a token: hf auth login)")
    p.add_argument("run", help="run directory")
    p.add_argument("repo_id", help="user/name on the Hub")
    p.add_argument("--private", action="store_true", help="create the Hub repository private")


def _add_look_commands(sub: Any) -> None:
    p = sub.add_parser("inspect", help="module tree, trainable parameters and LR of every group",
                       epilog="examples:\n  visiontune inspect tf_efficientnet_lite0 --strategy freeze-k --freeze 3\n"
                              "  visiontune inspect runs/<run>", formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", help="backbone name (timm:<name>, torchvision:<name>) or a run directory")
    p.add_argument("--strategy", choices=strategy_names(), default="gradual", help="whose trainable groups and LRs "
                   "to show")
    p.add_argument("--freeze", type=int, help="freeze-k: leading groups to freeze")
    p.add_argument("--num-classes", type=int, default=2, help="width of the new head")
    p.add_argument("--depth", type=int, default=2, help="module tree depth")
    p.add_argument("--weights", default="none", help="weights to build with (none: structure only)")
    p.add_argument("--parameters", action="store_true", help="also list every named parameter and the state_dict")
    p.add_argument("--lr", type=float, help="peak LR of the head, as train's (default: the strategy's)")
    p.add_argument("--optimizer", choices=("adamw", "sgd"), help="as train's (default: adamw)")
    p.add_argument("--head-lr-mult", type=float, help="head LR / backbone LR, as train's (default: 10.0)")

    p = sub.add_parser("interpret", help="confusion, top losses, Grad-CAM, suspected mislabels, duplicates, "
                       "curves and report.html in RUN/interpret/")
    add_command_options(p, InterpretConfig)


def _add_data_commands(sub: Any) -> None:
    p = sub.add_parser("shard", help="write any source train accepts as WebDataset tar shards (SHARDS/train-000000.tar, "
                       "valid-, test-; dataset.json, index.csv), for `visiontune train SHARDS`")
    p.add_argument("data", nargs="?", help="folder of images (or --csv), as for train")
    p.add_argument("--output", "--out", dest="out", action=_Renamed, required=True, metavar="FOLDER",
                   help="folder for the shards, dataset.json and index.csv")
    p.add_argument("--size", type=int, default=1000, help="samples per shard")
    p.add_argument("--shard-bytes", type=int, default=3_000_000_000,
                   help="a shard also ends once it holds this many bytes (webdataset's maxsize)")
    add_run_options(p, DataConfig, command="shard")
    p.add_argument("--seed", type=int, help="seed of the valid split and of the training samples' order (default: 0)")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None, help="no progress bar")

    p = sub.add_parser("cache", help="what the cache holds (features, decoded images, probe fits, ONNX exports, "
                       "Hugging Face datasets) and "
                       "clearing it", epilog="examples:\n  visiontune cache info\n  visiontune cache clear "
                       "--older-than 30d\n  visiontune cache clear --only images",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=("info", "clear"), help="info: sizes by area and the cap; clear: remove entries")
    p.add_argument("--older-than", metavar="DURATION", help="clear: only entries unused this long, e.g. 30d or 12h")
    p.add_argument("--only", default=",".join(cache_areas()), metavar="AREAS",
                   help="clear: comma-separated areas to clear")
    p.add_argument("--cache-dir", help="the cache's root " + CACHE_DIR_DEFAULT)

    p = sub.add_parser("imagify", help="time series in a CSV -> Gramian Angular Field / recurrence images "
                       "in OUT/<label>/, ready for train")
    p.add_argument("table", help="CSV: one series per row plus a label column (or a long table with --value-col)")
    p.add_argument("--kind", choices=("gadf", "gasf", "recurrence"), default="gadf",
                   help="Gramian angular difference / summation field, or recurrence plot")
    p.add_argument("--output", "--out", dest="out", action=_Renamed, required=True, metavar="FOLDER",
                   help="folder for the images, FOLDER/<label>/ (and groups.csv)")
    p.add_argument("--csv-label-col", "--label-col", dest="csv_label_col", action=_Renamed, default="label",
                   metavar="COL", help="CSV column holding the labels, as train's --csv-label-col")
    p.add_argument("--value-col", help="long table: the column holding the series (one point per row)")
    p.add_argument("--group-col", help="column naming each row's recording (subject, session...): windows never "
                   "cross recordings, and each recording stays in one split and fold (written to OUT/groups.csv)")
    p.add_argument("--window", type=int, help="points per image (windows of a long series)")
    p.add_argument("--stride", type=int, help="points between window starts (default: --window)")
    p.add_argument("--size", type=int, default=64, help="image side = series length after PAA")
    p.add_argument("--min-length", type=int, default=8, help="shorter series are skipped")

    p = sub.add_parser("demo", help="the main job: write scikit-image's faces/non-faces set as an image "
                       "folder, fine-tune the default pretrained backbone on it, print validation metrics")
    p.add_argument("--output", "--out", dest="out", action=_Renamed, default="demo", metavar="FOLDER",
                   help="working folder: the images and the runs")
    p.add_argument("--strategy", choices=strategy_names(), default="gradual", help="as train's")
    p.add_argument("--epochs", type=int, default=4, help="as train's")
    p.add_argument("--image-size", type=int, default=128, help="as train's")


class _Renamed(argparse.Action):
    """An option with an old name after its new one (--output, --out: --out in shard, imagify
    and demo; imagify's --csv-label-col, --label-col): the old name still works and says so."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        if option_string != self.option_strings[0]:
            print(f"warning: {option_string} is now {self.option_strings[0]} ({option_string} still works)",
                  file=sys.stderr)
        setattr(namespace, self.dest, values)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="visiontune",
        description="Teach a pretrained vision model a new image-classification task.",
        formatter_class=HelpFormatter,
        epilog=root_epilog(),
    )
    parser.add_argument("--version", action="version", version=f"visiontune {__version__}")
    _add_verbosity(parser)
    parser.set_defaults(quiet=False, verbose=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_training_commands(sub)
    _add_suggest_command(sub)
    _add_review_command(sub)
    _add_use_commands(sub)
    _add_share_commands(sub)
    _add_look_commands(sub)
    _add_data_commands(sub)
    for name, command in sub.choices.items():  # -q / -v after the command too; examples in every --help
        _add_verbosity(command)
        command.formatter_class = HelpFormatter  # defaults shown one way in every --help
        if name in COMMAND_EXAMPLES and not command.epilog:
            command.epilog = "examples:\n" + "\n".join(f"  visiontune {line}" for line in COMMAND_EXAMPLES[name])
    return parser


# Each command's examples, shown by its --help (tests/test_bundle_cli.py parses every one).
COMMAND_EXAMPLES = {
    "cv": ["cv my_images --folds 5", "cv data/photos --strategy feature-extract --groups patient"],
    "advise": ["advise my_images", "advise data/photos --image-size 160"],
    "lr-find": ["lr-find my_images --strategy finetune", "lr-find data/photos --num-iter 200 --plot lr.png"],
    "compare": ["compare my_images --epochs 3", "compare data/photos --strategies feature-extract,gradual"],
    "predict": ["predict runs/<run> photo.jpg photos/", "predict runs/<run> photos/ --top-k 1 --output preds.csv",
                "predict runs/<run>/model.onnx photos/"],
    "evaluate": ["evaluate runs/<run> my_images/val", "evaluate runs/<run> test/ --output metrics.json"],
    "serve": ["serve runs/<run>", "serve runs/<run> --port 8080"],
    "export": ["export runs/<run> --format onnx", "export runs/<run> --format onnx --int8 --max-drop 0.5",
               "export runs/<run> --format timm --output hub/"],
    "push": ["push runs/<run> me/ants-vs-bees --private"],
    "interpret": ["interpret runs/<run>", "interpret runs/<run> my_images --top-n 24"],
    "shard": ["shard data/photos --output shards/ --size 1000", "shard --csv labels.csv --output shards/"],
    "imagify": ["imagify waves.csv --kind gadf --output waves_img --size 64"],
    "suggest": ["suggest photos/ --n 100 --output to_label.csv",
                "suggest photos/ --run runs/<run> --n 50 --method diverse", "suggest photos/ --csv to_label.csv"],
    "review": ["review runs/<run>", "review --label to_label.csv",
               "review --label to_label.csv --classes ants,bees --port 8080"],
    "demo": ["demo", "demo --strategy feature-extract --output demo"],
}


def _add_verbosity(parser: argparse.ArgumentParser) -> None:
    """-q / -v, defaulting to SUPPRESS so that a command's unset flag never overrides the one
    given before the command (the top-level parser sets the real defaults)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                       help="only warnings and results")
    group.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                       help="visiontune's debug messages too")


def main(argv: Sequence[str] | None = None) -> int:
    started = time.perf_counter()  # --time-budget counts from here: the imports below are part of the run
    args = build_parser().parse_args(argv)
    args.started = started
    if args.quiet and args.verbose:
        build_parser().error("-q and -v: choose one")
    # the libraries' warnings, and our own messages; their info (ORT's quantiser, MLflow's
    # schema set-up, timm's loading) is noise here
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    ours = logging.getLogger("visiontune")
    level = ours.level  # put back after: main() called in-process (tests, notebooks) leaves no trace
    ours.setLevel(logging.WARNING if args.quiet else logging.DEBUG if args.verbose else logging.INFO)
    try:
        commands = importlib.import_module("visiontune.commands")  # heavy imports only once a command runs
        return int(commands.COMMANDS[args.command](args))
    except VisiontuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        kept = "; the last finished epoch is kept in the run directory (--resume RUN)" if args.command == "train" else ""
        print(f"interrupted{kept}", file=sys.stderr)
        return 130
    finally:
        ours.setLevel(level)


if __name__ == "__main__":
    sys.exit(main())
