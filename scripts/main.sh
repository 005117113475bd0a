#!/usr/bin/env bash
# The main job: sets everything up from nothing, then runs the benchmarks
# against torchvision (CPU, plus CUDA when a GPU is present). Results are
# printed and written as JSON under benchmarks/out/.
# Extra arguments go to the benchmark (e.g. --quick).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
.venv/bin/python benchmarks/bench_roi_align.py "$@"
