#!/usr/bin/env bash
# README command 1: set up, then run the main job end to end (offline): write scikit-image's
# faces / non-faces images as a folder, fine-tune the default pretrained backbone, print metrics.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh demo   # .[demo]: what the demo needs, no test tools
bin=.venv/bin
[ -d .venv/Scripts ] && bin=.venv/Scripts  # a venv made by Windows' Python (Git Bash)
exec "$bin"/visiontune demo "$@"
