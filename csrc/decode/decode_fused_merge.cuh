// The decode combine fused into the tensor-core split kernel, merged by all threads of the pair's last CTA
// (ELASTIC_DECODE_FUSED_COMBINE=v2, kernel_options.h; p.fused_combine == 2, instance kMerge of decode_mma_kernel).
//
// Why a second try: at batch 1 the call is a few tens of microseconds and the combine launch (the gap between two
// kernels, then plan -> lse -> partials, three dependent L2 trips) is a fixed share of it. The first fused combine
// (ELASTIC_DECODE_FUSED_COMBINE=1, combine_in_last_cta in decode_kernel.cuh) removed the launch but lost in every
// case on the H200 (32K B1 FULL 0.0536 -> 0.0635 ms, 6/8 STREAM 0.0416 -> 0.0772: the more items per pair, the
// worse), because its merge was round 1's combine_element run by 128 threads over rows x D = 512 elements: 4
// elements per thread one after another, each two loops over the pair's items (33 items per FULL pair at 32K B1
// FULL, ~100 at 6/8 STREAM), i.e. hundreds of dependent L2 round trips on the critical path of the call's last CTA,
// where the separate combine spread the same work over rows CTAs of 128 threads. Here the merge is the v2 combine's
// (decode_combine_v2.cuh) shape, every row of the pair in one CTA:
//  - the lse of (item, row) are contiguous in part_lse: one coalesced load per thread covers 128 of them (32 items
//    at 4 rows); per row a warp takes the max (NaN flag) and the weights exp2(lse - max) go back to shared memory;
//  - each thread owns (row, 4 output columns) of the pair (4 rows x 32 float4 = 128 = the CTA at D 128; 2 item groups
//    side by side at D 64, 2 columns per thread at 8 rows D 128) and reads its float4 of every item with kUnroll (16)
//    loads in flight, so 32 items (32K B1 FULL) are 2 L2 round trips and 103 items (6/8 STREAM) 7;
//  - items come in rounds of kMergeRound, merged as an online softmax (forced splits give a pair thousands).
// Ticket: after the CTA's partial stores a barrier, then one thread's atom.add.acq_rel.gpu (the release covers the
// whole CTA's stores through the barrier, as CUTLASS's semaphore / generic barrier release; the acquire orders the
// last CTA's reads after every other CTA's release), instead of the first version's __threadfence in every thread.
// The ticket array is zeroed per call by a memset (decode_api.cpp; a graph node under capture); the last CTA puts its
// ticket back to 0. Partials are read with ld.global.cg (L2): other CTAs wrote them.
// Result: the v2 combine's up to fp32 summation order (item groups, rows merged per round).
#pragma once
#include "decode/decode_kernel.cuh"

namespace elastic {
namespace decode {

constexpr int kMergeRound = 256;  // items per round of the merge: rows x 256 weights in shared memory (<= 8 KB)

// Shared-memory bytes the merge needs beyond nothing else (it reuses the split kernel's pipeline memory).
template <int D, int kRows>
struct MergeShape {
  static constexpr int kVecs = D / 4;                                  // float4 columns of one row
  static constexpr int kCols = kRows * kVecs;                          // (row, float4) columns of the pair
  static constexpr int kColsPerThread = kCols > kThreads ? kCols / kThreads : 1;
  static constexpr int kGroups = kCols >= kThreads ? 1 : kThreads / kCols;  // item groups read side by side
  // float4 partial loads in flight per thread: 16 (64 registers, free after the main loop; the instance has 176 in
  // all at bf16 D 128 4 rows), so a FULL pair of 32 items (32K B1 FULL) is 2 L2 round trips and of 103 items (32K B1
  // 6/8 STREAM) 7; 8 per column at 2 columns per thread.
  static constexpr int kUnroll = 16 / kColsPerThread;
  static constexpr int kWeightBytes = kRows * kMergeRound * 4;
  static constexpr int kRowStatBytes = 4 * kRows * 4;                  // max, correction, sum, NaN flag per row
  static constexpr int kAccOffset = kWeightBytes + kRowStatBytes;      // 16-byte aligned (kRows is 4 or 8)
  static constexpr int kBytes = kAccOffset + kGroups * kCols * 16;
  static_assert(kCols % kThreads == 0 || kThreads % kCols == 0, "columns tile the CTA");
};

// Called by every CTA of a pair of more than one item after write_rows stored its partials (row chunk 0: the
// tensor-core kernel has one). smem: the split kernel's pipeline memory, free after write_rows.
template <typename T, int D, int kRows>
__device__ __forceinline__ void merge_in_last_cta(const DecodeParams& p, const Item& it, char* smem) {
  using M = MergeShape<D, kRows>;
  static_assert(M::kBytes <= 64 * 1024, "merge buffers fit in the pipeline's memory");
  __shared__ int s_last;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  __syncthreads();  // every thread's partial stores precede (in CTA order) thread 0's release below
  if (tid == 0) {
    int done;
    asm volatile("atom.add.acq_rel.gpu.global.s32 %0, [%1], 1;\n" : "=r"(done) : "l"(p.ticket + it.pair) : "memory");
    done += 1;
    s_last = done == it.count;
    if (done == it.count) p.ticket[it.pair] = 0;  // every CTA of the pair has taken its ticket
  }
  __syncthreads();  // thread 0's acquire precedes every thread's partial reads below
  if (!s_last) return;

  float* s_w = reinterpret_cast<float*>(smem);      // [kMergeRound][kRows]: lse, then weights
  float* s_m = s_w + kRows * kMergeRound;           // [kRows] running max (log2)
  float* s_corr = s_m + kRows;                      // [kRows] this round's rescale of the running sums
  float* s_l = s_corr + kRows;                      // [kRows] running sum of weights
  int* s_bad = reinterpret_cast<int*>(s_l + kRows);  // [kRows] a NaN lse seen
  float4* s_acc = reinterpret_cast<float4*>(smem + M::kAccOffset);  // [kGroups][kCols]
  if (tid < kRows) {
    s_m[tid] = -INFINITY;
    s_l[tid] = 0.f;
    s_bad[tid] = 0;
  }
  const int rows = p.rows;  // <= kRows
  const int grp = M::kGroups > 1 ? tid / M::kCols : 0;
  float4 acc[M::kColsPerThread];
#pragma unroll
  for (int j = 0; j < M::kColsPerThread; ++j) acc[j] = make_float4(0.f, 0.f, 0.f, 0.f);
  const int64_t first = it.first;
  constexpr int kItemVecs = kRows * D / 4;  // float4 between one item's partials and the next's

  for (int s0 = 0; s0 < it.count; s0 += kMergeRound) {
    const int n = min(kMergeRound, it.count - s0);
    __syncthreads();  // the previous round's weights are read (and the row stats initialised)
    // (item, row) lse of the round: contiguous in part_lse, item-major.
    const float* lse_src = p.part_lse + (first + s0) * kRows;
    // All loads of the round issued before the first store (one L2 round trip, not one per 128 values).
    constexpr int kLseLoads = kMergeRound * kRows / kThreads;  // 8 at 4 rows, 16 at 8
    float x[kLseLoads];
#pragma unroll
    for (int u = 0; u < kLseLoads; ++u) {
      const int idx = tid + u * kThreads;
      x[u] = idx < n * kRows && idx % kRows < rows ? __ldcg(lse_src + idx) : -INFINITY;
    }
#pragma unroll
    for (int u = 0; u < kLseLoads; ++u) s_w[tid + u * kThreads] = x[u];
    __syncthreads();
    for (int r = warp; r < rows; r += kWarps) {
      float mx = -INFINITY;
      int nan_here = 0;
      for (int i = lane; i < n; i += 32) {
        const float x = s_w[i * kRows + r];
        nan_here |= isnan(x) ? 1 : 0;
        mx = fmaxf(mx, x);  // fmaxf skips NaN
      }
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) {
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
        nan_here |= __shfl_xor_sync(0xffffffffu, nan_here, off);
      }
      const float m_old = s_m[r];
      const float m_new = fmaxf(m_old, mx);
      float sum = 0.f;
      for (int i = lane; i < n; i += 32) {
        const float x = s_w[i * kRows + r];
        // An item with no visible key for this row has lse -inf: weight 0 (times its zero output).
        const float w = x != -INFINITY && m_new != -INFINITY && !isnan(x) ? exp2f(x - m_new) : 0.f;
        s_w[i * kRows + r] = w;
        sum += w;
      }
      sum = warp_sum(sum);
      if (lane == 0) {
        const float corr = m_old == -INFINITY ? 0.f : exp2f(m_old - m_new);
        s_corr[r] = corr;
        s_l[r] = s_l[r] * corr + sum;
        s_m[r] = m_new;
        s_bad[r] |= nan_here;
      }
    }
    __syncthreads();
#pragma unroll
    for (int j = 0; j < M::kColsPerThread; ++j) {
      const int col = M::kGroups > 1 ? tid % M::kCols : tid + j * kThreads;
      const int row = col / M::kVecs, vec = col % M::kVecs;
      if (row >= rows) continue;
      const float corr = s_corr[row];
      acc[j].x *= corr;
      acc[j].y *= corr;
      acc[j].z *= corr;
      acc[j].w *= corr;
      const float4* po = reinterpret_cast<const float4*>(p.part_out + ((first + s0) * kRows + row) * D) + vec;
      // Rounds of kUnroll loads, the last one predicated (not a serial tail: 103 items are 7 trips, not 6 + 7).
      for (int i = grp; i < n; i += M::kUnroll * M::kGroups) {
        float4 v[M::kUnroll];
#pragma unroll
        for (int u = 0; u < M::kUnroll; ++u) {
          const int item = i + u * M::kGroups;
          v[u] = item < n ? __ldcg(po + static_cast<int64_t>(item) * kItemVecs) : make_float4(0.f, 0.f, 0.f, 0.f);
        }
#pragma unroll
        for (int u = 0; u < M::kUnroll; ++u) {
          const int item = i + u * M::kGroups;
          const float w = item < n ? s_w[item * kRows + row] : 0.f;
          acc[j].x = fmaf(w, v[u].x, acc[j].x);
          acc[j].y = fmaf(w, v[u].y, acc[j].y);
          acc[j].z = fmaf(w, v[u].z, acc[j].z);
          acc[j].w = fmaf(w, v[u].w, acc[j].w);
        }
      }
    }
  }
  // The item groups' sums (each over its items, all with the final max) meet in shared memory.
  if constexpr (M::kGroups > 1) {
    s_acc[tid] = acc[0];  // [grp][col] with tid = grp * kCols + col
    __syncthreads();
    if (grp != 0) return;
#pragma unroll
    for (int g2 = 1; g2 < M::kGroups; ++g2) {
      const float4 y = s_acc[g2 * M::kCols + tid];
      acc[0].x += y.x;
      acc[0].y += y.y;
      acc[0].z += y.z;
      acc[0].w += y.w;
    }
  }
  const int b = it.pair / p.hkv, h = it.pair % p.hkv;
#pragma unroll
  for (int j = 0; j < M::kColsPerThread; ++j) {
    const int col = M::kGroups > 1 ? tid % M::kCols : tid + j * kThreads;
    const int row = col / M::kVecs, vec = col % M::kVecs;
    if (row >= rows) continue;
    write_merged4<T, D>(p, b, h, row, vec, acc[j], s_l[row], s_m[row], s_bad[row] != 0);
  }
}

}  // namespace decode
}  // namespace elastic
