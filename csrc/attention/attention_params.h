// Plain-old-data launch parameters of the CUDA attention kernels (filled on the host by
// attention_fwd_cuda.cu / attention_bwd_cuda.cu, read by the kernels in *_kernel.cuh).
// Strides are in elements. Dense layout: batch b, row r of a tensor starts at
// ptr + b * batch_stride + r * row_stride (+ head * head_stride). Varlen layout: batch_stride is 0 and the
// rows of sequence b start at cu_seqlens[b] (rows are tokens of the packed tensor).
#pragma once
#include <cstdint>

namespace elastic {

struct AttentionSeqParams {
  const int32_t* cu_seqlens_q = nullptr;  // [B+1] or nullptr (dense)
  const int32_t* cu_seqlens_k = nullptr;
  int seqlen_q = 0, seqlen_k = 0;          // dense lengths (ignored for varlen)
  int batch = 0, heads_q = 0, heads_kv = 0, group = 1;

  const int32_t* head_mode = nullptr;      // [B, Hkv]
  int64_t head_mode_stride_b = 0, head_mode_stride_h = 0;
  const bool* block_mask = nullptr;        // [B, Hm, NB, NB] or nullptr
  int64_t bm_stride_b = 0, bm_stride_h = 0, bm_stride_r = 0, bm_stride_c = 0;
  int mask_heads = 0;                      // Hm: heads_kv or heads_q
  int mask_blocks = 0;                     // NB
  int sink = 0, window = 0, block_size = 1;
  float scale = 1.f, scale_log2 = 1.f;     // softmax scale, and scale * log2(e)
};

struct AttentionFwdParams : AttentionSeqParams {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* out = nullptr;
  float* lse = nullptr;
  int64_t q_stride_b = 0, q_stride_r = 0, q_stride_h = 0;
  int64_t k_stride_b = 0, k_stride_r = 0, k_stride_h = 0;
  int64_t v_stride_b = 0, v_stride_r = 0, v_stride_h = 0;
  int64_t o_stride_b = 0, o_stride_r = 0, o_stride_h = 0;
  int64_t lse_stride_b = 0, lse_stride_h = 0;  // lse[b, h, row]: dense [B, Hq, Sq]; varlen [Hq, Tq]
  int64_t rows_q = 0, rows_k = 0;  // rows of q and of k/v per batch slice: dense Sq / Skv, varlen total tokens
  bool skip_full_heads = false;
  int sched_kv_chunk = 0;  // sm90 work order: KV heads whose items run together (their K/V fit in L2); 0: all
  // Non-finite K / V rows (attention/nonfinite.cuh): the prepass's flag words, masks [B, Hkv, nf_tiles, 2] of the
  // 64-key tiles of each sequence, then one "any" word per (batch, KV head); nullptr: not computed (the forward
  // kernels then treat every key as finite).
  const uint32_t* nf_flags = nullptr;
  int nf_tiles = 0;  // 64-key tiles per (batch, KV head), even
};

struct AttentionBwdParams : AttentionFwdParams {
  const void* dout = nullptr;
  int64_t do_stride_b = 0, do_stride_r = 0, do_stride_h = 0;
  const float* grad_lse = nullptr;  // same layout as lse, or nullptr
  float* delta = nullptr;           // rowsum(dO * O) - grad_lse, layout of lse
  float* dq_accum = nullptr;        // fp32, dense [B, Sq, Hq, D] / varlen [Tq, Hq, D], contiguous
  int64_t dqa_stride_b = 0, dqa_stride_r = 0, dqa_stride_h = 0;
  void* dk = nullptr;
  void* dv = nullptr;
  int64_t dk_stride_b = 0, dk_stride_r = 0, dk_stride_h = 0;
  int64_t dv_stride_b = 0, dv_stride_r = 0, dv_stride_h = 0;
  int64_t total_rows_q = 0;         // number of rows of q (B*Sq dense, Tq varlen), for the preprocess grid
  // Deterministic dQ (Hopper backward, torch.use_deterministic_algorithms): zeroed int32 turn counters, 2 per
  // (batch, query head, 64-row query tile), [B, Hq, dq_sem_tiles, 2]; nullptr: dQ tiles are added in any order.
  int* dq_sem = nullptr;
  int dq_sem_tiles = 0;
  // Hopper backward: fully visible tiles run the unmasked stage (KernelOptions::sm90_bwd_unmasked; set by its launch)
  int sm90_bwd_unmasked = 1;
  // Hopper backward: CTAs handed out by mode (KernelOptions::sm90_bwd_mode_order; attention_bwd_sm90_order.cuh)
  int sm90_bwd_mode_order = 1;
};

}  // namespace elastic
