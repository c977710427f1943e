// Arguments of the decode attention kernels (elastic::decode_attention over a static elastic KV cache).
// Layout and semantics: csrc/ops.cpp (schema) and elastic_cuda/_decode_cpu.py (the reference).
#pragma once
#include <cstdint>

#include "attention/head_mode.h"

namespace elastic {

// Pool row of logical position `pos` of a STREAM pair: the sink tokens at rows 0..sink-1, every later position in
// a ring of `ring` rows after them (elastic_cuda/_decode_cpu.py: stream_ring_index). The decode kernel walks the
// ring incrementally (decode_kernel.cuh: key_row); the prefill's commit (static_cache_commit.cu) places each token.
ELASTIC_HD int32_t stream_ring_row(int32_t pos, int32_t sink, int32_t ring) {
  return pos < sink ? pos : sink + (pos - sink) % ring;
}

struct DecodeParams {
  // q [B, Sq, Hq, D], any strides with d contiguous (elements).
  const void* q;
  int64_t q_stride_b, q_stride_s, q_stride_h;
  // Whole-history pool (FULL and BLOCK pairs): [full_pairs, full_tokens, D], rows of D contiguous elements.
  const void* full_k;
  const void* full_v;
  int64_t full_k_stride_pair, full_v_stride_pair;
  int32_t full_pairs, full_tokens;
  // STREAM pool: [stream_pairs, stream_tokens = sink + ring, D].
  const void* stream_k;
  const void* stream_v;
  int64_t stream_k_stride_pair, stream_v_stride_pair;
  int32_t stream_pairs, stream_tokens;
  const int32_t* head_mode;  // [B, Hkv]
  const int32_t* slot;       // [B, Hkv]
  const int32_t* seq_lens;   // [B], valid tokens including this step's Sq
  void* out;                 // [B, Sq, Hq, D] contiguous
  float* lse;                // [B, Hq, Sq] natural log
  // Work items: a pair's key list is cut into chunks of one length for the whole launch (chosen on the device
  // from the real lengths); item i of the launch is chunk j of some pair. Pairs of more than one chunk write
  // partials that the combine kernel merges.
  float* part_out;     // [row_chunks, items_max, rows_per_chunk, D]
  float* part_lse;     // [row_chunks, items_max, rows_per_chunk], log2 domain
  int32_t* plan;       // [B * Hkv, 2]: first item and item count of each pair (written by the split kernel)
  int32_t items_max;   // grid x: target_items + B * Hkv bounds the item count (chunk >= total keys / target)
  int32_t target_items;
  int32_t one_wave;    // 1: the plan keeps to target_items items when it can, and splits a pair evenly (plan_item)
  int32_t batch, sq, hq, hkv, group;
  int32_t rows;        // group * Sq query rows per (sample, KV head): row = q_index * group + g
  int32_t row_chunks;  // ceil(rows / rows_per_chunk): grid y
  int32_t sink, window;
  float scale_log2;    // softmax scale * log2(e)
  // Tensor-core kernel only (ELASTIC_DECODE_COPY / ELASTIC_DECODE_FUSED_COMBINE, kernel_options.h):
  int32_t copy_mode;      // 0 cp.async with zero-fill, 1 plain cp.async + L2::256B on full tiles, 2 TMA (launch
                          // falls back to 0 where TMA is not available), 3 zero-fill into the diagnostic layout
  int32_t fused_combine;  // the last CTA of each split pair merges its partials (no combine launch): 1 one element
                          // per thread (combine_element), 2 all threads at once (decode_fused_merge.cuh)
  int32_t* ticket;        // [B * Hkv], zero at launch when fused_combine: CTAs of a pair that finished
  // Combine launch (ELASTIC_DECODE_COMBINE / ELASTIC_DECODE_PDL, kernel_options.h; decode_launch.cu). Last in the
  // struct so that the split kernels' parameter offsets stay those of round 1.
  int32_t combine_v2;     // 1: the latency-light combine kernel (decode_combine_v2.cuh)
  int32_t pdl;            // 0 off; a programmatic dependent launch signalled 1 at the end of each split CTA,
                          // 2 at its start (decode_pdl.cuh)
  int32_t late_q;         // 1: the tensor-core kernel loads Q after its prologue copies (ELASTIC_DECODE_LATE_Q)
};

// CTAs of the split kernel one SM holds (occupancy query, cached): the automatic item target is this times the
// SM count, one wave of equal chunks. mma: the tensor-core split kernel (one query per step, rows <= 8).
int decode_ctas_per_sm(bool bf16, int head_dim, int rows_per_chunk, bool mma);

// Launches the split kernel (tensor-core if mma) and the combine kernel on `stream`. rows_per_chunk is 4 or 8.
void launch_decode_attention(const DecodeParams& p, bool bf16, int head_dim, int rows_per_chunk, bool mma,
                             void* stream);

}  // namespace elastic
