from __future__ import annotations

import csv
import os
from collections import Counter
from pathlib import Path

import pytest

from conftest import make_class_folders, make_image
from visiontune.config import DataConfig
from visiontune.data.items import TEST, TRAIN, VALID
from visiontune.data.sources import load_items
from visiontune.data.splits import stratified_split
from visiontune.errors import DataError


def test_split_folders_are_honoured(split_data: Path) -> None:
    src = load_items(DataConfig(path=str(split_data)))
    assert src.classes == ["green", "red"]
    assert len(src.split(TRAIN)) == 20 and len(src.split(VALID)) == 8 and len(src.split(TEST)) == 6


def test_val_alias_and_train_only_gets_split(tmp_path: Path) -> None:
    make_class_folders(tmp_path / "a" / "train", {"red": 5, "green": 5})
    make_class_folders(tmp_path / "a" / "val", {"red": 2, "green": 2}, 50)
    assert len(load_items(DataConfig(path=str(tmp_path / "a"))).split(VALID)) == 4
    make_class_folders(tmp_path / "b" / "train", {"red": 10, "green": 10})
    src = load_items(DataConfig(path=str(tmp_path / "b"), valid_pct=0.2))
    assert len(src.split(VALID)) == 4 and len(src.split(TRAIN)) == 16


def test_flat_split_is_stratified_and_deterministic(tmp_path: Path) -> None:
    root = make_class_folders(tmp_path / "d", {"red": 30, "green": 10})
    a = load_items(DataConfig(path=str(root), valid_pct=0.25), seed=1)
    b = load_items(DataConfig(path=str(root), valid_pct=0.25), seed=1)
    c = load_items(DataConfig(path=str(root), valid_pct=0.25), seed=2)
    assert [i.path for i in a.split(VALID)] == [i.path for i in b.split(VALID)]
    assert [i.path for i in a.split(VALID)] != [i.path for i in c.split(VALID)]
    counts = Counter(i.label for i in a.split(VALID))
    assert counts == {"red": 8, "green": 2}  # 25% of each class (7.5 -> 8 of 30, 2.5 -> 2 of 10)
    assert not {i.path for i in a.split(VALID)} & {i.path for i in a.split(TRAIN)}


def test_stratified_split_rejects_singleton_class() -> None:
    with pytest.raises(DataError, match="single image"):
        stratified_split(["a", "a", "a", "b"], 0.25, 0)


def test_label_regex_from_file_names(tmp_path: Path) -> None:
    for i in range(6):
        make_image(tmp_path / "pets" / f"cat_{i}.png", (200, 0, 0), seed=i)
        make_image(tmp_path / "pets" / f"dog_{i}.png", (0, 200, 0), seed=10 + i)
    make_image(tmp_path / "pets" / "unmatched.png", (0, 0, 0))
    src = load_items(DataConfig(path=str(tmp_path / "pets"), label_regex=r"^([a-z]+)_\d+\.png$"))
    assert src.classes == ["cat", "dog"] and len(src.items) == 12
    assert [p for p, why in src.excluded if "no label" in why] == [str(tmp_path / "pets" / "unmatched.png")]


def test_fastai_is_cat_label_function(tmp_path: Path) -> None:
    """fastai's pets example: cats' file names start with a capital letter."""
    for i in range(5):
        make_image(tmp_path / "pets" / f"Abyssinian_{i}.png", (200, 0, 0), seed=i)
        make_image(tmp_path / "pets" / f"beagle_{i}.png", (0, 200, 0), seed=10 + i)

    def is_cat(x: Path) -> bool:
        return x.name[0].isupper()

    src = load_items(DataConfig(path=str(tmp_path / "pets")), label_func=is_cat)
    assert src.classes == ["False", "True"]
    assert {i.label for i in src.items if "Abyssinian" in i.path} == {"True"}


def test_bad_regex_is_a_clear_error(tmp_path: Path) -> None:
    make_class_folders(tmp_path / "d", {"red": 2, "green": 2})
    with pytest.raises(DataError, match="capture group"):
        load_items(DataConfig(path=str(tmp_path / "d"), label_regex=r"^\w+\.png$"))


def _write_csv(path: Path, rows: list[list[str]]) -> Path:
    with open(path, "w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    return path


def test_csv_with_header_split_column_and_bad_rows(tmp_path: Path) -> None:
    imgs = tmp_path / "imgs"
    rows = [["file", "class", "split"]]
    for i in range(6):
        make_image(imgs / f"r{i}.png", (200, 0, 0), seed=i)
        make_image(imgs / f"g{i}.png", (0, 200, 0), seed=10 + i)
        rows += [[f"imgs/r{i}.png", "red", "valid" if i < 2 else "train"], [f"imgs/g{i}.png", "green", "valid" if i < 2 else "train"]]
    rows += [["imgs/missing.png", "red", "train"], ["../outside.png", "red", "train"], ["", "red", "train"]]
    _write_csv(tmp_path / "labels.csv", rows)
    src = load_items(DataConfig(path=str(tmp_path), csv="labels.csv"))
    assert src.classes == ["green", "red"]
    assert len(src.split(VALID)) == 4 and len(src.split(TRAIN)) == 8
    reasons = " | ".join(why for _, why in src.excluded)
    assert "missing" in reasons and "leaves" in reasons and "no path" in reasons


def test_csv_without_header(tmp_path: Path) -> None:
    rows = []
    for i in range(5):
        make_image(tmp_path / f"r{i}.png", (200, 0, 0), seed=i)
        make_image(tmp_path / f"g{i}.png", (0, 200, 0), seed=10 + i)
        rows += [[f"r{i}.png", "red"], [f"g{i}.png", "green"]]
    _write_csv(tmp_path / "l.csv", rows)
    src = load_items(DataConfig(csv=str(tmp_path / "l.csv"), valid_pct=0.2))
    assert len(src.items) == 10 and len(src.split(VALID)) == 2


def test_hidden_non_image_and_corrupt_files_are_excluded_with_reasons(tmp_path: Path) -> None:
    root = make_class_folders(tmp_path / "d", {"red": 4, "green": 4})
    (root / "red" / ".DS_Store").write_bytes(b"\0\0junk")
    (root / "red" / "._red_000.png").write_bytes(b"\0\0resource fork")
    (root / ".git").mkdir()
    (root / ".git" / "HEAD").write_text("ref")
    (root / "green" / "notes.txt").write_text("hello")
    (root / "green" / "text.jpg").write_text("not really a jpeg")
    good = (root / "red" / "red_000.png").read_bytes()
    (root / "red" / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "red" / "empty.jpg").write_bytes(b"")
    src = load_items(DataConfig(path=str(root), valid_pct=0.25))
    assert src.classes == ["green", "red"] and len(src.items) == 8
    excluded = {Path(p).name: why for p, why in src.excluded}
    assert set(excluded) == {"notes.txt", "text.jpg", "truncated.png", "empty.jpg"}
    assert "extension" in excluded["notes.txt"] and "decode" in excluded["truncated.png"]
    assert {Path(p).name for p in src.hidden} == {".DS_Store", "._red_000.png", ".git"}
    assert "excluded 4 files" in src.summary()


def test_truncated_jpeg_is_excluded(tmp_path: Path) -> None:
    root = make_class_folders(tmp_path / "d", {"red": 3, "green": 3})
    make_image(root / "red" / "big.jpg", (200, 0, 0), size=300, seed=5)
    data = (root / "red" / "big.jpg").read_bytes()
    (root / "red" / "big.jpg").write_bytes(data[: int(len(data) * 0.6)])
    src = load_items(DataConfig(path=str(root), valid_pct=0.34))
    assert [Path(p).name for p, _ in src.excluded] == ["big.jpg"]


def test_empty_class_is_an_error_naming_the_folder(tmp_path: Path) -> None:
    root = make_class_folders(tmp_path / "d", {"red": 3, "green": 3})
    (root / "blue").mkdir()
    with pytest.raises(DataError, match=r"blue.*holds no image files"):
        load_items(DataConfig(path=str(root)))


def test_single_class_is_an_error(tmp_path: Path) -> None:
    root = make_class_folders(tmp_path / "d", {"red": 5})
    with pytest.raises(DataError, match="single class"):
        load_items(DataConfig(path=str(root)))


def test_missing_or_file_path_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_items(DataConfig(path=str(tmp_path / "nope")))
    f = make_image(tmp_path / "x.png", (0, 0, 0))
    with pytest.raises(DataError, match="is a file"):
        load_items(DataConfig(path=str(f)))
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        load_items(DataConfig(path=str(tmp_path / "empty_dir")))


def test_unreadable_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_class_folders(tmp_path / "d", {"red": 3, "green": 3})
    os.chmod(root, 0)
    if os.access(root, os.R_OK | os.X_OK):  # root reads everything: emulate the permission error
        monkeypatch.setattr("visiontune.data.sources.os.access", lambda *a, **k: False)
    try:
        with pytest.raises(DataError, match="cannot be read"):
            load_items(DataConfig(path=str(root)))
    finally:
        os.chmod(root, 0o755)


def test_class_only_in_valid_is_an_error(tmp_path: Path) -> None:
    make_class_folders(tmp_path / "d" / "train", {"red": 3, "green": 3})
    make_class_folders(tmp_path / "d" / "valid", {"red": 1, "blue": 1})
    with pytest.raises(DataError, match=r"\['blue'\].*not in train"):
        load_items(DataConfig(path=str(tmp_path / "d")))


def test_a_relative_csv_is_the_one_in_data_before_one_in_the_current_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    root = make_class_folders(tmp_path / "d", {"red": 3, "green": 3})
    (root / "labels.csv").write_text("path,label\n" + "".join(
        f"{c}/{c}_{i:03d}.png,{c}\n" for c in ("red", "green") for i in range(3)))
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    (elsewhere / "labels.csv").write_text("path,label\nred/red_000.png,green\nred/red_001.png,green\n")
    monkeypatch.chdir(elsewhere)
    source = load_items(DataConfig(path=str(root), csv="labels.csv", valid_pct=0.0))
    assert len(source.items) == 6 and {it.label for it in source.items} == {"red", "green"}
    assert "not ./labels.csv in the current folder" in caplog.text


def test_exclude_reads_the_review_format_and_reports_paths_that_match_nothing(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """--exclude reads one format (a CSV whose first column is the path: `review` writes
    exclude.txt so): a path holding a comma is one path; a listed path that is in no data
    is reported, as --relabel's are."""
    data = make_class_folders(tmp_path / "d", {"red": 4, "green": 4})
    odd = make_image(data / "red" / "a, b.png", (220, 40, 40), seed=9)
    listed = tmp_path / "exclude.txt"
    from visiontune.files import write_csv

    write_csv(listed, ["path"], [[str(odd)], [str(data / "red" / "gone.png")]])
    with caplog.at_level("WARNING"):
        src = load_items(DataConfig(path=str(data), exclude=str(listed), valid_pct=0.25))
    assert str(odd) not in {it.path for it in src.items} and (str(odd), "listed in --exclude") in src.excluded
    assert "--exclude lists 1 paths that are not in the data, e.g. " + str(data / "red" / "gone.png") in caplog.text


def test_an_exclude_file_without_a_path_header_is_one_path_a_line(tmp_path: Path) -> None:
    """The old exclude.txt (one path a line, no header: review pages before the decision
    log wrote it so) given to --exclude: a path holding a comma is one path, not a CSV row
    split in two (audit of issue 34: the image stayed in training). A file whose header
    names the path column (interpret's mislabels.csv: rank,path,...) is read by it."""
    data = make_class_folders(tmp_path / "d", {"red": 4, "green": 4})
    odd = make_image(data / "red" / "a, b.png", (220, 40, 40), seed=9)
    listed = tmp_path / "exclude.txt"
    listed.write_text(f"{odd}\n{data / 'green' / 'green_000.png'}\n")
    src = load_items(DataConfig(path=str(data), exclude=str(listed), valid_pct=0.25))
    assert {Path(p).name for p, why in src.excluded if why == "listed in --exclude"} == {"a, b.png", "green_000.png"}
    _write_csv(listed, [["rank", "path", "label"], ["1", str(odd), "red"]])
    src = load_items(DataConfig(path=str(data), exclude=str(listed), valid_pct=0.25))
    assert [Path(p).name for p, why in src.excluded if why == "listed in --exclude"] == ["a, b.png"]


def test_relabel_to_a_label_the_data_lacks_is_named_in_a_warning(tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    """A --relabel label that no image has (a typo, or a label a diff-style corrections
    file made up: '+blue') trains as a new class: a warning names it (audit of issue 34:
    silent)."""
    data = make_class_folders(tmp_path / "d", {"red": 4, "green": 4})
    fixes = tmp_path / "corrections.csv"
    _write_csv(fixes, [["path", "label"], [str(data / "red" / "red_000.png"), "+blue"],
                       [str(data / "red" / "red_001.png"), "green"]])
    with caplog.at_level("WARNING"):
        src = load_items(DataConfig(path=str(data), relabel=str(fixes), valid_pct=0.25))
    assert "--relabel gives labels the data does not have: '+blue'" in caplog.text and "green'" not in caplog.text
    assert "+blue" in src.classes
    caplog.clear()
    _write_csv(fixes, [["path", "label"], [str(data / "red" / "red_001.png"), "green"]])
    with caplog.at_level("WARNING"):
        load_items(DataConfig(path=str(data), relabel=str(fixes), valid_pct=0.25))
    assert "does not have" not in caplog.text


def test_a_path_listed_twice_is_one_image_or_a_clear_error(tmp_path: Path) -> None:
    """A CSV that lists an image twice (a merged spreadsheet, a label typed again): with
    the same label it is one image, and the summary says the row was counted once; with
    another label, or another split, it is an error naming both rows. Before, each row
    became an item, and the two copies could land in train and valid."""
    make_class_folders(tmp_path, {"red": 6, "green": 6})
    rows = [["path", "label"]] + [[f"{c}/{c}_{i:03d}.png", c] for c in ("red", "green") for i in range(6)]
    _write_csv(tmp_path / "labels.csv", rows + [["./red/red_000.png", "red"]])  # the same file, spelt otherwise
    source = load_items(DataConfig(path=str(tmp_path), csv="labels.csv", valid_pct=0.5), seed=0)
    assert len(source.items) == 12 and len({os.path.realpath(it.path) for it in source.items}) == 12
    assert "listed again on labels.csv:14, as on labels.csv:2: counted once" in source.summary()
    _write_csv(tmp_path / "labels.csv", rows + [["red/red_000.png", "green"]])
    with pytest.raises(DataError, match=r"labels\.csv:14 lists .*red_000\.png.* again with another label "
                                        r"\('green'; labels\.csv:2 says 'red'\)"):
        load_items(DataConfig(path=str(tmp_path), csv="labels.csv"))
    split = [["path", "label", "split"]] + [[p, c, "train"] for p, c in rows[1:]] + [["red/red_000.png", "red", "valid"]]
    _write_csv(tmp_path / "labels.csv", split)
    with pytest.raises(DataError, match="again with another split"):
        load_items(DataConfig(path=str(tmp_path), csv="labels.csv"))


def test_a_split_folder_beside_class_folders_is_refused(tmp_path: Path) -> None:
    """Audit of issue 34: DATA/<class>/ with DATA/valid/<class>/ made 'valid' a class that
    held the other classes' validation images, silently."""
    data = make_class_folders(tmp_path / "d", {"red": 4, "green": 4})
    make_class_folders(data / "valid", {"red": 2, "green": 2}, 50)
    with pytest.raises(DataError, match=r"valid holds class folders beside .* go under .*train"):
        load_items(DataConfig(path=str(data)))


def test_byte_identical_copies_drawn_apart_are_kept_on_one_side(tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    """A labelled image saved twice under two names (a copy in a flat folder tree): the
    drawn split put one copy in train and the other in valid at some seeds, so validation
    scored an image the model trained on, without a word. The copy drawn into validation
    now trains with its twin, a training image of its class validates in its place (the
    split keeps its size and proportions), and the log says so. The digests are the
    check's (data/scan.py): no file is read a second time."""
    import shutil

    data = make_class_folders(tmp_path / "d", {"red": 5, "green": 5, "blue": 5})
    shutil.copy(data / "red" / "red_001.png", data / "red" / "copy.png")
    shutil.copy(data / "green" / "green_003.png", data / "green" / "again.png")
    moved = 0
    for seed in range(12):
        caplog.clear()
        with caplog.at_level("INFO", logger="visiontune"):
            src = load_items(DataConfig(path=str(data), valid_pct=0.34), seed=seed)
        side = {Path(it.path).name: it.split for it in src.items}
        assert side["red_001.png"] == side["copy.png"] and side["green_003.png"] == side["again.png"], seed
        assert Counter(it.label for it in src.split(VALID)) == {"red": 2, "green": 2, "blue": 2}, seed
        moved += "byte-identical copies of training images" in caplog.text
    assert moved  # the draw did put copies apart at some seeds (else this test proves nothing)


def test_byte_identical_copies_across_given_splits_are_one_warning(tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """Copies the layout itself puts in train and in valid / test (folders) cannot move:
    one warning gives their count and a pair. Without the check (--no-verify) nothing is
    hashed, so nothing is said."""
    import shutil

    root = tmp_path / "split"
    make_class_folders(root / "train", {"red": 4, "green": 4})
    make_class_folders(root / "valid", {"red": 2, "green": 2}, 100)
    make_class_folders(root / "test", {"red": 2, "green": 2}, 200)
    shutil.copy(root / "train" / "red" / "red_000.png", root / "valid" / "red" / "seen.png")
    shutil.copy(root / "train" / "green" / "green_001.png", root / "test" / "green" / "also_seen.png")
    with caplog.at_level("INFO", logger="visiontune"):
        src = load_items(DataConfig(path=str(root)))
    assert len(src.split(VALID)) == 5 and len(src.split(TEST)) == 5  # nothing moved
    (said,) = [r.getMessage() for r in caplog.records if "byte-identical" in r.getMessage()]
    assert said.startswith("2 images in valid or test are byte-identical copies of training images")
    assert f"{root / 'valid' / 'red' / 'seen.png'} in valid = {root / 'train' / 'red' / 'red_000.png'} in train" in said
    caplog.clear()
    with caplog.at_level("INFO", logger="visiontune"):
        load_items(DataConfig(path=str(root), verify_images=False))
    assert "byte-identical" not in caplog.text
