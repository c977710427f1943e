// Small device helpers shared by the CUDA kernel families (sm80 forward and backward, the sm90 forward, decode in
// csrc/decode/; the XAttention estimate in csrc/xattn/ writes no 16-bit output and uses attention_mma.cuh's MMA
// helpers). Kernels include this instead of another family's kernel body; helpers that need a family's tile shapes
// stay there.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace elastic {

// fp32 -> the kernel's 16-bit element type (round to nearest).
template <typename T>
__device__ __forceinline__ T to_elem(float x);
template <>
__device__ __forceinline__ __nv_bfloat16 to_elem<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
template <>
__device__ __forceinline__ __half to_elem<__half>(float x) { return __float2half(x); }

// Write `fill` to the D columns of the out rows [r0, r_end) of one head and `lse_fill` to their lse, with the
// threads tid = 0 .. nthreads - 1 of the caller (a work item that sees no key: 0 and -inf; an invalid head mode:
// NaN and NaN, so that a bad mode never passes silently).
template <typename T, int D>
__device__ void fill_rows(T* out, int64_t o_stride_r, float* lse, int r0, int r_end, float fill, float lse_fill,
                          int tid, int nthreads) {
  const T f = to_elem<T>(fill);
  for (int idx = tid; idx < (r_end - r0) * D; idx += nthreads) out[(r0 + idx / D) * o_stride_r + idx % D] = f;
  for (int r = r0 + tid; r < r_end; r += nthreads) lse[r] = lse_fill;
}

}  // namespace elastic
