"""--track tensorboard,mlflow: read back what was logged with each tool's own reader."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest

import visiontune as vt
from conftest import TINY, make_class_folders

FINETUNE = dict(TINY, strategy="finetune", epochs=2, lr=1e-2)


@pytest.fixture
def mlruns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The store MLflow 3 recommends for local use, named as users name it (issue 24: with
    mlflow-skinny alone it failed while starting and trained untracked)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    return client, client.get_experiment_by_name("visiontune").experiment_id


def test_tensorboard_event_files_hold_epochs_lr_per_step_figures_and_hparams(flat_data: Path, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    r = vt.fit(flat_data, **FINETUNE, output=str(tmp_path / "runs"), track="tensorboard")
    events = EventAccumulator(str(Path(r.run_dir) / "tensorboard"), size_guidance={"images": 0}).Reload()
    tags = events.Tags()
    assert [e.step for e in events.Scalars("val_loss")] == [1, 2]
    assert [round(e.value, 5) for e in events.Scalars("val_loss")] == [round(h["val_loss"], 5) for h in r.history]
    assert {"train_loss", "accuracy"} <= set(tags["scalars"])
    lr_tags = [t for t in tags["scalars"] if t.startswith("lr/")]
    assert lr_tags, tags["scalars"]
    steps = [e.step for e in events.Scalars(lr_tags[0])]
    assert steps == sorted(steps) and len(steps) > 2  # one point per optimizer step
    assert {"confusion", "curves"} <= set(tags["images"])
    hparams = EventAccumulator(str(Path(r.run_dir) / "tensorboard" / "hparams")).Reload()
    assert "_hparams_/experiment" in hparams.Tags()["tensors"] or hparams.PluginTagToContent("hparams")


@pytest.fixture(scope="module")
def tracked(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """One fit (then interpreted) and one 2-fold cv tracked with MLflow, no
    $MLFLOW_TRACKING_URI, started in an empty folder (`cwd`): the store (RUNS/mlflow.db)
    the tests below read, each for what it asserts (a new store costs seconds of MLflow's
    migrations, a fit and a cv more)."""
    root = tmp_path_factory.mktemp("tracked")
    data, cwd, runs = make_class_folders(root / "flat", {"red": 12, "green": 12}), root / "cwd", root / "runs"
    cwd.mkdir()
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        patch.chdir(cwd)
        fit = vt.fit(data, **FINETUNE, output=str(runs), track="mlflow")
        vt.interpret(fit.run_dir, data)  # report.html joins the tracked run
        vt.cross_validate(data, folds=2, **dict(TINY, strategy="feature-extract", epochs=1),
                          output=str(runs), track="mlflow")
    return SimpleNamespace(fit=fit, runs=runs, cwd=cwd, uri=f"sqlite:///{runs / 'mlflow.db'}")


def test_mlflow_run_has_params_metric_histories_tags_and_artifacts(tracked: SimpleNamespace) -> None:
    r = tracked.fit
    client, exp = _client(tracked.uri)
    (run,) = [run for run in client.search_runs([exp]) if run.info.run_name == Path(r.run_dir).name]
    assert run.info.status == "FINISHED"
    assert run.data.params["train.lr"] == "0.01" and run.data.params["strategy.name"] == "finetune"
    assert run.data.tags["strategy"] == "finetune" and run.data.tags["task"] == "single-label"
    history = client.get_metric_history(run.info.run_id, "val_loss")
    assert [m.step for m in history] == [1, 2]
    assert [round(m.value, 5) for m in history] == [round(h["val_loss"], 5) for h in r.history]
    assert "final_accuracy" in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"model.safetensors", "config.yaml", "metrics.json", "report.html"} <= artifacts  # report: interpret's
    # beside mlflow.db, not in MLflow's default ./mlruns (of the folder the process started in)
    assert client.get_experiment(exp).artifact_location == (tracked.runs / "mlartifacts").as_uri()
    assert list((tracked.runs / "mlartifacts").rglob("report.html"))


def test_cv_is_a_parent_run_with_one_child_per_fold(tracked: SimpleNamespace) -> None:
    client, exp = _client(tracked.uri)
    runs = client.search_runs([exp])
    parents = [r for r in runs if r.data.tags.get("kind") == "cv"]
    assert len(parents) == 1 and "cv_mean_accuracy" in parents[0].data.metrics
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert sorted(r.info.run_name for r in children) == ["fold1", "fold2"]


def test_without_a_uri_the_store_is_sqlite_beside_the_runs_and_nothing_lands_in_the_cwd(
        tracked: SimpleNamespace) -> None:
    """No $MLFLOW_TRACKING_URI: RUNS/mlflow.db (not the deprecated ./mlruns file store), its
    artifacts in RUNS/mlartifacts; cv's folds (in RUNS/NAME/) join the parent's store."""
    r, runs = tracked.fit, tracked.runs
    assert not list(tracked.cwd.iterdir())
    assert sorted(p.name for p in runs.glob("*.db")) == ["mlflow.db"]
    client, exp = _client(f"sqlite:///{runs / 'mlflow.db'}")
    found = {run.info.run_name: run for run in client.search_runs([exp])}
    assert set(found) == {Path(r.run_dir).name, "fold1", "fold2"} | {n for n in found if "cv" in n}
    run_id = found[Path(r.run_dir).name].info.run_id
    assert [round(m.value, 5) for m in client.get_metric_history(run_id, "val_loss")] == \
        [round(h["val_loss"], 5) for h in r.history]
    assert "model.safetensors" in {a.path for a in client.list_artifacts(run_id)}
    assert list((runs / "mlartifacts").rglob("model.safetensors"))


def test_a_store_failing_mid_run_warns_and_training_goes_on(flat_data: Path, tmp_path: Path, mlruns: str,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    from mlflow.tracking import MlflowClient

    calls = {"n": 0}
    real = MlflowClient.log_batch

    def flaky(self, run_id, *args, **kwargs):
        calls["n"] += 1
        if kwargs.get("metrics"):
            raise OSError("No space left on device")
        return real(self, run_id, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_batch", flaky)
    with caplog.at_level(logging.WARNING):
        r = vt.fit(flat_data, **FINETUNE, output=str(tmp_path / "runs"), track="mlflow,tensorboard")
    assert len(r.history) == 2 and (Path(r.run_dir) / "model.safetensors").is_file()
    assert any("mlflow tracking failed" in m and "No space left" in m for m in caplog.messages)
    assert (Path(r.run_dir) / "tensorboard").is_dir()  # the other backend carried on


def test_an_unwritable_store_warns_and_loses_nothing(flat_data: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (blocker / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    with caplog.at_level(logging.WARNING):
        r = vt.fit(flat_data, **FINETUNE, output=str(tmp_path / "runs"), track="mlflow")
    assert any("mlflow tracking failed while starting" in m for m in caplog.messages)
    assert len(r.history) == 2 and (Path(r.run_dir) / "metrics.json").is_file()


def test_unknown_or_missing_tracker_is_a_clear_error_before_training(flat_data: Path, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    with pytest.raises(vt.ConfigError, match="unknown tracker; choose from tensorboard, mlflow"):
        vt.fit(flat_data, **FINETUNE, output=str(tmp_path / "runs"), track="neptune")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(vt.ConfigError, match=r"pip install 'visiontune\[track\]'"):
        vt.fit(flat_data, **FINETUNE, output=str(tmp_path / "runs"), track="mlflow")
    assert not list((tmp_path / "runs").glob("*/model.safetensors"))


def test_a_resumed_run_continues_its_mlflow_run(flat_data: Path, tmp_path: Path, mlruns: str) -> None:
    from conftest import StopAfter

    part = vt.fit(flat_data, **dict(FINETUNE, epochs=3), output=str(tmp_path / "runs"), track="mlflow",
                  callbacks=[StopAfter(2)])
    vt.fit(resume=part.run_dir)
    client, exp = _client(mlruns)
    (run,) = client.search_runs([exp])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_loss")] == [1, 2, 3]
    assert run.info.status == "FINISHED"
    # a store named in $MLFLOW_TRACKING_URI keeps its artifacts beside it too, not in ./mlruns
    assert client.get_experiment(exp).artifact_location == (tmp_path / "mlartifacts").as_uri()


def test_credentials_in_the_tracking_uri_are_never_written_or_printed(
        flat_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A store URI with a token (MLflow's file store takes the query string) is used as
    given but written to tracking.json without it; a resumed run still finds its MLflow
    run; a store that fails is named in the warning without its password."""
    from conftest import StopAfter
    from visiontune.train.tracking import log_artifact_to_run

    uri = (tmp_path / "mlruns").as_uri() + "?token=s3cr3t-token"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    part = vt.fit(flat_data, **dict(FINETUNE, epochs=3), output=str(tmp_path / "runs"), track="mlflow",
                  callbacks=[StopAfter(2)])
    recorded = (Path(part.run_dir) / "tracking.json").read_text()
    assert "s3cr3t" not in recorded and "token=***" in recorded
    vt.fit(resume=part.run_dir)
    (tmp_path / "note.txt").write_text("attached later")
    log_artifact_to_run(part.run_dir, tmp_path / "note.txt")
    client, exp = _client(uri)
    (run,) = client.search_runs([exp])  # the resumed run went on in the same MLflow run
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_loss")] == [1, 2, 3]
    assert "note.txt" in [a.path for a in client.list_artifacts(run.info.run_id)]
    assert not [f for f in Path(part.run_dir).rglob("*") if f.is_file() and b"s3cr3t" in f.read_bytes()]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "postgresql://alice:hunter2@127.0.0.1:9/mlflow")
    with caplog.at_level(logging.WARNING):
        vt.fit(flat_data, **FINETUNE, output=str(tmp_path / "runs"), track="mlflow")
    assert "127.0.0.1:9" in caplog.text and "hunter2" not in caplog.text and "***@" in caplog.text


def _wandb_records(run_dir: Path) -> list[tuple[str, object]]:
    """Every record of every W&B offline run file under RUN/wandb, in order of writing:
    W&B's run files are a LevelDB-style log (7-byte header; 32 KiB blocks of records with
    a 7-byte header: crc, length, type) of `wandb_internal_pb2.Record` protobufs. wandb 0.31
    ships no Python reader, so the test reads the format itself."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    out = []
    for path in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        data, pos, chunks = path.read_bytes(), 7, b""
        assert data[:4] == b":W&B"
        while pos + 7 <= len(data):
            if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
                pos += 32768 - pos % 32768
                continue
            _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
            chunks += data[pos + 7:pos + 7 + length]
            pos += 7 + length
            if kind in (1, 4):  # a whole record, or the last piece of one
                record = pb.Record()
                record.ParseFromString(chunks)
                out.append((record.WhichOneof("record_type"), record))
                chunks = b""
            elif kind == 0:
                break
    return out


def test_wandb_offline_run_holds_config_epochs_summary_and_resumes_the_same_run(
        flat_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--track wandb in W&B's offline mode, read back from its run files: the run is named
    like the run directory, the config and tags are there, val_loss per epoch matches the
    history, the final metrics are in the summary; --resume continues the same W&B run id;
    cv's folds share a group."""
    import json

    from conftest import StopAfter

    monkeypatch.setenv("WANDB_MODE", "offline")
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))
    part = vt.fit(flat_data, **dict(FINETUNE, epochs=3), output=str(tmp_path / "runs"), track="wandb",
                  callbacks=[StopAfter(2)])
    done = vt.fit(resume=part.run_dir)
    records = _wandb_records(Path(part.run_dir))
    runs = [r.run for kind, r in records if kind == "run"]
    assert {r.run_id for r in runs} == {json.loads((Path(part.run_dir) / "tracking.json").read_text())["wandb"]
                                        ["run_id"]}
    assert runs[0].display_name == Path(part.run_dir).name and runs[0].project == "visiontune"
    assert {"finetune", "single-label"} <= set(runs[0].tags)
    config = {item.key: json.loads(item.value_json) for item in runs[0].config.update}
    assert config["train"]["lr"] == 0.01 and config["strategy"]["name"] == "finetune"
    def key(item: object) -> str:
        return item.key or "/".join(item.nested_key)

    rows = [{key(i): json.loads(i.value_json) for i in r.history.item} for kind, r in records if kind == "history"]
    epochs = [row for row in rows if "val_loss" in row]
    assert [row["epoch"] for row in epochs] == [1, 2, 3]
    assert [round(row["val_loss"], 5) for row in epochs] == [round(h["val_loss"], 5) for h in done.history]
    assert any(row.get("confusion/_type") == row.get("curves/_type") == "image-file" for row in rows)
    summary = {key(i): i.value_json for kind, r in records if kind == "summary" for i in r.summary.update}
    assert round(json.loads(summary["final_accuracy"]), 5) == round(done.metrics["accuracy"], 5)

    vt.cross_validate(flat_data, folds=2, **dict(TINY, strategy="feature-extract", epochs=1),
                      output=str(tmp_path / "runs"), name="cv", track="wandb")
    groups = {r.run.run_group for fold in ("fold1", "fold2") for kind, r in _wandb_records(tmp_path / "runs" / "cv" / fold)
              if kind == "run"}
    assert groups == {"cv"}
