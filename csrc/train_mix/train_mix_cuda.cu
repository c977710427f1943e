// CUDA kernels of the training mix's elementwise ops (schemas: csrc/ops.cpp; spec: train_mix_cpu.cpp), which replace
// the torch expressions of elastic_cuda/ops/_train_mix.py's train_mix for fp16/bf16 (switch ELASTIC_TRAIN_MIX_FUSED,
// kernel_options.h). Both are bandwidth-bound passes that read each operand once in 16-byte packs and keep every
// intermediate in registers: at the Llama-3.1-8B shape at 8K (one [1, 8192, 32, 128] bf16 tensor = 64 MB) the torch
// backward prologue alone moved ~1.5 GB (three fp32 copies, a difference, a product, a sum) where train_mix_dz reads
// 192 MB.
//
// train_mix_combine: out = z * full + (1 - z) * sparse in fp32, one value per thread and pack element, over the
//   flattened [rows, H * D] tensor; a CTA finds its first row with one 64-bit division, each thread its row with a
//   32-bit one. Serves the forward's output mix and the backward's dq / dk / dv (the branches' gradients weighed).
// train_mix_dz: deterministic without atomics. Pass 1: one CTA per (batch, KV head, tile of 64 rows), each warp 8
//   rows of the head group's contiguous G * D values per row, fp32 per-lane sums, a fixed shuffle tree, the warps'
//   sums in order -> one partial per tile. Pass 2: one CTA per (batch, KV head) sums its tiles' partials in a fixed
//   tree. A tile never straddles two sequences (tiles are per batch), so no row is counted in the wrong z.
//
// Varlen: cu_seqlens stays on the device (no host sync). A row in no sequence gets out 0 and no share of dz; a
// batch whose bounds are decreasing, outside the rows or longer than max_seqlen_q gets dz NaN (loud, never silently
// wrong), as boundary_pool does.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <climits>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "train_mix/train_mix_checks.h"

namespace elastic {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kCombineUnroll = 4;                   // packs per thread in flight (2 x 16 B loads each)
constexpr int kDzUnroll = 4;                        // train_mix_dz: packs per lane in flight (3 x 16 B loads each)
constexpr int kRowsPerWarp = 8;                     // train_mix_dz: rows of one tile per warp
constexpr int kTileRows = kWarps * kRowsPerWarp;    // rows per pass-1 CTA
constexpr int kMaxTiles = 65535;                    // gridDim.y

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// The batch of a row: dense row / seq_len; varlen the b with cu[b] <= row < cu[b + 1], -1 for a row in no sequence.
// With a malformed cu the answer stays within [0, batch) or -1 (no out-of-bounds read of z).
__device__ __forceinline__ int batch_of_row(int row, int seq_len, const int32_t* __restrict__ cu, int batch) {
  if (cu == nullptr) return row / seq_len;
  if (row < cu[0] || row >= cu[batch]) return -1;
  int lo = 0, hi = batch - 1;  // the largest b in [0, batch) with cu[b] <= row
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (cu[mid] <= row) lo = mid; else hi = mid - 1;
  }
  return row < cu[lo + 1] ? lo : -1;
}

template <typename T, typename Acc, int N>
__global__ void __launch_bounds__(kThreads) mix_combine_kernel(
    const T* __restrict__ full, const T* __restrict__ sparse, const Acc* __restrict__ z,
    const int32_t* __restrict__ cu, T* __restrict__ out, int64_t n_packs, int row_packs, int head_packs, int group,
    int z_heads, int seq_len, int batch) {
  using P = Pack<T, N>;
  const int64_t base = static_cast<int64_t>(blockIdx.x) * (kThreads * kCombineUnroll);
  P a[kCombineUnroll], s[kCombineUnroll];
#pragma unroll
  for (int u = 0; u < kCombineUnroll; ++u) {  // every load issued before any use
    const int64_t i = base + u * kThreads + threadIdx.x;
    if (i < n_packs) {
      a[u] = reinterpret_cast<const P*>(full)[i];
      s[u] = reinterpret_cast<const P*>(sparse)[i];
    }
  }
  const int row0 = static_cast<int>(base / row_packs);
  const int col0 = static_cast<int>(base - static_cast<int64_t>(row0) * row_packs);
#pragma unroll
  for (int u = 0; u < kCombineUnroll; ++u) {
    const int64_t i = base + u * kThreads + threadIdx.x;
    if (i >= n_packs) break;
    const unsigned off = static_cast<unsigned>(col0 + u * kThreads + threadIdx.x);
    const unsigned dr = off / static_cast<unsigned>(row_packs);
    const int row = row0 + static_cast<int>(dr);
    const int col = static_cast<int>(off - dr * static_cast<unsigned>(row_packs));
    const int b = batch_of_row(row, seq_len, cu, batch);
    P o;
    if (b < 0) {
#pragma unroll
      for (int j = 0; j < N; ++j) o.v[j] = static_cast<T>(Acc(0));
    } else {
      const Acc w = z[static_cast<int64_t>(b) * z_heads + (col / head_packs) / group];
      const Acc w1 = Acc(1) - w;
#pragma unroll
      for (int j = 0; j < N; ++j)
        o.v[j] = static_cast<T>(w * static_cast<Acc>(a[u].v[j]) + w1 * static_cast<Acc>(s[u].v[j]));
    }
    reinterpret_cast<P*>(out)[i] = o;
  }
}

template <typename T, typename Acc, int N>
__global__ void __launch_bounds__(kThreads) mix_dz_partial_kernel(
    const T* __restrict__ grad_out, const T* __restrict__ out_full, const T* __restrict__ out_sparse,
    const int32_t* __restrict__ cu, int seq_len, int total_rows, int kv_heads, int seg_packs, int row_packs,
    int n_tiles, Acc* __restrict__ partial) {
  using P = Pack<T, N>;
  const int bh = blockIdx.x, b = bh / kv_heads, h = bh - b * kv_heads, tile = blockIdx.y;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  int64_t lo, hi;
  bool valid = true;
  if (cu != nullptr) {
    lo = cu[b];
    hi = cu[b + 1];
    valid = lo >= 0 && lo <= hi && hi <= total_rows;
  } else {
    lo = static_cast<int64_t>(b) * seq_len;
    hi = lo + seq_len;
  }
  Acc acc = 0;
  if (valid) {
    const int64_t r0 = lo + static_cast<int64_t>(tile) * kTileRows + warp * kRowsPerWarp;
    const int64_t r1 = min(hi, r0 + kRowsPerWarp);
    const int n = r1 > r0 ? static_cast<int>(r1 - r0) * seg_packs : 0;
    const int64_t start = r0 * row_packs + static_cast<int64_t>(h) * seg_packs;
    const P* g = reinterpret_cast<const P*>(grad_out) + start;
    const P* f = reinterpret_cast<const P*>(out_full) + start;
    const P* s = reinterpret_cast<const P*>(out_sparse) + start;
    for (int k0 = lane; k0 < n; k0 += 32 * kDzUnroll) {
      P gv[kDzUnroll], fv[kDzUnroll], sv[kDzUnroll];
#pragma unroll
      for (int u = 0; u < kDzUnroll; ++u) {  // every load issued before any use
        const int k = k0 + 32 * u;
        if (k < n) {
          const int rr = k / seg_packs;
          const int64_t off = static_cast<int64_t>(rr) * row_packs + (k - rr * seg_packs);
          gv[u] = g[off];
          fv[u] = f[off];
          sv[u] = s[off];
        }
      }
#pragma unroll
      for (int u = 0; u < kDzUnroll; ++u) {
        if (k0 + 32 * u < n) {
#pragma unroll
          for (int j = 0; j < N; ++j)
            acc += static_cast<Acc>(gv[u].v[j]) * (static_cast<Acc>(fv[u].v[j]) - static_cast<Acc>(sv[u].v[j]));
        }
      }
    }
  }
#pragma unroll
  for (int m = 16; m > 0; m >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, m);
  __shared__ Acc warp_sums[kWarps];
  if (lane == 0) warp_sums[warp] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    Acc t = 0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) t += warp_sums[w];
    partial[static_cast<int64_t>(bh) * n_tiles + tile] = t;
  }
}

template <typename Acc>
__global__ void __launch_bounds__(kThreads) mix_dz_sum_kernel(const Acc* __restrict__ partial, int n_tiles,
                                                              const int32_t* __restrict__ cu, int kv_heads,
                                                              int total_rows, int64_t max_rows, Acc* __restrict__ dz) {
  const int bh = blockIdx.x;
  Acc t = 0;
  for (int i = threadIdx.x; i < n_tiles; i += kThreads) t += partial[static_cast<int64_t>(bh) * n_tiles + i];
  __shared__ Acc sums[kThreads];
  sums[threadIdx.x] = t;
  __syncthreads();
#pragma unroll
  for (int stride = kThreads / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) sums[threadIdx.x] += sums[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    Acc result = sums[0];
    if (cu != nullptr) {
      const int b = bh / kv_heads;
      const int64_t lo = cu[b], hi = cu[b + 1];
      if (!(lo >= 0 && lo <= hi && hi <= total_rows && hi - lo <= max_rows))
        result = std::numeric_limits<Acc>::quiet_NaN();
    }
    dz[bh] = result;
  }
}

// 16-byte packs when every row of D values starts 16-byte aligned, else one element per thread.
bool packs_fit(const at::Tensor& t, int64_t head_dim) {
  return (head_dim * static_cast<int64_t>(t.element_size())) % 16 == 0 &&
         reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
}

void check_cuda(const char* op, const at::Tensor& t, const char* name) {
  ELASTIC_CHECK(t.is_cuda(), "elastic.", op, ": ", name, " must be a CUDA tensor here, got device ", t.device());
}

at::Tensor train_mix_combine_cuda(const at::Tensor& full, const at::Tensor& sparse, const at::Tensor& z,
                                  const c10::optional<at::Tensor>& cu_seqlens) {
  const char* op = "train_mix_combine";
  const MixRows r = check_mix_rows(op, full, "full", sparse, "sparse", cu_seqlens);
  check_mix_z(op, z, r, full.device());
  check_cuda(op, full, "full");
  const c10::cuda::CUDAGuard guard(full.device());
  const at::Tensor a = full.contiguous(), s = sparse.contiguous();
  at::Tensor out = at::empty(a.sizes(), a.options());
  const int64_t row_elems = r.heads * r.head_dim;
  if (out.numel() == 0) return out;
  ELASTIC_CHECK(r.rows < INT_MAX && row_elems < INT_MAX / 2 && r.batch * z.size(1) < INT_MAX, "elastic.", op,
                ": rows (", r.rows, ") and H * D (", row_elems, ") must be below 2^31 on CUDA");
  const at::Tensor zc = z.to(mix_acc_type(a)).contiguous();
  const at::Tensor cu = r.varlen ? cu_seqlens->contiguous() : at::Tensor();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int group = static_cast<int>(r.heads / z.size(1));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "elastic_train_mix_combine", [&] {
    using Acc = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    auto launch = [&](auto pack) {
      constexpr int N = decltype(pack)::value;
      const int64_t n_packs = a.numel() / N;
      const int64_t blocks = (n_packs + kThreads * kCombineUnroll - 1) / (kThreads * kCombineUnroll);
      mix_combine_kernel<scalar_t, Acc, N><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
          a.data_ptr<scalar_t>(), s.data_ptr<scalar_t>(), zc.data_ptr<Acc>(),
          r.varlen ? cu.data_ptr<int32_t>() : nullptr, out.data_ptr<scalar_t>(), n_packs,
          static_cast<int>(row_elems / N), static_cast<int>(r.head_dim / N), group, static_cast<int>(z.size(1)),
          static_cast<int>(r.seq_len), static_cast<int>(r.batch));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    constexpr int kPack = 16 / sizeof(scalar_t);
    if (packs_fit(a, r.head_dim) && packs_fit(s, r.head_dim) && packs_fit(out, r.head_dim))
      launch(std::integral_constant<int, kPack>{});
    else
      launch(std::integral_constant<int, 1>{});
  });
  return out;
}

at::Tensor train_mix_dz_cuda(const at::Tensor& grad_out, const at::Tensor& out_full, const at::Tensor& out_sparse,
                             const c10::optional<at::Tensor>& cu_seqlens_q, int64_t kv_heads, int64_t max_seqlen_q) {
  const char* op = "train_mix_dz";
  const MixRows r = check_mix_rows(op, grad_out, "grad_out", out_full, "out_full", cu_seqlens_q);
  check_mix_rows(op, grad_out, "grad_out", out_sparse, "out_sparse", cu_seqlens_q);
  ELASTIC_CHECK(kv_heads > 0 && r.heads % kv_heads == 0, "elastic.", op, ": kv_heads must be > 0 and divide the ",
                r.heads, " heads of grad_out, got ", kv_heads);
  check_cuda(op, grad_out, "grad_out");
  const c10::cuda::CUDAGuard guard(grad_out.device());
  at::Tensor dz = at::empty({r.batch, kv_heads}, grad_out.options().dtype(mix_acc_type(grad_out)));
  if (dz.numel() == 0) return dz;
  if (r.rows == 0 || r.head_dim == 0) return dz.zero_();
  const int64_t row_elems = r.heads * r.head_dim;
  const int64_t max_rows = r.varlen ? (max_seqlen_q > 0 ? max_seqlen_q : r.rows) : r.seq_len;
  const int64_t n_tiles = (max_rows + kTileRows - 1) / kTileRows;
  ELASTIC_CHECK(r.rows < INT_MAX && row_elems < INT_MAX / 2 && r.batch * kv_heads < INT_MAX, "elastic.", op,
                ": rows (", r.rows, ") and H * D (", row_elems, ") must be below 2^31 on CUDA");
  ELASTIC_CHECK(n_tiles <= kMaxTiles, "elastic.", op, ": sequences of at most ", int64_t{kMaxTiles} * kTileRows,
                " rows on CUDA, got ", max_rows);
  const at::Tensor g = grad_out.contiguous(), f = out_full.contiguous(), s = out_sparse.contiguous();
  const at::Tensor cu = r.varlen ? cu_seqlens_q->contiguous() : at::Tensor();
  at::Tensor partial = at::empty({r.batch * kv_heads, n_tiles}, dz.options());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int seg_elems = static_cast<int>(row_elems / kv_heads);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "elastic_train_mix_dz", [&] {
    using Acc = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    auto launch = [&](auto pack) {
      constexpr int N = decltype(pack)::value;
      const dim3 grid(static_cast<unsigned>(r.batch * kv_heads), static_cast<unsigned>(n_tiles));
      mix_dz_partial_kernel<scalar_t, Acc, N><<<grid, kThreads, 0, stream>>>(
          g.data_ptr<scalar_t>(), f.data_ptr<scalar_t>(), s.data_ptr<scalar_t>(),
          r.varlen ? cu.data_ptr<int32_t>() : nullptr, static_cast<int>(r.seq_len), static_cast<int>(r.rows),
          static_cast<int>(kv_heads), seg_elems / N, static_cast<int>(row_elems / N), static_cast<int>(n_tiles),
          partial.data_ptr<Acc>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    constexpr int kPack = 16 / sizeof(scalar_t);
    // A KV head's group of G * D values per row must be whole packs too (it starts at h * G * D).
    if (seg_elems % kPack == 0 && packs_fit(g, r.head_dim) && packs_fit(f, r.head_dim) && packs_fit(s, r.head_dim))
      launch(std::integral_constant<int, kPack>{});
    else
      launch(std::integral_constant<int, 1>{});
    mix_dz_sum_kernel<Acc><<<static_cast<unsigned>(r.batch * kv_heads), kThreads, 0, stream>>>(
        partial.data_ptr<Acc>(), static_cast<int>(n_tiles), r.varlen ? cu.data_ptr<int32_t>() : nullptr,
        static_cast<int>(kv_heads), static_cast<int>(r.rows), max_rows, dz.data_ptr<Acc>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return dz;
}

}  // namespace

TORCH_LIBRARY_IMPL(elastic, CUDA, m) {
  m.impl("train_mix_combine", &train_mix_combine_cuda);
  m.impl("train_mix_dz", &train_mix_dz_cuda);
}

}  // namespace elastic
