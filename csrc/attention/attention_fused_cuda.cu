// Host side of the fused CUDA attention: turns AttentionArgs + tensors into kernel parameters and picks
// the (dtype, head_dim) instance. Arguments are already checked by attention_cuda_api.cpp; nothing here
// reads device memory on the host or synchronises.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <c10/cuda/CUDAStream.h>

#include <climits>
#include <cmath>

#include "attention/attention_cuda.h"
#include "attention/attention_launch.h"
#include "attention/nonfinite.cuh"
#include "attention/static_switch.h"

namespace elastic {
namespace {

// Element strides (batch, row, head) of a dense [B, S, H, D] or varlen [T, H, D] tensor.
void strides3(const at::Tensor& t, bool varlen, int64_t& sb, int64_t& sr, int64_t& sh) {
  if (varlen) {
    sb = 0;
    sr = t.stride(0);
    sh = t.stride(1);
  } else {
    sb = t.stride(0);
    sr = t.stride(1);
    sh = t.stride(2);
  }
}

int clamp_int(int64_t x) { return static_cast<int>(std::min<int64_t>(x, INT_MAX)); }

void fill_seq_params(AttentionSeqParams& s, const AttentionArgs& a) {
  const AttentionShape& sh = a.shape;
  if (sh.varlen) {
    s.cu_seqlens_q = a.cu_seqlens_q->data_ptr<int32_t>();
    s.cu_seqlens_k = a.cu_seqlens_k->data_ptr<int32_t>();
  }
  s.seqlen_q = clamp_int(sh.seqlen_q);
  s.seqlen_k = clamp_int(sh.seqlen_k);
  s.batch = clamp_int(sh.batch);
  s.heads_q = clamp_int(sh.heads_q);
  s.heads_kv = clamp_int(sh.heads_kv);
  s.group = clamp_int(sh.group);
  s.head_mode = a.head_mode.data_ptr<int32_t>();
  s.head_mode_stride_b = a.head_mode.stride(0);
  s.head_mode_stride_h = a.head_mode.stride(1);
  if (a.block_mask.has_value()) {
    const at::Tensor& bm = *a.block_mask;
    s.block_mask = bm.data_ptr<bool>();
    s.bm_stride_b = bm.stride(0);
    s.bm_stride_h = bm.stride(1);
    s.bm_stride_r = bm.stride(2);
    s.bm_stride_c = bm.stride(3);
    s.mask_heads = clamp_int(sh.mask_heads);
    s.mask_blocks = clamp_int(sh.mask_blocks);
  }
  s.sink = clamp_int(a.sink);
  s.window = clamp_int(a.window);
  s.block_size = clamp_int(a.block_size);
  s.scale = static_cast<float>(sh.scale);
  s.scale_log2 = static_cast<float>(sh.scale * 1.4426950408889634);
}

void fill_fwd_params(AttentionFwdParams& p, const AttentionArgs& a, const at::Tensor& out, const at::Tensor& lse) {
  fill_seq_params(p, a);
  const bool varlen = a.shape.varlen;
  p.q = a.q.data_ptr();
  p.k = a.k.data_ptr();
  p.v = a.v.data_ptr();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  strides3(a.q, varlen, p.q_stride_b, p.q_stride_r, p.q_stride_h);
  strides3(a.k, varlen, p.k_stride_b, p.k_stride_r, p.k_stride_h);
  strides3(a.v, varlen, p.v_stride_b, p.v_stride_r, p.v_stride_h);
  strides3(out, varlen, p.o_stride_b, p.o_stride_r, p.o_stride_h);
  p.rows_q = varlen ? a.q.size(0) : a.q.size(1);
  p.rows_k = varlen ? a.k.size(0) : a.k.size(1);
  // lse is contiguous: dense [B, Hq, Sq], varlen [Hq, Tq].
  if (varlen) {
    p.lse_stride_b = 0;
    p.lse_stride_h = lse.stride(0);
  } else {
    p.lse_stride_b = lse.stride(0);
    p.lse_stride_h = lse.stride(1);
  }
}

// The Hopper wgmma kernel serves every mode. Its key tiles are 128 wide, so a block mask must have
// block_size % 128 == 0 there (one mask column per key tile); masks of 64-wide blocks go to the sm80 kernel,
// whose 64-wide key tiles take any block_size % 64 == 0. opt.sm90 = false (ELASTIC_CUDA_SM90=0,
// kernel_options.h) forces the sm80 kernel, e.g. to compare both.
template <typename T, int D>
bool use_sm90_forward(const AttentionFwdParams& p, const KernelOptions& opt) {
  if (p.block_mask != nullptr && p.block_size % kSm90BlockN != 0) return false;
  if (!opt.sm90) return false;
  return attention_fwd_sm90_available<T, D>();
}

// The Hopper backward (wgmma + TMA) likewise takes every mode, with the same block-mask condition (its key tiles are
// 128 wide); opt.sm90_bwd = false (ELASTIC_CUDA_SM90_BWD=0) forces the mma.sync backward.
template <typename T, int D>
bool use_sm90_backward(const AttentionBwdParams& p, const KernelOptions& opt) {
  if (p.block_mask != nullptr && p.block_size % kSm90BlockN != 0) return false;
  if (!opt.sm90_bwd) return false;
  return attention_bwd_sm90_available<T, D>();
}

template <typename T, int D>
void launch_fwd(const AttentionFwdParams& p, int num_q_tiles, cudaStream_t stream, const at::Tensor& like,
                const KernelOptions& opt) {
  if (use_sm90_forward<T, D>(p, opt)) {
    // The Hopper kernel's CTAs take work items from this counter (allocated on the launch's stream, so
    // concurrent calls never share one).
    at::Tensor counter = at::zeros({1}, like.options().dtype(at::kLong));
    launch_attention_fwd_sm90<T, D>(p, num_q_tiles, stream,
                                    reinterpret_cast<unsigned long long*>(counter.data_ptr<int64_t>()), opt);
  } else {
    launch_attention_fwd<T, D>(p, num_q_tiles, stream);
  }
}

}  // namespace

bool fused_forward_uses_sm90(const AttentionArgs& a) {
  AttentionFwdParams p;
  p.block_mask = a.block_mask.has_value() ? a.block_mask->data_ptr<bool>() : nullptr;
  p.block_size = static_cast<int>(a.block_size);
  return ELASTIC_DTYPE_HEADDIM_SWITCH(a.q.scalar_type(), a.shape.head_dim, T, D,
                                      [&] { return use_sm90_forward<T, D>(p, a.options); });
}

namespace {
int nonfinite_tiles(const AttentionArgs& a) {
  return nonfinite::tiles_for(clamp_int(a.shape.seqlen_k));
}
// The fields of p that the non-finite prepass reads: sequence geometry and K / V.
void fill_kv_params(AttentionFwdParams& p, const AttentionArgs& a) {
  fill_seq_params(p, a);
  p.k = a.k.data_ptr();
  p.v = a.v.data_ptr();
  strides3(a.k, a.shape.varlen, p.k_stride_b, p.k_stride_r, p.k_stride_h);
  strides3(a.v, a.shape.varlen, p.v_stride_b, p.v_stride_r, p.v_stride_h);
}
}  // namespace

at::Tensor nonfinite_kv_flags(const AttentionArgs& a) {
  AttentionFwdParams p;
  fill_kv_params(p, a);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  return ELASTIC_DTYPE_HEADDIM_SWITCH(a.q.scalar_type(), a.shape.head_dim, T, D, [&] {
    return launch_nonfinite_kv<T, D>(p, clamp_int(a.shape.seqlen_k), a.q, stream);
  });
}

int64_t nonfinite_any_offset(const AttentionArgs& a) {
  return nonfinite::mask_words(a.shape.batch, a.shape.heads_kv, nonfinite_tiles(a));
}

void attention_fwd_fused_cuda(const AttentionArgs& a, at::Tensor& out, at::Tensor& lse, bool skip_full_heads,
                              const at::Tensor& nf_flags) {
  AttentionFwdParams p;
  fill_fwd_params(p, a, out, lse);
  p.skip_full_heads = skip_full_heads;
  const int num_q_tiles = clamp_int((a.shape.seqlen_q + kFwdBlockM - 1) / kFwdBlockM);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  // The non-finite rule (nonfinite.cuh): flag the non-finite K / V rows first (one read of K and V, no sync), unless
  // the caller did. ELASTIC_NONFINITE_PREPASS=0 (timing only) leaves p.nf_flags null: every key counts as finite.
  const at::Tensor flags =
      nf_flags.defined() ? nf_flags : a.options.nonfinite_prepass ? nonfinite_kv_flags(a) : at::Tensor();
  if (flags.defined()) {
    p.nf_flags = reinterpret_cast<const uint32_t*>(flags.data_ptr<int32_t>());
    p.nf_tiles = nonfinite_tiles(a);
  }
  ELASTIC_DTYPE_HEADDIM_SWITCH(a.q.scalar_type(), a.shape.head_dim, T, D,
                               [&] { launch_fwd<T, D>(p, num_q_tiles, stream, a.q, a.options); });
}

void attention_bwd_cuda(const AttentionArgs& a, const at::Tensor& out, const at::Tensor& lse,
                        const at::Tensor& grad_out, const at::Tensor& grad_lse, at::Tensor& dq, at::Tensor& dk,
                        at::Tensor& dv) {
  const bool varlen = a.shape.varlen;
  AttentionBwdParams p;
  fill_fwd_params(p, a, out, lse);
  p.dout = grad_out.data_ptr();
  strides3(grad_out, varlen, p.do_stride_b, p.do_stride_r, p.do_stride_h);
  p.grad_lse = grad_lse.defined() ? grad_lse.data_ptr<float>() : nullptr;
  at::Tensor delta = at::empty_like(lse);
  p.delta = delta.data_ptr<float>();
  at::Tensor dq_accum = at::zeros(dq.sizes(), dq.options().dtype(at::kFloat));
  p.dq_accum = dq_accum.data_ptr<float>();
  strides3(dq_accum, varlen, p.dqa_stride_b, p.dqa_stride_r, p.dqa_stride_h);
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  strides3(dk, varlen, p.dk_stride_b, p.dk_stride_r, p.dk_stride_h);
  strides3(dv, varlen, p.dv_stride_b, p.dv_stride_r, p.dv_stride_h);
  p.total_rows_q = varlen ? a.q.size(0) : a.q.size(0) * a.q.size(1);

  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const int max_q = clamp_int(a.shape.seqlen_q), max_k = clamp_int(a.shape.seqlen_k);
  // Determinism (torch.use_deterministic_algorithms, read here like PyTorch's own CUDA ops do, so that the autograd
  // backward and direct calls of the op both honour it): only the dQ sum differs between runs (fp32 adds of the
  // key tiles' dQ tiles in arrival order; dK / dV are summed inside one CTA). The Hopper backward then adds them in
  // key-tile order through turn counters; the mma.sync backward has no such mode and is reported through
  // alertNotDeterministic (an error, or a warning under warn_only=True, as for PyTorch's nondeterministic ops).
  const bool deterministic = at::globalContext().deterministicAlgorithms();
  at::Tensor dq_sem;
  if (deterministic && max_q > 0) {
    p.dq_sem_tiles = (max_q + 63) / 64;
    dq_sem = at::zeros({int64_t(p.batch) * p.heads_q * p.dq_sem_tiles * 2}, dq.options().dtype(at::kInt));
    p.dq_sem = dq_sem.data_ptr<int>();
  }
  ELASTIC_DTYPE_HEADDIM_SWITCH(a.q.scalar_type(), a.shape.head_dim, T, D, [&] {
    if (!(use_sm90_backward<T, D>(p, a.options) &&
          launch_attention_bwd_sm90<T, D>(p, max_q, max_k, stream, a.options))) {
      if (deterministic)
        at::globalContext().alertNotDeterministic(
            "elastic.attention_backward on the mma.sync backward (GPUs before Hopper, ELASTIC_CUDA_SM90_BWD=0, or "
            "arguments the Hopper backward does not take): its dQ is a sum of fp32 atomics in arrival order");
      p.dq_sem = nullptr;
      launch_attention_bwd<T, D>(p, max_q, max_k, stream);
    }
  });
  const float scale = static_cast<float>(a.shape.scale);
  ELASTIC_DTYPE_SWITCH(a.q.scalar_type(), T, [&] {
    launch_attention_bwd_convert_dq<T>(p.dq_accum, static_cast<T*>(dq.data_ptr()), dq.numel(), scale, stream);
  });
}

}  // namespace elastic
