"""The registry helper: entries by object or by import path, loaded when looked up; every
registered name resolves; --help lists them without importing torch."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from visiontune.errors import ConfigError
from visiontune.registry import Registry


def test_a_lazy_entry_is_imported_when_looked_up_and_not_before() -> None:
    registry: Registry[object] = Registry("thing")
    registry.lazy("dumps", "json:dumps", "writes JSON", suffix=".json")
    registry.add("three", 3, "a number")
    assert list(registry) == ["dumps", "three"] and "dumps" in registry and len(registry) == 2
    assert registry.help("dumps") == "writes JSON" and registry.meta("dumps") == {"suffix": ".json"}
    assert not registry.loaded("dumps") and registry.loaded("three")
    import json

    assert registry.find("dumps") is json.dumps and registry["dumps"] is json.dumps and registry.loaded("dumps")
    assert registry.choices_help() == "dumps (writes JSON), three (a number)"
    with pytest.raises(ConfigError, match="unknown thing 'four'; choose one of: dumps, three"):
        registry.find("four")
    with pytest.raises(ValueError, match="module:attribute"):
        registry.lazy("bad", "json.dumps")
    registry.pop("three")
    assert registry.names() == ("dumps",)


def _registries() -> dict[str, Registry]:
    from visiontune.config import ENGINES, TRACKERS
    from visiontune.deploy.formats import FORMATS
    from visiontune.models.backbones import SOURCES
    from visiontune.tasks.catalog import TASKS
    from visiontune.train.strategies import STRATEGIES

    return {"tasks": TASKS, "trackers": TRACKERS, "formats": FORMATS, "engines": ENGINES, "sources": SOURCES,
            "strategies": STRATEGIES}


@pytest.mark.parametrize("kind", ["tasks", "trackers", "formats", "engines", "sources", "strategies"])
def test_every_registered_name_resolves(kind: str) -> None:
    """Each import path names what is there: a task its Task subclass under its own name,
    a tracker its class, a format its writer."""
    from visiontune.tasks.base import Task
    from visiontune.train.tracking import Tracker

    registry = _registries()[kind]
    for name in registry:
        entry = registry.find(name)
        assert entry is not None, name
        if kind == "tasks":
            assert issubclass(entry, Task) and entry.name == name and registry.help(name)
        elif kind == "trackers":
            assert issubclass(entry, Tracker) and registry.help(name)
        elif kind == "formats":
            assert callable(entry) and registry.help(name) and "suffix" in registry.meta(name)


HELP = """
import sys, contextlib, io
from visiontune.cli import build_parser
from visiontune.config import ENGINES, TRACKERS
from visiontune.deploy.formats import FORMATS
from visiontune.tasks.catalog import TASKS
parser = build_parser()
texts = {}
for command in ("train", "export", "predict", "review", "cv"):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.suppress(SystemExit):
        parser.parse_args([command, "--help"])
    texts[command] = buf.getvalue()
assert all(name in texts["train"] for name in TASKS), "--task"
assert all(name in texts["train"] for name in ENGINES), "--engine"
assert all(name in texts["train"] for name in TRACKERS), "--track"
assert all(name in texts["export"] for name in FORMATS), "--format"
assert all(name in texts["predict"] for name in ENGINES), "predict --engine"
assert all(name in texts["review"] for name in TASKS), "review --task"
print(sorted(m for m in sys.modules if m == "torch" or m.startswith("visiontune.train.tracking")
             or m.startswith(("visiontune.tasks.single", "visiontune.tasks.multi", "visiontune.tasks.regression"))))
"""


def test_help_lists_every_registered_name_without_importing_torch() -> None:
    env = {**os.environ, "COLUMNS": "1000"}  # one line per option: no name broken at a hyphen
    out = subprocess.run([sys.executable, "-c", HELP], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"  # no torch, no task or tracker class loaded
