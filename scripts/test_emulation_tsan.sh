#!/usr/bin/env bash
# Optional, not part of scripts/test.sh or CI: the emulation's ThreadSanitizer
# backend (one OS thread per CUDA thread, so TSan names the lines of races
# between two barriers even when the results happen to be right). Heavy: up to
# 1024 OS threads per block; tests/test_cuda_emulation_tsan.py uses small inputs.
# Environment: PYTHON (default .venv/bin/python), CXX (default c++), MAX_JOBS.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
CXX=${CXX:-c++}
tsan=$(realpath "$($CXX -print-file-name=libtsan.so)")
stdcxx=$(realpath "$($CXX -print-file-name=libstdc++.so)")
if [ ! -f "$tsan" ] || [ ! -f "$stdcxx" ]; then
  echo "test_emulation_tsan.sh: libtsan/libstdc++ of $CXX not found ($tsan, $stdcxx)" >&2
  exit 1
fi
export INSTSEG_EMU_SANITIZE=thread
export MAX_JOBS=${MAX_JOBS:-2}
# Each case runs in a child process (tests/test_cuda_emulation_tsan.py) that
# inherits the preloads; this process only builds the library.
LD_PRELOAD="$tsan $stdcxx" TSAN_OPTIONS=${TSAN_OPTIONS:-report_signal_unsafe=0} \
  setarch "$(uname -m)" -R "$PY" -m pytest -q -p no:cacheprovider "$@" tests/test_cuda_emulation_tsan.py
