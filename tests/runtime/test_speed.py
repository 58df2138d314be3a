"""Issue 5 mechanics: micro-batching after out-of-memory, --batch-size auto, precision,
torch.compile fallback, reduced-scale JPEG decoding, the decoded-image cache, single-decode
predict and memory-mapped features. (Speed itself is measured in bench/, not here.)"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import visiontune as vt
from visiontune.config import RunConfig
from visiontune.errors import ConfigError, VisiontuneError
from visiontune.models.classifier import Classifier
from visiontune.runtime.batchsize import MicroBatcher, auto_batch_size, is_oom, largest_fitting
from visiontune.train.plan import set_train_modes


def _trainer(split_data: Path, tiny: dict, **extra):
    from visiontune.data.sources import load_items
    from visiontune.train.setup import prepare_run
    from visiontune.train.trainer import Trainer

    cfg = RunConfig.create(None, path=str(split_data), trainable_bn="eval", augment=False, **{**tiny, **extra})
    source = load_items(cfg.data, cfg.seed)
    setup = prepare_run(cfg, source)
    trainer = Trainer(setup, [])
    trainer.enter_phase(setup.plan.phase_index(1))  # gradual's second phase: every group trains
    return trainer, setup.data


def _one_step(split_data: Path, tiny: dict, micro: int | None, weight: torch.Tensor | None = None):
    """One training step of the trainer on its first batch, whole (`micro` None) or in
    micro-batches of `micro` images: (the batch's targets, its logits before the step under
    the step's criterion, the step's loss, the weights after it)."""
    trainer, data = _trainer(split_data, tiny)
    if weight is not None:  # and a head that favours the first class: the images' losses differ by class
        trainer.criterion = trainer.task.loss(weight)
        with torch.no_grad():
            trainer.model.head[-1].bias.copy_(torch.tensor([2.0, -2.0]))
    x, y, _ = next(iter(data.images().train))
    trainer.model.train()
    set_train_modes(trainer.model, *trainer.cfg.bn_modes())
    with torch.no_grad():
        logits = trainer.model(x)
    trainer.micro.size = micro
    loss = trainer.train_step(trainer.model, x, y)
    return y, logits, loss, {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def test_micro_batches_give_the_whole_batch_step(split_data: Path, tiny: dict) -> None:
    _, _, loss_a, state_a = _one_step(split_data, tiny, None)
    _, _, loss_b, state_b = _one_step(split_data, tiny, 3)
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    for k in state_a:
        torch.testing.assert_close(state_a[k], state_b[k], rtol=1e-4, atol=1e-6)


def test_micro_batch_shares_with_class_weights_add_up_to_the_weighted_mean(split_data: Path, tiny: dict) -> None:
    """With class weights PyTorch's mean divides by the weights of the true classes, not by
    the images: each micro-batch of the trainer's step adds `total(chunk) / norm(whole
    batch)`, so the step's loss is the weighted mean of the whole batch and its weights
    those of one whole-batch step (a mean of the micro-batches' own means is not)."""
    weight = torch.tensor([1.0, 3.0])
    y, logits, whole_loss, whole_state = _one_step(split_data, tiny, None, weight)
    _, _, loss, state = _one_step(split_data, tiny, 3, weight)
    weighted_mean = torch.nn.CrossEntropyLoss(weight=weight)(logits, y).item()  # PyTorch's weighted mean
    means = [torch.nn.CrossEntropyLoss(weight=weight)(lc, yc).item() * len(yc) / len(y)
             for lc, yc in zip(logits.split(3), y.split(3))]
    assert abs(sum(means) - weighted_mean) > 1e-3  # the batch tells the exact shares from the chunks' means
    assert whole_loss == pytest.approx(weighted_mean, rel=1e-4) and loss == pytest.approx(weighted_mean, rel=1e-4)
    for k in whole_state:
        torch.testing.assert_close(state[k], whole_state[k], rtol=1e-4, atol=1e-6)


def test_out_of_memory_halves_the_micro_batch_and_training_goes_on(
        split_data: Path, tiny: dict, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    forward = Classifier.forward

    def small_memory(self: Classifier, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.shape[0] > 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return forward(self, x)

    monkeypatch.setattr(Classifier, "forward", small_memory)
    with caplog.at_level(logging.WARNING):
        r = vt.fit(split_data, **{**tiny, "batch_size": 8, "epochs": 2, "strategy": "finetune"},
                   output=str(split_data.parent / "runs"))
    assert len(r.history) == 2 and np.isfinite(r.history[-1]["train_loss"])
    text = caplog.text
    assert "out of memory in a training step with 8 images at once" in text
    assert "micro-batches of 2" in text and "effective batch 8 and learning rate unchanged" in text


def test_out_of_memory_at_one_image_is_a_clear_error() -> None:
    micro = MicroBatcher()
    micro.shrink(2, "x")
    assert micro.chunks(2) == 1
    with pytest.raises(VisiontuneError, match="even one image at a time"):
        micro.shrink(2, "in a training step")


def test_is_oom() -> None:
    assert is_oom(torch.OutOfMemoryError("CUDA out of memory"))
    assert is_oom(RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"))
    assert not is_oom(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_oom(ValueError("out of memory"))


def test_largest_fitting_doubles_until_it_does_not_fit() -> None:
    assert largest_fitting(lambda b: b <= 40, 1024) == 32
    assert largest_fitting(lambda b: b <= 40, 16) == 16
    assert largest_fitting(lambda b: False, 16) == 0


def test_cpu_batch_size_extrapolates_measured_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """Steps of 2 and 4 images that cost 120 and 140 MiB: 100 MiB fixed + 10 MiB per image;
    half of 1 GiB available is 512 MiB -> 41 images fit -> the power of two below: 32."""
    from visiontune.runtime import batchsize

    mib = 2**20
    monkeypatch.setattr(batchsize, "step_memory", lambda model, b, *a: (100 + 10 * b) * mib)
    monkeypatch.setattr(batchsize, "available_memory", lambda: 1024 * mib)
    assert auto_batch_size(torch.nn.Linear(1, 1), 32, 100_000, torch.device("cpu")) == 32
    monkeypatch.setattr(batchsize, "available_memory", lambda: 4096 * mib)  # 2 GiB budget: 192 -> 128
    assert auto_batch_size(torch.nn.Linear(1, 1), 32, 100_000, torch.device("cpu")) == 128


def test_auto_batch_size_on_cpu_measures_and_caps(tiny: dict) -> None:
    from visiontune.config import ModelConfig
    from visiontune.models.classifier import create_classifier

    model, pre = create_classifier(ModelConfig(backbone=tiny["backbone"], weights="none", image_size=32), 2)
    flags = [p.requires_grad for p in model.parameters()]
    bn = [m.running_mean.clone() for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert auto_batch_size(model, 32, 20, torch.device("cpu")) == 2  # 20 images / 8 steps -> 2
    assert auto_batch_size(model, 32, 100_000, torch.device("cpu")) == 256  # a tiny model fits the cap
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    after = [m.running_mean for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(torch.equal(a, b) for a, b in zip(bn, after))  # probe steps leave BatchNorm statistics alone


def test_fit_with_batch_size_auto_records_the_size(split_data: Path, tiny: dict) -> None:
    r = vt.fit(split_data, **{**tiny, "batch_size": "auto", "epochs": 2}, output=str(split_data.parent / "runs"))
    saved = yaml.safe_load((Path(r.run_dir) / "config.yaml").read_text())["train"]["batch_size"]
    assert saved == 2  # 20 training images: 8 steps per epoch at most 2 images each


def test_batch_size_validation() -> None:
    from visiontune.cli import build_parser

    assert build_parser().parse_args(["train", "d", "--batch-size", "auto"]).batch_size == "auto"
    assert build_parser().parse_args(["train", "d", "--batch-size", "16"]).batch_size == 16
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "d", "--batch-size", "0"])
    with pytest.raises(ConfigError, match="'auto'"):
        RunConfig.create(None, batch_size="big")
    with pytest.raises(ConfigError, match="precision"):
        RunConfig.create(None, precision="fp8")


def test_precision_auto_is_fp32_on_cpu_and_bf16_trains(split_data: Path, tiny: dict) -> None:
    from visiontune.runtime.device import autocast, resolve_precision

    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == "fp32"
    with autocast(cpu, "bf16"):
        assert torch.nn.Linear(4, 4)(torch.randn(2, 4)).dtype == torch.bfloat16
    r = vt.fit(split_data, **{**tiny, "epochs": 2, "precision": "bf16"}, output=str(split_data.parent / "runs"))
    assert np.isfinite(r.metrics["val_loss"])


def test_compile_failure_falls_back_to_eager(split_data: Path, tiny: dict, monkeypatch: pytest.MonkeyPatch,
                                             caplog: pytest.LogCaptureFixture) -> None:
    class Broken(torch.nn.Module):  # like torch.compile's OptimizedModule: no len(), so no `or` on it
        def __len__(self) -> int:
            raise TypeError("Classifier does not support len()")

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("InductorError: no working C++ compiler")

    monkeypatch.setattr(torch, "compile", lambda model, **kw: Broken())
    with caplog.at_level(logging.WARNING):
        r = vt.fit(split_data, **{**tiny, "epochs": 2, "strategy": "finetune", "compile": True},
                   output=str(split_data.parent / "runs"))
    assert "torch.compile failed" in caplog.text and "no working C++ compiler" in caplog.text
    assert np.isfinite(r.metrics["val_loss"])


def _photo(path: Path, size: tuple[int, int]) -> Path:
    rng = np.random.default_rng(0)
    coarse = Image.fromarray(rng.integers(0, 255, (size[1] // 20 + 1, size[0] // 20 + 1, 3), dtype=np.uint8))
    path.parent.mkdir(parents=True, exist_ok=True)
    coarse.resize(size, Image.BICUBIC).save(path, quality=92)
    return path


def test_jpeg_decoded_at_reduced_scale(tmp_path: Path) -> None:
    from visiontune.data.images import load_rgb

    p = _photo(tmp_path / "big.jpg", (800, 600))
    assert load_rgb(p).size == (800, 600)
    assert load_rgb(p, min_side=100).size == (200, 150)  # 1/4 scale: both sides still >= 100
    assert load_rgb(p, min_side=300).size == (400, 300)
    png = tmp_path / "big.png"
    Image.open(p).save(png)
    assert load_rgb(png, min_side=100).size == (800, 600)  # only JPEG has DCT scaling


def test_decoded_image_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from visiontune.data import loaders
    from visiontune.data.preprocess import Preprocess

    big = _photo(tmp_path / "d" / "big.jpg", (400, 300))
    small = _photo(tmp_path / "d" / "small.jpg", (60, 50))
    pre = Preprocess(32, (0.5,) * 3, (0.5,) * 3)
    cache_dir = tmp_path / "cache"
    plain = loaders.train_dataset([str(big), str(small)], [0, 1], pre, False, 0.0, 1.0, False, str(cache_dir))
    cached = loaders.train_dataset([str(big), str(small)], [0, 1], pre, False, 0.0, 1.0, True, str(cache_dir))
    first = [cached[i][0] for i in range(2)]
    entries = list((cache_dir / "images").rglob("*.npy"))
    assert len(entries) == 1  # only the image larger than 2 x 32 px is kept
    assert np.load(entries[0]).shape == (64, 85, 3)
    for i in range(2):
        torch.testing.assert_close(plain[i][0], first[i])  # same pixels with and without the cache

    decoded: list[str] = []
    real = loaders.load_rgb
    monkeypatch.setattr(loaders, "load_rgb", lambda path, *a, **k: decoded.append(str(path)) or real(path, *a, **k))
    torch.testing.assert_close(cached[0][0], first[0])
    assert decoded == []  # read from the cache, not decoded
    _photo(big, (300, 400))  # the file changes: decoded again
    os.utime(big, ns=(1, 1))
    assert cached[0][0].shape == first[0].shape and decoded == [str(big)]


def test_predict_decodes_each_file_once(split_data: Path, tiny: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    from visiontune.data import loaders
    from visiontune.data import sources as data

    r = vt.fit(split_data, **{**tiny, "epochs": 2}, output=str(split_data.parent / "runs"))
    folder = split_data / "test"
    (folder / "red" / "broken.jpg").write_bytes(b"not a jpeg at all")
    opened: list[str] = []
    real = loaders.load_rgb
    monkeypatch.setattr(loaders, "load_rgb", lambda path, *a, **k: opened.append(str(path)) or real(path, *a, **k))
    monkeypatch.setattr(data, "scan", None)  # no checking pass before reading
    preds, skipped = vt.predict(r.run_dir, folder, num_workers=0)
    assert len(preds) == 6 and len(opened) == 7
    assert [Path(p).name for p, _ in skipped] == ["broken.jpg"] and "cannot" in skipped[0][1]
    assert all(Path(p.path).name != "broken.jpg" for p in preds)


def test_features_memory_mapped(tmp_path: Path, tiny: dict) -> None:
    from conftest import make_class_folders
    from visiontune.config import ModelConfig
    from visiontune.frozen.features import FeatureExtractor
    from visiontune.models.classifier import create_classifier

    root = make_class_folders(tmp_path / "d", {"red": 3, "green": 2})
    paths = sorted(str(p) for p in root.rglob("*.png"))
    model, pre = create_classifier(ModelConfig(backbone=tiny["backbone"], weights="none", image_size=32), 2)
    extractor = FeatureExtractor(model.backbone, pre, torch.device("cpu"), None, 2, 0)
    in_ram, _ = extractor.extract(paths)
    mapped, _ = extractor.extract(paths, memmap_dir=tmp_path / "maps")
    torch.testing.assert_close(mapped, in_ram)
    assert list((tmp_path / "maps").iterdir()) == []  # unlinked at once: nothing to clean up


def test_worker_defaults_follow_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    from visiontune.data import loaders
    from visiontune.data.loaders import default_num_workers

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for cores, on_cpu, on_gpu in ((1, 0, 0), (2, 0, 1), (4, 0, 3), (16, 2, 15), (64, 4, 16)):
        monkeypatch.setattr(loaders, "usable_cpus", lambda c=cores: c)  # the machine (tests/test_cpus.py: for real)
        assert (default_num_workers(cpu), default_num_workers(cuda)) == (on_cpu, on_gpu)


def test_torn_image_cache_entry_is_decoded_again(tmp_path: Path) -> None:
    from visiontune.data.loaders import DecodedCache

    big = _photo(tmp_path / "big.jpg", (400, 300))
    cache = DecodedCache(tmp_path / "cache", 64)
    first = np.asarray(cache.load(str(big)))
    (entry,) = list((tmp_path / "cache").rglob("*.npy"))
    entry.write_bytes(entry.read_bytes()[:100])  # a crash mid-write of an older version
    np.testing.assert_array_equal(np.asarray(cache.load(str(big))), first)
    assert np.load(entry).shape == first.shape  # rewritten whole


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_fused_eval_transform_matches_torchvision(interpolation: str) -> None:
    from torchvision.transforms import v2 as T

    from visiontune.data.preprocess import Preprocess
    from visiontune.data.transforms import eval_transform, interpolation_mode

    rng = np.random.default_rng(0)
    pre = Preprocess(48, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), interpolation, 0.875)
    reference = T.Compose([T.Resize(55, interpolation=interpolation_mode(interpolation), antialias=True),
                           T.CenterCrop(48), T.ToImage(), T.ToDtype(torch.float32, scale=True),
                           T.Normalize(list(pre.mean), list(pre.std))])
    std = torch.tensor(pre.std).view(3, 1, 1)
    for w, h in ((400, 300), (300, 400), (55, 55), (30, 20), (999, 101)):  # wide, tall, exact, padded, odd
        coarse = Image.fromarray(rng.integers(0, 255, (h // 5 + 1, w // 5 + 1, 3), dtype=np.uint8))
        image = coarse.resize((w, h), Image.BICUBIC)
        ours, theirs = eval_transform(pre)(image), reference(image)
        assert ours.shape == theirs.shape == (3, 48, 48)
        assert ((ours - theirs).abs() * std * 255).max() <= 2.0 + 1e-3  # grey levels: rounding only


def test_evaluate_decodes_each_file_once_and_reports_the_broken(split_data: Path, tiny: dict,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from visiontune.data import loaders

    r = vt.fit(split_data, **{**tiny, "epochs": 2}, output=str(split_data.parent / "runs"))
    clean = vt.evaluate(r.run_dir, split_data / "test", num_workers=0)
    (split_data / "test" / "green" / "broken.png").write_bytes(b"\x89PNG truncated")
    opened: list[str] = []
    real = loaders.load_rgb
    monkeypatch.setattr(loaders, "load_rgb", lambda path, *a, **k: opened.append(str(path)) or real(path, *a, **k))
    result = vt.evaluate(r.run_dir, split_data / "test", num_workers=0)
    assert len(opened) == 7 and len(result.paths) == 6
    assert [Path(p).name for p, _ in result.excluded] == ["broken.png"]
    assert result.metrics["loss"] == pytest.approx(clean.metrics["loss"], rel=1e-5)  # the broken file is not scored
    assert result.metrics["accuracy"] == clean.metrics["accuracy"]
