"""`visiontune suggest`: what to label next. The ranking on constructed features (typical
images of uncovered clusters, uncertainty spread by diversity), each task's uncertainty,
and the command end to end on generated images: cold start, a filled-in CSV read back by
`suggest` and by `train --csv`, a run's own images and byte-copies never suggested, label
sets and numbers."""

from __future__ import annotations

import csv
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

import visiontune as vt
from conftest import TINY, WhenLogged, make_class_folders, make_multilabel_data
from tasks.test_regression import make_regression_data
from visiontune.cli import main
from visiontune.config import DataConfig
from visiontune.data.sources import load_items
from visiontune.errors import ConfigError, DataError
from visiontune.selection.suggest import diverse, rank, suggest, typical
from visiontune.tasks.catalog import make_task

FROZEN = dict(backbone=TINY["backbone"], weights="none", image_size=TINY["image_size"])
FLAGS = ["--backbone", TINY["backbone"], "--weights", "none", "--image-size", str(TINY["image_size"])]


def clusters(sizes: list[int], dim: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gaussian clusters of `sizes` around far-apart centres, each with one far outlier:
    (features, cluster of each row, centres)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (len(sizes), dim)) * 10
    rows, which = [], []
    for c, size in enumerate(sizes):
        rows += [centres[c] + rng.normal(0, 1, (size, dim)), centres[c] + rng.normal(0, 4, (1, dim))]
        which += [c] * (size + 1)
    return np.concatenate(rows).astype(np.float32), np.array(which), centres


def test_typical_takes_the_densest_image_of_each_uncovered_cluster() -> None:
    x, which, centres = clusters([40, 30, 20, 12, 8])
    picks, scores, reasons = typical(x, 5)
    assert sorted(which[picks].tolist()) == [0, 1, 2, 3, 4]  # one per cluster
    for p in picks:  # near its cluster's centre: among the 25% closest, never the outlier
        members = np.flatnonzero(which == which[p])
        dist = np.linalg.norm(x[members] - centres[which[p]], axis=1)
        assert np.linalg.norm(x[p] - centres[which[p]]) <= np.quantile(dist, 0.25)
    assert all("no label yet" in r for r in reasons) and (scores > 0).all()
    # clusters 0 and 1 hold labelled images: the 3 picks come from the other three
    labelled = np.concatenate([x[which == 0][:2], x[which == 1][:2]])
    picks, _, _ = typical(x, 3, labelled=labelled)
    assert sorted(which[picks].tolist()) == [2, 3, 4]


def test_the_cold_start_pick_covers_every_cluster_where_random_picks_miss_one() -> None:
    """Issue 25's check: 5 picks from a mixture of 5 clusters of unequal size (41, 31, 21,
    13, 9 images). A uniform draw covers all five with probability 5! * 41*31*21*13*9 /
    (115*114*113*112*111), about 2%: nearly every random draw misses a class."""
    for seed in range(3):
        x, which, _ = clusters([40, 30, 20, 12, 8], seed=seed)
        picks, _, _ = rank(x, 5, "typical", seed=seed)
        assert sorted(which[picks].tolist()) == [0, 1, 2, 3, 4]
    x, which, _ = clusters([40, 30, 20, 12, 8])
    missed = sum(len(set(which[rank(x, 5, "random", seed=s)[0]].tolist())) < 5 for s in range(100))
    assert missed >= 90


def test_diverse_spreads_a_batch_that_uncertainty_alone_piles_up() -> None:
    x, which, _ = clusters([30, 10, 10, 10])
    uncertainty = np.where(which == 0, 0.9, 0.6) + np.random.default_rng(1).uniform(0, 0.01, len(x))
    alone, _, _ = rank(x, 4, "uncertain", uncertainty=uncertainty)
    assert set(which[alone].tolist()) == {0}  # four near-copies of one kind of image
    spread = diverse(x, uncertainty, 4)
    assert len(set(which[spread].tolist())) == 4


def test_each_task_says_how_unsure_it_is() -> None:
    single = make_task("single-label", ["a", "b", "c"])
    members = np.array([[[0.9, 0.05, 0.05], [0.4, 0.35, 0.25], [0.5, 0.5, 0.0]]])
    assert np.argsort(single.uncertainty(members)).tolist() == [0, 1, 2]  # margin 0.85, 0.05, 0
    multi = make_task("multi-label", ["a", "b"])
    u = multi.uncertainty(np.array([[[0.99, 0.01], [0.5, 0.99], [0.5, 0.5]]]))
    assert u[0] < u[1] < u[2] and u[2] == pytest.approx(1.0)
    numbers = make_task("regression", ["age"])
    spread = numbers.uncertainty(np.array([[[1.0], [5.0]], [[1.0], [9.0]], [[1.0], [1.0]]]))
    assert spread[0] == 0 and spread[1] > 3
    with pytest.raises(ValueError, match="several fits"):
        numbers.uncertainty(np.array([[[1.0], [2.0]]]))


def read(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_cold_start_then_filled_in_labels_are_read_back(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pool = make_class_folders(tmp_path / "pool", {"red": 15, "green": 15, "blue": 15})
    out = tmp_path / "to_label.csv"
    assert main(["suggest", str(pool), "--n", "6", "--output", str(out), *FLAGS]) == 0
    first = read(out)
    assert len(first) == 6 and all(Path(r["path"]).is_absolute() and r["label"] == "" for r in first)
    assert {Path(r["path"]).parent.name for r in first} == {"red", "green", "blue"}  # typical covers the clusters
    assert "by typical: nothing is labelled yet" in capsys.readouterr().out
    for r in first:  # the annotator labels what was asked
        r["label"] = Path(r["path"]).parent.name
    with open(out, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(first[0]))
        writer.writeheader()
        writer.writerows(first)
    assert main(["suggest", str(pool), "--n", "6", "--output", str(out), *FLAGS]) == 0
    second = read(out)
    said = "".join(capsys.readouterr())  # the suggestions (stdout), what next (stderr)
    assert "6 labelled rows kept" in said and "(6 already labelled)" in said
    assert second[:6] == first  # nothing labelled is lost
    asked = {r["path"] for r in second[6:]}
    assert len(asked) == 6 and not asked & {r["path"] for r in first}  # never asked twice
    assert all(r["label"] == "" and r["prediction"] in ("red", "green", "blue") for r in second[6:])
    run = vt.fit(None, csv=str(out), strategy="feature-extract", epochs=1, output=str(tmp_path / "runs"),
                 **dict(TINY, valid_pct=0.0))
    assert len(read(Path(run.run_dir) / "splits.csv")) == 6  # the filled-in rows, not the pending ones


def test_a_runs_images_and_their_copies_are_never_suggested(tmp_path: Path) -> None:
    data = make_class_folders(tmp_path / "data", {"red": 8, "green": 8})
    run = vt.fit(data, strategy="feature-extract", epochs=1, output=str(tmp_path / "runs"), **TINY)
    pool = make_class_folders(tmp_path / "pool", {"red": 10, "green": 10}, start_seed=300)
    shutil.copy(data / "red" / "red_000.png", pool / "red" / "copy_of_a_training_image.png")
    result = suggest([pool, data / "green"], run=run.run_dir, n=8, seed=0)
    assert len(result.rows) == 8 and all(Path(r.path).parent.parent == pool for r in result.rows)
    why = dict(result.excluded)
    assert why[str(pool / "red" / "copy_of_a_training_image.png")] == "the same bytes as a labelled image"
    assert sum(w == "labelled already" for w in why.values()) == 8  # data/green, the run's own images
    assert result.method == "diverse" and "8 labels per class" in result.why  # 16 images, 2 classes
    assert all(r.prediction in ("red", "green") for r in result.rows)


def test_label_sets_and_numbers(tmp_path: Path) -> None:
    tags = make_multilabel_data(tmp_path / "tags", n=36)
    pool = make_multilabel_data(tmp_path / "tagpool", n=20, seed=5) / "images"
    result = suggest(pool, labelled=tags, csv="labels.csv", n=5, method="uncertain", **FROZEN)
    # the generator paints 8 patterns, so some pool images are near-copies of labelled ones
    assert all(why.startswith("a near-copy of a labelled image") for _, why in result.excluded)
    assert result.label_column == "labels" and result.task == "multi-label"
    assert len(result.rows) == min(5, 20 - len(result.excluded)) >= 3
    assert all(set(r.prediction.split()) <= {"red", "green", "blue"} for r in result.rows)
    scores = [r.score for r in result.rows]
    assert scores == sorted(scores, reverse=True) and 0 <= min(scores) and max(scores) <= 1  # mean entropy, bits

    numbers = make_regression_data(tmp_path / "numbers", n=40)
    run = vt.fit(numbers, csv="targets.csv", task="regression", strategy="feature-extract", epochs=1,
                 output=str(tmp_path / "runs"), **TINY)
    pool = make_regression_data(tmp_path / "numpool", n=15, seed=9) / "images"
    result = suggest(pool, run=run.run_dir, n=4, method="uncertain")
    assert result.method == "uncertain" and len(result.rows) == 4
    predicted = {p.path: p.value for p in vt.predict(run.run_dir, [r.path for r in result.rows], engine="torch")[0]}
    for r in result.rows:  # the run's own prediction for that image, as a number
        assert float(r.prediction) == pytest.approx(predicted[r.path], abs=1e-3)
    assert len({r.prediction for r in result.rows}) == 4  # four images, four numbers
    assert all(r.score >= 0 for r in result.rows) and result.rows[0].score > 0  # the fits' spread
    # auto counts the labels of the one target: 40 here (it said "0 labels per target" and picked typical)
    result = suggest(pool, run=run.run_dir, n=4)
    assert result.method == "diverse" and "40 labels per target" in result.why
    assert make_task("regression", ["age"]).labels_per_output([1.5, -2.0, float("nan")]) == {"age": 2}


def test_a_file_of_numbers_to_label_is_read_as_numbers_by_review_and_train(tmp_path: Path,
                                                                           capsys: pytest.CaptureFixture) -> None:
    """suggest on a regression run writes a 'value' column, which review --label and
    train --csv read as numbers under --task auto, and its closing message gives both
    commands with the task (audit of issue 34: the column was 'label', read as classes: the
    page drew class buttons and took "abc")."""
    from fastapi.testclient import TestClient

    from visiontune.analysis.review import create_review_app

    numbers = make_regression_data(tmp_path / "numbers", n=30)
    run = vt.fit(numbers, csv="targets.csv", task="regression", strategy="feature-extract", epochs=1,
                 output=str(tmp_path / "runs"), **TINY)
    pool = make_regression_data(tmp_path / "numpool", n=10, seed=9) / "images"
    out = tmp_path / "to_label.csv"
    assert main(["suggest", str(pool), "--run", run.run_dir, "--n", "3", "--output", str(out)]) == 0
    said = "".join(capsys.readouterr())  # the suggestions (stdout), what next (stderr)
    assert f"visiontune review --label {out} --task regression" in said
    assert f"visiontune train --csv {out} --task regression" in said and "'value' column" in said
    rows = read(out)
    assert list(rows[0]) == ["path", "value", "prediction", "reason", "score"] and len(rows) == 3
    client = TestClient(create_review_app(out))  # --task auto
    queue = client.get("/api/queue").json()
    assert queue["spec"]["entry"] == "type"  # a number is typed: no class buttons
    first = queue["items"][0]["id"]
    answer = client.post("/api/label", json={"id": first, "label": "abc"})
    assert answer.status_code == 400 and "is not a number" in answer.json()["detail"]
    assert client.post("/api/label", json={"id": first, "label": "3.5"}).json()["ok"]
    source = load_items(DataConfig(csv=str(out), valid_pct=0.0), min_classes=1)  # train --csv, --task auto
    assert source.task == "regression" and [it.label for it in source.items] == [3.5]
    assert "detected: a 'value' column of numbers" in source.summary()


def test_bad_requests_are_refused_and_nothing_is_overwritten(tmp_path: Path) -> None:
    pool = make_class_folders(tmp_path / "pool", {"red": 4, "green": 4})
    with pytest.raises(ConfigError, match="needs a model"):
        suggest(pool, n=2, method="diverse", **FROZEN)
    with pytest.raises(ConfigError, match="--method 'best'"):
        suggest(pool, n=2, method="best", **FROZEN)
    mine = tmp_path / "my_labels.csv"
    mine.write_text("file,class\na.png,red\n")
    assert main(["suggest", str(pool), "--n", "2", "--output", str(mine), *FLAGS]) == 2
    assert mine.read_text() == "file,class\na.png,red\n"


def test_near_copies_are_judged_against_how_alike_the_labelled_images_are() -> None:
    """In a feature space where distinct images all sit at cosine ~0.99 (random weights, a
    tiny model), 0.98 says nothing: only a pool image closer to a labelled one than labelled
    images are to each other is a copy. In a spread-out space the bar stays NEAR_COPY. (With
    the fixed 0.98, every image of the crowded space was a copy: 17 of 20 generated pool
    images in test_label_sets_and_numbers.)"""
    from visiontune.selection.suggest import NEAR_COPY, _near_copies

    rng = np.random.default_rng(0)
    common = rng.normal(0, 1, 64)
    crowded = common + rng.normal(0, 0.08, (40, 64))  # pairwise cosine ~0.99
    lab, pool = crowded[:30], crowded[30:].copy()
    pool[0] = lab[3] + rng.normal(0, 0.001, 64)  # a copy
    copies, bar = _near_copies(pool, lab)
    assert bar > NEAR_COPY and copies.tolist() == [True] + [False] * 9
    spread = rng.normal(0, 1, (40, 64))
    pool = spread[30:].copy()
    pool[1] = spread[5] * 1.01 + rng.normal(0, 0.05, 64)  # cosine ~0.999
    copies, bar = _near_copies(pool, spread[:30])
    assert bar == NEAR_COPY and copies.tolist() == [False, True] + [False] * 8


def test_suggest_without_a_run_is_the_same_for_the_same_seed(tmp_path: Path) -> None:
    """--weights none draws the feature model's weights from the seed: the same command gives
    the same suggestions (it drew them from the global RNG, so they changed run to run)."""
    import torch

    data = make_class_folders(tmp_path / "data", {"red": 4, "green": 4})
    pool = make_class_folders(tmp_path / "pool", {"red": 6, "green": 6}, start_seed=30)
    runs = []
    for noise in (1, 2):
        torch.manual_seed(noise)
        runs.append([(r.path, r.score) for r in suggest(pool, labelled=data, n=4, method="diverse", **FROZEN).rows])
    assert runs[0] == runs[1]


def test_a_pool_of_near_copies_only_is_a_clear_error(tmp_path: Path) -> None:
    """One pixel changed: other bytes, the same picture. It is a near-copy of a labelled
    image, so nothing is left to suggest (this crashed in k-means before)."""
    from PIL import Image

    data = make_class_folders(tmp_path / "data", {"red": 3, "green": 3})
    image = Image.open(data / "red" / "red_000.png").convert("RGB")
    image.putpixel((0, 0), (0, 0, 0))
    (tmp_path / "pool").mkdir()
    image.save(tmp_path / "pool" / "retouched.png")
    with pytest.raises(DataError, match="1 a near-copy of a labelled image"):
        suggest(tmp_path / "pool", labelled=data, n=2, **FROZEN)


def fill_in(path: Path, label=lambda p: Path(p).parent.name) -> list[dict[str, str]]:
    """The annotator's part: every row of the suggestions CSV at `path` labelled."""
    rows = read(path)
    for r in rows:
        r["label"] = r["label"] or label(r["path"])
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return rows


@pytest.mark.parametrize("given", ["--labelled", "--csv"])
def test_the_filled_in_rows_count_beside_labelled_data(tmp_path: Path, given: str,
                                                       capsys: pytest.CaptureFixture) -> None:
    """The labelling loop with labels from elsewhere too (a folder, or a CSV): the second
    round's output still counts the first round's filled-in rows as labelled, so it never
    asks for them again (it did: --labelled / --csv replaced the output's rows)."""
    data = make_class_folders(tmp_path / "data", {"red": 3, "green": 3})
    (data / "labels.csv").write_text("path,label\n" + "".join(f"{p.parent.name}/{p.name},{p.parent.name}\n"
                                                            for p in sorted(data.rglob("*.png"))))
    labels = ["--labelled", str(data)] if given == "--labelled" else ["--csv", str(data / "labels.csv")]
    pool = make_class_folders(tmp_path / "pool", {"red": 12, "green": 12, "blue": 12}, start_seed=300)
    out = tmp_path / "to_label.csv"
    argv = ["suggest", str(pool), "--n", "5", "--output", str(out), *labels, "--method", "typical", *FLAGS]
    assert main(argv) == 0
    first = fill_in(out)
    capsys.readouterr()
    assert main(argv) == 0
    said = capsys.readouterr().out
    assert "(11 already labelled)" in said  # 6 from --labelled / --csv, 5 filled in
    second = read(out)
    assert second[:5] == first
    assert len(second) == 10 and not {r["path"] for r in second[5:]} & {r["path"] for r in first}


def test_a_run_trained_from_another_folder_knows_its_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run trained on `data/` (a relative path, as a user types it) and asked from
    another working folder: its splits.csv's relative paths are found from the folder it
    was trained in, so its own images are never suggested (they all were)."""
    project = tmp_path / "project"
    make_class_folders(project / "photos" / "data", {"red": 6, "green": 6})
    make_class_folders(project / "photos" / "new", {"red": 5, "green": 5}, start_seed=300)
    monkeypatch.chdir(project)
    run = vt.fit("photos/data", strategy="feature-extract", epochs=1, output="runs", **TINY)
    assert read(Path(run.run_dir) / "splits.csv")[0]["path"].startswith("photos/data/")  # relative, as given
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = suggest(project / "photos", run=project / run.run_dir, n=20, method="random")
    assert {Path(r.path).parent.parent.name for r in result.rows} == {"new"} and len(result.rows) == 10
    assert sum(why == "labelled already" for _, why in result.excluded) == 12


def test_typical_returns_n_when_clusters_hold_only_labelled_images() -> None:
    """Two tight groups of pool images among twenty far-apart labelled images: k-means
    gives the pool fewer clusters than the 5 asked for, and typical went on to return 2.
    It takes the next most typical images of the pool's clusters instead."""
    rng = np.random.default_rng(0)
    pool = np.concatenate([rng.normal(0, 0.1, (4, 8)) + 5, rng.normal(0, 0.1, (4, 8)) - 5]).astype(np.float32)
    labelled = (rng.normal(0, 1, (20, 8)) * 40).astype(np.float32)
    picks, scores, reasons = typical(pool, 5, labelled=labelled)
    assert len(picks) == 5 and len(set(picks.tolist())) == 5 and len(scores) == len(reasons) == 5
    assert {int(p) < 4 for p in picks} == {True, False}  # both groups, before any second pick of one
    assert any("2nd most typical" in r for r in reasons)
    picks, _, _ = typical(pool, 20, labelled=labelled)
    assert sorted(picks.tolist()) == list(range(8))  # all there are


def test_a_corrupt_pool_file_is_skipped_and_listed(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A truncated JPEG and a text file named .jpg in the pool: `suggest` ranks the rest,
    lists both with the reason, and never suggests them (it stopped with a traceback in
    feature extraction)."""
    from PIL import Image

    pool = make_class_folders(tmp_path / "pool", {"red": 6, "green": 6})
    whole = tmp_path / "whole.jpg"
    Image.open(pool / "red" / "red_000.png").convert("RGB").save(whole, quality=95)
    (pool / "red" / "truncated.jpg").write_bytes(whole.read_bytes()[:len(whole.read_bytes()) // 2])
    (pool / "green" / "notes.jpg").write_text("a shopping list, not a photo\n")
    out = tmp_path / "to_label.csv"
    assert main(["suggest", str(pool), "--n", "12", "--output", str(out), *FLAGS]) == 0
    printed, said = capsys.readouterr()
    assert "skipped 2 files that cannot be read:" in said and "cannot be read" not in printed  # a message: stderr
    assert re.search(r"truncated\.jpg: cannot decode", said) and re.search(r"notes\.jpg: cannot decode", said)
    assert {Path(r["path"]).name for r in read(out)} == {p.name for p in pool.rglob("*.png")}  # the 12 good ones
    result = suggest(pool, n=3, **FROZEN)
    assert {Path(p).name for p, _ in result.unreadable} == {"truncated.jpg", "notes.jpg"}


def test_what_a_run_left_out_by_exclude_is_never_suggested(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run trained with --exclude (a review page's "exclude" decision): `suggest --run`
    ranked the image the run left out among the pool (its excluded.txt was never read).
    It stays out, and so does a copy of it under another name, asked from another working
    folder too (excluded.txt's paths are relative to the folder the run was trained in)."""
    project = tmp_path / "project"
    data = make_class_folders(project / "photos", {"red": 6, "green": 6})
    pool = make_class_folders(project / "pool", {"red": 4, "green": 4}, start_seed=300)
    left_out = data / "red" / "red_005.png"
    shutil.copy(left_out, pool / "red" / "the_same_again.png")
    (project / "exclude.txt").write_text("photos/red/red_005.png\n")
    monkeypatch.chdir(project)
    run = vt.fit("photos", exclude="exclude.txt", strategy="feature-extract", epochs=1, output="runs", **TINY)
    assert "photos/red/red_005.png\tlisted in --exclude" in (project / run.run_dir / "excluded.txt").read_text()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    result = suggest([project / "photos", project / "pool"], run=project / run.run_dir, n=20, method="random")
    why = dict(result.excluded)
    assert why[str(left_out)] == "listed in --exclude"
    assert why[str(pool / "red" / "the_same_again.png")] == "the same bytes as an image listed in --exclude"
    assert sum(w == "labelled already" for w in why.values()) == 11
    assert {Path(r.path).name for r in result.rows} <= {p.name for p in pool.rglob("*_00?.png")}


def test_a_pool_file_removed_or_spoilt_after_the_check_is_skipped_and_listed(tmp_path: Path,
                                                                             capsys: pytest.CaptureFixture) -> None:
    """A pool file removed, and another replaced by one that does not decode, after the
    pool was checked (timed on the check's own log line) and before their features were
    computed: `suggest` stopped with a FileNotFoundError traceback. It ranks the rest and
    lists both as the check lists the files it skips."""
    pool = make_class_folders(tmp_path / "pool", {"red": 6, "green": 6})
    gone, spoilt = pool / "red" / "red_002.png", pool / "green" / "green_003.png"

    def fault() -> None:
        gone.unlink()
        spoilt.write_text("a shopping list, not a photo\n")

    out = tmp_path / "to_label.csv"
    with WhenLogged("scan: 12 files", fault) as when:
        assert main(["suggest", str(pool), "--n", "12", "--output", str(out), *FLAGS]) == 0
    assert when.fired
    printed, said = capsys.readouterr()
    assert "skipped 2 files that cannot be read:" in said and "cannot be read" not in printed  # a message: stderr
    assert f"{gone}: not readable (it vanished or cannot be opened)" in said
    assert f"{spoilt}: cannot decode" in said
    assert {Path(r["path"]).name for r in read(out)} == {p.name for p in pool.rglob("*.png")} - {spoilt.name}
