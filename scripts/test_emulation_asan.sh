#!/usr/bin/env bash
# The emulated CUDA suite (tests/test_cuda_emulated*.py and the planted-bug
# kernels of tests/test_cuda_emulation_harness.py) under AddressSanitizer:
# the emulation library is built with -fsanitize=address (cached in
# build/emulation/instseg_emu_asan) and Python runs with libasan and libstdc++
# preloaded (with libasan alone the first C++ exception aborts). Run by .ci/run
# after scripts/test.sh (which sets up .venv and builds instseg_ops).
# Environment: PYTHON (default .venv/bin/python), CXX (the compiler
# cpp_extension uses, default c++), INSTSEG_EMU_SCHEDULES (default
# index: memory errors do not depend on the order; the plain run covers all
# three), MAX_JOBS. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
CXX=${CXX:-c++}
asan=$(realpath "$($CXX -print-file-name=libasan.so)")
stdcxx=$(realpath "$($CXX -print-file-name=libstdc++.so)")
if [ ! -f "$asan" ] || [ ! -f "$stdcxx" ]; then
  echo "test_emulation_asan.sh: libasan/libstdc++ of $CXX not found ($asan, $stdcxx)" >&2
  exit 1
fi
export INSTSEG_EMU_SANITIZE=address
export INSTSEG_EMU_SCHEDULES=${INSTSEG_EMU_SCHEDULES:-index}
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=0}
export MAX_JOBS=${MAX_JOBS:-2}
start=$(date +%s)
LD_PRELOAD="$asan $stdcxx" "$PY" -m pytest -q -p no:cacheprovider "$@" \
  tests/test_cuda_emulated.py tests/test_cuda_emulated_ms_deform_attn.py tests/test_cuda_emulation_harness.py
echo "emulated CUDA suite under AddressSanitizer: $(( $(date +%s) - start )) s (build included)"
