#!/usr/bin/env bash
# Prints ptxas --resource-usage (registers, barriers, stack, shared memory) of
# every kernel instantiation in csrc/cuda/*.cu, compiled as setup.py compiles
# them (-O3, arch sm_90 by default), one line per kernel, sorted by mangled
# name. Used to check that edits to the .cu files leave the device code alone:
#   bash benchmarks/ptxas_usage.sh > before.txt; ...edit...; bash benchmarks/ptxas_usage.sh > after.txt; diff
# Environment: PYTHON (default .venv/bin/python), CUDA_HOME (default /usr/local/cuda), ARCH (default 90),
# SRC (a directory of .cu files instead of csrc/cuda; its files must sit two levels below the root's csrc).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
ARCH=${ARCH:-90}
SRC=${SRC:-csrc/cuda}
inc=$(CUDA_HOME=$CUDA_HOME "$PY" -c "from torch.utils import cpp_extension as c; print(' '.join('-I' + p for p in c.include_paths('cuda')))" 2>/dev/null)
abi=$("$PY" -c "import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))")
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for f in "$SRC"/*.cu; do
  "$CUDA_HOME/bin/nvcc" $inc -I"$CUDA_HOME/include" -DTORCH_EXTENSION_NAME=_C -D_GLIBCXX_USE_CXX11_ABI="$abi" \
    -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ \
    -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr -std=c++20 -O3 -lineinfo \
    -gencode=arch=compute_$ARCH,code=sm_$ARCH --resource-usage -Xcompiler -fPIC \
    -c "$f" -o "$tmp/$(basename "$f").o" > "$tmp/log" 2>&1 || { cat "$tmp/log" >&2; exit 1; }
  # "ptxas info    : Compiling entry function 'NAME' for 'sm_90'" then "... Used N registers, ..."
  awk -v file="$(basename "$f")" '
    /Compiling entry function/ { match($0, /'"'"'[^'"'"']+'"'"'/); name = substr($0, RSTART + 1, RLENGTH - 2) }
    /Function properties for/ { match($0, /for [^ ]+$/); fp = substr($0, RSTART + 4) }
    /bytes stack frame/ { if (fp == name) stack[name] = $0 }
    /Used [0-9]+ registers/ { sub(/^.*Used/, "Used"); print file, name, $0, "|", stack[name] }
  ' "$tmp/log" | sed 's/ptxas info *: *//; s/  */ /g'
done | sort -k2,2
