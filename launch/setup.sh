#!/usr/bin/env bash
# Install golf-dist (editable, with its test tools) at the versions the test suite last passed with
# (launch/constraints.txt), without pulling a multi-GB CUDA torch onto a CPU-only machine: an installed torch
# >= 2.9 is reused; otherwise a GPU machine gets PyPI's (CUDA) torch and a CPU-only one torch==2.13.0
# (set TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu where pip's default index would serve a CUDA
# build). constraints.txt never pins torch, so it cannot swap a GPU build for a CPU one or back.
#   bash launch/setup.sh                  # the tested versions (what .ci/run and launch/quickstart.sh use)
#   GOLF_LATEST=1 bash launch/setup.sh    # the newest releases pyproject.toml allows (torch kept as installed),
#                                         # then run the tests and refreeze (docs/installing.md)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_TESTED=2.13.0   # the torch the suite last passed with (keep with constraints.txt)
TORCH_FLOOR=2.9       # pyproject.toml's floor
if [ "${GOLF_LATEST:-0}" = 1 ]; then
  torch_spec="torch>=$TORCH_FLOOR"
else
  torch_spec="torch==$TORCH_TESTED"
fi
release() { "$PY" -c "import sys; print(tuple(int(p) for p in sys.argv[1].split('+')[0].split('.')[:2]))" "$1"; }
if ! "$PY" -c "import sys, torch; sys.exit(tuple(int(p) for p in torch.__version__.split('+')[0].split('.')[:2]) < $(release $TORCH_FLOOR))" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "$PY" -m pip install "$torch_spec"
  else
    "$PY" -m pip install "$torch_spec" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
  fi
fi
# torch stays the build installed above (or found): pinned to itself, whatever the rest resolves to
pins=$(mktemp)
trap 'rm -f "$pins"' EXIT
"$PY" -c "import torch; print('torch==' + torch.__version__)" >"$pins"
if [ "${GOLF_LATEST:-0}" = 1 ]; then
  echo "GOLF_LATEST=1: installing the newest releases pyproject.toml allows, not constraints.txt"
  "$PY" -m pip install -q -c "$pins" --upgrade --upgrade-strategy eager -e ".[test]"
else
  "$PY" -m pip install -q -c "$pins" -c launch/constraints.txt -e ".[test]"
fi
"$PY" -c "import accelerate, torch, golf_dist; print(f'golf_dist {golf_dist.__version__} ready (torch {torch.__version__}, CUDA {torch.cuda.is_available()}, accelerate {accelerate.__version__})')"
