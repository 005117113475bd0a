#!/usr/bin/env bash
# The main job: sets everything up from nothing, then runs the benchmarks
# (roi_align, multi-level RoIAlign, NMS, mask pasting, Mask R-CNN end to end) against
# torchvision on the CPU, plus CUDA when a GPU is present, ms_deform_attn against its
# grid_sample formulation, the per-call overhead against torchvision, then the demo (scripts/demo.sh:
# synthetic data, a short training run, evaluation, detections drawn to a PNG). Results are
# printed and written under benchmarks/out/. Extra arguments go to every benchmark (e.g. --quick).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
.venv/bin/python benchmarks/bench_roi_align.py "$@"
.venv/bin/python benchmarks/bench_multilevel.py "$@"
.venv/bin/python benchmarks/bench_nms.py "$@"
.venv/bin/python benchmarks/bench_paste_masks.py "$@"
.venv/bin/python benchmarks/bench_maskrcnn.py "$@"
msda_args=()
for a in "$@"; do
  if [ "$a" = --quick ]; then msda_args=(--shapes m2f_512 ddetr --dtypes float32); fi
done
.venv/bin/python benchmarks/bench_ms_deform_attn.py "${msda_args[@]}"
.venv/bin/python benchmarks/bench_overhead.py --out benchmarks/out/overhead_cpu.json
bash scripts/demo.sh
