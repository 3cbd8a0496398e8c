#!/usr/bin/env bash
# The short GPU recipe (configs/gpu_quick.yaml) end to end on one GPU: synthetic 1280x720 pairs, npy shards,
# F then G (about 10 minutes of training on an H100), evaluation on the 32 test pairs and on the held-out
# photographs, with their figures.
# Rerunnable: existing data is kept and training resumes from its checkpoints.
#   bash launch/gpu_quick.sh                 # everything
#   TRAIN_PAIRS=2000 bash launch/gpu_quick.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-runs/gpu_quick}
TRAIN_PAIRS=${TRAIN_PAIRS:-1200}
LAUNCH=${LAUNCH:-accelerate launch --num_processes 1}
if [ ! -d "$OUT/GOPRO_Large" ]; then
  "$PY" data_prep/synth_gopro.py --out "$OUT/GOPRO_Large" --train-pairs "$TRAIN_PAIRS" --test-pairs 32 \
    --frames-per-scene 2 --height 720 --width 1280 --seed 0 --workers "${WORKERS:-$(nproc)}" \
    --content mixed --kernels wide --noise 0 8 --clean-share 0.25   # the demo's kind of data (docs/data.md)
fi
if [ ! -f "$OUT/shards/manifest.json" ]; then
  "$PY" data_prep/shard_gopro.py --src "$OUT/GOPRO_Large" --out "$OUT/shards" --format npy --test-format png
fi
$LAUNCH launch/train.py --config configs/gpu_quick.yaml --stage f --output-dir "$OUT" "$@"
$LAUNCH launch/train.py --config configs/gpu_quick.yaml --stage g --output-dir "$OUT" "$@"
"$PY" launch/evaluate.py --output-dir "$OUT" --iterations 3
"$PY" launch/evaluate.py --output-dir "$OUT" --iterations 3 --held-out   # photographs and kernels never trained on
