#!/usr/bin/env bash
# README command 2: set up, then run the lint and the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check src tests bench
export VISIONTUNE_ARTIFACTS="${VISIONTUNE_ARTIFACTS:-test-artifacts}"  # e.g. the rendered report.png
exec .venv/bin/python -m pytest -q "$@"
