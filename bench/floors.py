"""Do the version floors in pyproject.toml hold? (issue 21 item 11)

    python -m bench.floors WORK [--tests tests/deploy/test_export.py tests/models/test_weights.py]
    python -m bench.floors --smoke    # offline: the floors parse and this environment meets them

Creates WORK/venv, installs visiontune with its `export` extra at the OLDEST versions the
project allows for every direct dependency (uv's --resolution lowest-direct: torch,
torchvision, timm, safetensors, numpy, onnx, onnxscript, onnxruntime... at their floors),
prints what got installed, then runs the export and weights tests there (they train, export
to ONNX / pt2 / TorchScript / timm's Hub layout and load local weights). Deprecation and
future warnings that old releases raise inside each other (matplotlib 3.7 calling pyparsing
3.3) are not failures here: the question is whether the code works at the floors. Writes
WORK/floors.json. Exit status 1 when the install or a test fails: a floor to raise.

Downloads several GB (PyPI's torch builds carry CUDA); run it where PyPI is reachable.
`--smoke` needs no network: it reads the floors of CHECKED from pyproject.toml and checks
that the versions installed here meet them.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

from bench.harness import Recorder, parser

ROOT = Path(__file__).resolve().parents[1]
CHECKED = ("torch", "torchvision", "timm", "safetensors", "numpy", "scikit-learn", "pillow", "webdataset", "onnx",
           "onnxscript", "onnxruntime", "huggingface-hub")


def floors() -> dict[str, Requirement]:
    """The requirements pyproject.toml states for the CHECKED packages (base and extras)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    listed = [*project["dependencies"], *(r for extra in project["optional-dependencies"].values() for r in extra)]
    found = {}
    for text in listed:
        req = Requirement(text)
        if req.name.lower() in CHECKED:
            found[req.name.lower()] = req
    return found


def smoke(record: Recorder) -> int:
    """Offline: every CHECKED floor parses, and the installed versions here meet them."""
    stated = floors()
    met = {name: req.specifier.contains(metadata.version(name), prereleases=True) for name, req in stated.items()}
    print("floors:", ", ".join(f"{req} ({'met' if met[n] else 'NOT met'})" for n, req in stated.items()))
    record("floors in pyproject.toml met by this environment", f"{sum(met.values())} of {len(met)}")
    return 0 if stated and all(met.values()) else 1


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__)
    ap.add_argument("work", nargs="?")
    ap.add_argument("--tests", nargs="+", default=["tests/deploy/test_export.py", "tests/models/test_weights.py"])
    a = ap.parse_args(argv)
    record = Recorder("floors", a.smoke, argv)
    if a.smoke:
        return smoke(record)
    if a.work is None:
        ap.error("WORK is required (or --smoke)")
    work = Path(a.work).resolve()
    venv = work / "venv"
    shutil.rmtree(venv, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = str(venv / "bin" / "python")
    subprocess.run([py, "-m", "pip", "install", "-q", "uv"], check=True)
    install = subprocess.run([py, "-m", "uv", "pip", "install", "--python", py, "--resolution", "lowest-direct",
                              "-e", f"{ROOT}[export]", "pytest>=8", "scikit-image>=0.21"],
                             capture_output=True, text=True)
    report: dict = {"date": time.strftime("%Y-%m-%d %H:%M"), "install_ok": install.returncode == 0,
                    "install_s": round(time.perf_counter() - started)}
    if install.returncode != 0:
        report["install_error"] = install.stderr[-3000:]
        print(install.stderr[-3000:])
    else:
        listed = subprocess.run([py, "-m", "uv", "pip", "list", "--python", py, "--format", "json"],
                                capture_output=True, text=True, check=True)
        versions = {p["name"].lower(): p["version"] for p in json.loads(listed.stdout)}
        report["versions"] = {name: versions.get(name) for name in CHECKED}
        print("installed:", ", ".join(f"{k} {v}" for k, v in report["versions"].items()), flush=True)
        tests = subprocess.run([py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore::DeprecationWarning",
                                "-W", "ignore::FutureWarning", *a.tests], cwd=ROOT,
                               capture_output=True, text=True, env={"VISIONTUNE_OFFLINE": "1", "PATH": "/usr/bin:/bin",
                                                                    "HOME": str(work)})
        report["tests_ok"] = tests.returncode == 0
        report["tests_summary"] = tests.stdout.strip().splitlines()[-1] if tests.stdout.strip() else ""
        report["tests_tail"] = tests.stdout[-4000:]
        print(tests.stdout[-4000:])
    (work / "floors.json").write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k not in ("tests_tail", "install_error")}, indent=2))
    record("install at the lowest direct versions", "ok" if report["install_ok"] else "failed")
    if "tests_ok" in report:
        record("export and weights tests at the floors", report["tests_summary"], note=json.dumps(report["versions"]))
    return 0 if report.get("tests_ok") else 1


if __name__ == "__main__":
    sys.exit(main())
