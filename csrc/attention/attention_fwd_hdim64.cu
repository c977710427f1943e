// Forward kernel instances for head_dim 64 (fp16, bf16).
#include "attention/attention_fwd_launch.cuh"

namespace elastic {
template void launch_attention_fwd<__half, 64>(const AttentionFwdParams&, int, cudaStream_t);
template void launch_attention_fwd<__nv_bfloat16, 64>(const AttentionFwdParams&, int, cudaStream_t);
}  // namespace elastic
