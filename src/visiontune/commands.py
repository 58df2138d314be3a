"""The bodies of the `visiontune` commands: arguments -> one library call -> printed
summary. `cli.py` parses and imports this module only when a command runs."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from visiontune.config import cli_option_keys
from visiontune.errors import ConfigError
from visiontune.files import atomic_write, write_csv, write_json
from visiontune.web import allowed_hosts, page_url, reach_note, serve_app

if TYPE_CHECKING:
    from visiontune.config import RunConfig
    from visiontune.prediction import Prediction

# Each command imports what it uses inside its body: `visiontune predict RUN one.jpg` loads
# neither scikit-learn nor the training stack, the web server or the exporters.


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {k: getattr(args, k) for k in cli_option_keys() if getattr(args, k, None) is not None}


def _base_config(args: argparse.Namespace) -> RunConfig | None:
    from visiontune.rundir import read_config

    return read_config(args.config, strict=True) if args.config else None


def train(args: argparse.Namespace) -> int:
    from visiontune import api

    overrides = _overrides(args)
    if args.resume:
        if args.config:
            raise ConfigError(f"--config {args.config} with --resume: a resumed run continues with its own "
                              f"config.yaml ({args.resume}); leave --config out (--epochs N extends the run)")
        result = api.fit(args.data, resume=args.resume, started=args.started, **overrides)
    else:
        if not args.data and not args.csv:
            raise ConfigError("train needs DATA (a folder of images) or --csv")
        result = api.fit(args.data, config=_base_config(args), started=args.started, **overrides)
    print(f"run: {result.run_dir}")
    kept = f"best epoch: {result.best_epoch}" if result.kept == "best" else "kept: the last epoch"
    print(f"{kept} of {len(result.history)}  ({result.seconds:.1f}s)")
    scores = "  ".join(f"{k} {v:.4f}" for k, v in result.metrics.items() if k != "train_loss")
    how = f" ({result.validated_by})" if result.validated_by else ""
    print(f"validation{how}: {scores}" if scores else "validation: none (no validation images)")
    return 0


def cv(args: argparse.Namespace) -> int:
    from visiontune.selection.cv import cross_validate

    print(cross_validate(args.data, folds=args.folds, selection=args.selection, config=_base_config(args),
                         **_overrides(args)).format())
    return 0


def compare_strategies(args: argparse.Namespace) -> int:
    from visiontune.selection.compare import compare, format_compare

    strategies = tuple(s.strip() for s in args.strategies.split(",") if s.strip())
    rows, out_dir = compare(args.data, strategies=strategies, folds=args.folds, config=_base_config(args),
                            **_overrides(args))
    print(format_compare(rows))
    print(f"runs and compare.md: {out_dir}")
    return 0


def advise_strategy(args: argparse.Namespace) -> int:
    from visiontune.selection.advisor import advise

    print(advise(args.data, config=_base_config(args), **_overrides(args)).format())
    return 0


def suggest_labels(args: argparse.Namespace) -> int:
    from visiontune.selection.suggest import filled_rows, suggest

    overrides = {key: getattr(args, key) for key in ("backbone", "weights", "image_size", "task", "label_delim",
                                                     "device", "engine", "cache_dir", "seed")
                 if getattr(args, key) is not None}
    if filled_rows(args.output):  # the labels filled in so far count, with --labelled / --csv / --run alike
        print(f"labelled so far: the filled-in rows of {args.output}")
    result = suggest(args.pool if len(args.pool) > 1 else args.pool[0], run=args.run, labelled=args.labelled,
                     csv=args.csv, output=args.output, n=args.n, method=args.method, **overrides)
    kept = result.write_csv(args.output)
    print(result.format())
    shape = f"{shlex.quote(args.output)} --task {result.task}" + (
        f" --label-delim {shlex.quote(args.label_delim)}" if args.label_delim else "")
    print(f"wrote {args.output}" + (f" ({kept} labelled rows kept, first)" if kept else "")
          + f": fill in its {result.label_column!r} column (the prediction column holds the model's guess), or label "
          f"them in the browser with `visiontune review --label {shape}`; then `visiontune train --csv {shape}` "
          "trains on the rows you filled in")
    return 0


def review_labels(args: argparse.Namespace) -> int:
    from visiontune.analysis.review import create_review_app

    if (args.run is None) == (args.label is None):
        raise ConfigError("review: give a run directory (review RUN [DATA]) or --label CSV, not both or neither")
    # the app is built first: a bad run or file is an error before the server starts
    allowed_hosts(args.host, args.allowed_host)  # a bad --allowed-host is an error before the work starts
    if args.run is not None:
        from visiontune.analysis.run_review import create_run_review_app
        from visiontune.rundir import RunDir

        if args.task != "auto" or args.label_delim != " " or args.classes:
            raise ConfigError("review RUN: --task, --label-delim and --classes are for --label; a run's review "
                              "takes its task, delimiter and classes from the run")
        app = create_run_review_app(args.run, args.data)
        where = f"decisions go into {RunDir(args.run).review.path}"
    else:
        app = create_review_app(args.label, [c.strip() for c in args.classes.split(",") if c.strip()]
                                if args.classes else None, args.task, args.label_delim)
        where = f"answers go into {args.label}"
    print(f"review: {page_url(args.host, args.port)}  ({where} at once; Ctrl+C stops)\n"
          + reach_note(args.host, args.port, allowed_hosts(args.host, args.allowed_host)))
    serve_app(app, args.host, args.port, args.allowed_host, "review")
    return 0


def find_lr(args: argparse.Namespace) -> int:
    from visiontune.selection.lrfind import lr_find

    result = lr_find(args.data, num_iter=args.num_iter, plot=args.plot or True, config=_base_config(args),
                     **_overrides(args))
    print(f"suggested lr (steepest descent): {result.suggested_lr:.2e}   loss minimum / 10: {result.min_loss_lr:.2e}")
    print(f"plot: {result.plot}")
    return 0


def predict(args: argparse.Namespace) -> int:
    """Each prediction is printed (and written to --output) as it comes: memory stays flat."""
    from visiontune.prediction import predict_stream

    stream = predict_stream(args.run, args.inputs, top_k=args.top_k, batch_size=args.batch_size,
                            device=args.device, tta=args.tta, engine=args.engine)
    printed = 0

    def printing() -> Iterator[Prediction]:
        nonlocal printed
        for p in stream:
            print(_prediction_line(p))
            printed += 1
            yield p

    if args.output:  # written to a temporary file and renamed at the end: an old file survives a failure
        _write_predictions(args.output, printing(), stream.task, args.top_k, stream.label_delim)
        print(f"wrote {printed} predictions to {args.output}", file=sys.stderr)  # stdout holds the predictions
    else:
        for _ in printing():
            pass
    for path, why in stream.skipped:
        print(f"skipped {path}: {why}", file=sys.stderr)
    return 0 if printed else 1


def _prediction_line(p: Prediction) -> str:
    """As the task prints a prediction (tasks/output.py: path, label, probability, runners-up; label
    sets: every label above its threshold; regression: path and number)."""
    return p.line()


def _write_predictions(path: str, preds: Iterator[Prediction], task: Any, top_k: int, delim: str = " ") -> None:
    """PATH.json: a list of {"path", ...the task's record (serve answers the same)}; else
    CSV in the task's columns (single-label: path,label,prob + the runners-up; multi-label:
    path,labels joined by the run's `delim`, as `train --csv` reads them, + one probability
    per label; regression: path,prediction). Rows are written as `preds` yields them."""
    if path.endswith(".json"):
        def write(tmp: str) -> None:
            with open(tmp, "w", encoding="utf-8") as fh:
                fh.write("[")
                for i, p in enumerate(preds):
                    fh.write(("," if i else "") + "\n  " + json.dumps(p.record()))
                fh.write("\n]\n")

        atomic_write(path, write)
        return
    out = task.output
    write_csv(path, out.csv_header(top_k), (out.csv_row(p.path, p.decoded, delim, top_k) for p in preds))


def evaluate(args: argparse.Namespace) -> int:
    from visiontune.prediction import evaluate as evaluate_run

    result = evaluate_run(args.run, args.data, csv=args.csv, label_delim=args.label_delim,
                          batch_size=args.batch_size, device=args.device, tta=args.tta)
    print(result.format())
    for path, why in result.excluded:
        print(f"excluded {path}: {why}", file=sys.stderr)
    if args.output:
        write_json(args.output, {"metrics": result.metrics, "per_class": result.report,
                                 "confusion": None if result.confusion is None else result.confusion.tolist(),
                                 "classes": result.classes})
        print(f"wrote {args.output}")
    return 0


def inspect(args: argparse.Namespace) -> int:
    from visiontune import api

    extra = {k: getattr(args, k) for k in ("freeze", "lr", "optimizer", "head_lr_mult") if getattr(args, k) is not None}
    print(api.inspect(args.target, strategy=args.strategy, num_classes=args.num_classes, depth=args.depth,
                      weights=args.weights, parameters=args.parameters, **extra))
    return 0


def imagify_table(args: argparse.Namespace) -> int:
    from visiontune.data.imagify import imagify

    report = imagify(args.table, args.out, kind=args.kind, label_col=args.label_col, value_col=args.value_col,
                     window=args.window, stride=args.stride, size=args.size, min_length=args.min_length,
                     group_col=args.group_col)
    print(report.format())
    return 0


def export_run(args: argparse.Namespace) -> int:
    from visiontune.deploy.export import export

    if args.int8:
        from visiontune.deploy.quantize import export_int8

        result = export_int8(args.run, args.format, args.output, args.max_drop, args.calibration)
    else:
        result = export(args.run, args.format, args.output)
    print(f"{result.format}: {result.path}")
    print(f"parity check: max |eager - exported| = {result.max_abs_diff:.2e}")
    if result.int8 is not None:
        print("\n".join(result.int8.lines()))
    return 0


def push_run(args: argparse.Namespace) -> int:
    from visiontune.deploy.hub import push

    print(f"uploaded: {push(args.run, args.repo_id, private=args.private)}")
    return 0


def serve_run(args: argparse.Namespace) -> int:
    from visiontune.deploy.serve import create_app

    allowed_hosts(args.host, args.allowed_host)  # a bad --allowed-host is an error before the work starts
    app = create_app(args.run, args.top_k, max_pixels=args.max_pixels, max_pending=args.max_pending)  # a bad run too
    print(f"serving {args.run} on {page_url(args.host, args.port)} (Ctrl-C stops)\n"
          + reach_note(args.host, args.port, allowed_hosts(args.host, args.allowed_host)))
    serve_app(app, args.host, args.port, args.allowed_host)
    return 0


def interpret_run(args: argparse.Namespace) -> int:
    from visiontune.analysis.interpret import interpret

    print(interpret(args.run, args.data, top_n=args.top_n, oof=args.oof, device=args.device,
                    saliency=args.saliency, mislabels_in_test=args.mislabels_in_test).format())
    return 0


def shard(args: argparse.Namespace) -> int:
    from visiontune.data.sources import resolve_inputs
    from visiontune.data.webdata import write_shards

    cfg, source = resolve_inputs(args.data, _base_config(args), None, _overrides(args))
    described = write_shards(source, args.out, args.size, cfg.seed, cfg.data.label_delim, args.shard_bytes)
    for split, part in described["splits"].items():
        print(f"{split}: {part['samples']} samples in {len(part['shards'])} shards")
    print(f"shards and dataset.json: {args.out}  (train with: visiontune train {args.out})")
    return 0


def demo(args: argparse.Namespace) -> int:
    from visiontune.demo import run_demo

    return run_demo(args.out, args.strategy, args.epochs, args.image_size)


def cache(args: argparse.Namespace) -> int:
    """`visiontune cache info|clear`: sizes by area and the cap; clearing by age or all."""
    from visiontune.config import parse_duration
    from visiontune.files import CACHE_AREAS, cache_max, cache_root, cache_usage, evict

    root = cache_root(args.cache_dir)
    if args.action == "info":
        usage = cache_usage(root)
        print(f"cache: {root}  (cap {cache_max() / 1024 ** 3:.1f} GB, $VISIONTUNE_CACHE_MAX; least recently used "
              "entries are removed after a run that passes it)")
        for area, (size, count) in usage.items():
            print(f"  {area:9s} {size / 1e6:10.1f} MB  {count} entries")
        print(f"  {'total':9s} {sum(v[0] for v in usage.values()) / 1e6:10.1f} MB")
        return 0
    areas = [a.strip() for a in args.only.split(",") if a.strip()]
    unknown = sorted(set(areas) - set(CACHE_AREAS))
    if unknown:
        raise ConfigError(f"--only {','.join(unknown)}: unknown area; choose from {', '.join(CACHE_AREAS)}")
    try:
        older = parse_duration(args.older_than) if args.older_than else None
    except ValueError as exc:
        raise ConfigError(f"--older-than: {exc}") from None
    removed, freed = evict(root, max_bytes=None if older is not None else 0, older_than_s=older, areas=areas)
    print(f"removed {removed} entries ({freed / 1e6:.1f} MB) from {root}")
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "train": train, "cv": cv, "compare": compare_strategies, "advise": advise_strategy, "lr-find": find_lr,
    "suggest": suggest_labels, "review": review_labels,
    "predict": predict, "evaluate": evaluate, "inspect": inspect, "imagify": imagify_table, "export": export_run, "push": push_run,
    "serve": serve_run, "interpret": interpret_run, "demo": demo, "shard": shard, "cache": cache,
}
