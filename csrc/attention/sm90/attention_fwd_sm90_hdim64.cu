// Hopper forward kernel instances for head_dim 64 (fp16, bf16).
#include "attention/sm90/attention_fwd_sm90_launch.cuh"

namespace elastic {
template bool attention_fwd_sm90_available<__half, 64>();
template bool attention_fwd_sm90_available<__nv_bfloat16, 64>();
template void launch_attention_fwd_sm90<__half, 64>(const AttentionFwdParams&, int, cudaStream_t,
                                                    unsigned long long*, const KernelOptions&);
template void launch_attention_fwd_sm90<__nv_bfloat16, 64>(const AttentionFwdParams&, int, cudaStream_t,
                                                           unsigned long long*, const KernelOptions&);
}  // namespace elastic
