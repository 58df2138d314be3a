"""`train --unlabeled POOL`: the probe's pseudo-labels (train/pseudo.py). The choice of how
much of the pool joins, the rows that join, the run end to end (pool files that are the
run's own images left out, pseudo_labels.csv recorded), and the refusals."""

from __future__ import annotations

import csv
import logging
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

import visiontune as vt
from conftest import TINY, WhenLogged, make_class_folders
from tasks.test_regression import make_regression_data
from visiontune.errors import ConfigError, DataError
from visiontune.frozen.probe import fit_probe
from visiontune.rundir import RunDir
from visiontune.tasks.catalog import make_task
from visiontune.train import pseudo


def blobs(rng: np.random.Generator, n: int, dim: int = 12, scale: float = 4.0,
          per_class: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Three Gaussian classes around the first three axes (`per_class` each, else `n` drawn at random)."""
    y = np.repeat(np.arange(3), per_class) if per_class else rng.integers(0, 3, n)
    return (np.eye(3, dim)[y] * scale + rng.normal(0, 1, (len(y), dim))).astype(np.float32), y


def test_the_surest_share_joins_with_the_probes_labels() -> None:
    """Three labelled images per class in 256 dimensions: the probe alone scores 0.67 in
    cross-validation and label spreading over the pool's clusters gets the pool right, so
    a share of the pool joins (the test asserts it does: with well separated blobs nothing
    joined, and the checks on the joined rows ran on none)."""
    rng = np.random.default_rng(0)
    task = make_task("single-label", ["a", "b", "c"])
    x, y = blobs(rng, 0, dim=256, scale=5, per_class=3)
    pool, truth = blobs(rng, 200, dim=256, scale=5)
    calls = []

    def fit(a, b, c, g):
        calls.append(c)
        return fit_probe(a, b, task, c=c, groups=g)

    x2, y2, groups, report = pseudo.with_pool(x, y, pool, task, fit, seed=0, groups=[f"g{i}" for i in range(9)])
    assert calls[0] is None and all(c == report.c for c in calls[1:])  # C searched once, on the labelled rows
    assert set(report.scores) == set(pseudo.FRACTIONS) and report.fraction in pseudo.FRACTIONS
    kept = int(report.kept.sum())
    assert 0 < kept < 200 and report.scores[report.fraction][0] > report.scores[0.0][0]  # the pool helped
    assert kept == round(report.fraction * 200) and len(x2) == 9 + kept and len(groups) == 9 + kept
    assert (x2[:9] == x).all() and (y2[:9] == y).all()  # the labelled rows are untouched
    assert report.confidence[report.kept].min() >= report.confidence[~report.kept].max()  # the surest joined
    assert (x2[9:] == pool[report.kept]).all() and (y2[9:] == truth[report.kept]).all()  # labelled right
    best = max(report.scores.values())  # (mean, SE) of the best held-out score, on the training split's folds
    within = [f for f, (s, _) in report.scores.items() if s >= best[0] - best[1]]
    assert report.fraction == min(within)  # the fewest pseudo-labels that score within one SE of the best


def test_a_run_pseudo_labels_its_pool_and_records_it(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    photos = tmp_path / "photos"  # the labelled folder inside the pool: its 12 images are the run's own
    data = make_class_folders(photos / "data", {"red": 6, "green": 6})
    make_class_folders(photos / "pool", {"red": 12, "green": 12}, start_seed=400)
    with caplog.at_level(logging.INFO, logger="visiontune"):
        run = vt.fit(data, unlabeled=str(photos), strategy="feature-extract", epochs=1,
                     output=str(tmp_path / "runs"), **TINY)
    with open(Path(run.run_dir) / "pseudo_labels.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 24 and not any("/data/" in r["path"] for r in rows)  # the run's own images left out
    # every pool image's pseudo-label, used or not (on these easy images the probe alone is
    # perfect, so no share joins: checking only the used rows checked nothing)
    assert all(r["label"] == Path(r["path"]).parent.name for r in rows)
    used = sum(r["used"] == "1" for r in rows)
    assert any(f"unlabelled pool: 24 images; {used} pseudo-labelled" in m for m in caplog.messages)
    assert all(0.5 <= float(r["confidence"]) <= 1 for r in rows)
    assert RunDir(run.run_dir).read_config().data.unlabeled == str(photos)


def test_runs_that_cannot_pseudo_label_are_refused_before_any_work(tmp_path: Path) -> None:
    data = make_class_folders(tmp_path / "data", {"red": 6, "green": 6})
    pool = make_class_folders(tmp_path / "pool", {"red": 3})
    with pytest.raises(ConfigError, match="this run has neither"):
        vt.fit(data, unlabeled=str(pool), strategy="feature-extract", probe="sgd", epochs=1,
               output=str(tmp_path / "r"), **TINY)
    with pytest.raises(DataError, match=r"no unlabelled image there \(12 labelled already\)"):
        vt.fit(data, unlabeled=str(data), strategy="feature-extract", epochs=1, output=str(tmp_path / "r"), **TINY)
    numbers = make_regression_data(tmp_path / "numbers", n=20)
    with pytest.raises(ConfigError, match="no confidence"):
        vt.fit(numbers, csv="targets.csv", task="regression", unlabeled=str(pool), strategy="feature-extract",
               epochs=1, output=str(tmp_path / "r"), **TINY)


def test_few_images_per_class_never_crash_the_choice() -> None:
    """Found by bench/label_efficiency.py: 10 classes of 1 to 3 labelled images made
    scikit-learn refuse 5 folds. The folds follow the largest class; with no class of two
    images there is nothing to judge the pool by, and it stays out."""
    rng = np.random.default_rng(1)
    task = make_task("single-label", [str(c) for c in range(10)])
    y = np.array([c for c in range(10) for _ in range(1 + c % 3)])
    x = (np.eye(10, 16)[y] * 4 + rng.normal(0, 1, (len(y), 16))).astype(np.float32)
    pool = (np.eye(10, 16)[rng.integers(0, 10, 60)] * 4 + rng.normal(0, 1, (60, 16))).astype(np.float32)
    fit = lambda a, b, c, g: fit_probe(a, b, task, c=c, groups=g)  # noqa: E731
    *_, report = pseudo.with_pool(x, y, pool, task, fit, seed=0)
    assert report.fraction in pseudo.FRACTIONS and np.isfinite(report.scores[report.fraction][0])
    single = np.arange(10)
    *_, report = pseudo.with_pool(x[[list(y).index(c) for c in range(10)]], single, pool, task, fit, seed=0)
    assert report.fraction == 0 and not report.kept.any()


def pool_rows(run: vt.FitResult) -> set[str]:
    with open(Path(run.run_dir) / "pseudo_labels.csv", newline="") as fh:
        return {os.path.relpath(r["path"], Path(run.run_dir).parent.parent) for r in csv.DictReader(fh)}


def test_copies_of_the_runs_images_and_excluded_files_stay_out_of_the_pool(tmp_path: Path,
                                                                           caplog: pytest.LogCaptureFixture) -> None:
    """The pool is compared with the run's images by bytes, not by path alone: a copy of a
    validation image under another name would be pseudo-labelled and trained on (and
    inflate validation). A file the user left out with --exclude came back through the
    pool when the pool held the data folder."""
    photos = tmp_path / "photos"
    make_class_folders(photos / "data" / "train", {"red": 5, "green": 5})
    make_class_folders(photos / "data" / "valid", {"red": 3, "green": 3}, start_seed=100)
    make_class_folders(photos / "pool", {"red": 6, "green": 6}, start_seed=400)
    shutil.copy(photos / "data" / "valid" / "red" / "red_000.png", photos / "pool" / "red" / "holiday.png")
    shutil.copy(photos / "data" / "train" / "green" / "green_001.png", photos / "pool" / "green" / "again.png")
    (tmp_path / "exclude.txt").write_text(f"{photos / 'data' / 'train' / 'green' / 'green_004.png'}\n")
    with caplog.at_level(logging.INFO, logger="visiontune"):
        run = vt.fit(photos / "data", unlabeled=str(photos), exclude=str(tmp_path / "exclude.txt"),
                     strategy="feature-extract", epochs=1, output=str(tmp_path / "runs"), **TINY)
    assert pool_rows(run) == {f"photos/pool/{c}/{c}_{i:03d}.png" for c in ("red", "green") for i in range(6)}
    (said,) = [m for m in caplog.messages if "the unlabelled pool holds" in m]
    assert "12 images to learn from" in said and "2 the same bytes as a labelled image" in said
    assert "1 listed in --exclude" in said and "15 labelled already" in said


def test_unreadable_pool_files_are_skipped_and_listed_in_every_phase(tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    """A truncated JPEG and a text file named .jpg in the pool: the run checks the pool
    before any phase, lists both with the reason (as the data summary lists labelled
    files), and trains on the rest in the probe's phase (pseudo-labels) and in the phase
    that trains the backbone (the consistency term: BatchNorm statistics kept, so that
    gradual's first phase is the converged probe). It stopped halfway with a traceback."""
    from PIL import Image

    data = make_class_folders(tmp_path / "data", {"red": 6, "green": 6})
    pool = make_class_folders(tmp_path / "pool", {"red": 6, "green": 6}, start_seed=400)
    whole = tmp_path / "whole.jpg"
    Image.open(pool / "red" / "red_000.png").convert("RGB").save(whole, quality=95)
    (pool / "red" / "truncated.jpg").write_bytes(whole.read_bytes()[:len(whole.read_bytes()) // 2])
    (pool / "green" / "notes.jpg").write_text("a shopping list, not a photo\n")
    with caplog.at_level(logging.INFO, logger="visiontune"):
        run = vt.fit(data, unlabeled=str(pool), strategy="gradual", epochs=2, consistency_threshold=0.0,
                     trainable_bn="eval", output=str(tmp_path / "runs"), **dict(TINY, valid_pct=0.25))
    assert {Path(p).suffix for p in pool_rows(run)} == {".png"} and len(pool_rows(run)) == 12
    with open(Path(run.run_dir) / "consistency.csv", newline="") as fh:
        assert [r["seen"] for r in csv.DictReader(fh)] == ["12"]  # the fine-tuning phase saw the 12 good ones
    (said,) = [m for m in caplog.messages if "the unlabelled pool holds" in m]
    assert "skipped 2 files that cannot be read:" in said
    assert re.search(r"truncated\.jpg: cannot decode", said) and re.search(r"notes\.jpg: cannot decode", said)


def test_an_exclude_line_naming_a_pool_image_leaves_it_and_its_copies_out_of_the_pool(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """--exclude naming an image of the --unlabeled pool: the run warned "--exclude lists 1
    paths that are not in the data" and trained on the image through the pool. It stays
    out of the pool with its copy under another name, the data summary says it is left
    out of the pool, and excluded.txt records it (so `suggest --run` leaves it out too)."""
    data = make_class_folders(tmp_path / "data", {"red": 5, "green": 5})
    pool = make_class_folders(tmp_path / "pool", {"red": 5, "green": 5}, start_seed=400)
    unwanted = pool / "red" / "red_000.png"
    shutil.copy(unwanted, pool / "green" / "copy.png")
    (tmp_path / "exclude.txt").write_text(f"{unwanted}\n")
    with caplog.at_level(logging.INFO, logger="visiontune"):
        run = vt.fit(data, unlabeled=str(pool), exclude=str(tmp_path / "exclude.txt"), strategy="feature-extract",
                     epochs=1, output=str(tmp_path / "runs"), **TINY)
    assert pool_rows(run) == {f"pool/{c}/{c}_{i:03d}.png" for c in ("red", "green") for i in range(5)} - \
        {"pool/red/red_000.png"}
    assert "not in the data" not in caplog.text
    (said,) = [m for m in caplog.messages if "the unlabelled pool holds" in m]
    assert "9 images to learn from" in said and "1 listed in --exclude" in said
    assert "1 the same bytes as an image listed in --exclude" in said
    recorded = f"{unwanted}\tlisted in --exclude: an image of the --unlabeled pool, left out of the pool"
    assert recorded in (Path(run.run_dir) / "excluded.txt").read_text()


def test_pool_files_removed_after_the_check_are_skipped_and_listed_in_every_phase(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Pool files removed or spoilt after the pool was checked: one removed and one
    replaced by a text file before the probe's phase computes the pool's features (timed
    on the pool's report), a third removed after that phase (timed on the probe's log
    line), before the fine-tuning phase's consistency term reads it. The run died in
    file_digest with a traceback after the labelled features; it trains on the rest and
    lists each file as the pool check lists the files it skips."""
    data = make_class_folders(tmp_path / "data", {"red": 6, "green": 6})
    pool = make_class_folders(tmp_path / "pool", {"red": 6, "green": 6}, start_seed=400)
    gone, spoilt, later = pool / "red" / "red_001.png", pool / "green" / "green_002.png", pool / "red" / "red_004.png"

    def fault() -> None:
        gone.unlink()
        spoilt.write_text("a shopping list, not a photo\n")

    with caplog.at_level(logging.INFO, logger="visiontune"), WhenLogged("the unlabelled pool holds 12", fault), \
            WhenLogged("converged probe:", later.unlink):
        run = vt.fit(data, unlabeled=str(pool), strategy="gradual", epochs=2, consistency_threshold=0.0,
                     trainable_bn="eval", output=str(tmp_path / "runs"), **dict(TINY, valid_pct=0.25))
    assert pool_rows(run) == {f"pool/{c}/{c}_{i:03d}.png" for c in ("red", "green") for i in range(6)} - \
        {"pool/red/red_001.png", "pool/green/green_002.png"}
    with open(Path(run.run_dir) / "consistency.csv", newline="") as fh:
        assert [r["seen"] for r in csv.DictReader(fh)] == ["9"]  # the 12, less the three
    (lost,) = [m for m in caplog.messages if "images to learn from now" in m]
    assert "holds 10 images to learn from now" in lost and "skipped 2 files that cannot be read:" in lost
    assert f"{gone}: not readable (it vanished or cannot be opened)" in lost and f"{spoilt}: cannot decode" in lost
    (views,) = [m for m in caplog.messages if "(consistency term)" in m]
    assert "skipped 1 files that cannot be read" in views and f"{later}: not readable" in views


def test_a_corrupt_pool_file_under_no_verify_is_skipped_and_listed(tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """--no-verify skips the pool's check as it skips the labelled data's: a text file named
    .jpg in the pool stopped the run with an UnidentifiedImageError traceback. It is
    skipped when its features are computed, and listed as the check would list it."""
    data = make_class_folders(tmp_path / "data", {"red": 5, "green": 5})
    pool = make_class_folders(tmp_path / "pool", {"red": 5, "green": 5}, start_seed=400)
    (pool / "green" / "notes.jpg").write_text("a shopping list, not a photo\n")
    with caplog.at_level(logging.INFO, logger="visiontune"):
        run = vt.fit(data, unlabeled=str(pool), verify_images=False, strategy="feature-extract", epochs=1,
                     output=str(tmp_path / "runs"), **TINY)
    assert len(pool_rows(run)) == 10 and all(p.endswith(".png") for p in pool_rows(run))
    (said,) = [m for m in caplog.messages if "images to learn from now" in m]
    assert "skipped 1 files that cannot be read:" in said and re.search(r"notes\.jpg: cannot decode", said)
