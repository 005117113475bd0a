#!/usr/bin/env bash
# The demo of the main job: synthetic shapes data, a short Mask R-CNN training run on it (or a
# checkpoint you give), COCO evaluation, and detections drawn over a validation image.
# Environment: DEMO_ITERS (default 200), DEMO_CHECKPOINT (skip training), DEMO_SCORE (default 0.3), DEMO_OUT (default
# benchmarks/out/demo). A 200-iteration run learns the shapes only roughly (its scores may all be
# under DEMO_SCORE: then its 5 best detections are drawn, each labelled with its score); the
# 30-minute preset run in benchmarks/RESULTS.md gets mask AP 0.579 on the 200-image val split.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${DEMO_OUT:-benchmarks/out/demo}
mkdir -p "$OUT"
if [ ! -f "$OUT/data/annotations/instances_val.json" ]; then
  "$PY" -m instseg_ops.models.data.shapes --out "$OUT/data" --train 400 --val 50 --size 256 --seed 0 --quiet
fi
ckpt=${DEMO_CHECKPOINT:-}
if [ -z "$ckpt" ]; then
  "$PY" -m instseg_ops.models.train --preset shapes_r18_fast_cpu --data "$OUT/data" --out "$OUT/run" \
    --iters "${DEMO_ITERS:-200}" --time-budget 0 --eval-every 0 --log-every 20
  ckpt="$OUT/run/model_final.pth"
fi
img=$(ls "$OUT"/data/val/*.png | head -n 1)
"$PY" -m instseg_ops.models.demo --checkpoint "$ckpt" --image "$img" --out "$OUT/demo.png" --score-thresh "${DEMO_SCORE:-0.3}" --min-shown 5
echo "demo: detections drawn over $img in $OUT/demo.png"
