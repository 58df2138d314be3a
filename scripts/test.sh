#!/usr/bin/env bash
# README command 2: set up, then run the lint and the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev    # .[dev]: every feature and the test tools
bin=.venv/bin
[ -d .venv/Scripts ] && bin=.venv/Scripts  # a venv made by Windows' Python (Git Bash)
"$bin"/ruff check src tests bench
export VISIONTUNE_ARTIFACTS="${VISIONTUNE_ARTIFACTS:-test-artifacts}"  # e.g. the rendered report.png
# two pytest-xdist workers of one thread each (tests/conftest.py); the tests that race a real
# clock (xdist_group "deadlines") run on one worker, one after another
exec "$bin"/python -m pytest -q -n "${VISIONTUNE_TEST_WORKERS:-2}" --dist loadgroup "$@"
