// A/B-timing experiment, not part of the product: the Hopper forward at head_dim 128 with 2 K/V stages instead of
// 3 (selected by ELASTIC_SM90_STAGES=2, kernel_options.h). setup.py / CMake compile the files of experiments/
// folders only with ELASTIC_BUILD_EXPERIMENTS=1, which also defines ELASTIC_EXPERIMENTS everywhere.
#if !defined(ELASTIC_EXPERIMENTS)
#error "experiments/ sources are built only with ELASTIC_BUILD_EXPERIMENTS=1 (which defines ELASTIC_EXPERIMENTS)"
#endif
#include "attention/sm90/attention_fwd_sm90_launch.cuh"

namespace elastic {
namespace sm90 {
template void launch_config<__half, FwdSm90Config<__half, 128, 2>>(const AttentionFwdParams&, int, cudaStream_t,
                                                                   unsigned long long*, const KernelOptions&);
template void launch_config<__nv_bfloat16, FwdSm90Config<__nv_bfloat16, 128, 2>>(const AttentionFwdParams&, int,
                                                                                 cudaStream_t, unsigned long long*,
                                                                                 const KernelOptions&);
}  // namespace sm90
}  // namespace elastic
