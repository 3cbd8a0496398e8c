#!/usr/bin/env bash
# Install golf-dist (editable, with its test tools) without pulling a multi-GB CUDA torch onto a
# CPU-only machine: an installed torch is reused; otherwise a GPU machine gets pip's default torch and
# a CPU-only one gets torch==2.13.0 (set TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu where
# pip's default index would serve a CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "$PY" -m pip install "torch>=2.6"
  else
    "$PY" -m pip install "torch==2.13.0" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
  fi
fi
"$PY" -m pip install -q -e ".[test]"
"$PY" -c "import torch, golf_dist; print(f'golf_dist {golf_dist.__version__} ready (torch {torch.__version__}, CUDA {torch.cuda.is_available()})')"
