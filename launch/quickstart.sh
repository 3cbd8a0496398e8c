#!/usr/bin/env bash
# The main job on the embedded default: set up, make synthetic GoPro-shaped data, shard it, train F,
# train G (unrolled 3 times), evaluate, and print the PSNR gain over the blurred input (the test split's,
# then the held-out photographs': golf-evaluate --held-out), where the figures went and how to open MLflow.
# Rerunnable: existing data is kept and training resumes from its checkpoints.
#   bash launch/quickstart.sh                                          # the demo, into runs/demo
#   OUT=runs/demo_torch bash launch/quickstart.sh data.loader=torch    # config overrides for both stages
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-runs/demo}
# the demo config's data and MLflow store follow OUT; further key=value arguments go to both stages
SET=("data.shards=$OUT/shards" "tracking.uri=sqlite:///$OUT/mlflow.db" "$@")
bash launch/setup.sh
if [ ! -d "$OUT/GOPRO_Large" ]; then
  # 960 training pairs, each its own view and blur kernel: every other scene a procedural image (dead leaves
  # with textures, man-made shapes), the wide kernel family (camera shake of three lengths, straight and
  # curved motion, small defocus; up to 15 pixels), a quarter of the pairs noise-free and the rest noise of
  # sigma 0-8 (of 255). 16 test pairs: photographs, with views, kernels and noise training never saw, each
  # blurred to 30 dB or less (docs/data.md)
  "$PY" data_prep/synth_gopro.py --out "$OUT/GOPRO_Large" --train-pairs 960 --test-pairs 16 \
    --frames-per-scene 2 --height 256 --width 448 --seed 0 \
    --content mixed --kernels wide --noise 0 8 --clean-share 0.25
fi
if [ ! -f "$OUT/shards/manifest.json" ]; then
  "$PY" data_prep/shard_gopro.py --src "$OUT/GOPRO_Large" --out "$OUT/shards" --maxcount 32
fi
"$PY" launch/train.py --config configs/demo.yaml --stage f --output-dir "$OUT" "${SET[@]}"
"$PY" launch/train.py --config configs/demo.yaml --stage g --output-dir "$OUT" "${SET[@]}"
"$PY" launch/evaluate.py --output-dir "$OUT" --iterations 3 | tee "$OUT/evaluation.txt"
# photographs and kernel shapes training never sees (docs/training.md): the summary here, every case in the file
"$PY" launch/evaluate.py --output-dir "$OUT" --iterations 3 --held-out >"$OUT/held_out.txt"
grep '^held-out ' "$OUT/held_out.txt"
echo "held-out cases: $OUT/held_out.txt; figures: $OUT/held_out_gain.png, $OUT/held_out_clock_motion.png"
"$PY" launch/diagnose.py curves "$OUT" --out "$OUT/training_curves.png" >/dev/null
echo "training curves: $OUT/training_curves.png"
echo
echo "Compare the F, G, evaluation and held-out runs in the MLflow UI:"
# MLflow 3.17's UI opens an experiment on its GenAI view unless the URL or its switch asks for Model training
EXP_ID=$("$PY" -c "import mlflow, sys; print(mlflow.MlflowClient(sys.argv[1]).get_experiment_by_name('golf-demo')
.experiment_id)" "sqlite:///$OUT/mlflow.db" 2>/dev/null || echo 1)
echo "  mlflow ui --backend-store-uri sqlite:///$OUT/mlflow.db"
echo "  then open http://127.0.0.1:5000/#/experiments/$EXP_ID?workflowType=machine_learning   (docs/tracking.md)"
