"""RunDir: the run directory's files written atomically and read back, and the one rule
that names a run directory."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch

from visiontune.config import RunConfig
from visiontune.data.items import LISTED_IN_EXCLUDE
from visiontune.data.preprocess import Preprocess
from visiontune.errors import VisiontuneError
from visiontune.rundir import WORKING_FOLDER, RunDir, run_name
from visiontune.tasks.catalog import make_task


def _leftovers(folder: Path) -> list[str]:
    """Temporary files an atomic write left behind."""
    return [p.name for p in folder.rglob("*.tmp")]


def test_a_file_the_run_lacks_reads_as_nothing(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    assert run.read_config() is None and run.read_classes() is None and run.read_preprocess() is None
    assert run.read_metrics() == {} and run.read_history() == [] and run.read_time_budget() == {}
    assert run.split_rows() == [] and run.splits(make_task("single-label", ["a"])) == [] and run.left_out() == []
    assert run.tracked("mlflow") is None and run.read_checkpoint() is None and run.working_folder() is None


def test_config_classes_preprocess_and_metrics_read_back(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")  # the folder is made by the first write
    cfg = RunConfig.create(None, lr=0.01, epochs=3)
    pre = Preprocess(64, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    run.write_config(cfg)
    run.write_classes(["cat", "dog"])
    run.write_preprocess(pre)
    run.write_metrics({"accuracy": 0.5, "epoch": 2})
    assert run.read_config() == cfg and run.config_file.name == "config.yaml"
    assert run.read_classes() == ["cat", "dog"] and run.read_preprocess() == pre
    assert run.read_metrics() == {"accuracy": 0.5, "epoch": 2}
    assert _leftovers(tmp_path) == []


def test_a_write_that_fails_leaves_the_file_as_it_was(tmp_path: Path) -> None:
    """Atomic: splits.csv is written from a generator; one that raises half-way leaves the
    previous file whole (and no temporary file)."""
    run = RunDir(tmp_path)
    run.write_splits([("a.jpg", "cat", "train")])

    def rows():
        yield ("b.jpg", "dog", "train")
        raise RuntimeError("the data went away")

    with pytest.raises(RuntimeError):
        run.write_splits(rows())
    assert run.split_rows() == [{"path": "a.jpg", "label": "cat", "split": "train"}]
    assert _leftovers(tmp_path) == []


def test_splits_read_in_the_task_shape_from_the_working_folder(tmp_path: Path, monkeypatch) -> None:
    """The one reader of splits.csv: labels parsed by the task, relative paths joined to the
    folder the run was trained from when read from another folder; a formula-like label
    comes back as written."""
    run = RunDir(tmp_path / "run")
    run.write_environment({WORKING_FOLDER: str(tmp_path / "work")})
    run.write_splits([("a.jpg", "cat dog", "train"), ("/abs/b.jpg", "=dog", "valid")])
    monkeypatch.chdir(tmp_path)
    task = make_task("multi-label", ["cat", "dog", "=dog"])
    assert run.splits(task) == [(os.path.join(str(tmp_path / "work"), "a.jpg"), ("cat", "dog"), "train"),
                                ("/abs/b.jpg", ("=dog",), "valid")]
    assert [r["label"] for r in run.split_rows()] == ["cat dog", "=dog"]


def test_left_out_lists_only_what_the_user_excluded(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    run.write_excluded([("a.jpg", LISTED_IN_EXCLUDE), ("b.jpg", "cannot be decoded"), ("c.jpg", "hidden")])
    assert run.excluded_file.read_text() == f"a.jpg\t{LISTED_IN_EXCLUDE}\nb.jpg\tcannot be decoded\nc.jpg\thidden\n"
    assert run.left_out() == ["a.jpg"]


def test_history_is_written_as_jsonl_and_csv(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    rows = [{"epoch": 1, "train_loss": 0.5}, {"epoch": 2, "train_loss": 0.25, "val_loss": 0.3}]
    run.write_history(rows)
    assert run.read_history() == rows
    assert run.history_csv.read_text().splitlines() == ["epoch,train_loss,val_loss", "1,0.5,", "2,0.25,0.3"]


def test_tracking_keeps_every_backend_and_mends_a_broken_record(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    run.tracking_file.write_text("{not json")
    run.record_tracking("mlflow", {"run_id": "1", "tracking_uri": "sqlite:///x.db"})
    run.record_tracking("wandb", {"run_id": "w", "project": "p"})
    assert run.tracked("mlflow") == {"run_id": "1", "tracking_uri": "sqlite:///x.db"}
    assert run.tracked("wandb") == {"run_id": "w", "project": "p"} and run.tracked("tensorboard") is None
    assert _leftovers(tmp_path) == []


def test_time_budget_and_clock_records(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    run.write_time_budget({"budget_s": 60.0, "strategy": "gradual"})
    run.write_clock(60.0, 12.5)
    assert run.read_time_budget() == {"budget_s": 60.0, "strategy": "gradual"}
    assert run.read_clock() == 12.5 and json.loads(run.clock_file.read_text())["budget_s"] == 60.0
    run.clock_file.write_text("{}")
    with pytest.raises(KeyError):
        run.read_clock()


def test_a_checkpoint_reads_back_and_refuses_pickled_objects(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    run.write_checkpoint({"epoch": 3, "w": torch.ones(2)})
    assert run.last_checkpoint == tmp_path / "checkpoints" / "last.pt"
    ckpt = run.read_checkpoint()
    assert ckpt is not None and ckpt["epoch"] == 3 and torch.equal(ckpt["w"], torch.ones(2))
    torch.save({"object": Path("x")}, run.last_checkpoint)
    with pytest.raises(VisiontuneError, match="refusing to load"):
        run.read_checkpoint()


def test_tracked_files_are_those_the_run_has(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    run.write_metrics({"accuracy": 1.0})
    run.write_config(RunConfig())
    assert run.tracked_files() == [run.config_file, run.metrics_file]


def test_the_views_and_the_review_live_in_their_folders(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    assert run.views.report == tmp_path / "interpret" / "report.html"
    assert run.review.corrections == tmp_path / "review" / "corrections.csv"
    assert run.review.log.name == run.review.LOG


def test_run_names_are_the_time_then_what_ran(monkeypatch) -> None:
    monkeypatch.setattr("time.strftime", lambda fmt: "20250102-030405")
    assert run_name("resnet18", "gradual") == "20250102-030405-resnet18-gradual"
    assert run_name("compare") == "20250102-030405-compare"


def test_claim_takes_the_name_or_the_time_and_never_a_taken_folder(tmp_path: Path) -> None:
    first = RunDir.claim(tmp_path, "mine")
    second = RunDir.claim(tmp_path, "mine")
    assert (first.path.name, second.path.name) == ("mine", "mine-2") and second.path.is_dir()
    named = RunDir.claim(tmp_path, None, "cv", "gradual").path.name
    assert re.fullmatch(r"\d{8}-\d{6}-cv-gradual", named)
