"""SIGKILL at random points, then --resume: every file on disk always loads, and the
finished run equals an uninterrupted one with the same seed (the uninterrupted one runs in
the test's process: each process the test starts pays seconds of imports)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import make_class_folders
from visiontune.cli import main
from visiontune.rundir import load_checkpoint

ARGS = ["--backbone", "timm:test_efficientnet", "--weights", "none", "--image-size", "64", "--epochs", "6",
        "--strategy", "finetune", "--batch-size", "4", "--num-workers", "0", "--no-progress", "--patience", "0",
        "--seed", "3"]


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "visiontune", "-q", *args]


def _epochs_logged(run: Path) -> int:
    try:
        return len((run / "history.jsonl").read_text().splitlines())
    except FileNotFoundError:
        return 0


@pytest.mark.slow
def test_sigkill_and_resume_loses_nothing(tmp_path: Path) -> None:
    data = make_class_folders(tmp_path / "d", {"red": 12, "green": 12})
    env = {**os.environ, "VISIONTUNE_OFFLINE": "1"}
    assert main(["-q", "train", str(data), *ARGS, "--output", str(tmp_path), "--name", "calm"]) == 0
    history = [json.loads(line) for line in (tmp_path / "calm" / "history.jsonl").read_text().splitlines()]
    epoch_s = sum(h["seconds"] for h in history) / len(history)  # kill within about one epoch of a new one
    run = tmp_path / "crashy"
    rng = random.Random(0)
    kills = 0
    cmd = _cli("train", str(data), *ARGS, "--output", str(tmp_path), "--name", "crashy")
    for _ in range(12):  # 6 epochs: 3 kills (the seeded draws), each process at least one epoch further
        done = _epochs_logged(run)
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while proc.poll() is None and _epochs_logged(run) <= done:  # wait until this process trains
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 1.5 * epoch_s))  # then kill anywhere: mid-epoch, mid-checkpoint, between
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
        else:
            assert proc.returncode == 0
            break
        # whatever the moment of the kill, every file on disk is whole
        if (run / "checkpoints" / "last.pt").exists():
            assert "model" in load_checkpoint(run / "checkpoints" / "last.pt")
        if (run / "model.safetensors").exists():
            assert load_file(str(run / "model.safetensors"))
        cmd = _cli("train", "--resume", str(run), "--no-progress")
    else:
        pytest.fail("the run never finished")
    assert kills >= 2
    calm = json.loads((tmp_path / "calm" / "metrics.json").read_text())
    crashy = json.loads((run / "metrics.json").read_text())
    for key in ("val_loss", "accuracy", "macro_f1"):
        assert crashy[key] == pytest.approx(calm[key], abs=1e-6), key
    a, b = load_file(str(tmp_path / "calm" / "model.safetensors")), load_file(str(run / "model.safetensors"))
    assert all((a[k] - b[k]).abs().max() < 1e-5 for k in a)
