// Hopper backward kernel instances for head_dim 64 (fp16, bf16).
#include "attention/sm90/attention_bwd_sm90_launch.cuh"

namespace elastic {
template bool attention_bwd_sm90_available<__half, 64>();
template bool attention_bwd_sm90_available<__nv_bfloat16, 64>();
template bool launch_attention_bwd_sm90<__half, 64>(const AttentionBwdParams&, int, int, cudaStream_t,
                                                     const KernelOptions&);
template bool launch_attention_bwd_sm90<__nv_bfloat16, 64>(const AttentionBwdParams&, int, int, cudaStream_t,
                                                            const KernelOptions&);
}  // namespace elastic
