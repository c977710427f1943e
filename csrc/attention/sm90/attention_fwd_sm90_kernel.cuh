// Hopper (sm_90a) forward kernel of the fused strategy for FULL, STREAM and BLOCK heads: warpgroup MMA
// (wgmma) with a warp-specialised K/V pipeline, after FlashAttention-3's schedule. Same semantics and parameters
// as attention_fwd_kernel.cuh (work item = (query tile, query head, batch), head_mode read on the device,
// GQA, varlen, Sq <= Skv, lse, skip_full_heads, empty rows 0 / -inf, invalid modes NaN). BLOCK heads walk only
// the key tiles whose mask bit is set for the query tile's row blocks (the host sends masks here only when
// block_size % 128 == 0, so a key tile is one mask column); element masks only on tiles not fully visible.
//
// CTA = 3 warpgroups walking work items (longest first; a persistent grid of one CTA per SM by default, items
// handed out dynamically). Warpgroup 0 is the producer (attention_fwd_sm90_pipeline.cuh): per item it loads
// the Q tile, then the K and V tiles of the key tiles the head's mode can make visible (attention_tiles.cuh
// walk, last tile first) into a ring of STAGES shared-memory slots, with TMA (one warp) or cp.async (the
// warpgroup), each slot signalled on an mbarrier when its bytes land, with the slot's key tile index and whether
// it is fully visible and the item's last in a word beside it (SLOT_TILES instances, the default; otherwise each
// consumer walks the tiles again). Warpgroups 1 and 2 are consumers, each
// owning 64 of the 128 query rows: S = Q K^T and O += P V run as wgmma, and the softmax of key tile n overlaps
// the P V product of tile n-1 (both MMAs are issued before the softmax waits for S only); the two warpgroups
// take turns to issue (ping-pong). Consumers hand K / V slots and the Q buffer back on "empty" mbarriers once
// their MMAs have read them, so the next item's loads overlap this item's tail. setmaxnreg moves registers
// from the producer (address arithmetic only) to the consumers.
//
// Shared tiles are 128-byte rows (64 elements of 16 bits) in 1024-byte atoms of 8 rows, 16-byte chunks
// XOR-swizzled by (row % 8): the wgmma "128B swizzle" layout. A head_dim-128 tile is two such column
// blocks, one after the other.
#pragma once
#include <cmath>

#include "attention/attention_params.h"
#include "attention/attention_tiles.cuh"
#include "attention/kernel_utils.cuh"
#include "attention/nonfinite.cuh"
#include "attention/sm90/attention_fwd_sm90_pipeline.cuh"
#include "attention/sm90/sm90a_available.h"
#include "attention/sm90/wgmma.cuh"

namespace elastic {
namespace sm90 {

#if defined(ELASTIC_SM90A_ENABLED)

// S = Q K^T for this warpgroup's 64 rows over one key tile: D / 16 wgmma k-steps.
template <typename T, typename Tr>
__device__ __forceinline__ void issue_qk(float (&acc_s)[Tr::BN / 2], const SmemDesc& q_desc, uint32_t k_tile) {
  const SmemDesc k_desc = smem_desc_b128_split(k_tile, 16, 1024);
#pragma unroll
  for (int kk = 0; kk < Tr::D / 16; ++kk) {
    // Column block kk / 4 (ROWS 128-byte rows each), then the 32-byte k-step inside the swizzled row; the
    // hardware applies the XOR swizzle to the final address, so a start offset inside the atom is legal.
    const uint32_t step = (kk % 4) * 32u;
    wgmma_ss_n128<T>(acc_s, q_desc.at((kk / 4) * (Tr::BM * 128u) + step),
                     k_desc.at((kk / 4) * (Tr::BN * 128u) + step), kk > 0);
  }
}

// O += P V over one key tile: BN / 16 k-steps of 16 keys; V is read MN-major (its head dims are N).
template <typename T, typename Tr>
__device__ __forceinline__ void issue_pv(float (&acc_o)[Tr::D / 2], const uint32_t (&p_frag)[Tr::BN / 16][4],
                                         uint32_t v_tile) {
  const SmemDesc v_desc = smem_desc_b128_split(v_tile, Tr::BN * 128u, 1024);
#pragma unroll
  for (int kk = 0; kk < Tr::BN / 16; ++kk) {
    if constexpr (Tr::D == 128) wgmma_rs_n128_mn<T>(acc_o, p_frag[kk], v_desc.at(kk * 16 * 128u));
    else wgmma_rs_n64_mn<T>(acc_o, p_frag[kk], v_desc.at(kk * 16 * 128u));
  }
}

// Non-finite rule, rare path (nonfinite.cuh): before P V reads the V tile of key tile n, zero its flagged rows.
// Both consumer warpgroups read the slot and both zero it (each before its own P V; the second writes zeros over
// zeros, and the producer refills the slot only after both released it). The generic stores are fenced into the
// async proxy and the warpgroup syncs on its own named barrier (14 + wg) before any of its warps issues wgmma.
// (Out of line, arguments by value: the finite path keeps only the call's branch in the key loop.)
template <typename Tr>
__device__ __noinline__ void nonfinite_zero_v(nonfinite::KvFlags kv, int n, uint32_t v_tile, int wg) {
  uint32_t m[Tr::BN / 32];
  kv.tile<Tr::BN>(n, m);
  if (!nonfinite::any_bit(m)) return;  // same words in every thread: a uniform exit
  nonfinite::zero_rows_sw128<Tr::BN, Tr::D>(v_tile, Tr::BN * 128u, m, threadIdx.x % Tr::WG_THREADS, Tr::WG_THREADS);
  fence_proxy_async();
  asm volatile("bar.sync %0, %1;\n" ::"r"(14 + wg), "n"(Tr::WG_THREADS) : "memory");
}

// Rare path: bit hf set when this thread's row pos0 + 8 hf sees a flagged key of key tile n among its columns;
// block_bits: bit hf = the row's mask bit for this key tile (BLOCK heads).
template <typename Tr>
__device__ __noinline__ uint32_t nonfinite_rows_seeing(nonfinite::KvFlags kv, int n, int pos0, int t4, int mode,
                                                       int len_k, int sink, int window, uint32_t block_bits) {
  uint32_t m[Tr::BN / 32];
  kv.tile<Tr::BN>(n, m);
  uint32_t rows = 0u;
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    const bool hit = nonfinite::sees_flagged_key<Tr::BN>(m, pos0 + 8 * hf, n * Tr::BN, t4, mode, len_k, sink, window,
                                                         (block_bits >> hf) & 1u);
    if (hit) rows |= 1u << hf;
  }
  return rows;
}

// Ping-pong of the two consumer warpgroups (named barriers 1 and 2): a warpgroup issues its MMAs only
// after the other one issued its own, so one warpgroup's softmax runs while the other's MMAs use the
// tensor cores.
struct PingPong {
  bool on;
  int wg;
  __device__ __forceinline__ void my_turn() const {
    if (on) asm volatile("bar.sync %0, 256;\n" ::"r"(1 + wg) : "memory");
  }
  __device__ __forceinline__ void pass_turn() const {
    if (on) asm volatile("bar.arrive %0, 256;\n" ::"r"(2 - wg) : "memory");
  }
};

// Key-loop orders of the consumers (a kernel instance each, see attention_fwd_sm90_kernel):
//  kLoopDefault: the whole softmax of tile n overlaps P V(n-1); the O rescale (lazy: only when a row of the warp
//    moved its max) and the P packing follow P V's wait in series. The proven path.
//  kLoopPvFirst (ELASTIC_SM90_PV_WAIT_FIRST=1, FlashAttention-4's order): the max phase (mask, row max, alpha,
//    x = s * c - m) overlaps P V(n-1), then the loop waits for P V(n-1), and the exp2 stretch writes the P fragments
//    as it goes: the 32 F2FP fill gaps between the MUFU.EX2, which issue one per ~8 cycles per warp.
//  kLoopPvFirstEager (and ELASTIC_SM90_LAZY_RESCALE=0): the same with the O rescale unconditional and branch-free,
//    so ptxas can put its 64 FMUL into the same gaps (FA4 does; no vote and branch on the path). alpha is exactly 1
//    for rows whose max stayed (exact alpha), so every order gives the same bits.
//  (A fourth order, the default with P(n) packed into a second register buffer among the exps before P V(n-1)'s
//    wait, ran 1-4% slower on the H200 at 8K-128K dense and all-BLOCK 32K and was removed: benchmarks/NOTES.md,
//    "P packed early".)
// ncu, 32K dense (2026-12-02): FA4's loop has as many warp instructions per tile as ours (469 vs 471) but 11% fewer
// stall samples; its exp stretch holds the 32 F2FP and 64 FMUL; ours had 19.7K "wait" samples on the F2FP after the
// exps against FA4's 2.0K. (The constants are in attention_fwd_sm90_pipeline.cuh, beside the kernel flags.)

template <typename T, typename Tr, int kLoop>
__device__ void fwd_consumer(const AttentionFwdParams& p, const SmemLayout<Tr>& sm, int num_q_tiles,
                             int64_t num_items, unsigned flags) {
  constexpr int BM = Tr::BM, BN = Tr::BN, D = Tr::D, NS = BN / 2, NO = D / 2;
  constexpr bool kPvWaitFirst = kLoop != kLoopDefault, kEagerRescale = kLoop == kLoopPvFirstEager;
  using Op = mma::MmaOp<T>;
  // Consumer warpgroup: rows [64 wg, 64 wg + 64); read through a shuffle so the compiler sees a warp-uniform
  // value and keeps the Q descriptor in uniform registers.
  const int wg = __shfl_sync(0xffffffffu, static_cast<int>(threadIdx.x / Tr::WG_THREADS) - 1, 0);
  const int warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32;
  const int g = lane / 4, t4 = lane % 4;
  const int row_in_tile = 64 * wg + 16 * warp + g;  // and row_in_tile + 8
  const SmemDesc q_desc = smem_desc_b128_split(sm.q + wg * 64 * 128, 16, 1024);
  const PingPong turns{(flags & kFlagPingPong) != 0, wg};
  // The cp.async writes (generic proxy) of a slot are ordered before this thread's wgmma reads of it (async
  // proxy), as the PTX memory model asks; CUTLASS's cp.async + GMMA mainloops go without (A/B switch). TMA
  // writes through the async proxy, and the TMA producer fences its own cp.async fallback tiles.
  const bool with_proxy_fence = (flags & kFlagProxyFence) != 0 && (flags & kFlagTma) == 0;
  // O is rescaled only when some row of the warp raised its max (alpha != 1): skipping a product by exactly 1
  // changes no bit, and deep in a long row the max rarely moves.
  const bool lazy_rescale = (flags & kFlagLazyRescale) != 0;
  // When a row's max counts as moved (softmax_max): (m_new - m_old) * scale_log2 > max_slack.
  //  0 (ELASTIC_SM90_EXACT_ALPHA=1, default): alpha is exactly 1 unless the max changed. Before, alpha was
  //    exp2(m_old * c - round(m_new * c)), i.e. exp2 of the product's rounding error when m_new == m_old, not
  //    exactly 1, so the lazy rescale above fired on ~every tile (ncu, 32K dense: 66 FMUL per tile and warp, 64
  //    of them this rescale, as many as MUFU.EX2).
  //  kMaxSlack (ELASTIC_SM90_MAX_SLACK=1): a row keeps its max until a tile's max exceeds it by more than
  //    kMaxSlack in exponent (log2) units, so P <= 2^kMaxSlack and O is rescaled almost never (FlashAttention-4).
  //  -inf (ELASTIC_SM90_EXACT_ALPHA=0): the previous rule, every row "moves" on every tile.
  // One float rather than flag tests, so that ptxas does not unswitch the key loop into two copies of the softmax
  // (it did with boolean flags: 132 MUFU.EX2 in the loop).
  const float max_slack = (flags & kFlagMaxSlack) ? kMaxSlack : (flags & kFlagExactAlpha) ? 0.f : -INFINITY;
  const bool never = (flags & kFlagNever) != 0;
  // BLOCK heads: the query tile's mask row from the walker (once per item) instead of two integer divisions by the
  // block size per tile, twice (fully-visible test and walker.prev), and no division at all for block 128 (SASS:
  // ~120 instructions and 3 MUFU.RCP per BLOCK tile skipped). The producer keeps the per-call walk (registers).
  const bool walk_cached = (flags & kFlagWalkCached) != 0;
  auto proxy_fence = [&]() {
    if (with_proxy_fence) fence_proxy_async();
  };
  if (wg == 1) turns.pass_turn();  // warpgroup 0 issues first

  // One elected lane per warp hands a slot back (the empty barriers count the 8 consumer warps).
  auto release = [&](uint32_t bar) {
    __syncwarp();
    if (lane == 0) mbar_arrive(bar);
  };
  RingPos<Tr::STAGES> cur;
  int q_phase = 0;

  for (int it = 0;; ++it) {
    const ItemRef item = sm.fetch_item(it);
    if (item.idx >= num_items) break;
    KeyTileWalker<BN> walker;
    const WorkItem w = decode_item<BM, BN, Tr::BLOCK_MASK>(p, item, num_q_tiles, walker);
    if (w.kind == WorkItem::kSkip) continue;
    T* out = static_cast<T*>(p.out) + w.b * p.o_stride_b + int64_t(w.seq.q_start) * p.o_stride_r +
             w.h * p.o_stride_h;
    float* lse = p.lse + w.b * p.lse_stride_b + w.h * p.lse_stride_h + w.seq.q_start;
    if (w.kind == WorkItem::kFillNan) {  // invalid mode: NaN
      fill_rows<T, D>(out, p.o_stride_r, lse, w.r0, w.r_end, NAN, NAN, threadIdx.x - Tr::WG_THREADS,
                      Tr::CONSUMER_WGS * Tr::WG_THREADS);
      continue;
    }
    if (w.kind == WorkItem::kFillEmpty) {  // no visible key: 0 and -inf (NaN for non-finite query rows)
      nonfinite::fill_empty_rows<T, D>(out, p.o_stride_r, lse,
                                       static_cast<const T*>(p.q) + w.b * p.q_stride_b +
                                           int64_t(w.seq.q_start) * p.q_stride_r + w.h * p.q_stride_h,
                                       p.q_stride_r, w.r0, w.r_end, threadIdx.x - Tr::WG_THREADS,
                                       Tr::CONSUMER_WGS * Tr::WG_THREADS);
      continue;
    }
    const int mode = w.mode, len_k = w.seq.len_k;
    const int pos0 = w.r0 + row_in_tile + w.seq.offset;  // absolute query positions of the two rows
    // Non-finite rule (nonfinite.cuh): the head's flags (one load per item), and bit hf of nf_rows: row hf of this
    // thread is NaN (its query row, or a flagged key it sees; OR-ed over the quad in the epilogue).
    const nonfinite::KvFlags kv = nonfinite::KvFlags::load(p, w.b, w.kvh);
    uint32_t nf_rows = 0u;
    int n_pv = 0;  // key tile of the P fragments (whose V the next P V reads)

    float acc_o[NO], acc_s[NS];
    uint32_t p_frag[BN / 16][4];
    float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};
#pragma unroll
    for (int i = 0; i < NO; ++i) acc_o[i] = 0.f;

    // Does key tile n need no element mask?
    auto tile_visible = [&](int n) {
      const int j0 = n * BN;
      const BlockBits bb = Tr::BLOCK_MASK ? walker.bb : BlockBits();  // no mask state without a mask
      return visited_tile_fully_visible(mode, w.i_first, w.i_last, j0, j0 + BN - 1, len_k, p.sink, p.window, bb,
                                        walk_cached ? walker.single_rb : kSingleRowUnknown);
    };
    // Max phase of the online softmax (base 2) of key tile n: masks S element-wise unless fully_visible, moves the
    // row maxima, sets alpha (the rescale factor of the rows' previous O and sum) and leaves x = s * scale_log2 - m
    // in acc_s (softmax_exp takes exp2 of it).
    auto softmax_max = [&](int n, bool fully_visible, float (&alpha)[2]) {
      const int j0 = n * BN;
      const BlockBits bb = Tr::BLOCK_MASK ? walker.bb : BlockBits();  // no mask state without a mask
      if (!fully_visible) {
        // key_visible() as per-row column bounds (branch-free, no overflow): key j0 + 2 t4 + jc is visible iff
        // jc < hi && (jc < sink_hi || jc >= win_lo); FULL: win_lo <= 0 keeps every causal key. BLOCK: the tile
        // is one mask column, so a row sees its causal keys iff its bit is set (sink_hi = BN or 0, no window).
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          const int i = pos0 + 8 * hf;
          const int hi = min(i + 1, len_k) - j0 - 2 * t4;
          int sink_hi = min(p.sink, len_k) - j0 - 2 * t4;
          int win_lo = mode == kFull ? -BN : (p.window > i ? 0 : i - p.window + 1) - j0 - 2 * t4;
          if (Tr::BLOCK_MASK && mode == kBlock) {
            sink_hi = bb.bit_of_position(i, j0 / bb.block_size) ? BN : 0;
            win_lo = BN;
          }
#pragma unroll
          for (int nb = 0; nb < BN / 8; ++nb)
#pragma unroll
            for (int c = 0; c < 2; ++c) {
              const int jc = nb * 8 + c;
              if (!(jc < hi && (jc < sink_hi || jc >= win_lo))) acc_s[nb * 4 + 2 * hf + c] = -INFINITY;
            }
        }
      }
      if (kv.any) {  // rare path (nonfinite.cuh): rows that see a flagged key of this tile are NaN
        uint32_t block_bits = 0u;
        if (Tr::BLOCK_MASK && mode == kBlock)
          block_bits = uint32_t(bb.bit_of_position(pos0, j0 / bb.block_size)) |
                       uint32_t(bb.bit_of_position(pos0 + 8, j0 / bb.block_size)) << 1;
        nf_rows |= nonfinite_rows_seeing<Tr>(kv, n, pos0, t4, mode, len_k, p.sink, p.window, block_bits);
      }
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        float mx = row_max[hf];
#pragma unroll
        for (int nb = 0; nb < BN / 8; ++nb) mx = fmaxf(mx, fmaxf(acc_s[nb * 4 + 2 * hf], acc_s[nb * 4 + 2 * hf + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        // mx >= m_old. Both -inf (no visible key yet): NaN > slack is false, not moved; the exps of -inf are 0.
        // A difference that flushes to 0 counts as not moved: P then exceeds 1 by a rounding error, harmless.
        const float m_old = row_max[hf];
        const bool moved = (mx - m_old) * p.scale_log2 > max_slack;
        mx = moved ? mx : m_old;
        const float m_scaled = mx == -INFINITY ? 0.f : mx * p.scale_log2;
        alpha[hf] = moved ? exp2f(m_old * p.scale_log2 - m_scaled) : 1.f;
        row_max[hf] = mx;
#pragma unroll
        for (int nb = 0; nb < BN / 8; ++nb)
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            float& s = acc_s[nb * 4 + 2 * hf + c];
            s = fmaf(s, p.scale_log2, -m_scaled);
          }
      }
    };
    // Exp phase: P = exp2(x) in acc_s, row sums folded in with alpha.
    auto softmax_exp = [&](const float (&alpha)[2]) {
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        float sum = 0.f;
#pragma unroll
        for (int nb = 0; nb < BN / 8; ++nb)
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            float& s = acc_s[nb * 4 + 2 * hf + c];
            s = exp2f(s);
            sum += s;
          }
        row_sum[hf] = row_sum[hf] * alpha[hf] + sum;
      }
    };
    auto rescale_o = [&](const float (&alpha)[2]) {
      if (kEagerRescale || !lazy_rescale || __any_sync(0xffffffffu, alpha[0] != 1.f || alpha[1] != 1.f)) {
#pragma unroll
        for (int i = 0; i < NO; ++i) acc_o[i] *= alpha[(i % 4) / 2];
      }
    };
    auto pack_p = [&]() {
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk) {
        p_frag[kk][0] = Op::pack(acc_s[8 * kk + 0], acc_s[8 * kk + 1]);
        p_frag[kk][1] = Op::pack(acc_s[8 * kk + 2], acc_s[8 * kk + 3]);
        p_frag[kk][2] = Op::pack(acc_s[8 * kk + 4], acc_s[8 * kk + 5]);
        p_frag[kk][3] = Op::pack(acc_s[8 * kk + 6], acc_s[8 * kk + 7]);
      }
    };

    // The key tile n of the K slot at `cur`: from the producer's word (SLOT_TILES: tile index, fully visible, last ->
    // n_next = -1, else 0 as "more to come", the next index arriving with its slot), or walked here.
    int n = 0, n_next = 0;
    bool n_full = false;
    auto read_slot_tile = [&]() {
      const uint32_t word = sm.slot_tile(cur.slot);
      n = static_cast<int>(word & kSlotTileIndex);
      n_full = (word & kSlotTileFull) != 0u;
      n_next = (word & kSlotTileLast) != 0u ? -1 : 0;
    };
    auto visible_of = [&](int n) -> bool {
      if constexpr (Tr::SLOT_TILES) return n_full;
      else return tile_visible(n);
    };
    mbar_wait(sm.q_full(), q_phase);
    q_phase ^= 1;
    if constexpr (!Tr::SLOT_TILES) {
      n = walker.first();
      n_next = walker.prev(n, walk_cached);
    }
    turns.my_turn();
    mbar_wait(sm.k_full(cur.slot), cur.phase);
    if constexpr (Tr::SLOT_TILES) read_slot_tile();
    proxy_fence();
    wgmma_fence();
    issue_qk<T, Tr>(acc_s, q_desc, sm.k_slot(cur.slot));
    wgmma_commit();
    turns.pass_turn();
    {  // non-finite query rows, read from the Q tile while the first S = Q K^T runs (once per item)
      const uint32_t q_row = sm.q + (64 * wg + 16 * warp + g) * 128u;
#pragma unroll
      for (int hf = 0; hf < 2; ++hf)
        if (nonfinite::q_row_part_nonfinite<T, D>(q_row + hf * 8 * 128u, BM * 128u, t4)) nf_rows |= 1u << hf;
    }
    wgmma_wait<0>();
    fence_regs(acc_s);
    release(sm.k_empty(cur.slot));
    if (n_next < 0) release(sm.q_empty());  // last Q K^T of this item: the producer may load the next Q
    {
      float alpha[2];
      softmax_max(n, visible_of(n), alpha);
      softmax_exp(alpha);
    }
    pack_p();
    n_pv = n;

    RingPos<Tr::STAGES> prev = cur;
    cur.advance();
    for (n = n_next; n >= 0; n = n_next) {
      // Issue S(n) = Q K(n)^T and O += P(n_prev) V(n_prev), then do the softmax of S(n) while P V runs.
      turns.my_turn();
      mbar_wait(sm.k_full(cur.slot), cur.phase);
      mbar_wait(sm.v_full(prev.slot), prev.phase);  // landed long ago (loaded right after K(n_prev))
      if constexpr (Tr::SLOT_TILES) read_slot_tile();  // (n was "more to come")
      if (kv.any) nonfinite_zero_v<Tr>(kv, n_pv, sm.v_slot(prev.slot), wg);
      proxy_fence();
      fence_regs(acc_s);
      fence_regs(acc_o);
      fence_regs(p_frag);
      wgmma_fence();
      issue_qk<T, Tr>(acc_s, q_desc, sm.k_slot(cur.slot));
      wgmma_commit();
      issue_pv<T, Tr>(acc_o, p_frag, sm.v_slot(prev.slot));
      wgmma_commit();
      turns.pass_turn();
      // BLOCK heads read mask bits here: their latency hides under the MMAs (SLOT_TILES: the producer walked)
      if constexpr (!Tr::SLOT_TILES) n_next = walker.prev(n, walk_cached);
      float alpha[2];
      if constexpr (kPvWaitFirst) {
        // Nothing between S's wait and the row max but the mask: tile n's visibility test runs under the MMAs (the
        // empty volatile asm keeps it before the wait; SASS of the default order: ~80 stall cycles of uniform
        // tests and a jump table there), and the K / Q slots go back after the max phase.
        int visible = visible_of(n);
        asm volatile("" : "+r"(visible));
        wgmma_wait<1>();  // S(n) ready
        fence_regs(acc_s);
        softmax_max(n, visible != 0, alpha);
        schedule_fence(never, row_max[0], row_max[1]);  // the max phase above overlaps P V
        release(sm.k_empty(cur.slot));
        if (n_next < 0) release(sm.q_empty());
        wgmma_wait<0>();  // P V done: O and the P fragments are free again
        fence_regs(acc_o);
        fence_regs(p_frag);
        release(sm.v_empty(prev.slot));
        rescale_o(alpha);
        softmax_exp(alpha);
      } else {
        wgmma_wait<1>();  // S(n) ready
        fence_regs(acc_s);
        release(sm.k_empty(cur.slot));
        if (n_next < 0) release(sm.q_empty());
        softmax_max(n, visible_of(n), alpha);
        softmax_exp(alpha);
        schedule_fence(never, row_sum[0], row_sum[1]);  // the softmax above overlaps P V
        wgmma_wait<0>();  // P V done: O and the P fragments are free again
        fence_regs(acc_o);
        fence_regs(p_frag);
        release(sm.v_empty(prev.slot));
        rescale_o(alpha);
      }
      pack_p();
      n_pv = n;
      prev = cur;
      cur.advance();
    }
    turns.my_turn();
    mbar_wait(sm.v_full(prev.slot), prev.phase);
    if (kv.any) nonfinite_zero_v<Tr>(kv, n_pv, sm.v_slot(prev.slot), wg);
    proxy_fence();
    fence_regs(acc_o);
    fence_regs(p_frag);
    wgmma_fence();
    issue_pv<T, Tr>(acc_o, p_frag, sm.v_slot(prev.slot));
    wgmma_commit();
    turns.pass_turn();
    wgmma_wait<0>();
    fence_regs(acc_o);
    release(sm.v_empty(prev.slot));

    // Epilogue: normalise, write out and lse (natural log). Rows that saw no key: out 0, lse -inf; rows the
    // non-finite rule marked: NaN and NaN.
    nf_rows = nonfinite::quad_or(nf_rows);
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      float sum = row_sum[hf];
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      sum += __shfl_xor_sync(0xffffffffu, sum, 2);
      const int r = w.r0 + row_in_tile + 8 * hf;
      if (r >= w.r_end) continue;
      const bool nan_row = (nf_rows >> hf) & 1u;
      const float inv = nan_row ? NAN : sum > 0.f ? 1.f / sum : 0.f;
      T* orow = out + int64_t(r) * p.o_stride_r;
#pragma unroll
      for (int nb = 0; nb < D / 8; ++nb) {
        const uint32_t packed = Op::pack(acc_o[nb * 4 + 2 * hf] * inv, acc_o[nb * 4 + 2 * hf + 1] * inv);
        *reinterpret_cast<uint32_t*>(orow + nb * 8 + 2 * t4) = packed;
      }
      if (t4 == 0) lse[r] = nan_row ? NAN : sum > 0.f ? row_max[hf] * p.scale + logf(sum) : -INFINITY;
    }
  }
  if (wg == 0) turns.my_turn();  // consume warpgroup 1's last hand-over: named barriers end balanced
}

#endif  // ELASTIC_SM90A_ENABLED

// grid.x CTAs walk the work items (a fixed stride, or taking the next one from `counter` with kFlagDynamic;
// one each when grid.x is the item count; a persistent grid of one CTA per SM overlaps an item's epilogue
// with the next item's loads). `maps` is read only with kFlagTma.
// kLoop: the consumers' key-loop order (kLoopDefault etc. above fwd_consumer), a kernel instance each: with two
// orders behind a run-time flag in one kernel, ptxas moved the default loop's descriptor and walker values out of
// uniform registers (SASS of the key loop 844 -> 821 instructions, UMOV 41 -> 18, ISETP 166 -> 180), i.e. the
// proven path would no longer be the one measured.
template <typename T, typename Tr, int kLoop = kLoopDefault>
__global__ void __launch_bounds__(Tr::NTHREADS, 1)
    attention_fwd_sm90_kernel(const __grid_constant__ AttentionFwdParams p, const __grid_constant__ TmaMaps maps,
                              int num_q_tiles, int64_t num_items, unsigned flags, unsigned long long* counter) {
#if defined(ELASTIC_SM90A_ENABLED)
  constexpr int D = Tr::D, BM = Tr::BM, BN = Tr::BN;
  extern __shared__ unsigned char smem_raw[];
  // The 128-byte swizzle is a function of shared address bits [4, 10): tiles start 1024-byte aligned.
  const uint32_t raw = mma::smem_addr(smem_raw);
  const uint32_t base = (raw + 1023u) & ~1023u;
  T* sQ = reinterpret_cast<T*>(smem_raw + (base - raw));
  T* sK = sQ + BM * D;
  T* sV = sK + Tr::STAGES * BN * D;
  SmemLayout<Tr> sm;
  sm.q = base;
  sm.k = base + Tr::Q_BYTES;
  sm.v = sm.k + Tr::STAGES * Tr::KV_BYTES;
  sm.bar = sm.v + Tr::STAGES * Tr::KV_BYTES;
  sm.items = sm.bar + Tr::NUM_BARRIERS * 8;
  sm.tiles = sm.items + 2 * 16;
  const bool tma = (flags & kFlagTma) != 0;
  if (threadIdx.x == 0) {
    // Full barriers: one expect-tx arrival per tile (TMA), or one arrival per producer thread (cp.async; K slots
    // with SLOT_TILES one more: thread 0's after it wrote the slot's tile word).
    const int fills = tma ? 1 : Tr::WG_THREADS;
    mbar_init(sm.q_full(), fills);
    mbar_init(sm.q_empty(), Tr::CONSUMER_WGS * 4);
    for (int s = 0; s < Tr::STAGES; ++s) {
      mbar_init(sm.k_full(s), fills + (Tr::SLOT_TILES && !tma ? 1 : 0));
      mbar_init(sm.v_full(s), fills);
      mbar_init(sm.k_empty(s), Tr::CONSUMER_WGS * 4);
      mbar_init(sm.v_empty(s), Tr::CONSUMER_WGS * 4);
    }
    // Item slots: read by the consumer warps and by producer warps 1-3 when they copy (cp.async).
    for (int s = 0; s < 2; ++s) {
      mbar_init(sm.item_full(s), 1);
      mbar_init(sm.item_empty(s), Tr::CONSUMER_WGS * 4 + (tma ? 0 : 3));
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");  // visible to the copy engine too
  }
  __syncthreads();

  if (threadIdx.x < Tr::WG_THREADS) {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(Tr::PRODUCER_REGS));
    fwd_producer<T, Tr>(p, maps, sm, sQ, sK, sV, num_q_tiles, num_items, flags, counter);
  } else {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(Tr::CONSUMER_REGS));
    fwd_consumer<T, Tr, kLoop>(p, sm, num_q_tiles, num_items, flags);
  }
#else
  mark_not_sm90a();  // not an sm_90a pass: no wgmma (sm90a_available.h)
#endif
}

}  // namespace sm90
}  // namespace elastic
