#!/usr/bin/env bash
# THE one script to run on the GPU machine (H200), from the repository root, in one device call:
#   build (sm_90a, ptxas report) -> pytest -m gpu -> compute-sanitizer memcheck -> benchmark -> ncu profile
#   -> SASS instruction-class count -> summary table (printed last).
# A failing stage does not stop the later ones. Everything fits one call's 600 s: each stage gets what is left
# of TOTAL_BUDGET_S (default 570) minus a reserve for the stages after it.
#
# Results under $OUT (default /tmp/elastic_device_out), at most 8 files, none deeper than $OUT/a/b/file:
#   summary.txt  bench.md  bench.json  bench_llama_b1.png  ncu_report.txt  plots.tar.gz  logs.tar.gz
# env: TOTAL_BUDGET_S, SEQS / SMOL_SEQS / MODELS / B4_SEQ / BWD_S (passed to the benchmark), SKIP_BUILD=1
set -o pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-/tmp/elastic_device_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # scripts run from tests/ and /tmp import this checkout
WORK=$(mktemp -d /tmp/elastic_device_XXXX)
LOGS="$WORK/logs"
mkdir -p "$LOGS" "$WORK/bench" "$WORK/ncu"
PY=${PYTHON:-python3}
START=$(date +%s)
TOTAL=${TOTAL_BUDGET_S:-570}
export PYTHONUNBUFFERED=1
declare -a SUMMARY

# limit_for CAP RESERVE: seconds this stage may take
limit_for() {
  local left=$(( START + TOTAL - $(date +%s) - $2 ))
  (( left > $1 )) && left=$1
  (( left < 5 )) && left=5
  echo "$left"
}

# stage NAME CAP RESERVE LOG CMD...: run CMD under timeout, record rc and seconds
stage() {
  local name=$1 cap=$2 reserve=$3 log=$4
  shift 4
  local lim t0 rc
  lim=$(limit_for "$cap" "$reserve")
  t0=$(date +%s)
  echo "=== [$name] limit ${lim}s: $*" | tee -a "$log"
  timeout --signal=TERM --kill-after=10 "$lim" "$@" >> "$log" 2>&1
  rc=$?
  local dt=$(( $(date +%s) - t0 ))
  (( rc == 124 )) && echo "[$name] TIMED OUT after ${lim}s" | tee -a "$log"
  STAGE_RC[$name]=$rc
  STAGE_S[$name]=$dt
  echo "=== [$name] rc=$rc in ${dt}s"
}
declare -A STAGE_RC STAGE_S

{
  echo "date: $(date -u)"; nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,memory.used --format=csv 2>&1
  $PY -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version(), "triton", triton.__version__)' 2>&1
  nvcc --version 2>&1 | tail -1; git log --oneline -1 2>/dev/null
} > "$LOGS/env.txt"

# 1. build (ptxas -v report kept separately)
if [[ "${SKIP_BUILD:-0}" != 1 ]]; then
  stage build 300 200 "$LOGS/build.log" env MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0a ELASTIC_CUDA_PTXAS_VERBOSE=1 \
    $PY setup.py build_ext --inplace
else
  STAGE_RC[build]=skipped; STAGE_S[build]=0
fi
grep -E "ptxas|Compiling entry|Function properties|spill|Used [0-9]+ registers" "$LOGS/build.log" > "$LOGS/ptxas.txt" 2>/dev/null
$PY - "$LOGS/ptxas.txt" > "$LOGS/ptxas_summary.txt" 2>&1 <<'EOF'
# one line per kernel: registers, spills, smem (from ptxas -v)
import re, subprocess, sys
lines = open(sys.argv[1], errors="replace").read().splitlines()
name, spill, rows = None, "", []
for l in lines:
    m = re.search(r"Compiling entry function '([^']+)' for '(\w+)'", l)
    if m:
        name, arch = m.group(1), m.group(2)
        continue
    m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", l)
    if m:
        spill = f"spill st/ld {m.group(1)}/{m.group(2)}"
    m = re.search(r"Used (\d+) registers(.*)", l)
    if m and name:
        try:
            short = subprocess.run(["c++filt", name], capture_output=True, text=True).stdout.strip()
        except Exception:
            short = name
        rows.append(f"{int(m.group(1)):4d} regs  {spill:22s} {m.group(2).strip()[:60]:60s} {short[:110]}")
        name = None
print("\n".join(rows) if rows else "no ptxas -v lines found (build failed or cached?)")
EOF

# 2. GPU tests
export ELASTIC_TEST_ERRORS_OUT="$LOGS/max_errors.txt"  # test_zz_print_max_errors writes its table there
stage pytest 170 200 "$LOGS/pytest.log" $PY -m pytest -m gpu -q -rf -p no:cacheprovider

# 3. compute-sanitizer memcheck
if [[ -f tests/gpu_sanitize.py ]]; then
  # gpu_sanitize.py: block masks (the sm80 kernel); experiments/sm90_check.py sanitize: the Hopper kernel's paths
  stage sanitizer 90 170 "$LOGS/sanitizer.log" bash -c "compute-sanitizer --tool memcheck --error-exitcode 1 $PY \
    tests/gpu_sanitize.py && compute-sanitizer --tool memcheck --error-exitcode 1 $PY -m experiments.sm90_check sanitize"
else
  echo "tests/gpu_sanitize.py missing" > "$LOGS/sanitizer.log"; STAGE_RC[sanitizer]=missing; STAGE_S[sanitizer]=0
fi

# 4. benchmark (its own budget leaves room for ncu + sass + packing)
BLIM=$(limit_for 330 75)
export BENCH_BUDGET_S=$(( BLIM > 60 ? BLIM - 45 : 20 ))
export SEQS=${SEQS:-32768,131072,8192,65536,4096}
export SMOL_SEQS=${SMOL_SEQS:-32768}
export B4_SEQ=${B4_SEQ:-8192}
export BWD_S=${BWD_S:-32768}
stage bench 330 75 "$LOGS/bench.log" $PY -m benchmarks.bench_attention --out "$WORK/bench"

# 5. ncu profile
stage ncu 120 20 "$LOGS/ncu.log" bash tools/profile_ncu.sh "$WORK/ncu"

# 6. SASS instruction classes of the built extension
SO=$(ls elastic_cuda/_C*.so 2>/dev/null | head -1)
if [[ -n "$SO" ]] && command -v cuobjdump > /dev/null; then
  cuobjdump --dump-sass "$SO" > "$WORK/sass.txt" 2> "$LOGS/sass.err"
  SASS_MMA=$(grep -cE 'HMMA|HGMMA' "$WORK/sass.txt")
  SASS_HGMMA=$(grep -c 'HGMMA' "$WORK/sass.txt")
  SASS_HMMA=$(grep -c 'HMMA' "$WORK/sass.txt")
  awk '/Function :/ {f=$3} /HGMMA/ {g[f]++} /HMMA/ {h[f]++} /LDGSTS|UTMALDG/ {l[f]++} /LDL|STL/ {s[f]++}
       END {for (k in g) print "HGMMA", g[k], k; for (k in h) print "HMMA", h[k], k; for (k in l) print "async-copy", l[k], k;
            for (k in s) print "local-mem", s[k], k}' "$WORK/sass.txt" | sort -k1,1 -k2,2nr > "$LOGS/sass_counts.txt"
  echo "HMMA|HGMMA lines: $SASS_MMA (HGMMA $SASS_HGMMA, HMMA $SASS_HMMA)" >> "$LOGS/sass_counts.txt"
  STAGE_RC[sass]=0
else
  SASS_MMA="n/a"; STAGE_RC[sass]="no .so or cuobjdump"
fi
STAGE_S[sass]=0

# ---- pack results: at most 8 files under $OUT
cp "$WORK/bench/bench.md" "$WORK/bench/bench.json" "$OUT/" 2>/dev/null
cp "$WORK/bench/bench_llama_b1.png" "$OUT/" 2>/dev/null
cp "$WORK/ncu/ncu_report.txt" "$OUT/" 2>/dev/null
(cd "$WORK/bench" && ls *.png > /dev/null 2>&1 && tar czf "$OUT/plots.tar.gz" *.png) 2>/dev/null
cp "$WORK/ncu/"*.log "$WORK/ncu/"*.csv "$LOGS/" 2>/dev/null

# ---- summary (printed last)
{
  echo "==================== run_device summary ($(date -u), $(( $(date +%s) - START ))s) ===================="
  head -3 "$LOGS/env.txt" | tail -2
  printf "%-10s %-8s %6s  %s\n" stage rc seconds result
  printf "%-10s %-8s %6s  %s\n" build "${STAGE_RC[build]}" "${STAGE_S[build]}" \
    "$(grep -m1 -E 'error|Error' "$LOGS/build.log" 2>/dev/null | cut -c1-90) $(grep -c ' regs ' "$LOGS/ptxas_summary.txt") kernels in ptxas report"
  printf "%-10s %-8s %6s  %s\n" pytest "${STAGE_RC[pytest]}" "${STAGE_S[pytest]}" "$(grep -E 'passed|failed|error|no tests' "$LOGS/pytest.log" | tail -1 | cut -c1-100)"
  printf "%-10s %-8s %6s  %s\n" sanitizer "${STAGE_RC[sanitizer]}" "${STAGE_S[sanitizer]}" "$(grep 'ERROR SUMMARY' "$LOGS/sanitizer.log" 2>/dev/null | tr '\n' ' ' | cut -c1-110)"
  printf "%-10s %-8s %6s  %s\n" bench "${STAGE_RC[bench]}" "${STAGE_S[bench]}" "$(grep -E '^total' "$LOGS/bench.log" | tail -1)"
  printf "%-10s %-8s %6s  %s\n" ncu "${STAGE_RC[ncu]}" "${STAGE_S[ncu]}" "$(grep -c 'sum of kernel' "$WORK/ncu/ncu_report.txt" 2>/dev/null) strategies profiled"
  printf "%-10s %-8s %6s  %s\n" sass "${STAGE_RC[sass]}" "${STAGE_S[sass]}" "HMMA|HGMMA count: $SASS_MMA"
  echo "--- ptxas (registers / spills per kernel, sm_90a) ---"; head -30 "$LOGS/ptxas_summary.txt"
  echo "--- ncu ---"; grep -E "^== strategy|^sum of kernel|TFLOP" "$WORK/ncu/ncu_report.txt" 2>/dev/null | head -20
  echo "--- ncu kernels ---"; awk '/^== strategy/{p=1} /^---- raw/{p=0} p' "$WORK/ncu/ncu_report.txt" 2>/dev/null | head -24
  echo "--- benchmark (speedup vs cuDNN dense: ours_auto|flex_hybrid|serial per MSR) ---"
  sed -n '/=== speedup vs cuDNN dense/,$p' "$LOGS/bench.log" | head -20
  grep -E '"kind": "check"' "$LOGS/bench.log" | cut -c1-200 | head -8
  echo "--- pytest tail ---"; tail -5 "$LOGS/pytest.log"
  echo "--- max errors vs float64 (tests/test_attention_cuda.py) ---"; grep -vE "^    " "$LOGS/max_errors.txt" 2>/dev/null
} > "$OUT/summary.txt"
cp "$OUT/summary.txt" "$LOGS/"
(cd "$WORK" && tar czf "$OUT/logs.tar.gz" logs)  # the full SASS dump stays behind (tens of MB); counts are in logs
ls -la "$OUT"
cat "$OUT/summary.txt"
