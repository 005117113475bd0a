#!/usr/bin/env bash
# The main job. Sets everything up from nothing (scripts/setup_env.sh), then:
#   1. every op benchmark against its peer in the same run, in a representative reduced form
#      (roi_align, multi-level RoIAlign, nms/batched_nms, mask pasting, ms_deform_attn, Mask R-CNN
#      end to end, Mask2Former against transformers', per-call overhead), on the CPU and, when there is
#      one, the GPU;
#   2. the demos: the shipped Mask R-CNN checkpoint on freshly generated images, drawn to
#      benchmarks/out/demo.png, and SAM's automatic mask generator with the shipped shapes SAM,
#      drawn to benchmarks/out/sam_demo.png;
#   3. a one-screen summary (speedups with their spread, correctness checks, devices) and the
#      plot benchmarks/out/summary.png.
# Every benchmark's rows are written as JSON under benchmarks/out/.
#
#   bash scripts/main.sh            # about 6-8 minutes on 2 CPU cores once the environment exists
#   bash scripts/main.sh --full     # the full sweeps (all sizes, dtypes, cases): an hour or more on 2 cores
set -euo pipefail
cd "$(dirname "$0")/.."

full=0
for a in "$@"; do
  case "$a" in
    --full) full=1 ;;
    -h|--help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "main.sh: unknown argument $a (use --full or --help)" >&2; exit 2 ;;
  esac
done

start=$(date +%s)
source scripts/setup_env.sh
PY=.venv/bin/python
OUT=benchmarks/out
mkdir -p "$OUT"

step() {  # step NAME COMMAND...: runs it with a header and its wall time
  local name=$1 t0
  shift
  t0=$(date +%s)
  echo
  echo "=== $name ($(( t0 - start )) s into the main job)"
  "$@"
  echo "=== $name: $(( $(date +%s) - t0 )) s"
}

if [ "$full" = 1 ]; then
  roi=() ml=() nms=() paste=() mrcnn=() msda=() m2f=() overhead=()
else
  roi=(--rois 512 --sizes 7 --dtypes float32,bfloat16 --repeats 3)
  ml=(--sizes 7 --dtypes float32,bfloat16 --repeats 2)
  nms=(--sizes 1000,20000 --categories 0,80 --dtypes float32,float16)
  paste=(--cases 800x1216 --dtypes float32,float16 --comparisons prob,bool,crops_bool --repeats 3)
  mrcnn=(--quick)
  msda=(--shapes m2f_512 ddetr --dtypes float32)
  m2f=(--quick)
  overhead=(--calls 1000 --rounds 7)
fi

step "roi_align vs torchvision.ops.roi_align" $PY benchmarks/bench_roi_align.py "${roi[@]}"
step "multi-level RoIAlign vs torchvision MultiScaleRoIAlign" $PY benchmarks/bench_multilevel.py "${ml[@]}"
step "nms and batched_nms vs torchvision" $PY benchmarks/bench_nms.py "${nms[@]}"
step "paste_masks vs torchvision's paste_masks_in_image" $PY benchmarks/bench_paste_masks.py "${paste[@]}"
step "ms_deform_attn vs the grid_sample formulation" $PY benchmarks/bench_ms_deform_attn.py "${msda[@]}"
step "Mask R-CNN R50-FPN vs torchvision, end to end" $PY benchmarks/bench_maskrcnn.py "${mrcnn[@]}"
step "Mask2Former R50 vs transformers' Mask2Former, same weights" $PY benchmarks/bench_models_mask2former.py "${m2f[@]}"
step "per-call overhead vs torchvision" $PY benchmarks/bench_overhead.py "${overhead[@]}" --out "$OUT/overhead_cpu.json"
step "demo: the shipped Mask R-CNN on fresh shapes images" \
  $PY -m instseg_ops.models.demo --out "$OUT/demo.png" --json "$OUT/demo.json"
step "demo: SAM's automatic mask generator (the shipped shapes SAM) on fresh shapes images" \
  $PY -m instseg_ops.models.sam.demo --out "$OUT/sam_demo.png" --json "$OUT/sam_demo.json"

echo
echo "=================================== summary ==================================="
$PY benchmarks/summary.py --out-dir "$OUT" --since "$start" --demo "$OUT/demo.json"
echo "main job: $(( $(date +%s) - start )) s in all; rows in $OUT/*.json, pictures $OUT/demo.png and $OUT/sam_demo.png, plot $OUT/summary.png"
