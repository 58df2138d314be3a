"""Bundle round trip, predict on a file and a folder, evaluate, inspect, and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import visiontune as vt
from conftest import TINY, make_image
from visiontune.bundle import load_bundle
from visiontune.cli import main


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from conftest import make_class_folders

    root = tmp_path_factory.mktemp("bundle")
    data = make_class_folders(root / "data" / "train", {"red": 10, "green": 10})
    make_class_folders(root / "data" / "valid", {"red": 4, "green": 4}, 100)
    make_class_folders(root / "data" / "test", {"red": 4, "green": 4}, 200)
    result = vt.fit(data.parent, **dict(TINY, strategy="feature-extract", epochs=6, lr=3e-2,
                                        output=str(root / "runs")))
    return Path(result.run_dir), data.parent


def test_bundle_round_trip_gives_identical_outputs(trained: tuple[Path, Path]) -> None:
    run, _ = trained
    bundle = load_bundle(run)
    again = load_bundle(run / "model.safetensors")
    assert bundle.classes == ["green", "red"] == json.loads((run / "classes.json").read_text())
    assert bundle.preprocess.input_size == 32 and bundle.config is not None
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(bundle.model(x), again.model(x))


def test_predict_file_and_folder(trained: tuple[Path, Path], tmp_path: Path) -> None:
    run, data = trained
    photos = tmp_path / "photos"
    make_image(photos / "a_red.png", (220, 40, 40), seed=7)
    make_image(photos / "sub" / "b_green.jpg", (40, 200, 60), seed=8)
    (photos / ".DS_Store").write_bytes(b"junk")
    (photos / "broken.jpg").write_bytes(b"nope")
    preds, skipped = vt.predict(run, [photos / "a_red.png"])
    assert [p.label for p in preds] == ["red"] and not skipped
    preds, skipped = vt.predict(run, photos, top_k=2)
    assert {Path(p.path).name: p.label for p in preds} == {"a_red.png": "red", "b_green.jpg": "green"}
    assert all(len(p.top_k) == 2 and abs(sum(v for _, v in p.top_k) - 1) < 1e-5 for p in preds)
    assert {Path(p).name for p, _ in skipped} == {".DS_Store", "broken.jpg"}


def test_evaluate_reports_metrics_and_confusion(trained: tuple[Path, Path]) -> None:
    run, data = trained
    result = vt.evaluate(run, data)  # uses test/
    assert len(result.paths) == 8 and result.confusion.sum() == 8
    assert result.metrics["accuracy"] == pytest.approx(float(np.trace(result.confusion)) / 8)
    text = result.format()
    assert "accuracy" in text and "macro_f1" in text and "confusion matrix" in text



def test_evaluate_on_a_csv_that_holds_only_a_test_split(trained: tuple[Path, Path], tmp_path: Path) -> None:
    """A CSV of path,label,split whose rows are all 'test' (what one keeps to score a model)
    was refused: "found a single class [] ... classification needs at least two classes"
    (label sets: "found no label", numbers: "no training images"): classes were read from
    the training rows. It scores as the same images in test/ folders do."""
    run, data = trained
    table = tmp_path / "test.csv"
    table.write_text("path,label,split\n" + "".join(f"{p},{p.parent.name},test\n"
                                                   for p in sorted((data / "test").glob("*/*.png"))))
    by_csv, by_folders = vt.evaluate(run, data, csv=str(table)), vt.evaluate(run, data)
    assert len(by_csv.paths) == 8 and by_csv.metrics == pytest.approx(by_folders.metrics)


def test_evaluate_on_a_single_class_folder(trained: tuple[Path, Path], tmp_path: Path) -> None:
    run, _ = trained
    for i in range(3):
        make_image(tmp_path / "e" / "red" / f"{i}.png", (220, 40, 40), seed=300 + i)
    result = vt.evaluate(run, tmp_path / "e")
    assert len(result.paths) == 3 and result.confusion.shape == (2, 2)
    assert [r["support"] for r in result.report] == [0, 3]


def test_evaluate_unknown_class_is_an_error(trained: tuple[Path, Path], tmp_path: Path) -> None:
    run, _ = trained
    make_image(tmp_path / "e" / "blue" / "1.png", (0, 0, 200))
    make_image(tmp_path / "e" / "red" / "1.png", (200, 0, 0))
    with pytest.raises(vt.DataError, match="does not know"):
        vt.evaluate(run, tmp_path / "e")


def test_cli_train_predict_evaluate_inspect(trained: tuple[Path, Path], tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    run, data = trained
    args = ["train", str(data), "--backbone", "timm:test_efficientnet", "--weights", "none", "--image-size", "32",
            "--epochs", "2", "--strategy", "gradual", "--batch-size", "8", "--num-workers", "0", "--no-progress",
            "--output", str(tmp_path / "runs"), "--name", "cli"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "run:" in out and "accuracy" in out and (tmp_path / "runs" / "cli" / "model.safetensors").is_file()
    assert main(["evaluate", str(run), str(data / "test")]) == 0
    out = capsys.readouterr().out
    assert "accuracy" in out and "macro_f1" in out
    assert main(["predict", str(run), str(data / "test" / "red"), "--output", str(tmp_path / "p.csv")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and all(line.split("\t")[1] in ("red", "green") for line in lines)
    assert (tmp_path / "p.csv").read_text().startswith("path,label,prob")
    assert main(["inspect", "timm:test_efficientnet", "--strategy", "freeze-k", "--freeze", "3"]) == 0
    out = capsys.readouterr().out
    assert "requires_grad" in out and "param_groups" in out and "False" in out


def test_inspect_shows_parameters_and_works_on_a_run(trained: tuple[Path, Path]) -> None:
    run, _ = trained
    text = vt.inspect("timm:test_efficientnet", strategy="feature-extract", parameters=True)
    rows = {line.split()[0]: line.split() for line in text.splitlines() if line.startswith(("head.", "backbone."))}
    assert rows["head.0.weight"][-2:] == ["True", "0.002"]
    assert rows["backbone.conv_stem.weight"][-2:] == ["False", "0"]
    assert "buffers" in text
    text = vt.inspect(str(run), strategy="finetune")
    assert "phase 1/1: all" in text and "(model)" in text


def test_cli_errors_are_one_clear_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "does not exist" in err and "Traceback" not in err


def test_help_is_fast_and_lists_commands() -> None:
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "visiontune", "--help"], capture_output=True,
                         text=True, check=True)
    assert all(c in out.stdout for c in ("train", "predict", "evaluate", "inspect", "demo"))
    assert "torch" not in {line.split("|")[-1].strip().split(".")[0] for line in out.stderr.splitlines()}


def test_predict_stream_decodes_a_batch_at_a_time(trained: tuple[Path, Path], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from visiontune.data import loaders

    run, _ = trained
    photos = tmp_path / "photos"
    for i in range(6):
        make_image(photos / f"{i}.png", (200, 40, 40), seed=20 + i)
    (photos / "broken.jpg").write_bytes(b"nope")  # sorts last
    everything, _ = vt.predict(run, photos)
    opened: list[str] = []
    real = loaders.load_rgb
    monkeypatch.setattr(loaders, "load_rgb", lambda path, *a, **k: opened.append(str(path)) or real(path, *a, **k))
    stream = vt.predict_stream(run, photos, batch_size=2, num_workers=0)
    assert len(stream) == 7 and opened == []  # listed, nothing decoded yet
    it = iter(stream)
    first = next(it)
    assert len(opened) == 2  # only the first batch
    streamed = [first, *it]
    assert [(p.path, p.label) for p in streamed] == [(p.path, p.label) for p in everything]
    assert all(a.probs == pytest.approx(b.probs, abs=1e-6) for a, b in zip(streamed, everything))
    assert [Path(p).name for p, _ in stream.skipped] == ["broken.jpg"]


def test_cli_predict_output_keeps_the_old_file_when_it_fails_midway(trained: tuple[Path, Path], tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import csv


    run, data = trained
    out, out_json = tmp_path / "p.csv", tmp_path / "p.json"
    assert main(["predict", str(run), str(data / "test"), "--output", str(out), "--batch-size", "3"]) == 0
    assert main(["predict", str(run), str(data / "test"), "--output", str(out_json), "--top-k", "1"]) == 0
    before = out.read_text()
    rows = list(csv.reader(before.splitlines()))
    assert rows[0] == ["path", "label", "prob", "label2", "prob2", "unknown", "ood_score"] and len(rows) == 9
    assert [(r["path"], len(r["predictions"])) for r in json.loads(out_json.read_text())] == [(r[0], 1) for r in rows[1:]]
    from visiontune import prediction

    real = prediction.eval_batches

    def failing(*args, **kwargs):
        batches = real(*args, **kwargs)
        yield next(batches)
        raise vt.DataError("the disk went away")

    monkeypatch.setattr(prediction, "eval_batches", failing)
    assert main(["predict", str(run), str(data / "test"), "--output", str(out), "--batch-size", "3"]) == 2
    assert out.read_text() == before and sorted(p.name for p in tmp_path.iterdir()) == ["p.csv", "p.json"]


def test_version_and_verbosity_after_the_command(capsys: pytest.CaptureFixture[str]) -> None:
    from visiontune.cli import build_parser
    from visiontune.version import __version__

    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0 and capsys.readouterr().out.strip() == f"visiontune {__version__}"
    parser = build_parser()
    after = parser.parse_args(["inspect", "timm:test_efficientnet", "-q"])
    before = parser.parse_args(["-q", "inspect", "timm:test_efficientnet"])
    neither = parser.parse_args(["inspect", "timm:test_efficientnet"])
    assert (after.quiet, before.quiet, neither.quiet, neither.verbose) == (True, True, False, False)
    assert parser.parse_args(["inspect", "x", "--verbose"]).verbose


@pytest.mark.parametrize("text, expected", [("epoch: 10\n", "'epochs'"), ("train:\n  epoch: 10\n", "'epochs'"),
                                            ("trian:\n  epochs: 10\n", "'train'")])
def test_an_unknown_config_key_is_an_error_naming_the_closest(tmp_path: Path, text: str, expected: str,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """A typo in a YAML config used to be ignored: the run trained with the default instead."""
    config = tmp_path / "c.yaml"
    config.write_text(text)
    assert main(["train", str(tmp_path), "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "unknown option" in err and expected in err and str(config) in err


def test_a_config_takes_flat_or_sectioned_keys_and_is_refused_with_resume(trained: tuple[Path, Path], tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    from visiontune.rundir import read_config

    config = tmp_path / "c.yaml"
    config.write_text("epochs: 7\nmodel:\n  image_size: 48\nseed: 3\n")
    cfg = read_config(config, strict=True)
    assert (cfg.train.epochs, cfg.model.image_size, cfg.seed) == (7, 48, 3)
    run, _ = trained
    assert main(["train", "--resume", str(run), "--config", str(config)]) == 2
    assert "--config" in capsys.readouterr().err and (run / "model.safetensors").is_file()


def test_predict_and_evaluate_say_what_they_wrote(trained: tuple[Path, Path], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    run, data = trained
    assert main(["predict", str(run), str(data / "test"), "--output", str(tmp_path / "p.csv")]) == 0
    out, err = capsys.readouterr()
    assert f"wrote 8 predictions to {tmp_path / 'p.csv'}" in err and "wrote" not in out  # stdout: predictions only
    assert main(["evaluate", str(run), str(data / "test"), "--output", str(tmp_path / "e.json")]) == 0
    out, err = capsys.readouterr()
    assert f"wrote {tmp_path / 'e.json'}" in err and "wrote" not in out  # stdout: the metrics only


def test_output_is_the_one_name_and_out_still_works_with_a_warning(capsys: pytest.CaptureFixture[str]) -> None:
    from visiontune.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["shard", "data", "--output", "s"]).out == "s" and "--out" not in capsys.readouterr().err
    assert parser.parse_args(["imagify", "t.csv", "--out", "d"]).out == "d"
    assert "--out is now --output" in capsys.readouterr().err
    assert parser.parse_args(["demo"]).out == "demo"


def test_lr_find_writes_its_plot_into_the_output_folder_not_the_current_one(tmp_path: Path, tiny: dict,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from conftest import make_class_folders

    data = make_class_folders(tmp_path / "d", {"red": 8, "green": 8})
    monkeypatch.chdir(tmp_path)
    assert main(["lr-find", str(data), "--num-iter", "12", "--backbone", "timm:test_efficientnet", "--weights", "none",
                 "--image-size", "32", "--output", str(tmp_path / "runs")]) == 0
    assert (tmp_path / "runs" / "lr_find.png").is_file() and not (tmp_path / "lr_find.png").exists()


def test_every_command_shows_examples_that_its_parser_accepts() -> None:
    """The examples in each command's --help parse with the real parser, abbreviations
    refused (a renamed flag must fail here, not in a user's terminal)."""
    import argparse
    import shlex

    from visiontune.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, command in sub.choices.items():
        assert command.epilog and "examples:" in command.epilog, name
        lines = [line.strip() for line in command.epilog.splitlines() if line.strip().startswith("visiontune ")]
        assert lines, name
        for line in lines:
            args = shlex.split(line.split("  #")[0])[1:]
            for p in (parser, *sub.choices.values()):
                p.allow_abbrev = False
            parser.parse_args(args)  # SystemExit on a bad flag
