"""The `visiontune` command: parse -> RunConfig / arguments -> one api call -> summary.

Heavy imports (torch, timm) happen inside the command bodies, so `--help` is instant.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

from visiontune.config import OPTIMIZERS, PRECISIONS, SCHEDULES, STRATEGIES

EPILOG = """strategies:
  feature-extract  backbone frozen, only the new head trains (small data, ImageNet-like task)
  finetune         everything trains; head LR = head_lr_mult x backbone LR (default 10x)
  freeze-k         first --freeze K backbone layer groups frozen, the rest fine-tunes
  gradual          fastai fine_tune: --freeze-epochs head-only, then all with discriminative LRs
  scratch          random init, same harness: what pretraining buys
  auto             measure data size and task similarity, pick one of the above (visiontune advise)

examples:
  visiontune train data/hymenoptera --strategy gradual --epochs 5
  visiontune predict runs/<run> photo.jpg photos/
  visiontune evaluate runs/<run> data/hymenoptera/val
  visiontune inspect tf_efficientnet_lite0 --strategy freeze-k --freeze 3
"""


def _add_train(sub: Any) -> None:
    p = sub.add_parser("train", help="fine-tune a backbone on a folder of images",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    p.add_argument("data", nargs="?", help="folder: <class>/ subfolders, or train/ + valid|val/ (+ test/)")
    _add_run_options(p)
    p.add_argument("--resume", metavar="RUN", help="continue RUN from its last checkpoint")

    p = sub.add_parser("cv", help="stratified k-fold cross-validation with out-of-fold probabilities")
    p.add_argument("data", help="folder of images (train + valid images are pooled; test/ stays out)")
    p.add_argument("--folds", type=int, default=5)
    _add_run_options(p)

    p = sub.add_parser("advise", help="measure the data and the task similarity, recommend a strategy")
    p.add_argument("data", help="folder of images")
    _add_run_options(p)

    p = sub.add_parser("lr-find", help="learning-rate range test: suggested LR and a plot")
    p.add_argument("data", help="folder of images")
    p.add_argument("--plot", default="lr_find.png", help="where to save the plot (lr_find.png)")
    p.add_argument("--num-iter", type=int, default=100)
    _add_run_options(p)

    p = sub.add_parser("compare", help="every strategy on the same split, seed and epochs, in one table")
    p.add_argument("data", help="folder of images")
    p.add_argument("--strategies", default=",".join(STRATEGIES), help="comma-separated (all five)")
    p.add_argument("--folds", type=int, help="cross-validate each strategy: mean +- std")
    _add_run_options(p)


def _add_run_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--csv", help="CSV of path,label[,split] (paths relative to DATA or the CSV's folder)")
    g.add_argument("--label-regex", help=r"label = group 1 of this regex on the file name, e.g. '^(.+)_\d+\.jpg$'")
    g.add_argument("--valid-pct", type=float, help="validation fraction when there is no valid/ folder (0.2)")
    g.add_argument("--relabel", help="CSV path,label of corrected labels (your files stay untouched)")
    g.add_argument("--exclude", help="file listing images to leave out (one path per line, or a CSV's first column)")
    g.add_argument("--no-verify", dest="verify_images", action="store_false", default=None,
                   help="skip decoding every image while scanning")
    g = p.add_argument_group("model")
    g.add_argument("--backbone", help="timm:<name>, torchvision:<name> or a timm name (timm:tf_efficientnet_lite0)")
    g.add_argument("--weights", help="pretrained | none | PATH to .pth/.safetensors (pretrained)")
    g.add_argument("--image-size", type=int, help="input size in pixels (the backbone's own)")
    g.add_argument("--head-hidden", type=int, help="hidden units in the head, 0 for a single linear layer (0)")
    g.add_argument("--head-dropout", type=float, help="dropout in the head (0)")
    g.add_argument("--no-warm-start", dest="warm_start", action="store_false", default=None,
                   help="do not start head rows of ImageNet-named classes (e.g. 'ant') from the source classifier")
    g = p.add_argument_group("strategy")
    g.add_argument("--strategy", choices=STRATEGIES + ("auto",), help="what trains; auto: ask the advisor (gradual)")
    g.add_argument("--head-lr-mult", type=float, help="head LR / backbone LR (10)")
    g.add_argument("--freeze", type=int, help="freeze-k: leading backbone layer groups to freeze (half of them)")
    g.add_argument("--freeze-epochs", type=int, help="gradual: head-only epochs first (1)")
    g.add_argument("--frozen-bn", choices=("eval", "train"), help="BatchNorm in frozen groups (eval)")
    g.add_argument("--trainable-bn", choices=("auto", "eval", "train"),
                   help="BatchNorm statistics in training groups; auto: eval with pretrained weights (auto)")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, help="total epochs, all phases (5)")
    g.add_argument("--batch-size", type=_batch_size, metavar="N|auto",
                   help="images per optimizer step; auto: the largest that fits the device, capped at 256 and at "
                        "1/8 of the training images (32)")
    g.add_argument("--lr", type=float, help="peak LR of the head; the backbone gets lr / --head-lr-mult (2e-3 adamw, 1e-2 sgd)")
    g.add_argument("--optimizer", choices=OPTIMIZERS, help="(adamw)")
    g.add_argument("--weight-decay", type=float, help="(0.01 adamw, 1e-4 sgd; never on biases/norms)")
    g.add_argument("--schedule", choices=SCHEDULES, help="LR schedule within each phase (onecycle)")
    g.add_argument("--monitor", help="metric for early stopping and the best checkpoint "
                   "(auto: val_loss, or macro_f1 when classes are imbalanced)")
    g.add_argument("--mode", choices=("auto", "min", "max"), help="direction of --monitor (auto)")
    g.add_argument("--patience", type=int, help="epochs without improvement before stopping; 0: never (3)")
    g.add_argument("--no-augment", dest="augment", action="store_false", default=None,
                   help="no random crop/flip on training images")
    g.add_argument("--label-smoothing", type=float)
    g.add_argument("--balance", choices=("none", "weights", "oversample"),
                   help="class-weighted loss or oversampling of small classes (none)")
    g.add_argument("--no-feature-cache", dest="feature_cache", action="store_false", default=None,
                   help="frozen phases run on augmented images instead of cached features")
    g.add_argument("--no-image-cache", dest="image_cache", action="store_false", default=None,
                   help="decode training images every epoch instead of keeping large ones decoded and downsized "
                        "(to 2x the input size) on disk")
    g.add_argument("--cache-dir", help="root of the feature and image caches ($VISIONTUNE_CACHE or ~/.cache/visiontune)")
    g.add_argument("--precision", choices=PRECISIONS,
                   help="autocast: auto = bf16 (fp16 without bf16) on CUDA, fp32 on CPU (auto)")
    g.add_argument("--compile", dest="compile", action="store_true", default=None,
                   help="torch.compile the model for unfrozen phases (slow first step; falls back if it fails)")
    g.add_argument("--num-workers", type=int, help="DataLoader worker processes (from the device: CPU with <= 4 cores 0, "
                   "then 1 per 8 cores; GPU: cores - 1, at most 8)")
    g.add_argument("--device", help="auto | cpu | cuda | cuda:N | mps (auto)")
    g.add_argument("--seed", type=int, help="(0)")
    g.add_argument("--output", help="parent folder of run directories (runs)")
    g.add_argument("--name", help="run directory name (time-backbone-strategy)")
    g.add_argument("--config", metavar="YAML", help="start from this config.yaml (e.g. a run's)")
    g.add_argument("--no-progress", dest="progress", action="store_false", default=None)


def _add_others(sub: Any) -> None:
    p = sub.add_parser("predict", help="classify image files and folders with a trained run")
    p.add_argument("run", help="run directory, its model.safetensors, or an exported model.onnx / model.ts")
    p.add_argument("inputs", nargs="+", help="image files and/or folders (searched recursively)")
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--output", help="write all predictions to a .csv or .json file")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")

    p = sub.add_parser("evaluate", help="accuracy, macro-F1, per-class report and confusion matrix")
    p.add_argument("run", help="run directory (or its model.safetensors)")
    p.add_argument("data", help="class-folder tree (a dataset root uses its test/ or valid/ split)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--output", help="write metrics, report and confusion matrix to this .json file")

    p = sub.add_parser("inspect", help="module tree, trainable parameters and LR of every group",
                       epilog="example: visiontune inspect tf_efficientnet_lite0 --strategy freeze-k --freeze 3")
    p.add_argument("target", help="backbone name (timm:<name>, torchvision:<name>) or a run directory")
    p.add_argument("--strategy", choices=STRATEGIES, default="gradual")
    p.add_argument("--freeze", type=int, help="freeze-k: leading groups to freeze")
    p.add_argument("--num-classes", type=int, default=2)
    p.add_argument("--depth", type=int, default=2, help="module tree depth (2)")
    p.add_argument("--weights", default="none", help="weights to build with (none: structure only)")
    p.add_argument("--parameters", action="store_true", help="also list every named parameter and the state_dict")
    p.add_argument("--lr", type=float)
    p.add_argument("--optimizer", choices=OPTIMIZERS)
    p.add_argument("--head-lr-mult", type=float)

    p = sub.add_parser("imagify", help="time series in a CSV -> Gramian Angular Field / recurrence images "
                       "in OUT/<label>/, ready for train")
    p.add_argument("table", help="CSV: one series per row plus a label column (or a long table with --value-col)")
    p.add_argument("--kind", choices=("gadf", "gasf", "recurrence"), default="gadf")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--label-col", default="label")
    p.add_argument("--value-col", help="long table: the column holding the series (one point per row)")
    p.add_argument("--window", type=int, help="points per image (windows of a long series)")
    p.add_argument("--stride", type=int, help="points between window starts (= --window)")
    p.add_argument("--size", type=int, default=64, help="image side = series length after PAA (64)")
    p.add_argument("--min-length", type=int, default=8, help="shorter series are skipped (8)")

    p = sub.add_parser("export", help="ONNX or TorchScript with class names and preprocessing inside; "
                       "checked against the eager model")
    p.add_argument("run", help="run directory")
    p.add_argument("--format", choices=("onnx", "torchscript"), default="onnx")
    p.add_argument("--output", help="file to write (RUN/model.onnx or RUN/model.ts)")

    p = sub.add_parser("serve", help="web page + JSON API on localhost: drop an image, see the top-k labels")
    p.add_argument("run", help="run directory")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--top-k", type=int, default=3)

    p = sub.add_parser("interpret", help="confusion, top losses, Grad-CAM, suspected mislabels, duplicates, "
                       "curves and report.html in RUN/interpret/")
    p.add_argument("run", help="run directory")
    p.add_argument("data", nargs="?", help="data folder (default: the run's own splits.csv)")
    p.add_argument("--oof", help="out-of-fold probabilities from `visiontune cv` (oof.csv) for the mislabel ranking")
    p.add_argument("--top-n", type=int, default=16)
    p.add_argument("--saliency", nargs="+", metavar="IMAGE", help="also explain these images with Grad-CAM")
    p.add_argument("--device", default="auto")

    p = sub.add_parser("demo", help="the main job: write scikit-image's faces/non-faces set as an image "
                       "folder, fine-tune the default pretrained backbone on it, print validation metrics")
    p.add_argument("--out", default="demo", help="working folder (demo)")
    p.add_argument("--strategy", choices=STRATEGIES, default="gradual")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--image-size", type=int, default=128)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="visiontune",
        description="Teach a pretrained vision model a new image-classification task.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and results")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train(sub)
    _add_others(sub)
    return parser


TRAIN_KEYS = (
    "csv", "relabel", "exclude", "label_regex", "valid_pct", "verify_images", "backbone", "weights", "image_size", "head_hidden",
    "head_dropout", "strategy", "head_lr_mult", "freeze", "freeze_epochs", "frozen_bn", "trainable_bn", "epochs", "batch_size",
    "lr", "optimizer", "weight_decay", "schedule", "monitor", "mode", "patience", "augment",
    "label_smoothing", "num_workers", "device", "seed", "output", "name", "progress", "balance", "feature_cache", "warm_start",
    "cache_dir", "image_cache", "precision", "compile",
)


def _batch_size(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number or 'auto', got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {k: getattr(args, k) for k in TRAIN_KEYS if getattr(args, k, None) is not None}


def _base_config(args: argparse.Namespace) -> Any:
    from visiontune.bundle import read_config

    return read_config(args.config) if args.config else None


def cmd_train(args: argparse.Namespace) -> int:
    import visiontune as vt

    overrides = _overrides(args)
    if args.resume:
        result = vt.fit(args.data, resume=args.resume, **overrides)
    else:
        if not args.data and not args.csv:
            raise vt.ConfigError("train needs DATA (a folder of images) or --csv")
        result = vt.fit(args.data, config=_base_config(args), **overrides)
    print(f"run: {result.run_dir}")
    print(f"best epoch: {result.best_epoch} of {len(result.history)}  ({result.seconds:.1f}s)")
    print("validation: " + "  ".join(f"{k} {v:.4f}" for k, v in result.metrics.items()))
    return 0


def cmd_cv(args: argparse.Namespace) -> int:
    from visiontune.cv import cross_validate

    result = cross_validate(args.data, folds=args.folds, config=_base_config(args), **_overrides(args))
    print(result.format())
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from visiontune.cv import compare, format_compare

    strategies = tuple(s.strip() for s in args.strategies.split(",") if s.strip())
    rows, out_dir = compare(args.data, strategies=strategies, folds=args.folds, config=_base_config(args),
                            **_overrides(args))
    print(format_compare(rows))
    print(f"runs and compare.md: {out_dir}")
    return 0


def cmd_advise(args: argparse.Namespace) -> int:
    from visiontune.advisor import advise

    print(advise(args.data, config=_base_config(args), **_overrides(args)).format())
    return 0


def cmd_lr_find(args: argparse.Namespace) -> int:
    from visiontune.lrfind import lr_find

    result = lr_find(args.data, num_iter=args.num_iter, plot=args.plot, config=_base_config(args),
                     **_overrides(args))
    print(f"suggested lr (steepest descent): {result.suggested_lr:.2e}   loss minimum / 10: {result.min_loss_lr:.2e}")
    print(f"plot: {result.plot}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    import visiontune as vt

    preds, skipped = vt.predict(args.run, args.inputs, top_k=args.top_k, batch_size=args.batch_size,
                                device=args.device)
    for p in preds:
        others = ", ".join(f"{label} {prob:.3f}" for label, prob in p.top_k[1:])
        print(f"{p.path}\t{p.label}\t{p.prob:.4f}" + (f"\t({others})" if others else ""))
    for path, why in skipped:
        print(f"skipped {path}: {why}", file=sys.stderr)
    if args.output:
        _write_predictions(args.output, preds)
    return 0 if preds else 1


def _write_predictions(path: str, preds: list[Any]) -> None:
    from visiontune.bundle import write_text

    if path.endswith(".json"):
        write_text(path, json.dumps([{"path": p.path, "label": p.label, "prob": p.prob,
                                      "top_k": [{"label": lb, "prob": pr} for lb, pr in p.top_k]} for p in preds], indent=2))
        return
    from visiontune.bundle import write_csv

    k = max((len(p.top_k) for p in preds), default=1)
    write_csv(path, ["path", "label", "prob"] + [f"{c}{i + 1}" for i in range(1, k) for c in ("label", "prob")],
              ([p.path, p.label, f"{p.prob:.6f}"] + [v for lb, pr in p.top_k[1:] for v in (lb, f"{pr:.6f}")]
               for p in preds))


def cmd_evaluate(args: argparse.Namespace) -> int:
    import visiontune as vt

    result = vt.evaluate(args.run, args.data, batch_size=args.batch_size, device=args.device)
    print(result.format())
    for path, why in result.excluded:
        print(f"excluded {path}: {why}", file=sys.stderr)
    if args.output:
        from visiontune.bundle import write_json

        write_json(args.output, {"metrics": result.metrics, "per_class": result.report,
                                 "confusion": result.confusion.tolist(), "classes": result.classes})
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    import visiontune as vt

    extra = {k: getattr(args, k) for k in ("freeze", "lr", "optimizer", "head_lr_mult") if getattr(args, k) is not None}
    print(vt.inspect(args.target, strategy=args.strategy, num_classes=args.num_classes, depth=args.depth,
                     weights=args.weights, parameters=args.parameters, **extra))
    return 0


def cmd_imagify(args: argparse.Namespace) -> int:
    from visiontune.imagify import imagify

    report = imagify(args.table, args.out, kind=args.kind, label_col=args.label_col, value_col=args.value_col,
                     window=args.window, stride=args.stride, size=args.size, min_length=args.min_length)
    print(report.format())
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from visiontune.export import export

    result = export(args.run, args.format, args.output)
    print(f"{result.format}: {result.path}")
    print(f"parity check: max |eager - exported| = {result.max_abs_diff:.2e}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from visiontune.serve import serve

    print(f"serving {args.run} on http://{args.host}:{args.port}/ (Ctrl-C stops)")
    serve(args.run, args.host, args.port, args.top_k)
    return 0


def cmd_interpret(args: argparse.Namespace) -> int:
    from visiontune.interpret import interpret

    print(interpret(args.run, args.data, top_n=args.top_n, oof=args.oof, device=args.device,
                    saliency=args.saliency).format())
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from visiontune.demo import run_demo

    return run_demo(args.out, args.strategy, args.epochs, args.image_size)


COMMANDS = {"train": cmd_train, "cv": cmd_cv, "compare": cmd_compare, "lr-find": cmd_lr_find, "advise": cmd_advise, "imagify": cmd_imagify, "interpret": cmd_interpret, "export": cmd_export, "serve": cmd_serve, "predict": cmd_predict, "evaluate": cmd_evaluate, "inspect": cmd_inspect,
            "demo": cmd_demo}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s",
                        stream=sys.stderr)
    for noisy in ("timm", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from visiontune.errors import VisiontuneError

    try:
        return COMMANDS[args.command](args)
    except VisiontuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; the last finished epoch is kept in the run directory (--resume RUN)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
