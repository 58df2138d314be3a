"""The benchmark suite stays runnable and its page stays data: every bench script has a
`--smoke` mode that runs here on tiny generated data (a bench that no longer runs fails
the suite), each smoke appends rows through the harness, bench/RESULTS.md is what
`python -m bench.report` generates from bench/results/*.csv, and no bench patches
`sys.path` or imports a private visiontune name."""

from __future__ import annotations

import importlib
import re
import tempfile
from pathlib import Path

import pytest
import torch
from bench import harness, report
from bench.harness import FIELDS, append_row, read_rows

ROOT = Path(__file__).resolve().parents[1]
SUPPORT = {"__init__", "harness", "report"}
SCRIPTS = sorted(p.stem for p in (ROOT / "bench").glob("*.py") if p.stem not in SUPPORT)
# Scripts whose --smoke is not written yet (issue 35 item 8): this list only shrinks.
PENDING: set[str] = set()


def has_smoke(name: str) -> bool:
    return "--smoke" in (ROOT / "bench" / f"{name}.py").read_text(encoding="utf-8")


def test_every_bench_has_a_smoke_mode_or_is_listed_pending() -> None:
    missing = [n for n in SCRIPTS if not has_smoke(n) and n not in PENDING]
    done = [n for n in PENDING if has_smoke(n)]
    assert not missing, f"bench scripts without --smoke: {missing}"
    assert not done, f"remove from PENDING, they have --smoke now: {done}"


@pytest.fixture
def one_thread():
    """torch on one thread for the block: a smoke's tensors are tiny, and on 2 shared cores
    (CI, pytest-xdist) two threads a process mostly wait on each other (a probe fit measured
    30x slower in wall time than on one thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in SCRIPTS if n not in PENDING])
def test_smoke(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_thread: None) -> None:
    """`python -m bench.NAME --smoke`, in this process: it finishes and appends its rows."""
    monkeypatch.setenv("VISIONTUNE_BENCH_RESULTS", str(tmp_path / "results"))
    monkeypatch.setenv("VISIONTUNE_OFFLINE", "1")
    monkeypatch.setenv("VISIONTUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the subprocesses some smokes start
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the smokes' work folders go with the test's
    monkeypatch.chdir(tmp_path)
    status = importlib.import_module(f"bench.{name}").main(["--smoke"])
    assert status in (None, 0)
    rows = read_rows(tmp_path / "results" / f"{name}.csv")
    assert rows and all(r["command"] == f"python -m bench.{name} --smoke" and r["value"] and r["date"] for r in rows)


def test_results_page_is_generated_from_the_csvs() -> None:
    assert report.main(["--check"]) == 0, "run `python -m bench.report`"
    page = (ROOT / "bench" / "RESULTS.md").read_text(encoding="utf-8")
    for path in (ROOT / "bench" / "results").glob("*.csv"):
        rows = read_rows(path)
        assert rows and list(rows[0]) == list(FIELDS), path.name
        assert all(r["command"] and r["date"] for r in rows), path.name
        assert f"## {path.stem}:" in page


def test_the_page_shows_only_the_latest_row_of_a_figure(tmp_path: Path) -> None:
    for value in ("1.0", "2.0"):
        append_row(tmp_path / "speed.csv", {"figure": "img/s", "value": value, "date": "d", "command": "c"})
    page = report.render(tmp_path)
    assert "| img/s | 2.0 |" in page and "| img/s | 1.0 |" not in page


def test_the_page_describes_each_machine_once_from_the_rows(tmp_path: Path) -> None:
    """One CPU spelt two ways by older rows is one machine; a GPU row is another; the header
    says which benches ran on each, and a row's "on" names its machine, not the whole text."""
    rows = [("speed", "2 CPU cores (AMD EPYC, no GPU), 24 GB"), ("ood", "2 CPU cores (AMD EPYC)"),
            ("gpu", "16 CPU cores (Xeon, AVX-512 VNNI), 128 GB; NVIDIA H200")]
    for bench, hardware in rows:
        append_row(tmp_path / f"{bench}.csv", {"figure": "f", "value": "1", "date": "d", "command": "c",
                                               "hardware": hardware})
    page = report.render(tmp_path)
    head = page.split("## Why the defaults")[0]
    assert "| 2 CPU cores (AMD EPYC) | 2 CPU cores (AMD EPYC), 24 GB, no GPU | ood, speed | 2 |" in head
    assert "| NVIDIA H200 | NVIDIA H200; 16 CPU cores (Xeon), AVX-512 VNNI, 128 GB | gpu | 1 |" in head
    assert "no GPU" not in page.split("## Machines")[1].split("## Why")[1]  # rows name, the header describes
    assert page.count("| f | 1 | d | 2 CPU cores (AMD EPYC) |") == 2


def test_hardware_names_the_instruction_sets_int8_speed_depends_on() -> None:
    text = harness.hardware()
    name, described = report.machine(text)  # the form report.py reads
    assert name != text and name.endswith(")") and "no GPU" in described or "NVIDIA" in name
    flags = Path("/proc/cpuinfo").read_text(encoding="utf-8") if Path("/proc/cpuinfo").is_file() else ""
    assert ("AVX-512 VNNI" in text) == (" avx512_vnni" in flags)


def test_no_bench_patches_sys_path_or_imports_a_private_name() -> None:
    for path in (ROOT / "bench").glob("*.py"):
        text = path.read_text(encoding="utf-8")
        assert "sys.path" not in text, path.name
        private = re.findall(r"from visiontune[\w.]* import \(?[^)\n]*\b_\w+", text)
        assert not private, f"{path.name}: {private}"
