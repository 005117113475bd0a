#!/usr/bin/env bash
# Development rebuild of instseg_ops._C in place, safe while other processes
# have the old library loaded: builds into build/dev, then renames the new
# library over the old one (never overwrites the mapped file). Environment
# switches as for setup.py (e.g. INSTSEG_CUDA=0 for a quick CPU-only build).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export MAX_JOBS=${MAX_JOBS:-2}
"$PY" setup.py -q build_ext --build-lib build/dev >/dev/null
for lib in build/dev/instseg_ops/_C*.so; do
  cp "$lib" "instseg_ops/.$(basename "$lib").new"
  mv -f "instseg_ops/.$(basename "$lib").new" "instseg_ops/$(basename "$lib")"
done
echo "built $(ls instseg_ops/_C*.so)"
