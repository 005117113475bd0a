#!/usr/bin/env bash
# Creates .venv (when missing), installs the pinned dependencies and builds
# instseg_ops into it (editable install). Sourced by scripts/test.sh and
# scripts/main.sh; safe to run again (fast when everything is in place).
#
# Environment: PYTHON (interpreter for the venv, default python3), VENV (default
# .venv), INSTSEG_CUDA (auto|1|0, see setup.py), CUDA_HOME, MAX_JOBS.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  "${PYTHON:-python3}" -m venv "$VENV"
fi
PY="$VENV/bin/python"

# torch is pinned to the release this project is developed against; an
# existing install of that release is reused.
if ! "$PY" -c "import torch, torchvision, pytest, hypothesis, numpy, ninja, pycocotools, ruff, PIL, tqdm, matplotlib, scipy, segment_anything, transformers, onnx, onnxscript, onnxruntime" 2>/dev/null; then
  "$PY" -m pip install -q --upgrade pip
  echo "installing the pinned dependencies into $VENV (torch, torchvision, test and benchmark tools)"
  "$PY" -m pip install -r requirements.txt
fi

if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi
export MAX_JOBS=${MAX_JOBS:-2}

# Rebuild when a source file is newer than the built extension.
so=$(ls instseg_ops/_C*.so 2>/dev/null | head -n 1 || true)
if [ -z "$so" ] || [ -n "$(find csrc setup.py -newer "$so" -type f 2>/dev/null | head -n 1)" ]; then
  start=$(date +%s)
  echo "building instseg_ops into $VENV ($([ -n "${CUDA_HOME:-}" ] && [ "${INSTSEG_CUDA:-auto}" != 0 ] \
    && echo "with its CUDA kernels: about 3 minutes on 2 cores" || echo "CPU only: about a minute on 2 cores"))"
  "$PY" -m pip install -q --no-build-isolation --no-deps -e . &
  build_pid=$!
  while kill -0 "$build_pid" 2>/dev/null; do  # a line every 20 s, so that the build is never silent for long
    for _ in $(seq 20); do kill -0 "$build_pid" 2>/dev/null && sleep 1; done
    if kill -0 "$build_pid" 2>/dev/null; then echo "  ... still building ($(( $(date +%s) - start )) s)"; fi
  done
  wait "$build_pid"
  echo "instseg_ops built in $(( $(date +%s) - start )) s ($("$PY" -c 'import instseg_ops; print("with CUDA kernels" if instseg_ops.cuda_built() else "CPU only")'))"
fi
