// Backward kernel instances for head_dim 128 (fp16, bf16).
#include "attention/attention_bwd_launch.cuh"

namespace elastic {
template void launch_attention_bwd<__half, 128>(const AttentionBwdParams&, int, int, cudaStream_t);
template void launch_attention_bwd<__nv_bfloat16, 128>(const AttentionBwdParams&, int, int, cudaStream_t);
}  // namespace elastic
