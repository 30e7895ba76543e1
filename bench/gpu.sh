#!/usr/bin/env bash
# One command for a lent GPU machine (no network there), run from the project root.
#
# Through the device tool, one call per run (each stays under the tool's 600 s limit):
#   run(command="bash bench/gpu.sh", timeout_s=600)         # build, tests, short benchmarks
#   run(command="bash bench/gpu.sh bench", timeout_s=600)   # build, full op benchmarks
#   run(command="STS_COMMIT=<sha> bash bench/gpu.sh e2e", timeout_s=600)  # real-shape steps
# The log, a per-step summary, JUnit XML of both pytest runs and the new bench results land
# in $OUT (the tool's folder; default /tmp/sts-gpu-out), so they come back even when a step
# fails or runs out of time. Optional: STS_GPU_BUDGET_S (default 570) total seconds.
#
# Steps, each bounded by `timeout` and logged with its exit status (caps sum to the budget):
#   default run (120 + 20 + 90 + 150 + 110 + 80 = 570 s):
#   1. build the extension in place for this GPU's arch only (nvcc, MAX_JOBS=16)
#   2. env; 3. pytest -m gpu     (large shapes, int64 offsets, the CUDA build itself)
#   4. the rest of the suite    (Triton tests run on CUDA through the triton_device fixture)
#   5. python -m bench.ops --device cuda --no-compile (op benchmarks, no torch.compile)
#   6. python -m bench --device cuda (end-to-end demo, short)
#   `bench` run (120 + 20 + 250 + 180 = 570 s): build, env, then
#   3. python -m bench.ops --device cuda (with the torch.compile baselines)
#   4. pytest bench/ --benchmark-only (the same cases through pytest-benchmark, no compile)
#   `e2e` run (120 + 20 + 150 + 150 + 120 = 560 s): build, env, then python -m bench.e2e
#   (dense / VTC / LDS / VTC+LDS interleaved, bf16, full depth: every layer of the real
#   configs, so the ratios and MFU are the real models'; each run stops starting rounds 20 s
#   before its cap and writes its JSON into $OUT after every round):
#   3. --shape llava-1.5-7b: alignment (projector trained, checkpointing), batch 8, 64 text
#      tokens: ~212 TFLOP a dense step by bench/flops.py, ~0.5 s at 50% MFU on an H100
#   4. --shape qwen2.5-vl-3b: full fine-tuning at 672 px, batch 4: ~132 TFLOP a dense step;
#      3.8B bf16 parameters + gradients + AdamW states ~30 GB
#   5. --shape llava-1.5-7b --lora: LoRA r=128 on the LM + projector, batch 8
#   Up to 30 rounds each (2 warm-up rounds: Triton compiles in the first); a step cut short
#   by its cap keeps every round already written. STS_COMMIT names the commit in the JSON (the
#   copied tree has no .git).
# A step never stops the script: later steps still run, and the summary lists every rc.
# Op benchmark rows are written as they are measured, so a step cut short keeps its rows.
set -uo pipefail
OUT=${OUT:-/tmp/sts-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MAX_JOBS=${MAX_JOBS:-16}
unset TRITON_INTERPRET STS_BACKEND STS_DISABLE_EXT STS_NO_EXT
PY=${PYTHON:-python3}
MODE=${1:-all}
BUDGET_S=${STS_GPU_BUDGET_S:-570}
START=$SECONDS
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
STAMP=$(mktemp)  # bench results newer than this are this run's

# rounds_budget CAP_S: seconds a bench.e2e run may start rounds in (its step's limit - 20)
rounds_budget() {
  local left=$((BUDGET_S - (SECONDS - START)))
  echo $(($1 < left ? $1 - 20 : left - 20))
}

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
  if [[ $MODE == e2e ]]; then
    E2E=($PY -m bench.e2e --out "$OUT" --steps 30 --warmup 2)
    step e2e-llava-align 150 "${E2E[@]}" --shape llava-1.5-7b --budget-s "$(rounds_budget 150)"
    step e2e-qwen-full 150 "${E2E[@]}" --shape qwen2.5-vl-3b --budget-s "$(rounds_budget 150)"
    step e2e-llava-lora 120 "${E2E[@]}" --shape llava-1.5-7b --lora \
      --budget-s "$(rounds_budget 120)"
  elif [[ $MODE == bench ]]; then
    step bench-ops 250 $PY -m bench.ops --device cuda --compile
    step bench-pytest 180 $PY -m pytest -q bench/ --benchmark-only --bench-device cuda \
      --benchmark-json="$OUT/pytest-benchmark.json" -p no:cacheprovider
  else
    step pytest-gpu 90 $PY -m pytest -q -m gpu --junitxml="$OUT/pytest-gpu.xml" tests/
    step pytest-rest 150 $PY -m pytest -q -m "not gpu and not slow" --junitxml="$OUT/pytest-rest.xml" tests/
    step bench-ops 110 $PY -m bench.ops --device cuda --no-compile
    step bench-demo 80 $PY -m bench --device cuda
  fi
  echo "total $((SECONDS - START))s"
  cat "$SUMMARY"
} 2>&1 | tee "$OUT/gpu-run.log"

# the device tool returns at most 8 files: this run's JSON plainly, everything in one tarball
NEW=$(find bench/results -maxdepth 1 -type f \( -name '*.json' -o -name '*.png' \) -newer "$STAMP")
if [[ -n $NEW ]]; then
  tar czf "$OUT/results.tgz" $NEW
  cp $(grep '\.json$' <<<"$NEW") "$OUT"/ 2>/dev/null
fi
rm -f "$STAMP"
