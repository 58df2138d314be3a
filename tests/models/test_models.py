from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torchvision.models import VisionTransformer

import visiontune as vt
from visiontune.config import ModelConfig
from visiontune.errors import ConfigError
from visiontune.models.backbones import SOURCES, check_input_size, parse_backbone
from visiontune.models.classifier import backbone_groups, build_head, create_classifier


def test_parse_backbone() -> None:
    assert parse_backbone("resnet50") == ("timm", "resnet50")
    assert parse_backbone("torchvision:vgg16") == ("torchvision", "vgg16")
    with pytest.raises(ConfigError, match="timm:<name>"):
        parse_backbone("keras:resnet50")


def test_unknown_names_are_clear_errors() -> None:
    with pytest.raises(ConfigError, match="timm has no model"):
        create_classifier(ModelConfig(backbone="timm:resnet_9000", weights="none"), 2)
    with pytest.raises(ConfigError, match="torchvision has no"):
        create_classifier(ModelConfig(backbone="torchvision:resnet_9000", weights="none"), 2)


def test_head_shapes_and_init() -> None:
    head = build_head(64, 5, hidden=16, dropout=0.3)
    kinds = [type(m).__name__ for m in head]
    assert kinds == ["Linear", "ReLU", "Dropout", "Linear"]
    assert head[-1].out_features == 5 and torch.count_nonzero(head[-1].bias) == 0
    bound = 0.1 * (6 / (16 + 5)) ** 0.5  # xavier-uniform bound with gain 0.1
    assert head[-1].weight.abs().max() <= bound + 1e-6


# torchvision names with the feature width their classifier had (weights=none: no download).
TORCHVISION = [("resnet18", 512), ("resnet34", 512), ("resnet50", 2048), ("googlenet", 1024),
               ("inception_v3", 2048), ("mobilenet_v3_small", 1024), ("efficientnet_b0", 1280),
               ("convnext_tiny", 768), ("vit_b_16", 768), ("vgg16", 4096)]


@pytest.mark.slow
@pytest.mark.parametrize("arch,width", TORCHVISION)
def test_torchvision_backbones_get_a_new_head(arch: str, width: int) -> None:
    model, pre = create_classifier(ModelConfig(backbone=f"torchvision:{arch}", weights="none"), 3)
    assert model.num_features == width and model.head[-1].out_features == 3
    assert pre.input_size in (224, 299) and len(pre.mean) == 3
    assert len(backbone_groups(model)) >= 3
    if arch in ("resnet18", "mobilenet_v3_small", "googlenet"):
        model.eval()
        assert model(torch.randn(2, 3, 224, 224)).shape == (2, 3)


@pytest.mark.parametrize("arch", ["test_resnet", "test_vit", "test_convnext", "test_efficientnet"])
def test_timm_backbones_forward_and_groups(arch: str) -> None:
    model, pre = create_classifier(ModelConfig(backbone=f"timm:{arch}", weights="none", image_size=64), 4)
    model.eval()
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 4)
    groups = backbone_groups(model)
    assert len(groups) >= 3
    names = [n for _, g in groups for n in g]
    assert len(names) == len(set(names))  # each parameter in one group
    assert set(names) | {n for n, _ in model.head.named_parameters(prefix="head")} == {n for n, _ in model.named_parameters()}


def test_fixed_size_timm_backbones_are_built_for_the_requested_size(flat_data: Path, tmp_path: Path,
                                                                    tiny: dict) -> None:
    """timm's ViTs have a fixed input size (test_vit: 160 px): --image-size 32 builds them for 32."""
    r = vt.fit(flat_data, **dict(tiny, backbone="timm:test_vit", strategy="finetune", epochs=1,
                                 output=str(tmp_path / "runs")))
    assert json.loads((Path(r.run_dir) / "preprocess.json").read_text())["input_size"] == 32
    preds, _ = vt.predict(r.run_dir, flat_data / "red")
    assert len(preds) == 12


def test_a_size_the_backbone_cannot_take_is_a_clear_error_before_training() -> None:
    """torchvision's ViTs are fixed to the size they were built for (vit_b_16: 224 px): the
    check `create_source_model` runs before any training refuses another size, says which
    and why, and leaves the body's mode as it was. A one-layer torchvision ViT (the class of
    vit_b_16, a thousandth of its weights) has the same fixed size."""
    vit = VisionTransformer(image_size=224, patch_size=16, num_layers=1, num_heads=1, hidden_dim=8, mlp_dim=8)
    body, _, _ = SOURCES["torchvision"].strip(vit)
    body.train()
    with pytest.raises(ConfigError, match="vit_b_16 cannot take 64 px inputs.*built for 224 px"):
        check_input_size(body, 64, "torchvision:vit_b_16", 224)
    assert body.training  # put back as it was
    check_input_size(body, 224, "torchvision:vit_b_16", 224)  # its own size passes


def test_drop_path_reaches_timm_and_is_refused_for_torchvision() -> None:
    model, _ = create_classifier(ModelConfig(backbone="timm:test_efficientnet", weights="none", drop_path=0.3), 2)
    rates = [m.drop_prob for m in model.modules() if type(m).__name__ == "DropPath"]
    assert rates and max(rates) > 0
    with pytest.raises(ConfigError, match="torchvision"):
        create_classifier(ModelConfig(backbone="torchvision:resnet18", weights="none", drop_path=0.3), 2)
