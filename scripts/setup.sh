#!/usr/bin/env bash
# Create ./.venv (once) and install visiontune with the extras named in $1: `demo` (command 1:
# what the demo needs, scikit-image) or `dev` (command 2, the default: every feature and the test
# tools: pytest, ruff, Playwright, mkdocs, ...). A venv set up for `dev` serves `demo` as it is.
# torch 2.14.1 / torchvision 0.29.1 are pinned: the versions this project is built and tested on.
# Linux, macOS (Apple Silicon) and Windows under Git Bash (its venv keeps programs in Scripts/).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python  # Windows' python.org installer names it python
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "visiontune needs Python 3.11 or newer; $PYTHON is $("$PYTHON" --version 2>&1)." >&2
    echo "Install one (e.g. apt-get install python3.11 python3.11-venv, or pyenv) or set PYTHON=/path/to/python3.11" >&2
    exit 1
fi
# Note: on Linux, PyPI's torch wheel pulls several GB of CUDA libraries; on a CPU-only machine
# set PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu (an extra index: everything else
# still comes from PyPI; PIP_INDEX_URL would replace PyPI and break the rest of the install) if
# the pinned versions are available there (here a local constraint provides them).
if [ ! -x .venv/bin/python ] && [ ! -x .venv/Scripts/python.exe ]; then
    "$PYTHON" -m venv .venv
fi
bin=.venv/bin
[ -d .venv/Scripts ] && bin=.venv/Scripts  # a venv made by Windows' Python
sha256() {  # coreutils' sha256sum; stock macOS has shasum instead
    if command -v sha256sum >/dev/null 2>&1; then sha256sum; else shasum -a 256; fi
}
EXTRAS="${1:-dev}"
stamp=.venv/.visiontune-installed
want="$EXTRAS $(cat pyproject.toml scripts/setup.sh | sha256 | cut -c1-16)"
# `dev` includes `demo`: a venv stamped for dev is already set up for the demo
[ "$EXTRAS" = demo ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "dev ${want#demo }" ] && exit 0
pip_install() {  # pip's notes about local index folders it skips are noise here
    "$bin/python" -m pip install --quiet "$@" 2> >(grep -v "is ignored: it is neither" >&2)
}
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    pip_install --upgrade pip
    pip_install torch==2.14.1 torchvision==0.29.1
    pip_install -e ".[$EXTRAS]"
    echo "$want" > "$stamp"
fi
