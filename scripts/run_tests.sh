#!/usr/bin/env bash
# Command 2: set up, then lint and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export NO_ALBUMENTATIONS_UPDATE=1
export PATH="$PWD/.venv/bin:$PATH"  # dvc.yaml runs `taxonomist <stage>`
.venv/bin/ruff check src tests benchmarks notebooks
.venv/bin/python -m pytest "$@"
