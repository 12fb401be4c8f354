#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py): run from the project root on a machine with a CUDA GPU, in the
# environment that has sparsealloc installed (with no package index, ../shared/tools/device-wheels stages
# Ray and Optuna). Writes bench/results/gpu-<device>.md; under 8 minutes on one H100/H200-class GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
exec "$PYTHON" -m bench.gpu_check "$@"
