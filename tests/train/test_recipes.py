"""Options through the whole Trainer: SGD, label smoothing, the schedules as they run, a
hidden-layer head through save / predict / export, a torchvision backbone end to end,
and `--strategy auto` in cv and lr-find."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import visiontune as vt
from visiontune.config import RunConfig
from visiontune.data.sources import load_items
from visiontune.rundir import RunDir
from visiontune.selection.cv import cross_validate
from visiontune.selection.lrfind import lr_find
from visiontune.train.schedules import lr_factor
from visiontune.train.setup import prepare_run
from visiontune.train.trainer import Trainer


def test_sgd_trains_with_nesterov_momentum_at_its_own_defaults(flat_data: Path, tmp_path: Path, tiny: dict) -> None:
    cfg = RunConfig.create(None, path=str(flat_data), optimizer="sgd", **tiny)
    opt = prepare_run(cfg, load_items(cfg.data)).optimizer
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["nesterov"] and opt.defaults["momentum"] == 0.9
    assert cfg.train.resolved_lr() == 1e-2 and cfg.train.resolved_weight_decay() == 1e-4
    r = vt.fit(flat_data, **dict(tiny, optimizer="sgd", strategy="feature-extract", probe="sgd", epochs=10, lr=3.0,
                                 output=str(tmp_path / "runs")))
    assert r.history[-1]["train_loss"] < r.history[0]["train_loss"] and r.metrics["accuracy"] >= 0.8


def test_label_smoothing_is_the_trainers_loss(flat_data: Path, tiny: dict) -> None:
    cfg = RunConfig.create(None, path=str(flat_data), label_smoothing=0.2, **tiny)
    trainer = Trainer(prepare_run(cfg, load_items(cfg.data)), [])
    logits, y = torch.randn(6, 2), torch.tensor([0, 1, 1, 0, 1, 0])
    expected = torch.nn.functional.cross_entropy(logits, y, label_smoothing=0.2)
    assert trainer.criterion(logits, y).item() == pytest.approx(expected.item(), rel=1e-6)
    assert expected.item() != pytest.approx(torch.nn.functional.cross_entropy(logits, y).item(), rel=1e-3)


@pytest.mark.parametrize("schedule,extra", [("cosine", {}), ("step", {"step_size": 1, "gamma": 0.5}),
                                            ("onecycle", {"pct_start": 0.3}), ("constant", {})])
def test_each_schedule_sets_the_lr_of_every_step(flat_data: Path, tiny: dict, schedule: str, extra: dict,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[float] = []
    real = Trainer.train_step

    def record(self, net, x, y, **kw):
        seen.append(self.optimizer.param_groups[-1]["lr"] / self.optimizer.param_groups[-1]["peak_lr"])
        return real(self, net, x, y, **kw)

    monkeypatch.setattr(Trainer, "train_step", record)
    cfg = RunConfig.create(None, path=str(flat_data), strategy="finetune", epochs=3, schedule=schedule,
                           **extra, **tiny)
    Trainer(prepare_run(cfg, load_items(cfg.data)), []).fit()
    steps = math.ceil(len(load_items(cfg.data).split("train")) / tiny["batch_size"])
    expected = [lr_factor(cfg.train, (e * steps + i) / (3 * steps), e) for e in range(3) for i in range(steps)]
    assert seen == pytest.approx(expected)
    if schedule == "step":
        assert seen[0] == 1.0 and seen[steps] == 0.5 and seen[2 * steps] == 0.25
    if schedule == "cosine":
        assert seen[0] == 1.0 and seen[-1] < 0.1


def test_a_hidden_layer_head_survives_save_predict_and_export(flat_data: Path, tmp_path: Path, tiny: dict) -> None:
    pytest.importorskip("onnxruntime")
    from visiontune.bundle import load_bundle
    from visiontune.deploy.export import export

    r = vt.fit(flat_data, **dict(tiny, head_hidden=16, head_dropout=0.2, strategy="finetune", epochs=2,
                                 output=str(tmp_path / "runs")))
    model = load_bundle(r.run_dir).model
    assert [type(m).__name__ for m in model.head] == ["Linear", "ReLU", "Dropout", "Linear"]
    assert model.head[0].out_features == 16
    direct, _ = vt.predict(r.run_dir, flat_data / "red")
    onnx = export(r.run_dir, "onnx")
    exported, _ = vt.predict(onnx.path, flat_data / "red")
    assert onnx.max_abs_diff < 1e-3
    assert [p.label for p in direct] == [p.label for p in exported]
    assert [p.prob for p in direct] == pytest.approx([p.prob for p in exported], abs=1e-4)


def test_a_torchvision_backbone_end_to_end(split_data: Path, tmp_path: Path, tiny: dict) -> None:
    kw = dict(tiny, backbone="torchvision:mobilenet_v3_small", strategy="gradual", epochs=2,
              output=str(tmp_path / "runs"))
    r = vt.fit(split_data, **kw)
    assert len(r.history) == 2 and r.history[0]["phase"] == "head only"  # random init: BN trains, no probe
    preds, _ = vt.predict(r.run_dir, split_data / "test")
    assert len(preds) == 6 and {p.label for p in preds} <= {"red", "green"}
    report = vt.evaluate(r.run_dir, split_data)  # the dataset root: its test/ split
    assert len(report.paths) == 6 and 0.0 <= report.metrics["loss"] < 10


def test_strategy_auto_in_cv_and_lr_find(flat_data: Path, tmp_path: Path, tiny: dict) -> None:
    """Before: "unknown strategy 'auto'". Now each cv fold asks the advisor on its training
    part, and lr-find asks it once."""
    result = cross_validate(flat_data, folds=2, **dict(tiny, strategy="auto", epochs=2, output=str(tmp_path / "cv")))
    chosen = {RunDir(Path(result.out_dir) / f"fold{i}").read_config().strategy.name for i in (1, 2)}
    assert chosen and "auto" not in chosen
    found = lr_find(flat_data, num_iter=20, plot=None, **dict(tiny, strategy="auto", output=str(tmp_path)))
    assert len(found.lrs) >= 10
