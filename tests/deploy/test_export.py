"""ONNX / TorchScript export: metadata inside, parity with eager, predict from the file."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch

import visiontune as vt
from conftest import COLORS, TINY, StopAfter, make_class_folders
from visiontune.cli import main
from visiontune.deploy.export import export, load_exported
from visiontune.runtime.device import available_devices
from visiontune.runtime.engine import onnx_providers


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("export")
    data = make_class_folders(root / "data", {"red": 8, "green": 8})
    result = vt.fit(data, **dict(TINY, strategy="feature-extract", epochs=3, lr=1e-2, output=str(root / "runs")))
    return Path(result.run_dir), data


@pytest.mark.parametrize("fmt,suffix", [("onnx", ".onnx"), ("pt2", ".pt2"), ("torchscript", ".ts")])
def test_export_carries_labels_and_preprocessing_and_matches_eager(run, fmt: str, suffix: str) -> None:
    run_dir, data = run
    result = export(run_dir, fmt)
    assert result.path.endswith(suffix) and result.max_abs_diff < 1e-4
    loaded = load_exported(result.path)
    assert loaded.classes == json.loads((run_dir / "classes.json").read_text())
    assert loaded.preprocess.input_size == 32
    eager, _ = vt.predict(run_dir, data, engine="torch")
    exported, _ = vt.predict(result.path, data)
    assert [p.label for p in exported] == [p.label for p in eager]
    assert max(abs(a.prob - b.prob) for a, b in zip(exported, eager)) < 1e-4


@pytest.mark.parametrize("fmt,suffix", [("onnx", ".onnx"), ("pt2", ".pt2"), ("torchscript", ".ts")])
def test_predicting_from_an_export_honours_device(run, tmp_path: Path, fmt: str, suffix: str,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """--device reaches the engine of an exported file: the ONNX session's provider, the
    program's parameters; a device absent here is refused (before: run on the CPU)."""
    run_dir, data = run
    path = export(run_dir, fmt, tmp_path / f"m{suffix}").path
    loaded = load_exported(path, device=torch.device("cpu"))
    if fmt == "onnx":
        assert loaded.model.session.get_providers() == ["CPUExecutionProvider"]
    else:
        assert {t.device.type for t in loaded.model.program.parameters()} == {"cpu"}
    preds, _ = vt.predict(path, data, device="cpu")
    assert len(preds) == 16
    here = available_devices()
    absent = "mps" if "mps" not in here else "cuda" if not any(d.startswith("cuda") for d in here) else None
    if absent is None:
        pytest.skip("both mps and cuda are here")
    with pytest.raises(vt.ConfigError, match=f"--device {absent}"):
        vt.predict(path, data, device=absent)
    assert main(["predict", path, str(data), "--device", absent]) == 2
    assert f"--device {absent}" in capsys.readouterr().err


def test_onnx_on_cuda_needs_the_cuda_provider() -> None:
    """Where onnxruntime has no CUDA provider (the CPU package), cuda is refused with the
    fix; where it has one, cuda:N gets that GPU, then the CPU for what CUDA lacks."""
    with pytest.raises(vt.ConfigError, match="this onnxruntime runs on CPUExecutionProvider only; install "
                                             "onnxruntime-gpu"):
        onnx_providers(torch.device("cuda"), ["CPUExecutionProvider"])
    assert onnx_providers(torch.device("cuda:1"), ["CUDAExecutionProvider", "CPUExecutionProvider"]) == [
        ("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"]
    with pytest.raises(vt.ConfigError, match="--device mps: .* or the .pt2 export"):
        onnx_providers(torch.device("mps"), ["CoreMLExecutionProvider", "CPUExecutionProvider"])


def test_cli_export_prints_the_parity_check(run, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir, _ = run
    assert main(["export", str(run_dir), "--format", "onnx", "--output", str(tmp_path / "m.onnx")]) == 0
    out = capsys.readouterr().out
    assert "max |eager - exported|" in out and (tmp_path / "m.onnx").is_file()


def test_a_foreign_onnx_file_is_a_clear_error(tmp_path: Path) -> None:
    import torch

    torch.onnx.export(torch.nn.Linear(3, 2).eval(), (torch.randn(1, 3),), str(tmp_path / "x.onnx"), verbose=False)
    with pytest.raises(vt.VisiontuneError, match="no visiontune metadata"):
        load_exported(tmp_path / "x.onnx")


def _engine_of(run_dir: Path, engine: str, images: int) -> str:
    from visiontune.prediction import _predictor

    _, bundle, _ = _predictor(run_dir, "cpu", engine, images)
    return "onnx" if type(bundle.model).__name__ == "OnnxModule" else "torch"


def test_predict_engine_onnx_exports_once_matches_torch_and_auto_reuses_only_a_current_export(
        run, tmp_path: Path) -> None:
    import os
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(run[0], run_dir)
    (run_dir / "model.onnx").unlink(missing_ok=True)
    data = run[1]
    assert _engine_of(run_dir, "auto", 10) == "torch"  # few images, no export yet: not worth exporting
    assert _engine_of(run_dir, "auto", 5000) == "onnx" and (run_dir / "model.onnx").is_file()  # exported once
    by_onnx, _ = vt.predict(run_dir, data, engine="onnx")
    by_torch, _ = vt.predict(run_dir, data, engine="torch")
    assert [p.label for p in by_onnx] == [p.label for p in by_torch]
    assert max(abs(a.prob - b.prob) for a, b in zip(by_onnx, by_torch)) < 1e-4
    assert _engine_of(run_dir, "auto", 10) == "onnx"  # a current export is used whatever the count
    weights = run_dir / "model.safetensors"
    before = (run_dir / "model.onnx").stat().st_mtime_ns
    _other_weights(weights)  # the weights changed after the export (resume, retrain), their time set back
    os.utime(weights, ns=(before - 10**10, before - 10**10))
    assert _engine_of(run_dir, "auto", 10) == "torch"
    with pytest.raises(vt.ConfigError, match="engine 'tpu' unknown"):
        _engine_of(run_dir, "tpu", 10)


def _other_weights(path: Path) -> None:
    """Rewrite a model file with different head weights, its metadata kept."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
    tensors = load_file(str(path))
    for k in tensors:
        if k.startswith("head") and tensors[k].is_floating_point():
            tensors[k] = -2 * tensors[k]  # other predictions, not just other bytes
    save_file(tensors, str(path), metadata=meta)


def test_predict_from_another_weights_file_never_runs_the_runs_own_onnx_export(run, tmp_path: Path) -> None:
    import shutil

    run_dir, data = tmp_path / "run", run[1]
    shutil.copytree(run[0], run_dir)
    export(run_dir, "onnx")  # model.onnx of model.safetensors
    other = run_dir / "other.safetensors"
    shutil.copy(run_dir / "model.safetensors", other)
    _other_weights(other)
    by_torch, _ = vt.predict(other, data, engine="torch")
    by_onnx, _ = vt.predict(other, data, engine="onnx")
    assert max(abs(a.probs[c] - b.probs[c]) for a, b in zip(by_onnx, by_torch) for c in a.probs) < 1e-4
    assert (run_dir / "other.onnx").is_file() and _engine_of(other, "auto", 10) == "onnx"
    own, _ = vt.predict(run_dir, data, engine="onnx")
    assert max(abs(a.probs[c] - b.probs[c]) for a, b in zip(own, by_torch) for c in a.probs) > 1e-3


def test_onnx_and_pt2_exports_emit_no_deprecation_warnings(run, tmp_path: Path) -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        warnings.simplefilter("error", FutureWarning)
        for fmt, suffix in (("onnx", ".onnx"), ("pt2", ".pt2"), ("torchscript", ".ts")):
            load_exported(export(run[0], fmt, tmp_path / f"m{suffix}").path)


def test_pt2_loads_with_torch_alone(run, tmp_path: Path) -> None:
    import torch

    path = export(run[0], "pt2", tmp_path / "model.pt2").path
    extra = {"visiontune.json": ""}
    program = torch.export.load(path, extra_files=extra)
    assert json.loads(extra["visiontune.json"])["backbone"] == "timm:test_efficientnet"
    probs, ood_score = program.module()(torch.randn(5, 3, 32, 32))  # a run with a bank: the OOD score second
    assert probs.shape == (5, 2) and ood_score.shape == (5,)  # any batch size


def test_timm_folder_loads_in_timm_offline_with_the_fine_tuned_head(run, tmp_path: Path) -> None:
    import timm
    import torch

    from visiontune.bundle import load_bundle

    run_dir, _ = run
    assert main(["export", str(run_dir), "--format", "timm", "--output", str(tmp_path / "hub")]) == 0
    config = json.loads((tmp_path / "hub" / "config.json").read_text())
    assert config["architecture"] == "test_efficientnet" and config["num_classes"] == 2
    assert config["label_names"] == json.loads((run_dir / "classes.json").read_text())
    assert config["pretrained_cfg"]["input_size"] == [3, 32, 32]
    assert (tmp_path / "hub" / "model.safetensors").is_file()
    model = timm.create_model(f"local-dir:{tmp_path / 'hub'}", pretrained=True).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.inference_mode():
        assert torch.allclose(model(x), load_bundle(run_dir).model.eval()(x), atol=1e-5)
    # and visiontune starts from it: the fine-tuned backbone, not ImageNet or random weights
    r = vt.fit(run[1], **dict(TINY, strategy="feature-extract", epochs=1, weights=f"local-dir:{tmp_path / 'hub'}",
                              output=str(tmp_path / "again")))
    again = load_bundle(r.run_dir).model.backbone.state_dict()
    for key, value in model.state_dict().items():
        if key in again:
            assert torch.equal(value, again[key]), key


def test_the_timm_folder_carries_a_model_card_of_the_run(run, tmp_path: Path) -> None:
    from huggingface_hub import ModelCard

    run_dir, _ = run
    assert main(["export", str(run_dir), "--format", "timm", "--output", str(tmp_path / "hub")]) == 0
    card = ModelCard.load(tmp_path / "hub" / "README.md")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert card.data.library_name == "timm" and "image-classification" in card.data.tags
    text = card.text
    assert "single-label" in text and "green, red" in text or "red, green" in text
    assert "13 train images" in text and "3 valid images" in text  # 16 images, valid_pct 0.2 (stratified)
    assert f"accuracy {metrics['accuracy']:.4f}" in text and "timm:test_efficientnet" in text
    assert "feature-extract" in text and "Intended use and limits" in text and vt.__version__ in text


def test_timm_format_refuses_what_timm_cannot_hold(tmp_path: Path) -> None:
    data = make_class_folders(tmp_path / "data", {"red": 6, "green": 6})
    r = vt.fit(data, **dict(TINY, strategy="feature-extract", epochs=1, head_hidden=8, output=str(tmp_path / "r")))
    with pytest.raises(vt.ConfigError, match="needs a linear head"):
        export(r.run_dir, "timm", tmp_path / "hub")
    with pytest.raises(vt.ConfigError, match="has no config.json"):
        vt.fit(data, **dict(TINY, strategy="feature-extract", epochs=1, weights=f"local-dir:{tmp_path}",
                            output=str(tmp_path / "r2")))


def test_push_and_hf_hub_weights_fail_fast_offline(run, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import time

    started = time.perf_counter()
    assert main(["push", str(run[0]), "someone/model"]) != 0
    err = capsys.readouterr().err
    assert "huggingface.co is not reachable" in err and "  hf upload someone/model model-dir" in err
    with pytest.raises(vt.WeightsUnavailableError, match="--weights local-dir:"):
        vt.fit(run[1], **dict(TINY, strategy="feature-extract", epochs=1, weights="hf-hub:someone/model",
                              output=str(tmp_path / "r")))
    assert time.perf_counter() - started < 30
    assert not (run[0] / "timm").exists()  # nothing written before failing


def test_the_hub_commands_we_name_exist_in_the_installed_huggingface_hub() -> None:
    """`hf auth login` (push's --help, ship.md) and `hf upload` (push's offline message): run
    for real through the installed huggingface_hub's own `hf` entry point."""
    (script,) = entry_points(group="console_scripts", name="hf")
    call = f"import sys; from {script.module} import {script.attr} as main; sys.argv[0] = 'hf'; sys.exit(main())"
    for argv in (["auth", "login", "--help"], ["upload", "--help"]):
        done = subprocess.run([sys.executable, "-c", call, *argv], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and "Usage: hf " + argv[0] in done.stdout, (argv, done.stdout, done.stderr)
    sources = [Path(__file__).parents[2] / name for name in ("src/visiontune/cli.py", "src/visiontune/deploy/hub.py",
                                                              "docs/guides/ship.md", "README.md")]
    assert not [s for s in sources if "huggingface-cli" in s.read_text(encoding="utf-8")]


def test_a_hub_folder_with_pickle_weights_only_is_refused_unless_trusted(
        run, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """timm would unpickle pytorch_model.bin (older timm with weights_only=False): a pickle
    can run code, so such a folder needs --trust-pickle; then it loads the same weights."""
    import torch
    from safetensors.torch import load_file

    from visiontune.bundle import load_bundle

    run_dir, data = run
    hub = tmp_path / "hub"
    export(run_dir, "timm", hub)
    torch.save(load_file(str(hub / "model.safetensors")), hub / "pytorch_model.bin")
    (hub / "model.safetensors").unlink()
    kw = dict(TINY, strategy="feature-extract", epochs=1, weights=f"local-dir:{hub}")
    with pytest.raises(vt.ConfigError, match=r"pickle weights only \(pytorch_model.bin\).*--trust-pickle"):
        vt.fit(data, **kw, output=str(tmp_path / "refused"))
    assert not list(tmp_path.glob("refused/*/model.safetensors"))
    trusted = vt.fit(data, **kw, trust_pickle=True, output=str(tmp_path / "trusted"))
    body, fine_tuned = load_bundle(trusted.run_dir).model.backbone.state_dict(), load_bundle(run_dir).model.backbone
    assert all(torch.equal(v, body[k]) for k, v in fine_tuned.state_dict().items())  # the folder's weights
    assert main(["train", str(data), "--weights", f"local-dir:{hub}", "--backbone", "timm:test_efficientnet",
                 "--image-size", "32", "--strategy", "feature-extract", "--output", str(tmp_path / "cli")]) == 2
    assert "--trust-pickle" in capsys.readouterr().err


def test_int8_export_is_checked_on_validation_runs_in_predict_and_is_refused_past_max_drop(
        run, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--int8: ONNX Runtime's static quantisation calibrated on the run's validation
    images; the file carries the metadata and predict runs it; the validation score is
    reported against fp32; a drop past --max-drop writes nothing and keeps fp32."""
    import onnx

    from visiontune.deploy.quantize import Int8Refused, export_int8

    run_dir, data = run
    fp32 = tmp_path / "m.onnx"
    assert main(["export", str(run_dir), "--format", "onnx", "--output", str(fp32), "--int8",
                 "--max-drop", "100"]) == 0
    out = capsys.readouterr().out
    int8 = tmp_path / "m.int8.onnx"
    assert "static int8:" in out and f"int8 (static): {int8}" in out and "validation accuracy on 3 images" in out
    meta = {m.key: m.value for m in onnx.load(str(int8)).metadata_props}
    assert meta["quantization"].startswith("int8 static") and json.loads(meta["classes"]) == ["green", "red"]
    ops = {n.op_type for n in onnx.load(str(int8)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    eager, _ = vt.predict(run_dir, data, engine="torch")
    quantized, _ = vt.predict(int8, data, engine="onnx")
    assert [p.path for p in quantized] == [p.path for p in eager]
    assert sum(a.label == b.label for a, b in zip(quantized, eager)) >= 0.75 * len(eager)

    # 3 validation images: too few to hold some out of the calibration, and the output says so
    assert "static int8 calibrated on 3 of these images" in out and "may look smaller than on new images" in out

    # the int8 file of these weights is still there: a refusal must not leave it beside the new fp32 export
    with pytest.raises(Int8Refused, match=r"(?s)static int8: .*dynamic int8: .*refused.*m.onnx is kept.*"
                                          r"the earlier int8 file .*m.int8.onnx was removed"):
        export_int8(run_dir, "onnx", fp32, max_drop=-101)  # asks int8 to beat fp32 by 101 points: none can
    assert fp32.is_file() and not int8.exists()
    with pytest.raises(vt.ConfigError, match="--int8 quantises ONNX models; use --format onnx"):
        export_int8(run_dir, "pt2", tmp_path / "m.pt2")
    assert not (tmp_path / "m.pt2").exists()


def test_an_int8_file_of_weights_since_resumed_is_refused_by_predict_and_removed_by_the_next_export(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """model.int8.onnx carries the digest of the weights it was quantised from: after a
    resume changed RUN/model.safetensors, predicting with it (or with the old model.onnx)
    is refused, saying how to re-export, and a re-export whose int8 is refused leaves no
    int8 file of the old weights beside the new fp32 one."""
    from visiontune.deploy.quantize import Int8Refused, export_int8
    from visiontune.files import file_digest

    data = make_class_folders(tmp_path / "data", {"red": 8, "green": 8})
    kw = dict(TINY, strategy="finetune", epochs=3, lr=1e-2, output=str(tmp_path / "runs"))
    run_dir = Path(vt.fit(data, **kw, callbacks=[StopAfter(1)]).run_dir)
    int8 = run_dir / "model.int8.onnx"
    assert export_int8(run_dir, max_drop=100).int8.path == str(int8)
    assert len(vt.predict(int8, data)[0]) == 16  # of these weights: it runs
    before = file_digest(run_dir / "model.safetensors")
    vt.fit(resume=run_dir)
    assert file_digest(run_dir / "model.safetensors") != before  # the resume wrote other weights
    with pytest.raises(vt.VisiontuneError, match=r"model.int8.onnx was exported from other weights than .*"
                                                  r"model.safetensors.*Re-export it: visiontune export .* --format "
                                                  r"onnx --int8$"):
        vt.predict(int8, data)
    with pytest.raises(vt.VisiontuneError, match=r"model.onnx was exported from other weights.*--format onnx$"):
        vt.predict(run_dir / "model.onnx", data)
    assert main(["predict", str(int8), str(data)]) == 2
    assert "exported from other weights" in capsys.readouterr().err
    with pytest.raises(Int8Refused):
        export_int8(run_dir, max_drop=-101)
    assert not int8.exists() and (run_dir / "model.onnx").is_file()
    assert len(vt.predict(run_dir / "model.onnx", data)[0]) == 16  # the new fp32 export: current


def test_int8_calibrates_on_a_stratified_sample_held_out_of_the_scoring_and_refuses_unreadable_images(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """splits.csv lists the validation images class by class: the calibration must still see
    every class; with 2 x --calibration validation images or more, the drop is scored on the
    others; an image that cannot be read is an error, never a blank calibration image."""
    import numpy as np
    import onnxruntime.quantization as ortq

    from visiontune.deploy.quantize import export_int8, quantize

    data = make_class_folders(tmp_path / "data", {"red": 12, "green": 12, "blue": 12})
    run_dir = Path(vt.fit(data, **dict(TINY, strategy="feature-extract", epochs=1, valid_pct=0.5,
                                       output=str(tmp_path / "runs"))).run_dir)
    seen: list[np.ndarray] = []
    real = ortq.quantize_static

    def recording(model_input, model_output, reader, **kw):  # ONNX Runtime's, not ours: what it calibrates on
        batches = list(iter(reader.get_next, None))
        seen.extend(image for b in batches for image in next(iter(b.values())))
        again = iter(batches)

        class Again(ortq.CalibrationDataReader):
            def get_next(self):
                return next(again, None)

        return real(model_input, model_output, Again(), **kw)

    monkeypatch.setattr(ortq, "quantize_static", recording)
    exported = export_int8(run_dir, max_drop=100, calibration=6)
    result, result_path = exported.int8, exported.path
    colour = {0: "red", 1: "green", 2: "blue"}  # each image's strongest channel tells its class
    assert {colour[int(np.argmax(image.mean(axis=(1, 2))))] for image in seen} == set(COLORS) - {"grey"}
    assert len(seen) == result.calibration and 6 <= result.calibration <= 7
    assert result.held_out and result.images + result.calibration == 18  # 18 validation images
    assert any("calibrated on" in line and "other validation images" in line for line in result.lines())

    with open(run_dir / "splits.csv", newline="") as fh:
        import csv

        broken = next(row["path"] for row in csv.DictReader(fh) if row["split"] == "valid")
    Path(broken).write_bytes(Path(broken).read_bytes()[:60])  # truncated: it cannot be decoded
    with pytest.raises(vt.VisiontuneError, match=r"int8: 1 of the 18 validation images that calibrate cannot be "
                                                  r"read, e.g. .*splits.csv"):
        quantize(result_path, run_dir, max_drop=100)  # the check export_int8 reaches after its fp32 export


@pytest.mark.parametrize("target_range", [None, (10.0, 90.0)])
def test_a_regression_exported_for_timm_gives_predicts_numbers_as_its_config_says(
        tmp_path: Path, target_range: tuple[float, float] | None) -> None:
    """The timm folder of a regression run, loaded by timm alone and fed by timm's own
    transform from its pretrained_cfg: its outputs are the numbers in real units (the
    scaling folded into the classifier), or, with --target-range, the config.json says
    exactly what to apply (the sigmoid onto the range); either way `predict`'s numbers."""
    import csv

    import numpy as np
    import timm
    import torch
    from PIL import Image

    data, rng = tmp_path / "data", np.random.default_rng(0)
    rows = [["path", "age"]]
    for i in range(24):
        value = 20.0 + 60.0 * i / 23  # brightness grows with the target
        arr = np.clip(np.full((40, 40, 3), 30 + 2.5 * value) + rng.normal(0, 6, (40, 40, 3)), 0, 255)
        (data / "images").mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr.astype(np.uint8)).save(data / "images" / f"img_{i:02d}.png")
        rows.append([f"images/img_{i:02d}.png", f"{value:.3f}"])
    with open(data / "targets.csv", "w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    run = vt.fit(data, **dict(TINY, strategy="feature-extract", epochs=1, csv=str(data / "targets.csv"),
                              task="regression", target_range=target_range, output=str(tmp_path / "runs")))
    export(run.run_dir, "timm", tmp_path / "hub")
    described = json.loads((tmp_path / "hub" / "config.json").read_text())["visiontune"]

    model = timm.create_model(f"local-dir:{tmp_path / 'hub'}", pretrained=True).eval()
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    images = sorted((data / "images").glob("*.png"))
    with torch.inference_mode():
        out = model(torch.stack([transform(Image.open(p).convert("RGB")) for p in images]))[:, 0].double()
    if target_range is None:
        numbers = out
    else:
        low, high = described["target_range"]
        numbers = low + (high - low) * torch.sigmoid(out)
    predicted = {p.path: p.value for p in vt.predict(run.run_dir, [str(p) for p in images], engine="torch")[0]}
    expected = np.array([predicted[str(p)] for p in images])
    assert np.ptp(expected) > 1.0  # the numbers differ from image to image: the comparison means something
    assert numbers.numpy() == pytest.approx(expected, abs=0.05 * np.ptp(expected))
    assert described["outputs"] == ("the prediction in real units" if target_range is None else
                                    "z: the prediction is low + (high - low) * sigmoid(z), [low, high] = target_range")


def test_int8_says_how_to_get_a_hugging_face_datasets_images_back_and_checks_calibration_first(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Audit of issue 34: after `cache clear --only datasets` the int8 export of a run trained
    on a Hugging Face dataset said to put the images back where splits.csv says (they are
    the cache's); and --calibration 0 was refused only after model.onnx was rewritten."""
    import shutil

    datasets = pytest.importorskip("datasets")
    from conftest import make_image
    from visiontune.caches import cache_root
    from visiontune.deploy.quantize import export_int8

    paths = [str(make_image(tmp_path / "src" / f"{c}{i}.png", COLORS[c], seed=i)) for c in ("red", "green")
             for i in range(6)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["green", "red"])})
    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(
        {"image": paths, "label": [p.split("/")[-1][:-5] for p in paths]}, features=features)}).save_to_disk(str(saved))
    run_dir = Path(vt.fit(str(saved), **dict(TINY, strategy="feature-extract", epochs=1, valid_pct=0.5,
                                             output=str(tmp_path / "runs"))).run_dir)
    export(run_dir, "onnx")
    before = (run_dir / "model.onnx").stat().st_mtime_ns
    with pytest.raises(vt.ConfigError, match="--calibration 0"):
        export_int8(run_dir, calibration=0)
    assert (run_dir / "model.onnx").stat().st_mtime_ns == before  # refused before the fp32 export
    shutil.rmtree(cache_root() / "datasets")  # what `visiontune cache clear --only datasets` does
    with pytest.raises(vt.VisiontuneError, match=r"images of the Hugging Face dataset .* writes them again, e\.g\. "
                                                  r"`visiontune evaluate "):
        export_int8(run_dir, max_drop=100)


def test_int8_keeps_the_output_mapping_in_float(run, tmp_path: Path) -> None:
    """The exported graph ends in its head and (calibrated) output mapping: linear layer,
    scale, bias and softmax. Quantising that tail too rounded every probability to a multiple of 1/255 (a class's
    0.001 became 0, rows summed to 0.992): the probabilities, and the prediction sets cut on
    their sums, were damaged. The tail stays fp32; the layers before it are int8."""
    import numpy as np
    import onnx

    from visiontune.deploy.quantize import export_int8

    run_dir, data = run
    export_int8(run_dir, "onnx", tmp_path / "m.onnx", max_drop=100)
    graph = onnx.load(str(tmp_path / "m.int8.onnx")).graph
    last = next(n for n in graph.node if graph.output[0].name in n.output)
    assert last.op_type == "Softmax" and "QuantizeLinear" in {n.op_type for n in graph.node}
    head = [n for n in graph.node if n.op_type == "Gemm"][-1]
    assert {n.op_type for n in graph.node if set(head.output) & set(n.input)} == {"Mul"}  # the logits, fp32
    quantized, _ = vt.predict(tmp_path / "m.int8.onnx", data, engine="onnx", top_k=2)
    sums = np.array([sum(p.probs.values()) for p in quantized])
    assert np.abs(sums - 1).max() < 1e-5
    assert min(v for p in quantized for v in p.probs.values()) > 0  # under 1/510, a quantised one was 0
