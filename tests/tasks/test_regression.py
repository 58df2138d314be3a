"""Image regression (--task regression): the task by itself (encode, metrics against
scikit-learn, loss on known values, strata, the bundle round trip) and through every
command (train on a CSV / a file-name regex / a label function, predict, evaluate, cv,
export, serve)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

import visiontune as vt
from conftest import TINY
from visiontune.errors import ConfigError, DataError
from visiontune.tasks.base import NO_LABEL, UNREADABLE, known_rows, marker_like, unreadable_rows
from visiontune.tasks.catalog import make_task
from visiontune.tasks.regression import Regression


def make_regression_data(root: Path, n: int = 40, seed: int = 0, name_values: bool = False) -> Path:
    """root/images/img_<i>.png whose brightness grows with a target in -5..5 (negative
    targets on purpose: they must never be read as markers), and root/targets.csv
    (path,age). With `name_values`, files are named `<value>_<i>.png` (UTKFace style)."""
    rng = np.random.default_rng(seed)
    rows = [["path", "age"]]
    for i in range(n):
        value = round(float(rng.uniform(-5, 5)), 2)
        grey = 128 + 22 * value
        arr = np.clip(np.full((40, 40, 3), grey) + rng.normal(0, 6, (40, 40, 3)), 0, 255).astype(np.uint8)
        name = f"{value}_{i:03d}.png" if name_values else f"img_{i:03d}.png"
        path = root / "images" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        from PIL import Image

        Image.fromarray(arr).save(path)
        rows.append([f"images/{name}", str(value)])
    with open(root / "targets.csv", "w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    return root


# -- the task by itself -------------------------------------------------------------------

def test_metrics_match_scikit_learn_and_scipy() -> None:
    rng = np.random.default_rng(0)
    y = rng.normal(3, 2, 50)
    p = y + rng.normal(0, 0.5, 50)
    m = Regression(["age"]).metrics(y, p[:, None])
    assert m["mae"] == pytest.approx(mean_absolute_error(y, p))
    assert m["rmse"] == pytest.approx(math.sqrt(mean_squared_error(y, p)))
    assert m["r2"] == pytest.approx(r2_score(y, p))
    assert m["spearman"] == pytest.approx(spearmanr(y, p).statistic)
    assert all(math.isnan(v) for v in Regression(["age"]).metrics(np.zeros(0), np.zeros((0, 1))).values())


def test_loss_is_mse_on_standardised_targets_and_output_is_in_real_units() -> None:
    task = Regression(["age"], mean=10.0, std=2.0)
    z = torch.tensor([[0.0], [1.0]])  # raw head outputs: 10 and 12 in real units
    y = torch.tensor([11.0, 16.0])  # standardised: 0.5 and 3
    assert task.probabilities(z).flatten().tolist() == [10.0, 12.0]
    assert float(task.loss()(z, y)) == pytest.approx(((0 - 0.5) ** 2 + (1 - 3) ** 2) / 2)
    huber = Regression(["age"], mean=10.0, std=2.0, loss="huber").loss()
    assert float(huber(z, y)) == pytest.approx((0.5 * 0.5 ** 2 + (2 - 0.5)) / 2)


def test_target_range_squashes_the_output() -> None:
    task = Regression(["age"], mean=50, std=10, target_range=(0, 100))
    out = task.probabilities(torch.tensor([[-50.0], [0.0], [50.0]])).flatten()
    assert out[0] == pytest.approx(0, abs=1e-6) and out[1] == pytest.approx(50) and out[2] == pytest.approx(100)
    with pytest.raises(ConfigError, match="LOW must be below HIGH"):
        Regression(["age"], target_range=(5, 1))


def test_fit_labels_encode_decode_and_the_bundle_metadata_round_trip() -> None:
    task = Regression(["age"], target_range=(0, 120), loss="huber")
    task.fit_labels([20.0, 30.0, 40.0])
    assert task.mean == pytest.approx(30) and task.std == pytest.approx(np.std([20, 30, 40]))
    assert task.encode([1.5, -2.0]).tolist() == [1.5, -2.0]
    again = make_task("regression", ["age"], task.metadata())
    assert (again.mean, again.std, again.target_range, again.loss_kind) == (task.mean, task.std, (0, 120), "huber")
    decoded = task.decode(np.array([[41.25]]), 3)[0]
    assert decoded.value == pytest.approx(41.25)
    assert task.output.csv_row("a.png", decoded, " ", 3) == ["a.png", "41.25"] and task.output.record(decoded) == {"prediction": 41.25}


def test_markers_never_collide_with_negative_targets() -> None:
    """A target of -1 or -2 is a real number: only NaN / -inf mark unlabelled / unreadable."""
    targets = torch.tensor([-1.0, -2.0, 3.0])
    rows = torch.stack([targets[0], targets[1], marker_like(targets, NO_LABEL), marker_like(targets, UNREADABLE)])
    assert known_rows(rows).tolist() == [True, True, False, False]
    assert unreadable_rows(rows.numpy()).tolist() == [False, False, False, True]
    classes = torch.tensor([0, 1, NO_LABEL, UNREADABLE])  # class indices keep their negative markers
    assert known_rows(classes).tolist() == [True, True, False, False]


def test_strata_are_quantile_bins_with_no_single_row() -> None:
    y = np.r_[np.zeros(45), np.arange(5) + 100.0]  # heavy ties and a thin tail
    strata = Regression.strata(y)
    assert len(strata) == 50 and np.bincount(strata)[np.bincount(strata) > 0].min() >= 2
    wide = Regression.strata(np.linspace(0, 1, 200))
    assert len(set(wide.tolist())) == 10  # ten bins of 20 rows


def test_parse_label_refuses_text_and_non_finite_values() -> None:
    assert Regression.parse_label(" 3.5 ", " ", "x") == 3.5
    for text in ("cat", "4.5_003"):  # float() would read the second as 4.5003
        with pytest.raises(DataError, match="is not a number"):
            Regression.parse_label(text, " ", "row 3")
    with pytest.raises(DataError, match="finite"):
        Regression.parse_label("inf", " ", "row 3")


def test_balance_and_label_smoothing_are_refused() -> None:
    with pytest.raises(ConfigError, match="--balance"):
        Regression(["y"]).check("weights", 0.0)
    with pytest.raises(ConfigError, match="--label-smoothing"):
        Regression(["y"]).check("none", 0.1)


# -- through the commands -----------------------------------------------------------------

@pytest.fixture(scope="module")
def reg_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_regression_data(tmp_path_factory.mktemp("reg"), n=60)


@pytest.fixture(scope="module")
def reg_run(reg_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    out = tmp_path_factory.mktemp("runs")
    return vt.fit(reg_data, csv="targets.csv", task="regression", strategy="feature-extract", epochs=1,
                  output=str(out), **{**TINY, "image_size": 32})


def test_train_feature_extract_learns_the_number(reg_run: Any, reg_data: Path) -> None:
    assert reg_run.classes == ["age"]  # the one output is named after the CSV column
    assert reg_run.metrics["mae"] < 1.5, reg_run.metrics  # targets spread over -5..5 (std ~2.9)


def test_predict_and_evaluate_in_real_units(reg_run: Any, reg_data: Path, tmp_path: Path) -> None:
    preds, skipped = vt.predict(reg_run.run_dir, reg_data / "images")
    truth = {r["path"]: float(r["age"]) for r in csv.DictReader(open(reg_data / "targets.csv"))}
    errors = [abs(p.value - truth["images/" + Path(p.path).name]) for p in preds]
    assert not skipped and len(preds) == 60 and np.mean(errors) < 1.5
    result = vt.evaluate(reg_run.run_dir, reg_data, csv="targets.csv")
    assert set(result.metrics) >= {"mae", "rmse", "r2", "spearman", "loss"} and result.confusion is None
    assert result.metrics["r2"] > 0.5 and "residuals" in result.text


def test_file_name_numbers_and_label_functions(tmp_path: Path) -> None:
    """UTKFace-style names (`<age>_<i>.png`) with --label-regex, and a label function
    returning floats (task auto), both train a regression."""
    root = make_regression_data(tmp_path / "named", n=30, name_values=True)
    run = vt.fit(root, label_regex=r"^(-?[\d.]+)_", task="regression", strategy="feature-extract", epochs=1,
                 output=str(tmp_path / "runs"), **TINY)
    assert run.classes == ["target"] and np.isfinite(run.metrics["mae"])
    by_func = vt.fit(root / "images", label_func=lambda p: float(p.name.split("_")[0]), strategy="feature-extract",
                     epochs=1, output=str(tmp_path / "runs"), **TINY)
    assert by_func.setup.task.name == "regression" and np.isfinite(by_func.metrics["mae"])
    with pytest.raises(DataError, match="is not a number"):
        vt.fit(root, label_regex=r"^(.+)\.png$", task="regression", output=str(tmp_path / "runs"), **TINY)


def test_monitor_direction_comes_from_the_task(reg_data: Path, tmp_path: Path) -> None:
    """--monitor mae is minimised (the old rule maximised anything without "loss" in its
    name)."""
    run = vt.fit(reg_data, csv="targets.csv", task="regression", strategy="finetune", epochs=3, monitor="mae",
                 patience=0, output=str(tmp_path), **{k: v for k, v in TINY.items() if k != "patience"})
    maes = [h["mae"] for h in run.history]
    assert run.best_epoch == int(np.argmin(maes)) + 1 and np.argmin(maes) != np.argmax(maes)  # 1-based


def test_the_monitor_direction_and_a_metric_the_task_lacks() -> None:
    """The regression task minimises its errors and maximises r2; a metric it lacks (a
    classification one) is a ConfigError, raised before training, naming those it has."""
    task = Regression(["target"])
    assert [task.objective(m).mode for m in ("mae", "rmse", "r2")] == ["min", "min", "max"]
    with pytest.raises(ConfigError, match="'accuracy' is not a metric of the regression task; available: .*mae"):
        task.objective("accuracy")


def test_gradual_cv_and_oof(reg_data: Path, tmp_path: Path) -> None:
    result = vt.cross_validate(reg_data, csv="targets.csv", task="regression", folds=3, strategy="gradual", epochs=2,
                               output=str(tmp_path), **TINY)
    assert result.metrics == ("mae", "r2", "loss") and np.isfinite(result.mean["mae"])
    rows = list(csv.DictReader(open(result.oof_path)))
    assert len(rows) == 60 and set(rows[0]) == {"path", "label", "fold", "predicted", "prediction"}
    assert {int(r["fold"]) for r in rows} == {1, 2, 3}
    residual = np.mean([abs(float(r["prediction"]) - float(r["label"])) for r in rows])
    assert residual == pytest.approx(result.mean["mae"], rel=0.25)


def test_cli_predict_writes_path_prediction(reg_run: Any, reg_data: Path, tmp_path: Path) -> None:
    from visiontune.cli import main

    out = tmp_path / "preds.csv"
    assert main(["predict", reg_run.run_dir, str(reg_data / "images"), "--output", str(out)]) == 0
    rows = list(csv.reader(open(out)))
    assert rows[0] == ["path", "prediction", "unknown", "ood_score"] and len(rows) == 61  # a bank: the OOD columns
    assert all(np.isfinite(float(r[1])) for r in rows[1:])
    js = tmp_path / "preds.json"
    assert main(["predict", reg_run.run_dir, str(reg_data / "images" / "img_000.png"), "--output", str(js)]) == 0
    record = json.loads(js.read_text())[0]
    assert set(record) == {"path", "prediction", "unknown", "ood_score"} and float(record["prediction"]) == pytest.approx(float(rows[1][1]))


def test_export_outputs_real_units(reg_run: Any, reg_data: Path, tmp_path: Path) -> None:
    """The exported file holds the target scaling: its raw output is the number itself, and
    predict through it matches the eager model's."""
    pytest.importorskip("onnxruntime")
    from visiontune.bundle import load_bundle
    from visiontune.deploy.export import export, load_exported

    assert export(reg_run.run_dir, "onnx", tmp_path / "model.onnx").max_abs_diff < 1e-3
    eager, onnx = load_bundle(reg_run.run_dir), load_exported(tmp_path / "model.onnx")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        z = eager.model.eval()(x)
        real, raw = eager.task.probabilities(z), onnx.model(x)
    assert torch.allclose(raw.float(), real.float(), atol=1e-3) and not torch.allclose(raw.float(), z.float(), atol=0.1)
    a, _ = vt.predict(reg_run.run_dir, reg_data / "images")
    b, _ = vt.predict(str(tmp_path / "model.onnx"), reg_data / "images")
    assert max(abs(p.value - q.value) for p, q in zip(a, b)) < 1e-3


def test_interpret_shows_residuals_and_suspicious_targets(reg_data: Path, tmp_path: Path) -> None:
    """One target is made wildly wrong: interpret ranks it first among the suspicious targets."""
    data = tmp_path / "d"
    import shutil

    shutil.copytree(reg_data, data)
    rows = list(csv.reader(open(data / "targets.csv")))
    rows[5][1] = "40"  # the image shows a value in -5..5
    csv.writer(open(data / "targets.csv", "w", newline="")).writerows(rows)
    run = vt.fit(data, csv="targets.csv", task="regression", strategy="feature-extract", epochs=1,
                 output=str(tmp_path / "runs"), **TINY)
    res = vt.interpret(run.run_dir)
    assert {"residuals.png", "top_losses.png", "mislabels.csv", "report.html"} <= set(res.files)
    assert res.suspects[0].path.endswith(rows[5][0].split("/")[-1]) and res.suspects[0].flagged
    page = Path(res.files["report.html"]).read_text()
    assert "<td>images</td>" in page and "<td>age</td><td>0</td>" not in page  # a number has no class counts


def test_advise_and_compare_measure_numbers(reg_data: Path, tmp_path: Path) -> None:
    """The advisor scores the frozen features by cross-validated R^2 (ridge) against k-NN
    on pixels and the mean (0); compare ranks strategies by MAE."""
    advice = vt.advise(reg_data, csv="targets.csv", task="regression", epochs=3, **TINY)
    assert "r2 (5-fold CV)" in advice.explanation and advice.chance == 0.0 and advice.probe_accuracy <= 1.0
    table, _ = vt.compare(reg_data, csv="targets.csv", task="regression", strategies=["feature-extract", "finetune"],
                        epochs=2, output=str(tmp_path), **TINY)
    assert [row.strategy for row in table] == ["feature-extract", "finetune"]
    assert all(np.isfinite(row.scores["mae"]) and np.isfinite(row.scores["r2"]) for row in table)


def test_serve_answers_the_number(reg_run: Any, reg_data: Path) -> None:
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from visiontune.deploy.serve import create_app

    preds, _ = vt.predict(reg_run.run_dir, reg_data / "images" / "img_003.png")
    client = TestClient(create_app(Path(reg_run.run_dir)))
    image = (reg_data / "images" / "img_003.png").read_bytes()
    r = client.post("/api/predict", files={"file": ("a.png", image, "image/png")})
    assert r.status_code == 200 and r.json()["prediction"] == pytest.approx(preds[0].value, abs=1e-4)


def test_shards_carry_numbers(reg_data: Path, tmp_path: Path) -> None:
    """`visiontune shard` of a regression set writes the numbers; training from the shards
    reads them back as numbers (a -2.5 is a target, not a marker)."""
    from visiontune.cli import main

    assert main(["shard", str(reg_data), "--csv", "targets.csv", "--task", "regression", "--out",
                 str(tmp_path / "shards"), "--size", "16"]) == 0
    described = json.loads((tmp_path / "shards" / "dataset.json").read_text())
    assert described["task"] == "regression" and described["classes"] == ["age"]
    run = vt.fit(tmp_path / "shards", strategy="finetune", epochs=1, output=str(tmp_path / "runs"), **TINY)
    assert run.setup.task.name == "regression" and np.isfinite(run.metrics["mae"])
    labels = sorted(it.label for it in run.data.items)
    truth = sorted(float(r["age"]) for r in csv.DictReader(open(reg_data / "targets.csv")))
    assert labels == pytest.approx(truth) and min(labels) < 0


@pytest.mark.xdist_group("deadlines")  # a real clock: with the other deadline tests, one at a time
def test_time_budget_plans_a_regression(reg_data: Path, tmp_path: Path) -> None:
    run = vt.fit(reg_data, csv="targets.csv", task="regression", time_budget="20s", output=str(tmp_path),
                 **{k: v for k, v in TINY.items() if k != "patience"})
    plan = json.loads(Path(run.run_dir, "time_budget.json").read_text())
    assert np.isfinite(run.metrics["mae"]) and plan["actual_s"] <= 20 * 1.1


def test_tensorboard_gets_the_residuals_and_resume_keeps_the_scaling(reg_data: Path, tmp_path: Path) -> None:
    """Tracking draws the residual figure (a regression has no confusion matrix); a run
    resumed from its checkpoint ends with the same target mean and std in its weights."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from conftest import StopAfter
    from visiontune.bundle import load_bundle

    base = dict(csv="targets.csv", task="regression", strategy="finetune", epochs=3, output=str(tmp_path), **TINY)
    run = vt.fit(reg_data, track="tensorboard", **base)
    events = EventAccumulator(str(Path(run.run_dir) / "tensorboard"), size_guidance={"images": 0}).Reload()
    assert "residuals" in events.Tags()["images"] and "mae" in events.Tags()["scalars"]
    part = vt.fit(reg_data, callbacks=[StopAfter(1)], **base)
    resumed = vt.fit(resume=part.run_dir)
    a, b = load_bundle(run.run_dir).task, load_bundle(resumed.run_dir).task
    assert (a.mean, a.std) == pytest.approx((b.mean, b.std)) and len(resumed.history) == 3


def test_target_range_from_the_cli_survives_the_run_config(tmp_path: Path) -> None:
    from visiontune.cli import build_parser
    from visiontune.config import RunConfig
    from visiontune.rundir import RunDir

    args = build_parser().parse_args(["train", "d", "--task", "regression", "--target-range", "0", "120",
                                      "--loss", "huber"])
    cfg = RunConfig.create(task=args.task, target_range=args.target_range, loss=args.loss)
    assert cfg.outputs.target_range == (0.0, 120.0) and cfg.outputs.loss == "huber"
    RunDir(tmp_path).write_config(cfg)
    assert RunDir(tmp_path).read_config() == cfg


@pytest.mark.parametrize("fmt,suffix", [("pt2", ".pt2"), ("torchscript", ".ts")])
def test_pt2_and_torchscript_exports_output_real_units(reg_run: Any, reg_data: Path, tmp_path: Path, fmt: str,
                                                        suffix: str) -> None:
    from visiontune.deploy.export import export

    assert export(reg_run.run_dir, fmt, tmp_path / f"model{suffix}").max_abs_diff < 1e-3
    a, _ = vt.predict(reg_run.run_dir, reg_data / "images")
    b, _ = vt.predict(str(tmp_path / f"model{suffix}"), reg_data / "images")
    assert max(abs(p.value - q.value) for p, q in zip(a, b)) < 1e-3


def test_show_batch_titles_the_numbers(reg_data: Path) -> None:
    figure = vt.show_batch(reg_data, n=4, csv="targets.csv", task="regression", image_size=32)
    titles = [ax.get_title() for ax in figure.axes if ax.get_title()]
    truth = {float(r["age"]) for r in csv.DictReader(open(reg_data / "targets.csv"))}
    assert len(titles) == 4 and all(float(t) in truth for t in titles)


def test_written_predictions_keep_every_digit_of_a_large_target() -> None:
    """A price of 1,234,567.8 must not come back from the CSV as 1.23457e+06."""
    from visiontune.tasks.regression import Regression

    task = Regression(["price"], mean=1e6, std=2e5)
    value = float(np.float32(1234567.8))
    [decoded] = task.decode(np.array([[value]], dtype=np.float32), 1)
    assert float(task.output.csv_row("a.jpg", decoded, ",", 1)[1]) == value
    assert float(task.output.oof_cells(np.array([value]), ",")[1]) == value
