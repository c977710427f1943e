#!/usr/bin/env bash
# One device call (GPU-lending setup) validating new kernel work: build for sm_90a, GPU tests (PYTEST_FILES /
# PYTEST_K), compute-sanitizer memcheck on the small runs, and the timing scripts named in TIMING (commands run
# in order, each capped). Logs under $OUT; the end of each is printed.
set -o pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-/tmp/check_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
t0=$(date +%s)
MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0a python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1 \
  || { grep -E "error" "$OUT/build.log" | head -20; tail -5 "$OUT/build.log"; exit 1; }
echo "build $(( $(date +%s) - t0 ))s"
# shellcheck disable=SC2086
timeout "${PYTEST_S:-240}" python3 -m pytest -q -s -rf -p no:cacheprovider ${PYTEST_FILES:-tests} -k "${PYTEST_K:-}" \
  > "$OUT/pytest.log" 2>&1
echo "pytest rc=$? at $(( $(date +%s) - t0 ))s"
grep -E "^FAILED|passed|failed|Error" "$OUT/pytest.log" | tail -15
for s in ${SANITIZE:-}; do
  timeout 120 compute-sanitizer --tool memcheck --error-exitcode 1 python3 $s --no-timing > "$OUT/sanitize_$(basename $s .py).log" 2>&1
  echo "memcheck $s rc=$?"; tail -2 "$OUT/sanitize_$(basename $s .py).log"
done
IFS=';' read -ra cmds <<< "${TIMING:-}"
for c in "${cmds[@]}"; do
  echo "== $c"; timeout "${TIMING_S:-150}" bash -c "$c" 2>&1 | tail -25
done
echo "total $(( $(date +%s) - t0 ))s"
