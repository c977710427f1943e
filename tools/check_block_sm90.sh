#!/usr/bin/env bash
# One device call (GPU-lending setup): build for sm_90a, the BLOCK / sm90 GPU tests, memcheck of a small run of
# every mode, and the BLOCK prefill benchmark (Llama-3.1-8B shape) with Flex in the same run. Logs under $OUT.
set -o pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-/tmp/block_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
t0=$(date +%s)
nvidia-smi --query-gpu=name,clocks.sm,memory.used --format=csv,noheader
MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0a python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1 \
  || { tail -30 "$OUT/build.log"; exit 1; }
echo "build $(( $(date +%s) - t0 ))s"
timeout 260 python3 -m pytest -q -rf -p no:cacheprovider tests/test_attention_cuda.py \
  -k "${PYTEST_K:-sm90 or block}" > "$OUT/pytest.log" 2>&1
echo "pytest rc=$? at $(( $(date +%s) - t0 ))s"; grep -E "passed|failed|Error|assert" "$OUT/pytest.log" | tail -12
timeout 90 compute-sanitizer --tool memcheck --error-exitcode 1 python3 tests/gpu_sanitize.py > "$OUT/sanitize.log" 2>&1
echo "sanitize rc=$?"; tail -3 "$OUT/sanitize.log"
SEQS=${SEQS:-8192,32768,131072} MODELS=llama DENSITIES=0.3 MSRS=0.75,1 STRATEGIES=auto BENCH_BUDGET_S=${BENCH_S:-150} \
  timeout 200 python3 -m benchmarks.bench_block_prefill --out "$OUT" > "$OUT/bench.log" 2>&1
echo "bench rc=$? at $(( $(date +%s) - t0 ))s"; cat "$OUT/block_prefill.md" 2>/dev/null | head -40
