// Argument checks shared by the CPU and CUDA implementations of elastic::attention(_backward).
// Every message names the argument and the expected shape/dtype so that a caller going straight
// through torch.ops gets the same quality of error as the Python wrapper.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <cmath>
#include <limits>

#include "attention/check_msg.h"
#include "attention/head_mode.h"

namespace elastic {

struct AttentionShape {
  int64_t batch = 0;      // B (number of sequences)
  int64_t seqlen_q = 0;   // Sq (dense) or max_seqlen_q (varlen)
  int64_t seqlen_k = 0;   // Skv (dense) or max_seqlen_k (varlen)
  int64_t heads_q = 0;    // Hq
  int64_t heads_kv = 0;   // Hkv
  int64_t head_dim = 0;   // D
  int64_t group = 0;      // Hq / Hkv
  bool varlen = false;
  int64_t mask_heads = 0;  // block_mask heads: Hkv or Hq (0 when no block mask)
  int64_t mask_blocks = 0; // block_mask rows == cols == ceil(seqlen_k / block_size)
  double scale = 0.0;
};

inline std::string dims_str(const at::Tensor& t) { return dims_text(t.sizes()); }

inline AttentionShape check_attention_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                           const at::Tensor& head_mode, int64_t sink, int64_t window,
                                           const c10::optional<at::Tensor>& block_mask, int64_t block_size,
                                           c10::optional<double> scale,
                                           const c10::optional<at::Tensor>& cu_seqlens_q,
                                           const c10::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q,
                                           int64_t max_seqlen_k) {
  AttentionShape s;
  s.varlen = cu_seqlens_q.has_value() || cu_seqlens_k.has_value();
  ELASTIC_CHECK(!s.varlen || (cu_seqlens_q.has_value() && cu_seqlens_k.has_value()),
                "elastic.attention: cu_seqlens_q and cu_seqlens_k must be given together");
  const int64_t rank = s.varlen ? 3 : 4;
  const char* layout_q = s.varlen ? "[total_q, Hq, D]" : "[B, Sq, Hq, D]";
  const char* layout_kv = s.varlen ? "[total_k, Hkv, D]" : "[B, Skv, Hkv, D]";
  ELASTIC_CHECK(q.dim() == rank, "elastic.attention: q must have shape ", layout_q, ", got ", dims_str(q));
  ELASTIC_CHECK(k.dim() == rank, "elastic.attention: k must have shape ", layout_kv, ", got ", dims_str(k));
  ELASTIC_CHECK(v.dim() == rank, "elastic.attention: v must have shape ", layout_kv, ", got ", dims_str(v));
  ELASTIC_CHECK(k.sizes() == v.sizes(), "elastic.attention: k and v must have the same shape, got k ", dims_str(k),
                " and v ", dims_text(v.sizes()));
  ELASTIC_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
                "elastic.attention: q, k, v must share one dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ",
                v.scalar_type());
  ELASTIC_CHECK(q.device() == k.device() && q.device() == v.device(),
                "elastic.attention: q, k, v must be on one device, got ", q.device(), ", ", k.device(), ", ",
                v.device());
  ELASTIC_CHECK(q.stride(-1) == 1 && k.stride(-1) == 1 && v.stride(-1) == 1,
                "elastic.attention: q, k, v must be contiguous in the last (head_dim) dimension");

  s.heads_q = q.size(-2);
  s.heads_kv = k.size(-2);
  s.head_dim = q.size(-1);
  ELASTIC_CHECK(s.head_dim > 0, "elastic.attention: head_dim (q.shape[-1]) must be > 0, got q ", dims_str(q));
  ELASTIC_CHECK(k.size(-1) == s.head_dim, "elastic.attention: k head_dim ", k.size(-1), " != q head_dim ", s.head_dim);
  ELASTIC_CHECK(s.heads_kv > 0 && s.heads_q % s.heads_kv == 0, "elastic.attention: q heads (", s.heads_q,
                ") must be a multiple of k/v heads (", s.heads_kv, ") for GQA");
  s.group = s.heads_q / s.heads_kv;

  if (s.varlen) {
    const auto& cq = *cu_seqlens_q;
    const auto& ck = *cu_seqlens_k;
    ELASTIC_CHECK(cq.dim() == 1 && cq.scalar_type() == at::kInt, "elastic.attention: cu_seqlens_q must be int32 [B+1]");
    ELASTIC_CHECK(ck.dim() == 1 && ck.scalar_type() == at::kInt, "elastic.attention: cu_seqlens_k must be int32 [B+1]");
    ELASTIC_CHECK(cq.numel() == ck.numel() && cq.numel() >= 2,
                  "elastic.attention: cu_seqlens_q and cu_seqlens_k must both have B+1 >= 2 entries, got ", cq.numel(),
                  " and ", ck.numel());
    ELASTIC_CHECK(cq.device() == q.device() && ck.device() == q.device(),
                  "elastic.attention: cu_seqlens_q/k must be on the device of q (", q.device(), ")");
    ELASTIC_CHECK(max_seqlen_q > 0 && max_seqlen_k > 0,
                  "elastic.attention: varlen needs max_seqlen_q > 0 and max_seqlen_k > 0");
    s.batch = cq.numel() - 1;
    s.seqlen_q = max_seqlen_q;
    s.seqlen_k = max_seqlen_k;
  } else {
    s.batch = q.size(0);
    s.seqlen_q = q.size(1);
    s.seqlen_k = k.size(1);
    ELASTIC_CHECK(k.size(0) == s.batch, "elastic.attention: k batch ", k.size(0), " != q batch ", s.batch);
    ELASTIC_CHECK(s.seqlen_q <= s.seqlen_k, "elastic.attention: q length (", s.seqlen_q,
                  ") must not exceed k/v length (", s.seqlen_k, "); queries are the last Sq positions");
  }

  ELASTIC_CHECK(head_mode.dim() == 2 && head_mode.size(0) == s.batch && head_mode.size(1) == s.heads_kv,
                "elastic.attention: head_mode must have shape [B, Hkv] = [", s.batch, ", ", s.heads_kv, "], got ",
                dims_str(head_mode));
  ELASTIC_CHECK(head_mode.scalar_type() == at::kInt, "elastic.attention: head_mode must be int32, got ",
                head_mode.scalar_type());
  ELASTIC_CHECK(head_mode.device() == q.device(), "elastic.attention: head_mode must be on the device of q (",
                q.device(), "), got ", head_mode.device());
  ELASTIC_CHECK(sink >= 0, "elastic.attention: sink must be >= 0, got ", sink);
  ELASTIC_CHECK(window >= 0, "elastic.attention: window must be >= 0, got ", window);
  ELASTIC_CHECK(block_size > 0, "elastic.attention: block_size must be > 0, got ", block_size);

  s.mask_blocks = (s.seqlen_k + block_size - 1) / block_size;
  if (block_mask.has_value()) {
    const auto& bm = *block_mask;
    ELASTIC_CHECK(bm.scalar_type() == at::kBool, "elastic.attention: block_mask must be bool, got ", bm.scalar_type());
    ELASTIC_CHECK(bm.device() == q.device(), "elastic.attention: block_mask must be on the device of q");
    ELASTIC_CHECK(bm.dim() == 4 && bm.size(0) == s.batch && (bm.size(1) == s.heads_kv || bm.size(1) == s.heads_q) &&
                      bm.size(2) == s.mask_blocks && bm.size(3) == s.mask_blocks,
                  "elastic.attention: block_mask must have shape [B, Hkv or Hq, NB, NB] with NB = ceil(Skv / block_size) = ",
                  s.mask_blocks, " (rows index absolute query blocks), got ", dims_str(bm));
    s.mask_heads = bm.size(1);
    // The kernels index a mask head's NB x NB bits with 32-bit strides (BlockBits).
    ELASTIC_CHECK(bm.stride(2) <= std::numeric_limits<int>::max() && bm.stride(3) <= std::numeric_limits<int>::max(),
                  "elastic.attention: block_mask's row and column strides must fit in 32 bits, got ", bm.stride(2),
                  " and ", bm.stride(3), " (pass block_mask.contiguous())");
  }
  if (scale.has_value()) {
    ELASTIC_CHECK(std::isfinite(*scale) && *scale > 0, "elastic.attention: scale must be a positive finite number, got ",
                  *scale);
    s.scale = *scale;
  } else {
    s.scale = 1.0 / std::sqrt(static_cast<double>(s.head_dim));
  }
  return s;
}

// Strategies of the CUDA implementation (docs/decisions.md); the CPU kernel accepts and ignores them.
inline void check_strategy(c10::string_view strategy) {
  ELASTIC_CHECK(strategy == "auto" || strategy == "fused" || strategy == "grouped" || strategy == "grouped_cudnn",
                "elastic.attention: strategy must be \"auto\", \"fused\", \"grouped\" or \"grouped_cudnn\", got \"",
                std::string(strategy.data(), strategy.size()), "\"");
}

// Mode values can only be read on the host without a sync for CPU tensors; CUDA kernels instead
// write NaN for a head whose mode is invalid (documented in README), so a bad value never passes silently.
inline void check_head_mode_values_cpu(const at::Tensor& head_mode, bool has_block_mask) {
  auto hm = head_mode.contiguous();
  const int32_t* p = hm.data_ptr<int32_t>();
  for (int64_t i = 0; i < hm.numel(); ++i) {
    ELASTIC_CHECK(p[i] >= 0 && p[i] < kNumHeadModes, "elastic.attention: head_mode values must be 0 (FULL), 1 (STREAM)",
                  " or 2 (BLOCK), got ", p[i], " at flat index ", i);
    ELASTIC_CHECK(p[i] != kBlock || has_block_mask,
                  "elastic.attention: head_mode has a BLOCK (2) head but block_mask is None");
  }
}

}  // namespace elastic
