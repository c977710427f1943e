// Backward kernel instances for head_dim 64 (fp16, bf16).
#include "attention/attention_bwd_launch.cuh"

namespace elastic {
template void launch_attention_bwd<__half, 64>(const AttentionBwdParams&, int, int, cudaStream_t);
template void launch_attention_bwd<__nv_bfloat16, 64>(const AttentionBwdParams&, int, int, cudaStream_t);
}  // namespace elastic

// dq conversion (independent of head_dim), instantiated once here.
namespace elastic {
template void launch_attention_bwd_convert_dq<__half>(const float*, __half*, int64_t, float, cudaStream_t);
template void launch_attention_bwd_convert_dq<__nv_bfloat16>(const float*, __nv_bfloat16*, int64_t, float,
                                                             cudaStream_t);
}  // namespace elastic
