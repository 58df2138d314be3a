"""The README and the guides cannot drift from the code: every `visiontune` command in their
code blocks parses with the real parser, and every Python snippet's visiontune imports (and `vt.`
names) resolve. Also the CHANGELOG, ARCHITECTURE and the examples in `--help`."""

from __future__ import annotations

import ast
import importlib
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import visiontune
from visiontune.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
GUIDES = sorted((ROOT / "docs" / "guides").glob("*.md"))
DOCS = [ROOT / "README.md", ROOT / "ARCHITECTURE.md", ROOT / "CHANGELOG.md", *GUIDES]


def code_blocks(path: Path) -> list[tuple[str, str, int]]:
    """(language, text, first line) of each fenced block."""
    blocks, lines = [], path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("```"):
            lang, start, i = lines[i][3:].strip(), i + 1, i + 1
            while i < len(lines) and not lines[i].startswith("```"):
                i += 1
            blocks.append((lang, "\n".join(lines[start:i]), start + 1))
        i += 1
    return blocks


def commands(path: Path) -> list[tuple[int, list[str]]]:
    """(line, argv after `visiontune`) of every command line in the file's shell blocks."""
    found = []
    for lang, text, first in code_blocks(path):
        if lang not in ("bash", "sh", "shell", ""):
            continue
        for offset, line in enumerate(text.replace("\\\n", " ").splitlines()):
            words = shlex.split(line, comments=True)
            if "visiontune" in words:  # also `torchrun ... -m visiontune train ...`
                argv = [w for w in words[words.index("visiontune") + 1:] if w != "..."]
                found.append((first + offset, argv))
    return found


README_COMMANDS = [(f"{p.name}:{n}", argv) for p in [ROOT / "README.md", *GUIDES] for n, argv in commands(p)]


def test_the_docs_show_commands() -> None:
    assert len(GUIDES) >= 5 and len(README_COMMANDS) > 30


def parses(argv: list[str]) -> bool:
    """Whether `visiontune ARGV` parses with the real parser (no abbreviations)."""
    parser = build_parser()
    for p in (parser, *parser._subparsers._group_actions[0].choices.values()):  # noqa: SLF001
        p.allow_abbrev = False  # `--epoch 3` must not pass for `--epochs 3`
    try:
        parser.parse_args(argv)
    except SystemExit:
        return False
    return True


@pytest.mark.parametrize("line,argv", README_COMMANDS, ids=[n for n, _ in README_COMMANDS])
def test_every_readme_command_parses(line: str, argv: list[str]) -> None:
    assert parses(argv), f"{line}: `visiontune {' '.join(argv)}` does not parse"


def test_the_drift_check_fails_on_a_planted_bad_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The README's first command with one flag misspelt, in a file of its own, is caught."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    (_, good) = commands(ROOT / "README.md")[0]
    first = "visiontune " + " ".join(good[:2])
    planted = tmp_path / "README.md"
    planted.write_text(readme.replace(first, first + " --epoch 3", 1), encoding="utf-8")
    (_, bad) = commands(planted)[0]
    assert bad == [*good[:2], "--epoch", "3", *good[2:]]
    assert parses(good) and not parses(bad)
    capsys.readouterr()  # argparse's complaint about the planted flag


CITED = re.compile(r"\(RESULTS: ([a-z_]+(?:, [a-z_]+)*)[;)]")
FIGURE = re.compile(r"(?<![\w.])\d+(?:,\d{3})*(?:\.\d+)?")


def prose(path: Path) -> list[str]:
    """The file's sentences outside fenced blocks (a list item or table row ends one too),
    each as one line."""
    text = re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.S | re.M)
    parts = re.split(r"\n\s*\n|\n(?=\s*[-*|] )|(?<=[a-z)]\.)\s+(?=[A-Z`])", text)
    return [" ".join(p.split()) for p in parts if p.strip()]


def results_sections(page: str) -> dict[str, set[float]]:
    """Every number written in each `## bench: ...` section of bench/RESULTS.md."""
    parts = re.split(r"^## ([a-z_]+): .*$", page, flags=re.M)
    return {name: {float(n.replace(",", "")) for n in FIGURE.findall(body)} for name, body in zip(parts[1::2], parts[2::2])}


def uncited_figures(path: Path, sections: dict[str, set[float]]) -> list[str]:
    """Each figure written before a "(RESULTS: NAME)" citation (back to the previous citation
    or the sentence's start) that no named section of RESULTS.md holds; counts (integers up
    to 20: "4 sets", "1 label per class") and years are not figures."""
    wrong = []
    for para in prose(path):  # one sentence
        start = 0
        for cite in CITED.finditer(para):
            names = cite.group(1).split(", ")
            known = set().union(*(sections.get(n, set()) for n in names))
            wrong += [f"{path.name}: no section {n!r}" for n in names if n not in sections]
            for n in FIGURE.findall(para[start:cite.start()]):
                value = float(n.replace(",", ""))
                if "." in n or value > 20:
                    wrong += [] if value in known else [f"{path.name}: {n} (RESULTS: {cite.group(1)})"]
            start = cite.end()
    return wrong


def test_every_figure_cited_from_results_is_a_row_of_results() -> None:
    """A figure the README or a guide cites as "(RESULTS: NAME)" is in that section of the
    generated bench/RESULTS.md, so an edited figure or a re-measured one fails here."""
    sections = results_sections((ROOT / "bench" / "RESULTS.md").read_text(encoding="utf-8"))
    cited = [p for p in (ROOT / "README.md", *GUIDES) if CITED.search(p.read_text(encoding="utf-8"))]
    assert ROOT / "README.md" in cited and len(cited) >= 3
    assert not [w for p in cited for w in uncited_figures(p, sections)]


def test_the_citation_check_fails_on_a_planted_figure(tmp_path: Path) -> None:
    sections = results_sections((ROOT / "bench" / "RESULTS.md").read_text(encoding="utf-8"))
    planted = tmp_path / "README.md"
    planted.write_text((ROOT / "README.md").read_text(encoding="utf-8").replace("0.9505", "0.9605", 1), encoding="utf-8")
    assert uncited_figures(planted, sections) == ["README.md: 0.9605 (RESULTS: suite)"]
    planted.write_text("It is fast (RESULTS: nosuch).\n", encoding="utf-8")
    assert uncited_figures(planted, sections) == ["README.md: no section 'nosuch'"]


def python_snippets() -> list[tuple[str, int, str]]:
    return [(p.name, first, text) for p in DOCS for lang, text, first in code_blocks(p) if lang == "python"]


@pytest.mark.parametrize("name,line,text", python_snippets(), ids=lambda v: str(v)[:20])
def test_every_python_snippet_imports_what_exists(name: str, line: int, text: str) -> None:
    tree = ast.parse(text)
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("visiontune"):
            module = importlib.import_module(node.module)
            missing = [a.name for a in node.names if not hasattr(module, a.name)]
            assert not missing, f"{name}:{line}: {node.module} has no {missing}"
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("visiontune"):
                    importlib.import_module(a.name)
                    aliases[a.asname or a.name] = a.name
    for node in ast.walk(tree):  # vt.fit, vt.predict...: names the package really exports
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            module = importlib.import_module(aliases[node.value.id])
            assert hasattr(module, node.attr), f"{name}:{line}: {aliases[node.value.id]} has no {node.attr!r}"


def test_every_command_is_in_the_readme_table() -> None:
    table = (ROOT / "README.md").read_text(encoding="utf-8")
    names = build_parser()._subparsers._group_actions[0].choices  # noqa: SLF001
    missing = [n for n in names if not re.search(rf"\| `visiontune {re.escape(n)}\b", table)]
    assert not missing, f"commands without a row in the README's table: {missing}"


def test_named_modules_exist() -> None:
    """Every `visiontune/...py` or dotted `visiontune.x.y` module ARCHITECTURE and README
    name is a real module."""
    text = "\n".join(p.read_text(encoding="utf-8") for p in DOCS)
    files = ("json", "yaml", "csv", "md", "onnx", "safetensors")  # `visiontune.json` is a file name
    dotted = {n for n in re.findall(r"`(visiontune(?:\.[a-z_]+)+)", text) if n.rsplit(".", 1)[1] not in files}
    missing = []
    for name in sorted(dotted):
        try:
            importlib.import_module(name)
        except ModuleNotFoundError:
            parent, _, attr = name.rpartition(".")
            try:
                if not hasattr(importlib.import_module(parent), attr):
                    missing.append(name)
            except ModuleNotFoundError:
                missing.append(name)
    assert not missing, f"named in the docs but not in the code: {missing}"
    assert visiontune.__version__


def test_the_docs_site_builds_strictly(tmp_path: Path) -> None:
    """`mkdocs build --strict`: README, ARCHITECTURE, RESULTS and CHANGELOG as pages, the CLI
    reference from the real parser, the API from the docstrings; any warning fails."""
    try:
        import mkdocs  # noqa: F401
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("CI must have mkdocs ([dev] installs it)")
        pytest.skip("mkdocs is not installed")
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    cli = (tmp_path / "site" / "cli" / "index.html").read_text(encoding="utf-8")
    names = build_parser()._subparsers._group_actions[0].choices  # noqa: SLF001
    assert all(f"visiontune {n}" in cli for n in names)  # every command, from the parser
    assert "--unlabeled" in cli and "--time-budget" in cli  # options from the config metadata
    api = (tmp_path / "site" / "api" / "index.html").read_text(encoding="utf-8")
    assert "Rank the images of" in api  # a docstring, rendered by mkdocstrings
    assert (tmp_path / "site" / "label_efficiency.png").is_file() and not (tmp_path / "site" / "hooks.py").exists()
