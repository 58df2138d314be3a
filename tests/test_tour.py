"""README's quick tour runs as written: its commands, in order, in a clean folder holding
only what command 1 (`scripts/demo.sh`, i.e. `visiontune demo`) writes, each a real
`visiontune` process on the real default backbone; none is skipped."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from visiontune.cli import build_parser
from visiontune.demo import write_lfw_subset

ROOT = Path(__file__).resolve().parents[1]
ACTIVATE = "source .venv/bin/activate"


def tour_lines(readme: Path = ROOT / "README.md") -> list[str]:
    """The lines of the first fenced block under README's "## A quick tour", continuations
    joined, blank lines dropped."""
    text = readme.read_text(encoding="utf-8").split("## A quick tour", 1)[1]
    block = text.split("```bash\n", 1)[1].split("\n```", 1)[0]
    return [line.strip() for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def tour_commands(lines: list[str]) -> list[list[str]]:
    """argv after `visiontune` of each line; the first line activates the venv command 1 made,
    and every other line must be a visiontune command (nothing the test would leave out)."""
    assert lines[0] == ACTIVATE, f"the tour starts in command 1's venv: {lines[0]!r}"
    argvs = [shlex.split(line, comments=True) for line in lines[1:]]
    strays = [" ".join(a) for a in argvs if not a or a[0] != "visiontune"]
    assert not strays, f"tour lines this test would not run: {strays}"
    return [a[1:] for a in argvs]


def test_the_tour_is_parsed_whole() -> None:
    argvs = tour_commands(tour_lines())
    assert [a[0] for a in argvs] == ["train", "predict", "evaluate", "predict", "interpret", "export", "suggest"]
    with pytest.raises(AssertionError, match="would not run"):
        tour_commands([ACTIVATE, "visiontune train demo/lfw_subset", "ls runs"])


def test_the_tour_reads_what_command_1_writes() -> None:
    """The data the tour names is where `visiontune demo` (command 1) writes its images."""
    out = build_parser().parse_args(["demo"]).out
    assert "visiontune demo" in (ROOT / "scripts" / "demo.sh").read_text(encoding="utf-8")
    paths = [w for argv in tour_commands(tour_lines()) for w in argv if w.startswith(out + "/")]
    assert paths and all(p.startswith(f"{out}/lfw_subset") for p in paths)


@pytest.mark.slow
def test_the_tour_runs_in_order_on_a_clean_folder(tmp_path: Path) -> None:
    """Each command exits 0 and leaves what the README says it does. As written, not shrunk:
    about 3 minutes of one core's CPU time, mostly each process's start-up and the fixed
    costs of interpret, export and suggest (at 64 px it was no cheaper)."""
    pytest.importorskip("skimage", reason="the demo's data needs visiontune[demo]")
    pytest.importorskip("onnxruntime", reason="the tour's export needs visiontune[export]")
    write_lfw_subset(tmp_path / build_parser().parse_args(["demo"]).out / "lfw_subset")  # what command 1 writes
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(os.path.abspath(p) for p in sys.path if p)}
    took = []
    for argv in tour_commands(tour_lines()):
        start = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "visiontune", *argv], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=600)
        took.append(f"{argv[0]} {time.monotonic() - start:.0f}s")
        assert done.returncode == 0, f"visiontune {shlex.join(argv)}: {done.stderr[-2000:]}"
    run = tmp_path / "runs" / "faces"
    for made in ("model.safetensors", "interpret/report.html", "model.onnx", "model.int8.onnx"):
        assert (run / made).is_file(), made
    assert len((tmp_path / "preds.csv").read_text().splitlines()) == 21  # header + 20 faces
    assert len((tmp_path / "to_label.csv").read_text().splitlines()) == 11, took
