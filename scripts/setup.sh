#!/usr/bin/env bash
# Create ./.venv (once) and install visiontune with its test and demo extras.
# torch 2.14.1 / torchvision 0.29.1 are pinned: the versions this project is built and tested on.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
stamp=.venv/.visiontune-installed
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
pip_install() {  # pip's notes about local index folders it skips are noise here
    .venv/bin/python -m pip install --quiet "$@" 2> >(grep -v "is ignored: it is neither" >&2)
}
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    pip_install --upgrade pip
    pip_install torch==2.14.1 torchvision==0.29.1
    pip_install -e ".[dev]"
    echo "$want" > "$stamp"
fi
