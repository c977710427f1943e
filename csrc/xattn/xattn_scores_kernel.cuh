// Kernel 1 of the XAttention estimate: strided antidiagonal scores on tensor cores and, per query stride group
// (a "row"), the log2-sum-exp over each causal key block and over the whole causal row. The rule is
// elastic_cuda/attention/xattn.py's block_mass; the selection is kernel 2 (xattn_select_kernel.cuh).
//
// The scores are a GEMM: row (h, m) of A is query group m of head h, its s tokens taken in reverse and
// concatenated ([s * D]); row g of B is key group g, its s tokens in order; A B^T is the antidiagonal sums.
// One CTA holds 128 rows (all the query heads of one KV head, consecutive query groups: GQA heads share every K
// tile load) and walks the key groups 0 .. (its last query group) in tiles of 128, streaming the s * D deep
// K dimension through a 3-stage cp.async pipeline in 64-wide slices. The gather (reversed query tokens, stride
// groups) happens in the global -> shared copy, so the tensor-core part is a plain mma.sync GEMM.
// Each of the 4 warps owns 32 whole rows x 128 key groups (128 fp32 accumulators per thread), so row statistics
// never cross warps. Softmax is online in base 2 (FlashAttention style): after each key tile the row's running
// max M and sum L are updated and each completed key block's sum of exp2(x - M) is stored as M + log2(sum).
//
// Cost (Llama-3.1-8B shape, Hq 32, Hkv 8, D 128, s 16, block 128, one 32K sequence): G = 2048 query groups,
// K depth s * D = 2048, causal pairs ~G^2 / 2 per head -> 32 * 2.1M * 2048 * 2 = 275 GFLOP (1/32 of dense
// attention's 8.8 TFLOP), plus ~6% for the diagonal tiles. Each 128 x 128 tile streams 1 MiB of A and B through
// L2 for 67 MFLOP (64 FLOP per byte); HBM sees q and k once (0.34 GB) and the workspace (34 MB) twice.
// At 128K: 4.4 TFLOP; workspace 537 MB, run in chunks of at most kWorkspaceCapBytes (xattn_cuda_api.cpp).
#pragma once
#include <climits>
#include <cmath>

#include "attention/attention_mma.cuh"
#include "attention/head_mode.h"
#include "xattn/xattn_params.h"

namespace elastic {
namespace xattn {

constexpr int kRows = 128;      // BM: query-group rows (heads x query groups) per CTA
constexpr int kCols = 128;      // BN: key groups per key tile
constexpr int kSlice = 64;      // BK: K elements per pipeline stage
constexpr int kStages = 3;
constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kScoreSmemBytes = kStages * (kRows + kCols) * kSlice * 2;  // 96 KiB (16-bit elements)

__device__ __forceinline__ int64_t tri(int64_t x) { return x * (x + 1) / 2; }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Token range of sequence b: start row in the (packed) tensor and length, clamped to p.seqlen. A packed
// sequence whose bounds are invalid (negative, decreasing, past the tensor) has length 0: on the device it
// cannot raise, and a zero-length sequence gets all-False mask rows (documented in xattn_cuda_api.cpp).
struct SeqSpan {
  int64_t start;
  int len;
};

__device__ __forceinline__ SeqSpan seq_span(const XattnParams& p, int b) {
  if (p.cu_seqlens == nullptr) return {0, p.seqlen};
  const int64_t lo = p.cu_seqlens[b], hi = p.cu_seqlens[b + 1];
  if (lo < 0 || hi < lo || hi > p.total_tokens) return {0, 0};
  const int64_t len = hi - lo;
  return {lo, static_cast<int>(len < p.seqlen ? len : p.seqlen)};
}

__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// Zero an accumulator array (fully unrolled: it stays in registers).
template <int A, int B, int C>
__device__ __forceinline__ void zero_fragments(float (&acc)[A][B][C]) {
#pragma unroll
  for (int a = 0; a < A; ++a)
#pragma unroll
    for (int b = 0; b < B; ++b)
#pragma unroll
      for (int c = 0; c < C; ++c) acc[a][b][c] = 0.f;
}

// log2-sum-exp of a block from its sum of exp2(x - m_use); an empty (all underflowed) block is -inf.
__device__ __forceinline__ float block_lse2(float m_use, float sum) {
  return sum > 0.f ? m_use + log2f(sum) : -INFINITY;
}

// One accumulator row slot of a finished key tile (columns col0 .. col0 + kCols - 1; this thread holds columns
// nb * 8 + 2 * t4 + c of the row, the other three lanes of its quad the rest, as in the mma.sync m16n8 C layout
// and the wgmma accumulator layout alike): causal mask, online softmax, block sums. `at(nb, c)` is the
// accumulator entry; m is the row's query group (-1: a row past the CTA's rows, every column masked, the row
// stays empty without NaN through m_use); hq its query head. Registers and global stores only, so the next
// tile's slices keep loading meanwhile. Each branch is uniform over the warp (per is a launch constant), so
// the quad shuffles inside are safe.
template <typename At>
__device__ __forceinline__ void tile_row_stats(const XattnParams& p, At&& at, int m, int b, int hq, int col0, int t4,
                                               float& run_max, float& run_sum) {
  constexpr int NB8 = kCols / 8;
  const int per = p.per;
  float mx = run_max;
#pragma unroll
  for (int nb = 0; nb < NB8; ++nb)
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      const int col = col0 + nb * 8 + 2 * t4 + c;
      const float x = col <= m ? at(nb, c) * p.scale_log2 : -INFINITY;
      at(nb, c) = x;
      mx = fmaxf(mx, x);
    }
  mx = quad_max(mx);
  const float m_use = mx == -INFINITY ? 0.f : mx;
  const float alpha = exp2f(run_max - m_use);  // 0 on the first tile (run_max -inf)
  run_max = mx;
  float tile_sum = 0.f;
#pragma unroll
  for (int nb = 0; nb < NB8; ++nb)
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      const float e = exp2f(at(nb, c) - m_use);
      at(nb, c) = e;
      tile_sum += e;
    }
  run_sum = run_sum * alpha + quad_sum(tile_sum);

  // Block sums. Blocks are `per` key groups and never straddle a key tile (per divides kCols).
  const int r = m >= 0 ? m / per : -1;  // causal blocks of the row: 0 .. r
  float* ws = p.ws_block + (int64_t(b) * p.heads_q + hq) * p.ws_head_stride +
              int64_t(per) * (tri(r) - tri(p.r0)) + int64_t(m - r * per) * (r + 1);  // row m's entries
  if (per >= 8) {
    const int chunks = per / 8;  // n8 blocks per key block
    float bsum = 0.f;
#pragma unroll
    for (int nb = 0; nb < NB8; ++nb) {
      bsum += quad_sum(at(nb, 0) + at(nb, 1));
      if (((nb + 1) & (chunks - 1)) == 0) {
        const int bi = nb / chunks;  // block within the tile
        const int cb = (col0 + nb * 8) / per;
        if ((bi & 3) == t4 && cb <= r) ws[cb] = block_lse2(m_use, bsum);
        bsum = 0.f;
      }
    }
  } else if (per == 4) {
#pragma unroll
    for (int nb = 0; nb < NB8; ++nb) {
      float v = at(nb, 0) + at(nb, 1);
      v += __shfl_xor_sync(0xffffffffu, v, 1);
      const int cb = (col0 + nb * 8 + 2 * t4) / 4;
      if ((t4 & 1) == 0 && cb <= r) ws[cb] = block_lse2(m_use, v);
    }
  } else if (per == 2) {
#pragma unroll
    for (int nb = 0; nb < NB8; ++nb) {
      const int cb = (col0 + nb * 8 + 2 * t4) / 2;
      if (cb <= r) ws[cb] = block_lse2(m_use, at(nb, 0) + at(nb, 1));
    }
  } else {  // per == 1
#pragma unroll
    for (int nb = 0; nb < NB8; ++nb)
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int cb = col0 + nb * 8 + 2 * t4 + c;
        if (cb <= r) ws[cb] = block_lse2(m_use, at(nb, c));
      }
  }
}

// The global -> shared copies of one pipeline step, for both score kernels (this one and the wgmma one,
// xattn_scores_sm90_kernel.cuh): token slice i and head dims [d0, d0 + kSlice) of the CTA's kRows A rows (query
// token a_tok0[it] - i at head offset a_hoff(it, r)) and of key tile key_tile's kCols B rows (key token
// (key_tile * kCols + r) * s + i), each into its stage buffer, rows swizzled (mma::swz) for ldmatrix / wgmma; tokens
// past the sequence (>= n) land as zeros. This thread copies 16-byte chunks 2 ld_c, 2 ld_c + 1 of rows
// ld_r + it * (kRows / kIters), it < kIters: 4 with the 128 threads here, 2 with the wgmma kernel's 256. a_hoff is
// the caller's (registers or recomputed). copy_slice is one step with one key tile; the wgmma kernel's wide
// instance calls copy_slice_b once per key tile of its step.
template <int kIters, typename T, typename HeadOffset>
__device__ __forceinline__ void copy_slice_a(T* a_dst, const T* q, int64_t q_stride_t, const int (&a_tok0)[kIters],
                                             HeadOffset a_hoff, int i, int d0, int n, int ld_r, int ld_c) {
  static_assert(kRows % kIters == 0, "whole row steps");
  constexpr int kRowStep = kRows / kIters;
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    const int r = ld_r + kRowStep * it;
    const int tok = a_tok0[it] - i;
    const bool ok = tok < n;
    const int hoff = a_hoff(it, r);
    const T* src = ok ? q + int64_t(tok) * q_stride_t + hoff + d0 + ld_c * 16 : q;
    mma::cp_async16(a_dst + mma::swz<kSlice>(r, ld_c * 16), src, ok);
    mma::cp_async16(a_dst + mma::swz<kSlice>(r, ld_c * 16 + 8), src + (ok ? 8 : 0), ok);
  }
}

template <int kIters, typename T>
__device__ __forceinline__ void copy_slice_b(T* b_dst, const T* k, int64_t k_stride_t, int i, int d0, int key_tile,
                                             int s, int n, int ld_r, int ld_c) {
  static_assert(kCols % kIters == 0, "whole row steps");
  constexpr int kRowStep = kCols / kIters;
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    const int r = ld_r + kRowStep * it;
    const int tok = (key_tile * kCols + r) * s + i;
    const bool ok = tok < n;
    const T* src = ok ? k + int64_t(tok) * k_stride_t + d0 + ld_c * 16 : k;
    mma::cp_async16(b_dst + mma::swz<kSlice>(r, ld_c * 16), src, ok);
    mma::cp_async16(b_dst + mma::swz<kSlice>(r, ld_c * 16 + 8), src + (ok ? 8 : 0), ok);
  }
}

template <int kIters, typename T, typename HeadOffset>
__device__ __forceinline__ void copy_slice(T* a_dst, T* b_dst, const T* q, const T* k, int64_t q_stride_t,
                                           int64_t k_stride_t, const int (&a_tok0)[kIters], HeadOffset a_hoff, int i,
                                           int d0, int key_tile, int s, int n, int ld_r, int ld_c) {
  static_assert(kRows == kCols, "one row step for A and B");
  copy_slice_a<kIters>(a_dst, q, q_stride_t, a_tok0, a_hoff, i, d0, n, ld_r, ld_c);
  copy_slice_b<kIters>(b_dst, k, k_stride_t, i, d0, key_tile, s, n, ld_r, ld_c);
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 2) xattn_scores_kernel(const XattnParams p) {
  static_assert(D % kSlice == 0, "a K slice never straddles two tokens");
  using Op = mma::MmaOp<T>;
  constexpr int NB8 = kCols / 8;  // n8 accumulator blocks per row

  const int b = blockIdx.x / p.heads_kv;
  const int kvh = blockIdx.x % p.heads_kv;
  if (p.head_mode[b * p.hm_stride_b + kvh * p.hm_stride_h] != kBlock) return;  // FULL/STREAM: no work
  const SeqSpan seq = seq_span(p, b);
  const int n = seq.len, s = p.stride, per = p.per, group = p.group;
  const int G = (n + s - 1) / s;  // real query groups (a group with at least one real token)
  const int mq0 = p.r0 * per;
  const int mq1 = min(p.r1 * per, G);
  const int rows = (mq1 - mq0) * group;
  const int row0 = (gridDim.y - 1 - blockIdx.y) * kRows;  // longest work items first
  if (rows <= 0 || row0 >= rows) return;
  const int row_end = min(row0 + kRows, rows);
  const int n_tiles = (mq0 + (row_end - 1) / group) / kCols + 1;  // key tiles up to the last query group

  const T* q = static_cast<const T*>(p.q) + b * p.q_stride_b + seq.start * p.q_stride_t +
               int64_t(kvh) * group * p.q_stride_h;
  const T* k = static_cast<const T*>(p.k) + b * p.k_stride_b + seq.start * p.k_stride_t + kvh * p.k_stride_h;

  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sA = reinterpret_cast<T*>(smem_raw);   // [kStages][kRows * kSlice], swizzled rows
  T* sB = sA + kStages * kRows * kSlice;    // [kStages][kCols * kSlice]

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g8 = lane / 4, t4 = lane % 4;

  // Copy duty: this thread moves the two 16-byte chunks 2 * ld_c, 2 * ld_c + 1 of tile rows ld_r + 32 * it
  // (it < 4), for A and for B (a warp copies 8 whole 128-byte rows per instruction pair).
  const int ld_c = tid % 4, ld_r = tid / 4;
  // A rows are fixed for the CTA: the token of slice i is a_tok0 - i (query tokens reversed in their group).
  // Rows past the CTA's rows get INT_MAX, so a_tok0 - i >= n and they load zeros.
  int a_tok0[4], a_hoff[4];
#pragma unroll
  for (int it = 0; it < 4; ++it) {
    const int rho = row0 + ld_r + 32 * it;
    if (rho < row_end) {
      const int m = mq0 + rho / group;
      a_tok0[it] = m * s + s - 1;
      a_hoff[it] = (rho % group) * static_cast<int>(p.q_stride_h);  // host checks Hq * stride_h < 2^31
    } else {
      a_tok0[it] = INT_MAX;
      a_hoff[it] = 0;
    }
  }

  const int NK = s * D / kSlice;  // pipeline steps per key tile
  const int total_steps = n_tiles * NK;
  int issue_kt = 0, issue_c = 0;
  auto issue = [&](int step) {
    if (step < total_steps) {
      const int stage = step % kStages;
      const int i = issue_c * kSlice / D, d0 = issue_c * kSlice % D;
      copy_slice<4>(sA + stage * kRows * kSlice, sB + stage * kCols * kSlice, q, k, p.q_stride_t, p.k_stride_t, a_tok0,
                    [&](int it, int) { return a_hoff[it]; }, i, d0, issue_kt, s, n, ld_r, ld_c);
      if (++issue_c == NK) {
        issue_c = 0;
        ++issue_kt;
      }
    }
    mma::cp_async_commit();  // an empty group keeps the wait counts uniform at the tail
  };

  // This thread's accumulator rows: (mt, hf) -> tile row warp * 32 + mt * 16 + hf * 8 + g8.
  const int warp_row0 = warp * 32;
  int row_m[4];  // query group of the row, -1 past the CTA's rows
  float run_max[4], run_sum[4];
#pragma unroll
  for (int ri = 0; ri < 4; ++ri) {
    const int rho = row0 + warp_row0 + (ri / 2) * 16 + (ri % 2) * 8 + g8;
    run_max[ri] = -INFINITY;
    run_sum[ri] = 0.f;
    row_m[ri] = rho < row_end ? mq0 + rho / group : -1;
  }
  // Last query group of the warp's rows: key columns past it are masked for every row of the warp, so their
  // n16 column pairs skip the tensor cores on the diagonal tiles.
  const int warp_last = row0 + warp_row0 < row_end ? mq0 + (min(row0 + warp_row0 + 31, row_end - 1)) / group : -1;

  float acc[2][NB8][4];
  zero_fragments(acc);

#pragma unroll
  for (int st = 0; st < kStages - 1; ++st) issue(st);

  int kt = 0, kc = 0;
  for (int step = 0; step < total_steps; ++step) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // slice `step` visible to all; every warp is done with the stage refilled next
    issue(step + kStages - 1);

    const int stage = step % kStages;
    const T* a_src = sA + stage * kRows * kSlice;
    const T* b_src = sB + stage * kCols * kSlice;
    // n16 column pairs of this key tile that hold a causal column for some row of the warp
    const int np_live = warp_last < kt * kCols ? 0 : min(NB8 / 2, (warp_last - kt * kCols) / 16 + 1);
#pragma unroll
    for (int kk = 0; kk < kSlice / 16; ++kk) {
      uint32_t a[2][4];
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
        mma::ldsm_x4(a[mt], mma::smem_addr(a_src + mma::swz<kSlice>(warp_row0 + mt * 16 + (lane & 15),
                                                                    kk * 16 + (lane >> 4) * 8)));
#pragma unroll
      for (int np = 0; np < NB8 / 2; ++np) {
        if (np < np_live) {
          uint32_t bk[4];
          mma::ldsm_x4(bk, mma::smem_addr(b_src + mma::swz<kSlice>(np * 16 + (lane & 7) + ((lane >> 4) << 3),
                                                                   kk * 16 + ((lane >> 3) & 1) * 8)));
#pragma unroll
          for (int mt = 0; mt < 2; ++mt) {
            Op::run(acc[mt][2 * np], a[mt], bk[0], bk[1]);
            Op::run(acc[mt][2 * np + 1], a[mt], bk[2], bk[3]);
          }
        }
      }
    }

    if (++kc < NK) continue;
    // ---- key tile kt complete: causal mask, online softmax, block sums (tile_row_stats).
#pragma unroll
    for (int ri = 0; ri < 4; ++ri) {
      const int mt = ri / 2, hf = ri % 2;
      const int hq = kvh * group + (row0 + warp_row0 + mt * 16 + hf * 8 + g8) % group;
      tile_row_stats(p, [&](int nb, int c) -> float& { return acc[mt][nb][hf * 2 + c]; }, row_m[ri], b, hq,
                     kt * kCols, t4, run_max[ri], run_sum[ri]);
    }
    zero_fragments(acc);
    kc = 0;
    ++kt;
  }
  mma::cp_async_wait_all();  // no copy may still target shared memory when the CTA exits

  // Row totals: log2-sum-exp over every causal key group of the row.
#pragma unroll
  for (int ri = 0; ri < 4; ++ri) {
    const int m = row_m[ri];
    if (m < 0 || t4 != 0) continue;
    const int rho = row0 + warp_row0 + (ri / 2) * 16 + (ri % 2) * 8 + g8;
    const int hq = kvh * group + rho % group;
    p.ws_row[(int64_t(b) * p.heads_q + hq) * int64_t(p.r1 - p.r0) * per + (m - mq0)] =
        block_lse2(run_max[ri], run_sum[ri]);
  }
}

}  // namespace xattn
}  // namespace elastic
