#!/usr/bin/env bash
# The GPU-machine session, as device calls made back to back (the machine stays warm ~30 s between calls, keeping
# /root/m, the in-place build and any detached training). The real model (94 MB) and the working tree (~21 MiB)
# are over one call's 64 MiB, so the GGUF travels as three parts (`split -b 32M`: smol.part.aa/ab/ac) in the
# git-ignored folders .model1/ .model2/ .model3/, one per call, with the gguf wheel in .whl/ (absent there). Every
# call stores the part it carries in /root/m; the modes that load the model assemble it once all three are there.
#   prep     carry [.model1, .whl]: build the extension in place
#   stage    carry [.model2]: store the part (nothing else)
#   kernels  build, GPU tests, sanitizer, benchmark, ncu (run_device.sh)
#   train    carry [.model3, .whl]: assemble the GGUF; start the router training DETACHED (setsid; torchrun over
#            NPROC GPUs, default all of them) so it outlives the call; with KERNELS_ON_LAST_GPU=1 and NPROC < GPUs,
#            run tools/run_device.sh (GPU tests, sanitizer, benchmark, ncu) on the last GPU meanwhile; then
#            wait up to WAIT_S for the training
#   wait     wait up to WAIT_S more for the detached training; print its progress
#   probe    carry [.model3, .whl]: assemble the GGUF; experiments/head_importance_probe.py over PROCS_PER_GPU ranks
#            (PROBE_ARGS, PROBE_S)
#   eval     torchrun eval over all GPUs with the trained routers; the demo with them; pack the results
#            (one call can do `train` with WAIT_S long enough, then `eval`)
#   demo     the demo with the shipped routers (or ROUTERS) -> $OUT/demo.log
# Results land under $OUT (at most 8 files come back). env: STEPS, BATCH, ROUTER_LR, LAMBDA_LR, T_SEN, TRAIN_ARGS,
# PROCS_PER_GPU (train and eval), NUM_WORKERS, NPROC, WAIT_S,
# EVAL_S, EVAL_SAMPLES, EVAL_LENGTHS, EVAL_ARGS, ROUTERS (eval), DEMO_S, KERNELS_ON_LAST_GPU, KERNEL_BUDGET_S.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-/tmp/elastic_out}
mkdir -p "$OUT" /root/m
export PYTHONUNBUFFERED=1
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
RUN=/root/run_smollm2
NGPU=$(nvidia-smi -L 2>/dev/null | wc -l)
(( NGPU < 1 )) && NGPU=1
EXT=elastic_cuda/_C$(python3 -c 'import sysconfig;print(sysconfig.get_config_var("EXT_SUFFIX"))')

cp .model*/smol.part.* /root/m/ 2> /dev/null  # the model part this call carries, if any
GGUF=/root/m/smollm2.gguf

need_model() {  # the build and the three model parts of this and earlier calls; assemble the GGUF once
  if [[ ! -f $EXT ]]; then
    echo "machine went cold (the build is gone): run the 'prep' call again first"; exit 3
  fi
  if [[ ! -f $GGUF ]]; then
    local parts; parts=$(ls /root/m/smol.part.* 2> /dev/null | wc -l)
    if (( parts != 3 )); then
      echo "model parts in /root/m: $parts of 3 (carry .model1, .model2, .model3 in successive calls)"; exit 3
    fi
    cat /root/m/smol.part.aa /root/m/smol.part.ab /root/m/smol.part.ac > $GGUF
  fi
  export ELASTIC_SMOLLM2_GGUF=$GGUF
}

wait_training() {  # wait_training SECONDS: until the detached run ends or the time is up; print its progress
  local until=$(( $(date +%s) + $1 ))
  while [[ -f /root/train.pid ]] && kill -0 "$(cat /root/train.pid)" 2> /dev/null && (( $(date +%s) < until )); do
    sleep 10
  done
  if [[ -f /root/train.pid ]] && kill -0 "$(cat /root/train.pid)" 2> /dev/null; then
    echo "training still running: $(wc -l < $RUN/train_log.jsonl 2>/dev/null) steps logged"
  else
    echo "training finished: $(tail -1 /root/train.log)"
  fi
  tail -c 1500 $RUN/train_log.jsonl 2>/dev/null | tail -1 | python3 -c 'import json,sys
r = json.loads(sys.stdin.read() or "{}"); print({k: r.get(k) for k in ("step", "loss", "lm_loss", "reg", "msr_sensitive", "msr_robust", "step_time_s")})' 2>/dev/null
  cp /root/train.log $RUN/train_log.jsonl /root/ 2> /dev/null
  (cd /root && tar czf "$OUT/train_logs.tar.gz" train.log train_log.jsonl 2> /dev/null)  # one file (8 come back)
  grep -v '^$' /root/train.log | grep -iE "error|traceback" | head -5
  return 0  # (the grep above finds nothing on a clean run; that is not a failure of the call)
}

case "${1:-}" in
prep)  # build only (the carried model part is stored above)
  MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0a python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1
  echo "prep rc=$?"; tail -2 "$OUT/build.log"
  ;;
stage)
  ls -la /root/m
  ;;
kernels)
  TOTAL_BUDGET_S=${TOTAL_BUDGET_S:-510} bash tools/run_device.sh
  timeout 60 python3 tests/gpu_exception_probe.py > "$OUT/exception_probe.txt" 2>&1; cat "$OUT/exception_probe.txt"
  ;;
train)
  need_model
  NP=${NPROC:-$NGPU}
  PPG=${PROCS_PER_GPU:-1}  # ranks per GPU (a rank is bound by its Python launch overhead; gloo when > 1)
  rm -rf $RUN
  ARGS="--steps ${STEPS:-300} --batch-size ${BATCH:-16} --router-lr ${ROUTER_LR:-5e-4} --lambda-lr ${LAMBDA_LR:-1e-3} --t-sen ${T_SEN:-0.7}"
  echo "training on $NP GPU(s) x $PPG rank(s): $ARGS ${TRAIN_ARGS:-}"
  # shellcheck disable=SC2086
  CUDA_VISIBLE_DEVICES=$(seq -s, 0 $(( NP - 1 ))) setsid nohup python3 -m torch.distributed.run --standalone \
    --nproc-per-node $(( NP * PPG )) -m elastic_cuda train-router --out $RUN $ARGS ${TRAIN_ARGS:-} \
    --num-workers "${NUM_WORKERS:-3}" --no-progress > /root/train.log 2>&1 < /dev/null &
  echo $! > /root/train.pid
  if [[ "${KERNELS_ON_LAST_GPU:-0}" == 1 && $NP -lt $NGPU ]]; then
    # the kernel tests + benchmark on the GPU the training leaves free (same build; CPUs shared with the data
    # workers, noted with the results)
    CUDA_VISIBLE_DEVICES=$(( NGPU - 1 )) SKIP_BUILD=1 TOTAL_BUDGET_S=${KERNEL_BUDGET_S:-470} OUT=$OUT \
      bash tools/run_device.sh > /root/kernels.log 2>&1
    tail -60 /root/kernels.log
  fi
  wait_training "${WAIT_S:-500}"
  ;;
wait)
  wait_training "${WAIT_S:-500}"
  ;;
probe)  # the static-split probe (experiments/head_importance_probe.py)
  need_model
  # shellcheck disable=SC2086
  timeout "${PROBE_S:-400}" python3 -m torch.distributed.run --standalone \
    --nproc-per-node $(( NGPU * ${PROCS_PER_GPU:-8} )) -m experiments.head_importance_probe --out "$OUT" \
    ${PROBE_ARGS:-} > "$OUT/probe.log" 2>&1
  echo "probe rc=$?"; tail -30 "$OUT/probe.log"
  ;;
eval)
  need_model
  ROUTERS=${ROUTERS:-$RUN/routers}  # e.g. ROUTERS=.run/routers: routers trained in an earlier session, carried
  [[ -f $ROUTERS/router_config.json ]] || { echo "no trained routers in $ROUTERS"; exit 3; }
  mkdir -p $RUN
  t1=$(date +%s)
  timeout "${EVAL_S:-300}" python3 -m torch.distributed.run --standalone --nproc-per-node $(( NGPU * ${PROCS_PER_GPU:-1} )) \
    -m elastic_cuda eval \
    --routers "$ROUTERS" --out $RUN/eval --samples-per-task "${EVAL_SAMPLES:-8}" --lengths "${EVAL_LENGTHS:-2048,4096,8192}" \
    --no-progress ${EVAL_ARGS:-} > "$OUT/eval.log" 2>&1
  echo "eval rc=$? in $(( $(date +%s) - t1 ))s" | tee -a "$OUT/eval.log"
  t2=$(date +%s)
  timeout "${DEMO_S:-240}" python3 -m elastic_cuda demo --routers "$ROUTERS" --device cuda > "$OUT/demo.log" 2>&1
  echo "demo rc=$? in $(( $(date +%s) - t2 ))s" | tee -a "$OUT/demo.log"
  cp /root/train.log $RUN/ 2> /dev/null
  (cd $RUN && tar czf "$OUT/run_smollm2.tar.gz" --exclude='checkpoints' --exclude='*.pt' . 2>/dev/null)
  tail -45 "$OUT/eval.log"; tail -70 "$OUT/demo.log"
  ;;
demo)
  need_model
  timeout "${DEMO_S:-240}" python3 -m elastic_cuda demo ${ROUTERS:+--routers "$ROUTERS"} --device cuda \
    > "$OUT/demo.log" 2>&1
  echo "demo rc=$?"; tail -70 "$OUT/demo.log"
  ;;
*)
  echo "usage: $0 prep|stage|kernels|train|wait|probe|eval|demo"; exit 2
  ;;
esac
