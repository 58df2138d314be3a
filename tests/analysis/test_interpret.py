"""Interpretation: mislabel ranking, duplicates and leakage, corrections, artefacts, and the
HTML report rendered in a real (headless) browser."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import visiontune as vt
from conftest import TINY, chromium, make_class_folders
from visiontune.analysis.duplicates import find_duplicates
from visiontune.analysis.interpret import interpret
from visiontune.analysis.mislabels import rank_label_sets, rank_mislabels, rank_outliers
from visiontune.config import DataConfig
from visiontune.data.sources import load_items
from visiontune.tasks.multi_label import MultiLabel

HYMENOPTERA = Path(__file__).resolve().parents[3] / "shared" / "data" / "hymenoptera"


def test_rank_mislabels_orders_by_self_confidence_and_flags() -> None:
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.95, 0.05], [0.1, 0.9]])
    labels = ["a", "b", "b", "a"]  # the last two look flipped
    ranked = rank_mislabels(["p0", "p1", "p2", "p3"], labels, probs, ["a", "b"])
    assert [s.path for s in ranked[:2]] == ["p2", "p3"]
    assert ranked[0].predicted == "a" and ranked[0].flagged and not ranked[-1].flagged


def test_a_suggested_set_is_the_given_set_with_the_changes_applied() -> None:
    """What review suggests and writes is a label set (never the change list "+dog -cat",
    which --relabel would read as two classes named '+dog' and '-cat')."""
    probs = np.array([[0.9, 0.2, 0.8], [0.1, 0.9, 0.1]])  # blue, cat, dog
    suspects = rank_label_sets(["a.png", "b.png"], [("cat",), ("dog",)], probs, ["blue", "cat", "dog"])
    first = next(s for s in suspects if s.path == "a.png")
    assert first.predicted == "+blue -cat +dog" and first.suggested == ("blue", "dog")
    task = MultiLabel(["blue", "cat", "dog"])
    assert task.form.change(("cat",), first.suggested) == "blue, dog (+blue +dog -cat)"
    assert task.form.entry(first.suggested) == ["blue", "dog"] and task.form.shown(()) == "(none)"
    assert task.parse_label(task.form.entry(first.suggested), " ", "page") == ("blue", "dog")
    assert task.label_of(task.decode(np.array([[0.9, 0.1, 0.7]]), 1)[0]) == ("blue", "dog")
    assert task.form.label_entry == "toggle"


def test_outliers_put_the_odd_one_first() -> None:
    rng = np.random.default_rng(0)
    feats = np.vstack([rng.normal(5, 0.1, (20, 8)), rng.normal(-5, 0.1, (1, 8))])
    feats[:20, 0] += 10
    assert int(np.argmax(rank_outliers(feats))) == 20


@pytest.mark.slow
@pytest.mark.skipif(not HYMENOPTERA.is_dir(), reason="needs ../shared/data/hymenoptera")
def test_ten_injected_label_flips_rank_in_the_top_20(tmp_path: Path) -> None:
    from visiontune.frozen.features import FeatureCache, FeatureExtractor, model_fingerprint
    from visiontune.frozen.probe import oof_outputs
    from visiontune.models.classifier import create_classifier
    from visiontune.tasks.single_label import SingleLabel

    copy = tmp_path / "hym"
    flips = set()
    rng = random.Random(0)
    for split in ("train", "val"):
        for cls in ("ants", "bees"):
            files = sorted((HYMENOPTERA / split / cls).iterdir())
            chosen = set(rng.sample(files, 5)) if split == "train" else set()
            for f in files:
                other = "bees" if cls == "ants" else "ants"
                dest = copy / split / (other if f in chosen else cls) / f.name
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.symlink_to(f)
                if f in chosen:
                    flips.add(str(dest))
    source = load_items(DataConfig(path=str(copy)))
    items = source.items
    model, pre = create_classifier(vt.ModelConfig(), 2)
    cache = FeatureCache(tmp_path / "cache", model_fingerprint("lite0", model.backbone, pre))
    import torch

    feats, _ = FeatureExtractor(model.backbone, pre, torch.device("cpu"), cache).extract([it.path for it in items])
    labels = [it.label for it in items]
    task = SingleLabel(source.classes)
    probs, _ = oof_outputs(feats.numpy(), task.encode(labels).numpy(), task)  # what interpret uses
    ranked = rank_mislabels([it.path for it in items], labels, probs, source.classes)
    found = flips & {s.path for s in ranked[:20]}
    print(f"{len(found)} of 10 injected flips in the top 20")
    assert len(flips) == 10 and len(found) >= 7, f"{len(found)} of 10 flips in the top 20"


def test_leakage_finds_all_five_copies(tmp_path: Path) -> None:
    root = tmp_path / "d"
    make_class_folders(root / "train", {"red": 8, "green": 8})
    make_class_folders(root / "valid", {"red": 3, "green": 3}, 100)
    copied = sorted((root / "train" / "red").iterdir())[:3] + sorted((root / "train" / "green").iterdir())[:2]
    for f in copied:
        shutil.copy(f, root / "valid" / f.parent.name / f"copy_{f.name}")
    src = load_items(DataConfig(path=str(root)))
    pairs = find_duplicates([(it.path, it.split) for it in src.items])
    leaks = [p for p in pairs if p.crosses_splits]
    assert len(leaks) == 5 and all(p.kind == "exact" for p in leaks)
    shrunk = root / "train" / "red" / "red_007.png"
    Image.open(shrunk).resize((36, 36)).convert("RGB").save(root / "valid" / "red" / "near.jpg", quality=70)
    src = load_items(DataConfig(path=str(root)))
    near = [p for p in find_duplicates([(it.path, it.split) for it in src.items]) if p.kind == "near"]
    assert any(Path(p.a).name == "red_007.png" or Path(p.b).name == "red_007.png" for p in near)


def test_relabel_and_exclude_leave_files_alone(flat_data: Path, tmp_path: Path) -> None:
    target = flat_data / "red" / "red_000.png"
    before = target.read_bytes()
    (tmp_path / "fix.csv").write_text(f"path,label\n{target},green\n")
    (tmp_path / "drop.txt").write_text(f"{flat_data / 'green' / 'green_000.png'}\n")
    src = load_items(DataConfig(path=str(flat_data), relabel=str(tmp_path / "fix.csv"),
                                exclude=str(tmp_path / "drop.txt")))
    labels = {Path(it.path).name: it.label for it in src.items}
    assert labels["red_000.png"] == "green" and "green_000.png" not in labels
    assert ("listed in --exclude" in dict(src.excluded).values()) and target.read_bytes() == before


def test_interpret_writes_every_artefact_and_the_report_renders(tmp_path: Path) -> None:
    data = make_class_folders(tmp_path / "d" / "train", {"red": 10, "green": 10}).parent
    make_class_folders(data / "valid", {"red": 4, "green": 4}, 100)
    run = vt.fit(data, **dict(TINY, strategy="feature-extract", epochs=3, lr=1e-2, output=str(tmp_path / "runs")))
    result = vt_interpret(run.run_dir, saliency=[str(data / "valid" / "red" / "red_000.png")])
    expected = {"confusion.png", "confusion.csv", "confusion_normalized.csv", "per_class.csv", "most_confused.csv",
                "top_losses.png", "top_losses.csv", "gradcam.png", "filters.png", "mislabels.csv", "mislabels.png",
                "outliers.csv", "duplicates.csv", "curves.png", "report.html", "gradcam_chosen.png"}
    assert expected <= set(result.files)
    report = Path(result.files["report.html"])
    browser = chromium()
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([browser, *flags, "--dump-dom", report.as_uri()], capture_output=True, text=True,
                         timeout=120).stdout
    for section in ("summary", "data", "config", "curves", "confusion", "per-class", "top-losses", "saliency",
                    "filters", "mislabels", "outliers", "duplicates"):
        assert f'id="{section}"' in dom, section
    assert dom.count("data:image/png;base64,") == 7 and "not available" not in dom  # every figure inlined
    shot = Path(os.environ.get("VISIONTUNE_ARTIFACTS", tmp_path)) / "report.png"
    shot.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([browser, *flags, "--window-size=1200,3000", f"--screenshot={shot}", report.as_uri()],
                   capture_output=True, timeout=120)
    assert shot.stat().st_size > 20_000 and Image.open(shot).size == (1200, 3000)


def vt_interpret(run_dir: str, **kw):
    from visiontune.analysis.interpret import interpret

    return interpret(run_dir, num_workers=0, **kw)


def test_popcount_works_without_numpy_2(monkeypatch: pytest.MonkeyPatch) -> None:
    import numpy as np

    from visiontune.analysis import duplicates

    x = np.array([0, 1, 3, 2**63, 2**64 - 1, 0x0F0F], dtype=np.uint64)
    expected = [0, 1, 2, 1, 64, 8]
    assert duplicates.popcount64(x).tolist() == expected
    monkeypatch.delattr(np, "bitwise_count", raising=False)  # NumPy 1.x has none
    assert duplicates.popcount64(x).tolist() == expected


def _dense_atypicality(features, k: int = 5):
    """The N x N reference: 1 - mean cosine similarity of the k most similar other rows."""
    import numpy as np

    f = features / np.linalg.norm(features, axis=1, keepdims=True)
    sim = f @ f.T
    np.fill_diagonal(sim, -np.inf)
    return 1.0 - (-np.sort(-sim, axis=1)[:, :k]).mean(axis=1)


def test_outliers_match_the_dense_computation_with_bounded_memory() -> None:
    import tracemalloc

    import numpy as np

    rng = np.random.default_rng(0)
    small = rng.normal(size=(300, 16))
    small[5] = small[7]  # an exact twin is a neighbour at distance 0, not itself
    assert rank_outliers(small) == pytest.approx(_dense_atypicality(small), abs=1e-9)
    big = rng.normal(size=(12_000, 32)).astype(np.float32)  # dense similarities: 576 MB
    tracemalloc.start()
    scores = rank_outliers(big)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert scores.shape == (12_000,) and peak < 400 * 2**20


def _noisy_probe(seed: int = 0):
    """3 overlapping Gaussian classes, 10% of labels flipped; out-of-fold probe probabilities."""
    from visiontune.frozen.probe import oof_outputs
    from visiontune.tasks.single_label import SingleLabel

    rng = np.random.default_rng(seed)
    y = np.repeat([0, 1, 2], 200)
    feats = (rng.normal(size=(600, 8)) + 2.0 * np.eye(3, 8)[y]).astype(np.float32)
    noisy = y.copy()
    flips = rng.choice(600, 60, replace=False)
    noisy[flips] = (y[flips] + rng.integers(1, 3, 60)) % 3
    labels = [str(v) for v in noisy]
    task = SingleLabel(["0", "1", "2"])
    return noisy, oof_outputs(feats, task.encode(labels).numpy(), task, seed)[0], set(flips.tolist())


def test_cleanlab_flags_flips_better_than_the_plain_off_diagonal() -> None:
    from visiontune.analysis.mislabels import flag_label_issues, flag_method, off_diagonal

    y, probs, flips = _noisy_probe()
    assert flag_method().startswith("cleanlab")
    scores = {}
    for name, mask in (("cleanlab", flag_label_issues(y, probs)), ("off-diagonal", off_diagonal(y, probs))):
        found = set(np.flatnonzero(mask).tolist())
        scores[name] = (len(found & flips) / max(1, len(found)), len(found & flips) / len(flips))
    f1 = {name: 2 * p * r / (p + r) for name, (p, r) in scores.items()}
    assert scores["cleanlab"][0] >= 0.6 and scores["cleanlab"][1] >= 0.8, scores
    assert f1["cleanlab"] > f1["off-diagonal"], scores


def test_mislabels_are_looked_for_where_training_looks_unless_asked(tmp_path: Path) -> None:
    data = make_class_folders(tmp_path / "d" / "train", {"red": 8, "green": 8}).parent
    make_class_folders(data / "valid", {"red": 3, "green": 3}, 100)
    make_class_folders(data / "test", {"red": 3, "green": 3}, 200)
    run = vt.fit(data, **dict(TINY, strategy="feature-extract", epochs=2, output=str(tmp_path / "runs"))).run_dir
    res = interpret(run)
    assert not any("/test/" in s.path for s in res.suspects) and len(res.suspects) == 22
    assert "flagged by cleanlab" in (Path(run) / "interpret" / "report.html").read_text()
    res = interpret(run, mislabels_in_test=True)
    assert len(res.suspects) == 28
