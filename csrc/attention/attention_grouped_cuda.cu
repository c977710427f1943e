// Grouped strategy of elastic::attention (dense layout): the FULL heads run through one library dense kernel,
// the sparse heads through the fused kernel, with no host sync.
//
//   1. slot_index_kernel   one block: prefix count (scan) of FULL over the B*Hkv (batch, kv head) pairs gives each
//                          FULL pair a slot; it also writes cu_seqlens for the packed group: slot s has length
//                          Sq (Skv for keys) if s < n_full, else 0. Trailing zero-length sequences keep every
//                          shape static, so the host never needs n_full.
//   2. gather_full_kernel  copies q[b, :, group of kv head h, :] and k/v[b, :, h, :] of each FULL pair into packed
//                          THD buffers (one sequence per slot, G query heads over 1 kv head: GQA inside the
//                          sequence). Sparse pairs copy nothing.
//   3. FlashAttention-2 varlen (at::_flash_attention_forward with cum_seq_q/k), causal bottom-right.
//   4. attention_fwd_fused_cuda(skip_full_heads=true) for STREAM / BLOCK (and invalid-mode) heads.
//   5. scatter_full_kernel writes each slot's output and lse back to its (b, heads) place.
//
// Non-finite inputs (the rule of head_mode.h; nonfinite.cuh): the library kernels let a non-finite V row reach rows
// that cannot see it (0 * NaN in P V), so a FULL pair whose K / V hold a non-finite row (the prepass's "any" word,
// computed once per call on the device) is not a FULL slot: step 1 counts it out and step 4 runs it in the fused
// kernel, which implements the rule. A non-finite query row only meets its own row's arithmetic in the library
// kernels; step 5 writes NaN to its out row and lse.
//
// Why FlashAttention-2 and not cuDNN: cuDNN's varlen entry point (at::_cudnn_attention_forward with cum_seq)
// computes the right function (checked on the H200 with trailing empty sequences, GQA and ragged lengths,
// lse laid out [T, Hq, 1]) but torch 2.11's nested-tensor path looks its graph up in the MHA graph cache and
// never inserts it, so every call rebuilds the cuDNN graph: ~50-70 ms of host time per call at 32K whatever
// n_full is (even with all sequences empty), against 3.8-15 ms of GPU work. FA2 varlen runs the same packed
// buffers at 334-353 TFLOP/s (benchmarks/probe_cudnn_varlen.py, 2026-11-28).
//
// strategy="grouped_cudnn" (Sq == Skv; otherwise as "grouped"): read n_full to the host (one device sync per
// call) and run the packed FULL slots through cuDNN's cached dense kernel (~600 TFLOP/s). Never chosen by
// "auto": the op promises no host sync by default, and CUDA graphs need that.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdint>

#include "attention/attention_cuda.h"
#include "attention/check_msg.h"
#include "attention/head_mode.h"
#include "attention/nonfinite.cuh"
#include "attention/strategy.h"

namespace elastic {
namespace {

constexpr int kCopyThreads = 256;
constexpr int kTokensPerBlock = 16;  // tokens each gather/scatter block moves (per (b, kv head) pair)

constexpr int kIndexThreads = 1024;  // slot_index_kernel: one block, 32 warps

// One block computes the slots: each thread counts the FULL pairs of its contiguous chunk, a block-wide
// exclusive scan (warp shuffles, then one warp over the 32 warp totals) gives each chunk its first slot, and a
// second pass writes slot_of[p] = slot of pair p (b * Hkv + h), or -1 when the pair is not FULL. Then
// cu_seqlens: entry i is min(i, n_full) * len.
__global__ void __launch_bounds__(kIndexThreads)
slot_index_kernel(const int32_t* __restrict__ head_mode, int64_t mode_stride_b, int64_t mode_stride_h,
                  const int32_t* __restrict__ kv_any, int32_t n_heads_kv, int32_t n_pairs, int32_t* __restrict__ slot_of, int32_t* __restrict__ cu_q,
                  int32_t* __restrict__ cu_k, int32_t* __restrict__ n_full_out, int32_t len_q, int32_t len_k) {
  __shared__ int32_t warp_total[kIndexThreads / 32];
  const int32_t per = (n_pairs + kIndexThreads - 1) / kIndexThreads;
  const int32_t lo = min(static_cast<int32_t>(threadIdx.x) * per, n_pairs);
  const int32_t hi = min(lo + per, n_pairs);
  auto is_full = [&](int32_t p) {  // FULL, and no non-finite K / V row (those pairs run in the fused kernel)
    return head_mode[(p / n_heads_kv) * mode_stride_b + (p % n_heads_kv) * mode_stride_h] == kFull &&
           (kv_any == nullptr || kv_any[p] == 0);
  };
  int32_t local = 0;
  for (int32_t p = lo; p < hi; ++p) local += is_full(p) ? 1 : 0;

  const int32_t lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int32_t incl = local;  // inclusive scan inside the warp
  for (int32_t o = 1; o < 32; o <<= 1) {
    const int32_t y = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += y;
  }
  if (lane == 31) warp_total[warp] = incl;
  __syncthreads();
  if (warp == 0) {  // inclusive scan of the 32 warp totals
    int32_t w = warp_total[lane];
    for (int32_t o = 1; o < 32; o <<= 1) {
      const int32_t y = __shfl_up_sync(0xffffffffu, w, o);
      if (lane >= o) w += y;
    }
    warp_total[lane] = w;
  }
  __syncthreads();
  int32_t slot = incl - local + (warp > 0 ? warp_total[warp - 1] : 0);
  const int32_t n_full = warp_total[kIndexThreads / 32 - 1];
  for (int32_t p = lo; p < hi; ++p) slot_of[p] = is_full(p) ? slot++ : -1;
  if (threadIdx.x == 0) *n_full_out = n_full;
  for (int32_t i = threadIdx.x; i <= n_pairs; i += kIndexThreads) {
    const int32_t used = i < n_full ? i : n_full;
    cu_q[i] = used * len_q;
    cu_k[i] = used * len_k;
  }
}

// Copy `row_elems` contiguous elements (a multiple of 8, 16-byte aligned at both ends) per token.
struct RowCopy {
  const char* src;
  int64_t src_stride_tok;  // bytes between consecutive tokens of the source
  char* dst;
  int64_t dst_stride_tok;  // bytes between consecutive tokens of the destination
};

__device__ __forceinline__ void copy_rows(const RowCopy& c, int64_t tok0, int64_t n_tok, int64_t row_bytes) {
  const int64_t vec_per_row = row_bytes / 16;
  const int64_t total = n_tok * vec_per_row;
  for (int64_t i = threadIdx.x; i < total; i += blockDim.x) {
    const int64_t t = tok0 + i / vec_per_row, v = i % vec_per_row;
    const uint4 x = *reinterpret_cast<const uint4*>(c.src + t * c.src_stride_tok + v * 16);
    *reinterpret_cast<uint4*>(c.dst + t * c.dst_stride_tok + v * 16) = x;
  }
}

struct GatherParams {
  const char *q, *k, *v;                  // dense sources
  int64_t q_sb, q_ss, k_sb, k_ss, v_sb, v_ss;  // byte strides: batch, token
  int64_t q_head_bytes, kv_head_bytes;    // byte stride of one head (q heads of a group are adjacent)
  char *qp, *kp, *vp;                     // packed: qp [n_pairs*Sq, G, D], kp/vp [n_pairs*Skv, 1, D]
  const int32_t* slot_of;
  int32_t n_heads_kv, group, len_q, len_k;
  int64_t q_row_bytes, kv_row_bytes;      // G*D*elem, D*elem
};

// grid: (ceil(max(Sq, Skv) / kTokensPerBlock), n_pairs)
__global__ void gather_full_kernel(GatherParams p) {
  const int32_t pair = blockIdx.y;
  const int32_t slot = p.slot_of[pair];
  if (slot < 0) return;
  const int32_t b = pair / p.n_heads_kv, h = pair % p.n_heads_kv;
  const int64_t tok0 = static_cast<int64_t>(blockIdx.x) * kTokensPerBlock;
  if (tok0 < p.len_q) {
    const int64_t n = min(static_cast<int64_t>(kTokensPerBlock), p.len_q - tok0);
    RowCopy c{p.q + b * p.q_sb + h * p.group * p.q_head_bytes, p.q_ss,
              p.qp + static_cast<int64_t>(slot) * p.len_q * p.q_row_bytes, p.q_row_bytes};
    copy_rows(c, tok0, n, p.q_row_bytes);
  }
  if (tok0 < p.len_k) {
    const int64_t n = min(static_cast<int64_t>(kTokensPerBlock), p.len_k - tok0);
    const int64_t dst_off = static_cast<int64_t>(slot) * p.len_k * p.kv_row_bytes;
    RowCopy ck{p.k + b * p.k_sb + h * p.kv_head_bytes, p.k_ss, p.kp + dst_off, p.kv_row_bytes};
    copy_rows(ck, tok0, n, p.kv_row_bytes);
    RowCopy cv{p.v + b * p.v_sb + h * p.kv_head_bytes, p.v_ss, p.vp + dst_off, p.kv_row_bytes};
    copy_rows(cv, tok0, n, p.kv_row_bytes);
  }
}

struct ScatterParams {
  const char* out_p;                             // packed output, logical [slot, token, g, D]
  int64_t op_slot, op_tok, op_head;              // its byte strides
  const float* lse_p;                            // packed lse, logical [slot, g, token]
  int64_t lp_slot, lp_head, lp_tok;              // its element strides
  char* out;                                     // dense out [B, Sq, Hq, D]
  int64_t o_sb, o_ss, o_sh;                      // byte strides
  float* lse;                                    // dense lse [B, Hq, Sq]
  int64_t l_sb, l_sh, l_ss;                      // element strides
  const int32_t* slot_of;
  int32_t n_heads_kv, group, len_q;
  int64_t d_bytes;                               // D * elem
  const char* q;                                 // dense q (non-finite query rows), byte strides as out's
  int64_t q_sb, q_ss, q_sh;
  uint32_t exp2_mask;                            // exponent field of two packed elements (nonfinite::Bits16)
  uint32_t nan2;                                 // two packed NaNs of the element type
};

// grid: (ceil(Sq / kTokensPerBlock), n_pairs)
__global__ void scatter_full_kernel(ScatterParams p) {
  const int32_t pair = blockIdx.y;
  const int32_t slot = p.slot_of[pair];
  if (slot < 0) return;
  const int32_t b = pair / p.n_heads_kv, h = pair % p.n_heads_kv;
  const int64_t tok0 = static_cast<int64_t>(blockIdx.x) * kTokensPerBlock;
  if (tok0 >= p.len_q) return;
  const int64_t n_tok = min(static_cast<int64_t>(kTokensPerBlock), p.len_q - tok0);
  const int64_t vec_per_head = p.d_bytes / 16;
  const int64_t total = n_tok * p.group * vec_per_head;
  for (int64_t i = threadIdx.x; i < total; i += blockDim.x) {
    const int64_t v = i % vec_per_head;
    const int64_t g = (i / vec_per_head) % p.group;
    const int64_t t = tok0 + i / (vec_per_head * p.group);
    const uint4 x = *reinterpret_cast<const uint4*>(p.out_p + slot * p.op_slot + t * p.op_tok + g * p.op_head + v * 16);
    *reinterpret_cast<uint4*>(p.out + b * p.o_sb + t * p.o_ss + (h * p.group + g) * p.o_sh + v * 16) = x;
  }
  for (int64_t i = threadIdx.x; i < n_tok * p.group; i += blockDim.x) {
    const int64_t g = i / n_tok, t = tok0 + i % n_tok;  // token fastest: coalesced on both sides' token stride
    p.lse[b * p.l_sb + (h * p.group + g) * p.l_sh + t * p.l_ss] = p.lse_p[slot * p.lp_slot + g * p.lp_head + t * p.lp_tok];
  }
  // Non-finite query rows: NaN out row and lse (the same thread wrote the row's lse above; other threads wrote its
  // out chunks, hence the barrier).
  __syncthreads();
  for (int64_t i = threadIdx.x; i < n_tok * p.group; i += blockDim.x) {
    const int64_t g = i / n_tok, t = tok0 + i % n_tok;
    const char* qrow = p.q + b * p.q_sb + t * p.q_ss + (h * p.group + g) * p.q_sh;
    uint32_t acc = 0u;
    for (int64_t v = 0; v < vec_per_head; ++v) acc = nonfinite::absmax2(acc, *reinterpret_cast<const uint4*>(qrow + v * 16));
    if (__vcmpgeu2(acc, p.exp2_mask) == 0u) continue;
    char* orow = p.out + b * p.o_sb + t * p.o_ss + (h * p.group + g) * p.o_sh;
    for (int64_t v = 0; v < vec_per_head; ++v) *reinterpret_cast<uint4*>(orow + v * 16) = make_uint4(p.nan2, p.nan2, p.nan2, p.nan2);
    p.lse[b * p.l_sb + (h * p.group + g) * p.l_sh + t * p.l_ss] = NAN;
  }
}

bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

// Dense [B, S, H, D] tensor usable by the vector copies: head_dim contiguous, heads adjacent, 16-byte rows.
at::Tensor packable(const at::Tensor& t) {
  const int64_t es = t.element_size();
  const bool ok = t.stride(3) == 1 && t.stride(2) == t.size(3) && (t.stride(1) * es) % 16 == 0 &&
                  (t.stride(0) * es) % 16 == 0 && aligned16(t);
  return ok ? t : t.contiguous();
}

}  // namespace

void attention_fwd_grouped_cuda(const AttentionArgs& a, at::Tensor& out, at::Tensor& lse, bool dense_on_host_count) {
  const AttentionShape& s = a.shape;
  ELASTIC_CHECK(!s.varlen, "elastic.attention: strategy='grouped' needs the dense layout; varlen runs 'fused'");
  ELASTIC_CHECK(a.q.scalar_type() == at::kHalf || a.q.scalar_type() == at::kBFloat16,
                "elastic.attention: strategy='grouped' needs fp16 or bf16 q/k/v, got ", a.q.scalar_type());
  ELASTIC_CHECK(s.head_dim % 8 == 0 && s.head_dim <= 256,
                "elastic.attention: strategy='grouped' needs head_dim a multiple of 8 and <= 256, got ", s.head_dim);
  ELASTIC_CHECK(out.stride(3) == 1 && (out.stride(2) * out.element_size()) % 16 == 0 &&
                    (out.stride(1) * out.element_size()) % 16 == 0 && (out.stride(0) * out.element_size()) % 16 == 0 &&
                    aligned16(out),
                "elastic.attention (grouped): out must have 16-byte aligned rows");
  ELASTIC_CHECK(s.seqlen_q <= INT32_MAX / std::max<int64_t>(1, s.batch * s.heads_kv) &&
                    s.seqlen_k <= INT32_MAX / std::max<int64_t>(1, s.batch * s.heads_kv),
                "elastic.attention (grouped): B * Hkv * S must fit in int32 (cu_seqlens)");
  ELASTIC_CHECK(s.batch * s.heads_kv <= 65535, "elastic.attention (grouped): B * Hkv must be <= 65535, got ",
                s.batch * s.heads_kv);
  const c10::cuda::CUDAGuard guard(a.q.device());
  if (s.batch == 0 || s.seqlen_q == 0) return;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  const at::Tensor q = packable(a.q), k = packable(a.k), v = packable(a.v);
  const int64_t B = s.batch, Hkv = s.heads_kv, G = s.group, D = s.head_dim;
  const int64_t Sq = s.seqlen_q, Sk = s.seqlen_k, n_pairs = B * Hkv;
  const int64_t es = q.element_size();
  const auto i32 = q.options().dtype(at::kInt);

  // 0. non-finite K / V rows per (batch, KV head) pair: flagged FULL pairs run in the fused kernel (step 4)
  // (ELASTIC_NONFINITE_PREPASS=0, timing only: no flags, every FULL pair is a library pair)
  const at::Tensor nf_flags = a.options.nonfinite_prepass ? nonfinite_kv_flags(a) : at::Tensor();
  const int32_t* kv_any = nf_flags.defined() ? nf_flags.data_ptr<int32_t>() + nonfinite_any_offset(a) : nullptr;

  // 1. slots and cu_seqlens (one small buffer: slot_of | cu_q | cu_k | n_full)
  at::Tensor index = at::empty({n_pairs + 2 * (n_pairs + 1) + 1}, i32);
  at::Tensor slot_of = index.narrow(0, 0, n_pairs);
  at::Tensor cu_q = index.narrow(0, n_pairs, n_pairs + 1);
  at::Tensor cu_k = index.narrow(0, 2 * n_pairs + 1, n_pairs + 1);
  at::Tensor n_full = index.narrow(0, 3 * n_pairs + 2, 1);
  slot_index_kernel<<<1, kIndexThreads, 0, stream>>>(a.head_mode.data_ptr<int32_t>(), a.head_mode.stride(0),
                                           a.head_mode.stride(1), kv_any, static_cast<int32_t>(Hkv),
                                           static_cast<int32_t>(n_pairs), slot_of.data_ptr<int32_t>(),
                                           cu_q.data_ptr<int32_t>(), cu_k.data_ptr<int32_t>(),
                                           n_full.data_ptr<int32_t>(), static_cast<int32_t>(Sq),
                                           static_cast<int32_t>(Sk));
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  // 2. gather FULL pairs into packed THD buffers
  at::Tensor qp = at::empty({n_pairs * Sq, G, D}, q.options());
  at::Tensor kp = at::empty({n_pairs * Sk, 1, D}, k.options());
  at::Tensor vp = at::empty({n_pairs * Sk, 1, D}, v.options());
  {
    GatherParams p;
    p.q = static_cast<const char*>(q.data_ptr());
    p.k = static_cast<const char*>(k.data_ptr());
    p.v = static_cast<const char*>(v.data_ptr());
    p.q_sb = q.stride(0) * es; p.q_ss = q.stride(1) * es;
    p.k_sb = k.stride(0) * es; p.k_ss = k.stride(1) * es;
    p.v_sb = v.stride(0) * es; p.v_ss = v.stride(1) * es;
    p.q_head_bytes = D * es; p.kv_head_bytes = D * es;
    p.qp = static_cast<char*>(qp.data_ptr());
    p.kp = static_cast<char*>(kp.data_ptr());
    p.vp = static_cast<char*>(vp.data_ptr());
    p.slot_of = slot_of.data_ptr<int32_t>();
    p.n_heads_kv = static_cast<int32_t>(Hkv); p.group = static_cast<int32_t>(G);
    p.len_q = static_cast<int32_t>(Sq); p.len_k = static_cast<int32_t>(Sk);
    p.q_row_bytes = G * D * es; p.kv_row_bytes = D * es;
    const dim3 grid(static_cast<unsigned>((std::max(Sq, Sk) + kTokensPerBlock - 1) / kTokensPerBlock),
                    static_cast<unsigned>(n_pairs));
    gather_full_kernel<<<grid, kCopyThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  // 3. dense causal attention over the packed FULL group
  at::Tensor out_p, lse_p;
  int64_t op_slot, op_tok, op_head, lp_slot, lp_head, lp_tok;
  const bool use_cudnn = dense_on_host_count && Sq == Sk;
  if (use_cudnn) {
    // One sync: the dense cuDNN kernel needs the batch (n_full) on the host.
    const int64_t nf = n_full.item<int32_t>();
    if (nf == 0) {
      out_p = at::Tensor();
    } else {
      auto qv = qp.narrow(0, 0, nf * Sq).view({nf, Sq, G, D}).transpose(1, 2);
      auto kv = kp.narrow(0, 0, nf * Sk).view({nf, Sk, 1, D}).transpose(1, 2);
      auto vv = vp.narrow(0, 0, nf * Sk).view({nf, Sk, 1, D}).transpose(1, 2);
      if (G > 1) {  // cuDNN's graph takes k/v head counts from the tensors; expand to be safe across versions
        kv = kv.expand({nf, G, Sk, D});
        vv = vv.expand({nf, G, Sk, D});
      }
      auto res = at::_scaled_dot_product_cudnn_attention(qv, kv.contiguous(), vv.contiguous(), c10::nullopt,
                                                         /*compute_log_sumexp=*/true, 0.0, /*is_causal=*/true,
                                                         false, c10::optional<double>(s.scale));
      out_p = std::get<0>(res);  // logical [nf, G, S, D]
      at::Tensor l = std::get<1>(res);
      if (l.dim() == 4) l = l.squeeze(-1);  // [nf, G, S]
      lse_p = l;
      ELASTIC_CHECK(out_p.stride(3) == 1, "elastic.attention (grouped, cuDNN): unexpected output layout");
      op_slot = out_p.stride(0) * es; op_head = out_p.stride(1) * es; op_tok = out_p.stride(2) * es;
      lp_slot = lse_p.stride(0); lp_head = lse_p.stride(1); lp_tok = lse_p.stride(2);
    }
  } else {
    auto res = at::_flash_attention_forward(qp, kp, vp, cu_q, cu_k, Sq, Sk, /*dropout_p=*/0.0, /*is_causal=*/true,
                                            /*return_debug_mask=*/false, c10::optional<double>(s.scale));
    out_p = std::get<0>(res);  // [n_pairs*Sq, G, D]
    lse_p = std::get<1>(res);  // [G, n_pairs*Sq] (FA2 varlen layout)
    ELASTIC_CHECK(out_p.dim() == 3 && out_p.stride(2) == 1 && lse_p.dim() == 2 && lse_p.size(0) == G,
                  "elastic.attention (grouped): unexpected FlashAttention-2 varlen output layout, out ",
                  out_p.sizes(), " lse ", lse_p.sizes());
    op_tok = out_p.stride(0) * es; op_head = out_p.stride(1) * es; op_slot = Sq * op_tok;
    lp_head = lse_p.stride(0); lp_tok = lse_p.stride(1); lp_slot = Sq * lp_tok;
  }

  // 4. sparse heads (STREAM / BLOCK / invalid -> NaN) with the fused kernel; FULL heads are left to us
  attention_fwd_fused_cuda(a, out, lse, /*skip_full_heads=*/true, nf_flags);

  // 5. scatter the FULL heads back
  if (out_p.defined()) {
    ELASTIC_CHECK((op_slot % 16) == 0 && (op_tok % 16) == 0 && (op_head % 16) == 0 &&
                      reinterpret_cast<uintptr_t>(out_p.data_ptr()) % 16 == 0,
                  "elastic.attention (grouped): packed output rows are not 16-byte aligned");
    ScatterParams p;
    p.out_p = static_cast<const char*>(out_p.data_ptr());
    p.op_slot = op_slot; p.op_tok = op_tok; p.op_head = op_head;
    p.lse_p = lse_p.data_ptr<float>();
    p.lp_slot = lp_slot; p.lp_head = lp_head; p.lp_tok = lp_tok;
    p.out = static_cast<char*>(out.data_ptr());
    p.o_sb = out.stride(0) * es; p.o_ss = out.stride(1) * es; p.o_sh = out.stride(2) * es;
    p.lse = lse.data_ptr<float>();
    p.l_sb = lse.stride(0); p.l_sh = lse.stride(1); p.l_ss = lse.stride(2);
    p.slot_of = slot_of.data_ptr<int32_t>();
    p.n_heads_kv = static_cast<int32_t>(Hkv); p.group = static_cast<int32_t>(G);
    p.len_q = static_cast<int32_t>(Sq);
    p.d_bytes = D * es;
    p.q = static_cast<const char*>(q.data_ptr());
    p.q_sb = q.stride(0) * es; p.q_ss = q.stride(1) * es; p.q_sh = q.stride(2) * es;
    const bool bf16 = q.scalar_type() == at::kBFloat16;
    p.exp2_mask = bf16 ? nonfinite::Bits16<__nv_bfloat16>::kExp2 : nonfinite::Bits16<__half>::kExp2;
    p.nan2 = bf16 ? 0x7fc07fc0u : 0x7e007e00u;
    const dim3 grid(static_cast<unsigned>((Sq + kTokensPerBlock - 1) / kTokensPerBlock),
                    static_cast<unsigned>(n_pairs));
    scatter_full_kernel<<<grid, kCopyThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace elastic
