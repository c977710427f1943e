// Is a kernel's sm_90a body in this build and runnable on the current device? One statement for the forward and the
// backward wgmma kernels: the device-side marker their non-sm_90a bodies run (mark_not_sm90a) and the host check
// that reads it (sm90a_body_runnable, from attention_fwd_sm90_launch.cuh and attention_bwd_sm90_launch.cuh).
#pragma once
#include <cuda_runtime.h>

#include <atomic>

namespace elastic {
namespace sm90 {

constexpr int kMaxDevices = 64;

#if defined(__CUDACC__)
// The body of a wgmma kernel in a compilation pass that is not sm_90a (no wgmma there): its static shared array marks
// the body, so that the host (sm90a_body_runnable: cudaFuncAttributes::sharedSizeBytes == 0) never launches it.
__device__ __forceinline__ void mark_not_sm90a() {
  __shared__ int sm90a_missing[32];
  reinterpret_cast<volatile int*>(sm90a_missing)[threadIdx.x % 32] = 1;
}
#endif

// `kernel`: the __global__ function; `verdict`: the caller's per-kernel cache, one entry per device (0 unknown,
// 1 yes, 2 no), so the attribute query runs once per device. The sm_90a body uses no static shared memory; any
// other pass's body runs mark_not_sm90a (the kernels' #else branch), so sharedSizeBytes tells them apart.
inline bool sm90a_body_runnable(const void* kernel, std::atomic<int> (&verdict)[kMaxDevices]) {
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
    if (cudaFuncGetAttributes(&attr, kernel) == cudaSuccess)
      ok = attr.binaryVersion >= 90 && attr.sharedSizeBytes == 0;
  }
  (void)cudaGetLastError();  // a failed query must not surface in a later launch check
  verdict[dev].store(ok ? 1 : 2, std::memory_order_relaxed);
  return ok;
}

}  // namespace sm90
}  // namespace elastic
