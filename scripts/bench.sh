#!/usr/bin/env bash
# The benchmark (`make bench`): set up, then run benchmarks/run.py. It reruns the whole default
# pipeline from scratch (`dvc repro --force`), times a no-op repro and an evaluate-only change,
# compares the packaged ONNX model with PyTorch eager, the training loop with a raw PyTorch
# loop, the loader with a training step, and epochs at 10k/30k/60k images. It prints a table
# and writes it to reports/benchmark.md and into README.md's benchmark block.
# Run it on an otherwise idle machine: other work on the CPU distorts every figure.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export NO_ALBUMENTATIONS_UPDATE=1
export PATH="$PWD/.venv/bin:$PATH"  # dvc.yaml runs `taxonomist <stage>`
if [ "${1:-}" = "--serving" ]; then
  shift
  exec .venv/bin/python benchmarks/serving.py "$@"
fi
if [ "${1:-}" = "--label-errors" ]; then
  shift
  exec .venv/bin/python benchmarks/label_errors.py "$@"
fi
if [ "${1:-}" = "--active-learning" ]; then
  shift
  exec .venv/bin/python benchmarks/active_learning.py "$@"
fi
if [ "${1:-}" = "--embeddings" ]; then
  shift
  exec .venv/bin/python benchmarks/embeddings.py "$@"
fi
if [ "${1:-}" = "--scale" ]; then
  shift
  exec .venv/bin/python benchmarks/scale.py "$@"
fi
.venv/bin/python benchmarks/run.py "$@"
