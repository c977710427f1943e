// Hopper forward kernel instances for head_dim 128 (fp16, bf16), 3 K/V stages; the 2-stage variant
// (ELASTIC_SM90_STAGES=2) is instantiated in attention_fwd_sm90_hdim128_s2.cu.
#include "attention/sm90/attention_fwd_sm90_launch.cuh"

namespace elastic {
namespace sm90 {
extern template void launch_config<__half, FwdSm90Config<__half, 128, 2>>(const AttentionFwdParams&, int,
                                                                          cudaStream_t, unsigned long long*);
extern template void launch_config<__nv_bfloat16, FwdSm90Config<__nv_bfloat16, 128, 2>>(
    const AttentionFwdParams&, int, cudaStream_t, unsigned long long*);
}  // namespace sm90
template bool attention_fwd_sm90_available<__half, 128>();
template bool attention_fwd_sm90_available<__nv_bfloat16, 128>();
template void launch_attention_fwd_sm90<__half, 128>(const AttentionFwdParams&, int, cudaStream_t,
                                                     unsigned long long*);
template void launch_attention_fwd_sm90<__nv_bfloat16, 128>(const AttentionFwdParams&, int, cudaStream_t,
                                                            unsigned long long*);
}  // namespace elastic
