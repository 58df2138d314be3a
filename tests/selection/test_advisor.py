"""Advisor decisions on constructed cases, warm-started head rows, and the LR finder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import visiontune as vt
from conftest import make_class_folders
from visiontune.models.warmstart import match_imagenet_classes, warm_start_rows
from visiontune.planning.advice import decide, fine_tuning_outlook
from visiontune.rundir import RunDir
from visiontune.selection.advisor import advise
from visiontune.selection.lrfind import lr_find, suggest


@pytest.mark.parametrize(
    "median,similarity,probe,baseline,expected,why",
    [
        (40, 0.95, 0.97, 0.6, "feature-extract", "little data"),  # small, similar: ants vs bees
        (400, 0.9, 0.95, 0.6, "gradual", "data enough to refine"),  # similar, more data
        (50, 0.6, 0.8, 0.7, "freeze-k", "data is scarce"),  # partly similar, scarce
        (3000, 0.6, 0.8, 0.7, "finetune", "data is plentiful"),  # partly similar, plentiful
        (5000, 0.2, 0.6, 0.55, "finetune", "far from ImageNet but data is plentiful"),  # features still help
        (5000, 0.1, 0.55, 0.6, "scratch", "no better than raw pixels"),  # features no better than pixels
        (30, 0.1, 0.55, 0.5, "feature-extract", "far from ImageNet and data is scarce"),  # little will work
        (300, 0.3, 0.6, 0.5, "freeze-k", "medium amount of data"),
    ],
)
def test_decisions_on_constructed_cases(median, similarity, probe, baseline, expected, why) -> None:
    strategy, reason = decide(median, similarity, probe, baseline)
    assert strategy == expected and why in reason


@pytest.mark.parametrize(
    "probe,train,half,verdict",
    [
        (0.98, 1.0, 0.97, "unlikely to pay: the probe is within 2.0 points of perfect"),
        (0.80, 0.99, 0.70, "unlikely to pay"),  # still rising with more images, and overfitting: data-limited
        (0.70, 0.72, 0.69, "may pay"),  # a flat curve, a narrow gap: the features hold it back
        (0.70, 0.95, 0.69, "open"),  # a flat curve but a wide gap
    ],
)
def test_the_advisor_says_beforehand_whether_fine_tuning_is_likely_to_pay(probe, train, half, verdict) -> None:
    said = fine_tuning_outlook(probe, train, half, "accuracy")
    assert verdict in said
    if "perfect" not in verdict:
        assert f"{probe - half:+.3f} from half its training images" in said and f"{train - probe:+.3f} higher" in said


def test_advise_measures_and_explains(tmp_path: Path, tiny: dict) -> None:
    root = make_class_folders(tmp_path / "d", {"red": 8, "green": 8})
    advice = advise(root, **{k: v for k, v in tiny.items() if k in ("backbone", "image_size", "num_workers")},
                    weights="none")
    assert advice.images == 16 and advice.classes == 2 and advice.chance == 0.5
    assert advice.baseline_accuracy > 0.9  # red vs green from raw pixels
    assert advice.similarity == pytest.approx((advice.probe_accuracy - 0.5) / 0.5)
    expected, _ = decide(advice.median_per_class, advice.similarity, advice.probe_accuracy, advice.baseline_accuracy)
    assert advice.median_per_class == 8 and advice.strategy == expected
    assert f"{advice.probe_accuracy:.3f}" in advice.explanation and "16 images" in advice.explanation
    assert 0 <= advice.probe_half <= 1 and 0 <= advice.probe_train <= 1  # measured on the same folds
    assert advice.outlook and advice.explanation.endswith(advice.outlook)


def test_strategy_auto_runs_the_advisor(flat_data: Path, tmp_path: Path, tiny: dict) -> None:
    result = vt.fit(flat_data, **dict(tiny, strategy="auto", epochs=2, output=str(tmp_path / "r")))
    assert RunDir(result.run_dir).read_config().strategy.name != "auto"


def test_class_names_match_imagenet_synonyms() -> None:
    m = match_imagenet_classes(["hotdog", "hot_dog", "ants", "Golden Retriever", "butterflies", "crane", "faces"])
    assert m == {"hotdog": 934, "hot_dog": 934, "ants": 310, "Golden Retriever": 207}


def test_warm_start_copies_matched_rows_only() -> None:
    source = torch.nn.Linear(8, 1000)
    head = torch.nn.Linear(8, 3)
    before = head.weight.detach().clone()
    matches = warm_start_rows(head, source, ["not_hotdog", "hotdog", "tabby"])
    assert matches == {"hotdog": 934, "tabby": 281}
    assert torch.equal(head.weight[1], source.weight[934]) and torch.equal(head.bias[2], source.bias[281])
    assert torch.equal(head.weight[0], before[0])


@pytest.mark.slow
def test_warm_start_with_packaged_weights_predicts_ants_at_init(tmp_path: Path) -> None:
    from visiontune.config import ModelConfig
    from visiontune.models.classifier import create_classifier

    model, _ = create_classifier(ModelConfig(), 2, ["ants", "bees"])
    assert model.warm_start == {"ants": 310, "bees": 309}
    off, _ = create_classifier(ModelConfig(warm_start=False), 2, ["ants", "bees"])
    assert off.warm_start == {}


def test_lr_suggestion_is_the_steepest_descent() -> None:
    lrs = [10 ** (-7 + i * 0.1) for i in range(60)]
    losses = [1.0 if lr < 1e-4 else (1.0 - 0.5 * min(1, (lr / 1e-4 - 1) / 9) if lr < 1e-2 else 2.0) for lr in lrs]
    steep, valley = suggest(lrs, losses)
    assert 1e-4 < steep < 1e-2 and valley < 1e-2


def test_lr_find_writes_a_plot(flat_data: Path, tmp_path: Path, tiny: dict) -> None:
    result = lr_find(flat_data, num_iter=40, plot=tmp_path / "lr.png",
                     **dict(tiny, strategy="feature-extract", output=str(tmp_path)))
    assert (tmp_path / "lr.png").stat().st_size > 1000
    assert 1e-7 <= result.suggested_lr <= 10 and len(result.lrs) == len(result.losses) >= 10
