// CUDA kernel of elastic::boundary_pool (router input): per sequence and KV head, the mean of the keys of the
// union of the first n_first and the last n_last tokens (a token in both windows counts once). The CPU kernel
// (boundary_pool_cpu.cpp) is the spec. Reads at most n_first + n_last tokens per (sequence, head), so the cost
// is flat in S. fp32 accumulation and output (fp64 for fp64 keys).
//
// Varlen: cu_seqlens stays on the device (no host sync), so it cannot be validated with an exception as on
// the CPU; a sequence whose bounds are decreasing or outside the keys pools to NaN (loud, never silently wrong).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>

#include "pooling/boundary_pool.h"
#include "pooling/boundary_pool_device.cuh"

namespace elastic {
namespace {

constexpr int kDimLanes = kPoolDimLanes;      // threadIdx.x: head_dim lanes (consecutive d: coalesced loads)
constexpr int kTokenLanes = kPoolTokenLanes;  // threadIdx.y: tokens split across warps, reduced in shared memory

template <typename scalar_t, typename acc_t>
__global__ void boundary_pool_kernel(const scalar_t* __restrict__ keys, int64_t stride_b, int64_t stride_s,
                                     int64_t stride_h, int64_t stride_d, const int32_t* __restrict__ cu_seqlens,
                                     int64_t dense_len, int64_t total_tokens, int64_t n_heads, int64_t dim,
                                     int64_t n_first, int64_t n_last, acc_t* __restrict__ out) {
  const int64_t bh = blockIdx.x;
  const int64_t b = bh / n_heads, h = bh % n_heads;
  const int64_t d = static_cast<int64_t>(blockIdx.y) * kDimLanes + threadIdx.x;
  const PoolRange r = pool_range(cu_seqlens, b, dense_len, total_tokens, n_first, n_last);

  acc_t acc = 0;
  if (d < dim) {
    const scalar_t* base = keys + (cu_seqlens != nullptr ? r.start * stride_s : b * stride_b) + h * stride_h + d * stride_d;
    acc = pool_partial<scalar_t, acc_t>(base, stride_s, r, threadIdx.y);
  }
  __shared__ acc_t partial[kTokenLanes][kDimLanes];
  partial[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && d < dim) out[bh * dim + d] = pool_finish<acc_t>(partial, threadIdx.x, r);
}

}  // namespace

at::Tensor boundary_pool_cuda(const at::Tensor& keys, const c10::optional<at::Tensor>& cu_seqlens, int64_t n_first,
                              int64_t n_last) {
  const PoolShape s = check_boundary_pool_args(keys, n_first, n_last, cu_seqlens);
  ELASTIC_CHECK(keys.is_cuda(), "elastic.boundary_pool: keys must be a CUDA tensor here");
  const c10::cuda::CUDAGuard guard(keys.device());
  const auto acc_type = keys.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::empty({s.batch, s.heads, s.dim}, keys.options().dtype(acc_type));
  if (out.numel() == 0) return out;
  at::Tensor cu = s.varlen ? cu_seqlens->contiguous() : at::Tensor();
  const int64_t stride_b = s.varlen ? 0 : keys.stride(0);
  const int64_t stride_s = s.varlen ? keys.stride(0) : keys.stride(1);
  const int64_t dense_len = s.varlen ? 0 : keys.size(1);
  const int64_t total_tokens = s.varlen ? keys.size(0) : 0;
  ELASTIC_CHECK(s.batch * s.heads <= std::numeric_limits<int32_t>::max(), "elastic.boundary_pool: B * Hkv too large");
  const dim3 grid(static_cast<unsigned>(s.batch * s.heads), static_cast<unsigned>((s.dim + kDimLanes - 1) / kDimLanes));
  const dim3 block(kDimLanes, kTokenLanes);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, keys.scalar_type(), "elastic_boundary_pool_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    boundary_pool_kernel<scalar_t, acc_t><<<grid, block, 0, stream>>>(
        keys.data_ptr<scalar_t>(), stride_b, stride_s, keys.stride(-2), keys.stride(-1),
        s.varlen ? cu.data_ptr<int32_t>() : nullptr, dense_len, total_tokens, s.heads, s.dim, n_first, n_last,
        out.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

TORCH_LIBRARY_IMPL(elastic, CUDA, m) { m.impl("boundary_pool", &boundary_pool_cuda); }

}  // namespace elastic
