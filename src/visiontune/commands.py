"""The bodies of the `visiontune` commands: arguments -> one library call -> printed
summary. `cli.py` parses and imports this module only when a command runs. The commands
that use a run read their typed config (command_config.py, `from_args`: bounds and
choices checked), the run commands the run options (`RunConfig`)."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from visiontune.command_config import (
    EvaluateConfig,
    ExportConfig,
    InterpretConfig,
    PredictConfig,
    Progress,
    ReviewConfig,
    ServeConfig,
    SuggestConfig,
    from_args,
)
from visiontune.config import cli_option_keys
from visiontune.errors import ConfigError, DataError
from visiontune.files import atomic_write, write_csv, write_json
from visiontune.web import allowed_hosts, page_url, reach_note, serve_app

if TYPE_CHECKING:
    from visiontune.config import RunConfig
    from visiontune.prediction import Prediction

# Each command imports what it uses inside its body: `visiontune predict RUN one.jpg` loads
# neither scikit-learn nor the training stack, the web server or the exporters.


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The run options given; -q hides the progress bars as --no-progress does."""
    given = {k: getattr(args, k) for k in cli_option_keys() if getattr(args, k, None) is not None}
    return {**given, "progress": False} if args.quiet else given


def _progress(args: argparse.Namespace, shown: Progress) -> bool:
    """Whether a use-command shows its progress bar: not with --no-progress, nor with -q."""
    return shown.progress and not args.quiet


def _warn_unused(args: argparse.Namespace, keys: tuple[str, ...], when: str) -> None:
    """One warning line (stderr) per option of `keys` given that has no effect `when`
    (e.g. "without --int8"), as cli's hidden unused options answer."""
    for key in keys:
        if getattr(args, key, None) is not None:
            print(f"warning: {args.command} does not use --{key.replace('_', '-')} {when}: it has no effect here",
                  file=sys.stderr)


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

    cfg = from_args(SuggestConfig, args)
    if cfg.run is not None:
        _warn_unused(args, ("backbone", "weights", "image_size"), "with --run (its model and preprocessing are used)")
    if filled_rows(cfg.output):  # the labels filled in so far count, with --labelled / --csv / --run alike
        print(f"labelled so far: the filled-in rows of {cfg.output}", file=sys.stderr)
    result = suggest(list(cfg.pool) if len(cfg.pool) > 1 else cfg.pool[0], run=cfg.run, labelled=cfg.labeled,
                     csv=cfg.csv, output=cfg.output, n=cfg.n, method=cfg.method,
                     **{**cfg.overrides(), "progress": _progress(args, cfg.shown)})
    kept = result.write_csv(cfg.output)
    print(result.format(skipped=False))
    for line in result.skipped_lines():  # messages, not results
        print(line, file=sys.stderr)
    delim = cfg.frozen.label_delim
    shape = f"{shlex.quote(cfg.output)} --task {result.task}" + (
        f" --label-delim {shlex.quote(delim)}" if delim else "")
    print(f"wrote {cfg.output}" + (f" ({kept} labelled rows kept, first)" if kept else "")
          + f": fill in its {result.label_column!r} column (the prediction column holds the model's guess), or label "
          f"them in the browser with `visiontune review --label {shape}`; then `visiontune train --csv {shape}` "
          "trains on the rows you filled in", file=sys.stderr)  # what to do next; the suggestions are the results
    return 0


def review_labels(args: argparse.Namespace) -> int:
    from visiontune.analysis.review import create_review_app

    cfg = from_args(ReviewConfig, args)
    if (cfg.run is None) == (cfg.label is None):
        raise ConfigError("review: give a run directory (review RUN [DATA]) or --label CSV, not both or neither")
    # the app is built first: a bad run or file is an error before the server starts
    listen = cfg.listen
    allowed_hosts(listen.host, listen.allowed_host)  # a bad --allowed-host is an error before the work starts
    if cfg.run is not None:
        from visiontune.analysis.run_review import create_run_review_app
        from visiontune.rundir import RunDir

        if cfg.task != "auto" or cfg.label_delim != " " or cfg.classes or cfg.output:
            raise ConfigError("review RUN: --task, --label-delim, --classes and --output are for --label; a run's "
                              "review takes its task, delimiter and classes from the run, and writes its decisions "
                              "into RUN/review/, where train --relabel/--exclude read them")
        app = create_run_review_app(cfg.run, cfg.data)
        where = f"decisions go into {RunDir(cfg.run).review.path}"
    else:
        answers = _answers_file(cfg.label, cfg.output)
        app = create_review_app(answers, [c.strip() for c in cfg.classes.split(",") if c.strip()]
                                if cfg.classes else None, cfg.task, cfg.label_delim)
        where = f"answers go into {answers}"
    print(f"review: {page_url(listen.host, listen.port)}  ({where} at once; Ctrl+C stops)\n"
          + reach_note(listen.host, listen.port, allowed_hosts(listen.host, listen.allowed_host)))
    serve_app(app, listen.host, listen.port, listen.allowed_host, "review")
    return 0


def _answers_file(label: str, output: str | None) -> str:
    """The CSV review --label merges answers into: --output (a copy of `label` made when it
    does not exist yet), else `label` itself."""
    if output is None or os.path.abspath(output) == os.path.abspath(label):
        return label
    if not os.path.exists(output):
        if not os.path.isfile(label):
            raise DataError(f"--label {label}: no such file (write one with `visiontune suggest POOL --output {label}`)")
        atomic_write(output, lambda tmp: shutil.copyfile(label, tmp))
    return output


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

    cfg = from_args(PredictConfig, args)
    how = cfg.inference
    # on a terminal the printed lines are the progress (a bar between them would break them);
    # with stdout sent to a file or pipe, the bar on stderr says how far it is
    stream = predict_stream(cfg.run, list(cfg.inputs), top_k=cfg.top.top_k, batch_size=how.batch_size,
                            device=how.device, tta=how.tta, engine=cfg.engine, coverage=cfg.sets.coverage,
                            abstain=cfg.abstain.abstain, ood_threshold=cfg.ood_threshold,
                            progress=_progress(args, cfg.shown) and not sys.stdout.isatty())
    printed = 0

    def printing() -> Iterator[Prediction]:
        nonlocal printed
        for p in stream:
            print(_prediction_line(p))
            printed += 1
            yield p

    if cfg.output:  # written to a temporary file and renamed at the end: an old file survives a failure
        _write_predictions(cfg.output, printing(), stream.task, cfg.top.top_k, stream.label_delim,
                           cfg.sets.coverage is not None, stream.ood is not None)
        print(f"wrote {printed} predictions to {cfg.output}", file=sys.stderr)  # stdout holds the predictions
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


def _write_predictions(path: str, preds: Iterator[Prediction], task: Any, top_k: int, delim: str = " ",
                       sets: bool = False, ood: bool = False) -> None:
    """PATH.json: a list of {"path", ...the task's record (serve answers the same)}; else
    CSV in the task's columns (single-label: path,label,prob + the runners-up; multi-label:
    path,labels joined by the run's `delim`, as `train --csv` reads them, + one probability
    per label; regression: path,prediction; with `sets` (--coverage) set,set_size or
    low,high; with `ood`, a model that scores images: unknown,ood_score). Rows are written
    as `preds` yields them."""
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
    write_csv(path, out.csv_header(top_k, sets, ood), (out.csv_row(p.path, p.decoded, delim, top_k) for p in preds))


def evaluate(args: argparse.Namespace) -> int:
    from visiontune.prediction import evaluate as evaluate_run

    cfg = from_args(EvaluateConfig, args)
    how = cfg.inference
    result = evaluate_run(cfg.run, cfg.data, csv=cfg.csv, label_delim=cfg.label_delim,
                          batch_size=how.batch_size, device=how.device, tta=how.tta, coverage=cfg.sets.coverage,
                          progress=_progress(args, cfg.shown))
    print(result.format())
    for path, why in result.excluded:
        print(f"excluded {path}: {why}", file=sys.stderr)
    if cfg.output:
        write_json(cfg.output, {"metrics": result.metrics, "per_class": result.report,
                                 "confusion": None if result.confusion is None else result.confusion.tolist(),
                                 "classes": result.classes})
        print(f"wrote {cfg.output}", file=sys.stderr)  # stdout holds the results
    return 0


def inspect(args: argparse.Namespace) -> int:
    from visiontune import api

    extra = {k: getattr(args, k) for k in ("freeze", "lr", "optimizer", "head_lr_mult") if getattr(args, k) is not None}
    print(api.inspect(args.target, strategy=args.strategy, num_classes=args.num_classes, depth=args.depth,
                      weights=args.weights, parameters=args.parameters, **extra))
    return 0


def imagify_table(args: argparse.Namespace) -> int:
    from visiontune.data.imagify import imagify

    report = imagify(args.table, args.out, kind=args.kind, label_col=args.csv_label_col, value_col=args.value_col,
                     window=args.window, stride=args.stride, size=args.size, min_length=args.min_length,
                     group_col=args.group_col)
    print(report.format())
    return 0


def export_run(args: argparse.Namespace) -> int:
    from visiontune.deploy.export import export

    cfg = from_args(ExportConfig, args)
    if not cfg.int8:
        _warn_unused(args, ("max_drop", "calibration"), "without --int8")
    if cfg.int8:
        from visiontune.deploy.quantize import export_int8

        result = export_int8(cfg.run, cfg.format, cfg.output, cfg.max_drop, cfg.calibration,
                             show_progress=_progress(args, cfg.shown))
    else:
        result = export(cfg.run, cfg.format, cfg.output)
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

    cfg = from_args(ServeConfig, args)
    listen = cfg.listen
    allowed_hosts(listen.host, listen.allowed_host)  # a bad --allowed-host is an error before the work starts
    app = create_app(cfg.run, cfg.top.top_k, max_pixels=cfg.max_pixels, max_pending=cfg.max_pending,
                     coverage=cfg.sets.coverage, drift_window=cfg.drift_window,
                     drift_margin=cfg.drift_margin)  # a bad run (or --coverage for it) too
    print(f"serving {cfg.run} on {page_url(listen.host, listen.port)} (Ctrl-C stops)\n"
          + reach_note(listen.host, listen.port, allowed_hosts(listen.host, listen.allowed_host)))
    serve_app(app, listen.host, listen.port, listen.allowed_host)
    return 0


def interpret_run(args: argparse.Namespace) -> int:
    from visiontune.analysis.interpret import interpret

    cfg = from_args(InterpretConfig, args)
    print(interpret(cfg.run, cfg.data, top_n=cfg.top_n, oof=cfg.oof, device=cfg.device,
                    saliency=list(cfg.saliency) if cfg.saliency else None,
                    mislabels_in_test=cfg.mislabels_in_test, output=cfg.output,
                    progress=_progress(args, cfg.shown)).format())
    return 0


def shard(args: argparse.Namespace) -> int:
    from visiontune.data.sources import resolve_inputs
    from visiontune.data.webdata import write_shards
    from visiontune.runtime.inference import progress

    cfg, source = resolve_inputs(args.data, _base_config(args), None, _overrides(args))
    bar = (lambda items, split: progress(items, True, f"shard {split}", len(items))) if cfg.runtime.progress else None
    described = write_shards(source, args.out, args.size, cfg.seed, cfg.data.label_delim, args.shard_bytes, bar)
    for split, part in described["splits"].items():
        print(f"{split}: {part['samples']} samples in {len(part['shards'])} shards")
    print(f"shards and dataset.json: {args.out}  (train with: visiontune train {args.out})")
    return 0


def demo(args: argparse.Namespace) -> int:
    from visiontune.demo import run_demo

    return run_demo(args.out, args.strategy, args.epochs, args.image_size)


def cache(args: argparse.Namespace) -> int:
    """`visiontune cache info|clear`: sizes by area and the cap; clearing by age or all."""
    from visiontune.caches import cache_areas, cache_max, cache_root, cache_usage, evict
    from visiontune.config import parse_duration

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
    unknown = sorted(set(areas) - set(cache_areas()))
    if unknown:
        raise ConfigError(f"--only {','.join(unknown)}: unknown area; choose from {', '.join(cache_areas())}")
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
