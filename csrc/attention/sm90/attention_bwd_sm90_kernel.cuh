// Hopper (sm_90a) backward kernel of elastic attention: warpgroup MMA (wgmma) with a TMA producer warp, after
// FlashAttention-3's backward. Same function and parameters as the mma.sync backward (attention_bwd_kernel.cuh,
// whose preprocess delta = rowsum(dO * O) - grad_lse and dq_accum -> dq conversion it shares):
//   P = exp(S * scale - lse), dS = P * (dP - delta), dV = P^T dO, dK = scale * dS^T Q, dQ = scale * dS K.
//
// CTA = (KV head, batch, key tile of BN = 128 keys), handed out in the order of attention_bwd_sm90_order.cuh
// (every pair's first key tile first, which causal heads' queries see most; short STREAM pairs last, pair by
// pair, for the L2). It walks the (query head of the GQA group, query tile
// of BM = 64 rows) pairs that can see its key tile (the transposed visibility walk of attention_tiles.cuh: FULL,
// STREAM, BLOCK bits), keeping dK and dV of its keys in registers across the whole group (no atomics, K/V
// never repeated), and adds dQ of each pair into the fp32 dq_accum by TMA reduce-add of a shared-memory tile (the
// default) or, with ELASTIC_SM90_BWD_DQ_TMA=0, by vector atomics from registers (red.global.add.v2.f32).
//
// Warpgroup 0, warp 0: the producer. It loads K and V once, then per visited (head, query tile) the Q and dO
// tiles (TMA boxes; a varlen tail tile that runs into the next sequence by cp.async with zero fill) and the
// tile's lse * log2(e), delta, BLOCK bits and full-visibility flag (plain loads) into a STAGES-deep ring,
// signalled on mbarriers; a last stage with r0 = -1 ends the walk. Warpgroups 1 and 2: consumers, warpgroup w
// owning keys [64 w, 64 w + 64) of the tile. Per stage:
//   S^T = K Q^T, dP^T = V dO^T (wgmma SS, M = the warpgroup's 64 keys, N = 64 queries): their accumulators
//     are, once masked and exponentiated, directly the register A operands of
//   dV += P^T dO, dK += dS^T Q (wgmma RS, dO and Q read MN-major);
//   dS^T goes to shared memory (double-buffered), and dQ = dS K runs as wgmma SS with both operands MN-major:
//     at head_dim 128 warpgroup w computes the head-dim columns [64 w, 64 w + 64) over all 128 keys (one
//     atomic per dQ element and key tile), at head_dim 64 the whole row over its own 64 keys.
// Masked entries are exactly 0 by selection (P = visible ? exp2(...) : 0, dS likewise), so that non-finite
// values of rows or keys outside the pair never enter; rows with lse = -inf see no key and get P = 0.
// Non-finite rule (README "Non-finite inputs", nonfinite.cuh), as in the mma.sync backward: a row is bad when the
// preprocess wrote delta = NaN for it (its lse is NaN, or its grad_out / grad_lse row is non-finite; that kernel also
// fills its dq_accum row with NaN). The producer stores lse = NaN for bad rows, so that their visible P and dS are
// NaN, and on the rare stage with one copies Q and dO by cp.async with those rows zero-filled instead of by TMA
// (0 * inf in a masked product would reach dK / dV of keys the row does not see). The consumers zero the non-finite
// K / V rows of the tile once, before their loop (0 * inf in dQ = dS K and dP = dO V^T of other rows). Cost on
// finite inputs: that check (at most 16 shared loads per consumer thread per CTA) and a ballot per producer stage.
#pragma once
#include <cmath>
#include <type_traits>

#include "attention/attention_mma.cuh"
#include "attention/attention_params.h"
#include "attention/attention_tiles.cuh"
#include "attention/kernel_utils.cuh"
#include "attention/nonfinite.cuh"
#include "attention/sm90/attention_bwd_sm90_order.cuh"
#include "attention/sm90/attention_fwd_sm90_pipeline.cuh"  // load_tile_sw128, RingPos, FillPos
#include "attention/sm90/sm90a_available.h"
#include "attention/sm90/tma.cuh"
#include "attention/sm90/wgmma.cuh"

namespace elastic {
namespace sm90 {

// Tensor maps of the backward: Q and dO with 64-row boxes, K and V with 128-row boxes (the producer's loads), and
// dq_accum (fp32, 64 rows x 32 columns: the consumers' reduce-add with DQ_TMA).
struct BwdTmaMaps {
  CUtensorMap q, dout, k, v, dq;
};

// DQ_TMA: dQ goes to dq_accum by TMA reduce-add of a shared-memory tile per warpgroup and stage (FlashAttention-3's
// way; the default, kernel_options.h has the H200 numbers) instead of red.global.add.v2.f32 from registers (the A/B
// alternative, ELASTIC_SM90_BWD_DQ_TMA=0); its 32 KiB of staging leave room for 2 Q/dO stages only.
// EARLY_RELEASE (experiment, ELASTIC_SM90_BWD_EARLY_RELEASE=1 in ELASTIC_BUILD_EXPERIMENTS=1 builds): a stage's Q / dO
// slot is released once dV and dK are done (wgmma_wait<1>), while dQ (which reads dS^T and K only) still runs, so that
// the producer may refill the slot one dQ MMA earlier (2 stages with DQ_TMA). Untimed.
// DET (deterministic mode, with the atomics dQ path only): the key-tile CTAs add their dQ tile of a (query head,
// query tile) in key-tile order, one after another, through per-tile turn counters (p.dq_sem; see bwd_consumer).
// OVERLAP (ELASTIC_SM90_BWD_OVERLAP=1, with DQ_TMA): FlashAttention-4's order of a stage's last MMAs. dS^T is stored
// by stmatrix before the dS barrier, then dQ = dS K is issued before dK += dS^T Q, so that dQ's staging (fp32 stores,
// proxy fence, reduce-add) runs while dK's MMAs do; each warp reduce-adds its own 16 dQ rows (16-row boxes), so the
// staging needs no named barrier; the rows' lse * log2(e) is read before the wait for S. The default order ends a
// stage with dQ and waits for every MMA before the staging (ncu, 32K dense: that wait and the staging's barriers
// were ~12% of the consumers' stall samples, with the tensor cores of both warpgroups idle).
// DEFER (ELASTIC_SM90_BWD_OVERLAP=2, on top of OVERLAP): a stage's dK MMA is still running when the next stage
// starts; the next stage's wait for S (wgmma groups complete in order) also covers it, and releases its Q / dO slot
// then. The loop head (full-barrier wait, stage info, descriptors) and the issue of S and dP overlap dK, and the tensor
// cores' queue does not drain between stages. A slot then comes back one wait later, so 3 Q/dO stages (the smem
// budget just holds them: 232,088 of 232,448 bytes).
// LEAN (ELASTIC_SM90_BWD_LEAN=1, the default stage order): fewer instructions for the same shared-memory bytes. dS^T
// goes to shared memory by 4 stmatrix.x4 (was 16 st.shared.b32 and ~30 address instructions per stage and thread), and
// the dQ staging addresses are one base per thread XOR-ed with compile-time offsets (the tiles are 1024-byte aligned,
// so the swizzle's XOR can act on the whole address) instead of ~20 IMAD / LOP3 recomputed each stage; the stage's
// lse and delta rows are stored in the order the consumer threads read them (stage_row_pos). The consumer
// loop is unrolled over the 2 ring slots (slot, phase and dS^T buffer compile-time). The dQ staging tile is
// double-buffered (the last 32 KiB of shared memory) so that its named barrier before the stores goes: a warpgroup's
// leader waits for the reduce-add of the step before (wait_group.read 1) right after issuing its own, and the next
// step's dS barrier, which the leader reaches only after that wait, tells the other threads that the buffer is free.
// BANKS (on the lean tail; the default, ELASTIC_SM90_BWD_BANKS=0 turns it off): the lean tail's two bank-conflicted
// shared accesses made conflict-free (the same values, the lse / delta rows at other addresses). ncu of the lean tail
// (32K, every head FULL): 16% of the kernel's 6.8G shared-memory wavefronts were excessive, half from the lse / delta
// LDS.128 (the 4 t4 groups 64 bytes apart: t4 0 / 2 and 1 / 3 share banks, 8 wavefronts for 4), half from the dQ
// staging's STS.64 (a half-warp's rows g = 0..3 write only 4 of the 8 swizzled 16-byte chunks, 4 wavefronts for 2);
// with ~430 wavefronts per warp and ~4300-cycle stage, shared memory came close to bounding the loop (L1/TEX
// throughput 76%). Here the t4 groups are 20 floats apart (stage_row_pos), and in staging step s lane g stores the
// column block i % 4 = s ^ (g ^ g / 2) % 4 (dq_stage_perm), so that each half-warp covers all 8 chunks. After: 0.2%
// excessive, L1/TEX 69%, SM throughput 57.6 -> 61.6%, the kernel 39.09 -> 36.88 ms under ncu (kernel_options.h has
// the timed A/B).
template <typename T, int D_, bool DQ_TMA_ = false, bool EARLY_RELEASE_ = false, bool DET_ = false,
          bool OVERLAP_ = false, bool DEFER_ = false, bool LEAN_ = false, bool BANKS_ = false>
struct BwdSm90Traits {
  static constexpr bool DQ_TMA = DQ_TMA_, EARLY_RELEASE = EARLY_RELEASE_, DET = DET_, OVERLAP = OVERLAP_,
                        DEFER = DEFER_, LEAN = LEAN_, BANKS = BANKS_;
  static_assert(!LEAN || !OVERLAP, "the overlapped order has its own stmatrix tail");
  static_assert(!BANKS || LEAN, "the conflict-free accesses are the lean tail's");
  static_assert(!(DET && DQ_TMA), "the deterministic mode adds dQ by atomics from registers");
  static_assert(!OVERLAP || (DQ_TMA && !EARLY_RELEASE), "the overlapped order stages dQ for the TMA reduce-add");
  static_assert(!DEFER || OVERLAP, "the deferred dK wait builds on the overlapped order");
  // Rows of one dQ reduce-add box: a warpgroup's 64 rows (one leader, named barriers), or a warp's 16 (OVERLAP).
  static constexpr int DQ_BOX_ROWS = OVERLAP ? 16 : 64;
  // 3 stages: a stage's loads (lse / delta by plain loads, then Q / dO by TMA) take about as long as the two
  // warpgroups' MMAs of one stage (~10 MFLOP per CTA); head_dim 128 then needs 195 KiB of shared memory.
  static constexpr int D = D_, BM = 64, BN = 128, STAGES = DQ_TMA && !DEFER ? 2 : 3;
  static constexpr int WG_THREADS = 128, CONSUMER_WGS = BN / 64, NTHREADS = WG_THREADS * (1 + CONSUMER_WGS);
  static constexpr int KV_BYTES = BN * D * 2, QT_BYTES = BM * D * 2, DS_BYTES = BN * BM * 2;
  static constexpr int DQ_WG_BYTES = BM * 64 * 4;  // one warpgroup's fp32 dQ tile: 64 rows x 64 columns
  static constexpr int DQ_BUFS = LEAN ? 2 : 1;     // staging tiles per warpgroup
  // Per stage: lse * log2(e) and delta of the BM rows (floats; ROWS_LEN with the BANKS padding, stage_row_pos),
  // then the stage's info (8 ints, StageInfo).
  // ROWS_T4: the floats between the lean layout's t4 groups (0: rows in order, the other tails).
  static constexpr int ROWS_T4 = LEAN ? (BANKS ? 20 : 16) : 0, ROWS_LEN = BANKS ? 4 * ROWS_T4 : BM;
  static constexpr int META_BYTES = 2 * ROWS_LEN * 4 + 32;
  static constexpr int NUM_BARRIERS = 1 + 2 * STAGES;  // K/V full; per stage full and empty
  // 1024: alignment slack of the 128-byte swizzle; K, V; Q and dO per stage; dS^T twice; stage meta; barriers.
  static constexpr int SMEM_BYTES =
      1024 + 2 * KV_BYTES + STAGES * 2 * QT_BYTES + 2 * DS_BYTES + (DQ_TMA ? CONSUMER_WGS * DQ_WG_BYTES * DQ_BUFS : 0) +
      STAGES * META_BYTES + NUM_BARRIERS * 8;
  static_assert(SMEM_BYTES <= 227 * 1024, "shared memory per block");
  // Consumers hold dK and dV (D / 2 + D / 2 fp32 per thread), S^T and dP^T (32 + 32) and dQ (32). The sum must fit
  // the 168 per thread the CTA gets under __launch_bounds__(NTHREADS, 1), or setmaxnreg.inc waits forever.
  // 24 / 240 (was 40 / 232): the consumers' two stage instances (bwd_consumer) need 240 to keep the wgmma
  // asynchronous; the producer fits in 24 without spills (ptxas, nvcc 13.0: it uses 22).
  static constexpr int PRODUCER_REGS = 24, CONSUMER_REGS = 240;
  static_assert(WG_THREADS * PRODUCER_REGS + CONSUMER_WGS * WG_THREADS * CONSUMER_REGS <= 168 * NTHREADS,
                "register pool");
  static_assert(D == 64 || D == 128, "head_dim 64 or 128");
};

// Shared-memory addresses (tiles 1024-byte aligned) of one CTA.
template <typename Tr>
struct BwdSmem {
  uint32_t k, v, qdo, ds, dq, meta, bar;  // dq: the DQ_TMA staging tiles (one per consumer warpgroup)
  __device__ __forceinline__ uint32_t q_slot(int s) const { return qdo + s * 2 * Tr::QT_BYTES; }
  __device__ __forceinline__ uint32_t do_slot(int s) const { return q_slot(s) + Tr::QT_BYTES; }
  __device__ __forceinline__ uint32_t ds_buf(int i) const { return ds + i * Tr::DS_BYTES; }
  __device__ __forceinline__ uint32_t meta_slot(int s) const { return meta + s * Tr::META_BYTES; }
  __device__ __forceinline__ uint32_t kv_full() const { return bar; }
  __device__ __forceinline__ uint32_t full(int s) const { return bar + 8 * (1 + s); }
  __device__ __forceinline__ uint32_t empty(int s) const { return bar + 8 * (1 + Tr::STAGES + s); }
};

// The ints after a stage's lse / delta rows.
struct StageInfo {
  int h, r0, full, prev_n, bits_lo, bits_hi, pad2, pad3;  // r0 < 0: end of the walk
  // prev_n (DET only): the nearest lower key tile whose CTA also visits this (head, query tile), -1 if none
};

#if defined(ELASTIC_SM90A_ENABLED)

constexpr float kBwdLog2e = 1.4426950408889634f;

// OR of pred over the 256 consumer threads (named barrier 5, which the non-finite rule's rare paths use).
__device__ __forceinline__ bool consumers_or(bool pred) {
  uint32_t any;
  asm volatile(
      "{\n .reg .pred p, q;\n setp.ne.u32 p, %1, 0;\n bar.red.or.pred q, 5, 256, p;\n selp.u32 %0, 1, 0, q;\n}\n"
      : "=r"(any)
      : "r"(static_cast<uint32_t>(pred))
      : "memory");
  return any != 0u;
}

// Issue the box loads of one [ROWS, D] tile (D / 64 boxes of 64 columns); the caller arrives with the bytes.
template <int ROWS, int D>
__device__ __forceinline__ void tma_rows(uint32_t dst, const CUtensorMap* map, uint32_t bar, int row, int h, int bt) {
#pragma unroll
  for (int c = 0; c < D / 64; ++c) tma_load_4d(dst + c * ROWS * 128, map, bar, c * 64, row, h, bt);
}

// One warp copies a [ROWS, D] tile into the 128-byte-swizzled layout (load_tile_sw128's) by cp.async, zero-filling
// the rows >= valid_rows and the rows set in `zero` (bit r: row r).
template <int ROWS, int D, typename T>
__device__ __forceinline__ void load_rows_zero_fill(T* smem, const T* gmem, int64_t row_stride, int valid_rows,
                                                    uint64_t zero, int lane) {
  static_assert(ROWS <= 64, "one 64-bit row mask");
  constexpr int CHUNKS = D / 8;
  for (int i = lane; i < ROWS * CHUNKS; i += 32) {
    const int r = i / CHUNKS, c = i % CHUNKS;
    const bool valid = r < valid_rows && !((zero >> r) & 1u);
    mma::cp_async16(smem + (c / 8) * (ROWS * 64) + r * 64 + (((c % 8) ^ (r & 7)) << 3),
                    valid ? gmem + r * row_stride + c * 8 : gmem, valid);
  }
}

// The rows' lse * log2(e) or delta of query columns 8 i + 2 t4 + {0, 1} (i = 0 .. 7), as float2 pairs. ROWS_T4 > 0
// (LEAN): the producer stores row r = 8 i + 2 t4 + c at ROWS_T4 * t4 + 2 i + c, so that a thread's 16 values are
// contiguous and arrive by 4 LDS.128 instead of 8 LDS.64 per array and stage; ROWS_T4 = 20 (BANKS) puts the 4 groups a
// quarter-warp reads in different banks (16: t4 0 / 2 and 1 / 3 collide, 2 wavefronts per quarter-warp instead of 1).
template <int ROWS_T4>
__device__ __forceinline__ int stage_row_pos(int r) {
  return ROWS_T4 > 0 ? ((r >> 1) & 3) * ROWS_T4 + (r >> 3) * 2 + (r & 1) : r;
}
template <int ROWS_T4>
__device__ __forceinline__ void load_row_pairs(float2 (&out)[2], const float* rows, int j, int t4) {
  if constexpr (ROWS_T4 > 0) {
    const float4 v = *reinterpret_cast<const float4*>(rows + ROWS_T4 * t4 + 4 * j);
    out[0] = make_float2(v.x, v.y);
    out[1] = make_float2(v.z, v.w);
  } else {
    out[0] = *reinterpret_cast<const float2*>(rows + 8 * (2 * j) + 2 * t4);
    out[1] = *reinterpret_cast<const float2*>(rows + 8 * (2 * j + 1) + 2 * t4);
  }
}

// P^T = exp2(S^T * scale_log2 - lse2) of this thread's 32 entries (entry 4 i + 2 hf + c: query column 8 i + 2 t4 + c);
// MASKED: entries whose bit in `vis` is clear are exactly 0 (selected, so that nothing of them enters). exp2 runs for
// every entry and the select comes after: the first version predicated the exp2 on the bit, and ptxas then reloaded
// the scale from the constant bank under each predicate and packed the 32 predicates into a register for the dS
// select (~5 instructions per entry instead of 2). Same arithmetic for the visible entries, so the same bits.
// Entry e = 4 i + 2 hf + c of this thread's 32 (query column 8 i + 2 t4 + c) becomes op(e, x), x the .x (even e) or .y
// (odd e) of its column pair's value in `rows` (load_row_pairs); MASKED: entries whose bit in `vis` is clear become
// exactly 0. bwd_probs and bwd_dscores are this loop with their own op.
template <bool MASKED, int ROWS_T4, typename Op>
__device__ __forceinline__ void bwd_rows_apply(float (&dst)[32], const float* rows, int t4, uint32_t vis, Op op) {
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    float2 rp[2];
    load_row_pairs<ROWS_T4>(rp, rows, j, t4);
#pragma unroll
    for (int ii = 0; ii < 2; ++ii) {
      const int i = 2 * j + ii;
      const float2 r = rp[ii];
#pragma unroll
      for (int e2 = 0; e2 < 4; ++e2) {
        const int e = 4 * i + e2;
        const float v = op(e, e2 & 1 ? r.y : r.x);
        dst[e] = !MASKED || ((vis >> e) & 1u) ? v : 0.f;
      }
    }
  }
}

// P^T = exp2(S^T * scale_log2 - lse2) of this thread's 32 entries (entry 4 i + 2 hf + c: query column 8 i + 2 t4 + c);
// MASKED: entries whose bit in `vis` is clear are exactly 0 (selected, so that nothing of them enters). exp2 runs for
// every entry and the select comes after: the first version predicated the exp2 on the bit, and ptxas then reloaded
// the scale from the constant bank under each predicate and packed the 32 predicates into a register for the dS
// select (~5 instructions per entry instead of 2). Same arithmetic for the visible entries, so the same bits.
template <bool MASKED, int ROWS_T4 = 0>
__device__ __forceinline__ void bwd_probs(float (&s)[32], const float* s_lse2, int t4, float scale_log2,
                                          uint32_t vis) {
  bwd_rows_apply<MASKED, ROWS_T4>(s, s_lse2, t4, vis,
                                  [&](int e, float l2) { return exp2f(fmaf(s[e], scale_log2, -l2)); });
}

// bwd_probs with the rows' lse * log2(e) already in registers (OVERLAP: read before the wait for S, whose "memory"
// clobber otherwise keeps the shared loads after it, and the first FFMA waited on them: ~5% of the stall samples).
template <bool MASKED>
__device__ __forceinline__ void bwd_probs_pre(float (&s)[32], const float2 (&l2)[8], float scale_log2, uint32_t vis) {
#pragma unroll
  for (int i = 0; i < 8; ++i)
#pragma unroll
    for (int e2 = 0; e2 < 4; ++e2) {
      const int e = 4 * i + e2;
      const float v = exp2f(fmaf(s[e], scale_log2, -(e2 & 1 ? l2[i].y : l2[i].x)));
      s[e] = !MASKED || ((vis >> e) & 1u) ? v : 0.f;
    }
}

// bwd_dscores with the first half of the rows' delta already in registers (OVERLAP: read before the wait for dP, as
// lse before S's; the second half is read after it and arrives while the first is used: preloading all 8 pairs made
// ptxas spill in the loop, 20 bytes).
template <bool MASKED>
__device__ __forceinline__ void bwd_dscores_pre(float (&dp)[32], const float (&pr)[32], const float2 (&dl_lo)[4],
                                                const float* s_delta, int t4, uint32_t vis) {
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const float2 dl = i < 4 ? dl_lo[i % 4] : *reinterpret_cast<const float2*>(s_delta + 8 * i + 2 * t4);
#pragma unroll
    for (int e2 = 0; e2 < 4; ++e2) {
      const int e = 4 * i + e2;
      const float v = pr[e] * (dp[e] - (e2 & 1 ? dl.y : dl.x));
      dp[e] = !MASKED || ((vis >> e) & 1u) ? v : 0.f;
    }
  }
}

// Four 8x8 b16 matrices to shared memory (register x: matrix x, the accumulator-fragment layout; lane 8 x + r gives
// the address of row r of matrix x): one instruction for what took four 32-bit stores.
__device__ __forceinline__ void stmatrix_x4(uint32_t addr, const uint32_t (&r)[4]) {
  asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "r"(r[0]), "r"(r[1]),
               "r"(r[2]), "r"(r[3])
               : "memory");
}

// dS^T = P^T (dP^T - delta) in place of dP^T; MASKED: entries whose bit in `vis` is clear are exactly 0 (a masked
// entry's dP - delta may be non-finite: the bad rows of the non-finite rule). Dropping this select (P is already 0
// there, and the producer could store delta = 0 for bad rows) was tried: ptxas then serialized the wgmma (C7512).
template <bool MASKED, int ROWS_T4 = 0>
__device__ __forceinline__ void bwd_dscores(float (&dp)[32], const float (&pr)[32], const float* s_delta, int t4,
                                            uint32_t vis) {
  bwd_rows_apply<MASKED, ROWS_T4>(dp, s_delta, t4, vis, [&](int e, float dl) { return pr[e] * (dp[e] - dl); });
}

// BANKS: the dQ staging step in which lane row g stores column block i % 4: i4 ^ dq_stage_perm(g). A half-warp's STS.64
// covers rows g = 0..3 (or 4..7), t4 = 0..3: in the 128-byte swizzle the 16-byte chunk of column block m of row g is
// (2 m + t4 / 2) ^ g, i.e. chunk pair m ^ (g / 2); with m = i4 the four rows hit only 2 pairs (4 of the 8 chunks: 2
// wavefronts), with m = i4 ^ g ^ (g / 2) the pair is (i4 ^ g) % 4, a different one per row (all 8 chunks: 1 wavefront).
__device__ __forceinline__ uint32_t dq_stage_perm(int g) { return uint32_t(g ^ (g >> 1)) & 3u; }
// vals[i4] <- vals[i4 ^ perm] for every i4 (two levels of selects on perm's bits: 2 SEL per value).
__device__ __forceinline__ void dq_stage_permute(float2 (&vals)[4], uint32_t perm) {
  const bool swap1 = perm & 1u, swap2 = perm & 2u;
  float2 y[4];
#pragma unroll
  for (int k = 0; k < 4; ++k) y[k] = swap1 ? vals[k ^ 1] : vals[k];
#pragma unroll
  for (int k = 0; k < 4; ++k) vals[k] = swap2 ? y[k ^ 2] : y[k];
}

// Producer warp: K/V of the tile, then one stage per visited (query head, query tile), then the end stage. Full
// barriers count the 32 lanes (lane 0's arrival carries the TMA bytes); empty barriers the 8 consumer warps.
template <typename T, typename Tr>
__device__ void bwd_producer(const AttentionBwdParams& p, const BwdTmaMaps& maps, const BwdSmem<Tr>& sm,
                             unsigned char* gbase, uint32_t base, int b, int kvh, int n_block, int mode,
                             const SeqInfo& seq) {
  constexpr int BM = Tr::BM, BN = Tr::BN, D = Tr::D;
  const int lane = threadIdx.x % 32;
  auto gptr = [&](uint32_t addr) { return gbase + (addr - base); };
  if (lane == 0) {
    tma_prefetch_map(&maps.q);
    tma_prefetch_map(&maps.dout);
    tma_prefetch_map(&maps.k);
    tma_prefetch_map(&maps.v);
  }
  const bool varlen = p.cu_seqlens_q != nullptr;
  const int bt = varlen ? 0 : b;  // dense maps are [B, S, H, D] (rows past S read as zeros), varlen [1, T, H, D]
  const int j0 = n_block * BN, len_k = seq.len_k, valid_k = min(BN, len_k - j0);

  // K and V. A varlen key tile past the sequence's end would read the next sequence (TMA zero-fills only at the
  // tensor's edge): those rows are copied with zero fill instead (dQ = dS K meets them, and 0 * Inf is NaN).
  if (!varlen || valid_k == BN || int64_t(seq.k_start) + len_k == p.rows_k) {
    if (lane == 0) {
      mbar_arrive_expect_tx(sm.kv_full(), 2 * Tr::KV_BYTES);
      tma_rows<BN, D>(sm.k, &maps.k, sm.kv_full(), seq.k_start + j0, kvh, bt);
      tma_rows<BN, D>(sm.v, &maps.v, sm.kv_full(), seq.k_start + j0, kvh, bt);
    } else {
      mbar_arrive(sm.kv_full());
    }
  } else {
    const T* k = static_cast<const T*>(p.k) + int64_t(seq.k_start + j0) * p.k_stride_r + kvh * p.k_stride_h;
    const T* v = static_cast<const T*>(p.v) + int64_t(seq.k_start + j0) * p.v_stride_r + kvh * p.v_stride_h;
    load_tile_sw128<BN, D, 32>(reinterpret_cast<T*>(gptr(sm.k)), k, p.k_stride_r, valid_k, lane);
    load_tile_sw128<BN, D, 32>(reinterpret_cast<T*>(gptr(sm.v)), v, p.v_stride_r, valid_k, lane);
    cp_async_wait_all_issued();
    fence_proxy_async();  // the consumers read these tiles through the async proxy (wgmma)
    mbar_arrive(sm.kv_full());
  }

  const int j_last = j0 + valid_k - 1;
  const int num_m = (seq.len_q + BM - 1) / BM;
  const int m_min = max(0, j0 - seq.offset) / BM;  // first query tile with a row at or after key j0
  const bool q_tail_by_tma = !varlen || int64_t(seq.q_start) + seq.len_q == p.rows_q;
  FillPos<Tr::STAGES> pos;
  for (int hh = 0; hh < p.group; ++hh) {
    const int h = kvh * p.group + hh;
    const BlockBits bb = block_bits(p, b, h, kvh);
    const int64_t lse_off = b * p.lse_stride_b + h * p.lse_stride_h + seq.q_start;
    // The warp decides 32 query tiles at once (lane l: tile mb + l), then loads the visible ones in order: the mask
    // reads of a BLOCK head (one per tile) overlap instead of running one after another.
    for (int mb = m_min; mb < num_m; mb += 32) {
      bool may = false, past = false;
      if (mb + lane < num_m) {
        const int r0 = (mb + lane) * BM, r_end = min(r0 + BM, seq.len_q);
        const int i_first = r0 + seq.offset, i_last = r_end - 1 + seq.offset;
        may = tile_may_be_visible(mode, i_first, i_last, j0, j_last, p.sink, p.window, bb);
        // STREAM keys outside the sink are seen only by queries within the window: later tiles can't.
        past = mode == kStream && j0 >= p.sink && i_first - j_last >= p.window;
      }
      unsigned todo = __ballot_sync(0xffffffffu, may);
      const bool walk_ends = __any_sync(0xffffffffu, past);
      for (; todo != 0; todo &= todo - 1) {
        const int m = mb + __ffs(todo) - 1;
        const int r0 = m * BM, r_end = min(r0 + BM, seq.len_q);
        const int i_first = r0 + seq.offset, i_last = r_end - 1 + seq.offset;
        // Fully visible: no element mask. Only whole query tiles qualify: the rows past the sequence must get P = 0.
        const bool full = r_end - r0 == BM &&
                          tile_fully_visible(mode, i_first, i_last, j0, j0 + BN - 1, len_k, p.sink, p.window, bb);
        // The rows' lse, delta and mask bits are read before waiting for the slot: their latency overlaps the wait.
        float lse2[2], dlt[2];
        bool bit[2];
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          const int r = r0 + lane + 32 * hf;
          const bool in = r < r_end;
          lse2[hf] = in ? p.lse[lse_off + r] * kBwdLog2e : INFINITY;  // unread: such rows are masked
          dlt[hf] = in ? p.delta[lse_off + r] : 0.f;
          bit[hf] = in && mode == kBlock && bb.bit_of_position(r + seq.offset, j0 / bb.block_size);
        }
        const unsigned lo = __ballot_sync(0xffffffffu, bit[0]), hi = __ballot_sync(0xffffffffu, bit[1]);
        // Deterministic mode: the key tile added into this dQ tile just before ours. Key tile n' < n_block visits the
        // tile exactly when tile_may_be_visible says so (its m_min is <= ours, and its walk stops only past tiles
        // that are invisible): the same test, 32 key tiles per step, nearest first.
        int prev_n = -1;
        if constexpr (Tr::DET) {
          for (int top = n_block - 1; top >= 0 && prev_n < 0; top -= 32) {
            const int nn = top - lane;
            const bool seen = nn >= 0 && tile_may_be_visible(mode, i_first, i_last, nn * BN, nn * BN + BN - 1, p.sink,
                                                              p.window, bb);
            const unsigned found = __ballot_sync(0xffffffffu, seen);
            if (found != 0u) prev_n = top - (__ffs(found) - 1);
          }
        }
        if (pos.primed) mbar_wait(sm.empty(pos.slot), pos.phase ^ 1);
        const uint32_t meta = sm.meta_slot(pos.slot);
        float* s_lse2 = reinterpret_cast<float*>(gptr(meta));
        float* s_delta = s_lse2 + Tr::ROWS_LEN;
        // Non-finite rule: a bad row (delta NaN) gets lse NaN, so that its visible P is NaN too, and zero Q / dO rows
        // (below). Tested after the wait, so that the loads' latency still overlaps it.
        const uint64_t bad = (uint64_t(__ballot_sync(0xffffffffu, isnan(dlt[1]))) << 32) |
                             __ballot_sync(0xffffffffu, isnan(dlt[0]));
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          const int at = stage_row_pos<Tr::ROWS_T4>(lane) + (Tr::LEAN ? 8 : 32) * hf;  // (row lane + 32 hf)
          s_lse2[at] = (bad >> (lane + 32 * hf)) & 1u ? NAN : lse2[hf];
          s_delta[at] = dlt[hf];
        }
        if (lane == 0) {
          StageInfo* info = reinterpret_cast<StageInfo*>(s_delta + Tr::ROWS_LEN);
          info->h = h;
          info->r0 = r0;
          info->full = full ? 1 : 0;
          info->prev_n = prev_n;
          info->bits_lo = static_cast<int>(lo);
          info->bits_hi = static_cast<int>(hi);
        }
        const uint32_t full_bar = sm.full(pos.slot);
        if (bad == 0 && (r_end - r0 == BM || q_tail_by_tma)) {
          if (lane == 0) {
            mbar_arrive_expect_tx(full_bar, 2 * Tr::QT_BYTES);
            tma_rows<BM, D>(sm.q_slot(pos.slot), &maps.q, full_bar, seq.q_start + r0, h, bt);
            tma_rows<BM, D>(sm.do_slot(pos.slot), &maps.dout, full_bar, seq.q_start + r0, h, bt);
          } else {
            mbar_arrive(full_bar);
          }
        } else {
          // Zero-filled copies: varlen tail rows of a sequence that does not end the tensor, and (rare) the bad rows
          // of the non-finite rule, whose Q / dO must be 0 in shared memory (0 * inf in the masked products would
          // reach dK / dV of keys the row does not see). The consumers' hot loop does not change.
          const T* q = static_cast<const T*>(p.q) + b * p.q_stride_b + int64_t(seq.q_start + r0) * p.q_stride_r +
                       h * p.q_stride_h;
          const T* d_o = static_cast<const T*>(p.dout) + b * p.do_stride_b +
                         int64_t(seq.q_start + r0) * p.do_stride_r + h * p.do_stride_h;
          load_rows_zero_fill<BM, D>(reinterpret_cast<T*>(gptr(sm.q_slot(pos.slot))), q, p.q_stride_r, r_end - r0,
                                     bad, lane);
          load_rows_zero_fill<BM, D>(reinterpret_cast<T*>(gptr(sm.do_slot(pos.slot))), d_o, p.do_stride_r,
                                     r_end - r0, bad, lane);
          cp_async_wait_all_issued();
          fence_proxy_async();
          mbar_arrive(full_bar);
        }
        pos.next();
      }
      if (walk_ends) break;
    }
  }
  // End of the walk.
  if (pos.primed) mbar_wait(sm.empty(pos.slot), pos.phase ^ 1);
  if (lane == 0) reinterpret_cast<StageInfo*>(gptr(sm.meta_slot(pos.slot)) + 2 * Tr::ROWS_LEN * 4)->r0 = -1;
  mbar_arrive(sm.full(pos.slot));
}

// OVERLAP: the end of a stage after dS^T is in registers (ds_frag) and dV += P^T dO was issued (p_frag). dS^T to
// shared memory by stmatrix, the dS barrier, dQ = dS K then dK += dS^T Q issued, dQ staged and reduce-added per warp
// while dK runs; returns once every MMA of the stage has completed (the caller releases the Q / dO slot), or with DEFER
// while dK still runs (the next stage's wait for S covers it).
template <typename T, typename Tr>
__device__ __forceinline__ void bwd_stage_tail_overlap(const AttentionBwdParams& p, const BwdTmaMaps& maps,
                                                       const BwdSmem<Tr>& sm, uint32_t ub, uint32_t base, int b,
                                                       const SeqInfo& seq, int wg, int warp, int lane, int it, int h,
                                                       int r0, uint32_t (&ds_frag)[Tr::BM / 16][4],
                                                       uint32_t (&p_frag)[Tr::BM / 16][4], float (&acc_dk)[Tr::D / 2],
                                                       float (&acc_dv)[Tr::D / 2], const SmemDesc& q_mn,
                                                       const SmemDesc& k_mn_desc) {
  constexpr int BM = Tr::BM, BN = Tr::BN, D = Tr::D;
  // dS^T [128 keys x 64 queries], 128-byte-swizzled rows of query columns (chunk c of row r at c ^ (r % 8)).
  // stmatrix kk stores ds_frag[kk]: matrix x is rows 8 (x & 1) .. + 7 of this warp's 16 keys, 16-byte chunk
  // 2 kk + (x >> 1). Lane 8 x + r addresses row r of matrix x; since 2 kk and x >> 1 share no bit, its chunk
  // (2 kk + (x >> 1)) ^ r is ((x >> 1) ^ r) ^ 2 kk: one XOR of the byte offset by kk << 5 per kk. Each matrix's 8
  // rows land in 8 different chunks, so the stores are free of bank conflicts.
  const uint32_t ds_tile = sm.ds_buf(it & 1);
  {
    const int mx = lane >> 3, r = lane & 7;
    const uint32_t lane_off = uint32_t(64 * wg + 16 * warp + 8 * (mx & 1) + r) * 128u + uint32_t(((mx >> 1) ^ r) << 4);
#pragma unroll
    for (int kk = 0; kk < BM / 16; ++kk) stmatrix_x4(ds_tile + (lane_off ^ uint32_t(kk << 5)), ds_frag[kk]);
  }
  fence_proxy_async();  // generic stores, read next by wgmma (async proxy)
  // The dS barrier and the double buffer as in the default order (bwd_consumer): a warpgroup rewrites buffer it & 1
  // only after the barrier of step it + 1, which the other passes after waiting for its step-it dQ MMAs.
  if constexpr (D == 128) asm volatile("bar.sync 1, 256;\n" ::: "memory");
  else if (wg == 0) asm volatile("bar.sync 1, 128;\n" ::: "memory");
  else asm volatile("bar.sync 2, 128;\n" ::: "memory");

  float acc_dq[32];
  const SmemDesc ds_desc = smem_desc_b128_split(ub + (ds_tile - base), BN * 128, 1024);
  wgmma_fence();
  constexpr int KSTEPS = D == 128 ? BN / 16 : 4;
#pragma unroll
  for (int kk = 0; kk < KSTEPS; ++kk) {
    const int ka = D == 128 ? kk : 4 * wg + kk;  // key rows 16 ka .. 16 ka + 15
    wgmma_ss_n64_tt<T>(acc_dq, ds_desc.at(ka * 16 * 128u), k_mn_desc.at(ka * 16 * 128u), kk > 0);
  }
  wgmma_commit();
  if constexpr (Tr::DEFER) {
    // A = this warpgroup's 64 rows of the dS^T tile just stored (K-major: query columns, 32-byte k-steps inside the
    // swizzled 128-byte row), so that no dS^T register outlives the stage: with dS^T fragments kept for a register-A
    // dK across stages, ptxas serialized every wgmma of the loop (C7512, insufficient registers).
    const SmemDesc dst_desc = smem_desc_b128_split(ub + (ds_tile - base) + wg * 64 * 128, 16, 1024);
#pragma unroll
    for (int kk = 0; kk < BM / 16; ++kk) {
      if constexpr (D == 128) wgmma_ss_n128_kmn<T>(acc_dk, dst_desc.at(kk * 32u), q_mn.at(kk * 16 * 128u));
      else wgmma_ss_n64_kmn<T>(acc_dk, dst_desc.at(kk * 32u), q_mn.at(kk * 16 * 128u));
    }
  } else {
#pragma unroll
    for (int kk = 0; kk < BM / 16; ++kk) {
      if constexpr (D == 128) wgmma_rs_n128_mn<T>(acc_dk, ds_frag[kk], q_mn.at(kk * 16 * 128u));
      else wgmma_rs_n64_mn<T>(acc_dk, ds_frag[kk], q_mn.at(kk * 16 * 128u));
    }
  }
  wgmma_commit();

  wgmma_wait<1>();  // dV and dQ done (groups complete in order); dK runs on during the staging
  if constexpr (Tr::DEFER) fence_regs(ds_frag);  // dQ read dS^T from shared memory, dK too: free
  fence_regs(acc_dv);
  fence_regs(acc_dq);
  fence_regs(p_frag);

  // This warp's 16 dQ rows into its part of the warpgroup's staging tile (the default path's swizzled layout; rows
  // 16 warp .. + 15 of each 64-row box are 2 KiB at a 1 KiB boundary, so the swizzle phase is unchanged) and one
  // reduce-add per 32-column box of 16 rows. Only this warp's lanes write these rows, so __syncwarp orders the reuse
  // (after lane 0's wait for its previous reduce) and the issue (after every lane's proxy fence). Rows past the
  // sequence hold +-0 (see the default path).
  const uint32_t stage = sm.dq + wg * Tr::DQ_WG_BYTES;
  const int g = lane / 4, t4 = lane % 4;
  if (lane == 0) bulk_wait_group_read0();
  __syncwarp();
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    const int row = 16 * warp + g + 8 * hf;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int chunk = 2 * (i % 4) + t4 / 2;
      const uint32_t addr = stage + (i / 4) * (BM * 128) + row * 128 + ((chunk ^ (row & 7)) << 4) + (t4 & 1) * 8;
      asm volatile("st.shared.v2.f32 [%0], {%1, %2};\n" ::"r"(addr), "f"(acc_dq[4 * i + 2 * hf]),
                   "f"(acc_dq[4 * i + 2 * hf + 1])
                   : "memory");
    }
  }
  fence_proxy_async();  // generic stores, read next by the copy engine
  __syncwarp();
  if (lane == 0) {
    const int col0 = D == 128 ? 64 * wg : 0;
    const int bt = p.cu_seqlens_q != nullptr ? 0 : b;
#pragma unroll
    for (int box = 0; box < 2; ++box)
      tma_reduce_add_4d(&maps.dq, stage + box * (BM * 128) + warp * (16 * 128), col0 + 32 * box,
                        seq.q_start + r0 + 16 * warp, h, bt);
    bulk_commit_group();
  }

  if constexpr (!Tr::DEFER) {
    wgmma_wait<0>();  // dK done: Q and dO of the stage are no longer read
    fence_regs(acc_dk);
    fence_regs(ds_frag);
  }
}

template <typename T, typename Tr>
__device__ void bwd_consumer(const AttentionBwdParams& p, const BwdTmaMaps& maps, const BwdSmem<Tr>& sm,
                             const unsigned char* gbase, uint32_t base, int b, int kvh, int n_block, int mode,
                             const SeqInfo& seq) {
  constexpr int BM = Tr::BM, BN = Tr::BN, D = Tr::D, NA = D / 2;
  using Op = mma::MmaOp<T>;
  const int wg = __shfl_sync(0xffffffffu, static_cast<int>(threadIdx.x / Tr::WG_THREADS) - 1, 0);
  const int warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32;
  const int g = lane / 4, t4 = lane % 4;
  const int j0 = n_block * BN, len_k = seq.len_k;
  const int key_row = 64 * wg + 16 * warp + g;  // this thread's key rows in the tile: key_row and key_row + 8
  const int jkey = j0 + key_row;                // absolute key position of the first

  float acc_dk[NA], acc_dv[NA];
#pragma unroll
  for (int i = 0; i < NA; ++i) acc_dk[i] = acc_dv[i] = 0.f;

  auto release = [&](uint32_t bar) {
    __syncwarp();
    if (lane == 0) mbar_arrive(bar);
  };

  mbar_wait(sm.kv_full(), 0);
  // Non-finite rule: zero the non-finite K / V rows of the tile (two threads per key row, each half of its 16-byte
  // chunks of K and V; one barrier reduction decides whether any row needs it).
  {
    constexpr int CH = D / 8;
    const int ct = threadIdx.x - Tr::WG_THREADS;  // 0 .. 255 over the consumer threads
    const int r = ct / 2;
    uint32_t acc = 0u;
#pragma unroll
    for (int k = 0; k < CH / 2; ++k) {
      const int c = 2 * k + (ct & 1);
      const uint32_t off = (c / 8) * (BN * 128) + r * 128 + (c % 8) * 16;  // swizzle permutes chunks within a row
      acc = nonfinite::absmax2(nonfinite::absmax2(acc, nonfinite::lds128(sm.k + off)), nonfinite::lds128(sm.v + off));
    }
    bool bad = nonfinite::any_nonfinite<T>(acc);
    bad |= __shfl_xor_sync(0xffffffffu, bad, 1);  // the row's other half (ct ^ 1 is in the same warp)
    if (consumers_or(bad)) {
      if (bad) {
#pragma unroll
        for (int k = 0; k < CH / 2; ++k) {
          const int c = 2 * k + (ct & 1);
          const uint32_t off = (c / 8) * (BN * 128) + r * 128 + (c % 8) * 16;
          nonfinite::sts128_zero(sm.k + off);
          nonfinite::sts128_zero(sm.v + off);
        }
      }
      fence_proxy_async();  // generic stores, read next by wgmma (async proxy)
      asm volatile("bar.sync 5, 256;\n" ::: "memory");
    }
  }
  // Deterministic mode: the counter (index into p.dq_sem, -1: none) of the dQ tile whose turn this warpgroup still
  // holds, and its token; an index rather than a pointer, one register less in a loop at the edge of spilling.
  int held_sem = -1, held_token = 0;
  // DEFER: the slot whose stage's dK MMA may still run (-1: none).
  int held_slot = -1;
  // One step of the walk: wait for ring slot `slot` (its fill of parity `phase`) and run its stage, whose dS^T goes to
  // buffer it & 1; false at the end stage.
  auto step = [&](const int slot, const int phase, const int it) -> bool {
    mbar_wait(sm.full(slot), phase);
    const unsigned char* meta = gbase + (sm.meta_slot(slot) - base);
    const StageInfo info = *reinterpret_cast<const StageInfo*>(meta + 2 * Tr::ROWS_LEN * 4);
    if (info.r0 < 0) return false;
    // One stage, in two instances: MASKED for tiles that are partly visible (diagonal, window edge, BLOCK bits,
    // sequence tail), unmasked for fully visible ones (info.full: a whole tile all of whose (key, query) pairs are
    // visible), which run no visibility bits, bit tests or selects. Chosen here, between stages, where no wgmma is
    // in flight. SASS of the bf16 D128 TMA-dQ instance per warp and fully visible stage: 553 instructions (757 with
    // the masked code, 940 before the descriptors went uniform). Both instances in one loop needed 240 registers per
    // consumer thread: at 232 ptxas serialized the loop's wgmma (C7512). ELASTIC_SM90_BWD_UNMASKED=0 sends every
    // stage through the MASKED instance (A/B; kernel_options.h).
    auto stage = [&](auto masked_tag) {
      constexpr bool MASKED = decltype(masked_tag)::value;
      const int h = info.h, r0 = info.r0, r_end = min(r0 + BM, seq.len_q);
      const float* s_lse2 = reinterpret_cast<const float*>(meta);
      const float* s_delta = s_lse2 + Tr::ROWS_LEN;
      // Every wgmma descriptor is built from `ub`, a copy of the shared base that ptxas knows to be warp-uniform
      // (a shuffle from lane 0, made per step so that it is not hoisted into the vector register that holds `base`
      // for the per-thread addresses): the descriptors then live in uniform registers and a k-step is one uniform
      // add. Built from `base` itself, every wgmma cost ~6 LOP3 / IMAD / VIADD and 4 R2UR in the vector pipe (SASS of
      // the bf16 D128 instance, per warp and fully visible stage: 940 instructions before, 806 after).
      const uint32_t ub = __shfl_sync(0xffffffffu, base, 0);
      auto uaddr = [&](uint32_t addr) { return ub + (addr - base); };
      // The descriptor of the 128-byte-swizzled tile at shared address `addr` (sbo 1024). LEAN: its start field is
      // (ub >> 4) plus a constant (the stage's slot is compile-time there, and shared addresses stay below 256 KiB, so
      // the 14-bit field needs no mask: the assumption of SmemDesc::at), one uniform add instead of add, shift, and,
      // or per descriptor and stage.
      auto desc_of = [&](uint32_t addr, uint32_t lbo) -> SmemDesc {
        if constexpr (Tr::LEAN) {
          const uint64_t fields = smem_desc_b128(0u, lbo, 1024u);  // lbo, sbo and swizzle; start address 0
          return {(ub >> 4) + ((addr - base) >> 4) + static_cast<uint32_t>(fields),
                  static_cast<uint32_t>(fields >> 32)};
        } else {
          return smem_desc_b128_split(uaddr(addr), lbo, 1024);
        }
      };
      const uint32_t q_tile = sm.q_slot(slot), do_tile = sm.do_slot(slot);
      const SmemDesc k_desc = desc_of(sm.k + wg * 64 * 128, 16);
      const SmemDesc v_desc = desc_of(sm.v + wg * 64 * 128, 16);
      // dQ's B operand: the K tile read MN-major (head-dim columns contiguous); at head_dim 128 this warpgroup's
      // 64-column block, at 64 the only one.
      const SmemDesc k_mn_desc = desc_of(sm.k + (D == 128 ? wg : 0) * BN * 128, BN * 128);

      // S^T = K Q^T and dP^T = V dO^T (this warpgroup's 64 keys x the tile's 64 queries).
      float acc_s[32], acc_dp[32];
      {
        const SmemDesc q_desc = desc_of(q_tile, 16);
        const SmemDesc do_desc = desc_of(do_tile, 16);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
          const uint32_t step = (kk % 4) * 32u;  // 32-byte k-step inside the swizzled 128-byte row
          wgmma_ss_n64<T>(acc_s, k_desc.at((kk / 4) * (BN * 128u) + step), q_desc.at((kk / 4) * (BM * 128u) + step),
                          kk > 0);
        }
        wgmma_commit();
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
          const uint32_t step = (kk % 4) * 32u;
          wgmma_ss_n64<T>(acc_dp, v_desc.at((kk / 4) * (BN * 128u) + step),
                          do_desc.at((kk / 4) * (BM * 128u) + step), kk > 0);
        }
        wgmma_commit();
      }

      // Visibility of this thread's 32 (key, query) pairs, bit 4 i + 2 hf + c: key jkey + 8 hf, query row
      // r0 + 8 i + 2 t4 + c (the accumulator layout of wgmma.cuh with keys as rows).
      uint32_t vis = 0xffffffffu;
      if (MASKED && !info.full) {  // (a full tile reaches the MASKED instance only with the A/B switch off)
        vis = 0;
        const uint64_t bits = (uint64_t(uint32_t(info.bits_hi)) << 32) | uint32_t(info.bits_lo);
#pragma unroll
        for (int i = 0; i < 8; ++i)
#pragma unroll
          for (int hf = 0; hf < 2; ++hf)
#pragma unroll
            for (int c = 0; c < 2; ++c) {
              const int rr = 8 * i + 2 * t4 + c, r = r0 + rr, j = jkey + 8 * hf;
              const int ipos = r + seq.offset;
              bool v = j < len_k && r < r_end && j <= ipos;
              if (mode == kStream) v = v && (j < p.sink || ipos - j < p.window);
              else if (mode == kBlock) v = v && ((bits >> rr) & 1u);
              vis |= v ? 1u << (4 * i + 2 * hf + c) : 0u;
            }
      }

      uint32_t ds_frag[BM / 16][4];
      float2 lse_pre[8];
      if constexpr (Tr::OVERLAP) {
#pragma unroll
        for (int i = 0; i < 8; ++i) lse_pre[i] = *reinterpret_cast<const float2*>(s_lse2 + 8 * i + 2 * t4);
      }
      wgmma_wait<1>();  // S^T ready (DEFER: and the previous stage's dK, an older group)
      fence_regs(acc_s);
      if constexpr (Tr::DEFER) {
        fence_regs(acc_dk);
        if (held_slot >= 0) release(sm.empty(held_slot));
      }
      if constexpr (Tr::OVERLAP) bwd_probs_pre<MASKED>(acc_s, lse_pre, p.scale_log2, vis);
      else bwd_probs<MASKED, Tr::ROWS_T4>(acc_s, s_lse2, t4, p.scale_log2, vis);
      // P^T as register A fragments (k = query columns 16 kk .. 16 kk + 15); dV += P^T dO runs while dS is computed.
      // B operands (dO, Q) are read MN-major: query rows are k, head dims N.
      const SmemDesc do_mn = desc_of(do_tile, BM * 128);
      const SmemDesc q_mn = desc_of(q_tile, BM * 128);
      uint32_t p_frag[BM / 16][4];
#pragma unroll
      for (int kk = 0; kk < BM / 16; ++kk)
#pragma unroll
        for (int x = 0; x < 4; ++x) p_frag[kk][x] = Op::pack(acc_s[8 * kk + 2 * x], acc_s[8 * kk + 2 * x + 1]);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < BM / 16; ++kk) {
        if constexpr (D == 128) wgmma_rs_n128_mn<T>(acc_dv, p_frag[kk], do_mn.at(kk * 16 * 128u));
        else wgmma_rs_n64_mn<T>(acc_dv, p_frag[kk], do_mn.at(kk * 16 * 128u));
      }
      wgmma_commit();

      float2 delta_pre[4];
      if constexpr (Tr::OVERLAP) {
#pragma unroll
        for (int i = 0; i < 4; ++i) delta_pre[i] = *reinterpret_cast<const float2*>(s_delta + 8 * i + 2 * t4);
      }
      wgmma_wait<1>();  // dP^T ready (dV still running)
      fence_regs(acc_dp);
      if constexpr (Tr::OVERLAP) bwd_dscores_pre<MASKED>(acc_dp, acc_s, delta_pre, s_delta, t4, vis);
      else bwd_dscores<MASKED, Tr::ROWS_T4>(acc_dp, acc_s, s_delta, t4, vis);
#pragma unroll
      for (int kk = 0; kk < BM / 16; ++kk)
#pragma unroll
        for (int x = 0; x < 4; ++x) ds_frag[kk][x] = Op::pack(acc_dp[8 * kk + 2 * x], acc_dp[8 * kk + 2 * x + 1]);
      if constexpr (Tr::OVERLAP) {
        bwd_stage_tail_overlap<T, Tr>(p, maps, sm, ub, base, b, seq, wg, warp, lane, it, h, r0, ds_frag, p_frag,
                                      acc_dk, acc_dv, q_mn, k_mn_desc);
        if constexpr (Tr::DEFER) held_slot = slot;  // released at the next stage's wait for S
        else release(sm.empty(slot));
        return;
      }
      // dK += dS^T Q.
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < BM / 16; ++kk) {
        if constexpr (D == 128) wgmma_rs_n128_mn<T>(acc_dk, ds_frag[kk], q_mn.at(kk * 16 * 128u));
        else wgmma_rs_n64_mn<T>(acc_dk, ds_frag[kk], q_mn.at(kk * 16 * 128u));
      }
      wgmma_commit();

      // dS^T [128 keys x 64 queries] into the 128-byte-swizzled buffer of this step's parity (row = key: 128 bytes
      // of query columns, 16-byte chunk q / 8 XOR-ed with row % 8). Fragment x: rows g / g + 8 (x odd), chunks
      // 2 kk / 2 kk + 1 (x >= 2).
      const uint32_t ds_tile = sm.ds_buf(it & 1);
      if constexpr (Tr::LEAN) {
        // stmatrix kk stores ds_frag[kk] (matrix x: rows 8 (x & 1) .. + 7 of this warp's 16 keys, 16-byte chunk
        // 2 kk + (x >> 1); lane 8 x + r addresses row r of matrix x). The chunk (2 kk + (x >> 1)) ^ r is
        // ((x >> 1) ^ r) ^ 2 kk, and ds_tile is 1024-byte aligned: one XOR of the lane's address by kk << 5 per kk.
        const int mx = lane >> 3, r = lane & 7;
        const uint32_t lane_addr =
            ds_tile + uint32_t(64 * wg + 16 * warp + 8 * (mx & 1) + r) * 128u + uint32_t(((mx >> 1) ^ r) << 4);
#pragma unroll
        for (int kk = 0; kk < BM / 16; ++kk) stmatrix_x4(lane_addr ^ uint32_t(kk << 5), ds_frag[kk]);
      } else {
#pragma unroll
        for (int kk = 0; kk < BM / 16; ++kk)
#pragma unroll
          for (int x = 0; x < 4; ++x) {
            const int row = key_row + 8 * (x & 1), chunk = 2 * kk + (x >> 1);
            const uint32_t addr = ds_tile + row * 128 + ((chunk ^ (row & 7)) << 4) + t4 * 4;
            asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(addr), "r"(ds_frag[kk][x]) : "memory");
          }
      }
      fence_proxy_async();  // generic stores, read next by wgmma (async proxy)
      // Head_dim 128: both warpgroups' dS^T rows are read (named barrier 1 over the 256 consumer threads); 64: only
      // this warpgroup's (barrier 1 + wg over its 128). The double buffer makes a second barrier unnecessary: a
      // warpgroup rewrites buffer it & 1 only after the barrier of step it + 1, which the other passes after its
      // step-it dQ MMAs completed.
      if constexpr (D == 128) asm volatile("bar.sync 1, 256;\n" ::: "memory");
      else if (wg == 0) asm volatile("bar.sync 1, 128;\n" ::: "memory");
      else asm volatile("bar.sync 2, 128;\n" ::: "memory");

      // dQ (= dS K, unscaled) for 64 query rows x 64 head-dim columns.
      float acc_dq[32];
      {
        const SmemDesc ds_desc = desc_of(ds_tile, BN * 128);
        wgmma_fence();
        constexpr int KSTEPS = D == 128 ? BN / 16 : 4;
#pragma unroll
        for (int kk = 0; kk < KSTEPS; ++kk) {
          const int ka = D == 128 ? kk : 4 * wg + kk;  // key rows 16 ka .. 16 ka + 15
          wgmma_ss_n64_tt<T>(acc_dq, ds_desc.at(ka * 16 * 128u), k_mn_desc.at(ka * 16 * 128u), kk > 0);
        }
        wgmma_commit();
      }
      if constexpr (Tr::EARLY_RELEASE) {
        wgmma_wait<1>();  // dV, dK done (groups complete in order; dQ, the last, may run on): Q and dO are not read
        fence_regs(acc_dv);
        fence_regs(acc_dk);
        fence_regs(p_frag);
        fence_regs(ds_frag);
        release(sm.empty(slot));
        wgmma_wait<0>();
        fence_regs(acc_dq);
      } else {
        wgmma_wait<0>();  // dV, dK, dQ done: Q and dO of the stage are no longer read
        fence_regs(acc_dv);
        fence_regs(acc_dk);
        fence_regs(acc_dq);
        fence_regs(p_frag);
        fence_regs(ds_frag);
        release(sm.empty(slot));
      }

      // dQ rows 16 warp + g (+ 8), columns 8 i + 2 t4 (+1) of this warpgroup's block.
      if constexpr (Tr::DQ_TMA) {
        // Staging tile: two 128-byte-swizzled boxes of 32 columns x 64 rows (TMA reads the swizzle; a warp's float2
        // stores then spread over all banks). Rows past the sequence (a varlen box runs into the next one) hold +-0
        // without a select: their dS is masked to 0 and K is finite (non-finite rows zeroed), so dQ = dS K is a sum of
        // zeros there, and x + (-0) == x for every x. (The select cost 32 FSEL per warp and stage.)
        const uint32_t stage = sm.dq + ((Tr::DQ_BUFS == 2 ? (it & 1) * Tr::CONSUMER_WGS : 0) + wg) * Tr::DQ_WG_BYTES;
        const bool leader = threadIdx.x % Tr::WG_THREADS == 0;
        if constexpr (!Tr::LEAN) {
          if (leader) bulk_wait_group_read0();  // the previous step's reduce has read the tile
          if (wg == 0) asm volatile("bar.sync 3, 128;\n" ::: "memory");
          else asm volatile("bar.sync 4, 128;\n" ::: "memory");
        }
        if constexpr (Tr::LEAN) {
          // The same addresses: row & 7 == g for both halves, chunk ^ g = (2 (i % 4)) ^ (t4 / 2 ^ g), and `stage` is
          // 1024-byte aligned, so the XOR by (i % 4) << 5 acts on the whole address; box i / 4 and half hf are adds.
          // BANKS: in step i4 this lane stores column block i % 4 = i4 ^ perm instead of i4 (dq_stage_perm), i.e. its
          // address is XOR-ed by perm << 5 once and its values are taken through dq_stage_permute's selects.
          const uint32_t perm = Tr::BANKS ? dq_stage_perm(g) : 0u;
          const uint32_t thread_addr =
              (stage + uint32_t(16 * warp + g) * 128u + uint32_t(((t4 / 2) ^ g) << 4) + uint32_t(t4 & 1) * 8u) ^
              (perm << 5);
          // vals[box][hf][i4]: the column pair of column block i % 4 = i4 (BANKS: i4 ^ perm) of box `box`, half `hf`.
          float2 vals[2][2][4];
#pragma unroll
          for (int box = 0; box < 2; ++box)
#pragma unroll
            for (int hf = 0; hf < 2; ++hf) {
#pragma unroll
              for (int i4 = 0; i4 < 4; ++i4) {
                const int i = 4 * box + i4;
                vals[box][hf][i4] = make_float2(acc_dq[4 * i + 2 * hf], acc_dq[4 * i + 2 * hf + 1]);
              }
              if constexpr (Tr::BANKS) dq_stage_permute(vals[box][hf], perm);
            }
#pragma unroll
          for (int i4 = 0; i4 < 4; ++i4) {
            const uint32_t col_addr = thread_addr ^ uint32_t(i4 << 5);
#pragma unroll
            for (int box = 0; box < 2; ++box)
#pragma unroll
              for (int hf = 0; hf < 2; ++hf)
                asm volatile("st.shared.v2.f32 [%0], {%1, %2};\n" ::"r"(col_addr + uint32_t(box * BM * 128 + hf * 1024)),
                             "f"(vals[box][hf][i4].x), "f"(vals[box][hf][i4].y)
                             : "memory");
          }
        } else {
#pragma unroll
          for (int hf = 0; hf < 2; ++hf) {
            const int row = 16 * warp + g + 8 * hf;
#pragma unroll
            for (int i = 0; i < 8; ++i) {
              const int chunk = 2 * (i % 4) + t4 / 2;  // 16-byte chunk of columns 8 (i % 4) + 2 t4 inside the box
              const uint32_t addr =
                  stage + (i / 4) * (BM * 128) + row * 128 + ((chunk ^ (row & 7)) << 4) + (t4 & 1) * 8;
              asm volatile("st.shared.v2.f32 [%0], {%1, %2};\n" ::"r"(addr),
                           "f"(acc_dq[4 * i + 2 * hf]), "f"(acc_dq[4 * i + 2 * hf + 1])
                           : "memory");
            }
          }
        }
        fence_proxy_async();  // generic stores, read next by the copy engine
        if (wg == 0) asm volatile("bar.sync 3, 128;\n" ::: "memory");
        else asm volatile("bar.sync 4, 128;\n" ::: "memory");
        if (leader) {
          const int col0 = D == 128 ? 64 * wg : 0;
          const int bt = p.cu_seqlens_q != nullptr ? 0 : b;
#pragma unroll
          for (int box = 0; box < 2; ++box)
            tma_reduce_add_4d(&maps.dq, stage + box * (BM * 128), col0 + 32 * box, seq.q_start + r0, h, bt);
          bulk_commit_group();
          // LEAN: the other buffer's reduce (the step before) has read it once this returns; the next step's dS
          // barrier passes that on to the warpgroup (see BwdSm90Traits).
          if constexpr (Tr::LEAN) bulk_wait_group_read<1>();
        }
      } else {
        // Deterministic mode: this warpgroup's turn on the tile's counter. Head_dim 128: warpgroup w owns columns
        // [64 w, 64 w + 64) and counter w, whose writers are the visiting key tiles in order (token n + 1 after key tile
        // n). Head_dim 64: both warpgroups add whole rows (each over its own 64 keys) on counter 0, warpgroup 0 then 1
        // (tokens 2 n + 1, 2 n + 2). No deadlock: a CTA waits only for CTAs of lower key tiles, which the grid
        // (attention_bwd_sm90_order.cuh) starts earlier, so the lowest unfinished CTA never waits.
        [[maybe_unused]] const bool leader = threadIdx.x % Tr::WG_THREADS == 0;  // (used by DET instances only)
        int* sem = nullptr;
        int token = 0;
        if constexpr (Tr::DET) {
          sem = p.dq_sem + ((int64_t(b) * p.heads_q + h) * p.dq_sem_tiles + r0 / BM) * 2 + (D == 128 ? wg : 0);
          const int want = D == 128 ? info.prev_n + 1 : (wg == 0 ? 2 * info.prev_n + 2 : 2 * n_block + 1);
          token = D == 128 ? n_block + 1 : 2 * n_block + 1 + wg;
          if (leader) {
            // First hand on the tile of this warpgroup's previous stage (held since its adds were issued): those adds
            // are ordered before this thread by the dS barrier of this stage (bar 1 over every thread that added),
            // and by now they have mostly completed, so the fence rarely waits. Releasing a stage late instead of
            // fencing right after its adds keeps the round trip of the adds off this warpgroup's critical path;
            // releasing it before waiting for this stage's turn keeps the order deadlock-free.
            if (held_sem >= 0) {
              __threadfence();
              asm volatile("st.release.gpu.global.b32 [%0], %1;\n" ::"l"(p.dq_sem + held_sem), "r"(held_token)
                           : "memory");
            }
            // A wait that never ends would mean a bug in the turn order (prev_n): fail loudly after ~10 s instead of
            // hanging the device (a normal wait is a few microseconds: the previous key tile's CTA runs alongside).
            for (uint32_t spins = 0;; ++spins) {
              int seen;
              asm volatile("ld.acquire.gpu.global.b32 %0, [%1];\n" : "=r"(seen) : "l"(sem) : "memory");
              if (seen == want) break;
              if (spins == (1u << 26)) __trap();  // (a printf here made ptxas serialize the loop's wgmma)
              __nanosleep(128);
            }
          }
          if (wg == 0) asm volatile("bar.sync 3, 128;\n" ::: "memory");
          else asm volatile("bar.sync 4, 128;\n" ::: "memory");
        }
        float* dqa = p.dq_accum + b * p.dqa_stride_b + int64_t(seq.q_start + r0) * p.dqa_stride_r + h * p.dqa_stride_h +
                     (D == 128 ? 64 * wg : 0);
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          const int row = 16 * warp + g + 8 * hf;
          if (MASKED && r0 + row >= r_end) continue;
          float* drow = dqa + int64_t(row) * p.dqa_stride_r + 2 * t4;
#pragma unroll
          for (int i = 0; i < 8; ++i) {
            asm volatile("red.relaxed.gpu.global.add.v2.f32 [%0], {%1, %2};\n" ::"l"(drow + 8 * i),
                         "f"(acc_dq[4 * i + 2 * hf]), "f"(acc_dq[4 * i + 2 * hf + 1])
                         : "memory");
          }
        }
        if constexpr (Tr::DET) {
          held_sem = static_cast<int>(sem - p.dq_sem);  // handed on at the next stage, or after the walk
          held_token = token;
        }
      }
    };
    if (info.full && p.sm90_bwd_unmasked) stage(std::false_type{});
    else stage(std::true_type{});
    return true;
  };
  if constexpr (Tr::LEAN) {
    // The ring's slots unrolled: slot, its phase's parity and the dS^T buffer (it & 1 == slot with 2 slots) are
    // compile-time in each copy, so the stage's descriptors are the shared base plus constants instead of being
    // rebuilt from a run-time slot index (IMAD / LOP3 / R2UR per stage), and the ring advance disappears.
    static_assert(Tr::STAGES == 2, "the unrolled ring of the lean stage has 2 slots (TMA dQ)");
    for (int phase = 0;; phase ^= 1) {
      if (!step(0, phase, 0)) break;
      if (!step(1, phase, 1)) break;
    }
  } else {
    RingPos<Tr::STAGES> pos;
    for (int it = 0;; ++it) {
      if (!step(pos.slot, pos.phase, it)) break;
      pos.advance();
    }
  }
  if constexpr (Tr::DEFER) {  // the last stage's dK (its slot is not released: the producer has finished)
    wgmma_wait<0>();
    fence_regs(acc_dk);
  }
  if constexpr (Tr::DQ_TMA) {  // the staging tile outlives its last read (OVERLAP: every warp's lane 0 issued some)
    if (Tr::OVERLAP ? lane == 0 : threadIdx.x % Tr::WG_THREADS == 0) bulk_wait_group_read0();
  }
  if constexpr (Tr::DET) {
    if (wg == 0) asm volatile("bar.sync 3, 128;\n" ::: "memory");  // every thread's last adds before the release
    else asm volatile("bar.sync 4, 128;\n" ::: "memory");
    if (threadIdx.x % Tr::WG_THREADS == 0 && held_sem >= 0) {
      __threadfence();
      asm volatile("st.release.gpu.global.b32 [%0], %1;\n" ::"l"(p.dq_sem + held_sem), "r"(held_token) : "memory");
    }
  }

  // dK (scaled) and dV of this thread's key rows.
  T* dk = static_cast<T*>(p.dk) + b * p.dk_stride_b + int64_t(seq.k_start) * p.dk_stride_r + kvh * p.dk_stride_h;
  T* dv = static_cast<T*>(p.dv) + b * p.dv_stride_b + int64_t(seq.k_start) * p.dv_stride_r + kvh * p.dv_stride_h;
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    const int j = jkey + 8 * hf;
    if (j >= len_k) continue;
    T* dkr = dk + int64_t(j) * p.dk_stride_r + 2 * t4;
    T* dvr = dv + int64_t(j) * p.dv_stride_r + 2 * t4;
#pragma unroll
    for (int i = 0; i < D / 8; ++i) {
      *reinterpret_cast<uint32_t*>(dkr + 8 * i) =
          Op::pack(acc_dk[4 * i + 2 * hf] * p.scale, acc_dk[4 * i + 2 * hf + 1] * p.scale);
      *reinterpret_cast<uint32_t*>(dvr + 8 * i) = Op::pack(acc_dv[4 * i + 2 * hf], acc_dv[4 * i + 2 * hf + 1]);
    }
  }
}

#endif  // ELASTIC_SM90A_ENABLED

// grid: B x Hkv x key tiles of BN, one dimension (attention_bwd_sm90_order.cuh). `maps`: the tensor maps of q,
// dout, k, v (the host launches this kernel only when all four could be built).
template <typename T, typename Tr>
__global__ void __launch_bounds__(Tr::NTHREADS, 1)
    attention_bwd_sm90_kernel(const __grid_constant__ AttentionBwdParams p, const __grid_constant__ BwdTmaMaps maps,
                              int num_k_tiles) {
#if defined(ELASTIC_SM90A_ENABLED)
  constexpr int BN = Tr::BN, D = Tr::D;
  const BwdWorkItem work = bwd_work_item(p, num_k_tiles);
  const int kvh = work.kvh, b = work.b, n_block = work.n_block;
  const SeqInfo seq = seq_info(p, b);
  const int j0 = n_block * BN;
  if (j0 >= seq.len_k) return;
  const int mode = p.head_mode[b * p.head_mode_stride_b + kvh * p.head_mode_stride_h];
  if (!bwd_work_runs_here<BN>(p, work, mode, num_k_tiles)) return;
  if (!mode_is_valid(mode, p)) {  // invalid mode: NaN gradients for the head's keys, like its output
    const int valid_k = min(BN, seq.len_k - j0);
    T* dk = static_cast<T*>(p.dk) + b * p.dk_stride_b + int64_t(seq.k_start + j0) * p.dk_stride_r +
            kvh * p.dk_stride_h;
    T* dv = static_cast<T*>(p.dv) + b * p.dv_stride_b + int64_t(seq.k_start + j0) * p.dv_stride_r +
            kvh * p.dv_stride_h;
    const T nan = to_elem<T>(NAN);
    for (int idx = threadIdx.x; idx < valid_k * D; idx += Tr::NTHREADS) {
      dk[int64_t(idx / D) * p.dk_stride_r + idx % D] = nan;
      dv[int64_t(idx / D) * p.dv_stride_r + idx % D] = nan;
    }
    return;
  }

  extern __shared__ unsigned char smem_raw[];
  const uint32_t raw = mma::smem_addr(smem_raw);
  const uint32_t base = (raw + 1023u) & ~1023u;  // the 128-byte swizzle is a function of address bits [4, 10)
  unsigned char* gbase = smem_raw + (base - raw);
  BwdSmem<Tr> sm;
  sm.k = base;
  sm.v = sm.k + Tr::KV_BYTES;
  sm.qdo = sm.v + Tr::KV_BYTES;
  sm.ds = sm.qdo + Tr::STAGES * 2 * Tr::QT_BYTES;
  sm.dq = sm.ds + 2 * Tr::DS_BYTES;
  sm.meta = sm.dq + (Tr::DQ_TMA ? Tr::CONSUMER_WGS * Tr::DQ_WG_BYTES * Tr::DQ_BUFS : 0);
  sm.bar = sm.meta + Tr::STAGES * Tr::META_BYTES;
  if (threadIdx.x == 0) {
    mbar_init(sm.kv_full(), 32);
    for (int s = 0; s < Tr::STAGES; ++s) {
      mbar_init(sm.full(s), 32);
      mbar_init(sm.empty(s), Tr::CONSUMER_WGS * 4);
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");  // visible to the copy engine too
  }
  __syncthreads();

  if (threadIdx.x < Tr::WG_THREADS) {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(Tr::PRODUCER_REGS));
    if (threadIdx.x < 32) bwd_producer<T, Tr>(p, maps, sm, gbase, base, b, kvh, n_block, mode, seq);
  } else {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(Tr::CONSUMER_REGS));
    bwd_consumer<T, Tr>(p, maps, sm, gbase, base, b, kvh, n_block, mode, seq);
  }
#else
  mark_not_sm90a();  // not an sm_90a pass: no wgmma (sm90a_available.h)
#endif
}

}  // namespace sm90
}  // namespace elastic
