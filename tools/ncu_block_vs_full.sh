#!/usr/bin/env bash
# Device call: build, then ncu (SpeedOfLight, memory, warp states) on experiments/ncu_block_vs_full.py.
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-/tmp/ncu_out}; mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0a python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -20 "$OUT/build.log"; exit 1; }
timeout 240 ncu --clock-control none --kernel-name regex:sm90 --section SpeedOfLight --section MemoryWorkloadAnalysis \
  --section WarpStateStats --section ComputeWorkloadAnalysis python3 -m experiments.ncu_block_vs_full "${S:-32768}" > "$OUT/ncu.txt" 2>&1
echo "ncu rc=$?"
grep -E "attention_fwd_sm90|Duration|Compute \(SM\) Throughput|Memory Throughput|DRAM Throughput|L2 Hit Rate|L1/TEX Hit|Executed Ipc A|Issue Slots Busy|Stall|Warp Cycles Per Issued|No Eligible|Active Warps" "$OUT/ncu.txt" | head -80
