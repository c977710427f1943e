// Hopper forward kernel instances for head_dim 128 (fp16, bf16).
#include "attention/sm90/attention_fwd_sm90_launch.cuh"

namespace elastic {
template bool attention_fwd_sm90_available<__half, 128>();
template bool attention_fwd_sm90_available<__nv_bfloat16, 128>();
template void launch_attention_fwd_sm90<__half, 128>(const AttentionFwdParams&, int, cudaStream_t);
template void launch_attention_fwd_sm90<__nv_bfloat16, 128>(const AttentionFwdParams&, int, cudaStream_t);
}  // namespace elastic
