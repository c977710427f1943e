// Host side of the non-finite prepass (nonfinite.cuh): one launch that flags the non-finite K / V rows of every
// (batch, KV head) for the forward kernels. No host sync; the flag buffer lives on the call's stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>

#include "attention/attention_launch.h"
#include "attention/check_msg.h"
#include "attention/nonfinite.cuh"

namespace elastic {

template <typename T, int D>
at::Tensor launch_nonfinite_kv(AttentionFwdParams& p, int max_seqlen_k, const at::Tensor& like, cudaStream_t stream) {
  const int tiles = nonfinite::tiles_for(max_seqlen_k);
  const int64_t pairs = int64_t(p.batch) * p.heads_kv;
  // Zero-filled: the "any" words are only ever set to 1 (the masks are all written by the kernel).
  at::Tensor flags = at::zeros({nonfinite::mask_words(p.batch, p.heads_kv, tiles) + pairs},
                               like.options().dtype(at::kInt));
  p.nf_tiles = tiles;
  p.nf_flags = reinterpret_cast<const uint32_t*>(flags.data_ptr<int32_t>());
  if (tiles == 0 || pairs == 0) return flags;
  ELASTIC_CHECK(p.heads_kv <= 65535 && p.batch <= 65535, "elastic.attention: batch or KV heads too large for the ",
                "CUDA grid (at most 65535 each)");
  const dim3 grid(tiles, p.heads_kv, p.batch);
  nonfinite::nonfinite_kv_kernel<T, D>
      <<<grid, 128, 0, stream>>>(p, reinterpret_cast<uint32_t*>(flags.data_ptr<int32_t>()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return flags;
}

template at::Tensor launch_nonfinite_kv<__half, 64>(AttentionFwdParams&, int, const at::Tensor&, cudaStream_t);
template at::Tensor launch_nonfinite_kv<__half, 128>(AttentionFwdParams&, int, const at::Tensor&, cudaStream_t);
template at::Tensor launch_nonfinite_kv<__nv_bfloat16, 64>(AttentionFwdParams&, int, const at::Tensor&, cudaStream_t);
template at::Tensor launch_nonfinite_kv<__nv_bfloat16, 128>(AttentionFwdParams&, int, const at::Tensor&,
                                                            cudaStream_t);

}  // namespace elastic
