// CUDA kernel of elastic::router_decision (router_decision.h): one CTA per (sample, KV head) pools the keys, runs the
// router MLP (D -> 4D -> D, D -> 4D -> D -> 2 at the shipped sizes) out of shared memory and writes the logits and
// the head mode: one launch instead of the eager decision's boundary pool + ~13 kernels (#15, where a small model's
// prefill is host-bound).
//
// Numerics, against the eager router on the GPU (boundary_pool kernel, then cuBLAS addmm / torch silu, sub, div,
// add, gt): the pooled keys are the same bits (the boundary pool's device steps, pooling/boundary_pool_device.cuh),
// and so are the standardisation, the head bias and the decision's subtraction / comparison (IEEE _rn intrinsics,
// as torch's kernels; this file is built with --use_fast_math). The Linear layers sum in another order than cuBLAS
// (one warp per output row, fp32 FMA, lanes then a butterfly) and SiLU uses the fast exp: the logits differ from the
// eager ones by rounding (the GPU tests bound them against a float64 reference), so a decision can differ from the
// eager one only where logit_full - logit_sparse is within that rounding of the shift (a near-tie).
//
// Where the kernel does not apply (routers not fp32, head_dim > 128 or a hidden layer wider than kMaxWidth,
// ELASTIC_ROUTER_KERNEL=0) the CUDA op runs the composite formulation: the eager decision's kernels, same bits.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>

#include "attention/check_msg.h"
#include "attention/kernel_options.h"
#include "pooling/boundary_pool.h"
#include "pooling/boundary_pool_device.cuh"
#include "router/router_decision.h"

namespace elastic {
namespace {

constexpr int kThreads = kPoolDimLanes * kPoolTokenLanes;  // 8 warps: the pool's token lanes, then MLP rows
constexpr int kWarps = kThreads / 32;
constexpr int kMaxWidth = 1024;  // widest layer (input or output) the shared activations hold: 8 KB
constexpr int kMaxPoolChunks = 4;  // head_dim <= 4 x 32 = 128 (the routers' 64 / 128): pooled in one pass

struct RouterDecisionParams {
  const void* keys;
  int64_t stride_b, stride_s, stride_h, stride_d;
  const int32_t* cu_seqlens;  // nullptr: dense keys
  int64_t dense_len, total_tokens, heads, dim, n_first, n_last;
  const float* weight[kRouterLayers];
  const float* bias[kRouterLayers];
  int width[kRouterLayers + 1];  // width[0] = dim, width[i + 1] = layer i's outputs
  const float* input_mean;       // [H, D] or nullptr
  const float* input_std;
  const float* head_bias;        // [H, 2] or nullptr
  const float* shift;            // [B] or nullptr (then shift_value)
  float shift_value;
  int sparse_mode;
  int32_t* head_mode;            // [B, H]
  float* logits;                 // [B, H, 2]
};

__device__ inline float silu(float x) { return x / (1.0f + expf(-x)); }

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) router_decision_kernel(const RouterDecisionParams p) {
  const int64_t bh = blockIdx.x;
  const int64_t b = bh / p.heads, h = bh % p.heads;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  __shared__ float partial[kMaxPoolChunks][kPoolTokenLanes][kPoolDimLanes];
  __shared__ float act[2][kMaxWidth];

  // Boundary pool: warp w is token lane w, lane l dim lane l of each chunk of 32 dims, every chunk's loads in flight
  // together; per dim boundary_pool_kernel's summation order (the same pooled bits).
  const PoolRange r = pool_range(p.cu_seqlens, b, p.dense_len, p.total_tokens, p.n_first, p.n_last);
  const scalar_t* keys = static_cast<const scalar_t*>(p.keys) +
                         (p.cu_seqlens != nullptr ? r.start * p.stride_s : b * p.stride_b) + h * p.stride_h;
  const int n_chunks = static_cast<int>((p.dim - lane + kPoolDimLanes - 1) / kPoolDimLanes);  // chunks with dim lane
  float acc[kMaxPoolChunks];
  pool_partial_dims<scalar_t, float, kMaxPoolChunks>(keys + lane * p.stride_d, p.stride_s,
                                                     kPoolDimLanes * p.stride_d, n_chunks, r, warp, acc);
#pragma unroll
  for (int c = 0; c < kMaxPoolChunks; ++c) partial[c][warp][lane] = acc[c];
  __syncthreads();
  if (warp < kMaxPoolChunks) {  // warp c finishes chunk c
    const int64_t d = static_cast<int64_t>(warp) * kPoolDimLanes + lane;
    if (d < p.dim) {
      float x = pool_finish<float>(partial[warp], lane, r);
      if (p.input_mean != nullptr) x = __fdiv_rn(__fsub_rn(x, p.input_mean[h * p.dim + d]), p.input_std[h * p.dim + d]);
      act[0][d] = x;
    }
  }
  __syncthreads();

  // The Linear layers: warp w computes output rows w, w + 8, ...; its lanes read a row's weights coalesced.
  int in = 0;
#pragma unroll
  for (int layer = 0; layer < kRouterLayers; ++layer) {
    const int n_in = p.width[layer], n_out = p.width[layer + 1];
    const float* __restrict__ w = p.weight[layer];
    // Unrolled so that several rows' (and k steps') weight loads are in flight at once: 3 CTAs for the whole
    // decision at B 1, so the kernel is bound by the latency of its ~256 KB of weights (L2, or DRAM when a prefill
    // evicted them), not by its FMAs.
#pragma unroll 4
    for (int row = warp; row < n_out; row += kWarps) {
      float acc = 0.f;
#pragma unroll 8
      for (int k = lane; k < n_in; k += 32) acc = fmaf(w[static_cast<int64_t>(row) * n_in + k], act[in][k], acc);
#pragma unroll
      for (int off = 16; off > 0; off /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, off);
      if (lane == 0) {
        const float y = acc + p.bias[layer][row];
        act[in ^ 1][row] = router_silu_after(layer) ? silu(y) : y;
      }
    }
    __syncthreads();
    in ^= 1;
  }

  if (threadIdx.x == 0) {
    float sparse_logit = act[in][0], full_logit = act[in][1];
    if (p.head_bias != nullptr) {
      sparse_logit = __fadd_rn(sparse_logit, p.head_bias[h * 2]);
      full_logit = __fadd_rn(full_logit, p.head_bias[h * 2 + 1]);
    }
    p.logits[bh * 2] = sparse_logit;
    p.logits[bh * 2 + 1] = full_logit;
    // full_heads_of: at a float shift of 0 the comparison alone (with flush-to-zero a subnormal difference would read
    // as 0), else the difference against the shift (the per-request one of this sample when given).
    bool full;
    if (p.shift != nullptr) {
      full = __fsub_rn(full_logit, sparse_logit) > p.shift[b];
    } else if (p.shift_value == 0.f) {
      full = full_logit > sparse_logit;
    } else {
      full = __fsub_rn(full_logit, sparse_logit) > p.shift_value;
    }
    p.head_mode[bh] = full ? 0 : p.sparse_mode;
  }
}

// The checks made every tensor share mlp[0]'s dtype, so fp32 there means an fp32 router throughout.
bool kernel_applies(const at::Tensor& keys, at::TensorList mlp) {
  if (!kernel_options().router_kernel) return false;
  const auto kt = keys.scalar_type();
  if (kt != at::kFloat && kt != at::kHalf && kt != at::kBFloat16) return false;
  if (mlp[0].scalar_type() != at::kFloat || keys.size(-1) > kMaxPoolChunks * kPoolDimLanes) return false;
  for (const at::Tensor& t : mlp) {
    if (t.size(0) > kMaxWidth) return false;
  }
  return true;
}

std::tuple<at::Tensor, at::Tensor> router_decision_cuda(const at::Tensor& keys,
                                                        const c10::optional<at::Tensor>& cu_seqlens,
                                                        at::TensorList mlp, const c10::optional<at::Tensor>& input_mean,
                                                        const c10::optional<at::Tensor>& input_std,
                                                        const c10::optional<at::Tensor>& head_bias,
                                                        const c10::optional<at::Tensor>& shift, int64_t n_first,
                                                        int64_t n_last, double shift_value, int64_t sparse_mode) {
  const RouterDecisionShape s = check_router_decision_args(keys, cu_seqlens, mlp, input_mean, input_std, head_bias,
                                                           shift, n_first, n_last, sparse_mode);
  ELASTIC_CHECK(keys.is_cuda(), "elastic.router_decision: keys must be a CUDA tensor here");
  const c10::cuda::CUDAGuard guard(keys.device());
  if (!kernel_applies(keys, mlp)) {
    return router_decision_from_pooled(boundary_pool_cuda(keys, cu_seqlens, n_first, n_last), mlp, input_mean,
                                       input_std, head_bias, shift, shift_value, sparse_mode);
  }
  at::Tensor head_mode = at::empty({s.batch, s.heads}, keys.options().dtype(at::kInt));
  at::Tensor logits = at::empty({s.batch, s.heads, 2}, keys.options().dtype(at::kFloat));
  if (head_mode.numel() == 0) return {head_mode, logits};
  ELASTIC_CHECK(s.batch * s.heads <= std::numeric_limits<int32_t>::max(), "elastic.router_decision: B * Hkv too large");
  // Contiguous copies where needed (the parameters normally are: a no-op), alive until the launch is queued.
  std::vector<at::Tensor> params;
  params.reserve(2 * kRouterLayers + 4);
  auto contiguous = [&](const at::Tensor& t) -> const float* {
    params.push_back(t.contiguous());
    return params.back().data_ptr<float>();
  };
  RouterDecisionParams p{};
  p.keys = keys.data_ptr();
  p.stride_b = s.varlen ? 0 : keys.stride(0);
  p.stride_s = s.varlen ? keys.stride(0) : keys.stride(1);
  p.stride_h = keys.stride(-2);
  p.stride_d = keys.stride(-1);
  at::Tensor cu = s.varlen ? cu_seqlens->contiguous() : at::Tensor();
  p.cu_seqlens = s.varlen ? cu.data_ptr<int32_t>() : nullptr;
  p.dense_len = s.varlen ? 0 : keys.size(1);
  p.total_tokens = s.varlen ? keys.size(0) : 0;
  p.heads = s.heads;
  p.dim = s.dim;
  p.n_first = n_first;
  p.n_last = n_last;
  p.width[0] = static_cast<int>(s.dim);
  for (int i = 0; i < kRouterLayers; ++i) {
    p.weight[i] = contiguous(mlp[2 * i]);
    p.bias[i] = contiguous(mlp[2 * i + 1]);
    p.width[i + 1] = static_cast<int>(mlp[2 * i].size(0));
  }
  p.input_mean = input_mean.has_value() ? contiguous(*input_mean) : nullptr;
  p.input_std = input_std.has_value() ? contiguous(*input_std) : nullptr;
  p.head_bias = head_bias.has_value() ? contiguous(*head_bias) : nullptr;
  p.shift = shift.has_value() ? contiguous(*shift) : nullptr;
  p.shift_value = static_cast<float>(shift_value);  // what gt(Tensor float32, Scalar) compares against
  p.sparse_mode = static_cast<int>(sparse_mode);
  p.head_mode = head_mode.data_ptr<int32_t>();
  p.logits = logits.data_ptr<float>();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>(s.batch * s.heads));
  switch (keys.scalar_type()) {
    case at::kFloat: router_decision_kernel<float><<<grid, kThreads, 0, stream>>>(p); break;
    case at::kHalf: router_decision_kernel<at::Half><<<grid, kThreads, 0, stream>>>(p); break;
    default: router_decision_kernel<at::BFloat16><<<grid, kThreads, 0, stream>>>(p); break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {head_mode, logits};
}

}  // namespace

TORCH_LIBRARY_IMPL(elastic, CUDA, m) { m.impl("router_decision", &router_decision_cuda); }

}  // namespace elastic
