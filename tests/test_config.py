"""config.py: the run's options in sections by concern, and config.yaml files written before
issue 35 (one `train:` section for the loop, runtime, augmentation, outputs, tracking and
budget) read into today's sections, whether a run's own or a user's --config."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import yaml

import visiontune as vt
from conftest import TINY, make_class_folders
from visiontune.cli import main
from visiontune.config import (
    MOVED_FROM_TRAIN,
    SECTION_TITLES,
    RunConfig,
    checked_dict,
    option_fields,
    option_index,
)
from visiontune.errors import ConfigError
from visiontune.rundir import read_config

# one value per option that left `train`, none of them its default
MOVED = dict(label_smoothing=0.1, loss="huber", target_range=(0.0, 9.0), thresholds="tuned", threshold=0.4,
             balance="weights", augment="medium", hflip=0.2, min_scale=0.5, num_workers=0, device="cpu",
             channels_last=False, precision="fp32", engine="torch", compile=True, image_cache=False,
             feature_cache=False, cache_dir="/tmp/vt-cache", progress=False, track="mlflow", time_budget=600.0)
HOMES = {"outputs": "label_smoothing loss target_range thresholds threshold balance",
         "augmentation": "augment hflip min_scale",
         "runtime": "num_workers device channels_last precision engine compile image_cache feature_cache cache_dir "
                    "progress",
         "tracking": "track", "budget": "time_budget"}


def _old_layout(cfg: RunConfig) -> dict:
    """`cfg` as a config.yaml written before issue 35 held it: the moved sections inside `train`."""
    raw = cfg.to_dict()
    for section in HOMES:
        raw["train"].update(raw.pop(section))
    return raw


def test_each_option_has_one_home_and_keeps_its_flat_key() -> None:
    homes = {name: section for section, names in HOMES.items() for name in names.split()}
    assert MOVED_FROM_TRAIN == homes and set(MOVED) == set(homes)
    assert [s for s in SECTION_TITLES if s] == ["data", "model", "strategy", "train", *HOMES]
    keys = [key for key in option_index()]
    assert len(keys) == len(set(keys)) == len(list(option_fields()))  # a flat key names one option
    cfg = RunConfig.create(None, epochs=2, **MOVED)
    assert cfg.train.epochs == 2 and all(getattr(getattr(cfg, homes[k]), k) == v for k, v in MOVED.items())


def test_a_config_in_the_old_layout_reads_as_in_the_new_one() -> None:
    cfg = RunConfig.create(None, epochs=3, lr=0.01, **MOVED)
    old = _old_layout(cfg)
    assert set(old["train"]) > set(MOVED) and not set(old) & set(HOMES)
    assert RunConfig.from_dict(old) == cfg == RunConfig.from_dict(cfg.to_dict())
    assert RunConfig.from_dict(checked_dict(old, "old.yaml")) == cfg
    assert not set(cfg.to_dict()["train"]) & set(MOVED)  # only the new layout is written


def test_a_key_given_in_its_new_section_and_under_train_keeps_the_section_value() -> None:
    raw = {"train": {"epochs": 4, "device": "cuda"}, "runtime": {"device": "cpu", "progress": False}}
    cfg = RunConfig.from_dict(checked_dict(raw, "both.yaml"))
    assert (cfg.train.epochs, cfg.runtime.device, cfg.runtime.progress) == (4, "cpu", False)


def test_a_users_config_file_in_either_layout(tmp_path: Path) -> None:
    old, new, flat = tmp_path / "old.yaml", tmp_path / "new.yaml", tmp_path / "flat.yaml"
    old.write_text("train:\n  epochs: 7\n  device: cpu\n  augment: none\n  time_budget: 10m\n  track: mlflow\n"
                   "  threshold: 0.3\nseed: 3\n")
    new.write_text("train:\n  epochs: 7\nruntime:\n  device: cpu\naugmentation:\n  augment: none\nbudget:\n"
                   "  time_budget: 10m\ntracking:\n  track: mlflow\noutputs:\n  threshold: 0.3\nseed: 3\n")
    flat.write_text("epochs: 7\ndevice: cpu\naugment: none\ntime_budget: 10m\ntrack: mlflow\nthreshold: 0.3\n"
                    "seed: 3\n")
    configs = [read_config(p, strict=True) for p in (old, new, flat)]
    assert configs[0] == configs[1] == configs[2]
    cfg = configs[0]
    assert (cfg.train.epochs, cfg.runtime.device, cfg.augmentation.augment, cfg.budget.time_budget, cfg.tracking.track,
            cfg.outputs.threshold, cfg.seed) == (7, "cpu", "none", 600.0, "mlflow", 0.3, 3)


@pytest.mark.parametrize("text, message", [
    ("train:\n  devise: cpu\n", "unknown option 'devise' in section 'train'; did you mean 'device'"),
    ("runtime:\n  epochs: 3\n", "unknown option 'epochs' in section 'runtime'"),
    ("outputs: runs\n", "section 'outputs' must be a mapping"),
])
def test_a_wrong_key_in_either_layout_is_named(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        read_config(path, strict=True)


def test_a_run_written_in_the_old_layout_predicts_resumes_and_suggests(tmp_path: Path) -> None:
    """A run directory on a user's disk from before issue 35: predict, evaluate, suggest --run
    and resume read its config.yaml; the resume writes it back in the new layout."""
    data = make_class_folders(tmp_path / "data" / "train", {"red": 6, "green": 6}).parent
    make_class_folders(data / "valid", {"red": 3, "green": 3}, 100)
    r = vt.fit(data, **dict(TINY, strategy="feature-extract", probe="sgd", epochs=1, augment="none", hflip=0.0,
                            output=str(tmp_path / "runs")))
    config = Path(r.run_dir) / "config.yaml"
    saved = RunConfig.from_dict(yaml.safe_load(config.read_text()))
    config.write_text(yaml.safe_dump(_old_layout(saved), sort_keys=False))
    assert read_config(config) == saved
    assert main(["predict", r.run_dir, str(data / "valid"), "--output", str(tmp_path / "p.csv")]) == 0
    with open(tmp_path / "p.csv", newline="") as fh:
        assert len(list(csv.DictReader(fh))) == 6
    assert main(["evaluate", r.run_dir, str(data / "valid"), "--output", str(tmp_path / "e.json")]) == 0
    pool = make_class_folders(tmp_path / "pool", {"red": 2, "green": 2}, 300)
    assert main(["suggest", str(pool), "--run", r.run_dir, "--n", "2", "--output", str(tmp_path / "s.csv")]) == 0
    resumed = vt.fit(resume=r.run_dir, epochs=2)
    assert len(resumed.history) == 2
    written = yaml.safe_load(config.read_text())
    assert written["augmentation"]["hflip"] == 0.0 and not set(written["train"]) & set(MOVED_FROM_TRAIN)
    assert read_config(config) == RunConfig.create(saved, epochs=2)
