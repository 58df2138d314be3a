"""DDP through torchrun: 2 CPU processes (gloo) end with the same weights as 1 process with
the same global batch, and only rank 0 writes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import make_class_folders

ARGS = ["--backbone", "timm:test_efficientnet", "--weights", "none", "--image-size", "32", "--epochs", "3",
        "--strategy", "gradual", "--freeze-epochs", "1", "--batch-size", "8", "--num-workers", "0", "--no-progress",
        "--patience", "0", "--no-augment", "--trainable-bn", "eval", "--lr", "1e-2", "--seed", "1"]


def _torchrun() -> list[str]:
    exe = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    return [exe] if exe else [sys.executable, "-m", "torch.distributed.run"]


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(tmp_path: Path) -> None:
    data = make_class_folders(tmp_path / "d", {"red": 10, "green": 10})  # 16 train, 4 valid
    env = {**os.environ, "VISIONTUNE_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    for n in (1, 2):
        subprocess.run([*_torchrun(), "--standalone", f"--nproc_per_node={n}", "-m", "visiontune", "-q", "train",
                        str(data), *ARGS, "--output", str(tmp_path / f"w{n}"), "--name", "run"],
                       env=env, check=True, capture_output=True, timeout=300)
    one, two = tmp_path / "w1" / "run", tmp_path / "w2" / "run"
    assert sorted(p.name for p in (tmp_path / "w2").iterdir()) == ["run"]  # rank 1 wrote nothing
    a, b = load_file(str(one / "model.safetensors")), load_file(str(two / "model.safetensors"))
    assert max(float((a[k].float() - b[k].float()).abs().max()) for k in a) < 1e-4
    h1 = [json.loads(x) for x in (one / "history.jsonl").read_text().splitlines()]
    h2 = [json.loads(x) for x in (two / "history.jsonl").read_text().splitlines()]
    assert [r["val_loss"] for r in h2] == pytest.approx([r["val_loss"] for r in h1], abs=1e-4)
    assert json.loads((two / "environment.json").read_text())["world_size"] == 2
