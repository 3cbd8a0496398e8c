#!/usr/bin/env bash
# The main job on the embedded default: set up, make synthetic GoPro-shaped data, shard it, train F,
# train G (unroll 8), evaluate, and print the PSNR gain over the blurred input and how to open MLflow.
# Rerunnable: existing data is kept and training resumes from its checkpoints.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=runs/demo
bash launch/setup.sh
if [ ! -d "$OUT/GOPRO_Large" ]; then
  "$PY" data_prep/synth_gopro.py --out "$OUT/GOPRO_Large" --train-pairs 48 --test-pairs 16 --height 256 --width 448 --seed 0
fi
if [ ! -f "$OUT/shards/manifest.json" ]; then
  "$PY" data_prep/shard_gopro.py --src "$OUT/GOPRO_Large" --out "$OUT/shards" --maxcount 16
fi
"$PY" launch/train.py --config configs/demo.yaml --stage f --output-dir "$OUT"
"$PY" launch/train.py --config configs/demo.yaml --stage g --unroll 8 --output-dir "$OUT"
"$PY" launch/evaluate.py --output-dir "$OUT" --iterations 3 | tee "$OUT/evaluation.txt"
echo
echo "Compare the F, G and evaluation runs in the MLflow UI:"
echo "  mlflow ui --backend-store-uri sqlite:///$OUT/mlflow.db    # then open http://127.0.0.1:5000"
