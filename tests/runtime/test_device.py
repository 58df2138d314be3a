"""runtime/device.py: a device named outright must exist here; the refusal says which do
(--device mps on a machine without Apple Silicon's GPU, cuda without one)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import TINY, make_class_folders
from visiontune.cli import main
from visiontune.errors import ConfigError
from visiontune.runtime.device import available_devices, resolve_device

NO_MPS = not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
NO_CUDA = not torch.cuda.is_available()


def test_auto_and_cpu_resolve_and_the_list_starts_with_the_cpu() -> None:
    assert resolve_device("cpu") == torch.device("cpu") and available_devices()[0] == "cpu"
    assert resolve_device("auto").type in ("cuda", "mps", "cpu")


@pytest.mark.skipif(not NO_MPS, reason="Apple Silicon's GPU is here")
def test_mps_is_refused_where_it_is_absent() -> None:
    with pytest.raises(ConfigError, match=r"--device mps: Apple Silicon's GPU is not available here .* devices here: "
                                          r"cpu.*Use --device auto or cpu"):
        resolve_device("mps")


@pytest.mark.skipif(not NO_CUDA, reason="a CUDA GPU is here")
@pytest.mark.parametrize("name", ["cuda", "cuda:1"])
def test_cuda_is_refused_where_pytorch_sees_no_gpu(name: str) -> None:
    with pytest.raises(ConfigError, match=rf"--device {name}: PyTorch sees no CUDA GPU here .*devices here: cpu"):
        resolve_device(name)


def test_a_gpu_index_past_the_last_and_a_foreign_device_are_refused() -> None:
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(ConfigError, match="--device cuda:7"):
        resolve_device("cuda:7") if gpus < 8 else pytest.skip("8 GPUs here")
    with pytest.raises(ConfigError, match="'gpu0' is not a device; use auto, cpu, cuda, cuda:N or mps"):
        resolve_device("gpu0")
    with pytest.raises(ConfigError, match="visiontune runs on auto, cpu, cuda, cuda:N or mps"):
        resolve_device("meta")


@pytest.mark.skipif(not NO_MPS, reason="Apple Silicon's GPU is here")
def test_train_with_mps_absent_exits_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = make_class_folders(tmp_path / "d", {"red": 4, "green": 4})
    argv = ["train", str(data), "--device", "mps", "--backbone", TINY["backbone"], "--weights", "none",
            "--image-size", "32", "--strategy", "finetune", "--epochs", "1", "--output", str(tmp_path / "runs"), "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--device mps: Apple Silicon's GPU is not available here" in err and "Traceback" not in err
    assert not list((tmp_path / "runs").glob("*/model.safetensors"))
