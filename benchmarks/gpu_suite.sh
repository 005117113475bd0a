#!/usr/bin/env bash
# One call on a GPU machine: build, CUDA tests, compute-sanitizer, benchmarks.
# Writes everything under $OUT (default benchmarks/out/gpu; 8 files at most). Meant to finish well
# inside 10 minutes on an H100/H200 with the machine's own torch:
#   OUT=/some/dir bash benchmarks/gpu_suite.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/out/gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export MAX_JOBS=${MAX_JOBS:-16}
export INSTSEG_CUDA=1
status=0
step() { echo "== $1 ($(date -u +%H:%M:%S))" | tee -a "$OUT/summary.txt"; }

step "device"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } 2>&1 | tee -a "$OUT/summary.txt"

step "build"
build_log=$(mktemp)  # copied to $OUT only on failure: at most 8 files come back from $OUT
if ! "$PY" -m pip install --no-build-isolation --no-deps -e . > "$build_log" 2>&1; then
  cp "$build_log" "$OUT/build.log"
  echo "BUILD FAILED" | tee -a "$OUT/summary.txt"; tail -50 "$build_log"; exit 1
fi
"$PY" -c "import instseg_ops; assert instseg_ops.cuda_built(); print('built with CUDA kernels')" 2>&1 | tee -a "$OUT/summary.txt"

step "tests"
"$PY" -m pytest -q -p no:cacheprovider tests > "$OUT/pytest.txt" 2>&1 || status=1
tail -3 "$OUT/pytest.txt" | tee -a "$OUT/summary.txt"

step "compute-sanitizer"
for tool in memcheck racecheck initcheck synccheck; do
  timeout 240 compute-sanitizer --tool "$tool" --error-exitcode 9 "$PY" scripts/sanitizer_case.py \
    > "$OUT/sanitizer_last.txt" 2>&1
  rc=$?
  { echo "#### $tool rc=$rc"; cat "$OUT/sanitizer_last.txt"; } >> "$OUT/sanitizer.txt"
  echo "$tool rc=$rc $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/sanitizer_last.txt" | tail -1)" | tee -a "$OUT/summary.txt"
  [ $rc -eq 0 ] || status=1
done
rm -f "$OUT/sanitizer_last.txt"  # at most 8 files come back from $OUT

step "benchmarks"
"$PY" benchmarks/bench_roi_align.py --device cuda --out "$OUT/roi_align_cuda.json" > "$OUT/bench_cuda.txt" 2>&1 || status=1
"$PY" benchmarks/bench_multilevel.py --device cuda --out "$OUT/multilevel_cuda.json" >> "$OUT/bench_cuda.txt" 2>&1 || status=1
"$PY" benchmarks/bench_nms.py --device cuda --out "$OUT/nms_cuda.json" >> "$OUT/bench_cuda.txt" 2>&1 || status=1
"$PY" benchmarks/bench_paste_masks.py --device cuda --out "$OUT/paste_masks_cuda.json" >> "$OUT/bench_cuda.txt" 2>&1 || status=1
"$PY" benchmarks/bench_ms_deform_attn.py --device cuda --out "$OUT/ms_deform_attn_cuda.json" >> "$OUT/bench_cuda.txt" 2>&1 || status=1
cat "$OUT/bench_cuda.txt"
step "done status=$status"
exit $status
