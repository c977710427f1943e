// Hopper forward kernel, head_dim 128 with 2 K/V stages (ELASTIC_SM90_STAGES=2, for A/B timing against the
// default 3), in its own unit so that both compile in parallel.
#include "attention/sm90/attention_fwd_sm90_launch.cuh"

namespace elastic {
namespace sm90 {
template void launch_config<__half, FwdSm90Config<__half, 128, 2>>(const AttentionFwdParams&, int, cudaStream_t,
                                                                   unsigned long long*);
template void launch_config<__nv_bfloat16, FwdSm90Config<__nv_bfloat16, 128, 2>>(const AttentionFwdParams&, int,
                                                                                 cudaStream_t, unsigned long long*);
}  // namespace sm90
}  // namespace elastic
