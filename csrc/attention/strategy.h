// Cost model for strategy="auto": which CUDA strategy runs a dense-layout call.
//
// It sees only the shape (B, S, Hq, D), never the routing: reading head_mode (and so the MSR) on the host
// would cost a device sync per call.
//
// Grouped = FULL heads packed and run by a library dense kernel (FlashAttention-2 varlen through
// at::_flash_attention_forward, ~345 TFLOP/s on an H200) + the fused kernel for the sparse heads. It adds two
// copy kernels (~0.2-0.7 ms at 32K for Llama-8B shapes) and a second launch, so it only pays when the FULL
// heads' causal attention dominates, i.e. at long context, and only if the library kernel is faster than the
// fused kernel's FULL path.
//
// Threshold, measured (benchmarks/results/bench.md, H200, bf16, Llama-3.1-8B shape): the FA2-varlen group
// runs at the fused kernel's speed, so grouped only wins where its FULL heads dominate: at 64K it beat fused at
// every MSR < 1 (e.g. 55.6 vs 59.8 ms at MSR 0.5), at 128K at MSR 0.25-0.75; at 8K-32K it was within +-5%
// and slower at 8K (1.85 vs 1.72 ms at MSR 0). So grouped from S = 65536 on. Varlen always runs fused (grouped needs the dense
// layout) and head_dim must be one FlashAttention-2 supports (multiple of 8, <= 256).
//
// With the Hopper wgmma kernel (sm90/, 478-510 TFLOP/s dense at 8K-32K, benchmarks/NOTES.md) the fused FULL path
// is ~1.4x faster than the FA2-varlen group, so auto never picks grouped when the fused call runs on it.
#pragma once
#include "attention/attention_checks.h"

namespace elastic {

constexpr int64_t kGroupedMinSeqlen = 65536;

inline bool prefer_grouped_strategy(const AttentionShape& s, bool fused_runs_sm90) {
  if (s.varlen || fused_runs_sm90) return false;
  if (s.head_dim % 8 != 0 || s.head_dim > 256) return false;
  // Chunked prefill (Sq < Skv) is supported by the grouped path, but the work scales with Sq * Skv:
  // decide on the query length actually computed, weighted by the key length.
  const double work = static_cast<double>(s.seqlen_q) * static_cast<double>(s.seqlen_k);
  return work >= static_cast<double>(kGroupedMinSeqlen) * static_cast<double>(kGroupedMinSeqlen);
}

}  // namespace elastic
