#!/usr/bin/env bash
# One device call for the Hopper forward kernel (csrc/attention/sm90): build for sm_90a (ptxas report),
# GPU tests of the forward on both paths, the correctness table, a short timing, and compute-sanitizer
# memcheck on the sm90 path, and the C++-exception probe. Each stage gets a time cap; logs land under $OUT
# (default /tmp/sm90_out). ELASTIC_SM90_VERBOSE=1 throughout: any tensor map that cannot be built is reported.
# env: STAGES (default "build pytest errors time sanitize"; "probe" adds tests/gpu_exception_probe.py),
#      PYTEST_K (pytest -k expression), TOTAL_BUDGET_S, and experiments/sm90_check.py's ROUNDS / NO_FLEX / VARIANTS
set -o pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-/tmp/sm90_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" ELASTIC_SM90_VERBOSE=1
export ELASTIC_TEST_ERRORS_OUT="$OUT/pytest_max_errors.txt"
STAGES=${STAGES:-"build pytest errors time sanitize"}
START=$(date +%s)
TOTAL=${TOTAL_BUDGET_S:-280}
left() { echo $(( START + TOTAL - $(date +%s) - $1 )); }

run_stage() {  # name cap reserve cmd...
  local name=$1 cap=$2 reserve=$3
  shift 3
  [[ " $STAGES " == *" $name "* ]] || return 0
  local lim
  lim=$(left "$reserve")
  (( lim > cap )) && lim=$cap
  if (( lim < 5 )); then echo "=== [$name] skipped: no time left"; return 0; fi
  echo "=== [$name] limit ${lim}s"
  local t0=$(date +%s)
  timeout --kill-after=5 "$lim" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "=== [$name] rc=$rc in $(( $(date +%s) - t0 ))s"
}

nvidia-smi --query-gpu=name,clocks.sm,memory.used --format=csv,noheader
run_stage build 150 120 env MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0a ELASTIC_CUDA_PTXAS_VERBOSE=1 \
  python setup.py build_ext --inplace
[[ -f "$OUT/build.log" ]] && { grep -E " error|sm90_kernel.*sm_90a|spill|Used [0-9]+ registers" "$OUT/build.log" | grep -A2 "sm90_kernel.*sm_90a" | grep -E "spill|Used" | head -8; tail -1 "$OUT/build.log"; }
run_stage pytest 150 90 python -m pytest -q -rf -p no:cacheprovider tests/test_attention_cuda.py \
  -k "${PYTEST_K:-sm90 or invalid or poisoned or short or bad_args or zz}"
[[ -f "$OUT/pytest.log" ]] && grep -E "passed|failed|Error|assert" "$OUT/pytest.log" | tail -15
[[ -f "$OUT/pytest_max_errors.txt" ]] && grep -vE "^    " "$OUT/pytest_max_errors.txt"
run_stage errors 60 60 python -m experiments.sm90_check errors
[[ -f "$OUT/errors.log" ]] && sed -n '/per variant/,$p' "$OUT/errors.log"
run_stage sanitize 40 45 compute-sanitizer --tool memcheck --error-exitcode 1 python -m experiments.sm90_check sanitize
[[ -f "$OUT/sanitize.log" ]] && tail -4 "$OUT/sanitize.log"
run_stage probe 70 40 python tests/gpu_exception_probe.py
[[ -f "$OUT/probe.log" ]] && cat "$OUT/probe.log"
run_stage time 150 5 python -m experiments.sm90_check time
[[ -f "$OUT/time.log" ]] && { grep -E "rel \(Frobenius\)|no tensor map" "$OUT/time.log" | sort | uniq -c | head -5; sed -n '/ms(min)/,$p' "$OUT/time.log"; tail -3 "$OUT/time.log"; }
echo "total $(( $(date +%s) - START ))s"
