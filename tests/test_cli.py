"""The habits every `visiontune` command shares (cli.py): each takes only the options it
reads, shows defaults one way, has every flag in the generated reference, one spelling per
flag (old ones still work, saying so), the environment listed in one place, progress bars on
a terminal that --no-progress and -q hide, results on stdout and messages on stderr, the
documented exit codes, and a word when a given option has no effect."""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import fcntl
import importlib.util
import inspect
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import visiontune as vt
import visiontune.config as C
from conftest import TINY, ServerProcess, make_class_folders
from visiontune.cli import ENVIRONMENT, EXIT_CODES, NOT_USED, build_parser, main
from visiontune.command_config import COMMAND_CONFIGS, command_fields
from visiontune.commands import COMMANDS
from visiontune.config import RunConfig, cli_option_keys, ineffective, option_key

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "visiontune"
OWN = ("help", "quiet", "verbose")


def _commands() -> dict[str, argparse.ArgumentParser]:
    return build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]  # noqa: SLF001


def _options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """The options --help lists (not the hidden, unused ones)."""
    return [a for a in parser._actions if a.option_strings and a.help != argparse.SUPPRESS]  # noqa: SLF001


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("cli")
    make_class_folders(root / "data" / "train", {"red": 8, "green": 8})
    make_class_folders(root / "data" / "valid", {"red": 4, "green": 4}, 100)
    make_class_folders(root / "data" / "test", {"red": 4, "green": 4}, 200)
    result = vt.fit(root / "data", **dict(TINY, strategy="finetune", epochs=2, lr=1e-2, output=str(root / "runs")))
    return Path(result.run_dir), root / "data"


# -- each command takes only the options it reads ----------------------------------------------
def _attributes_read(*objects: object) -> set[str]:
    """Every attribute (and name, and identifier-like string: getattr's) in the source of
    `objects` (functions, classes)."""
    names: set[str] = set()
    for obj in objects:
        tree = ast.parse(textwrap.dedent(inspect.getsource(obj)))  # type: ignore[arg-type]
        names |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
        names |= {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
        names |= {n.value for n in ast.walk(tree)  # getattr(args, "freeze")
                  if isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value.isidentifier()}
    return names


def _whole_groups(config: type) -> set[str]:
    """The groups a config method passes on whole (`dataclasses.asdict(self.frozen)`)."""
    source = inspect.getsource(config)
    return set(re.findall(r"asdict\(self\.(\w+)\)", source))


@pytest.mark.parametrize("name", sorted(_commands()))
def test_each_option_a_command_accepts_is_read_by_its_body(name: str) -> None:
    """Statically: every option of a command's config (command_config.py) is read by the
    command's body (or, for a group passed on whole, by its config); every hand-written
    argument is read as args.NAME; run options go through `_overrides`, which reads them
    all (which of those the command's library call reads: the next test)."""
    body = COMMANDS[name]
    read = _attributes_read(body)
    module = sys.modules[body.__module__]
    helpers = [getattr(module, n) for n in read if n.startswith("_") and inspect.isfunction(getattr(module, n, None))]
    read |= _attributes_read(*helpers)  # what the body's helpers read (_progress, _overrides...)
    config = COMMAND_CONFIGS.get(name)
    if config is not None:
        read |= _attributes_read(config)
        whole = _whole_groups(config)
        groups = {f.name: type(f.default_factory()) for f in dataclasses.fields(config) if f.metadata.get("group")}
        inside = {g.name: group for group, cls in groups.items() for g in dataclasses.fields(cls)}
        unread = [f.name for f in command_fields(config) if f.name not in read and inside.get(f.name) not in whole]
        assert not unread, f"{name} accepts options its body never reads: {unread}"
        return
    run_keys = set(cli_option_keys()) if "_overrides" in read else set()
    given = {"config"} if "_base_config" in read else set()
    unread = [a.dest for a in _commands()[name]._actions  # noqa: SLF001
              if a.dest not in OWN and not a.dest.startswith("unused_") and a.dest not in read | run_keys | given]
    assert not unread, f"{name} accepts arguments its body never reads: {unread}"


SECTIONS = [C.DataConfig, C.ModelConfig, C.StrategyConfig, C.TrainConfig, C.OutputConfig, C.AugmentConfig,
            C.RuntimeConfig, C.TrackingConfig, C.BudgetConfig, C.RunConfig]
# reads that use no option: checks, copies, comparisons and the written config.yaml
NOT_USES = {"check_fields", "validate", "create", "to_dict", "__eq__", "__hash__", "__repr__", "replace",
            "_asdict_inner", "asdict", "deepcopy", "_deepcopy_dict", "_reconstruct"}
# options read only with inputs these runs lack: --csv's columns, a Hugging Face dataset's, shards' --valid, SGD's,
# freeze-k's, gradual's
NEEDS_OTHER_INPUT = {"csv_path_col", "csv_label_col", "image_col", "label_col", "valid", "momentum", "freeze",
                     "freeze_epochs"}


@contextlib.contextmanager
def _options_read(monkeypatch: pytest.MonkeyPatch) -> Iterator[set[str]]:
    """The option keys visiontune's code reads from a config while the block runs (the
    config objects record each field read; the command itself runs as it does for a user)."""
    read: set[str] = set()
    for cls in SECTIONS:
        keys = {f.name: option_key(f) for f in dataclasses.fields(cls) if f.name not in C.SECTION_TITLES}

        def get(self: object, attr: str, _keys: dict[str, str] = keys) -> object:
            if attr in _keys:
                caller = sys._getframe(1)  # noqa: SLF001
                if caller.f_code.co_name not in NOT_USES and caller.f_globals.get("__name__", "").startswith(
                        "visiontune."):
                    read.add(_keys[attr])
            return object.__getattribute__(self, attr)

        monkeypatch.setattr(cls, "__getattribute__", get, raising=False)
    yield read


@pytest.mark.parametrize("name", ["advise", "shard", "lr-find"])
def test_each_run_option_a_command_accepts_is_read_and_those_it_leaves_out_are_not(
        name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The commands that do not train (advise, shard, lr-find's range test) accept only the
    run options they read: run for real, every option their --help offers is read (but
    those that need an input this run lacks), and none of those they leave out (NOT_USED)."""
    data = make_class_folders(tmp_path / "d", {"red": 8, "green": 8})
    model = ["--backbone", "timm:test_efficientnet", "--weights", "none", "--image-size", "32", "--num-workers", "0"]
    argv = {"advise": ["advise", str(data), *model], "shard": ["shard", str(data), "--output", str(tmp_path / "s")],
            "lr-find": ["lr-find", str(data), *model, "--num-iter", "5", "--strategy", "finetune",
                        "--output", str(tmp_path / "r")]}[name]
    accepted = {a.dest for a in _options(_commands()[name])} & set(cli_option_keys())
    with _options_read(monkeypatch) as read:
        assert main(argv) == 0
    assert not accepted - read - NEEDS_OTHER_INPUT, f"{name} offers options it never read: {accepted - read}"
    assert not NOT_USED[name] & read, f"{name} reads options it leaves out: {NOT_USED[name] & read}"


@pytest.mark.parametrize("argv,flags", [
    (["advise", "d", "--output", "o", "--name", "n", "--track", "tensorboard", "--patience", "2"],
     ["--output", "--name", "--track", "--patience"]),
    (["shard", "d", "--output", "s", "--unlabeled", "pool/"], ["--unlabeled"]),
    (["lr-find", "d", "--patience", "2", "--no-restore-best"], ["--patience", "--no-restore-best"]),
])
def test_an_option_a_command_does_not_use_is_gone_from_its_help_and_still_accepted_with_a_warning(
        argv: list[str], flags: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    args = build_parser().parse_args(argv)
    err = capsys.readouterr().err
    offered = {s for a in _options(_commands()[argv[0]]) for s in a.option_strings}
    for flag in flags:
        assert f"warning: {argv[0]} does not use {flag}: it has no effect here" in err
        assert flag not in offered
    assert not any(getattr(args, k, None) for k in ("name", "track", "ema", "unlabeled", "patience"))


# -- one spelling, one meaning ---------------------------------------------------------------
def test_each_flag_has_one_spelling_and_the_other_still_works(capsys: pytest.CaptureFixture[str]) -> None:
    """--unlabeled / --labeled (train, suggest): the British spellings are the same flag;
    imagify's CSV column is --csv-label-col as train's (--label-col, train's Hugging Face
    column, still works there with a warning); --out still works too."""
    parser = build_parser()
    assert parser.parse_args(["train", "d", "--unlabelled", "p"]).unlabeled == "p"
    assert parser.parse_args(["train", "d", "--unlabeled", "p"]).unlabeled == "p"
    assert parser.parse_args(["suggest", "p", "--labelled", "d"]).labeled == "d"
    assert parser.parse_args(["suggest", "p", "--labeled", "d"]).labeled == "d"
    assert capsys.readouterr().err == ""  # spellings, not renames: no warning
    assert parser.parse_args(["imagify", "t.csv", "--output", "o", "--label-col", "y"]).csv_label_col == "y"
    assert "warning: --label-col is now --csv-label-col (--label-col still works)" in capsys.readouterr().err
    assert parser.parse_args(["imagify", "t.csv", "--output", "o", "--csv-label-col", "y"]).csv_label_col == "y"
    assert parser.parse_args(["imagify", "t.csv", "--output", "o"]).csv_label_col == "label"
    helps = {name: cmd.format_help() for name, cmd in _commands().items()}
    assert "Hugging Face dataset: the label column" in helps["train"] and "CSV column" in helps["imagify"]


@pytest.mark.parametrize("name", sorted(_commands()))
def test_output_says_whether_it_is_a_file_or_a_folder(name: str) -> None:
    """--output is a file where the command writes one, a folder where it writes several,
    and --help says which (FILE / FOLDER; export's is a file but for --format timm)."""
    action = next((a for a in _options(_commands()[name]) if "--output" in a.option_strings), None)
    if action is None:
        assert name in ("push", "inspect", "cache", "serve", "advise"), f"{name} writes and takes no --output"
        return
    assert action.metavar in ("FILE", "FOLDER", "PATH"), name
    if action.metavar == "PATH":
        assert name == "export" and "a folder for --format timm" in action.help
    else:
        assert action.help.lower().startswith(action.metavar.lower()) or action.metavar.lower() in action.help


def test_interpret_writes_into_the_output_folder(trained: tuple[Path, Path], tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    run, _ = trained
    out = tmp_path / "views"
    assert main(["interpret", str(run), "--output", str(out), "--top-n", "4"]) == 0
    assert (out / "report.html").is_file() and (out / "confusion.csv").is_file()
    assert not (run / "interpret").exists()
    assert f"artefacts in {out}" in capsys.readouterr().out


def test_review_writes_its_answers_into_the_output_file_and_leaves_the_label_file(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """review --label CSV --output FILE: a real server; the answer lands in FILE (a copy of
    CSV), CSV keeps its bytes; a run's review refuses --output (its decisions have one place)."""
    pool = sorted(make_class_folders(tmp_path / "pool", {"red": 2, "green": 1}).rglob("*.png"))
    given = tmp_path / "to_label.csv"
    given.write_text("path,label,prediction,reason,score\n" + "".join(f"{p},,red,uncertain,0.5\n" for p in pool))
    before, out = given.read_bytes(), tmp_path / "answers.csv"
    server = ServerProcess(["review", "--label", str(given), "--output", str(out)], tmp_path / "log")
    try:
        status, queue = server.request("GET", "/api/queue")
        assert status == 200 and len(queue["items"]) == 3  # type: ignore[index]
        first = queue["items"][0]  # type: ignore[index]
        assert server.request("POST", "/api/label", {"id": first["id"], "label": "green"})[0] == 200
    finally:
        server.stop()
    assert given.read_bytes() == before
    answered = {row.split(",")[0]: row.split(",")[1] for row in out.read_text().splitlines()[1:]}
    assert sorted(answered.values()) == ["", "", "green"] and f"answers go into {out}" in server.output()
    assert main(["review", str(tmp_path / "some-run"), "--output", str(out)]) == 2
    assert "--output are for --label" in capsys.readouterr().err


# -- --help and the reference ----------------------------------------------------------------
def _default_of(action: argparse.Action, name: str) -> object:
    """The default an option has: argparse's, else its config field's."""
    if action.default not in (None, argparse.SUPPRESS):
        return action.default
    fields = (command_fields(COMMAND_CONFIGS[name]) if name in COMMAND_CONFIGS else
              (f for _, f in C.option_fields()))
    return next((f.default for f in fields if option_key(f) == action.dest and not f.metadata.get("positional")),
                None)


@pytest.mark.parametrize("name", sorted(_commands()))
def test_every_help_shows_defaults_one_way(name: str) -> None:
    """An option with a default ends its help with '(default: X)' (a value held by argparse
    or by the config alike); one without says what happens in the same words."""
    command = _commands()[name]
    formatter = command._get_formatter()  # noqa: SLF001
    for action in _options(command):
        shown = formatter._get_help_string(action) or ""  # noqa: SLF001
        assert action.help, f"{name} {action.option_strings[0]} has no help"
        assert not re.search(r"\(default [^:]|\(\d[^)]*\)$|default \w+\)$", shown), (name, shown)
        default = _default_of(action, name)
        if action.nargs != 0 and default not in (None, "", ()):
            assert shown.endswith(f"(default: {default!r})" if str(default).strip() == "" else f"(default: {default})"), \
                (name, action.option_strings[0], shown)


def _reference() -> str:
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs" / "hooks.py")
    hooks = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(hooks)  # type: ignore[union-attr]
    return hooks.cli_reference()


def test_every_flag_has_a_line_in_the_generated_reference() -> None:
    """docs/cli.md's reference (docs/hooks.py) holds every command and every flag it offers
    with its help (--trust-pickle, --saliency, --freeze-epochs, --optimizer...), the
    environment variables and the exit codes."""
    reference = _reference()
    missing = []
    for name, command in _commands().items():
        section = reference.split(f"## visiontune {name}\n", 1)[1].split("\n## visiontune ", 1)[0]
        for action in _options(command):
            words = "".join(action.help.split()[:3]).replace("%%", "%")  # --help wraps lines, at hyphens too
            if any(s not in section for s in action.option_strings) or words not in "".join(section.split()):
                missing.append(f"{name} {action.option_strings[0]}")
    assert not missing, missing
    for flag in ("--trust-pickle", "--saliency", "--freeze-epochs", "--optimizer", "--weight-decay", "--momentum",
                 "--no-restore-best", "--min-delta"):
        assert flag in reference
    assert all(name.split(",")[0] in reference for name in ENVIRONMENT)
    assert all(f"  {code:3d}  " in reference for code in EXIT_CODES)


def test_every_environment_variable_the_code_reads_is_listed_in_one_place() -> None:
    """`visiontune --help` and the reference list every variable visiontune's code reads."""
    listed = {n.strip() for names in ENVIRONMENT for n in names.split(",")}
    read = set()
    for path in PACKAGE.rglob("*.py"):
        read |= set(re.findall(r"environ(?:\.get)?[\[(]\"([A-Z_]+)\"", path.read_text()))
    assert read and read <= listed, read - listed
    assert {"VISIONTUNE_CACHE", "VISIONTUNE_OFFLINE", "VISIONTUNE_LOCK_WAIT", "VISIONTUNE_CACHE_MAX",
            "XDG_CACHE_HOME"} <= listed
    text = build_parser().format_help()
    assert all(n in text for n in listed) and "exit status:" in text


def test_device_is_documented_wherever_it_exists() -> None:
    for name, command in _commands().items():
        for action in _options(command):
            if "--device" in action.option_strings:
                assert "cuda:N" in action.help and "mps" in action.help and "Apple" in action.help, name
                assert "(default: " in (command._get_formatter()._get_help_string(action) or ""), name  # noqa: SLF001


# options whose default is described rather than held: each says it as "(default: ...)" too
DESCRIBED = {"--cache-dir", "--csv-path-col", "--csv-label-col", "--stride", "--device"}


def test_a_default_described_in_words_is_shown_as_a_default() -> None:
    """suggest --device said nothing of its default; --cache-dir said "($VISIONTUNE_CACHE or
    ~/.cache/visiontune)" in train and "the cache's root (default: ...)" in cache, each
    without $XDG_CACHE_HOME; --csv-path-col "(path/file/filename/image, else the 1st)"."""
    cache_dirs = set()
    for name, command in _commands().items():
        for action in _options(command):
            if DESCRIBED & set(action.option_strings):
                shown = command._get_formatter()._get_help_string(action) or ""  # noqa: SLF001
                assert "(default: " in shown, (name, action.option_strings[0], shown)
            if "--cache-dir" in action.option_strings:
                cache_dirs.add(action.help.split("(default: ", 1)[1])
    assert cache_dirs == {"$VISIONTUNE_CACHE, else $XDG_CACHE_HOME/visiontune, else ~/.cache/visiontune)"}


# -- progress, streams, exit codes ------------------------------------------------------------
def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(os.path.abspath(p) for p in sys.path if p),
            "PYTHONUNBUFFERED": "1", "COLUMNS": "100"}


def _on_a_terminal(argv: list[str], cwd: Path) -> tuple[int, str, str]:
    """`visiontune ARGV` with its stderr on a pseudo-terminal (as a user's shell gives it)
    and its stdout on a pipe: (exit status, stdout, what the terminal showed)."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a terminal's size: tqdm draws to it
    proc = subprocess.Popen([sys.executable, "-m", "visiontune", *argv], cwd=cwd, env=_env(), stdout=subprocess.PIPE,
                            stderr=follower, text=True)
    os.close(follower)
    shown = b""
    while True:
        ready, _, _ = select.select([leader], [], [], 1.0)
        if ready:
            try:
                chunk = os.read(leader, 65536)
            except OSError:
                break
            if not chunk:
                break
            shown += chunk
        elif proc.poll() is not None:
            break
    out = proc.stdout.read()  # type: ignore[union-attr]
    os.close(leader)
    return proc.wait(timeout=60), out, shown.decode(errors="replace")


def test_long_commands_show_progress_on_a_terminal_and_no_progress_and_q_hide_it(
        trained: tuple[Path, Path], tmp_path: Path) -> None:
    run, data = trained
    code, out, shown = _on_a_terminal(["evaluate", str(run), str(data / "test")], tmp_path)
    assert code == 0 and "accuracy" in out
    assert re.search(r"eval: +\d+%\|", shown), shown  # tqdm's bar, on the terminal
    assert "accuracy" not in shown  # the results are not on stderr
    code, out, shown = _on_a_terminal(["predict", str(run), str(data), "--batch-size", "4"], tmp_path)
    assert code == 0 and len(out.splitlines()) == 32 and re.search(r"eval: +\d+%\|", shown)  # stdout piped: a bar
    for quiet in (["--no-progress"], ["-q"]):
        code, out, shown = _on_a_terminal(["evaluate", str(run), str(data / "test"), *quiet], tmp_path)
        assert code == 0 and "accuracy" in out and "%|" not in shown, (quiet, shown)


def test_shard_shows_progress_on_a_terminal_unless_told_not_to(tmp_path: Path) -> None:
    data = make_class_folders(tmp_path / "d", {"red": 6, "green": 6})
    code, out, shown = _on_a_terminal(["shard", str(data), "--output", str(tmp_path / "s")], tmp_path)
    assert code == 0 and "shards and dataset.json" in out and re.search(r"shard train: +\d+%\|", shown), shown
    code, out, shown = _on_a_terminal(["shard", str(data), "--output", str(tmp_path / "t"), "--no-progress"], tmp_path)
    assert code == 0 and "shards and dataset.json" in out and "%|" not in shown


MODEL = ["--backbone", "timm:test_efficientnet", "--weights", "none", "--image-size", "32", "--num-workers", "0"]


def test_lr_find_and_cv_show_progress_on_a_terminal_and_no_progress_and_q_hide_it(tmp_path: Path) -> None:
    """lr-find's steps and cv's folds show a bar on a terminal; --no-progress and -q hide it."""
    data = make_class_folders(tmp_path / "d", {"red": 6, "green": 6})
    find = ["lr-find", str(data), *MODEL, "--num-iter", "8", "--strategy", "finetune", "--output", str(tmp_path / "r")]
    code, out, shown = _on_a_terminal(find, tmp_path)
    assert code == 0 and "suggested lr" in out and re.search(r"lr-find: +\d+%\|", shown), shown
    code, out, shown = _on_a_terminal([*find, "--no-progress"], tmp_path)
    assert code == 0 and "suggested lr" in out and "%|" not in shown, shown
    cv = ["cv", str(data), *MODEL, "--folds", "2", "--selection", "last", "--strategy", "finetune", "--epochs", "1",
          "--patience", "0", "--output", str(tmp_path / "cv")]
    code, out, shown = _on_a_terminal(cv, tmp_path)
    assert code == 0 and "mean +- std" in out and re.search(r"cv folds: +\d+%\|", shown), shown
    code, out, shown = _on_a_terminal([*cv, "-q"], tmp_path)
    assert code == 0 and "mean +- std" in out and "%|" not in shown, shown


def test_export_int8_shows_its_passes_on_a_terminal_unless_told_not_to(trained: tuple[Path, Path],
                                                                       tmp_path: Path) -> None:
    """export --int8: reading the calibration images, static int8's calibration and each
    scoring pass show a bar; --no-progress hides them."""
    run, _ = trained
    argv = ["export", str(run), "--output", str(tmp_path / "m.onnx"), "--int8", "--max-drop", "100"]
    code, out, shown = _on_a_terminal(argv, tmp_path)
    assert code == 0 and "int8 (" in out, shown
    for desc in ("int8 read calibration", "int8 score fp32", "int8 calibrate static", "int8 score static"):
        assert re.search(desc + r": +\d+%\|", shown), (desc, shown)
    code, out, shown = _on_a_terminal([*argv, "--no-progress"], tmp_path)
    assert code == 0 and "int8 (" in out and "%|" not in shown, shown


def test_results_go_to_stdout_and_messages_to_stderr(trained: tuple[Path, Path], tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    run, data = trained
    assert main(["predict", str(run), str(data / "test"), "--output", str(tmp_path / "p.csv"), "--top-k", "1"]) == 0
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 8 and all(line.startswith(str(data / "test")) for line in out.splitlines())
    assert "wrote 8 predictions" in err
    assert main(["evaluate", str(run), str(data / "test"), "--output", str(tmp_path / "e.json")]) == 0
    out, err = capsys.readouterr()
    assert "accuracy" in out and "wrote" not in out and f"wrote {tmp_path / 'e.json'}" in err
    assert main(["evaluate", str(run), str(tmp_path / "nowhere")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: ")


def test_exit_codes_are_what_the_help_says(trained: tuple[Path, Path], tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """0 done; 1 nothing could be done (no image predict could read); 2 the user's input (a
    bad value, a missing file, an int8 model over --max-drop: the fp32 export is kept)."""
    run, data = trained
    assert main(["predict", str(run), str(data / "test" / "red")]) == 0
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "notes.jpg").write_text("not an image")
    assert main(["predict", str(run), str(tmp_path / "bad")]) == 1
    assert main(["predict", str(run), str(data), "--top-k", "0"]) == 2
    assert main(["predict", str(tmp_path / "no-run"), str(data)]) == 2
    with pytest.raises(SystemExit) as bad:
        main(["predict", str(run), str(data), "--engine", "tpu"])
    assert bad.value.code == 2
    capsys.readouterr()
    fp32 = tmp_path / "m.onnx"
    assert main(["export", str(run), "--output", str(fp32), "--int8", "--max-drop", "-101"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "int8 refused" in err and fp32.is_file()
    assert "--max-drop" in EXIT_CODES[2] and "130" in build_parser().format_help()


def test_a_bad_file_given_is_one_error_line_and_exit_2_before_any_work(
        trained: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """interpret --oof / --saliency naming a missing file (or a CSV that is no oof.csv) and
    train --config naming a missing or broken YAML ended in a traceback and exit status 1."""
    run, data = trained
    (tmp_path / "p.csv").write_text("path,label,prob\nx.png,red,0.9\n")  # predictions, not cv's oof.csv
    (tmp_path / "bad.yaml").write_text("epochs: [1\n")
    views = tmp_path / "views"
    for argv, said in [(["interpret", str(run), "--oof", str(tmp_path / "none.csv")], "no such file"),
                       (["interpret", str(run), "--oof", str(tmp_path / "p.csv")], "no column prob_green"),
                       (["interpret", str(run), "--saliency", str(tmp_path / "none.png")], "--saliency"),
                       (["train", str(data), "--config", str(tmp_path / "none.yaml")], "none.yaml: cannot be read"),
                       (["train", str(data), "--config", str(tmp_path / "bad.yaml")], "bad.yaml: cannot be read")]:
        assert main([*argv, "--output", str(views)]) == 2, argv
        out, err = capsys.readouterr()
        assert out == "" and err.splitlines()[-1].startswith("error: ") and said in err.splitlines()[-1], err
        assert "Traceback" not in err and not list(views.rglob("*.*"))  # nothing written


def test_an_option_a_command_does_not_use_in_this_call_is_named(
        trained: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """export --max-drop / --calibration without --int8, and suggest --run with the frozen
    model's --backbone / --image-size, were accepted in silence."""
    run, _ = trained
    assert main(["export", str(run), "--output", str(tmp_path / "m.onnx"), "--max-drop", "0.5"]) == 0
    err = capsys.readouterr().err
    assert "warning: export does not use --max-drop without --int8: it has no effect here" in err
    assert "--calibration" not in err
    pool = make_class_folders(tmp_path / "pool", {"red": 2, "green": 2}, start_seed=500)
    assert main(["suggest", str(pool), "--run", str(run), "--backbone", "timm:resnet18", "--image-size", "64",
                 "--n", "2", "--output", str(tmp_path / "s.csv"), "--no-progress"]) == 0
    out, err = capsys.readouterr()
    for flag in ("--backbone", "--image-size"):
        assert f"warning: suggest does not use {flag} with --run (its model and preprocessing are used)" in err
    assert "warning" not in out


def test_an_interrupted_command_exits_130(tmp_path: Path) -> None:
    """Ctrl+C (SIGINT) during training: one line, exit status 130."""
    data = make_class_folders(tmp_path / "d", {"red": 8, "green": 8})
    argv = ["train", str(data), "--backbone", "timm:test_efficientnet", "--weights", "none", "--image-size", "32",
            "--num-workers", "0", "--strategy", "finetune", "--epochs", "100000", "--patience", "0",
            "--output", str(tmp_path / "runs")]
    proc = subprocess.Popen([sys.executable, "-m", "visiontune", *argv], env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list((tmp_path / "runs").glob("*/checkpoints/last.pt")) and proc.poll() is None \
            and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err.splitlines()[-1]


# -- an option that has no effect -------------------------------------------------------------
def test_an_option_given_without_effect_is_named() -> None:
    base = RunConfig.create(None, strategy="feature-extract")
    assert ineffective(base, ["epochs", "lr", "backbone"]) == [
        f"--{k} has no effect in this run: feature-extract's converged probe fits the head in one pass, with no "
        "optimizer, schedule or epochs (--probe sgd trains the head for --epochs with them)" for k in ("epochs", "lr")]
    sgd = RunConfig.create(None, strategy="feature-extract", probe="sgd")
    assert ineffective(sgd, ["epochs", "lr"]) == []
    assert ineffective(RunConfig.create(None, strategy="gradual"), ["epochs", "gamma", "momentum", "freeze",
                                                                    "freeze_epochs", "ema_decay"]) == [
        "--gamma has no effect in this run: it applies with --schedule step",
        "--momentum has no effect in this run: it applies with --optimizer sgd",
        "--freeze has no effect in this run: it applies with --strategy freeze-k",
        "--ema-decay has no effect in this run: it applies with --ema"]
    assert ineffective(RunConfig.create(None, schedule="step", optimizer="sgd", ema=True),
                       ["gamma", "momentum", "ema_decay", "freeze_epochs"]) == []


def test_train_says_when_epochs_cannot_apply(tmp_path: Path) -> None:
    """The demo's `--strategy feature-extract --epochs 6`: the converged probe is one pass,
    and `visiontune train` says so (on stderr)."""
    data = make_class_folders(tmp_path / "d", {"red": 6, "green": 6})
    done = subprocess.run([sys.executable, "-m", "visiontune", "train", str(data), "--backbone", "timm:test_efficientnet",
                           "--weights", "none", "--image-size", "32", "--num-workers", "0", "--strategy",
                           "feature-extract", "--epochs", "6", "--output", str(tmp_path / "runs")],
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "--epochs has no effect in this run: feature-extract's converged probe" in done.stderr
    assert "no effect" not in done.stdout and "run: " in done.stdout
