"""mkdocs hooks: pages that include the repository's own files (README, ARCHITECTURE,
bench/RESULTS.md, CHANGELOG: one copy of each text, the docs site renders it), the CLI
reference generated from the real parser, and the benchmark figures copied alongside."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[1]
INCLUDE = re.compile(r"<!-- include (\S+) -->")
FIGURES = ("scale.png", "label_efficiency.png")


NOTEBOOK = "examples/quickstart.ipynb"  # the README links it: served at the same path


def on_files(files, config):
    """The benchmark figures RESULTS.md shows, served next to results.md, and the notebook."""
    for name in FIGURES:
        if (ROOT / "bench" / name).is_file():
            files.append(File(name, str(ROOT / "bench"), config["site_dir"], config["use_directory_urls"]))
    files.append(File(NOTEBOOK, str(ROOT), config["site_dir"], config["use_directory_urls"]))
    return files


def on_page_markdown(markdown, page, config, files):
    markdown = INCLUDE.sub(lambda m: (ROOT / m.group(1)).read_text(encoding="utf-8"), markdown)
    markdown = markdown.replace("](ARCHITECTURE.md)", "](architecture.md)")  # README's links, as the site lays
    markdown = markdown.replace("](docs/guides/", "](guides/").replace("](docs/report.png", "](report.png")
    markdown = markdown.replace("](bench/RESULTS.md", "](results.md").replace("](bench/", "](")  # the pages out
    markdown = markdown.replace("](../docs/decisions/", "](decisions/").replace("](../../scale.png", "](scale.png")
    markdown = markdown.replace("](../../label_efficiency.png", "](label_efficiency.png")
    markdown = markdown.replace("](results/archive/2026-11-results-diary.md", "](results-diary.md")
    markdown = markdown.replace("](../../bench/results/archive/2026-11-results-diary.md", "](../results-diary.md")
    if "<!-- cli-reference -->" in markdown:
        markdown = markdown.replace("<!-- cli-reference -->", cli_reference())
    return markdown


def cli_reference() -> str:
    """Every command's --help as it prints, then the environment variables and exit status
    (cli.ENVIRONMENT, cli.EXIT_CODES: the same text as `visiontune --help`'s)."""
    from visiontune.cli import STREAMS, build_parser, environment_text, exit_codes_text

    parser = build_parser()
    out = [f"## Every command\n\n{STREAMS}\n\n```text\n{environment_text()}\n\n{exit_codes_text()}\n```\n"]
    for name, command in parser._subparsers._group_actions[0].choices.items():  # noqa: SLF001
        out.append(f"## visiontune {name}\n\n{_help_of(parser, name)}\n")
        out.append("```text\n" + command.format_help().replace("```", "'''") + "```\n")
    return "\n".join(out)


def _help_of(parser: argparse.ArgumentParser, name: str) -> str:
    for action in parser._subparsers._group_actions[0]._choices_actions:  # noqa: SLF001
        if action.dest == name:
            return action.help or ""
    return ""
