// Kernel 1 of the XAttention estimate on Hopper (sm_90a): the same work as xattn_scores_kernel.cuh (one CTA per
// 128 query-group rows of one KV head, key tiles of 128 key groups, the s * D deep K dimension streamed in
// 64-wide slices through a 3-stage cp.async ring, the same online softmax and block partials through
// tile_row_stats), with the GEMM on wgmma instead of mma.sync + ldmatrix.
//
// Why: the mma.sync kernel runs at ~190 TFLOP/s on the H200 (32K Llama shape: 275 GFLOP in 1.43 ms); every warp
// re-reads the whole B slice through ldmatrix and issues 32 mma.sync per k16 step. Here two warpgroups of 64 rows
// each issue one m64n128k16 wgmma per k16 step straight from shared memory (no ldmatrix, no fragment registers),
// half the accumulator registers per thread (64), so two CTAs (512 threads) share an SM and one CTA's
// barrier / softmax hides under the other's MMAs.
//
// Shared layout: each stage is A [128 rows][64] then B [128 rows][64], 16-bit, every row 128 bytes with its
// 16-byte chunks XOR-ed by (row % 8) (mma::swz<64>): exactly the K-major 128-byte-swizzle canonical layout that a
// wgmma descriptor with SBO = 1024 (8-row atoms) reads, given 1024-byte aligned stage bases. The A operand is a
// gather (query tokens reversed within each stride group), which TMA cannot express, so all 256 threads copy
// with cp.async as before; a k16 step is a 32-byte start offset inside the swizzled row (as in the forward's
// Q K^T, sm90/attention_fwd_sm90_kernel.cuh issue_qk).
//
// Per pipeline step: wait for this thread's copies of the slice, fence them into the async proxy, barrier (every
// thread's copies visible; every warpgroup's MMAs of the previous step finished, so its stage can be refilled),
// issue 4 wgmma, then the copies 2 slices ahead while they run, and wait for them. The wait-per-step leaves the
// tensor core idle for the barrier; the second CTA on the SM fills that gap.
// Causal skip: only a warpgroup with no live key column in the tile skips its MMAs. A half-tile m64n64 for
// warpgroups with <= 64 live columns (as the mma.sync kernel skips per n16 pair) made ptxas serialize every
// wgmma of the kernel (C7515: the branch puts non-wgmma definitions of the accumulators inside the pipeline
// stage), so diagonal tiles run whole: ~6% more MMA work at 32K, ~20% at 8K, ~1.5% at 128K (Llama shape).
//
// Wide instance (kKeyTiles = 2, the default; ELASTIC_XATTN_SM90_WIDE=0 runs kKeyTiles = 1): each step multiplies the A
// slice by two key tiles' B slices (two m64n128k16 per k16 step into two accumulator sets), so A, the operand no other
// CTA shares, is streamed once per two key tiles instead of once per key tile; 4 stages of 48 KiB, copies 3 slices
// ahead, one CTA per SM (128 accumulator registers per thread). Why: A is 512 KiB per CTA per key tile (128 rows x
// s * D) and the ~264 CTAs in flight stream ~130 MB of it between two reads of the same slice, more than the 50 MB L2,
// so A comes from HBM every key tile (32K, 6 of 8 heads BLOCK: 1.7 GB in a 0.87 ms kernel), while B (one KV head's
// keys, 8 MiB at 32K) is shared by the CTAs of its head and stays in L2. Key tile order, accumulation order and
// tile_row_stats calls are those of kKeyTiles = 1, so both instances give the same bits. H200: 1.12-1.17x over
// kKeyTiles = 1 at 8K-128K (kernel_options.h), i.e. still ~250-270 TFLOP/s: the wider step halves A's bytes but not its
// latency.
//
// Accumulator layout (wgmma.cuh): d[4 nb + 2 hf + c] is row 16 w + 8 hf + g, column 8 nb + 2 t + c of the
// warpgroup's 64 x 128 tile (warp w, lane 4 g + t): the m16n8 layout of the mma.sync kernel, so the quad
// reductions of tile_row_stats hold as they are; each thread owns 2 row slots (hf) instead of 4.
#pragma once
#include "attention/sm90/sm90a_available.h"
#include "attention/sm90/tma.cuh"
#include "attention/sm90/wgmma.cuh"
#include "xattn/xattn_scores_kernel.cuh"

namespace elastic {
namespace xattn {

constexpr int kSm90Warpgroups = 2;
constexpr int kSm90Threads = kSm90Warpgroups * 128;

// Pipeline shape of the wgmma kernel per instance: key tiles per step, ring stages, CTAs per SM, shared memory
// (stages x (A + kKeyTiles B) x 16 KiB, plus 1 KiB to align the stage bases to the 1024-byte swizzle atom).
template <int kKeyTiles>
struct Sm90ScoresShape {
  static_assert(kKeyTiles == 1 || kKeyTiles == 2, "narrow or wide instance");
  static constexpr int kRingStages = kKeyTiles == 1 ? xattn::kStages : 4;
  static constexpr int kCtasPerSm = kKeyTiles == 1 ? 2 : 1;
  static constexpr int kSmemBytes = kRingStages * (kRows + kKeyTiles * kCols) * kSlice * 2 + 1024;
};

template <typename T, int D, int kKeyTiles>
__global__ void __launch_bounds__(kSm90Threads, Sm90ScoresShape<kKeyTiles>::kCtasPerSm)
    xattn_scores_sm90_kernel(const XattnParams p) {
#if defined(ELASTIC_SM90A_ENABLED)
  static_assert(D % kSlice == 0, "a K slice never straddles two tokens");
  static_assert(kRows == kSm90Warpgroups * 64 && kCols == 128 && kSlice == 64, "tile shape of the wgmma path");
  using sm90::SmemDesc;
  constexpr int NB8 = kCols / 8;
  constexpr int kRing = Sm90ScoresShape<kKeyTiles>::kRingStages;

  const int b = blockIdx.x / p.heads_kv;
  const int kvh = blockIdx.x % p.heads_kv;
  if (p.head_mode[b * p.hm_stride_b + kvh * p.hm_stride_h] != kBlock) return;  // FULL/STREAM: no work
  const SeqSpan seq = seq_span(p, b);
  const int n = seq.len, s = p.stride, per = p.per, group = p.group;
  const int G = (n + s - 1) / s;
  const int mq0 = p.r0 * per;
  const int mq1 = min(p.r1 * per, G);
  const int rows = (mq1 - mq0) * group;
  const int row0 = (gridDim.y - 1 - blockIdx.y) * kRows;  // longest work items first
  if (rows <= 0 || row0 >= rows) return;
  const int row_end = min(row0 + kRows, rows);
  const int n_tiles = (mq0 + (row_end - 1) / group) / kCols + 1;
  const int n_steps_kt = (n_tiles + kKeyTiles - 1) / kKeyTiles;  // steps over the key tiles, kKeyTiles at a time

  const T* q = static_cast<const T*>(p.q) + b * p.q_stride_b + seq.start * p.q_stride_t +
               int64_t(kvh) * group * p.q_stride_h;
  const T* k = static_cast<const T*>(p.k) + b * p.k_stride_b + seq.start * p.k_stride_t + kvh * p.k_stride_h;

  extern __shared__ __align__(128) unsigned char smem_raw[];
  const uint32_t raw_addr = mma::smem_addr(smem_raw);
  T* sA = reinterpret_cast<T*>(smem_raw + ((1024u - (raw_addr & 1023u)) & 1023u));  // [kRing][kRows * kSlice]
  T* sB = sA + kRing * kRows * kSlice;  // [kRing][kKeyTiles][kCols * kSlice]

  const int tid = threadIdx.x, wg = tid / 128, warp = (tid % 128) / 32, lane = tid % 32;
  const int g8 = lane / 4, t4 = lane % 4;

  // Copy duty: 16-byte chunks 2 * ld_c, 2 * ld_c + 1 of tile rows ld_r + 64 * it (it < 2), for A and for B.
  const int ld_c = tid % 4, ld_r = tid / 4;
  // A rows: the token of slice i is a_tok0 - i (INT_MAX past the CTA's rows: zeros) at head offset a_hoff.
  int a_tok0[2], a_hoff[2];
#pragma unroll
  for (int it = 0; it < 2; ++it) {
    const int rho = row0 + ld_r + 64 * it;
    a_tok0[it] = rho < row_end ? (mq0 + rho / group) * s + s - 1 : INT_MAX;
    a_hoff[it] = (rho % group) * static_cast<int>(p.q_stride_h);  // (host: Hq * stride_h < 2^31)
  }

  const int NK = s * D / kSlice;
  const int total_steps = n_steps_kt * NK;
  int issue_kt = 0, issue_c = 0;
  auto issue = [&](int step) {
    if (step < total_steps) {
      const int stage = step % kRing;
      const int i = issue_c * kSlice / D, d0 = issue_c * kSlice % D;
      copy_slice_a<2>(sA + stage * kRows * kSlice, q, p.q_stride_t, a_tok0, [&](int it, int) { return a_hoff[it]; },
                      i, d0, n, ld_r, ld_c);
#pragma unroll
      for (int j = 0; j < kKeyTiles; ++j) {
        const int key_tile = issue_kt * kKeyTiles + j;
        if (kKeyTiles == 1 || key_tile < n_tiles)  // (a wide step's second tile past the rows: never multiplied)
          copy_slice_b<2>(sB + (stage * kKeyTiles + j) * kCols * kSlice, k, p.k_stride_t, i, d0, key_tile, s, n, ld_r,
                          ld_c);
      }
      if (++issue_c == NK) {
        issue_c = 0;
        ++issue_kt;
      }
    }
    mma::cp_async_commit();  // an empty group keeps the wait counts uniform at the tail
  };

  // This thread's row slots hf: tile row wg * 64 + warp * 16 + hf * 8 + g8.
  const int wg_row0 = wg * 64;
  // Query group of the row, -1 past the CTA's rows (recomputed per tile: registers are the limit at 2 CTAs / SM).
  auto row_m = [&](int hf) {
    const int rho = row0 + wg_row0 + warp * 16 + hf * 8 + g8;
    return rho < row_end ? mq0 + rho / group : -1;
  };
  float run_max[2] = {-INFINITY, -INFINITY}, run_sum[2] = {0.f, 0.f};
  // Last query group of the warpgroup's rows: the key columns it needs in a tile (uniform over the warpgroup).
  const int wg_last = row0 + wg_row0 < row_end ? mq0 + (min(row0 + wg_row0 + 63, row_end - 1)) / group : -1;

  float acc[kKeyTiles][NB8 * 4];
#pragma unroll
  for (int j = 0; j < kKeyTiles; ++j)
#pragma unroll
    for (int i = 0; i < NB8 * 4; ++i) acc[j][i] = 0.f;

#pragma unroll
  for (int st = 0; st < kRing - 1; ++st) issue(st);

  int kt = 0, kc = 0;  // kt: step over the key tiles (key tiles kt * kKeyTiles ..)
  for (int step = 0; step < total_steps; ++step) {
    cp_async_wait<kRing - 2>();  // this thread's copies of slice `step` landed
    sm90::fence_proxy_async();   // ... and are visible to the wgmma (async proxy) reads
    __syncthreads();             // every thread's copies; every warpgroup's MMAs of step - 1 done

    const int stage = step % kRing;
    const SmemDesc da =
        sm90::smem_desc_b128_split(mma::smem_addr(sA + stage * kRows * kSlice + wg_row0 * kSlice), 16, 1024);
#pragma unroll
    for (int j = 0; j < kKeyTiles; ++j) {
      // Key columns of this tile the warpgroup needs (<= 0: none). Uniform over the warpgroup; the broadcast from
      // lane 0 lets ptxas see that too (otherwise it serializes the wgmma behind the branch: C7520).
      const int live = __shfl_sync(0xffffffffu, wg_last - (kt * kKeyTiles + j) * kCols + 1, 0);
      if (live > 0) {
        const SmemDesc db =
            sm90::smem_desc_b128_split(mma::smem_addr(sB + (stage * kKeyTiles + j) * kCols * kSlice), 16, 1024);
        sm90::wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < kSlice / 16; ++kk)
          sm90::wgmma_ss_n128<T>(acc[j], da.at(kk * 32u), db.at(kk * 32u), 1);
        sm90::wgmma_commit();
      }
    }
    // The copies kRing - 1 slices ahead refill the stage of step - 1 (its MMAs finished before the barrier) while
    // this step's MMAs run: issued before them, their ~8 cp.async and address arithmetic per thread sat between the
    // barrier and the tensor core's next work.
    issue(step + kRing - 1);
    sm90::wgmma_wait<0>();  // nothing pending when the warpgroup skipped its MMAs
#pragma unroll
    for (int j = 0; j < kKeyTiles; ++j) sm90::fence_regs(acc[j]);

    if (++kc < NK) continue;
    // ---- key tiles of step kt complete: causal mask, online softmax, block sums (tile_row_stats), tile by tile.
#pragma unroll
    for (int j = 0; j < kKeyTiles; ++j) {
      const int tile = kt * kKeyTiles + j;
      if (kKeyTiles > 1 && tile >= n_tiles) break;  // uniform over the CTA
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const int hq = kvh * group + (row0 + wg_row0 + warp * 16 + hf * 8 + g8) % group;
        tile_row_stats(p, [&](int nb, int c) -> float& { return acc[j][nb * 4 + hf * 2 + c]; }, row_m(hf), b, hq,
                       tile * kCols, t4, run_max[hf], run_sum[hf]);
      }
    }
#pragma unroll
    for (int j = 0; j < kKeyTiles; ++j)
#pragma unroll
      for (int i = 0; i < NB8 * 4; ++i) acc[j][i] = 0.f;
    kc = 0;
    ++kt;
  }
  mma::cp_async_wait_all();  // no copy may still target shared memory when the CTA exits

  // Row totals: log2-sum-exp over every causal key group of the row.
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    const int m = row_m(hf);
    if (m < 0 || t4 != 0) continue;
    const int rho = row0 + wg_row0 + warp * 16 + hf * 8 + g8;
    const int hq = kvh * group + rho % group;
    p.ws_row[(int64_t(b) * p.heads_q + hq) * int64_t(p.r1 - p.r0) * per + (m - mq0)] =
        block_lse2(run_max[hf], run_sum[hf]);
  }
#else
  sm90::mark_not_sm90a();  // no wgmma in this pass: the host never launches this body (sm90a_body_runnable)
#endif
}

}  // namespace xattn
}  // namespace elastic
