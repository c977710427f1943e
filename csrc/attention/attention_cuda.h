// Host-side entry points of the CUDA attention kernels. The API file (attention_cuda_api.cpp) checks
// arguments, allocates outputs and picks the strategy; the functions below only launch work on the
// current stream. No function here may synchronise with the host or read device tensors on the host.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include "attention/attention_checks.h"
#include "attention/kernel_options.h"

namespace elastic {

struct AttentionArgs {
  at::Tensor q, k, v;        // dense [B, S, H, D] or varlen [T, H, D]; last dim contiguous
  at::Tensor head_mode;      // int32 [B, Hkv] on the device
  c10::optional<at::Tensor> block_mask;    // bool [B, Hkv or Hq, NB, NB]
  c10::optional<at::Tensor> cu_seqlens_q;  // int32 [B+1]
  c10::optional<at::Tensor> cu_seqlens_k;  // int32 [B+1]
  int64_t sink = 128, window = 2048, block_size = 128;
  AttentionShape shape;      // from check_attention_args (scale resolved)
  KernelOptions options;     // tuning options in effect for this call (kernel_options.h), resolved once
};

// Non-finite rule (nonfinite.cuh): flags of the non-finite K / V rows of the call, from one prepass launch (no
// sync). Layout: nonfinite::mask_words(B, Hkv, tiles) mask words, then one "any" word per (batch, KV head) pair
// (pair b * Hkv + h) at offset nonfinite_any_offset(a).
at::Tensor nonfinite_kv_flags(const AttentionArgs& a);
int64_t nonfinite_any_offset(const AttentionArgs& a);

// Fused strategy: one launch over all (q-tile, head, batch) work items, each branching on its head's
// mode read from head_mode on the device. When skip_full_heads is true, work items of FULL heads exit
// at once and leave out/lse untouched (the grouped strategy fills them), except FULL heads whose K / V hold a
// non-finite row (nf_flags' "any" word): the grouped strategy leaves those to this kernel. nf_flags: the call's
// nonfinite_kv_flags, or undefined (computed here).
void attention_fwd_fused_cuda(const AttentionArgs& a, at::Tensor& out, at::Tensor& lse, bool skip_full_heads,
                              const at::Tensor& nf_flags = at::Tensor());

// Will the fused strategy run the Hopper wgmma kernel for these arguments (sm_90a build on a 9.x device, no
// block mask, a.options.sm90)? The cost model of strategy="auto" asks (strategy.h).
bool fused_forward_uses_sm90(const AttentionArgs& a);

// Grouped strategy (dense layout only): gather FULL heads into a packed buffer on the device, run them as
// one dense batched call, run the sparse heads with the fused kernel (skip_full_heads), and scatter the dense
// results back into their heads' slots. dense_on_host_count=false: no host sync (FlashAttention-2 varlen over
// the packed group, empty trailing slots). true ("grouped_cudnn"): one device->host read of the FULL-head
// count, then cuDNN's dense kernel over exactly those heads.
void attention_fwd_grouped_cuda(const AttentionArgs& a, at::Tensor& out, at::Tensor& lse, bool dense_on_host_count);

// Backward of either strategy (they compute the same function): dq, dk, dv.
// grad_lse may be undefined (lse unused downstream).
void attention_bwd_cuda(const AttentionArgs& a, const at::Tensor& out, const at::Tensor& lse,
                        const at::Tensor& grad_out, const at::Tensor& grad_lse, at::Tensor& dq, at::Tensor& dk,
                        at::Tensor& dv);

}  // namespace elastic
