// Forward kernel instances for head_dim 128 (fp16, bf16).
#include "attention/attention_fwd_launch.cuh"

namespace elastic {
template void launch_attention_fwd<__half, 128>(const AttentionFwdParams&, int, cudaStream_t);
template void launch_attention_fwd<__nv_bfloat16, 128>(const AttentionFwdParams&, int, cudaStream_t);
}  // namespace elastic
