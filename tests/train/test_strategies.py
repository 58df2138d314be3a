"""Each strategy's trainable set, LR groups, and frozen weights staying bit-identical."""

from __future__ import annotations

import pytest
import torch

from visiontune.config import RunConfig
from visiontune.errors import ConfigError
from visiontune.models.classifier import create_classifier
from visiontune.train.plan import apply_phase, build_optimizer, make_plan, set_train_modes


def _setup(strategy: str, **kw):
    cfg = RunConfig.create(None, backbone="timm:test_efficientnet", weights="none", image_size=32,
                           strategy=strategy, lr=1e-2, **kw)
    torch.manual_seed(0)
    model, _ = create_classifier(cfg.model, 3)
    plan = make_plan(model, cfg.strategy, cfg.train)
    opt = build_optimizer(model, plan, cfg.train)
    return cfg, model, plan, opt


def _step(model, opt) -> None:
    model.train()
    set_train_modes(model, "eval", "train")
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    opt.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


def _trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def _lrs(opt) -> dict[str, float]:
    return {g["name"]: g["peak_lr"] for g in opt.param_groups}


@pytest.mark.parametrize("strategy,kw", [("feature-extract", {}), ("freeze-k", {"freeze": 3}), ("gradual", {"epochs": 3})])
def test_frozen_parameters_and_buffers_are_bit_identical_after_a_step(strategy, kw) -> None:
    cfg, model, plan, opt = _setup(strategy, **kw)
    apply_phase(model, opt, plan, 0)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    frozen_bn_stats = {n: b.clone() for n, b in model.named_buffers() if "running" in n and
                       not model.get_submodule(n.rsplit(".", 1)[0]).weight.requires_grad}
    assert frozen and trainable
    _step(model, opt)
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], v) for n, v in frozen.items())
    assert any(not torch.equal(params[n], v) for n, v in trainable.items())
    buffers = dict(model.named_buffers())
    assert all(torch.equal(buffers[n], v) for n, v in frozen_bn_stats.items())  # BN eval while frozen


def test_feature_extract_trains_only_the_head() -> None:
    _, model, plan, opt = _setup("feature-extract")
    apply_phase(model, opt, plan, 0)
    assert _trainable(model) == {"head.0.weight", "head.0.bias"}
    lrs = _lrs(opt)
    assert lrs["head"] == 1e-2 and lrs["head (no decay)"] == 1e-2


def test_finetune_head_lr_is_ten_times_the_backbone() -> None:
    _, model, plan, opt = _setup("finetune")
    apply_phase(model, opt, plan, 0)
    assert _trainable(model) == {n for n, _ in model.named_parameters()}
    for g in opt.param_groups:
        assert g["peak_lr"] == pytest.approx(1e-2 if g["name"].startswith("head") else 1e-3)
    no_decay = [g for g in opt.param_groups if g["name"].endswith("(no decay)")]
    assert no_decay and all(g["weight_decay"] == 0 and all(p.ndim <= 1 for p in g["params"]) for g in no_decay)


def test_freeze_k_freezes_exactly_the_first_k_groups() -> None:
    _, model, plan, opt = _setup("freeze-k", freeze=2)
    apply_phase(model, opt, plan, 0)
    frozen_groups = [g for g, on in zip(plan.groups, plan.phases[0].trainable) if not on]
    assert frozen_groups == list(plan.groups[:2])
    frozen_names = {n for g in frozen_groups for n in g.param_names}
    assert _trainable(model) == {n for n, _ in model.named_parameters()} - frozen_names
    with pytest.raises(ConfigError, match="exceeds"):
        _setup("freeze-k", freeze=len(plan.groups))


def test_gradual_unfreezes_with_discriminative_lrs_and_no_new_groups() -> None:
    _, model, plan, opt = _setup("gradual", epochs=3, freeze_epochs=1)
    assert [p.epochs for p in plan.phases] == [1, 2]
    n_groups = len(opt.param_groups)
    apply_phase(model, opt, plan, 0)
    assert _trainable(model) == {"head.0.weight", "head.0.bias"}
    apply_phase(model, opt, plan, 1)
    assert len(opt.param_groups) == n_groups  # built once
    assert _trainable(model) == {n for n, _ in model.named_parameters()}
    body = [lr for lr, g in zip(plan.phases[1].lrs, plan.groups) if not g.is_head]
    assert body == sorted(body) and body[-1] / body[0] == pytest.approx(10.0)  # layer_lr_ratio
    assert plan.phases[1].lrs[-1] == pytest.approx(0.5e-2)  # head at unfreeze_lr_scale x lr
    assert body[-1] == pytest.approx(0.5e-3)


def test_scratch_uses_random_init_and_one_lr() -> None:
    cfg, model, plan, opt = _setup("scratch")
    assert cfg.model.weights == "none"
    assert set(plan.phases[0].lrs) == {1e-2}


def test_gradual_needs_more_epochs_than_head_only_epochs() -> None:
    with pytest.raises(ConfigError, match="freeze_epochs"):
        RunConfig.create(None, strategy="gradual", epochs=1)


def test_unknown_option_suggests_names() -> None:
    with pytest.raises(ConfigError, match="'epochs'"):
        RunConfig.create(None, epoch=3)


def test_batchnorm_modes() -> None:
    _, model, plan, opt = _setup("freeze-k", freeze=2)
    apply_phase(model, opt, plan, 0)
    bns = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}
    frozen = {n for n, m in bns.items() if not m.weight.requires_grad}
    assert frozen and frozen != set(bns)
    for frozen_bn, trainable_bn in (("eval", "train"), ("train", "eval"), ("eval", "eval"), ("train", "train")):
        model.train()
        set_train_modes(model, frozen_bn, trainable_bn)
        for n, m in bns.items():
            assert m.training == ((frozen_bn if n in frozen else trainable_bn) == "train"), (frozen_bn, trainable_bn, n)


def test_trainable_bn_auto_follows_the_weights() -> None:
    assert RunConfig.create(None, strategy="finetune").bn_modes() == ("eval", "eval")
    assert RunConfig.create(None, strategy="scratch").bn_modes() == ("eval", "train")
    assert RunConfig.create(None, strategy="finetune", trainable_bn="train").bn_modes() == ("eval", "train")


def test_layer_decay_uses_per_block_groups_and_decays_the_lr_towards_the_input() -> None:
    from visiontune.config import ModelConfig
    from visiontune.train.plan import layer_groups

    convnext, _ = create_classifier(ModelConfig(backbone="timm:test_convnext", weights="none", image_size=32), 3)
    assert len(layer_groups(convnext, fine=True)) > len(layer_groups(convnext))  # one group per block
    cfg, model, plan, opt = _setup("finetune", layer_decay=0.5)
    n = len(plan.groups) - 1
    lrs = plan.phases[0].lrs
    assert lrs[-1] == pytest.approx(1e-2)  # the head at lr
    assert list(lrs[:-1]) == pytest.approx([1e-2 * 0.5 ** (n - i) for i in range(n)])
    _, _, gradual, _ = _setup("gradual", epochs=3, layer_decay=0.5)
    assert gradual.phases[1].lrs[-2] == pytest.approx(1e-2 * 0.5 * 0.5)  # unfreeze_lr_scale x decay
    with pytest.raises(ConfigError, match="layer_decay must be <= 1"):
        RunConfig.create(None, layer_decay=1.5)
