// Launch parameters of the XAttention block-mask estimate (elastic::xattn_block_mask), filled on the host by
// xattn_cuda_api.cpp and read by the kernels in xattn_kernel.cuh. Strides are in elements.
//
// The estimate runs in chunks of query blocks [r0, r1) so that its fp32 workspace stays bounded; one chunk is
// one launch of each kernel. Workspace of a chunk (rows = query stride groups m in [r0 * per, r1 * per)):
//   ws_block: log2-sum-exp of each row over each causal key block, packed triangularly per (b, Hq head): the
//             rows of query block r hold r + 1 entries, so row m (block r = m / per, j = m - r * per) starts at
//             head_base + per * (tri(r) - tri(r0)) + j * (r + 1), tri(x) = x (x + 1) / 2;
//   ws_row:   log2-sum-exp of each row over all its causal key groups, [B, Hq, (r1 - r0) * per].
// A query group's probability mass in key block c is then exp2(ws_block - ws_row) (xattn_kernel.cuh).
#pragma once
#include <cstdint>

namespace elastic {

struct XattnParams {
  const void* q = nullptr;  // [B, S, Hq, D] or packed [T, Hq, D]
  const void* k = nullptr;  // [B, S, Hkv, D] or packed [T, Hkv, D]
  int64_t q_stride_b = 0, q_stride_t = 0, q_stride_h = 0;  // stride_b is 0 for the packed layout
  int64_t k_stride_b = 0, k_stride_t = 0, k_stride_h = 0;
  const int32_t* cu_seqlens = nullptr;  // [B + 1] (packed layout) or nullptr (dense)
  int64_t total_tokens = 0;             // T: rows of packed q / k (bounds cu_seqlens on the device)
  const int32_t* head_mode = nullptr;   // [B, Hkv]; only kBlock heads are estimated
  int64_t hm_stride_b = 0, hm_stride_h = 0;

  int batch = 0, heads_q = 0, heads_kv = 0, group = 1;
  int seqlen = 0;      // dense S, or max_seqlen (packed): a sequence is clamped to it
  int stride = 16;     // XAttention stride s (tokens per stride group)
  int block_size = 128;
  int per = 8;         // stride groups per block, block_size / stride (a power of two <= 128)
  int num_blocks = 0;  // NB = ceil(seqlen / block_size): the mask is [B, Hq, NB, NB]
  float scale_log2 = 0.f;  // (scale / stride) * log2(e): scores go to base 2 once
  double threshold = 0.9;

  // Chunk of query blocks handled by this launch, and its workspace (layout above).
  int r0 = 0, r1 = 0;
  int64_t ws_head_stride = 0;  // per * (tri(r1) - tri(r0)) floats per (b, Hq head) in ws_block
  float* ws_block = nullptr;
  float* ws_row = nullptr;

  bool* mask = nullptr;  // [B, Hq, NB, NB], contiguous
};

}  // namespace elastic
