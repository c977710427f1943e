// Hopper forward kernel instances for head_dim 128 (fp16, bf16), 3 K/V stages; the 2-stage variant
// (ELASTIC_SM90_STAGES=2, an A/B-timing experiment) is instantiated in experiments/attention_fwd_sm90_hdim128_s2.cu
// when the build has ELASTIC_BUILD_EXPERIMENTS=1.
#include "attention/sm90/attention_fwd_sm90_launch.cuh"

namespace elastic {
#if defined(ELASTIC_EXPERIMENTS)
namespace sm90 {
extern template void launch_config<__half, FwdSm90Config<__half, 128, 2>>(const AttentionFwdParams&, int,
                                                                          cudaStream_t, unsigned long long*,
                                                                          const KernelOptions&);
extern template void launch_config<__nv_bfloat16, FwdSm90Config<__nv_bfloat16, 128, 2>>(
    const AttentionFwdParams&, int, cudaStream_t, unsigned long long*, const KernelOptions&);
}  // namespace sm90
#endif
template bool attention_fwd_sm90_available<__half, 128>();
template bool attention_fwd_sm90_available<__nv_bfloat16, 128>();
template void launch_attention_fwd_sm90<__half, 128>(const AttentionFwdParams&, int, cudaStream_t,
                                                     unsigned long long*, const KernelOptions&);
template void launch_attention_fwd_sm90<__nv_bfloat16, 128>(const AttentionFwdParams&, int, cudaStream_t,
                                                            unsigned long long*, const KernelOptions&);
}  // namespace elastic
