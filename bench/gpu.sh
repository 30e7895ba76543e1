#!/usr/bin/env bash
# One command for a lent GPU machine (no network there), run from the project root.
#
# Through the device tool, in one call (the whole script stays under its 600 s limit):
#   run(command="bash bench/gpu.sh", timeout_s=600)
# The log, a per-step summary, JUnit XML of both pytest runs and the new bench results land
# in $OUT (the tool's folder; default /tmp/sts-gpu-out), so they come back even when a step
# fails or runs out of time. Optional: STS_GPU_BUDGET_S (default 570) total seconds.
#
# Steps, each bounded by `timeout` and logged with its exit status:
#   1. build the extension in place for this GPU's arch only (nvcc, MAX_JOBS=16)
#   2. pytest -m gpu            (large shapes, int64 offsets, the CUDA build itself)
#   3. the rest of the suite    (Triton tests run on CUDA through the triton_device fixture)
#   4. python -m bench.ops --device cuda
#   5. python -m bench --device cuda (end-to-end demo, short)
# A step never stops the script: later steps still run, and the summary lists every rc.
set -uo pipefail
OUT=${OUT:-/tmp/sts-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MAX_JOBS=${MAX_JOBS:-16}
unset TRITON_INTERPRET STS_BACKEND STS_DISABLE_EXT STS_NO_EXT
PY=${PYTHON:-python3}
BUDGET_S=${STS_GPU_BUDGET_S:-570}
START=$SECONDS
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
STAMP=$(mktemp)  # bench results newer than this are this run's

# step NAME CAP_S CMD...: runs CMD under `timeout min(CAP_S, time left)`, logs the rc
step() {
  local name=$1 cap=$2 left
  shift 2
  left=$((BUDGET_S - (SECONDS - START)))
  if ((left < 15)); then
    echo "== $name: skipped, out of time" | tee -a "$SUMMARY"
    return
  fi
  ((cap > left)) && cap=$left
  echo "== $name (limit ${cap}s): $*"
  local t0=$SECONDS
  timeout --kill-after=10 "$cap" "$@"
  local rc=$?
  echo "== $name: rc=$rc in $((SECONDS - t0))s$( ((rc == 124 || rc == 137)) && echo ' (timed out)')" |
    tee -a "$SUMMARY"
}

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv
  # this GPU's arch only ("9.0" on an H100/H200): one nvcc pass instead of two
  ARCH=$($PY -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null)
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-${ARCH:-9.0}}
  echo "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS"
  # in place: no pip metadata or network needed; a stale _C of another Python is ignored
  step build 120 $PY setup.py build_ext --inplace
  step env 20 $PY -m sts_kernels.env
  step pytest-gpu 90 $PY -m pytest -q -m gpu --junitxml="$OUT/pytest-gpu.xml" tests/
  step pytest-rest 150 $PY -m pytest -q -m "not gpu and not slow" --junitxml="$OUT/pytest-rest.xml" tests/
  step bench-ops 110 $PY -m bench.ops --device cuda
  step bench-demo 80 $PY -m bench --device cuda
  echo "total $((SECONDS - START))s"
  cat "$SUMMARY"
} 2>&1 | tee "$OUT/gpu-run.log"

find bench/results -maxdepth 1 -type f \( -name '*.json' -o -name '*.png' \) -newer "$STAMP" \
  -exec cp {} "$OUT"/ \;
rm -f "$STAMP"
