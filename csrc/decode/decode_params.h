// Arguments of the decode attention kernels (elastic::decode_attention over a static elastic KV cache).
// Layout and semantics: csrc/ops.cpp (schema) and elastic_cuda/_decode_cpu.py (the reference).
#pragma once
#include <cstdint>

namespace elastic {

constexpr int kDecodeMaxSplits = 64;  // splits of a pair's key range (grid z)

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
  float* part_out;           // [B * Hkv, row_chunks * rows_per_chunk, num_splits, D] (num_splits > 1 only)
  float* part_lse;           // [B * Hkv, row_chunks * rows_per_chunk, num_splits], log2 domain
  int32_t batch, sq, hq, hkv, group;
  int32_t rows;        // group * Sq query rows per (sample, KV head): row = q_index * group + g
  int32_t row_chunks;  // ceil(rows / rows_per_chunk): grid x
  int32_t num_splits;  // grid z
  int32_t sink, window;
  float scale_log2;    // softmax scale * log2(e)
};

// Launches the split kernel (and the combine kernel when num_splits > 1) on `stream`. rows_per_chunk is 4 or 8.
void launch_decode_attention(const DecodeParams& p, bool bf16, int head_dim, int rows_per_chunk, void* stream);

}  // namespace elastic
