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
from visiontune.config import SECTION_TITLES, DataConfig, choices_of, option_fields, option_key
from visiontune.errors import VisiontuneError
from visiontune.train.strategies import describe_strategies, strategy_names
from visiontune.version import __version__

EXAMPLES = """examples:
  visiontune train data/hymenoptera --strategy gradual --epochs 5
  visiontune predict runs/<run> photo.jpg photos/
  visiontune evaluate runs/<run> data/hymenoptera/val
  visiontune inspect tf_efficientnet_lite0 --strategy freeze-k --freeze 3
"""


def epilog() -> str:
    return f"strategies:\n{describe_strategies()}\n\n{EXAMPLES}"


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
    group.add_argument(flag, dest=key, type=_annotation_type(f), choices=choices_of(f), default=None,
                       metavar=meta.get("metavar"), help=meta["help"] + _shown(f.default),
                       **({"nargs": meta["nargs"]} if meta.get("nargs") else {}))
    for alias, value in (meta.get("aliases") or {}).items():
        group.add_argument(alias, dest=key, action="store_const", const=value, help=f"same as {flag} {value}")


def _shown(default: Any) -> str:
    """A default as --help shows it after the help: ' (5)'; a blank one as ' (' ')', none for
    None, '' or ()."""
    if default is None or default == "" or default == ():
        return ""
    return f" ({default!r})" if isinstance(default, str) and not default.strip() else f" ({default})"


def add_command_options(p: argparse.ArgumentParser, config: type) -> None:
    """A use-command's arguments and options (predict, serve...), one per field of its
    config (command_config.py), made by the code that makes the run options."""
    for f in command_fields(config):
        _add_option(p, f)


def add_run_options(p: argparse.ArgumentParser, section: type | None = None) -> None:
    """Every CLI option of the run configuration (or of one `section` dataclass), one
    argument group per section."""
    groups: dict[str, Any] = {}
    for name, f in option_fields(section):
        if not f.metadata or not f.metadata.get("cli", True):
            continue
        if name not in groups:
            groups[name] = p.add_argument_group(SECTION_TITLES.get(name, name))
        _add_option(groups[name], f)
    groups.setdefault("", p.add_argument_group("run")).add_argument(
        "--config", metavar="YAML", help="start from this config.yaml (e.g. a run's); keys in sections (train: {epochs: 10}) or flat "
                    "(epochs: 10); an unknown key is an error naming the closest; not with --resume")


def _add_training_commands(sub: Any) -> None:
    p = sub.add_parser("train", help="fine-tune a backbone on a folder of images",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=epilog())
    p.add_argument("data", nargs="?", help="folder: <class>/ subfolders, or train/ + valid|val/ (+ test/)")
    p.add_argument("--resume", metavar="RUN", help="continue RUN from its last checkpoint")
    add_run_options(p)

    p = sub.add_parser("cv", help="stratified k-fold cross-validation with out-of-fold probabilities")
    p.add_argument("data", help="folder of images (train + valid images are pooled; test/ stays out)")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--selection", choices=("inner", "last"), default="inner",
                   help="how each fold chooses its epoch: inner (an inner validation split of the fold's training "
                        "part) or last (a fixed budget, last epoch); the held-out fold is never looked at (inner)")
    add_run_options(p)

    p = sub.add_parser("advise", help="measure the data and the task similarity, recommend a strategy")
    p.add_argument("data", help="folder of images")
    add_run_options(p)

    p = sub.add_parser("lr-find", help="learning-rate range test: suggested LR and a plot")
    p.add_argument("data", help="folder of images")
    p.add_argument("--plot", default=None, help="where to save the plot (default: lr_find.png in --output, runs/)")
    p.add_argument("--num-iter", type=int, default=100)
    add_run_options(p)

    p = sub.add_parser("compare", help="every strategy on the same split, seed and epochs, in one table")
    p.add_argument("data", help="folder of images")
    p.add_argument("--strategies", default=",".join(strategy_names()),
                   help=f"comma-separated (default: all of {', '.join(strategy_names())})")
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
    p.add_argument("--private", action="store_true")


def _add_look_commands(sub: Any) -> None:
    p = sub.add_parser("inspect", help="module tree, trainable parameters and LR of every group",
                       epilog="examples:\n  visiontune inspect tf_efficientnet_lite0 --strategy freeze-k --freeze 3\n"
                              "  visiontune inspect runs/<run>", formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", help="backbone name (timm:<name>, torchvision:<name>) or a run directory")
    p.add_argument("--strategy", choices=strategy_names(), default="gradual")
    p.add_argument("--freeze", type=int, help="freeze-k: leading groups to freeze")
    p.add_argument("--num-classes", type=int, default=2)
    p.add_argument("--depth", type=int, default=2, help="module tree depth (2)")
    p.add_argument("--weights", default="none", help="weights to build with (none: structure only)")
    p.add_argument("--parameters", action="store_true", help="also list every named parameter and the state_dict")
    p.add_argument("--lr", type=float)
    p.add_argument("--optimizer", choices=("adamw", "sgd"))
    p.add_argument("--head-lr-mult", type=float)

    p = sub.add_parser("interpret", help="confusion, top losses, Grad-CAM, suspected mislabels, duplicates, "
                       "curves and report.html in RUN/interpret/")
    add_command_options(p, InterpretConfig)


def _add_data_commands(sub: Any) -> None:
    p = sub.add_parser("shard", help="write any source train accepts as WebDataset tar shards (SHARDS/train-000000.tar, "
                       "valid-, test-; dataset.json, index.csv), for `visiontune train SHARDS`")
    p.add_argument("data", nargs="?", help="folder of images (or --csv), as for train")
    p.add_argument("--output", "--out", dest="out", action=_Output, required=True, help="folder for the shards")
    p.add_argument("--size", type=int, default=1000, help="samples per shard (1000)")
    p.add_argument("--shard-bytes", type=float, default=3e9,
                   help="a shard also ends once it holds this many bytes (3e9, webdataset's maxsize)")
    add_run_options(p, DataConfig)
    p.add_argument("--seed", type=int, help="seed of the valid split and of the training samples' order (0)")

    p = sub.add_parser("cache", help="what the cache holds (features, decoded images, probe fits, ONNX exports, "
                       "Hugging Face datasets) and "
                       "clearing it", epilog="examples:\n  visiontune cache info\n  visiontune cache clear "
                       "--older-than 30d\n  visiontune cache clear --only images",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=("info", "clear"))
    p.add_argument("--older-than", metavar="DURATION", help="clear: only entries unused this long (30d, 12h)")
    p.add_argument("--only", default=",".join(cache_areas()), metavar="AREAS",
                   help=f"clear: comma-separated areas ({', '.join(cache_areas())}; default all)")
    p.add_argument("--cache-dir", help="the cache's root ($VISIONTUNE_CACHE or ~/.cache/visiontune)")

    p = sub.add_parser("imagify", help="time series in a CSV -> Gramian Angular Field / recurrence images "
                       "in OUT/<label>/, ready for train")
    p.add_argument("table", help="CSV: one series per row plus a label column (or a long table with --value-col)")
    p.add_argument("--kind", choices=("gadf", "gasf", "recurrence"), default="gadf")
    p.add_argument("--output", "--out", dest="out", action=_Output, required=True, help="output folder")
    p.add_argument("--label-col", default="label")
    p.add_argument("--value-col", help="long table: the column holding the series (one point per row)")
    p.add_argument("--group-col", help="column naming each row's recording (subject, session...): windows never "
                   "cross recordings, and each recording stays in one split and fold (written to OUT/groups.csv)")
    p.add_argument("--window", type=int, help="points per image (windows of a long series)")
    p.add_argument("--stride", type=int, help="points between window starts (= --window)")
    p.add_argument("--size", type=int, default=64, help="image side = series length after PAA (64)")
    p.add_argument("--min-length", type=int, default=8, help="shorter series are skipped (8)")

    p = sub.add_parser("demo", help="the main job: write scikit-image's faces/non-faces set as an image "
                       "folder, fine-tune the default pretrained backbone on it, print validation metrics")
    p.add_argument("--output", "--out", dest="out", action=_Output, default="demo", help="working folder (demo)")
    p.add_argument("--strategy", choices=strategy_names(), default="gradual")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--image-size", type=int, default=128)


class _Output(argparse.Action):
    """--output, where every command writes; --out (its old name in shard, imagify and demo)
    still works and says so."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        if option_string == "--out":
            print("warning: --out is now --output (--out still works)", file=sys.stderr)
        setattr(namespace, self.dest, values)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="visiontune",
        description="Teach a pretrained vision model a new image-classification task.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=epilog(),
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
        if name in COMMAND_EXAMPLES and not command.epilog:
            command.epilog = "examples:\n" + "\n".join(f"  visiontune {line}" for line in COMMAND_EXAMPLES[name])
            command.formatter_class = argparse.RawDescriptionHelpFormatter
    return parser


# Each command's examples, shown by its --help (tests/test_bundle_cli.py parses every one).
COMMAND_EXAMPLES = {
    "cv": ["cv data/hymenoptera --folds 5", "cv data/photos --strategy feature-extract --groups patient"],
    "advise": ["advise data/hymenoptera", "advise data/photos --image-size 160"],
    "lr-find": ["lr-find data/hymenoptera --strategy finetune", "lr-find data/photos --num-iter 200 --plot lr.png"],
    "compare": ["compare data/hymenoptera --epochs 3", "compare data/photos --strategies feature-extract,gradual"],
    "predict": ["predict runs/<run> photo.jpg photos/", "predict runs/<run> photos/ --top-k 1 --output preds.csv",
                "predict runs/<run>/model.onnx photos/"],
    "evaluate": ["evaluate runs/<run> data/hymenoptera/val", "evaluate runs/<run> test/ --output metrics.json"],
    "serve": ["serve runs/<run>", "serve runs/<run> --port 8080"],
    "export": ["export runs/<run> --format onnx", "export runs/<run> --format onnx --int8 --max-drop 0.5",
               "export runs/<run> --format timm --output hub/"],
    "push": ["push runs/<run> me/ants-vs-bees --private"],
    "interpret": ["interpret runs/<run>", "interpret runs/<run> data/hymenoptera --top-n 24"],
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
        print("interrupted; the last finished epoch is kept in the run directory (--resume RUN)", file=sys.stderr)
        return 130
    finally:
        ours.setLevel(level)


if __name__ == "__main__":
    sys.exit(main())
