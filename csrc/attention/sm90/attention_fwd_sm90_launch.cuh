// Launch template of the Hopper forward kernel (instantiated in attention_fwd_sm90_hdim*.cu), and the
// check that the loaded binary of the current device really holds its sm_90a body.
#pragma once
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdlib>
#include <cstring>

#include "attention/attention_launch.h"
#include "attention/sm90/attention_fwd_sm90_kernel.cuh"

namespace elastic {
namespace sm90 {

// Two K/V slots at head_dim 128 (Q 32 KiB + 2 x 64 KiB), three at 64 (Q 16 KiB + 3 x 32 KiB).
template <typename T, int D>
using FwdSm90Config = FwdSm90Traits<T, D, D == 64 ? 3 : 2>;

}  // namespace sm90

template <typename T, int D>
bool attention_fwd_sm90_available() {
  using Tr = sm90::FwdSm90Config<T, D>;
  constexpr int kMaxDevices = 64;
  static std::atomic<int> verdict[kMaxDevices];  // 0 unknown, 1 yes, 2 no
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= kMaxDevices) {
    (void)cudaGetLastError();
    return false;
  }
  const int known = verdict[dev].load(std::memory_order_relaxed);
  if (known != 0) return known == 1;
  bool ok = false;
  int major = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess && major == 9) {
    cudaFuncAttributes attr;
    // The sm_90a body uses no static shared memory; any other pass's body declares a marker array.
    if (cudaFuncGetAttributes(&attr, sm90::attention_fwd_sm90_kernel<T, Tr>) == cudaSuccess)
      ok = attr.binaryVersion >= 90 && attr.sharedSizeBytes == 0;
  }
  (void)cudaGetLastError();  // a failed query must not surface in a later launch check
  verdict[dev].store(ok ? 1 : 2, std::memory_order_relaxed);
  return ok;
}

// Tuning switches, read per call (for A/B timing; all default on): ELASTIC_SM90_PERSISTENT=0 launches one CTA
// per work item instead of one per SM, ELASTIC_SM90_PINGPONG=0 lets the two consumer warpgroups issue freely,
// ELASTIC_SM90_PROXY_FENCE=0 drops the generic-to-async proxy fence after each K/V wait.
inline bool sm90_switch_on(const char* name) {
  const char* env = std::getenv(name);
  return env == nullptr || std::strcmp(env, "0") != 0;
}

template <typename T, int D>
void launch_attention_fwd_sm90(const AttentionFwdParams& p, int num_q_tiles_max, cudaStream_t stream) {
  using Tr = sm90::FwdSm90Config<T, D>;
  static_assert(Tr::BM == kFwdBlockM, "host grid uses kFwdBlockM");
  if (num_q_tiles_max <= 0 || p.batch == 0 || p.heads_q == 0) return;
  auto kernel = sm90::attention_fwd_sm90_kernel<T, Tr>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Tr::SMEM_BYTES));
  const int64_t num_items = int64_t(num_q_tiles_max) * p.heads_q * p.batch;
  int64_t grid = std::min<int64_t>(num_items, INT_MAX);  // CTAs stride over the items: any count is covered
  if (sm90_switch_on("ELASTIC_SM90_PERSISTENT")) {
    int dev = 0, sms = 0;
    C10_CUDA_CHECK(cudaGetDevice(&dev));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
    grid = std::min<int64_t>(grid, std::max(sms, 1));  // one CTA per SM (shared memory allows no second)
  }
  kernel<<<static_cast<unsigned>(grid), Tr::NTHREADS, Tr::SMEM_BYTES, stream>>>(
      p, num_q_tiles_max, num_items,
      (sm90_switch_on("ELASTIC_SM90_PINGPONG") ? sm90::kFlagPingPong : 0u) |
          (sm90_switch_on("ELASTIC_SM90_PROXY_FENCE") ? sm90::kFlagProxyFence : 0u));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace elastic
