#!/usr/bin/env bash
# The GPU-machine session in two device calls made back to back (the machine stays warm ~30 s between calls,
# keeping /root/m and the in-place build). The real model (94 MB) is over one call's 64 MiB, so it travels as
# two halves (`split -b 48M` of the GGUF) in git-ignored folders .model1/ and .model2/, with the gguf wheel in
# .whl/ (absent there):
#   call 1, carry [.model1, .whl]:  bash scripts/device_session.sh kernels
#       -> model half 1 to /root/m; build, GPU tests, sanitizer, benchmark, ncu (benchmarks/run_device.sh)
#   (or call 1 = `prep`: model half 1 + build only)
#   call 2, carry [.model2, .whl]:  bash scripts/device_session.sh model
#       -> assemble the GGUF; train routers on SmolLM2; evaluate; run the demo with them
# Results land under $OUT (at most 8 files come back).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-/tmp/elastic_out}
mkdir -p "$OUT" /root/m
export PYTHONUNBUFFERED=1
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"

case "${1:-}" in
prep)  # model half 1 + build only (when a later call must start from a cold machine)
  cp .model1/smol.part.aa /root/m/ && MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0a python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1
  echo "prep rc=$?"; tail -2 "$OUT/build.log"
  ;;
kernels)
  cp .model1/smol.part.aa /root/m/ 2>/dev/null || echo "no .model1 carried"
  TOTAL_BUDGET_S=${TOTAL_BUDGET_S:-510} bash benchmarks/run_device.sh
  timeout 60 python3 tests/gpu_exception_probe.py > "$OUT/exception_probe.txt" 2>&1; cat "$OUT/exception_probe.txt"
  ;;
model)
  if [[ ! -f /root/m/smol.part.aa || ! -f elastic_cuda/_C$(python3 -c 'import sysconfig;print(sysconfig.get_config_var("EXT_SUFFIX"))') ]]; then
    echo "machine went cold (model half 1 or the build is gone): run the 'kernels' call again first"; exit 3
  fi
  cat /root/m/smol.part.aa .model2/smol.part.ab > /root/m/smollm2.gguf
  export ELASTIC_SMOLLM2_GGUF=/root/m/smollm2.gguf
  RUN=/tmp/run_smollm2
  t0=$(date +%s)
  timeout ${TRAIN_S:-330} python3 -m elastic_cuda train-router --out $RUN --steps ${STEPS:-100} --batch-size ${BATCH:-16} --no-progress \
    > "$OUT/train.log" 2>&1; echo "train rc=$? in $(( $(date +%s) - t0 ))s" | tee -a "$OUT/train.log"
  t1=$(date +%s)
  if [[ ${EVAL_S:-150} -gt 0 ]]; then
    timeout ${EVAL_S:-150} python3 -m elastic_cuda eval --routers $RUN/routers --out $RUN/eval --samples-per-task 3 \
      --max-new-tokens 16 --no-progress > "$OUT/eval.log" 2>&1
    echo "eval rc=$? in $(( $(date +%s) - t1 ))s" | tee -a "$OUT/eval.log"
  else
    echo "eval skipped (EVAL_S=0)"
  fi
  t2=$(date +%s)
  timeout ${DEMO_S:-80} python3 -m elastic_cuda demo --routers $RUN/routers --device cuda > "$OUT/demo.log" 2>&1
  echo "demo rc=$? in $(( $(date +%s) - t2 ))s" | tee -a "$OUT/demo.log"
  (cd $RUN && tar czf "$OUT/run_smollm2.tar.gz" --exclude='checkpoints' --exclude='*.pt' . 2>/dev/null)
  tail -5 "$OUT/train.log"; tail -30 "$OUT/eval.log"; tail -40 "$OUT/demo.log"
  ;;
*)
  echo "usage: $0 kernels|model"; exit 2
  ;;
esac
