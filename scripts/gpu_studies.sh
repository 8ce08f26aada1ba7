#!/usr/bin/env bash
# `make test-gpu`, second half: a short run of every study on the GPU (each study's models go to the GPU
# by itself: --device defaults to auto). About 10 minutes on one modern GPU; prints each study's time.
# Without a CUDA device it says so and exits 0 (the gpu-marked tests were skipped the same way).
set -euo pipefail
BIN=${BIN:-.venv/bin}
OUT=${1:-runs/gpu}
if ! "$BIN/python" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "test-gpu: no CUDA device; no study was run on a GPU"
  exit 0
fi
"$BIN/python" -c "import torch; print('GPU:', torch.cuda.get_device_name(0))"
run() {
  local name=$1; shift
  local start=$SECONDS
  echo "== $name $*"
  "$BIN/steerable" experiment "$name" --out "$OUT/$name" --seed 0 --overwrite "$@"
  echo "== $name: $((SECONDS - start)) s"
}
run synthetic --np-steps 300 --baseline-steps 100 --eval-tasks 512
run gaussian --steps 200 --eval-tasks 256
run hh --np-steps 200 --btl-steps 100 --eval-tasks 256
run three-modes --np-steps 200 --btl-steps 100 --eval-tasks 256
run conflict-rate --np-steps 200 --eval-tasks 128
run continuous --np-steps 200 --eval-tasks 256
run active --gaussian-steps 200 --text-steps 200 --eval-users 64
run npdpo-synthetic --steps 300 --sft-steps 200 --eval-tasks 32
run npdpo-hh --smoke
run npdpo-real --blocks all --steps 40 --eval-tasks 32 --generation-prompts 8 --reward-steps 200
echo "test-gpu: every study ran on the GPU; results under $OUT"
