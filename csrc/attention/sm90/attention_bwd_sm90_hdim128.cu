// Hopper backward kernel instances for head_dim 128 (fp16, bf16).
#include "attention/sm90/attention_bwd_sm90_launch.cuh"

namespace elastic {
template bool attention_bwd_sm90_available<__half, 128>();
template bool attention_bwd_sm90_available<__nv_bfloat16, 128>();
template bool launch_attention_bwd_sm90<__half, 128>(const AttentionBwdParams&, int, int, cudaStream_t,
                                                     const KernelOptions&);
template bool launch_attention_bwd_sm90<__nv_bfloat16, 128>(const AttentionBwdParams&, int, int, cudaStream_t,
                                                            const KernelOptions&);
}  // namespace elastic
