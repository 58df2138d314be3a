"""freeze-k's frozen leading blocks through ONNX Runtime (runtime/prefix.py): the same
outputs and gradients as PyTorch within the engine's tolerance, only frozen blocks in eval
mode taken, a backbone that does not run them as a chain refused, nothing left patched."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import visiontune as vt
from visiontune.config import ModelConfig
from visiontune.models.classifier import create_classifier
from visiontune.runtime.engine import FEATURE_TOLERANCE
from visiontune.runtime.prefix import FrozenPrefix, frozen_prefix
from visiontune.train.plan import set_train_modes

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

CPU = torch.device("cpu")


def _half_frozen(frozen_bn: str = "eval") -> nn.Module:
    """A tiny timm EfficientNet with its stem and first two stages frozen, in the modes a
    freeze-k step runs it in (trainable BatchNorm keeping its statistics: deterministic)."""
    torch.manual_seed(0)
    model, _ = create_classifier(ModelConfig(backbone="timm:test_efficientnet", weights="none", image_size=32), 2)
    bb = model.backbone
    for module in (bb.conv_stem, bb.bn1, bb.blocks[0], bb.blocks[1]):
        module.requires_grad_(False)
    model.train()
    set_train_modes(model, frozen_bn, "eval")
    return model


def _patched(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if "forward" in m.__dict__]


def test_the_frozen_blocks_run_in_onnx_runtime_with_the_same_outputs_and_gradients(tmp_path: Path) -> None:
    model = _half_frozen()
    net = frozen_prefix(model, 32, CPU, "onnx", tmp_path, 10, channels_last=False)
    assert isinstance(net, FrozenPrefix)
    assert net.names[:2] == ["conv_stem", "bn1"] and all(n.startswith(("blocks.0", "blocks.1")) for n in net.names[2:])
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 0, 1])
    grads = []
    for forward in (model, net):
        model.zero_grad()
        logits = forward(x)
        nn.functional.cross_entropy(logits, y).backward()
        grads.append((logits.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    (eager, eager_grads), (ours, our_grads) = grads
    assert float((eager - ours).abs().max()) <= FEATURE_TOLERANCE * max(1.0, float(eager.abs().max()))
    for a, b in zip(eager_grads, our_grads):
        assert float((a - b).abs().max()) <= 1e-3 * max(1e-3, float(a.abs().max()))
    assert not _patched(model)  # the session stands in only during the call
    assert frozen_prefix(model, 32, CPU, "torch", tmp_path, 10, channels_last=False) is None


def test_frozen_blocks_that_train_their_statistics_stay_in_pytorch(tmp_path: Path) -> None:
    """--frozen-bn train: the frozen blocks' BatchNorm updates in each step, which a
    forward-only session would not; only the stem's convolution could go, so nothing does."""
    model = _half_frozen(frozen_bn="train")
    net = frozen_prefix(model, 32, CPU, "onnx", tmp_path, 10, channels_last=False)
    assert net is None or all(not isinstance(m, nn.modules.batchnorm._BatchNorm) for m in
                              [dict(model.backbone.named_modules())[n] for n in net.names])


class _Shortcut(nn.Module):
    """A backbone whose first block's output is used again after the second: not a chain."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.body, self.top = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.stem(x)
        return self.top(self.body(a)) + a


def test_a_backbone_that_does_not_run_its_frozen_blocks_as_a_chain_is_refused(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    model = nn.Module()
    model.backbone = _Shortcut()
    model.backbone.stem.requires_grad_(False)
    model.backbone.body.requires_grad_(False)
    with caplog.at_level(logging.WARNING, logger="visiontune"):
        assert frozen_prefix(model, 8, CPU, "onnx", tmp_path, 10, channels_last=False) is None
    assert "does not run them as a chain" in caplog.text
    assert not _patched(model)


def test_a_freeze_k_run_uses_it_and_says_so(tmp_path: Path, tiny: dict, caplog: pytest.LogCaptureFixture) -> None:
    from conftest import make_class_folders

    data = make_class_folders(tmp_path / "data", {"red": 8, "green": 8})
    with caplog.at_level(logging.INFO, logger="visiontune"):
        r = vt.fit(data, **dict(tiny, strategy="freeze-k", engine="onnx", epochs=2, output=str(tmp_path / "r")))
    assert "run forward-only in ONNX Runtime in this phase" in caplog.text
    assert len(r.history) == 2 and all(math.isfinite(row["train_loss"]) for row in r.history)


def _bn_buffers(run_dir: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for k, v in load_file(str(Path(run_dir) / "model.safetensors")).items() if "running_" in k}


@pytest.mark.parametrize("extra", [dict(head_dropout=0.6, trainable_bn="train"), dict(drop_path=0.3)])
def test_validation_through_the_onnx_prefix_is_in_eval_mode_as_with_the_torch_engine(
        tmp_path: Path, tiny: dict, extra: dict, caplog: pytest.LogCaptureFixture) -> None:
    """Issue 34 item 3: the wrapper held the model unregistered, so validation's
    `model.eval()` flipped only the wrapper: dropout, stochastic depth and BatchNorm ran in
    training mode on validation images (random metrics, running statistics moved by
    validation images into the saved weights). Both engines must validate alike."""
    from conftest import make_class_folders

    data = make_class_folders(tmp_path / "data", {"red": 12, "green": 12})
    runs = {}
    for engine in ("onnx", "torch"):
        with caplog.at_level(logging.INFO, logger="visiontune"):
            runs[engine] = vt.fit(data, **dict(tiny, strategy="freeze-k", engine=engine, epochs=2, valid_pct=0.34,
                                               output=str(tmp_path / engine), **extra))
        used = "run forward-only in ONNX Runtime in this phase" in caplog.text
        assert used == (engine == "onnx")  # the comparison is between the two engines
        caplog.clear()
    onnx, torch_ = runs["onnx"], runs["torch"]
    for a, b in zip(onnx.history, torch_.history):
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=2e-3, abs=2e-4), (onnx.history, torch_.history)
    ours, theirs = _bn_buffers(onnx.run_dir), _bn_buffers(torch_.run_dir)
    assert ours.keys() == theirs.keys() and ours
    for name in ours:
        assert torch.allclose(ours[name].float(), theirs[name].float(), rtol=2e-3, atol=2e-4), name


def test_a_one_image_batch_through_the_onnx_prefix_trains_with_running_statistics(tmp_path: Path, tiny: dict) -> None:
    """Issue 34 item 18: 9 training images in batches of 8 leave a batch of one; BatchNorm
    that trains its statistics cannot take batch statistics of one image at the 1x1 maps
    of the last blocks. batch_norm_for found no BatchNorm inside the wrapper (the model was
    not registered), so the step failed with the ONNX prefix where PyTorch's passed."""
    from conftest import make_class_folders

    make_class_folders(tmp_path / "data" / "train", {"red": 5, "green": 4})
    make_class_folders(tmp_path / "data" / "valid", {"red": 3, "green": 3}, 100)
    r = vt.fit(tmp_path / "data", **dict(tiny, strategy="freeze-k", engine="onnx", epochs=1, trainable_bn="train",
                                         output=str(tmp_path / "r")))
    assert len(r.history) == 1 and r.history[0]["train_loss"] > 0
