"""Multi-label classification end to end: label sets from a CSV or a function, iterative
stratification, the task's loss / metrics / thresholds, and every command on a multi-label set."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, f1_score, hamming_loss

import visiontune as vt
from conftest import StopAfter, make_multilabel_data
from visiontune.bundle import load_bundle
from visiontune.config import DataConfig
from visiontune.data.sources import load_items
from visiontune.tasks.catalog import make_task
from visiontune.tasks.multi_label import MultiLabel


def _csv(path: Path, rows: list[list[str]]) -> Path:
    with open(path, "w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    return path


# -- data --------------------------------------------------------------------------------
def test_a_labels_column_is_detected_and_summarised(tmp_path: Path) -> None:
    root = make_multilabel_data(tmp_path / "ml", n=60)
    source = load_items(DataConfig(path=str(root), csv="labels.csv"))
    assert source.task == "multi-label" and source.classes == ["blue", "green", "red"]
    assert all(isinstance(it.label, tuple) for it in source.items) and any(it.label == () for it in source.items)
    summary = source.summary()
    assert "task: multi-label (detected: a 'labels' column" in summary
    assert "labels per image:" in summary and "images with no label:" in summary and "most frequent pairs:" in summary


def test_iterative_stratification_puts_every_label_in_train_and_valid(tmp_path: Path) -> None:
    root = make_multilabel_data(tmp_path / "ml", n=60)
    source = load_items(DataConfig(path=str(root), csv="labels.csv", valid_pct=0.25), seed=3)
    for split in ("train", "valid"):
        counts = source.class_counts(split)
        assert all(n > 0 for n in counts.values()), (split, counts)
    share = sum(source.class_counts("valid").values()) / sum(source.class_counts("train").values())
    assert 0.2 < share < 0.5


def test_a_label_function_returning_lists_makes_a_multi_label_task(tmp_path: Path) -> None:
    root = make_multilabel_data(tmp_path / "ml", n=12)
    table = {Path(r["path"]).name: tuple(sorted(r["labels"].split())) for r in csv.DictReader(open(root / "labels.csv"))}
    source = load_items(DataConfig(path=str(root / "images"), valid_pct=0.0), label_func=lambda p: list(table[p.name]))
    assert source.task == "multi-label" and {it.label for it in source.items} <= set(table.values())


def test_bad_multi_label_tables_are_clear_errors(tmp_path: Path) -> None:
    root = make_multilabel_data(tmp_path / "ml", n=12)
    mixed = _csv(tmp_path / "mixed.csv", [["path", "labels"], ["images/img_000.png", "red green"],
                                         ["images/img_001.png", "red,green"]])
    with pytest.raises(vt.DataError, match=r"mixed\.csv:3: 'red,green' mixes delimiters"):
        load_items(DataConfig(path=str(root), csv=str(mixed)))
    only_valid = _csv(tmp_path / "v.csv", [["path", "labels", "split"], ["images/img_000.png", "red", "train"],
                                          ["images/img_001.png", "red blue", "valid"]])
    with pytest.raises(vt.DataError, match=r"labels \['blue'\] appear in valid/test but not in train"):
        load_items(DataConfig(path=str(root), csv=str(only_valid)))
    several = _csv(tmp_path / "s.csv", [["path", "label"], ["images/img_000.png", "red"],
                                       ["images/img_001.png", "red green"]])
    with pytest.raises(vt.DataError, match=r"s\.csv:3: 'red green' holds several labels but --task is single-label"):
        load_items(DataConfig(path=str(root), csv=str(several), task="single-label"))
    missing = _csv(tmp_path / "m.csv", [["path", "labels"], ["images/img_000.png", "red"], ["images/img_001.png", ""],
                                       ["images/nope.png", "red"]])
    source = load_items(DataConfig(path=str(root), csv=str(missing), valid_pct=0.0))
    assert len(source.items) == 2 and any("nope.png" in p and "missing" in why for p, why in source.excluded)


# -- the task ----------------------------------------------------------------------------
def test_the_loss_is_binary_cross_entropy_and_shares_sum_to_it() -> None:
    task = MultiLabel(["a", "b", "c"])
    logits, y = torch.randn(5, 3), task.encode([("a",), (), ("b", "c"), ("a", "c"), ("c",)])
    loss = task.loss()
    torch.testing.assert_close(loss(logits, y), torch.nn.functional.binary_cross_entropy_with_logits(logits, y))
    parts = sum(loss.total(lc, yc) / loss.norm(y) for lc, yc in zip(logits.split(2), y.split(2)))
    torch.testing.assert_close(parts, loss(logits, y))
    weights = torch.tensor(task.balance_weights([("a",), ("a", "b"), (), ("a",)]))
    assert weights.tolist() == pytest.approx([1 / 3, 3.0, 1.0])  # negatives / positives; absent label: 1


def test_metrics_are_sklearns_and_thresholds_are_tuned_per_label() -> None:
    rng = np.random.default_rng(0)
    y = (rng.random((200, 3)) < [0.5, 0.3, 0.01]).astype(float)
    assert y[:, 2].sum() < 5
    probs = np.clip(y * 0.35 + rng.random((200, 3)) * 0.6, 0, 1)  # label a/b separable above ~0.35-0.6
    task = MultiLabel(["a", "b", "c"])
    m = task.metrics(y, probs)
    pred = (probs >= 0.5).astype(int)
    assert m["mAP"] == pytest.approx(average_precision_score(y[:, :3][:, y.sum(0) > 0], probs[:, y.sum(0) > 0]))
    assert m["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro", zero_division=0))
    assert m["hamming_loss"] == pytest.approx(hamming_loss(y, pred))
    tuned = task.tune_thresholds(y, probs)
    assert tuned[2] == 0.5  # 'c' has fewer than 5 positives: the global threshold
    for c in (0, 1):
        best = max(f1_score(y[:, c], probs[:, c] >= t) for t in np.unique(probs[:, c]))
        assert f1_score(y[:, c], probs[:, c] >= tuned[c]) == pytest.approx(best)
    again = make_task("multi-label", ["a", "b", "c"], task.metadata())
    assert again.thresholds.tolist() == tuned.tolist()


def test_decode_gives_every_label_above_its_threshold_or_none_with_the_top_k() -> None:
    task = MultiLabel(["a", "b", "c"], thresholds=[0.5, 0.5, 0.9])
    d = task.decode(np.array([[0.7, 0.6, 0.8], [0.1, 0.2, 0.3]]), top_k=2)
    assert d[0].labels == ["a", "b"] and d[0].probs == pytest.approx([0.7, 0.6])  # c: 0.8 < its 0.9
    assert d[1].labels == [] and [n for n, _ in d[1].ranked] == ["c", "b"]


# -- every command -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def ml_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from conftest import TINY

    root = make_multilabel_data(tmp_path_factory.mktemp("ml") / "data", n=72, with_split=True)
    r = vt.fit(root, csv="labels.csv", **dict(TINY, strategy="feature-extract", epochs=12, lr=0.1, augment=False,
                                            thresholds="tuned", output=str(root.parent / "runs")))
    return Path(r.run_dir), root


def test_train_tunes_thresholds_and_stores_them_with_the_weights(ml_run: tuple[Path, Path]) -> None:
    run, _ = ml_run
    history = [json.loads(x) for x in (run / "history.jsonl").read_text().splitlines()]
    assert {"mAP", "micro_f1", "macro_f1", "samples_f1", "subset_accuracy", "hamming_loss"} <= set(history[-1])
    assert history[-1]["mAP"] > 0.8  # colours in quadrants, from a frozen random backbone's features
    saved = json.loads((run / "thresholds.json").read_text())
    assert set(saved["thresholds"]) == {"blue", "green", "red"} and "optimistic" in saved["chosen_on"]
    bundle = load_bundle(run)
    assert bundle.task.name == "multi-label"
    assert bundle.task.thresholds.tolist() == pytest.approx([saved["thresholds"][c]["threshold"]
                                                             for c in bundle.classes])


def test_metrics_json_reports_the_tuned_thresholds_decisions(ml_run: tuple[Path, Path], tmp_path: Path) -> None:
    """metrics.json's F1 and subset accuracy are those of the thresholds the model keeps, on
    the calibrated validation outputs they were tuned on (they were the 0.5 threshold's)."""
    run, root = ml_run
    rows = list(csv.DictReader(open(root / "labels.csv")))
    with open(root / "valid_only.csv", "w", newline="") as fh:  # the validation rows alone: evaluate reads them all
        w = csv.writer(fh)
        w.writerow(["path", "labels"])
        w.writerows([r["path"], r["labels"]] for r in rows if r["split"] == "valid")
    on_valid = vt.evaluate(run, root, csv="valid_only.csv").metrics
    saved = json.loads((run / "metrics.json").read_text())
    assert "optimistic" in saved["thresholds"]
    for key in ("macro_f1", "samples_f1", "subset_accuracy", "hamming_loss"):
        assert saved[key] == pytest.approx(on_valid[key], abs=1e-6), key


def test_predict_prints_and_writes_label_sets(ml_run: tuple[Path, Path], tmp_path: Path, capsys) -> None:
    from visiontune.cli import main

    run, root = ml_run
    preds, _ = vt.predict(run, root / "images")
    assert len(preds) == 72 and all(p.task == "multi-label" for p in preds)
    assert any(len(p.labels) >= 2 for p in preds) and any(len(p.labels) < 2 for p in preds)
    for p in preds:
        thresholds = dict(zip(["blue", "green", "red"], load_bundle(run).task.thresholds))
        assert p.labels == sorted((c for c in p.probs if p.probs[c] >= thresholds[c]), key=lambda c: -p.probs[c])
    assert main(["predict", str(run), str(root / "images"), "--output", str(tmp_path / "p.csv")]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 72 and all(line.count("\t") >= 1 for line in printed)
    rows = list(csv.DictReader(open(tmp_path / "p.csv")))
    assert list(rows[0]) == ["path", "labels", "prob_blue", "prob_green", "prob_red", "unknown", "ood_score"] \
        and len(rows) == 72  # the run keeps a bank: the OOD columns


def test_evaluate_reports_map_and_per_label_table(ml_run: tuple[Path, Path]) -> None:
    run, root = ml_run
    result = vt.evaluate(run, root, csv="labels.csv")
    assert len(result.paths) == 12  # the CSV's test split
    assert {"mAP", "macro_f1", "samples_f1", "subset_accuracy", "hamming_loss", "loss"} <= set(result.metrics)
    text = result.format()
    assert "per-label confusion" in text and "threshold" in text and " ap " in f" {text} ".replace("\n", " ")


def test_export_and_serve_carry_the_thresholds(ml_run: tuple[Path, Path]) -> None:
    pytest.importorskip("onnxruntime")
    from fastapi.testclient import TestClient

    from visiontune.deploy.export import export, load_exported
    from visiontune.deploy.serve import create_app

    run, root = ml_run
    onnx = export(run, "onnx")
    exported = load_exported(onnx.path)
    assert exported.task.name == "multi-label"
    assert exported.task.thresholds.tolist() == pytest.approx(load_bundle(run).task.thresholds.tolist())
    a, _ = vt.predict(run, root / "images")
    b, _ = vt.predict(onnx.path, root / "images")
    assert [p.labels for p in a] == [p.labels for p in b]
    client = TestClient(create_app(run))
    r = client.post("/api/predict", files={"file": ("x.png", (root / "images" / "img_005.png").read_bytes(),
                                                    "image/png")})
    assert r.status_code == 200 and r.json()["labels"] == next(p.labels for p in a if p.path.endswith("img_005.png"))


def test_interpret_cv_and_resume_on_a_multi_label_set(ml_run: tuple[Path, Path], tmp_path: Path) -> None:
    from conftest import TINY
    from visiontune.analysis.interpret import interpret
    from visiontune.selection.cv import cross_validate

    run, root = ml_run
    res = interpret(run)
    assert {"confusion.csv", "per_class.csv", "most_confused.csv", "top_losses.csv", "mislabels.csv",
            "report.html"} <= set(res.files)
    header = next(csv.reader(open(run / "interpret" / "confusion.csv")))
    assert header == ["label", "TP", "FP", "FN", "TN"]
    assert res.suspects and all(s.predicted == "" or s.predicted[0] in "+-" for s in res.suspects)
    cv = cross_validate(root, csv="labels.csv", folds=3, **dict(TINY, strategy="feature-extract", epochs=4, lr=0.1,
                                                                  output=str(tmp_path / "cv")))
    assert set(cv.mean) == {"mAP", "macro_f1", "loss"} and "mAP" in cv.format()
    part = vt.fit(root, csv="labels.csv", **dict(TINY, strategy="gradual", epochs=3, output=str(tmp_path / "r")),
                  callbacks=[StopAfter(2)])
    resumed = vt.fit(resume=part.run_dir)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]




def test_a_prediction_with_no_label_above_threshold_prints_none_and_the_top_k() -> None:
    from visiontune.api import Prediction
    from visiontune.commands import _prediction_line

    none = Prediction("x.png", "", 0.0, [("red", 0.4), ("blue", 0.3)], [], {"red": 0.4, "blue": 0.3}, "multi-label")
    assert _prediction_line(none) == "x.png\t(none)\t(top: red 0.400, blue 0.300)"
    two = Prediction("y.png", "red blue", 0.9, [("red", 0.9), ("blue", 0.7)], ["red", "blue"],
                     {"red": 0.9, "blue": 0.7}, "multi-label")
    assert _prediction_line(two) == "y.png\tred 0.900, blue 0.700"


def test_after_resume_tuned_thresholds_and_valid_probs_are_the_best_epochs(tmp_path: Path) -> None:
    """The best epoch comes before the interruption: the thresholds stored with its weights
    must be tuned on its outputs, as in the uninterrupted run, not on the last epoch's."""
    from conftest import TINY

    root = make_multilabel_data(tmp_path / "d", n=48)
    kw = dict(TINY, csv="labels.csv", strategy="finetune", epochs=3, lr=3e-3, thresholds="tuned", min_delta=1e9,
              augment="none", output=str(tmp_path / "runs"))
    full = vt.fit(root, name="full", **kw)
    part = vt.fit(root, name="part", **kw, callbacks=[StopAfter(2)])
    resumed = vt.fit(resume=part.run_dir)
    assert full.best_epoch == resumed.best_epoch == 1 and len(resumed.history) == 3
    assert not np.allclose(resumed.valid_probs, _last_epoch_probs(resumed), atol=1e-4)  # best != last epoch
    assert np.allclose(resumed.valid_probs, full.valid_probs, atol=1e-6)
    thresholds = [json.loads((Path(r.run_dir) / "thresholds.json").read_text())["thresholds"] for r in (full, resumed)]
    assert thresholds[0] == thresholds[1]
    assert load_bundle(resumed.run_dir).task.thresholds == pytest.approx(load_bundle(full.run_dir).task.thresholds)


def _last_epoch_probs(result) -> np.ndarray:
    """Validation probabilities of the weights the run's last epoch ended with."""
    from visiontune.models.classifier import load_weights
    from visiontune.rundir import load_checkpoint
    from visiontune.runtime.inference import run_eval

    setup = result.setup
    model = load_bundle(result.run_dir).model
    load_weights(model, load_checkpoint(Path(result.run_dir) / "checkpoints" / "last.pt")["model"])  # no bank in it
    return run_eval(model, setup.data.images().valid, setup.device, setup.task).probs
