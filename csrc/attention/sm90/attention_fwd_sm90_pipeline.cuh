// Shared-memory pipeline of the Hopper forward kernel (attention_fwd_sm90_kernel.cuh): tile traits and
// kernel flags, the shared-memory map (tiles, mbarriers, work-item ring), work-item decoding, and the
// producer warpgroup that feeds the consumers.
//
// Work items reach every warp through a 2-slot ring in shared memory: producer thread 0 picks the next item
// index (a fixed stride over the grid, or a global atomic counter: items are numbered longest first, so
// taking the next one whenever a CTA frees up balances the load like LPT scheduling), reads its head mode,
// stores both and arrives on the slot's "full" barrier; the other warps read them and hand the slot back on
// its "empty" barrier.
//
// Two producers, picked per launch (kFlagTma): one warp issuing TMA box loads (the tensor maps of
// tma.cuh), or the whole warpgroup copying with cp.async (when no map can be built, or ELASTIC_SM90_TMA=0).
// Both fill the same 128-byte-swizzled tiles and zero-fill key rows past the sequence: TMA does that only at
// the tensor's edge, so a varlen key tile that runs into the next sequence is copied by the TMA warp with
// cp.async instead (garbage V rows times P = 0 would still give NaN when the garbage is Inf or NaN).
#pragma once
#include <cmath>

#include "attention/attention_mma.cuh"
#include "attention/attention_params.h"
#include "attention/attention_tiles.cuh"
#include "attention/nonfinite.cuh"
#include "attention/sm90/tma.cuh"
#include "attention/sm90/wgmma.cuh"

namespace elastic {
namespace sm90 {

// Kernel flags (host switches, see attention_fwd_sm90_launch.cuh).
constexpr unsigned kFlagPingPong = 1, kFlagProxyFence = 2, kFlagTma = 4, kFlagDynamic = 8, kFlagLazyRescale = 16;
constexpr unsigned kFlagExactAlpha = 32, kFlagMaxSlack = 64, kFlagWalkCached = 128;
// max_slack: how far (log2 units) a tile's max may exceed a row's kept max before the row max and O move: P <= 2^8
// keeps bf16 / fp16 P exact to the same relative precision and the fp32 sums far from overflow (FA4 uses 8 too).
constexpr float kMaxSlack = 8.f;
constexpr unsigned kFlagNever = 1u << 31;  // never set: a run-time false the compiler cannot fold (schedule_fence)
// Key-loop orders of the consumers, one kernel instance each (fwd_consumer in attention_fwd_sm90_kernel.cuh).
constexpr int kLoopDefault = 0, kLoopPvFirst = 1, kLoopPvFirstEager = 2;

// BLOCK_MASK: the instance for launches with a block mask (BLOCK heads walk their mask bits). Launches without
// one use the instance without, which carries no mask state: the walker's mask fields do not fit the producer's
// 56 registers (ptxas -v: the BLOCK_MASK instance spills 64 / 88 bytes at D 64 / 128, all of it in the producer
// warpgroup per the SASS, L1-resident; the consumers do not spill), and FULL/STREAM launches stay as they were.
//
// SLOT_TILES: the producer, which walks the key tiles anyway to load them, writes each K slot's tile (index, fully
// visible, last of the item) beside it in shared memory, and the consumers read that word instead of walking the
// tiles themselves (ELASTIC_SM90_SLOT_TILES, kernel_options.h). Why: ncu at 32K with every causal block of every head
// kept (the FULL work through the BLOCK walker) ran 15.32 ms against 12.58 for the FULL launch, 5.30e9 warp
// instructions against 4.18e9, with 17% of the consumers' stall samples at the ping-pong turn against 6.5%: each
// consumer warp's walk (a 16-byte mask load, ~60 instructions unpacking it to bits, the mode tests) sat on the path
// from one warpgroup's S wait to its next MMA issue, which the other warpgroup waits for. After (ncu, same launch):
// 13.87 ms, 4.31e9 instructions, turn 13% (the producer then also walked without the cached mask row; with it, the
// all-BLOCK launch at 31% density went 5.56 -> 4.87 ms at 32K and 82.5 -> 71.3 at 128K, level with FlashAttention-4's
// block-sparse forward: benchmarks/NOTES.md, "Tenth session").
template <typename T, int D_, int STAGES_, bool BLOCK_MASK_ = false, bool SLOT_TILES_ = false>
struct FwdSm90Traits {
  static constexpr int D = D_, BM = 128, BN = 128, STAGES = STAGES_;
  static constexpr bool BLOCK_MASK = BLOCK_MASK_, SLOT_TILES = SLOT_TILES_;
  static constexpr int WG_THREADS = 128, CONSUMER_WGS = BM / 64;
  static constexpr int NTHREADS = WG_THREADS * (1 + CONSUMER_WGS);
  static constexpr int Q_BYTES = BM * D * 2, KV_BYTES = BN * D * 2;
  // Q full/empty; K, V full/empty per slot; work-item ring full/empty x 2.
  static constexpr int NUM_BARRIERS = 2 + 4 * STAGES + 4;
  // 1024: alignment slack; 2 x 16: the work-item slots; SLOT_TILES: 16 for the K slots' tile words (<= 4 slots)
  static constexpr int SMEM_BYTES =
      1024 + Q_BYTES + 2 * STAGES * KV_BYTES + NUM_BARRIERS * 8 + 2 * 16 + (SLOT_TILES ? 16 : 0);
  static_assert(!SLOT_TILES || STAGES <= 4, "tile words of the K slots");
  static_assert(SMEM_BYTES <= 227 * 1024, "shared memory per block");
  // Producer registers: pointers and loop counters only; the consumers hold S, O and P in registers. The
  // sum must fit the pool the CTA got at launch (168 per thread under __launch_bounds__(NTHREADS, 1)),
  // otherwise setmaxnreg.inc waits forever.
  static constexpr int PRODUCER_REGS = 56, CONSUMER_REGS = 224;
  static_assert(D % 64 == 0, "head_dim must be a multiple of 64 (128-byte swizzled rows)");
  static_assert(WG_THREADS * PRODUCER_REGS + CONSUMER_WGS * WG_THREADS * CONSUMER_REGS <= 168 * NTHREADS,
                "register pool");
};

#if defined(ELASTIC_SM90A_ENABLED)

// A work item as handed out: its linear index and its KV head's mode (read from global memory once, by the
// producer, which runs ahead: the consumers start an item without waiting on that load).
struct ItemRef {
  int64_t idx;
  int mode;
};

// The word a SLOT_TILES producer writes beside K slot s: key tile index | kSlotTileFull (no element mask needed:
// visited_tile_fully_visible) | kSlotTileLast (the item's last key tile, walked from the last one down).
constexpr uint32_t kSlotTileFull = 1u << 30, kSlotTileLast = 1u << 31, kSlotTileIndex = kSlotTileFull - 1u;

// Shared-memory addresses of the tiles, barriers, work-item slots and K slots' tile words of one CTA.
template <typename Tr>
struct SmemLayout {
  uint32_t q, k, v, bar, items, tiles;
  __device__ __forceinline__ uint32_t k_slot(int s) const { return k + s * Tr::KV_BYTES; }
  __device__ __forceinline__ uint32_t v_slot(int s) const { return v + s * Tr::KV_BYTES; }
  __device__ __forceinline__ uint32_t q_full() const { return bar; }
  __device__ __forceinline__ uint32_t q_empty() const { return bar + 8; }
  __device__ __forceinline__ uint32_t k_full(int s) const { return bar + 8 * (2 + s); }
  __device__ __forceinline__ uint32_t v_full(int s) const { return bar + 8 * (2 + Tr::STAGES + s); }
  __device__ __forceinline__ uint32_t k_empty(int s) const { return bar + 8 * (2 + 2 * Tr::STAGES + s); }
  __device__ __forceinline__ uint32_t v_empty(int s) const { return bar + 8 * (2 + 3 * Tr::STAGES + s); }
  __device__ __forceinline__ uint32_t item_full(int s) const { return bar + 8 * (2 + 4 * Tr::STAGES + s); }
  __device__ __forceinline__ uint32_t item_empty(int s) const { return bar + 8 * (4 + 4 * Tr::STAGES + s); }

  // SLOT_TILES. The producer's write of slot s's word comes after its wait for the slot to be empty and before its
  // arrival on k_full(s) (the expect-tx arrival of the TMA load, or the cp.async producer thread 0's extra plain
  // arrival): mbarrier arrivals release, so a consumer that saw k_full(s) complete reads this tile's word.
  __device__ __forceinline__ void put_slot_tile(int s, uint32_t word) const {
    asm volatile("st.shared.u32 [%0], %1;\n" ::"r"(tiles + 4 * s), "r"(word) : "memory");
  }
  __device__ __forceinline__ uint32_t slot_tile(int s) const {
    uint32_t word;
    asm volatile("ld.shared.u32 %0, [%1];\n" : "=r"(word) : "r"(tiles + 4 * s) : "memory");
    return word;
  }

  // Producer thread 0: the it-th work item of this CTA (index and head mode) into slot it % 2.
  __device__ __forceinline__ void publish_item(int it, const ItemRef& item) const {
    const int s = it & 1;
    if (it >= 2) mbar_wait(item_empty(s), ((it >> 1) & 1) ^ 1);
    asm volatile("st.shared.s64 [%0], %1;\nst.shared.s32 [%0+8], %2;\n" ::"r"(items + 16 * s), "l"(item.idx),
                 "r"(item.mode)
                 : "memory");
    mbar_arrive(item_full(s));  // release: the stores above are visible to whoever waits on the phase
  }
  // Every other warp (all lanes): read it, then one lane per warp hands the slot back.
  __device__ __forceinline__ ItemRef fetch_item(int it) const {
    const int s = it & 1;
    mbar_wait(item_full(s), (it >> 1) & 1);
    ItemRef item;
    asm volatile("ld.shared.s64 %0, [%2];\nld.shared.s32 %1, [%2+8];\n"
                 : "=l"(item.idx), "=r"(item.mode)
                 : "r"(items + 16 * s)
                 : "memory");
    __syncwarp();
    if (threadIdx.x % 32 == 0) mbar_arrive(item_empty(s));
    return item;
  }
};

// Ring position of the K/V slots: slot index and the parity of its current use.
template <int STAGES>
struct RingPos {
  int slot = 0, phase = 0;
  __device__ __forceinline__ void advance() {
    if (++slot == STAGES) {
      slot = 0;
      phase ^= 1;
    }
  }
};

// One work item: (query tile, query head, batch), decoded from a linear index. Index order: chunks of
// p.sched_kv_chunk KV heads (all of them when 0), and inside a chunk its query heads fastest, then batch, then
// query tiles from the last one (longest work first). The chunks keep the K/V that the CTAs in flight read within
// L2: with all heads in flight, the 8 KV heads of a 32K Llama-3.1-8B prefill (128 MB of K/V) thrash the 50 MB L2
// once BLOCK heads stop walking their keys in lockstep (ncu: L2 hit rate 86% FULL, 50% BLOCK at 31% density).
struct ItemCoord {
  int h, b, m_block;
};

__device__ __forceinline__ ItemCoord item_coord(const AttentionFwdParams& p, int64_t idx, int num_q_tiles) {
  const int kc = p.sched_kv_chunk > 0 && p.sched_kv_chunk < p.heads_kv ? p.sched_kv_chunk : p.heads_kv;
  const int64_t per_chunk = int64_t(num_q_tiles) * p.batch * kc * p.group;  // items of a whole chunk
  const int c = static_cast<int>(idx / per_chunk);                           // only the last chunk is short
  const int64_t r = idx - c * per_chunk;
  const int hq = min(kc, p.heads_kv - c * kc) * p.group;                     // query heads of chunk c
  ItemCoord ic;
  ic.h = c * kc * p.group + static_cast<int>(r % hq);
  ic.b = static_cast<int>((r / hq) % p.batch);
  ic.m_block = num_q_tiles - 1 - static_cast<int>(r / (int64_t(hq) * p.batch));
  return ic;
}

struct WorkItem {
  enum Kind { kSkip, kFillNan, kFillEmpty, kCompute };
  int kind, b, h, kvh, r0, r_end, mode, i_first, i_last;
  SeqInfo seq;
};

template <int BM, int BN, bool kBlockMask>
__device__ __forceinline__ WorkItem decode_item(const AttentionFwdParams& p, const ItemRef& item, int num_q_tiles,
                                                KeyTileWalker<BN>& walker) {
  const ItemCoord ic = item_coord(p, item.idx, num_q_tiles);
  WorkItem w;
  w.h = ic.h;
  w.b = ic.b;
  const int m_block = ic.m_block;
  w.kvh = w.h / p.group;
  w.seq = seq_info(p, w.b);
  w.r0 = m_block * BM;
  w.kind = WorkItem::kSkip;
  if (w.r0 >= w.seq.len_q) return w;
  w.mode = item.mode;
  // (FULL heads with a non-finite K / V row are left to this kernel by the grouped strategy: nonfinite.cuh)
  if (w.mode == kFull && p.skip_full_heads && !nonfinite::head_flagged(p, w.b, w.kvh)) return w;
  w.r_end = min(w.r0 + BM, w.seq.len_q);
  if (!(w.mode == kFull || w.mode == kStream || (kBlockMask && w.mode == kBlock))) {  // out of range, or no mask
    w.kind = WorkItem::kFillNan;
    return w;
  }
  w.i_first = w.r0 + w.seq.offset;
  w.i_last = w.r_end - 1 + w.seq.offset;
  // BLOCK heads walk the key tiles whose mask bit is set for some row block of the query tile (the host sends
  // masks here only when block_size % BN == 0, so a key tile is one mask column).
  if constexpr (kBlockMask) {
    walker.init(w.mode, w.i_first, w.i_last, w.seq.len_k, p.sink, p.window,
                w.mode == kBlock ? block_bits(p, w.b, w.h, w.kvh) : BlockBits());
  } else {
    walker.init(w.mode, w.i_first, w.i_last, w.seq.len_k, p.sink, p.window, BlockBits());
  }
  w.kind = walker.first() < 0 ? WorkItem::kFillEmpty : WorkItem::kCompute;  // no visible key in the tile
  return w;
}

// Copy a [ROWS, D] tile (row r at gmem + r * row_stride) into the 128-byte-swizzled layout with NT threads;
// rows >= valid_rows are zero-filled (no NaN garbage times a zero P). With NT = 128 a thread keeps its
// 16-byte chunk column in every pass and moves down by a multiple of 8 rows, so its swizzled column is fixed
// and each copy costs a pointer increment (the producer shares issue slots with the consumers).
template <int ROWS, int D, int NT, typename T>
__device__ __forceinline__ void load_tile_sw128(T* smem, const T* gmem, int64_t row_stride, int valid_rows, int tid) {
  constexpr int CHUNKS = D / 8;                  // 16-byte chunks per row
  constexpr int ROWS_PER_PASS = NT / CHUNKS;     // rows the threads cover per pass
  if constexpr (ROWS_PER_PASS % 8 == 0) {
    static_assert(ROWS % ROWS_PER_PASS == 0, "passes keep the row's swizzle phase");
    const int c = tid % CHUNKS, r = tid / CHUNKS;
    const T* src = gmem + r * row_stride + c * 8;
    T* dst = smem + (c / 8) * (ROWS * 64) + r * 64 + (((c % 8) ^ (r & 7)) << 3);
    const int64_t step = ROWS_PER_PASS * row_stride;
#pragma unroll
    for (int it = 0; it < ROWS / ROWS_PER_PASS; ++it) {
      const bool valid = r + it * ROWS_PER_PASS < valid_rows;
      mma::cp_async16(dst + it * ROWS_PER_PASS * 64, valid ? src : gmem, valid);
      src += step;
    }
  } else {  // one warp (the TMA producer's rare fallback): plain per-chunk addressing
    for (int i = tid; i < ROWS * CHUNKS; i += NT) {
      const int r = i / CHUNKS, c = i % CHUNKS;
      const bool valid = r < valid_rows;
      mma::cp_async16(smem + (c / 8) * (ROWS * 64) + r * 64 + (((c % 8) ^ (r & 7)) << 3),
                      valid ? gmem + r * row_stride + c * 8 : gmem, valid);
    }
  }
}

// TMA producer: the D / 64 column boxes of one [ROWS, D] tile (rows from `row` of head h, batch slot bt).
template <int ROWS, int D>
__device__ __forceinline__ void tma_load_tile(uint32_t dst, const CUtensorMap* map, uint32_t bar, int row, int h,
                                              int bt) {
  mbar_arrive_expect_tx(bar, ROWS * D * 2);
#pragma unroll
  for (int c = 0; c < D / 64; ++c) tma_load_4d(dst + c * ROWS * 128, map, bar, c * 64, row, h, bt);
}

// The producer's view of the work-item ring: warp 0 lane 0 picks and publishes each index (a fixed stride over
// the grid, or the next value of the global counter), its lanes get it by shuffle; other producer warps read it.
struct ItemSource {
  unsigned long long* counter;  // nullptr: fixed stride
  int warp, lane;
  template <typename Layout>
  __device__ __forceinline__ ItemRef next(const AttentionFwdParams& p, const Layout& sm, int it, int num_q_tiles,
                                          int64_t num_items) const {
    if (warp != 0) return sm.fetch_item(it);
    ItemRef item{0, 0};
    if (lane == 0) {
      item.idx = counter != nullptr ? static_cast<int64_t>(atomicAdd(counter, 1ull))
                                    : blockIdx.x + int64_t(it) * gridDim.x;
      if (item.idx < num_items) {
        const ItemCoord ic = item_coord(p, item.idx, num_q_tiles);
        item.mode = p.head_mode[ic.b * p.head_mode_stride_b + (ic.h / p.group) * p.head_mode_stride_h];
      }
      sm.publish_item(it, item);
    }
    item.idx = __shfl_sync(0xffffffffu, item.idx, 0);
    item.mode = __shfl_sync(0xffffffffu, item.mode, 0);
    return item;
  }
};

// The producers' item loop: the next item with keys to load (items with nothing to compute are skipped; the
// consumers fill their rows), returned once the consumers have released Q of the previous item. False at the end.
template <int BM, int BN, bool kBlockMask>
struct ProducerItems {
  int it = 0, q_loads = 0;
  KeyTileWalker<BN> walker;
  WorkItem w;
  template <typename Layout>
  __device__ __forceinline__ bool next(const AttentionFwdParams& p, const Layout& sm, const ItemSource& src,
                                       int num_q_tiles, int64_t num_items) {
    for (;; ++it) {
      const ItemRef item = src.next(p, sm, it, num_q_tiles, num_items);
      if (item.idx >= num_items) return false;
      w = decode_item<BM, BN, kBlockMask>(p, item, num_q_tiles, walker);
      if (w.kind == WorkItem::kCompute) break;
    }
    ++it;
    if (q_loads > 0) mbar_wait(sm.q_empty(), (q_loads - 1) & 1);  // consumers' last Q K^T of the previous item
    ++q_loads;
    return true;
  }
};

// SLOT_TILES: the word of key tile n (the next walked tile n_next, -1 after the last) for its K slot.
template <int BN>
__device__ __forceinline__ uint32_t slot_tile_word(const AttentionFwdParams& p, const WorkItem& w,
                                                   const KeyTileWalker<BN>& walker, int n, int n_next) {
  const bool full = visited_tile_fully_visible(w.mode, w.i_first, w.i_last, n * BN, n * BN + BN - 1, w.seq.len_k,
                                               p.sink, p.window, walker.bb, walker.single_rb);
  return uint32_t(n) | (full ? kSlotTileFull : 0u) | (n_next < 0 ? kSlotTileLast : 0u);
}

// K/V ring position of the producer: a slot is refilled only after the consumers released its previous tile.
template <int STAGES>
struct FillPos : RingPos<STAGES> {
  bool primed = false;  // every slot was filled once
  __device__ __forceinline__ void next() {
    this->advance();
    primed |= this->slot == 0;
  }
};

template <typename T, typename Tr>
__device__ __forceinline__ const T* kv_head_rows(const void* base, const WorkItem& w, int64_t sb, int64_t sr,
                                                 int64_t sh) {
  return static_cast<const T*>(base) + w.b * sb + int64_t(w.seq.k_start) * sr + w.kvh * sh;
}

// TMA producer: one warp; lane 0 issues the box loads (expect-tx arrivals), the whole warp copies the rare
// varlen tail tiles that TMA cannot zero-fill.
template <typename T, typename Tr>
__device__ void fwd_producer_tma(const AttentionFwdParams& p, const TmaMaps& maps, const SmemLayout<Tr>& sm, T* sK,
                                 T* sV, int num_q_tiles, int64_t num_items, const ItemSource& src) {
  constexpr int BM = Tr::BM, BN = Tr::BN, D = Tr::D;
  const int lane = src.lane;
  if (lane == 0) {
    tma_prefetch_map(&maps.q);
    tma_prefetch_map(&maps.k);
    tma_prefetch_map(&maps.v);
  }
  const bool varlen = p.cu_seqlens_q != nullptr;
  FillPos<Tr::STAGES> pos;
  ProducerItems<BM, BN, Tr::BLOCK_MASK> items;
  while (items.next(p, sm, src, num_q_tiles, num_items)) {
    const WorkItem& w = items.w;
    const KeyTileWalker<BN>& walker = items.walker;
    const int len_k = w.seq.len_k;
    const int bt = varlen ? 0 : w.b;  // dense maps are [B, S, H, D] (rows past S read as zeros), varlen [1, T, H, D]
    if (lane == 0) tma_load_tile<BM, D>(sm.q, &maps.q, sm.q_full(), w.seq.q_start + w.r0, w.h, bt);
    // A varlen key tile past the sequence's end reads the next sequence, unless the sequence ends the tensor.
    const bool tail_by_tma = !varlen || int64_t(w.seq.k_start) + len_k == p.rows_k;
    for (int n = walker.first(); n >= 0;) {
      // (otherwise walked after the loads, as before; SLOT_TILES holds single_rb for the word anyway, so the walk
      // uses it too: the same tiles without two divisions per tile)
      const int n_next = Tr::SLOT_TILES ? walker.prev(n, true) : 0;
      const int key0 = n * BN;
      const bool by_tma = key0 + BN <= len_k || tail_by_tma;
#pragma unroll
      for (int kv = 0; kv < 2; ++kv) {
        const uint32_t full = kv == 0 ? sm.k_full(pos.slot) : sm.v_full(pos.slot);
        if (pos.primed) mbar_wait(kv == 0 ? sm.k_empty(pos.slot) : sm.v_empty(pos.slot), pos.phase ^ 1);
        if (Tr::SLOT_TILES && kv == 0 && lane == 0)
          sm.put_slot_tile(pos.slot, slot_tile_word(p, w, walker, n, n_next));
        if (by_tma) {
          if (lane == 0)
            tma_load_tile<BN, D>(kv == 0 ? sm.k_slot(pos.slot) : sm.v_slot(pos.slot), kv == 0 ? &maps.k : &maps.v,
                                 full, w.seq.k_start + key0, w.kvh, bt);
        } else {
          const T* rows = kv == 0 ? kv_head_rows<T, Tr>(p.k, w, p.k_stride_b, p.k_stride_r, p.k_stride_h)
                                  : kv_head_rows<T, Tr>(p.v, w, p.v_stride_b, p.v_stride_r, p.v_stride_h);
          const int64_t stride = kv == 0 ? p.k_stride_r : p.v_stride_r;
          load_tile_sw128<BN, D, 32>((kv == 0 ? sK : sV) + pos.slot * BN * D, rows + key0 * stride, stride,
                                     len_k - key0, lane);
          cp_async_wait_all_issued();
          fence_proxy_async();  // the consumers read this slot through the async proxy (wgmma)
          __syncwarp();
          if (lane == 0) mbar_arrive(full);
        }
      }
      pos.next();
      n = Tr::SLOT_TILES ? n_next : walker.prev(n);
    }
  }
}

// cp.async producer: the whole warpgroup copies; each thread's copies arrive on the full barriers (128
// arrivals per phase) when they land.
template <typename T, typename Tr>
__device__ void fwd_producer_cp_async(const AttentionFwdParams& p, const SmemLayout<Tr>& sm, T* sQ, T* sK, T* sV,
                                      int num_q_tiles, int64_t num_items, const ItemSource& src) {
  constexpr int BM = Tr::BM, BN = Tr::BN, D = Tr::D;
  const int tid = threadIdx.x % Tr::WG_THREADS;
  FillPos<Tr::STAGES> pos;
  ProducerItems<BM, BN, Tr::BLOCK_MASK> items;
  while (items.next(p, sm, src, num_q_tiles, num_items)) {
    const WorkItem& w = items.w;
    const KeyTileWalker<BN>& walker = items.walker;
    const int len_k = w.seq.len_k;
    const T* q = static_cast<const T*>(p.q) + w.b * p.q_stride_b + int64_t(w.seq.q_start + w.r0) * p.q_stride_r +
                 w.h * p.q_stride_h;
    const T* k = kv_head_rows<T, Tr>(p.k, w, p.k_stride_b, p.k_stride_r, p.k_stride_h);
    const T* v = kv_head_rows<T, Tr>(p.v, w, p.v_stride_b, p.v_stride_r, p.v_stride_h);
    load_tile_sw128<BM, D, Tr::WG_THREADS>(sQ, q, p.q_stride_r, w.seq.len_q - w.r0, tid);
    mbar_arrive_on_cp_async(sm.q_full());
    for (int n = walker.first(); n >= 0;) {
      const int n_next = Tr::SLOT_TILES ? walker.prev(n, true) : 0;
      const int key0 = n * BN;
      if (pos.primed) mbar_wait(sm.k_empty(pos.slot), pos.phase ^ 1);
      if (Tr::SLOT_TILES && tid == 0) {  // its own arrival (k_full counts one more in this case), which releases
        sm.put_slot_tile(pos.slot, slot_tile_word(p, w, walker, n, n_next));
        mbar_arrive(sm.k_full(pos.slot));
      }
      load_tile_sw128<BN, D, Tr::WG_THREADS>(sK + pos.slot * BN * D, k + int64_t(key0) * p.k_stride_r,
                                             p.k_stride_r, len_k - key0, tid);
      mbar_arrive_on_cp_async(sm.k_full(pos.slot));
      if (pos.primed) mbar_wait(sm.v_empty(pos.slot), pos.phase ^ 1);
      load_tile_sw128<BN, D, Tr::WG_THREADS>(sV + pos.slot * BN * D, v + int64_t(key0) * p.v_stride_r,
                                             p.v_stride_r, len_k - key0, tid);
      mbar_arrive_on_cp_async(sm.v_full(pos.slot));
      pos.next();
      n = Tr::SLOT_TILES ? n_next : walker.prev(n);
    }
  }
  cp_async_wait_all_issued();  // leave no copy in flight behind an exited thread
}

template <typename T, typename Tr>
__device__ void fwd_producer(const AttentionFwdParams& p, const TmaMaps& maps, const SmemLayout<Tr>& sm, T* sQ,
                             T* sK, T* sV, int num_q_tiles, int64_t num_items, unsigned flags,
                             unsigned long long* counter) {
  const int tid = threadIdx.x % Tr::WG_THREADS;
  const ItemSource src{(flags & kFlagDynamic) != 0 ? counter : nullptr, tid / 32, tid % 32};
  if ((flags & kFlagTma) == 0) {
    fwd_producer_cp_async<T, Tr>(p, sm, sQ, sK, sV, num_q_tiles, num_items, src);
  } else if (src.warp == 0) {  // one warp drives the copy engine; the others have nothing to do
    fwd_producer_tma<T, Tr>(p, maps, sm, sK, sV, num_q_tiles, num_items, src);
  }
}

#endif  // ELASTIC_SM90A_ENABLED

}  // namespace sm90
}  // namespace elastic
