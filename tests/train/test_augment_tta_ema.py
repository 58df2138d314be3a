"""Augmentation presets build what they claim, heavy mixes batches, test-time augmentation
averages the views it claims, and EMA weights are validated and kept when better."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from timm.data.auto_augment import RandAugment
from timm.data.random_erasing import RandomErasing
from torchvision.transforms import v2 as T

import visiontune as vt
from conftest import make_image
from visiontune.config import RunConfig
from visiontune.data.loaders import eval_dataset
from visiontune.data.preprocess import Preprocess
from visiontune.data.transforms import eval_transform, train_transform
from visiontune.runtime.inference import run_eval
from visiontune.tasks.objective import Objective
from visiontune.tasks.single_label import SingleLabel
from visiontune.train.trainer import Trainer

PRE = Preprocess(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic", 0.875)


def _kinds(transform) -> set[str]:
    return {type(t).__name__ for t in getattr(transform, "transforms", [])}


def test_presets_build_the_transforms_they_claim() -> None:
    assert _kinds(train_transform(PRE, "none")) == _kinds(eval_transform(PRE))
    light = train_transform(PRE, "light")
    assert {"RandomResizedCrop", "RandomHorizontalFlip"} <= _kinds(light)
    assert not any(isinstance(t, (RandAugment, RandomErasing)) for t in light.transforms)
    for preset in ("medium", "heavy"):
        steps = train_transform(PRE, preset).transforms
        assert any(isinstance(t, RandAugment) for t in steps) and any(isinstance(t, RandomErasing) for t in steps)
        assert any("RandomResizedCrop" in type(t).__name__ for t in steps)
    assert isinstance(train_transform(PRE, "light").transforms[0], T.RandomResizedCrop)


def test_old_configs_saying_augment_true_or_false_still_load() -> None:
    assert RunConfig.create(None, augment=False).augmentation.augment == "none"
    assert RunConfig.from_dict({"train": {"augment": True}}).augmentation.augment == "light"
    with pytest.raises(vt.ConfigError, match="augment 'extreme' is not valid"):
        RunConfig.create(None, augment="extreme")


def test_heavy_trains_on_mixed_soft_targets(flat_data: Path, tmp_path: Path, tiny: dict,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[torch.Tensor] = []
    real = Trainer.train_step

    def spy(self, net, x, y, soft=False, views=None):
        seen.append(y.detach().clone())
        return real(self, net, x, y, soft=soft, views=views)

    monkeypatch.setattr(Trainer, "train_step", spy)
    r = vt.fit(flat_data, **dict(tiny, strategy="finetune", augment="heavy", epochs=2, output=str(tmp_path / "r")))
    mixed = [y for y in seen if y.ndim == 2]
    assert mixed and all(torch.allclose(y.sum(1), torch.ones(len(y))) for y in mixed)  # soft class distributions
    assert any(((y > 0) & (y < 1)).any() for y in mixed) and len(r.history) == 2


def test_tta_averages_the_logits_of_its_four_views(tmp_path: Path) -> None:
    path = make_image(tmp_path / "a.png", (200, 50, 50), size=48)
    views = eval_dataset([str(path)], torch.tensor([0]), PRE, tta=True)[0][0]
    single = eval_dataset([str(path)], torch.tensor([0]), PRE)[0][0]
    assert views.shape == (4, 3, 32, 32)
    torch.testing.assert_close(views[0], single)  # the eval view
    torch.testing.assert_close(views[1], single.flip(-1))  # mirrored
    torch.testing.assert_close(views[3], views[2].flip(-1))  # whole image, mirrored
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 2))
    loader = torch.utils.data.DataLoader(eval_dataset([str(path)], torch.tensor([0]), PRE, tta=True), batch_size=1)
    out = run_eval(model, loader, torch.device("cpu"), SingleLabel(["a", "b"]), channels_last=False)
    with torch.no_grad():
        expected = model(views).mean(0).softmax(0)
    torch.testing.assert_close(torch.from_numpy(out.probs[0]), expected)


def test_evaluate_and_predict_with_tta(split_data: Path, tmp_path: Path, tiny: dict) -> None:
    run = vt.fit(split_data, **dict(tiny, strategy="feature-extract", output=str(tmp_path / "r"))).run_dir
    plain, tta = vt.evaluate(run, split_data), vt.evaluate(run, split_data, tta=True)
    assert len(plain.paths) == len(tta.paths) == 6 and not (plain.probs == tta.probs).all()
    preds, _ = vt.predict(run, split_data / "test", tta=True)
    assert [p.prob for p in preds] == pytest.approx(tta.probs.max(1).tolist(), abs=1e-5)


def test_ema_is_validated_and_its_weights_are_saved_when_better(flat_data: Path, tmp_path: Path, tiny: dict,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    kw = dict(tiny, strategy="finetune", epochs=2, ema=True, ema_decay=0.9, output=str(tmp_path / "r"))
    r = vt.fit(flat_data, name="validated", **kw)
    assert {"ema_val_loss", "ema_accuracy"} <= set(r.history[0])
    monkeypatch.setattr(Objective, "better", lambda self, a, b: "ema_marker" not in b)  # the EMA always wins
    held: list[dict[str, torch.Tensor]] = []
    real_end = Trainer.adopt_chosen_weights

    def keep(self):
        held.append({k: v.detach().clone() for k, v in self.ema.module.state_dict().items()})
        raw = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        held.append(raw)
        real_end(self)

    monkeypatch.setattr(Trainer, "adopt_chosen_weights", keep)
    r = vt.fit(flat_data, name="ema-wins", **dict(kw, restore_best=False))
    ema, raw = held
    saved = load_file(str(Path(r.run_dir) / "model.safetensors"))
    assert any(not torch.equal(ema[k], raw[k]) for k in ema if k.endswith("weight"))  # EMA differs from raw
    trained = [k for k in saved if not k.startswith(("novelty.", "calibration."))]  # fitted after training
    assert all(torch.equal(saved[k], ema[k].cpu()) for k in trained)  # and it is what was saved
    assert all(torch.equal(r.model.state_dict()[k].cpu(), ema[k].cpu()) for k in trained)  # and held at the end


def test_medium_randaugment_never_draws_a_magnitude_that_breaks_an_op() -> None:
    """timm's magnitude noise (mstd 0.5) could draw magnitudes above 10, where Posterize
    keeps 0 bits and PIL raises; the preset caps them (mmax9). Many draws, none may fail."""
    import random

    from PIL import Image

    transform = train_transform(PRE, "medium")
    image = Image.fromarray(torch.randint(0, 255, (40, 40, 3), dtype=torch.uint8).numpy())
    random.seed(0)
    torch.manual_seed(0)
    for _ in range(3000):
        assert transform(image).shape == (3, 32, 32)
