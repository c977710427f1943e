#!/bin/bash
# One GPU session: build, CUDA tests, compute-sanitizer, SASS/register report, timings.
# Usage (GPU machine, repo root): OUT=/some/dir bash benchmarks/run_cuda_checks.sh
set -u
OUT=${OUT:-/tmp/elastic_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
t0=$(date +%s)
MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a} ELASTIC_CUDA_PTXAS_VERBOSE=1 \
  python setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || { echo BUILD FAILED; grep -B2 -A8 -m5 error "$OUT/build.log"; exit 1; }
echo "build $(( $(date +%s) - t0 ))s"
grep -A2 "Compiling entry function '_ZN7elastic2[0-9]attention_\(fwd\|bwd\)_kernel" "$OUT/build.log" | grep -E "entry|registers|spill" > "$OUT/ptxas.txt"
SO=$(ls elastic_cuda/_C*.so)
cuobjdump --dump-sass "$SO" > "$OUT/sass.txt" 2>/dev/null
{ echo "HMMA $(grep -c HMMA "$OUT/sass.txt")  LDSM $(grep -c LDSM "$OUT/sass.txt")  LDGSTS $(grep -c LDGSTS "$OUT/sass.txt")  HGMMA $(grep -c HGMMA "$OUT/sass.txt")  STL $(grep -c 'STL' "$OUT/sass.txt")"; } | tee "$OUT/sass_summary.txt"
gzip -f "$OUT/sass.txt"
timeout 130 python -m pytest -q -s -rf tests/test_attention_cuda.py > "$OUT/tests.log" 2>&1
echo "tests rc=$? $(tail -1 "$OUT/tests.log")"
grep -E "^  [a-z]" "$OUT/tests.log" | head -40
grep -E "Error|assert" "$OUT/tests.log" | head -20
timeout 80 compute-sanitizer --tool memcheck python tests/gpu_sanitize.py > "$OUT/sanitize.log" 2>&1
echo "sanitize rc=$?"; tail -4 "$OUT/sanitize.log"
timeout 90 python benchmarks/bench_attention_cuda.py > "$OUT/bench.log" 2>&1; echo "bench rc=$?"
ELASTIC_ATTN_FWD_BLOCK_N=32 ONLY_OURS=1 BENCH_BWD=0 BENCH_TAG=bn32 timeout 40 python benchmarks/bench_attention_cuda.py >> "$OUT/bench.log" 2>&1
python - "$OUT/bench.log" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    if line.startswith("{"):
        r = json.loads(line)
        print(r.get("tag") or "-", r["kernel"], r["S"], r.get("msr"), "%.3f ms" % r.get("ms", -1), "%.0f TF/s" % r.get("tflops", -1), r.get("error", ""))
PY
echo "total $(( $(date +%s) - t0 ))s"
