"""ONNX / TorchScript export: metadata inside, parity with eager, predict from the file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import visiontune as vt
from conftest import TINY, make_class_folders
from visiontune.cli import main
from visiontune.deploy.export import export, load_exported


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("export")
    data = make_class_folders(root / "data", {"red": 8, "green": 8})
    result = vt.fit(data, **dict(TINY, strategy="feature-extract", epochs=3, lr=1e-2, output=str(root / "runs")))
    return Path(result.run_dir), data


@pytest.mark.parametrize("fmt,suffix", [("onnx", ".onnx"), ("torchscript", ".ts")])
def test_export_carries_labels_and_preprocessing_and_matches_eager(run, fmt: str, suffix: str) -> None:
    run_dir, data = run
    result = export(run_dir, fmt)
    assert result.path.endswith(suffix) and result.max_abs_diff < 1e-4
    loaded = load_exported(result.path)
    assert loaded.classes == json.loads((run_dir / "classes.json").read_text())
    assert loaded.preprocess.input_size == 32
    eager, _ = vt.predict(run_dir, data)
    exported, _ = vt.predict(result.path, data)
    assert [p.label for p in exported] == [p.label for p in eager]
    assert max(abs(a.prob - b.prob) for a, b in zip(exported, eager)) < 1e-4


def test_cli_export_prints_the_parity_check(run, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir, _ = run
    assert main(["export", str(run_dir), "--format", "onnx", "--output", str(tmp_path / "m.onnx")]) == 0
    out = capsys.readouterr().out
    assert "max |eager - exported|" in out and (tmp_path / "m.onnx").is_file()


def test_a_foreign_onnx_file_is_a_clear_error(tmp_path: Path) -> None:
    import torch

    torch.onnx.export(torch.nn.Linear(3, 2), (torch.randn(1, 3),), str(tmp_path / "x.onnx"), dynamo=False)
    with pytest.raises(vt.VisiontuneError, match="no visiontune metadata"):
        load_exported(tmp_path / "x.onnx")
