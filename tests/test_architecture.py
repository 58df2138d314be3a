"""The shape of the code: no import cycles (in-function imports included), short
functions, and the extension points (strategy registry, config options) each one place."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

import visiontune as vt
from visiontune.caches import CACHES
from visiontune.cli import add_run_options, build_parser
from visiontune.config import RunConfig, TrainConfig, check_fields, option, option_fields
from visiontune.errors import ConfigError
from visiontune.train import strategies
from visiontune.train.strategies import STRATEGIES, Phase, StrategyContext, register_strategy

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "visiontune"
MAX_FUNCTION_LINES = 50
DECLARATIVE_TABLES: set[str] = set()  # "module:function" allowed to be longer (none today)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """Every visiontune module `path` imports anywhere in its body (functions, TYPE_CHECKING
    blocks included), plus the parent packages each import runs."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        for target in targets:
            parts = target.split(".")
            found.update(".".join(parts[:i]) for i in range(1, len(parts) + 1) if ".".join(parts[:i]) in modules)
    found.discard(name)
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles_in_function_imports_included() -> None:
    modules = _modules()
    graph = {name: _imports(path, name, modules) for name, path in modules.items()}
    assert len(graph) > 30 and "visiontune.train.trainer" in graph["visiontune.train.session"]
    assert _cycles(graph) == []


def test_the_cycle_check_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


# The layers of ARCHITECTURE.md ("Packages, bottom to top"), by longest module-name prefix.
# A module may import its own layer's modules of its own package and anything below.
LAYERS = [
    ("visiontune.errors", "visiontune.version", "visiontune.files", "visiontune.caches", "visiontune.display", "visiontune.plots",
     "visiontune.registry", "visiontune.web", "visiontune.cpus"),
    ("visiontune.train.strategies", "visiontune.tasks.labels", "visiontune.tasks.catalog", "visiontune.deploy.formats"),
    ("visiontune.config",),
    ("visiontune.tasks",),
    ("visiontune.data",),
    ("visiontune.models",),
    ("visiontune.runtime",),
    ("visiontune.frozen",),
    ("visiontune.rundir",),
    ("visiontune.bundle",),
    ("visiontune.train",),
    ("visiontune.planning",),
    ("visiontune.analysis", "visiontune.selection", "visiontune.deploy"),
    ("visiontune.prediction",),
    ("visiontune.api",),
    ("visiontune.demo",),
    ("visiontune.command_config",),
    ("visiontune.commands",),
    ("visiontune.cli",),
    ("visiontune.__main__",),
]


def _layer(module: str) -> tuple[int, str]:
    """(layer, the prefix that placed it) of a module: the longest matching prefix."""
    found = [(len(prefix), i, prefix) for i, names in enumerate(LAYERS) for prefix in names
             if module == prefix or module.startswith(prefix + ".")]
    if not found:
        raise AssertionError(f"{module} is in no layer of ARCHITECTURE.md; add it to LAYERS and the docs")
    _, layer, prefix = max(found)
    return layer, prefix


def _layer_violations(graph: dict[str, set[str]], packages: set[str]) -> list[str]:
    """Imports that go up a layer, or sideways into another package of the same layer.
    Package __init__ modules are namespaces (importing one runs nothing of its layer)."""
    bad = []
    for module, deps in graph.items():
        if module in packages or module == "visiontune":
            continue
        layer, prefix = _layer(module)
        for dep in sorted(deps - packages - {"visiontune"}):
            dep_layer, dep_prefix = _layer(dep)
            if dep_layer > layer or (dep_layer == layer and dep_prefix != prefix and len(LAYERS[layer]) > 1
                                     and layer not in (0, 1)):
                bad.append(f"{module} (layer {layer + 1}) imports {dep} (layer {dep_layer + 1})")
    return bad


def test_imports_only_go_down_the_layers() -> None:
    modules = _modules()
    graph = {name: _imports(path, name, modules) for name, path in modules.items()}
    packages = {name for name, path in modules.items() if path.name == "__init__.py"}
    assert _layer_violations(graph, packages) == []


def test_the_layer_check_finds_an_upward_and_a_sideways_import() -> None:
    graph = {"visiontune.train.tracking": {"visiontune.analysis.report"},
             "visiontune.selection.advisor": {"visiontune.analysis.mislabels", "visiontune.frozen.probe"},
             "visiontune.analysis.report": set(), "visiontune.analysis.mislabels": set(), "visiontune.frozen.probe": set()}
    assert set(_layer_violations(graph, set())) == {
        "visiontune.selection.advisor (layer 13) imports visiontune.analysis.mislabels (layer 13)",
        "visiontune.train.tracking (layer 11) imports visiontune.analysis.report (layer 13)"}



# Frozen features, their caches and the probe live in visiontune.frozen (below train/):
# analysis/, the tools that do not train and planning import them from there, never from
# training (issue 35).
FROZEN_CONCEPT = re.compile(r"feature|probe|shard", re.IGNORECASE)


def _frozen_from_training(tree: ast.AST, module: str) -> list[str]:
    """Imports in `module` (outside train/) that reach into visiontune.train for a frozen
    feature, cache, shard or probe name, or into a train module of that name."""
    if module == "visiontune.train" or module.startswith("visiontune.train."):
        return []
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("visiontune.train"):
            names = [a.name for a in node.names]
            if not FROZEN_CONCEPT.search((node.module or "").rpartition(".")[2]):  # visiontune.train.X: X itself
                names = [n for n in names if FROZEN_CONCEPT.search(n)]
            found += [f"{module}:{node.lineno} imports {', '.join(names)} from {node.module}"] if names else []
        elif isinstance(node, ast.Import):
            found += [f"{module}:{node.lineno} imports {a.name}" for a in node.names
                      if a.name.startswith("visiontune.train.") and FROZEN_CONCEPT.search(a.name)]
    return found


def test_no_module_outside_train_reaches_into_it_for_frozen_features_or_the_probe() -> None:
    modules = _modules()
    assert not {f"visiontune.train.{m}" for m in ("features", "shards", "probe", "probememo")} & set(modules)
    assert {"visiontune.frozen.features", "visiontune.frozen.probe"} <= set(modules)
    found = [hit for name, path in modules.items() for hit in _frozen_from_training(ast.parse(path.read_text()), name)]
    assert found == []


def test_the_frozen_check_finds_features_and_the_probe_taken_from_training() -> None:
    code = ("from visiontune.train.features import cache_for\nfrom visiontune.train.probe import oof_outputs\n"
            "from visiontune.train import probe\nimport visiontune.train.shards\n"
            "from visiontune.train.session import train_run\nfrom visiontune.frozen.features import FeatureExtractor\n")
    assert _frozen_from_training(ast.parse(code), "visiontune.analysis.interpret") == [
        "visiontune.analysis.interpret:1 imports cache_for from visiontune.train.features",
        "visiontune.analysis.interpret:2 imports oof_outputs from visiontune.train.probe",
        "visiontune.analysis.interpret:3 imports probe from visiontune.train",
        "visiontune.analysis.interpret:4 imports visiontune.train.shards"]
    assert _frozen_from_training(ast.parse(code), "visiontune.train.rundata") == []

# -- the caches: each one's layout in its own class (caches.py) ----------------------------
def _cache_owners() -> dict[str, str]:
    """{folder under the cache root: the module of the cache class that owns it}."""
    return {CACHES[name].folder: CACHES[name].__module__ for name in CACHES}


def _cache_layouts(tree: ast.AST, module: str, owners: dict[str, str]) -> list[str]:
    """Where `module` computes a path in a cache's layout it does not own: a path under
    `cache_root(...)` built by hand (a cache's class says where it lives: `location`), a
    cache's folder joined by `/` outside its class's module; and in caches.py, a cache's
    name or folder inside a function (usage and eviction iterate the registered caches)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            left, right = node.left, node.right
            if isinstance(left, ast.Call) and getattr(left.func, "id", getattr(left.func, "attr", "")) == "cache_root":
                found.append(f"{module}:{node.lineno} builds a path under cache_root() by hand")
            if isinstance(right, ast.Constant) and owners.get(right.value, module) != module:
                found.append(f"{module}:{node.lineno} joins {right.value!r}, {owners[right.value]}'s folder")
        if module == "visiontune.caches" and isinstance(node, ast.FunctionDef):
            names = set(owners) | set(CACHES)
            found += [f"{module}:{c.lineno} names the cache {c.value!r} in {node.name}" for c in ast.walk(node)
                      if isinstance(c, ast.Constant) and c.value in names]
    return found


def test_no_module_computes_another_caches_layout() -> None:
    owners = _cache_owners()
    assert set(owners) >= {"features", "images", "probes", "engines", "datasets", "scan.sqlite"}
    found = [hit for name, path in _modules().items()
             for hit in _cache_layouts(ast.parse(path.read_text()), name, owners)]
    assert found == []


def test_the_cache_layout_check_finds_a_layout_computed_elsewhere() -> None:
    owners = _cache_owners()
    code = ('def usage(root):\n    if area == "images":\n        return root / "images"\n'
            '    return cache_root(None) / "probes" / key\n')
    assert sorted(_cache_layouts(ast.parse(code), "visiontune.caches", owners)) == sorted([
        "visiontune.caches:4 builds a path under cache_root() by hand",
        "visiontune.caches:4 joins 'probes', visiontune.frozen.probememo's folder",
        "visiontune.caches:3 joins 'images', visiontune.data.loaders's folder",
        "visiontune.caches:2 names the cache 'images' in usage",
        "visiontune.caches:3 names the cache 'images' in usage",
        "visiontune.caches:4 names the cache 'probes' in usage"])
    assert sorted(_cache_layouts(ast.parse(code), "visiontune.data.loaders", owners)) == [
        "visiontune.data.loaders:4 builds a path under cache_root() by hand",
        "visiontune.data.loaders:4 joins 'probes', visiontune.frozen.probememo's folder"]


# -- the run directory: one owner of its file names ---------------------------------------
# A string literal that is a file name (what the grep of issue 35 looks for).
FILE_NAME = re.compile(r"[A-Za-z_][\w./-]*\.(json|jsonl|yaml|yml|csv|txt|safetensors|pt|pth|pt2|ts|bin|onnx|html|"
                       r"png|md|sqlite|db|npy|npz)")
# File names spelled outside visiontune/rundir.py, each with why it is not a run file.
NOT_RUN_FILES = {
    ("visiontune.command_config", "to_label.csv"): "suggest's default --output: the user's file, in the current "
                                                  "folder",
    ("visiontune.data.hf", "complete.json"): "the marker of a Hugging Face dataset's folder in the cache",
    ("visiontune.data.hf", "dataset_dict.json"): "the datasets library's save_to_disk format (user data)",
    ("visiontune.data.hf", "dataset_info.json"): "the datasets library's save_to_disk format (user data)",
    ("visiontune.data.hf", "state.json"): "the datasets library's save_to_disk format (user data)",
    ("visiontune.data.imagify", "groups.csv"): "written at the data root beside the images imagify draws",
    ("visiontune.data.sources", "groups.csv"): "read at the data root (user data)",
    ("visiontune.data.scan", "scan.sqlite"): "the scan cache",
    ("visiontune.data.webdata", "dataset.json"): "a shard folder's format (data/webdata.py)",
    ("visiontune.data.webdata", "index.csv"): "a shard folder's format (data/webdata.py)",
    ("visiontune.deploy.export", "visiontune.json"): "the metadata entry inside a TorchScript / pt2 file",
    ("visiontune.deploy.hub", "README.md"): "the model card of timm's Hub folder, a folder the user names",
    ("visiontune.deploy.quantize", "prepared.onnx"): "a temporary file in a temporary folder",
    ("visiontune.models.backbones", "config.json"): "a Hugging Face / timm model folder's config (its format)",
    ("visiontune.models.backbones", "model.safetensors"): "the weights file of a Hugging Face Hub repo (its format)",
    ("visiontune.models.backbones", "open_clip_model.safetensors"): "an OpenCLIP Hub repo's weights file",
    ("visiontune.models.weights", "model.safetensors"): "the weights file of a Hugging Face Hub repo (its format)",
    ("visiontune.models.weights", "pytorch_model.bin"): "a Hugging Face Hub repo's pickled weights (refused)",
    ("visiontune.selection.lrfind", "lr_find.png"): "in the --output folder of runs, not in a run",
    ("visiontune.frozen.shards", "index.sqlite"): "the feature cache's shard index",
    ("visiontune.train.tracking", "mlflow.db"): "the MLflow store in the --output folder of runs, not in a run",
}


def _file_literals(path: Path) -> set[str]:
    """The string literals in `path` that are file names (docstrings left out: prose)."""
    tree = ast.parse(path.read_text())
    docs = {id(node.body[0].value) for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body
            and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    return {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)
            and id(node) not in docs and FILE_NAME.fullmatch(node.value)}


def test_no_run_file_name_is_spelled_outside_the_run_directory_class() -> None:
    """rundir.RunDir owns the run directory's layout: any other module that spells a file
    name is either listed in NOT_RUN_FILES with why it is not a run file, or should ask
    RunDir (a new run artifact is one property or method there)."""
    found = {(name, literal) for name, path in _modules().items() if name != "visiontune.rundir"
             for literal in _file_literals(path)}
    assert sorted(found - NOT_RUN_FILES.keys()) == []
    assert sorted(NOT_RUN_FILES.keys() - found) == []  # the allow-list holds nothing stale


def test_the_run_file_check_finds_a_run_file_name(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text('"""Writes RUN/metrics.json."""\nNAME = "metrics.json"\nSUFFIX = ".onnx"\n')
    assert _file_literals(module) == {"metrics.json"}


# A name made from another path by hand: a suffix or name swapped (weights.with_suffix(".onnx"),
# the export names of issue 35), or a folder joined on (run / "timm"); joined file names are
# the check above's. Outside rundir.py, each with why it names no run file.
DERIVES = {"with_suffix", "with_name", "with_stem"}
NOT_RUN_PATHS = {
    ("visiontune.caches", ".with_name()"): "a cache entry renamed aside while it is removed",
    ("visiontune.caches", "/ '.cache'"): "the cache root, ~/.cache/visiontune",
    ("visiontune.caches", "/ 'visiontune'"): "the cache root, ~/.cache/visiontune",
    **{("visiontune.cpus", f"/ {name!r}"): "the kernel's cgroup files (a CPU quota), not a run's"
       for name in ("cgroup.controllers", "cpu", "cpu.cfs_period_us", "cpu.cfs_quota_us", "cpu.max", "unified")},
    ("visiontune.data.sources", "/ 'train'"): "a data folder's train/ split (user data)",
    ("visiontune.demo", "/ 'lfw_subset'"): "the demo's data, in the folder the demo is given",
    ("visiontune.demo", "/ 'runs'"): "the demo's --output folder of runs",
    ("visiontune.demo", "/ 'test'"): "the demo data's test/ split",
    ("visiontune.train.tracking", "/ 'mlartifacts'"): "MLflow's artifact store beside mlflow.db, in the --output "
                                                      "folder of runs",
}


def _derived_paths(path: Path) -> set[str]:
    """The paths `path` makes by hand: `.with_suffix()`-like calls and folders joined on
    with `/` (a joined file name is `_file_literals`')."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in DERIVES:
            found.add(f".{node.func.attr}()")
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and isinstance(node.right, ast.Constant) \
                and isinstance(node.right.value, str) and not FILE_NAME.fullmatch(node.right.value):
            found.add(f"/ {node.right.value!r}")
    return found


def test_no_run_path_is_derived_outside_the_run_directory_class() -> None:
    """The exports' names (model.onnx, model.pt2, model.ts from the weights file's,
    model.int8.onnx, RUN/timm/) and a run's folders are RunDir's too: no other module swaps
    a path's suffix or joins a folder name on, except as NOT_RUN_PATHS lists."""
    found = {(name, how) for name, path in _modules().items() if name != "visiontune.rundir"
             for how in _derived_paths(path)}
    assert sorted(found - NOT_RUN_PATHS.keys()) == []
    assert sorted(NOT_RUN_PATHS.keys() - found) == []  # the allow-list holds nothing stale


def test_the_derived_path_check_finds_an_export_name_made_by_hand(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text('def f(weights, run):\n    return weights.with_suffix(".onnx"), run / "timm", '
                      'run / "model.pt2", run / f"{weights.stem}.ts"\n')
    assert _derived_paths(module) == {".with_suffix()", "/ 'timm'"}
    assert _file_literals(module) == {"model.pt2"}


LOADED = ("print(' '.join(sorted(m for m in sys.modules if m.startswith('visiontune.') "
          "or m in ('sklearn', 'scipy', 'iterstrat', 'fastapi', 'onnx'))))")


@pytest.mark.parametrize("through", ["python", "cli"])
def test_a_prediction_never_loads_the_training_stack(flat_data: Path, tmp_path: Path, through: str) -> None:
    """ARCHITECTURE.md: prediction never imports the training loop (vt.predict lives in
    visiontune.prediction), through the Python API or `visiontune predict` (whose command
    module imports each command's modules inside it: before, the CLI loaded them all, 6.0 s
    against 4.3 s for one image)."""
    from conftest import TINY

    run = vt.fit(flat_data, output=str(tmp_path), strategy="feature-extract", epochs=1, **TINY)
    if through == "python":
        code = ("import sys, visiontune as vt; preds, _ = vt.predict(sys.argv[1], sys.argv[2]); "
                "print(len(preds)); " + LOADED)
    else:
        code = ("import sys, contextlib, io\nfrom visiontune.cli import main\nbuf = io.StringIO()\n"
                "with contextlib.redirect_stdout(buf):\n    main(['predict', sys.argv[1], sys.argv[2]])\n"
                "print(len(buf.getvalue().splitlines()))\n" + LOADED)
    out = subprocess.run([sys.executable, "-c", code, run.run_dir, str(flat_data)], capture_output=True, text=True,
                         check=True).stdout.splitlines()
    loaded = set(out[1].split())
    assert int(out[0]) == 24 and "visiontune.prediction" in loaded
    training = sorted(m for m in loaded if m.startswith(("visiontune.train.", "visiontune.selection",
                                                         "visiontune.analysis", "visiontune.api",
                                                         "visiontune.planning", "visiontune.frozen"))
                      and m != "visiontune.train.strategies")  # layer 2: the registry config reads
    assert training == []
    # metrics and splitters (a second of start-up), the web server, the exporter: unused
    assert not loaded & {"sklearn", "scipy", "iterstrat", "fastapi", "onnx"}


def test_nothing_imports_the_package_root_or_the_cli() -> None:
    """The root's names are lazy re-exports, and only the entry point uses the CLI."""
    modules = _modules()
    for name, path in modules.items():
        deps = _imports(path, name, modules)
        assert "visiontune.cli" not in deps or name == "visiontune.__main__", name
        tree = ast.parse(path.read_text())
        plain = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        assert "visiontune" not in plain, f"{name} imports the package root"


# Objects built complete (DESIGN rule 11): nothing sets their attributes from outside the
# module that defines them. Recognised by name: a variable or attribute called `trainer`
# (or bound to `Trainer(...)`), `setup` or `clock`, and the data of a setup or trainer.
BUILT_COMPLETE = {"trainer": "visiontune.train.trainer", "setup": "visiontune.train.setup",
                  "clock": "visiontune.train.clock"}


def _chain(node: ast.expr) -> list[str]:
    """`a.b.c` -> ["a", "b", "c"] (empty when the expression is not a dotted name)."""
    if isinstance(node, ast.Name):
        return [node.id]
    if isinstance(node, ast.Attribute):
        head = _chain(node.value)
        return [*head, node.attr] if head else []
    return []


def _built_complete(owner: list[str], trainers: set[str]) -> str | None:
    """Which built-complete object `owner` (a dotted name) is, if any."""
    if len(owner) == 1 and owner[0] in trainers:
        return "trainer"
    if owner and owner[-1] in BUILT_COMPLETE:
        return owner[-1]
    if len(owner) >= 2 and owner[-1] == "data" and owner[-2] in ("trainer", "setup"):
        return owner[-2]  # the run's data: built by prepare_run with everything it reads (the clock)
    return None


def _set_from_outside(tree: ast.AST, module: str) -> list[str]:
    """`x.attr = ...` in `module` where x is a built-complete object defined elsewhere."""
    trainers = {t.id for n in ast.walk(tree) if isinstance(n, ast.Assign) and isinstance(n.value, ast.Call)
                and _chain(n.value.func)[-1:] == ["Trainer"] for t in n.targets if isinstance(t, ast.Name)}
    found = []
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else \
            [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
        for target in [e for t in targets for e in (t.elts if isinstance(t, ast.Tuple) else [t])]:
            if not isinstance(target, ast.Attribute):
                continue
            kind = _built_complete(_chain(target.value), {"trainer", *trainers})
            if kind is not None and BUILT_COMPLETE[kind] != module:
                found.append(f"{module}:{target.lineno} sets {'.'.join(_chain(target))}")
    return found


def test_nothing_sets_an_attribute_of_a_trainer_its_setup_or_its_clock_from_outside() -> None:
    """Issue 35: `Trainer(...)` receives everything it needs (its objective, its run
    directory; the clock through the setup) and the run's data reads the deadline from the
    clock, instead of session.py setting `trainer.watch`, `trainer.run_dir` and
    `setup.data.deadline` after building them."""
    found = [hit for name, path in _modules().items() for hit in _set_from_outside(ast.parse(path.read_text()), name)]
    assert found == []


def test_the_built_complete_check_finds_attributes_set_from_outside() -> None:
    code = ("trainer.watch = ('val_loss', 'min')\nself.trainer.run_dir = d\nsetup.data.deadline = 1.0\n"
            "t = Trainer(setup, [])\nt.run_dir, other.x = d, 1\nclock.used_before += 3\nself.clock = clock\n"
            "source.no_validation = ''\n")
    assert _set_from_outside(ast.parse(code), "visiontune.train.session") == [
        f"visiontune.train.session:{line} sets {name}" for line, name in (
            (1, "trainer.watch"), (2, "self.trainer.run_dir"), (3, "setup.data.deadline"), (5, "t.run_dir"),
            (6, "clock.used_before"))]
    assert _set_from_outside(ast.parse("clock.used_before = 1.0\n"), "visiontune.train.clock") == []


def test_no_function_in_src_is_longer_than_50_lines() -> None:
    long = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                if lines > MAX_FUNCTION_LINES and f"{name}:{node.name}" not in DECLARATIVE_TABLES:
                    long.append(f"{name}:{node.name} ({lines} lines)")
    assert long == []


def test_help_does_not_import_torch() -> None:
    code = "import sys; from visiontune.cli import build_parser; build_parser(); import visiontune as vt; " \
           "vt.ConfigError; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# -- the strategy registry ---------------------------------------------------------------
@pytest.fixture
def toy_strategy():
    """A strategy defined in one function: the last backbone group and the head train."""

    @register_strategy("last-group", "the last backbone group and the head train")
    def last_group(ctx: StrategyContext) -> list[Phase]:
        on = tuple(i >= ctx.n_body - 1 for i in range(len(ctx.groups)))
        return [Phase("last group + head", ctx.epochs, on, tuple(ctx.lr if t else 0.0 for t in on))]

    yield "last-group"
    STRATEGIES.pop("last-group")


def test_a_registered_strategy_trains_and_every_consumer_sees_it(toy_strategy, flat_data: Path, tmp_path: Path,
                                                                 tiny: dict) -> None:
    result = vt.fit(flat_data, **dict(tiny, strategy=toy_strategy, epochs=2, output=str(tmp_path / "runs")))
    assert len(result.history) == 2 and result.history[0]["phase"] == "last group + head"
    body = sum(p.numel() for p in result.model.backbone.parameters())
    assert 0 < result.trainable_params < body  # only part of the backbone trained
    assert toy_strategy in build_parser().format_help()  # the --help epilog
    assert "the last backbone group" in vt.inspect("timm:test_efficientnet", strategy=toy_strategy)
    with pytest.raises(ConfigError, match="last-group"):  # validation lists it among the choices
        RunConfig.create(None, strategy="no-such-strategy")


def test_the_registry_is_what_config_and_cli_offer() -> None:
    parser = build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]  # type: ignore[union-attr]
    action = next(a for a in train._actions if a.dest == "strategy")
    assert tuple(action.choices) == (*STRATEGIES, "auto")
    assert strategies.describe_strategies().count("\n") == len(STRATEGIES)


# -- options: one field each -------------------------------------------------------------
def test_every_option_has_help_and_a_cli_flag_unless_python_only() -> None:
    keys = {a.dest for a in _train_parser()._actions}
    for _, f in option_fields():
        assert f.metadata.get("help"), f.name
        if f.metadata.get("cli", True):
            assert (f.metadata.get("key") or f.name) in keys, f.name


def _train_parser() -> argparse.ArgumentParser:
    return build_parser()._subparsers._group_actions[0].choices["train"]  # type: ignore[union-attr]


def test_a_new_option_is_one_field() -> None:
    """A section with one more `option(...)` field gets its CLI flag and its bounds checked."""
    extended = dataclasses.make_dataclass(
        "ExtendedTrain", [("ema_decay", float, option(0.999, "EMA decay", gt=0.0, lt=1.0))], bases=(TrainConfig,),
        frozen=True)
    p = argparse.ArgumentParser()
    add_run_options(p, extended)
    assert p.parse_args(["--ema-decay", "0.9"]).ema_decay == 0.9
    assert "EMA decay (default: 0.999)" in p.format_help()
    check_fields(extended(ema_decay=0.5))
    with pytest.raises(ConfigError, match="ema_decay must be < 1"):
        check_fields(extended(ema_decay=1.5))


@pytest.mark.parametrize("key,value,message", [
    ("min_scale", 0.0, "min_scale must be > 0"), ("hflip", 1.5, "hflip must be <= 1"),
    ("pct_start", 1.0, "pct_start must be < 1"), ("label_smoothing", -0.1, "label_smoothing must be >= 0"),
    ("patience", -1, "patience must be >= 0"), ("valid_pct", 1.0, "valid_pct must be < 1"),
    ("optimizer", "adam", "optimizer 'adam' is not valid"),
])
def test_bounds_from_metadata_are_checked(key: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        RunConfig.create(None, **{key: value})


def test_cli_rejects_out_of_range_values_with_the_option_name(flat_data: Path, capsys) -> None:
    from visiontune.cli import main

    assert main(["train", str(flat_data), "--min-scale", "2"]) == 2
    assert "min_scale must be <= 1" in capsys.readouterr().err


def test_every_registry_is_the_one_helper() -> None:
    """Strategies, tasks, backbone sources, export formats, trackers, engines and caches: one
    Registry type, one error for an unknown name (tests/test_registry.py: lazily loaded)."""
    from visiontune.config import ENGINES, TRACKERS
    from visiontune.deploy.formats import FORMATS
    from visiontune.models.backbones import SOURCES
    from visiontune.registry import Registry
    from visiontune.tasks.catalog import TASKS

    for registry in (STRATEGIES, TASKS, SOURCES, FORMATS, TRACKERS, ENGINES, CACHES):
        assert isinstance(registry, Registry) and len(registry) >= 2
        with pytest.raises(ConfigError, match=f"unknown {registry.what} 'nope'; choose one of: "):
            registry.find("nope")


def test_tasks_registry_and_markers() -> None:
    from visiontune.tasks.catalog import TASKS, make_task, task_choices

    task = make_task("single-label", ["a", "b"])
    assert set(TASKS) == set(task_choices()) - {"auto"}  # what --task offers is what the catalog has
    assert task.encode(["b", "a"]).tolist() == [1, 0]
    assert make_task("multi-label", ["a", "b"]).encode([("a", "b"), ()]).tolist() == [[1, 1], [0, 0]]
    with pytest.raises(ConfigError, match="single-label"):
        make_task("ordinal", ["a"])


# -- the task seam: a fourth task, defined here only ----------------------------------------
@pytest.fixture
def toy_task():
    """Two classes scored by ONE logit (sigmoid): a task shape the package does not have,
    written against the Task interface alone and registered from here."""
    import numpy as np
    import torch
    from torch import nn

    from visiontune.tasks.base import Decoded, Report, Task, TaskLoss, marker_like
    from visiontune.tasks.catalog import TASKS, register_task

    class OneLogitLoss(TaskLoss):
        def total(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            return nn.functional.binary_cross_entropy_with_logits(logits[:, 0], targets, reduction="sum")

        def norm(self, targets: torch.Tensor) -> torch.Tensor:
            return torch.tensor(float(len(targets)))

    class OneLogit(Task):
        name, description, headline = "one-logit", "two classes, one sigmoid", ("accuracy", "accuracy", "loss")
        higher_is_better = {"accuracy": True, "val_loss": False, "train_loss": False}

        @property
        def num_outputs(self) -> int:
            return 1  # the head's width: one logit for the second class

        def encode(self, labels):
            return torch.tensor([float(self.index[lb]) for lb in labels])

        def marker(self, value):
            return marker_like(torch.zeros(0), value)

        def loss(self, weights=None, label_smoothing=0.0):
            return OneLogitLoss()

        def balance_weights(self, labels):
            return []

        def oversample_weights(self, targets):
            return torch.ones(len(targets))

        def probabilities(self, logits):
            return logits.sigmoid()

        def metrics(self, targets, probs, labels=None):
            hit = (probs[:, 0] >= 0.5) == (np.asarray(targets) > 0.5)
            return {"accuracy": float(hit.mean()) if len(hit) else float("nan")}

        def report(self, targets, probs):
            return Report([{"class": "all", **self.metrics(targets, probs)}], None, "one logit")

        def sample_losses(self, targets, probs):
            return np.abs(probs[:, 0] - np.asarray(targets))

        def describe(self, target, probs):
            return self.classes[int(probs[0] >= 0.5)], self.classes[int(target)]

        def decode(self, probs, top_k):
            return [Decoded([self.classes[int(p >= 0.5)]], [float(max(p, 1 - p))],
                            [(self.classes[int(p >= 0.5)], float(max(p, 1 - p)))]) for p in probs[:, 0]]

        def default_monitor(self, imbalance):
            return "val_loss"

        def present_labels(self, targets):
            return [0]

    register_task(OneLogit)
    yield OneLogit
    TASKS.pop(OneLogit.name)


def test_a_registered_task_trains_predicts_and_exports(toy_task, flat_data: Path, tmp_path: Path) -> None:
    """The seam: a task defined in this test alone goes through --task, the data side,
    the converged probe, fine-tuning, predict, evaluate, export and the CLI's writers."""
    from conftest import TINY
    from visiontune.cli import main

    # 4 epochs at a high LR: the tiny random-weight model learns this task slowly, and an
    # accuracy bar on 5 validation images after 2 epochs passed on 3 seeds of 8
    run = vt.fit(flat_data, task="one-logit", strategy="gradual", epochs=4, lr=3e-2, output=str(tmp_path), **TINY)
    assert run.setup.task.name == "one-logit" and run.setup.model.head[-1].out_features == 1
    assert run.metrics["val_loss"] < math.log(2) - 0.02, run.metrics  # it learned: below the loss of chance
    preds, _ = vt.predict(run.run_dir, flat_data)
    right = sum(p.label == Path(p.path).parent.name for p in preds) / len(preds)
    assert vt.evaluate(run.run_dir, flat_data).metrics["accuracy"] == pytest.approx(right)  # one decoding
    assert main(["predict", run.run_dir, str(flat_data), "--output", str(tmp_path / "p.csv")]) == 0
    assert (tmp_path / "p.csv").read_text().splitlines()[0] == "path,label,prob,unknown,ood_score"  # a bank: OOD columns
    pytest.importorskip("onnxruntime")
    from visiontune.deploy.export import export

    assert export(run.run_dir, "onnx", tmp_path / "m.onnx").max_abs_diff < 1e-3
    again, _ = vt.predict(str(tmp_path / "m.onnx"), flat_data)
    assert [p.label for p in again] == [p.label for p in preds]
