#!/usr/bin/env bash
# ncu stall sampling per SASS line of one launch of our forward / backward / decode kernel
# (driver: experiments/ncu_stalls.py). Per kernel: OUT_DIR/<what>.ncu-rep, <what>_details.txt (SpeedOfLight,
# memory, warp states), <what>_sass.csv (the source page: instruction mix and stall samples per SASS line) and
# <what>_stalls.txt (its summary, experiments/ncu_stall_summary.py).
# usage: [NCU_S=length] tools/ncu_stalls.sh OUT_DIR fwd bwd bwd_stream6 block block_dense decode fa4_fwd fa4_bwd
#        (clocks left alone: --clock-control none; NCU_S: the sequence length, default the driver's)
set -uo pipefail
OUT_DIR=$1; shift
mkdir -p "$OUT_DIR"
cd "$(dirname "$0")/.." || exit 1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
for what in "$@"; do
  case $what in  # kernel name and launches of it to skip (the driver's warm-ups)
    fwd|block|block_dense) name=attention_fwd_sm90_kernel skip=2 ;;
    bwd|bwd_stream6) name=attention_bwd_sm90_kernel skip=2 ;;
    decode) name=decode_mma_kernel skip=3 ;;
    # FlashAttention-4's CuTe DSL kernels: the forward is the only launch of its call; the backward's main kernel
    # is named after its class (its pre- and post-processing kernels are not matched)
    fa4_fwd) name="[Ff]orward" skip=2 ;;
    fa4_bwd) name="[Bb]ackward[A-Za-z_]*[Ss]m90|bwd_sm90" skip=2 ;;
    *) echo "unknown $what"; continue ;;
  esac
  name=${NCU_NAME:-$name}  # a caller's own kernel-name regex (e.g. one read from the peer's profiler names)
  ncu --clock-control none --kernel-name regex:"$name" --launch-skip $skip --launch-count 1 \
      --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section SourceCounters \
      --section Occupancy --section LaunchStats --import-source no -f -o "$OUT_DIR/$what" \
      python3 -m experiments.ncu_stalls "$what" ${NCU_S:-} > "$OUT_DIR/${what}_ncu.log" 2>&1 || { echo "ncu $what failed"; tail -5 "$OUT_DIR/${what}_ncu.log"; }
  ncu -i "$OUT_DIR/$what.ncu-rep" --page details > "$OUT_DIR/${what}_details.txt" 2>&1
  ncu -i "$OUT_DIR/$what.ncu-rep" --page source --csv --print-source sass > "$OUT_DIR/${what}_sass.csv" 2>&1
  python3 -m experiments.ncu_stall_summary "$OUT_DIR/${what}_sass.csv" 40 > "$OUT_DIR/${what}_stalls.txt"
  echo "$what: $(grep -E "Duration|DRAM Throughput|Compute \(SM\) Throughput" "$OUT_DIR/${what}_details.txt" | tr -s ' ' | head -3 | tr '\n' ';')"
done
