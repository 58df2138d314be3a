"""Training from the labels a user has at the start of labelling (issue 34 item 8): when
some class has a single image, no validation split can be held out; every image trains,
the converged probe's cross-validation (leave one out at the smallest) is the validation,
a plan that begins with the probe keeps it alone, any other keeps its last epoch, and the
run says so in one line. The labelling guide's loop end to end at 1 label per class."""

from __future__ import annotations

import csv
import json
import logging
import time
from pathlib import Path

import numpy as np
import pytest

import visiontune as vt
from conftest import COLORS, TINY, make_image
from visiontune.cli import main
from visiontune.rundir import RunDir

FLAGS = ["--backbone", TINY["backbone"], "--weights", "none", "--image-size", str(TINY["image_size"])]
FIVE = {**COLORS, "yellow": (220, 210, 40)}  # five classes


def make_pool(root: Path, per_class: int) -> Path:
    seed = 0
    for name, color in FIVE.items():
        for i in range(per_class):
            make_image(root / name / f"{name}_{i:02d}.png", color, seed=seed)
            seed += 1
    return root


def write_labels(path: Path, rows: list[tuple[str, str]]) -> Path:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label"])
        writer.writerows(rows)
    return path


def read(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_the_labelling_guides_loop_at_one_label_per_class(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                          caplog: pytest.LogCaptureFixture,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """`suggest POOL --n 5`, the labels filled in, `train --csv to_label.csv`: it failed
    with "classes [...] have a single image, which cannot be split into train and valid"."""
    monkeypatch.chdir(tmp_path)
    pool = make_pool(tmp_path / "photos", 6)
    assert main(["suggest", str(pool), "--n", "5", "--output", "to_label.csv", *FLAGS]) == 0
    rows = read(tmp_path / "to_label.csv")
    for r in rows:  # the annotator labels what was asked
        r["label"] = Path(r["path"]).parent.name
    counts = {c: [r["label"] for r in rows].count(c) for c in {r["label"] for r in rows}}
    assert len(rows) == 5 and 1 in counts.values()  # about one label per class: some class has a single image
    with open(tmp_path / "to_label.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    capsys.readouterr()
    with caplog.at_level(logging.INFO, logger="visiontune"):
        assert main(["train", "--csv", "to_label.csv", "--task", "single-label", "--epochs", "3", "--batch-size", "8",
                     "--num-workers", "0", "--trainable-bn", "eval", "--output", "runs", *FLAGS]) == 0
    printed = capsys.readouterr().out
    assert "best epoch: 1 of 1" in printed and "validation (the converged probe's cross-validation (" in printed
    said = [m for m in caplog.messages if "no validation split can be held out" in m]
    assert len(said) == 1 and ("have a single labelled image" in said[0] or "has a single labelled image" in said[0])
    assert "gradual's fine-tuning is skipped" in said[0]
    (run,) = (tmp_path / "runs").iterdir()
    metrics = json.loads((run / "metrics.json").read_text())
    assert "cross-validation" in metrics["validation"] and metrics["epochs_run"] == 1
    assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["val_loss"] > 0
    assert {r["split"] for r in read(run / "splits.csv")} == {"train"} and len(read(run / "splits.csv")) == 5
    assert RunDir(run).read_config().strategy.name == "feature-extract"
    capsys.readouterr()
    assert main(["predict", str(run), str(pool / "red" / "red_03.png")]) == 0
    assert "red_03.png" in capsys.readouterr().out


def test_at_exactly_one_label_per_class_leave_one_out_can_only_miss(tmp_path: Path) -> None:
    """Leave one out at one image per class: the held-out image's class is never in its fit,
    so the cross-validated accuracy is 0 (a probe scored on its own training rows would
    score near 1): an honest figure, and the run still trains on every image."""
    pool = make_pool(tmp_path / "photos", 1)
    labels = write_labels(tmp_path / "labels.csv", [(str(p), p.parent.name) for p in sorted(pool.rglob("*.png"))])
    r = vt.fit(None, csv=str(labels), output=str(tmp_path / "runs"), trainable_bn="eval", **dict(TINY, epochs=3))
    assert r.metrics["accuracy"] == 0.0 and r.valid_probs is not None and r.valid_probs.shape == (5, 5)
    assert vt.predict(r.run_dir, [str(p) for p in sorted(pool.rglob("*.png"))])[0]


def test_a_few_labels_validate_by_leave_one_out(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Two classes of three images and one of one: every image trains (none held out), and
    the probe's leave-one-out outputs are the validation: one row per labelled image, the
    single image's class never predicted for it."""
    pool = make_pool(tmp_path / "photos", 3)
    rows = [(str(pool / c / f"{c}_{i:02d}.png"), c) for c in ("red", "green") for i in range(3)]
    labels = write_labels(tmp_path / "labels.csv", [*rows, (str(pool / "blue" / "blue_00.png"), "blue")])
    with caplog.at_level(logging.INFO, logger="visiontune"):
        r = vt.fit(None, csv=str(labels), output=str(tmp_path / "runs"), trainable_bn="eval", **dict(TINY, epochs=3))
    assert any("class 'blue' has a single labelled image" in m for m in caplog.messages)
    assert any("leave-one-out cross-validation on the 7 labelled images" in m for m in caplog.messages)
    assert len(r.history) == 1 and r.valid_probs is not None and r.valid_probs.shape == (7, 3)
    blue = r.classes.index("blue")
    assert r.valid_probs[:, blue].argmax() != 6 or r.valid_probs[6].argmax() != blue  # unseen when held out
    assert 0.0 <= r.metrics["accuracy"] <= 6 / 7 and r.metrics["val_loss"] > 0


def test_a_strategy_without_the_probe_keeps_its_last_epoch(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    pool = make_pool(tmp_path / "photos", 1)
    labels = write_labels(tmp_path / "labels.csv", [(str(p), p.parent.name) for p in sorted(pool.rglob("*.png"))])
    with caplog.at_level(logging.INFO, logger="visiontune"):
        r = vt.fit(None, csv=str(labels), strategy="finetune", output=str(tmp_path / "runs"),
                   **dict(TINY, epochs=2, patience=1))
    assert any("the last epoch's weights are kept" in m for m in caplog.messages)
    assert r.kept == "last" and r.validated_by == "" and not r.metrics.keys() - {"train_loss"}
    resolved = RunDir(r.run_dir).read_config().train
    assert (resolved.restore_best, resolved.patience) == (False, 0)  # early stopping watched the training loss
    assert len(r.history) == 2 and r.best_epoch and json.loads((Path(r.run_dir) / "metrics.json").read_text())[
        "epoch"] == 2
    assert "validation" not in json.loads((Path(r.run_dir) / "metrics.json").read_text())


def test_a_valid_folder_still_validates_when_a_loose_class_has_one_image(tmp_path: Path) -> None:
    """Images without a split beside a valid/ folder: the folder validates, every loose one trains."""
    pool = make_pool(tmp_path / "photos", 3)
    (tmp_path / "data" / "valid").mkdir(parents=True)
    for c in ("red", "green"):
        (tmp_path / "data" / "valid" / c).mkdir()
        (pool / c / f"{c}_02.png").rename(tmp_path / "data" / "valid" / c / "v.png")
    rows = [(str(pool / "red" / f"red_{i:02d}.png"), "red") for i in range(2)] + [(str(pool / "green" / "green_00.png"),
                                                                                    "green")]
    rows += [(str(tmp_path / "data" / "valid" / c / "v.png"), c) for c in ("red", "green")]
    labels = write_labels(tmp_path / "labels.csv", rows)
    with open(labels, newline="") as fh:
        table = list(csv.reader(fh))
    table[0].append("split")
    for row in table[1:]:
        row.append("valid" if row[0].endswith("v.png") else "")
    with open(labels, "w", newline="") as fh:
        csv.writer(fh).writerows(table)
    source = vt.api.load_items(vt.config.RunConfig.create(None, csv=str(labels)).data)
    assert not source.no_validation and len(source.split("valid")) == 2 and len(source.split("train")) == 3


def test_label_sets_at_one_image_per_label_validate_by_cross_validation(tmp_path: Path,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    """Audit of issue 34: iterative stratification held nothing out at one image per label
    (or put a label's only images in validation, never trained), silently: no validation,
    and the best epoch chosen on the training loss. The single-label rule applies: a label
    with a single image, no split; the probe's cross-validation validates."""
    pool = make_pool(tmp_path / "photos", 2)
    sets = ["red", "red green", "blue", "blue grey", "yellow", "green"]  # grey and yellow: one image each
    paths = sorted(pool.rglob("*.png"))[:len(sets)]
    table = tmp_path / "labels.csv"
    with open(table, "w", newline="") as fh:
        csv.writer(fh).writerows([["path", "labels"], *[[str(p), s] for p, s in zip(paths, sets)]])
    with caplog.at_level(logging.INFO, logger="visiontune"):
        r = vt.fit(None, csv=str(table), output=str(tmp_path / "runs"), trainable_bn="eval", **dict(TINY, epochs=3))
    assert any("2 classes (grey, yellow) have a single labelled image" in m for m in caplog.messages)
    assert len(r.history) == 1 and "val_loss" in r.history[0] and r.valid_probs.shape == (6, 5)
    assert "cross-validation" in json.loads((Path(r.run_dir) / "metrics.json").read_text())["validation"]


def test_groups_with_one_or_two_images_per_class_train(tmp_path: Path) -> None:
    """Audit of issue 34: a group column with few labels gave scikit-learn's 'n_splits=5
    cannot be greater than the number of members in each class' traceback."""
    pool = make_pool(tmp_path / "photos", 2)
    rows = [(str(p), p.parent.name, f"g{i}") for i, p in enumerate(sorted(pool.rglob("*.png")))]
    for per_class in (2, 1):
        chosen = [r for r in rows if int(Path(r[0]).stem[-2:]) < per_class]
        table = tmp_path / f"labels{per_class}.csv"
        with open(table, "w", newline="") as fh:
            csv.writer(fh).writerows([["path", "label", "group"], *chosen])
        r = vt.fit(None, csv=str(table), output=str(tmp_path / f"runs{per_class}"), trainable_bn="eval",
                   **dict(TINY, epochs=2, strategy="feature-extract"))
        assert "val_loss" in r.history[0]


def test_a_single_labelled_number_is_a_clear_error_and_two_train(tmp_path: Path) -> None:
    """Audit of issue 34: regression with one labelled image said 'class 0 has a single
    labelled image' (a quantile bin) and then failed in the probe (ZeroDivisionError)."""
    from tasks.test_regression import make_regression_data

    root = make_regression_data(tmp_path / "reg", n=2)
    rows = read(root / "targets.csv")
    write_labels(root / "one.csv", [(rows[0]["path"], rows[0]["age"])])
    with pytest.raises(vt.DataError, match="a single labelled image to train on .* needs at least two"):
        vt.fit(root, csv="one.csv", task="regression", output=str(tmp_path / "runs"), **dict(TINY, epochs=2))
    r = vt.fit(root, csv="targets.csv", task="regression", output=str(tmp_path / "runs"), trainable_bn="eval",
               **dict(TINY, epochs=1, strategy="feature-extract"))
    assert len(r.history) == 1


def test_a_budget_ends_the_cross_validation_between_folds_never_inside_a_fit(tmp_path: Path) -> None:
    """Audit of issue 34: under a budget each fold's fit was cut to 20 iterations at the
    deadline while the head kept came whole from the probe memo: the figure was of other
    fits (val_loss 0.13 against 0.78). Past the deadline the cross-validation stops after
    the fold it is in; the rows it scored have the outputs they have without a budget."""
    from visiontune.data.sources import resolve_inputs
    from visiontune.train.clock import Clock
    from visiontune.train.session import train_run

    pool = make_pool(tmp_path / "photos", 3)
    rows = [(str(p), p.parent.name) for p in sorted(pool.rglob("*.png")) if p.parent.name != "blue"
            or p.name == "blue_00.png"]
    labels = write_labels(tmp_path / "labels.csv", rows)
    opts = dict(TINY, csv=str(labels), strategy="feature-extract", trainable_bn="eval", output=str(tmp_path / "r"))
    cfg, source = resolve_inputs(None, None, None, opts)
    whole = train_run(cfg, source)  # caches the features and remembers the probe's fit
    cfg, source = resolve_inputs(None, None, None, {**opts, "time_budget": 60})
    late = train_run(cfg, source, clock=Clock(60.0, started=time.perf_counter() - 61.0))  # past: cached features
    n = len(whole.valid_probs)
    assert 0 < len(late.valid_probs) < n  # stopped between folds
    ours = {tuple(np.round(p, 4)) for p in late.valid_probs}
    assert ours <= {tuple(np.round(p, 4)) for p in whole.valid_probs}


def test_held_out_logits_stop_between_folds() -> None:
    from visiontune.frozen.probe import ProbeFit, held_out_logits

    x = np.arange(12, dtype=np.float32).reshape(6, 2)
    fits = []

    def fit(rows: np.ndarray) -> ProbeFit:
        fits.append(rows)
        return ProbeFit(np.ones((2, 2), np.float32), np.zeros(2, np.float32), 1.0, 0)

    folds = [np.array([4, 5]), np.array([0, 1]), np.array([2, 3])]
    logits, rows = held_out_logits(x, folds, fit, stop=lambda: len(fits) >= 2)
    assert rows.tolist() == [0, 1, 4, 5] and len(fits) == 2
    assert np.allclose(logits, x[[0, 1, 4, 5]].sum(axis=1, keepdims=True).repeat(2, axis=1))


def test_advise_on_too_few_labels_says_only_what_it_is_about(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Audit of issue 34: `advise` at 2 labels per class and one singleton named every class
    as having 'fewer than 2 images' and printed the training run's 'the last epoch's weights
    are kept' line from its cost measurement."""
    pool = make_pool(tmp_path / "photos", 2)
    rows = [(str(p), p.parent.name) for p in sorted(pool.rglob("*.png")) if p.name != "blue_01.png"]
    labels = write_labels(tmp_path / "labels.csv", rows)
    with caplog.at_level(logging.INFO, logger="visiontune"), pytest.raises(vt.DataError) as caught:
        vt.advise(None, csv=str(labels), **{k: v for k, v in TINY.items() if k != "patience"})
    assert "classes ['blue'] have a single image" in str(caught.value)
    assert not any("weights are kept" in m or "held out" in m for m in caplog.messages)


def test_interpret_on_a_run_without_held_out_images_says_its_figures_are_of_the_training_images(
        tmp_path: Path) -> None:
    """Audit of issue 34: interpret printed 'accuracy 1.0000' (report.html too) on the nine
    training images of a run validated by cross-validation, with nothing saying so."""
    from visiontune.analysis.interpret import interpret

    pool = make_pool(tmp_path / "photos", 2)
    rows = [(str(p), p.parent.name) for p in sorted(pool.rglob("*.png")) if p.name != "blue_01.png"]
    r = vt.fit(None, csv=str(write_labels(tmp_path / "labels.csv", rows)), output=str(tmp_path / "runs"),
               trainable_bn="eval", **dict(TINY, epochs=2))
    result = interpret(r.run_dir, top_n=4)
    assert result.format().startswith("on the training images (no validation or test images: optimistic")
    assert "on the training images" in (Path(r.run_dir) / "interpret" / "report.html").read_text()
