// Kernel 2 of the XAttention estimate: per (sample, query head, query block r) one CTA turns the workspace of
// kernel 1 into the block masses of row r and applies xattn.py's select_blocks rule, writing the mask row:
//   mass[c] = sum over the real query groups m of block r of exp2(ws_block[m, c] - ws_row[m])   (fp32, c <= r)
//   keep blocks 0 and r; the other causal blocks in descending mass (equal masses keep index order) while the
//   mass accumulated before the block (forced blocks first, fp64) is < threshold x the row total (fp64);
//   threshold >= 1 keeps every causal block.
// The order comes from a bitonic sort of 64-bit keys (mass bits, then ~index) in shared memory: masses are
// >= 0, so their IEEE bits order like the values, and the complemented index makes equal masses sort by index.
// Rows of heads that are not BLOCK, and rows past a sequence's end, are written all False. A row whose masses are not
// all finite (an inf / NaN of q or k reached it; then the fp64 total is not finite) keeps every causal block, as
// select_blocks does.
#pragma once
#include <cmath>
#include <cstdint>

#include "attention/head_mode.h"
#include "xattn/xattn_scores_kernel.cuh"

namespace elastic {
namespace xattn {

constexpr int kSelectThreads = 128;

// Bytes of dynamic shared memory of kernel 2 for rows of at most `max_len` blocks and NB mask columns.
inline int64_t select_smem_bytes(int64_t max_len, int64_t num_blocks) {
  int64_t pow2 = 1;
  while (pow2 < max_len) pow2 <<= 1;
  return pow2 * 8 + ((num_blocks + 15) / 16) * 16 + 128 * 4;  // sort keys, keep flags, row LSEs (per <= 128)
}

// Exclusive prefix sum over the CTA of one double per thread (threads in order); also returns the CTA total.
__device__ __forceinline__ double block_exclusive_scan(double v, double* warp_sums, double& total) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  double incl = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const double u = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += u;
  }
  double excl = __shfl_up_sync(0xffffffffu, incl, 1);
  if (lane == 0) excl = 0.0;
  if (lane == 31) warp_sums[warp] = incl;
  __syncthreads();
  double before = 0.0;
  total = 0.0;
  for (int w = 0; w < kSelectThreads / 32; ++w) {
    if (w < warp) before += warp_sums[w];
    total += warp_sums[w];
  }
  return before + excl;
}

__global__ void __launch_bounds__(kSelectThreads) xattn_select_kernel(const XattnParams p) {
  const int r = p.r0 + blockIdx.x;
  const int hq = blockIdx.y;
  const int b = blockIdx.z;
  const int NB = p.num_blocks;
  bool* out = p.mask + ((int64_t(b) * p.heads_q + hq) * NB + r) * NB;
  const int kvh = hq / p.group;
  const SeqSpan seq = seq_span(p, b);
  const int n = seq.len;
  const int nb_seq = (n + p.block_size - 1) / p.block_size;
  if (p.head_mode[b * p.hm_stride_b + kvh * p.hm_stride_h] != kBlock || r >= nb_seq) {
    for (int c = threadIdx.x; c < NB; c += kSelectThreads) out[c] = false;
    return;
  }

  extern __shared__ __align__(16) unsigned char select_smem[];
  const int len = r + 1;  // causal blocks of the row
  int P = 1;
  while (P < len) P <<= 1;
  unsigned long long* keys = reinterpret_cast<unsigned long long*>(select_smem);
  unsigned char* keep = reinterpret_cast<unsigned char*>(keys + P);
  float* row_lse = reinterpret_cast<float*>(keep + ((NB + 15) / 16) * 16);
  __shared__ double warp_sums[kSelectThreads / 32];
  __shared__ double forced_mass[2];  // masses of block 0 and of block r

  if (p.threshold >= 1.0) {  // every causal block, as select_blocks' threshold >= 1 branch (no workspace)
    for (int c = threadIdx.x; c < NB; c += kSelectThreads) out[c] = c < len;
    return;
  }
  const int per = p.per;
  const int G = (n + p.stride - 1) / p.stride;
  const int rows = min(per, G - r * per);  // real query groups of block r (>= 1 since r < nb_seq)
  const int64_t head_ws = (int64_t(b) * p.heads_q + hq) * p.ws_head_stride + int64_t(per) * (tri(r) - tri(p.r0));
  const float* ws_row = p.ws_row + (int64_t(b) * p.heads_q + hq) * int64_t(p.r1 - p.r0) * per + (r - p.r0) * per;
  for (int j = threadIdx.x; j < rows; j += kSelectThreads) row_lse[j] = ws_row[j];
  for (int c = threadIdx.x; c < NB; c += kSelectThreads) keep[c] = 0;
  if (threadIdx.x == 0) forced_mass[1] = 0.0;
  __syncthreads();

  for (int c = threadIdx.x; c < P; c += kSelectThreads) {
    unsigned long long key = 0ull;  // forced blocks and padding sort last
    if (c < len) {
      float mass = 0.f;
      for (int j = 0; j < rows; ++j) mass += exp2f(p.ws_block[head_ws + int64_t(j) * len + c] - row_lse[j]);
      if (c == 0) {
        forced_mass[0] = mass;
      } else if (c == r) {
        forced_mass[1] = mass;
      } else {
        key = (static_cast<unsigned long long>(__float_as_uint(mass)) << 32) | (0xffffffffu - static_cast<unsigned>(c));
      }
    }
    keys[c] = key;
  }
  __syncthreads();

  // Bitonic sort, descending.
  for (int kk = 2; kk <= P; kk <<= 1) {
    for (int jj = kk >> 1; jj > 0; jj >>= 1) {
      for (int i = threadIdx.x; i < P; i += kSelectThreads) {
        const int ixj = i ^ jj;
        if (ixj > i) {
          const unsigned long long a = keys[i], c = keys[ixj];
          if (((i & kk) == 0) ? (a < c) : (a > c)) {
            keys[i] = c;
            keys[ixj] = a;
          }
        }
      }
      __syncthreads();
    }
  }

  // Running sum in sorted order: thread t owns the contiguous sorted positions [lo, hi).
  const int n_free = len - (r > 0 ? 2 : 1);
  const int seg = (n_free + kSelectThreads - 1) / kSelectThreads;
  const int lo = min(n_free, int(threadIdx.x) * seg), hi = min(n_free, lo + seg);
  double part = 0.0;
  for (int i = lo; i < hi; ++i) part += double(__uint_as_float(static_cast<unsigned>(keys[i] >> 32)));
  double free_total;
  double before = block_exclusive_scan(part, warp_sums, free_total);
  const double forced = double(forced_mass[0]) + double(forced_mass[1]);
  const double limit = p.threshold * (forced + free_total);
  const bool unknown = !isfinite(forced + free_total);  // the same value in every thread
  before += forced;
  for (int i = lo; i < hi; ++i) {
    const unsigned long long key = keys[i];
    const double mass = double(__uint_as_float(static_cast<unsigned>(key >> 32)));
    if (unknown || before < limit) keep[0xffffffffu - static_cast<unsigned>(key & 0xffffffffull)] = 1;
    before += mass;
  }
  if (threadIdx.x == 0) {
    keep[0] = 1;
    keep[r] = 1;
  }
  __syncthreads();
  for (int c = threadIdx.x; c < NB; c += kSelectThreads) out[c] = keep[c];
}

}  // namespace xattn
}  // namespace elastic
