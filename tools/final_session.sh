#!/usr/bin/env bash
# A GPU-lending session as device calls made back to back (the machine stays warm ~30 s between calls and keeps
# /root/w). The FlashAttention-4 wheels (the 92 MB nvidia-cutlass-dsl-libs-cu13 split in three: cu13.part.00/01/02,
# the other wheels and gguf beside part 00) travel in the git-ignored .fa1/ .fa2/ .fa3/, the SmolLM2 GGUF in
# .model1/ .model2/ .model3/ (split -b 32M: smol.part.aa/ab/ac), one folder per call: the working tree plus one
# part fits a call's 64 MiB.
#   stage            store the parts this call carries in /root/w; BUILD=1 also starts the sm_90a build detached
#                    (setsid), so that it runs while the next parts travel
#   run STEP...      assemble what has arrived, install the wheels, wait for the build, then the steps in order:
#                    gputests   pytest -m gpu over tests/ (PYTEST_K), then memcheck of the new kernels' small runs
#                    attention  benchmarks.bench_attention (FA4 rows), block  benchmarks.bench_block_prefill,
#                    decode     benchmarks.bench_decode, e2e  benchmarks.bench_e2e_prefill, demo  the demo on cuda,
#                    routertrain  benchmarks.bench_router_training (ROUTERTRAIN_ENV="LENGTHS=4096,8192 BUDGET_S=240")
#                    shell      bash -c "$SHELL_CMD" with this environment (PYTHONPATH, the GGUF), output in $OUT/shell.log
#                    Each step's own environment: <STEP>_ENV="VAR=value ..." (e.g. BLOCK_ENV="SEQS=8192 MSRS=1").
# Results under $OUT (8 files come back at most: each step writes one log, the benchmarks' outputs are tarred).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-/tmp/final_out}
W=/root/w
mkdir -p "$OUT" $W
export PYTHONUNBUFFERED=1
cp .fa*/* .model*/* $W/ 2> /dev/null
mode=${1:-}
shift || true
if [[ $mode == stage ]]; then
  if [[ "${BUILD:-0}" == 1 ]]; then
    setsid nohup bash -c "MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0a python3 setup.py build_ext --inplace > $W/build.log 2>&1; \
      echo rc=\$? >> $W/build.log" > /dev/null 2>&1 < /dev/null &
    echo "build started"
  fi
  ls -la $W | tail -n +2
  exit 0
fi
[[ $mode == run ]] || { echo "usage: $0 stage | run STEP..."; exit 2; }

if [[ -f $W/cu13.part.02 && ! -f $W/site.ok ]]; then
  cat $W/cu13.part.00 $W/cu13.part.01 $W/cu13.part.02 > $W/nvidia_cutlass_dsl_libs_cu13-4.8.1-cp312-cp312-manylinux_2_28_x86_64.whl
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $W/*.whl \
    && touch $W/site.ok
fi
if [[ ! -f $W/site.ok && ! -f $W/gguf.ok ]] && ls $W/gguf-*.whl > /dev/null 2>&1; then  # the model without FA4
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site $W/gguf-*.whl \
    && touch $W/gguf.ok
fi
[[ -f $W/site.ok || -f $W/gguf.ok ]] && export PYTHONPATH="/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages"  # (its .pth is not read in a --target dir)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [[ -f $W/smol.part.ac && ! -f $W/smollm2.gguf ]]; then
  cat $W/smol.part.aa $W/smol.part.ab $W/smol.part.ac > $W/smollm2.gguf
fi
[[ -f $W/smollm2.gguf ]] && export ELASTIC_SMOLLM2_GGUF=$W/smollm2.gguf
for _ in $(seq 1 120); do grep -q "^rc=" $W/build.log 2> /dev/null && break; sleep 2; done
grep -q "^rc=0" $W/build.log || { echo "build not done or failed:"; tail -20 $W/build.log; exit 1; }
python3 -c "import flash_attn.cute.interface" 2> /dev/null && echo "FA4 importable" || echo "FA4 not importable"
t0=$(date +%s)
for step in "$@"; do
  echo "=== $step at $(( $(date +%s) - t0 ))s"
  env_var="${step^^}_ENV"
  read -ra step_env <<< "${!env_var:-}"
  case $step in
  gputests)
    env "${step_env[@]}" timeout "${PYTEST_S:-300}" python3 -m pytest -q -rf -p no:cacheprovider -m gpu tests -k "${PYTEST_K:-}" \
      > "$OUT/gputests.log" 2>&1
    echo "pytest rc=$?"; grep -E "^FAILED|passed|failed" "$OUT/gputests.log" | tail -12
    for s in tests/gpu_sanitize.py tests/gpu_xattn_sanitize.py; do
      timeout 150 compute-sanitizer --tool memcheck --error-exitcode 1 python3 $s --no-timing \
        >> "$OUT/gputests.log" 2>&1
      echo "memcheck $s rc=$?"
    done
    ELASTIC_XATTN_SM90_WIDE=0 timeout 150 compute-sanitizer --tool memcheck --error-exitcode 1 \
      python3 tests/gpu_xattn_sanitize.py --no-timing >> "$OUT/gputests.log" 2>&1
    echo "memcheck tests/gpu_xattn_sanitize.py (narrow kernel 1) rc=$?"
    ;;
  attention|block|decode|e2e)
    mod=$([[ $step == block ]] && echo bench_block_prefill || ([[ $step == attention ]] && echo bench_attention \
      || echo bench_$step$([[ $step == e2e ]] && echo _prefill)))
    env "${step_env[@]}" timeout "${BENCH_S:-300}" python3 -m benchmarks.$mod --out $W/$step > "$OUT/$step.log" 2>&1
    echo "$mod rc=$?"; tail -40 "$OUT/$step.log" | grep -v "^{" | tail -30
    (cd $W && tar czf "$OUT/$step.tar.gz" $step 2> /dev/null)
    ;;
  routertrain)  # issue #17: the trainer's step per full_branch on the real model (needs the staged GGUF)
    env "${step_env[@]}" timeout "${BENCH_S:-300}" python3 -m benchmarks.bench_router_training --out $W/routertrain \
      > "$OUT/routertrain.log" 2>&1
    echo "bench_router_training rc=$?"; grep "^|" "$OUT/routertrain.log" | tail -12
    (cd $W && tar czf "$OUT/routertrain.tar.gz" routertrain 2> /dev/null)
    ;;
  demo)
    env "${step_env[@]}" timeout "${DEMO_S:-200}" python3 -m elastic_cuda demo --device cuda ${DEMO_ARGS:-} > "$OUT/demo.log" 2>&1
    echo "demo rc=$?"; tail -45 "$OUT/demo.log"
    ;;
  shell)
    env "${step_env[@]}" timeout "${SHELL_S:-400}" bash -c "${SHELL_CMD:?SHELL_CMD names the commands}" > "$OUT/shell.log" 2>&1
    echo "shell rc=$?"; tail -${SHELL_TAIL:-40} "$OUT/shell.log"
    ;;
  *) echo "unknown step $step" ;;
  esac
done
echo "total $(( $(date +%s) - t0 ))s"
