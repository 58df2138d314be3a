"""The bad-input corpus (tests/data/make_bad.py): each file's exact outcome, and no run lost."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import visiontune as vt
from conftest import TINY, make_class_folders
from visiontune.cli import main
from visiontune.config import DataConfig
from visiontune.data.sources import load_items

sys.path.insert(0, str(Path(__file__).parent))
from make_bad import EXPECTED, make_bad  # noqa: E402


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bad(tmp_path_factory.mktemp("bad"))


def test_every_bad_file_has_its_exact_outcome(corpus: Path) -> None:
    src = load_items(DataConfig(path=str(corpus / "images"), valid_pct=0.5))  # symlink loops: no hang
    used = {str(Path(it.path).relative_to(corpus / "images")) for it in src.items}
    excluded = {str(Path(p).relative_to(corpus / "images")): why for p, why in src.excluded}
    for name, outcome in EXPECTED.items():
        if outcome is None:
            assert name in used, name
        else:
            assert outcome in excluded.get(name, ""), (name, excluded.get(name))
    assert used | set(excluded) == set(EXPECTED)


def test_training_on_the_corpus_works_and_loses_no_earlier_run(corpus: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    first = vt.fit(corpus / "images", **dict(TINY, strategy="feature-extract", epochs=1, valid_pct=0.5,
                                            output=str(runs), name="keep"))
    before = {p: p.read_bytes() for p in Path(first.run_dir).rglob("*") if p.is_file()}
    again = vt.fit(corpus / "images", **dict(TINY, strategy="feature-extract", epochs=1, valid_pct=0.5,
                                            output=str(runs), name="keep"))
    assert again.run_dir != first.run_dir  # a new run directory, never over an old one
    assert all(p.read_bytes() == b for p, b in before.items())
    excluded = (Path(again.run_dir) / "excluded.txt").read_text()
    assert "bomb.png" in excluded and "zero_bytes.jpg" in excluded
    preds, skipped = vt.predict(again.run_dir, corpus / "images")
    assert len(preds) == sum(v is None for v in EXPECTED.values())
    assert {Path(p).name for p, _ in skipped} >= {"bomb.png", "truncated.jpg", "loop_a.jpg"}


def test_empty_class_folder_is_an_error_naming_it(corpus: Path) -> None:
    with pytest.raises(vt.DataError, match=r"with_empty_class/empty.*holds no image files"):
        load_items(DataConfig(path=str(corpus / "with_empty_class")))


def test_csv_bad_rows(corpus: Path) -> None:
    with pytest.raises(vt.DataError, match=r"\['wolves'\] appear in valid/test but not in train"):
        load_items(DataConfig(path=str(corpus), csv="labels.csv"))
    rows = (corpus / "labels.csv").read_text(encoding="utf-8").splitlines()
    (corpus / "labels_ok.csv").write_text("\n".join(r for r in rows if "wolves" not in r) + "\n", encoding="utf-8")
    src = load_items(DataConfig(path=str(corpus), csv="labels_ok.csv"))
    reasons = [why for _, why in src.excluded]
    assert any("missing" in r for r in reasons) and any("leaves" in r for r in reasons)
    assert len(src.items) == 4 and any("ünïcødé" in it.path for it in src.items)


@pytest.mark.parametrize("strategy, workers", [("feature-extract", "1"), ("finetune", "0")])
def test_a_corrupt_labelled_file_under_no_verify_is_one_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                                     strategy: str, workers: str) -> None:
    """--no-verify skips the check that leaves files that do not decode out; such a file
    then stopped the run with a bare UnidentifiedImageError traceback (read by a DataLoader
    worker: the worker's whole traceback as the message). It is one error line that names
    the file, says the check was skipped and to drop --no-verify. A labelled file is not
    skipped there, as a pool file is: the run's split and class counts, drawn with it,
    are written already (splits.csv)."""
    data = make_class_folders(tmp_path / "data", {"red": 8, "green": 8})
    bad = data / "red" / "bad.png"
    bad.write_text("not an image\n")
    argv = ["train", str(data), "--no-verify", "--backbone", TINY["backbone"], "--weights", "none", "--image-size",
            "32", "--batch-size", "8", "--num-workers", workers, "--strategy", strategy, "--epochs", "1",
            "--output", str(tmp_path / "runs")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Caught" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"error: the image {bad} cannot be read (UnidentifiedImageError: ")
    assert "it was not checked before the run (--no-verify skips that check: drop --no-verify" in last
