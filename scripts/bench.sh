#!/usr/bin/env bash
# Benchmark: set up, run the whole default pipeline from scratch (`dvc repro --force`) and a
# no-op `dvc repro`, and print a table of time per stage and test metrics against the targets.
# The table is also written to reports/benchmark.md and into README.md's benchmark block.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export NO_ALBUMENTATIONS_UPDATE=1
export PATH="$PWD/.venv/bin:$PATH"  # dvc.yaml runs `taxonomist <stage>`
.venv/bin/python benchmarks/pipeline.py "$@"
