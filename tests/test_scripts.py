"""scripts/setup.sh and demo.sh, run for real by bash in a copy of the project whose
.venv holds stand-in programs that record their arguments (nothing is installed): the
stamp that skips a second install, macOS without sha256sum, and a venv made by Windows'
Python (Scripts/ instead of bin/, as under Git Bash)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ("bash", "cat", "cut", "dirname", "grep", "env")  # what the scripts call besides the venv's programs


def _project(tmp_path: Path, venv_bin: str) -> tuple[Path, Path]:
    """A copy of pyproject.toml and scripts/ with a .venv whose python and visiontune
    append their arguments to calls.log."""
    project = tmp_path / "project"
    shutil.copytree(ROOT / "scripts", project / "scripts")
    shutil.copy(ROOT / "pyproject.toml", project / "pyproject.toml")
    log = project / "calls.log"
    for name in ("python.exe" if venv_bin == "Scripts" else "python", "visiontune"):
        program = project / ".venv" / venv_bin / name
        program.parent.mkdir(parents=True, exist_ok=True)
        program.write_text(f'#!/bin/sh\necho "{name} $*" >> "{log}"\n', encoding="utf-8")
        program.chmod(0o755)
    if venv_bin == "Scripts":  # Git Bash finds python.exe as python
        os.symlink("python.exe", project / ".venv" / "Scripts" / "python")
    return project, log


def _path_with(tmp_path: Path, hashers: tuple[str, ...]) -> str:
    """A PATH with only the tools the script needs, and of the hash programs only `hashers`."""
    folder = tmp_path / f"path-{'-'.join(hashers) or 'none'}"
    folder.mkdir(exist_ok=True)
    for tool in (*TOOLS, *hashers):
        found = shutil.which(tool)
        if found is None:
            pytest.skip(f"{tool} is not installed here")
        (folder / tool).unlink(missing_ok=True)
        os.symlink(found, folder / tool)
    return str(folder)


def _run(project: Path, script: str, path: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(project / "scripts" / script), *args], capture_output=True, text=True,
                          timeout=120, env={"PATH": path, "HOME": str(project), "PYTHON": sys.executable})


def _expected_stamp(project: Path, extras: str = "dev") -> str:
    text = (project / "pyproject.toml").read_bytes() + (project / "scripts" / "setup.sh").read_bytes()
    return f"{extras} {hashlib.sha256(text).hexdigest()[:16]}"


def test_setup_installs_once_with_shasum_alone_as_on_macos(tmp_path: Path) -> None:
    project, log = _project(tmp_path, "bin")
    macos = _path_with(tmp_path, ("shasum",))
    first = _run(project, "setup.sh", macos)
    assert first.returncode == 0, first.stderr
    assert (project / ".venv" / ".visiontune-installed").read_text().strip() == _expected_stamp(project)
    installs = log.read_text().splitlines()
    assert len(installs) == 3 and all(line.startswith("python -m pip install") for line in installs)
    again = _run(project, "setup.sh", _path_with(tmp_path, ("sha256sum",)))  # the same stamp from sha256sum
    assert again.returncode == 0 and log.read_text().splitlines() == installs  # nothing installed again


def test_setup_and_demo_use_a_windows_venv(tmp_path: Path) -> None:
    project, log = _project(tmp_path, "Scripts")
    done = _run(project, "demo.sh", _path_with(tmp_path, ("sha256sum",)), "--epochs", "1")
    assert done.returncode == 0, done.stderr
    calls = log.read_text().splitlines()
    assert len(calls) == 4 and calls[-1] == "visiontune demo --epochs 1"
    assert not (project / ".venv" / "bin").exists()  # no second venv made beside Windows' one


def test_the_cpu_index_advice_keeps_pypi() -> None:
    """PIP_INDEX_URL set to PyTorch's index replaces PyPI for every package: the advice is
    PIP_EXTRA_INDEX_URL (or --index-url on the torch line alone)."""
    for name in ("scripts/setup.sh", "README.md", "docs/guides/platforms.md"):
        text = (ROOT / name).read_text(encoding="utf-8")
        assert "PIP_INDEX_URL=" not in text, name
    for name in ("scripts/setup.sh", "docs/guides/platforms.md"):
        assert "PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu" in (ROOT / name).read_text(encoding="utf-8")
