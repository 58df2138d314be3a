"""The converged linear probe: it reaches scikit-learn's own solution on the cached
features, folds into the head exactly, handles two classes, many classes and label sets,
and is the first phase of gradual (LP-FT) where it applies."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

import visiontune as vt
from conftest import make_class_folders
from visiontune.frozen.probe import fit_probe, load_into
from visiontune.tasks.multi_label import MultiLabel
from visiontune.tasks.single_label import SingleLabel


def single(y: np.ndarray | None, n: int | None = None) -> SingleLabel:
    """The single-label task over the classes 0..max(y) (or n classes)."""
    return SingleLabel([str(i) for i in range(n or int(np.max(y)) + 1)])


def multi(y: np.ndarray) -> MultiLabel:
    return MultiLabel([str(i) for i in range(np.asarray(y).shape[1])])


def _blobs(classes: int, n: int = 90, dim: int = 12, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    x = rng.normal(size=(n, dim)) + 1.5 * np.eye(classes, dim)[y] + 3.0  # offset: the fold-in must undo it
    return x.astype(np.float32), y


@pytest.mark.parametrize("classes", [2, 3])
def test_with_no_prior_the_fit_is_scikit_learns_logistic_regression(classes: int) -> None:
    """Mean cross-entropy + ||W||^2 / (2 C N) is scikit-learn's objective: the same
    probabilities (two classes: two softmax rows share the penalty, i.e. sklearn's C x 2)."""
    x, y = _blobs(classes)
    fit = fit_probe(x, y, single(y))
    head = torch.nn.Sequential(torch.nn.Linear(x.shape[1], classes))
    load_into(head, fit)
    probs = head(torch.from_numpy(x)).softmax(1).detach().numpy()
    mean = x.mean(0)
    scale = float(np.sqrt(((x - mean) ** 2).mean())) + 1e-6
    c = fit.c * (2 if classes == 2 else 1)
    reference = LogisticRegression(C=c, max_iter=5000, tol=1e-10).fit((x - mean) / scale, y)
    np.testing.assert_allclose(probs, reference.predict_proba((x - mean) / scale), atol=2e-3)
    assert fit.folds == 5


def test_a_warm_started_head_is_a_prior_the_fit_keeps() -> None:
    """Twelve noisy images and a head that already knows the task (like ImageNet's 'ant' and
    'bee' rows): pulled towards that start, the fit stays good on new images; from zero it
    learns only what twelve images tell."""
    rng = np.random.default_rng(1)
    truth = rng.normal(size=(2, 64))
    x = rng.normal(size=(400, 64)).astype(np.float32)
    y = (x @ truth[1] - x @ truth[0] + rng.normal(0, 2.0, 400) > 0).astype(int)
    start = torch.nn.Linear(64, 2)
    with torch.no_grad():
        start.weight.copy_(torch.from_numpy(truth).float())
        start.bias.zero_()
    accuracy = {}
    for name, prior in (("prior", start), ("zero", None)):
        fit = fit_probe(x[:12], y[:12], single(y, 2), start=prior)
        logits = x[12:] @ fit.weight.T + fit.bias
        accuracy[name] = float((logits.argmax(1) == y[12:]).mean())
    assert accuracy["prior"] > accuracy["zero"] + 0.05 and accuracy["prior"] > 0.75, accuracy


def test_label_sets_get_one_binary_probe_each_and_constant_labels_a_constant() -> None:
    x, y = _blobs(3)
    targets = np.stack([y == 0, y == 1, np.zeros_like(y, dtype=bool)], axis=1).astype(float)
    fit = fit_probe(x, targets, multi(targets))
    head = torch.nn.Linear(x.shape[1], 3)
    load_into(head, fit)
    probs = head(torch.from_numpy(x)).sigmoid().detach().numpy()
    assert ((probs[:, :2] > 0.5) == targets[:, :2].astype(bool)).mean() > 0.9
    assert np.allclose(probs[:, 2], probs[0, 2]) and probs[0, 2] < 0.01  # never present


def test_feature_extract_fits_the_head_in_one_pass_to_the_probes_accuracy(tmp_path: Path, tiny: dict) -> None:
    """--epochs does not apply: one converged pass, and its accuracy is at least what 20
    SGD epochs reach on the same features."""
    data = make_class_folders(tmp_path / "d", {"red": 16, "green": 16, "blue": 16})
    kw = dict(tiny, strategy="feature-extract", lr=3e-2, output=str(tmp_path / "runs"))
    probe = vt.fit(data, epochs=20, **kw)
    sgd = vt.fit(data, epochs=20, probe="sgd", **kw)
    assert len(probe.history) == 1 and probe.history[0]["phase"] == "head only (converged probe)"
    assert len(sgd.history) == 20
    assert probe.metrics["accuracy"] >= sgd.metrics["accuracy"]


def test_gradual_starts_fine_tuning_from_the_converged_probe(tmp_path: Path, tiny: dict) -> None:
    data = make_class_folders(tmp_path / "d", {"red": 10, "green": 10})
    r = vt.fit(data, **dict(tiny, strategy="gradual", epochs=3, trainable_bn="eval", output=str(tmp_path / "r")))
    assert [h["phase"] for h in r.history] == ["head only (converged probe)", "all, discriminative LRs",
                                               "all, discriminative LRs"]
    hidden = vt.fit(data, **dict(tiny, strategy="gradual", epochs=3, head_hidden=8, output=str(tmp_path / "h")))
    assert hidden.history[0]["phase"] == "head only"  # a hidden layer: SGD epochs, as before


def test_probe_on_more_rows_than_fit_rows_fits_a_stratified_sample_that_keeps_a_rare_class(monkeypatch) -> None:
    from visiontune.frozen import probe

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    y[:3] = 2  # three images of a rare class: a random 100 of 400 would likely hold none
    x = rng.normal(0, 1, (400, 8)).astype(np.float32)
    x[np.arange(400), y] += 4
    monkeypatch.setattr(probe, "FIT_ROWS", 100)
    monkeypatch.setattr(probe, "SEARCH_ROWS", 60)
    fit = probe.fit_probe(x, y, single(y))
    predicted = (x @ fit.weight.T + fit.bias).argmax(1)
    assert (predicted == y).mean() > 0.95 and (predicted[:3] == 2).all() and fit.folds == 5


def test_the_search_regularises_noise_strongly_and_separable_classes_weakly() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 32)).astype(np.float32)
    noise = fit_probe(x, rng.integers(0, 2, 200), single(None, 2))
    y = np.arange(200) % 3
    clear = fit_probe(x + 6.0 * np.eye(3, 32, dtype=np.float32)[y], y, single(y))  # apart by 6 sd
    assert noise.c <= 1e-3 < 1.0 <= clear.c, (noise.c, clear.c)


def test_the_search_keeps_groups_whole() -> None:
    """Ten near-copies per group (one patient's images) and labels that are noise across
    groups: folds that split groups reward memorising the copies (weak regularisation);
    folds that keep them whole see nothing to learn (strong)."""
    rng = np.random.default_rng(1)
    centres, labels = rng.normal(size=(30, 32)), rng.integers(0, 2, 30)
    x = (np.repeat(centres, 10, axis=0) + 0.01 * rng.normal(size=(300, 32))).astype(np.float32)
    y, groups = np.repeat(labels, 10), [f"g{i}" for i in np.repeat(np.arange(30), 10)]
    leaky = fit_probe(x, y, single(y))
    whole = fit_probe(x, y, single(y), groups=groups)
    assert whole.folds == 5 and whole.c <= 1e-2 and leaky.c >= 1.0, (whole.c, leaky.c)


def test_a_singleton_class_or_a_rare_label_set_does_not_switch_the_search_off() -> None:
    x, y = _blobs(3, n=61)
    y[-1] = 3  # one image of a fourth class
    x = np.concatenate([x, np.zeros((0, x.shape[1]), np.float32)])
    assert fit_probe(x, y, single(y)).folds == 5
    rng = np.random.default_rng(2)
    labels = (rng.random((120, 6)) < 0.3).astype(float)
    labels[0] = [1, 1, 1, 1, 1, 1]  # a label set no other image has: its own "stratum" of one
    features = (labels @ rng.normal(size=(6, 16)) + rng.normal(size=(120, 16))).astype(np.float32)
    assert fit_probe(features, labels, multi(labels)).folds == 5


def test_a_few_images_per_class_fit_with_as_many_folds_as_the_classes_allow() -> None:
    """Ten classes of 2 and 3 images (the few-shot end: a label budget of a few per class):
    scikit-learn refuses 5 stratified folds when no class has 5 rows; the search uses 3."""
    x, y = _blobs(10, n=30, dim=16)
    fit = fit_probe(x, y, single(y))
    assert fit.folds == 3 and np.mean((x @ fit.weight.T + fit.bias).argmax(1) == y) > 0.9
    x2, y2 = _blobs(10, n=20, dim=16)
    assert fit_probe(x2, y2, single(y2)).folds == 2


def test_feature_phases_give_the_probe_the_runs_groups(tmp_path: Path, tiny: dict) -> None:
    from visiontune.config import RunConfig
    from visiontune.data.sources import load_items
    from visiontune.train.setup import prepare_run

    data = make_class_folders(tmp_path / "d", {"red": 10, "green": 10})
    (data / "groups.csv").write_text("".join(f"{p.relative_to(data)},{p.stem[-1]}\n" for p in sorted(data.rglob("*.png"))))
    cfg = RunConfig.create(None, path=str(data), **dict(tiny, strategy="feature-extract"))
    source = load_items(cfg.data)
    phase = prepare_run(cfg, source).data.features()
    assert phase.groups == [it.group for it in source.split("train")] and all(phase.groups)


def test_an_unchanged_rerun_remembers_the_probe_and_a_changed_label_does_not(tmp_path: Path, tiny: dict,
                                                                           caplog: pytest.LogCaptureFixture) -> None:
    """Issue 23: the second feature-extract over the same features skips the C search and
    ends with the same head; one relabelled image is a different fit."""
    import logging

    from visiontune.bundle import load_bundle

    data = make_class_folders(tmp_path / "d", {"red": 12, "green": 12})
    opts = dict(tiny, strategy="feature-extract", epochs=1, output=str(tmp_path / "runs"),
                cache_dir=str(tmp_path / "cache"))  # its own cache: other tests fit the same images
    with caplog.at_level(logging.INFO, logger="visiontune.train.trainer"):
        first = vt.fit(data, **opts)
        assert "remembered from an earlier run" not in caplog.text
        caplog.clear()
        second = vt.fit(data, **opts)
        assert "remembered from an earlier run" in caplog.text
    a, b = (load_bundle(r.run_dir).model.head[-1].weight.detach() for r in (first, second))
    assert torch.equal(a, b) and first.metrics["accuracy"] == second.metrics["accuracy"]
    relabel = tmp_path / "relabel.csv"
    relabel.write_text(f"path,label\n{data / 'red' / 'red_000.png'},green\n")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="visiontune.train.trainer"):
        vt.fit(data, relabel=str(relabel), **opts)
    assert "converged probe" in caplog.text and "remembered from an earlier run" not in caplog.text
