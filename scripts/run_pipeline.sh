#!/usr/bin/env bash
# Command 1: set up, then run the default pipeline (dvc repro) on Fashion-MNIST.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export NO_ALBUMENTATIONS_UPDATE=1
export PATH="$PWD/.venv/bin:$PATH"  # dvc.yaml runs `taxonomist <stage>`
.venv/bin/taxonomist check
.venv/bin/dvc repro "$@"
.venv/bin/dvc metrics show reports/metrics.json   # the ready pipelines under pipelines/ have their own
