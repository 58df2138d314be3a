"""The out-of-distribution score (models/novelty.py, fitted by train/calibrate.fit_ood): the
k-th neighbour distance on known vectors, and on a run trained on colour squares: noise and
stripes score past the threshold and predict answers "unknown" for them, not for new colour
squares; ~95% of the validation images pass; --ood-threshold replaces the threshold; the
exported ONNX gives predict's scores; weights saved without a bank still predict."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import visiontune as vt
from conftest import TINY, make_class_folders
from visiontune.bundle import load_bundle
from visiontune.cli import main
from visiontune.data.loaders import eval_dataset, make_loader
from visiontune.deploy.export import export
from visiontune.errors import ConfigError
from visiontune.models.novelty import Novelty, energy, neighbour_k, spread, threshold
from visiontune.prediction import evaluate, predict


def test_the_score_is_the_distance_to_the_kth_neighbour() -> None:
    """Unit vectors: e0 is in the bank (distance 0 to it, sqrt 2 to the others); e3 is not
    (sqrt 2 to all); a scaled copy of e0 scores as e0 (features are normalised)."""
    bank = torch.eye(4)[:3] * torch.tensor([[2.0], [1.0], [5.0]])
    x = torch.stack([torch.eye(4)[0] * 7, torch.eye(4)[3]])
    assert Novelty(bank, 1).distance(x).tolist() == pytest.approx([0.0, math.sqrt(2)], abs=1e-3)
    assert Novelty(bank, 2).distance(x).tolist() == pytest.approx([math.sqrt(2), math.sqrt(2)], abs=1e-3)
    assert Novelty(bank, 1).bank.dtype == torch.float16
    logits = torch.zeros(2, 3)
    assert Novelty(bank, 1)(x, logits).tolist() == pytest.approx([0.0, math.sqrt(2)], abs=1e-3)  # no energy, no scale
    with pytest.raises(ValueError):
        Novelty(bank, 4)


def test_the_score_is_the_larger_of_distance_and_energy_each_in_validation_spreads() -> None:
    """An image near the bank whose logits fit no class (flat) scores by its energy; one far
    from the bank with a confident output scores by its distance; each part is (value -
    median) / (95th percentile - median) of the validation split's."""
    bank = torch.eye(4)[:3]
    near, far = torch.eye(4)[0], torch.eye(4)[3]
    x = torch.stack([near, far])
    logits = torch.tensor([[0.0, 0.0, 0.0], [9.0, 0.0, 0.0]])
    scale = torch.tensor([[0.5, 0.25], [-5.0, 2.0]])
    score = Novelty(bank, 1, "softmax", scale)(x, logits)
    flat, sure = -math.log(3), -float(torch.logsumexp(logits[1], 0))
    expected = [max((0 - 0.5) / 0.25, (flat + 5) / 2), max((math.sqrt(2) - 0.5) / 0.25, (sure + 5) / 2)]
    assert score.tolist() == pytest.approx(expected, abs=1e-3)
    assert expected[0] == pytest.approx((flat + 5) / 2) and expected[1] == pytest.approx((math.sqrt(2) - 0.5) / 0.25)
    labels = torch.tensor([[0.0, 2.0]])  # independent labels: -sum softplus
    assert energy(labels, 2).item() == pytest.approx(-(math.log(2) + math.log1p(math.exp(2))), abs=1e-5)
    assert spread(np.arange(101.0)) == (50.0, pytest.approx(45.0))


def test_k_and_the_threshold() -> None:
    assert neighbour_k(2048) == 10 and neighbour_k(30) == 3 and neighbour_k(5) == 1
    scores = np.arange(1, 101, dtype=float)
    assert threshold(scores) == 96.0 and (scores <= threshold(scores)).mean() >= 0.95


def odd_images(folder: Path) -> Path:
    """Noise and stripes: nothing like a colour square."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(folder / f"noise_{i}.png")
        stripes = np.zeros((40, 40, 3), np.uint8)
        stripes[:, (np.arange(40) // (2 + i % 3)) % 2 == 0] = (255, 255, 255) if i < 3 else (255, 0, 255)
        Image.fromarray(stripes).save(folder / f"stripes_{i}.png")
    return folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("novelty")
    data = root / "data"
    make_class_folders(data / "train", {"red": 12, "green": 12, "blue": 12})
    make_class_folders(data / "valid", {"red": 8, "green": 8, "blue": 8}, 100)
    make_class_folders(data / "test", {"red": 4, "green": 4, "blue": 4}, 200)
    result = vt.fit(data, **dict(TINY, strategy="feature-extract", epochs=4, lr=3e-2, output=str(root / "runs")))
    return Path(result.run_dir), data, odd_images(root / "odd")


def scores_of(run: Path | str, *inputs: Path, **options: object) -> dict[str, tuple[float, bool]]:
    preds, _ = predict(run, list(inputs), **options)
    return {Path(p.path).name: (p.decoded.ood_score, p.decoded.unknown) for p in preds}


def test_the_score_separates_new_squares_from_noise_and_stripes(trained: tuple[Path, Path, Path]) -> None:
    run, data, odd = trained
    fitted = load_bundle(run).uncertainty["ood"]
    assert fitted["energy"] == "softmax" and "larger of the distance" in fitted["score"] and fitted["bank"] == 36 and fitted["k"] == 3 and fitted["valid_images"] == 24
    inside, outside = scores_of(run, data / "test"), scores_of(run, odd)
    assert max(s for s, _ in inside.values()) < min(s for s, _ in outside.values())
    assert all(unknown for _, unknown in outside.values())
    assert sum(u for _, u in inside.values()) <= 3  # ~5% of images like the validation ones are past it


def test_the_threshold_lets_95_percent_of_the_validation_images_pass(trained: tuple[Path, Path, Path]) -> None:
    run, data, _ = trained
    scores = np.array([s for s, _ in scores_of(run, data / "valid", engine="torch").values()])
    t = load_bundle(run).uncertainty["ood"]["threshold"]
    assert t == pytest.approx(threshold(scores), abs=1e-3)  # what predict scores is what the fit scored
    assert 0.9 <= (scores <= t + 1e-4).mean() < 1.0  # 23 of 24, give or take one at the border
    metrics = evaluate(run, data).metrics  # the test split: new colour squares
    assert metrics["unknown_share"] < 0.5


def test_with_tta_the_score_is_the_eval_views_whose_threshold_it_is(trained: tuple[Path, Path, Path]) -> None:
    """predict --tta averaged the OOD score over the 4 views; the threshold was set on the
    eval view's scores, whose spread the mean shrinks: validation images past it went from 1
    in 24 to none, the share the threshold promises no longer held. The score is the eval
    view's (the probabilities are still the views' average)."""
    run, data, odd = trained
    for inputs in (data / "valid", odd):
        plain, tta = scores_of(run, inputs, engine="torch"), scores_of(run, inputs, engine="torch", tta=True)
        assert tta == {name: (pytest.approx(score, abs=1e-5), unknown) for name, (score, unknown) in plain.items()}


def test_predict_writes_unknown_with_its_score_and_the_threshold_is_overridden(
        trained: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run, data, odd = trained
    out = tmp_path / "p.csv"
    assert main(["predict", str(run), str(odd / "noise_0.png"), str(data / "test" / "red"), "--output", str(out)]) == 0
    rows = list(csv.DictReader(out.read_text().splitlines()))
    assert list(rows[0])[-2:] == ["unknown", "ood_score"]
    by_name = {Path(r["path"]).name: r for r in rows}
    assert by_name["noise_0.png"]["unknown"] == "true" and float(by_name["noise_0.png"]["ood_score"]) > 0.1
    assert sum(r["unknown"] == "true" for name, r in by_name.items() if name.startswith("red")) <= 1
    printed = capsys.readouterr().out
    assert "noise_0.png\tunknown\t" in printed and "unlike the training images" in printed
    assert not any(u for _, u in scores_of(run, odd, ood_threshold=1e9).values())  # a threshold no score passes
    assert all(u for _, u in scores_of(run, data / "test" / "red", ood_threshold=-1e9).values())
    record = json.loads(json.dumps(predict(run, [odd / "stripes_0.png"])[0][0].record()))
    assert record["unknown"] is True and record["ood_score"] > 0


def test_the_exported_onnx_gives_predicts_score(trained: tuple[Path, Path, Path]) -> None:
    pytest.importorskip("onnxruntime")
    import onnx

    run, data, odd = trained
    exported = export(run, "onnx")
    assert [o.name for o in onnx.load(exported.path).graph.output] == ["logits", "ood_score"]
    eager = scores_of(run, odd, data / "test" / "blue", engine="torch")
    onnx_scores = scores_of(exported.path, odd, data / "test" / "blue")
    assert onnx_scores.keys() == eager.keys()
    for name, (score, unknown) in eager.items():
        assert onnx_scores[name][0] == pytest.approx(score, abs=1e-4) and onnx_scores[name][1] == unknown


def test_weights_without_a_bank_still_predict_without_a_score(trained: tuple[Path, Path, Path],
                                                              tmp_path: Path) -> None:
    """A run trained before the score existed: no novelty.* tensors, no "ood" in its metadata."""
    run, _, odd = trained
    old = tmp_path / "old"
    shutil.copytree(run, old, ignore=shutil.ignore_patterns("*.onnx", "*.pt2", "*.ts"))
    with safe_open(str(old / "model.safetensors"), framework="pt") as fh:
        meta = json.loads(fh.metadata()["visiontune"])
    meta["uncertainty"].pop("ood")
    tensors = {k: v for k, v in load_file(str(old / "model.safetensors")).items() if not k.startswith("novelty.")}
    save_file(tensors, str(old / "model.safetensors"), metadata={"visiontune": json.dumps(meta)})
    preds, _ = predict(old, [odd], engine="torch")
    assert len(preds) == 12 and all(p.decoded.ood_score is None and not p.decoded.unknown for p in preds)
    assert "unknown" not in preds[0].record() and load_bundle(old).model.novelty is None
    with pytest.raises(ConfigError, match="no out-of-distribution score"):
        predict(old, [odd], ood_threshold=0.5)


def test_a_bank_saved_before_the_energy_scores_by_its_distance(trained: tuple[Path, Path, Path],
                                                               tmp_path: Path) -> None:
    """Weights of the first version: novelty.bank and novelty.k, no energy_kind or scale.
    They load (strict) and score by the raw distance their threshold was set on."""
    run, _, odd = trained
    old = tmp_path / "first"
    shutil.copytree(run, old, ignore=shutil.ignore_patterns("*.onnx", "*.pt2", "*.ts"))
    with safe_open(str(old / "model.safetensors"), framework="pt") as fh:
        meta = fh.metadata()
    tensors = load_file(str(old / "model.safetensors"))
    kept = {k: v for k, v in tensors.items() if k not in ("novelty.energy_kind", "novelty.scale")}
    save_file(kept, str(old / "model.safetensors"), metadata=meta)
    model = load_bundle(old).model
    assert model.novelty.kind == 0
    paths = sorted(odd.iterdir())
    scores = scores_of(old, *paths, engine="torch")
    bundle = load_bundle(run)  # the same weights: the raw distance of the same features
    x = next(iter(make_loader(eval_dataset([str(p) for p in paths], None, bundle.preprocess), 64, 0, torch.device("cpu"))))[0]
    with torch.inference_mode():
        distances = bundle.model.novelty.distance(bundle.model.backbone(x)).tolist()
    assert [scores[p.name][0] for p in paths] == pytest.approx(distances, abs=1e-4)


def test_interpret_lists_unusual_validation_images_as_unknown_outliers(trained: tuple[Path, Path, Path],
                                                                      tmp_path: Path) -> None:
    """A noise image among the validation images: interpret's outliers.csv marks it unknown
    with its score (review lists it first among the outliers); no training image is."""
    from visiontune.analysis.interpret import interpret
    from visiontune.files import read_csv_dicts
    from visiontune.rundir import RunDir

    run, data, odd = trained
    mixed = tmp_path / "mixed"
    for split in ("train", "valid"):
        shutil.copytree(data / split, mixed / split)
    shutil.copy(odd / "noise_0.png", mixed / "valid" / "red" / "noise_0.png")
    interpret(run, str(mixed), top_n=2)
    rows = {Path(r["path"]).name: r for r in read_csv_dicts(RunDir(run).views.outliers)}
    assert rows["noise_0.png"]["unknown"] == "true" and float(rows["noise_0.png"]["ood_score"]) > 0.1
    assert not any(r["unknown"] == "true" for r in rows.values() if "/train/" in r["path"])
