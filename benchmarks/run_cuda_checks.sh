#!/bin/bash
# One GPU session: build, smoke (located crash), CUDA tests, compute-sanitizer, register/SASS report, timings.
# Usage (GPU machine, repo root): OUT=/some/dir bash benchmarks/run_cuda_checks.sh   (at most 7 files in $OUT)
set -u
OUT=${OUT:-/tmp/elastic_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1
t0=$(date +%s)
MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a} ELASTIC_CUDA_PTXAS_VERBOSE=1 \
  python setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || { echo BUILD FAILED; grep -B2 -A8 -m5 error "$OUT/build.log"; exit 1; }
echo "build $(( $(date +%s) - t0 ))s"
SO=$(ls elastic_cuda/_C*.so)
echo "SASS: HMMA $(cuobjdump --dump-sass "$SO" | grep -c HMMA)"
CUDA_LAUNCH_BLOCKING=1 timeout 60 python tests/gpu_smoke.py > "$OUT/smoke.log" 2>&1; rc=$?
echo "smoke rc=$rc"; grep -v "^  File\|^    " "$OUT/smoke.log" | tail -25
if [ $rc -ne 0 ]; then
  timeout 90 cuda-gdb -batch -ex "set pagination off" -ex run -ex bt -ex "info cuda kernels" --args python tests/gpu_smoke.py > "$OUT/gdb.log" 2>&1
  grep -A25 -m1 "signal\|exception\|Exception" "$OUT/gdb.log" | cut -c1-220 | head -40
fi
timeout 70 compute-sanitizer --tool memcheck --print-limit 20 python tests/gpu_sanitize.py > "$OUT/sanitize.log" 2>&1
echo "sanitize rc=$?"; grep -m12 -A6 "Invalid\|ERROR SUMMARY\|Error" "$OUT/sanitize.log" | cut -c1-200 | head -40
for t in forward_lengths_modes forward_short forward_batch forward_sq_less forward_varlen forward_poisoned invalid_mode backward_modes backward_lse; do
  timeout 60 python -m pytest -q -s -p no:cacheprovider -k "$t or zz_print" tests/test_attention_cuda.py >> "$OUT/tests.log" 2>&1
  echo "tests $t rc=$? $(tail -1 "$OUT/tests.log")"
done
grep -E "^  [a-z]+ torch" "$OUT/tests.log" | sort -u -k1,3 | head -30
grep -E "^E  |Fatal|Error" "$OUT/tests.log" | sort | uniq -c | sort -rn | head -15
timeout 80 python benchmarks/bench_attention_cuda.py > "$OUT/bench.log" 2>&1; echo "bench rc=$?"
python - "$OUT/bench.log" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    if line.startswith("{"):
        r = json.loads(line)
        print(r.get("tag") or "-", r["kernel"], r["S"], r.get("msr"), "%.3f ms" % r.get("ms", -1), "%.0f TF/s" % r.get("tflops", -1), r.get("error", ""))
    elif "Error" in line:
        print(line.strip()[:200])
PY
echo "total $(( $(date +%s) - t0 ))s"
