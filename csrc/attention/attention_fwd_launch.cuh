// Forward launch template (instantiated in attention_fwd_hdim*.cu).
#pragma once
#include <c10/cuda/CUDAException.h>

#include "attention/attention_fwd_kernel.cuh"
#include "attention/attention_launch.h"
#include "attention/check_msg.h"

namespace elastic {

// Tile shapes: 128 query rows per CTA over 4 warps (32 rows each, FlashAttention-2's hdim 64/128 choice),
// BN-key tiles; at most 64 KiB of shared memory, two CTAs per SM.
template <typename T, int D, int BN>
void launch_attention_fwd_config(const AttentionFwdParams& p, int num_q_tiles_max, cudaStream_t stream) {
  using Tr = FwdTraits<T, D, kFwdBlockM, BN, 4>;
  static_assert(Tr::BM == kFwdBlockM, "host grid uses kFwdBlockM");
  if (num_q_tiles_max <= 0 || p.batch == 0 || p.heads_q == 0) return;
  auto kernel = attention_fwd_kernel<T, Tr>;
  if (Tr::SMEM_BYTES > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Tr::SMEM_BYTES));
  }
  ELASTIC_CHECK(num_q_tiles_max <= 65535, "elastic.attention: query length too long for the CUDA grid (",
                num_q_tiles_max, " tiles of ", Tr::BM, " rows; at most 65535)");
  ELASTIC_CHECK(p.batch <= 65535, "elastic.attention: batch ", p.batch, " too large for the CUDA grid (at most 65535)");
  const dim3 grid(p.heads_q, p.batch, num_q_tiles_max);
  kernel<<<grid, Tr::NTHREADS, Tr::SMEM_BYTES, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int D>
void launch_attention_fwd(const AttentionFwdParams& p, int num_q_tiles_max, cudaStream_t stream) {
  // 64-key tiles: measured faster than 32-key tiles on H200 at D=128 (benchmarks/NOTES.md), despite
  // a 96-byte register spill of the 64-key variant.
  launch_attention_fwd_config<T, D, 64>(p, num_q_tiles_max, stream);
}

}  // namespace elastic
