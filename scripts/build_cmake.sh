#!/usr/bin/env bash
# Configure and build the CPU-only CMake library (libinstseg_ops.so) into
# build/cmake. The last line printed is the path of the built library.
#
#   PYTHON=/path/to/python   python whose torch to build against
#                            (default: .venv/bin/python if present, else python3)
#   MAX_JOBS=N               parallel compile jobs (default: number of cores)
#   Extra arguments are passed on to the CMake configure step, e.g.
#   scripts/build_cmake.sh -DCMAKE_BUILD_TYPE=Debug
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD_DIR="$ROOT/build/cmake"

if [[ -n "${PYTHON:-}" ]]; then
  py="$PYTHON"
elif [[ -x "$ROOT/.venv/bin/python" ]]; then
  py="$ROOT/.venv/bin/python"
else
  py="python3"
fi
# CMake wants an absolute interpreter path.
if [[ "$py" != */* ]]; then
  py="$(command -v "$py")" || { echo "build_cmake.sh: python '$PYTHON' not found" >&2; exit 1; }
fi

generator=()
if command -v ninja >/dev/null 2>&1; then
  generator=(-G Ninja)
  # A build dir configured by another generator cannot switch.
  if [[ -f "$BUILD_DIR/CMakeCache.txt" ]] && ! grep -q '^CMAKE_GENERATOR:INTERNAL=Ninja$' "$BUILD_DIR/CMakeCache.txt"; then
    generator=()
  fi
fi

jobs="${MAX_JOBS:-$(nproc 2>/dev/null || echo 2)}"

cmake -S "$ROOT" -B "$BUILD_DIR" "${generator[@]}" \
  -DPython3_EXECUTABLE="$py" \
  -DINSTSEG_WITH_CUDA=OFF \
  "$@" >&2
cmake --build "$BUILD_DIR" --parallel "$jobs" >&2

lib="$BUILD_DIR/libinstseg_ops.so"
if [[ ! -f "$lib" ]]; then
  echo "build_cmake.sh: $lib was not built" >&2
  exit 1
fi
echo "$lib"
