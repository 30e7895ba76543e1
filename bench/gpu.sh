#!/usr/bin/env bash
# One command for a lent GPU machine (no network there), run from the project root:
#   bash bench/gpu.sh
# Builds the extension against the machine's torch, runs the GPU tests, the whole suite and
# the benchmarks, and copies the log and result files to $OUT (default /tmp/sts-gpu-out).
set -uo pipefail
OUT=${OUT:-/tmp/sts-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
run() { echo "+ $*"; "$@"; echo "rc=$?"; }
{
  date -u
  run nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  run python3 -m pip install --no-build-isolation --no-deps -q -e .
  run python3 -m sts_kernels.env
  run python3 -m pytest -q -m gpu tests/
  run python3 -m pytest -q -x -m "not slow" tests/
  run python3 -m bench.ops --device cuda
  run python3 -m bench --device cuda
} 2>&1 | tee "$OUT/gpu-run.log"
for f in $(ls -t bench/results/*.json bench/results/*.png 2>/dev/null | head -n 8); do cp "$f" "$OUT"/; done
