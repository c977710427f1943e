// The latency-light decode combine (ELASTIC_DECODE_COMBINE=v2, kernel_options.h; round 2 of issue #13).
//
// One CTA of kCombineV2Threads per (pair, query row) merges the partials of the pair's items, like round 1's
// decode_combine_kernel (decode_kernel.cuh), with the same result up to fp32 summation order. Why: at batch 1 the
// combine is on the critical path of every call and a pair has many items (32K B1 with 6/8 heads STREAM: ~100 items
// per FULL pair). Round 1's combine reads the items' lse one after another in each thread (a chain of ~100 L2 round
// trips) and then the partials 4 at a time; that call (40 MB of K/V, 8 us at HBM peak) took 41 us. Here:
//  - the items' lse are loaded by all threads at once (one item per thread) and reduced by a block max and sum;
//    the weights go to shared memory;
//  - the partial outputs are read as float4: D / 4 threads cover one item's row, so kCombineV2Threads / (D / 4)
//    items (4 at D 128, 8 at D 64) are read side by side, each thread with kUnroll loads in flight; the item groups'
//    sums meet in shared memory at the end;
//  - items come in rounds of kCombineV2Threads (more per pair only with forced splits), merged as an online softmax.
// Measured on the H200 with round 2's split kernel and PDL (results/decode/2026-12-02_h200_round2/), bf16 Llama-3.1-8B
// shape, 6/8 heads STREAM, batch 1: 32K 0.0414 -> 0.0266 ms, 128K 0.0681 -> 0.0610 ms against round 1 (PDL alone
// was worth <= 1% there: the rest is this kernel).
// Partials are read through L2 (ld.global.cg): the split grid wrote them (and wait_for_prior_grid waited for it
// under PDL).
#pragma once
#include "decode/decode_kernel.cuh"
#include "decode/decode_pdl.cuh"

namespace elastic {
namespace decode {

constexpr int kCombineV2Threads = 128;

template <typename T, int D, int kRows>
__global__ void __launch_bounds__(kCombineV2Threads) decode_combine_v2_kernel(const DecodeParams p) {
  constexpr int kVecs = D / 4;                        // threads per item row (float4 each)
  constexpr int kGroups = kCombineV2Threads / kVecs;  // items read side by side
  constexpr int kWarpsC = kCombineV2Threads / 32;
  constexpr int kUnroll = 8;
  static_assert(kCombineV2Threads % kVecs == 0, "whole item rows per CTA");
  __shared__ float s_w[kCombineV2Threads];
  __shared__ float s_max[kWarpsC], s_sum[kWarpsC];
  __shared__ int s_bad[kWarpsC];
  __shared__ float4 s_acc[kGroups][kVecs];
  wait_for_prior_grid();  // the plan and the partials are the split grid's writes
  const int pair = blockIdx.x, row = blockIdx.y, tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int count = p.plan[2 * pair + 1];
  if (count <= 1) return;  // a pair of one item: the split kernel wrote its output
  const int first = p.plan[2 * pair];
  const int b = pair / p.hkv, h = pair % p.hkv;
  const int rchunk = row / kRows, r = row % kRows;
  const int vec = tid % kVecs, grp = tid / kVecs;
  const int64_t base = static_cast<int64_t>(rchunk) * p.items_max * kRows + r;  // + item * kRows
  constexpr int64_t kStep = static_cast<int64_t>(kRows) * D;                   // floats between items
  float M = -INFINITY, L = 0.f;
  float4 o = make_float4(0.f, 0.f, 0.f, 0.f);
  bool bad = false;
  for (int s0 = 0; s0 < count; s0 += kCombineV2Threads) {
    const int n = min(kCombineV2Threads, count - s0);
    const float x = tid < n ? __ldcg(p.part_lse + base + static_cast<int64_t>(first + s0 + tid) * kRows) : -INFINITY;
    // Round max (fmaxf skips NaN) and whether any lse is NaN (a marked item makes the row NaN).
    float mx = x;
    int nan_here = isnan(x) ? 1 : 0;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
      nan_here |= __shfl_xor_sync(0xffffffffu, nan_here, off);
    }
    __syncthreads();  // the previous round's reads of the shared arrays are done
    if (lane == 0) {
      s_max[warp] = mx;
      s_bad[warp] = nan_here;
    }
    __syncthreads();
    float round_max = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarpsC; ++w) {
      round_max = fmaxf(round_max, s_max[w]);
      bad |= s_bad[w] != 0;
    }
    const float m_new = fmaxf(M, round_max);
    // An item with no visible key for this row has lse -inf: weight 0 (times its zero output).
    const float w_mine = x != -INFINITY && m_new != -INFINITY && !isnan(x) ? exp2f(x - m_new) : 0.f;
    s_w[tid] = w_mine;
    const float wsum = warp_sum(w_mine);
    if (lane == 0) s_sum[warp] = wsum;
    __syncthreads();
    float round_sum = 0.f;
#pragma unroll
    for (int w = 0; w < kWarpsC; ++w) round_sum += s_sum[w];
    const float corr = M == -INFINITY ? 0.f : exp2f(M - m_new);
    L = L * corr + round_sum;
    o.x *= corr;
    o.y *= corr;
    o.z *= corr;
    o.w *= corr;
    M = m_new;
    // This thread's items of the round: grp, grp + kGroups, ...; kUnroll float4 loads issued before they are used.
    const float4* po =
        reinterpret_cast<const float4*>(p.part_out + (base + static_cast<int64_t>(first + s0) * kRows) * D) + vec;
    int s = grp;
    for (; s + (kUnroll - 1) * kGroups < n; s += kUnroll * kGroups) {
      float4 v[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) v[u] = __ldcg(po + (s + u * kGroups) * (kStep / 4));
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const float w = s_w[s + u * kGroups];
        o.x = fmaf(w, v[u].x, o.x);
        o.y = fmaf(w, v[u].y, o.y);
        o.z = fmaf(w, v[u].z, o.z);
        o.w = fmaf(w, v[u].w, o.w);
      }
    }
    for (; s < n; s += kGroups) {
      const float4 v = __ldcg(po + s * (kStep / 4));
      const float w = s_w[s];
      o.x = fmaf(w, v.x, o.x);
      o.y = fmaf(w, v.y, o.y);
      o.z = fmaf(w, v.z, o.z);
      o.w = fmaf(w, v.w, o.w);
    }
  }
  // The item groups' sums (each over its items, all with the final M) meet in shared memory.
  s_acc[grp][vec] = o;
  __syncthreads();
  if (grp != 0) return;
#pragma unroll
  for (int g2 = 1; g2 < kGroups; ++g2) {
    const float4 y = s_acc[g2][vec];
    o.x += y.x;
    o.y += y.y;
    o.z += y.z;
    o.w += y.w;
  }
  write_merged4<T, D>(p, b, h, row, vec, o, L, M, bad);
}

}  // namespace decode
}  // namespace elastic
