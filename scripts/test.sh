#!/usr/bin/env bash
# The test command: sets everything up from nothing (venv, dependencies, build
# of the extension with its CUDA kernels when nvcc is present, the CMake
# library), lints with ruff and runs the test suite. CUDA tests are skipped without a GPU;
# the CUDA kernels still run, on the CPU, through the emulation
# (tests/test_cuda_emulated*.py; its library is built on first use into
# build/emulation/). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
lib=$(PYTHON=.venv/bin/python bash scripts/build_cmake.sh | tail -n 1)
export INSTSEG_CMAKE_LIB="$lib"
# Lint (configuration in pyproject.toml).
.venv/bin/ruff check --quiet .
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@" tests
