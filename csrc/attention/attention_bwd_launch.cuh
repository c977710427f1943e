// Backward launch templates (instantiated in attention_bwd_hdim*.cu): preprocess, main, convert. The preprocess
// and the convert serve the Hopper backward too (sm90/attention_bwd_sm90_launch.cuh).
#pragma once
#include <c10/cuda/CUDAException.h>

#include "attention/attention_bwd_kernel.cuh"
#include "attention/attention_launch.h"
#include "attention/check_msg.h"

namespace elastic {

// delta (and the non-finite rule's NaN dq_accum rows) for max_seqlen_q rows of every sample and query head.
template <typename T, int D>
void launch_attention_bwd_preprocess(const AttentionBwdParams& p, int max_seqlen_q, cudaStream_t stream) {
  if (max_seqlen_q <= 0) return;
  using Pre = BwdPreprocessShape<D>;
  const int64_t pairs = int64_t(max_seqlen_q) * p.heads_q;
  const dim3 grid(static_cast<unsigned>((pairs + Pre::kPairs - 1) / Pre::kPairs), static_cast<unsigned>(p.batch));
  attention_bwd_preprocess_kernel<T, D><<<grid, Pre::kThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int D>
void launch_attention_bwd(const AttentionBwdParams& p, int max_seqlen_q, int max_seqlen_k, cudaStream_t stream) {
  using Tr = BwdTraits<T, D>;
  if (p.batch == 0 || p.heads_q == 0) return;
  ELASTIC_CHECK(p.batch <= 65535, "elastic.attention_backward: batch ", p.batch,
                " too large for the CUDA grid (at most 65535)");

  launch_attention_bwd_preprocess<T, D>(p, max_seqlen_q, stream);
  // The main kernel runs even without queries: it is what writes the (zero) dK, dV.

  if (max_seqlen_k > 0) {
    auto kernel = attention_bwd_kernel<T, Tr>;
    if (Tr::SMEM_BYTES > 48 * 1024) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Tr::SMEM_BYTES));
    }
    const int num_k_tiles = (max_seqlen_k + Tr::BN - 1) / Tr::BN;
    ELASTIC_CHECK(p.heads_kv <= 65535, "elastic.attention_backward: too many KV heads for the CUDA grid");
    const dim3 grid(num_k_tiles, p.heads_kv, p.batch);
    kernel<<<grid, Tr::NTHREADS, Tr::SMEM_BYTES, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename T>
void launch_attention_bwd_convert_dq(const float* dq_accum, T* dq, int64_t n, float scale, cudaStream_t stream) {
  if (n == 0) return;
  const int threads = 256;
  const bool vec8 = reinterpret_cast<uintptr_t>(dq_accum) % 16 == 0 && reinterpret_cast<uintptr_t>(dq) % 16 == 0;
  const int64_t per_thread = vec8 ? 8 : 1;
  const int64_t blocks = std::max<int64_t>(
      1, std::min<int64_t>((n / per_thread + threads - 1) / threads, 65535 * 8));
  const auto kernel = vec8 ? attention_bwd_convert_dq_kernel<T, true> : attention_bwd_convert_dq_kernel<T, false>;
  kernel<<<static_cast<unsigned>(blocks), threads, 0, stream>>>(dq_accum, dq, n, scale);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace elastic
