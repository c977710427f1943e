// Decode attention with tensor cores for one query per step (Sq == 1): the split kernel of decode_kernel.cuh with
// the tile compute on mma.sync instead of fp32 FMA. Same work plan (plan_item), pair view, stream merge and combine.
//
// Why: at 2 FMA per K/V byte (GQA group 4) the FMA kernel issues ~650 instructions per thread for each 16 KB of
// K+V (the dot products' shuffles, conversions and exponentials per lane), which is most of an SM's issue rate at
// HBM speed. Here a warp takes 16 keys of a tile: S = Q K^T as m16n8k16 MMAs with the group's query rows as the M
// rows (padded to 16 with zeros: the tensor cores have throughput to spare), the online softmax on the C fragments
// (4 lanes per row, 2 shuffles), and O += P V as m16n8k16 MMAs with P taken from the C fragments (the FA2 register
// trick). About 10x fewer instructions per byte.
//
// One query per step means every key of a pair's key list is visible to every row of the CTA (its rows are the
// query heads of one group at one position), so the only masked keys are those past the item (zero-filled): no
// partly visible key exists whose V would need keeping out of one row only (P = 0 times an inf V would be NaN);
// steps of several queries keep the FMA kernel. Non-finite rule as in decode_kernel.cuh: visible scores summed
// (K / q), accumulators tested (V).
//
// Shared memory: per stage a K and a V tile of 64 keys x D, rows of 16-byte chunks swizzled (chunk c of key k at
// c ^ (k & 7), attention_mma.cuh), so that ldmatrix reads 8 keys of one chunk without bank conflicts. 3 stages at
// D 128 (96 KB, 2 CTAs per SM: 4 tiles of 32 KB in flight per SM), 4 at D 64 (64 KB, 3 CTAs per SM).
//
// How the tiles are copied (ELASTIC_DECODE_COPY, kernel_options.h; p.copy_mode, kTma):
//  - plain (the default): full tiles by 16-byte cp.async without the src-size operand and with the .L2::256B
//    prefetch hint, 16 lanes per 256-byte key row; only the item's last, partial tile as zfill.
//  - zfill (before 2026-12-02, kept as the A/B fallback): the src-size (zero-fill) operand on every copy.
//  - tma (kTma, sm_90): a full tile whose 64 pool rows are contiguous (every FULL / BLOCK tile; STREAM tiles except
//    those across the sink / ring boundary or the ring wrap) is 2 x D / 64 TMA boxes issued by one thread; other
//    tiles are cp.async into the same swizzled layout; both complete on one mbarrier per stage (128 arrivals: the TMA
//    tile's thread 0 by arrive.expect_tx, the others by a plain arrive; a cp.async tile's threads by
//    cp.async.mbarrier.arrive.noinc).
//  - pairs (diagnostic): zfill into a layout that keeps each 32-byte sector's two halves together.
// Why plain: ncu on the H200 (128K B1 every head FULL, results/ncu/2026-12-02_h200_stalls) counted 32 L2 sectors per
// zfill LDGSTS.E.BYPASS.128 whose 512 contiguous bytes need 16 (L2 hit rate 49%, L2 86.7% busy, the limiter, at
// 67.7% DRAM): every K/V sector was requested twice. Measured (results/decode/2026-12-02_h200_copy_variants, bf16
// Llama-3.1-8B shape, ms and % of 4.8 TB/s), zfill -> plain: 32K B1 0.0536 (52%) -> 0.0494 (57%), 32K B8 0.3264
// (69%) -> 0.2676 (84%), 128K B1 0.1794 (62%) -> 0.1483 (75%), 128K B8 1.2597 (71%) -> 1.0182 (88%); tma equal to
// plain within 1% (228 instead of 188 registers, tensor maps encoded per call); pairs equal to zfill, so the
// shared-memory swizzle was not the cause, the zero-fill form was; the fused combine (ELASTIC_DECODE_FUSED_COMBINE)
// slower in every case (up to 1.86x at 32K B1 with 6/8 heads STREAM).
#pragma once
#include "attention/attention_mma.cuh"
#include "attention/sm90/tma.cuh"
#include "decode/decode_fused_merge.cuh"
#include "decode/decode_kernel.cuh"
#include "decode/decode_tma.h"

namespace elastic {
namespace decode {

template <int D>
struct MmaShape {
  static constexpr int kKeysPerWarp = 16;
  static constexpr int kTileKeys = kWarps * kKeysPerWarp;        // 64
  static constexpr int kChunks = D / 8;                          // 16-byte chunks per K/V row
  static constexpr int kTileBytes = kTileKeys * D * 2;           // of K (and of V): 16 KB at D 128, 8 KB at D 64
  static constexpr int kStages = D == 128 ? 3 : 4;
  static constexpr int kSmemBytes = kStages * 2 * kTileBytes;    // 96 KB / 64 KB
  static constexpr int kSmemBytesTma = kSmemBytes + 1024;        // + alignment of the base to 1024 bytes (swizzle)
  static constexpr int kCtasPerSm = D == 128 ? 2 : 3;
  static constexpr int kCopies = kTileKeys * kChunks / kThreads; // 16-byte copies per thread per tile (K and V each)
  static constexpr int kKSteps = D / 16;                         // k-steps of Q K^T
  static constexpr int kNTiles = D / 8;                          // n-tiles of P V (8 output columns each)
};

// Byte offset of 16-byte chunk c of key `key` in a K or V tile. cp.async layout: rows of D / 8 chunks, chunk c at
// c ^ (key % 8). TMA layout: D / 64 column halves of [64 keys][128 bytes], chunk c % 8 of half c / 8 at
// (c % 8) ^ (key % 8): the 128-byte swizzle of a box (the two agree at D 64). Either way ldmatrix's 8 lanes of one
// chunk and 8 consecutive keys hit 8 different 16-byte bank groups.
// kLayout (kernel_options.h ELASTIC_DECODE_COPY): 0 the cp.async layout, 1 the TMA layout, 2 a diagnostic layout
// (copy=pairs) that swizzles 32-byte units instead of 16-byte chunks, so that both halves of every 32-byte global
// sector land side by side and in order in shared memory (in layout 0 an odd key's halves land swapped, and any
// key's pair moves); the price is 2-way bank conflicts on ldmatrix at D 128 (8 keys of one chunk reach only the 4
// bank groups of its parity). It isolates one hypothesis for the doubled L2 sectors of LDGSTS (ncu): that the
// copy path coalesces a sector's two 16-byte halves only when their shared-memory destinations are adjacent.
template <int D, int kLayout>
__device__ __forceinline__ int mma_smem_offset(int key, int c) {
  if constexpr (kLayout == 1) {
    return (c / 8) * (MmaShape<D>::kTileKeys * 128) + key * 128 + (((c % 8) ^ (key & 7)) * 16);
  } else if constexpr (kLayout == 2) {
    constexpr int kUnits = MmaShape<D>::kChunks / 2;  // 32-byte units per row: 8 at D 128, 4 at D 64
    return (key * MmaShape<D>::kChunks + 2 * ((c / 2) ^ (key & (kUnits - 1))) + (c & 1)) * 16;
  } else {
    return (key * MmaShape<D>::kChunks + (c ^ (key & 7))) * 16;
  }
}

// 16-byte global -> shared copy without the src-size operand, with an L2 prefetch of the surrounding 256 bytes.
__device__ __forceinline__ void cp_async16_l2(void* smem, const void* gmem) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16;\n" ::"r"(s), "l"(gmem) : "memory");
}

// 16-bit element of q as raw bits (q rows need not be 4-byte aligned: two 2-byte loads per fragment register).
template <typename T>
__device__ __forceinline__ uint32_t q_bits(const void* q, int64_t i) {
  return reinterpret_cast<const unsigned short*>(q)[i];
}

// kLayout: 0 cp.async (zfill / plain), 1 TMA, 2 cp.async into the diagnostic 32-byte-unit layout (mma_smem_offset).
// kTrigger (decode_pdl.cuh): where the instance signals a programmatic dependent combine launch; none in the
// default instance (ELASTIC_DECODE_PDL=0), so that its code is round 1's.
// kVariant: bit flags of the batch-1 fixed-cost variants (0 in every other instance, whose code stays round 1's):
// kFusedMerge, ELASTIC_DECODE_FUSED_COMBINE=v2 (the pair's last CTA merges the partials with all its threads,
// decode_fused_merge.cuh); kLateQ, ELASTIC_DECODE_LATE_Q=1 (Q's fragments loaded after the prologue's copies are
// issued: in the default instance the PRMTs that pack Q's 16-bit halves wait for Q's loads before the first LDGSTS,
// so every CTA starts streaming K/V one L2 / HBM round trip late, on the critical path of a batch-1 call).
enum MmaVariant : int { kFusedMerge = 1, kLateQ = 2 };
template <typename T, int D, int kRows, int kLayout, int kTrigger = kTriggerNone, int kVariant = 0>
__global__ void __launch_bounds__(kThreads, MmaShape<D>::kCtasPerSm)
    decode_mma_kernel(const DecodeParams p, const __grid_constant__ DecodeMaps maps) {
  constexpr bool kTma = kLayout == 1;
  using S = MmaShape<D>;
  using Mma = mma::MmaOp<T>;
  static_assert(kRows <= 8, "the C fragment rows g < 8 hold the query rows");
  static_assert(kWarps * kRows * (D + 2) * 4 <= S::kSmemBytes, "merge buffers fit in the pipeline's memory");

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ < 900
  if constexpr (kTma) __trap();  // the host launches the TMA instance on sm_90 devices only
#endif
  extern __shared__ __align__(16) char smem_raw[];
  // The TMA layout's 128-byte swizzle is a function of the address bits 7-9: stages start 1024-byte aligned.
  const uint32_t misalign = static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw)) & 1023u;
  char* const smem = kTma ? smem_raw + ((1024u - misalign) & 1023u) : smem_raw;
  if constexpr (kTrigger == kTriggerStart) signal_dependents();  // ELASTIC_DECODE_PDL=early (round 2's place)
  const Item it = plan_item(p, blockIdx.x);
  if (!it.live) return;
  const int pair = it.pair;
  const int b = pair / p.hkv, h = pair % p.hkv;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t4 = lane % 4;  // C fragment: row g, columns 2 * t4, 2 * t4 + 1 of each n-tile
  const PairView pv = view_pair(p, pair, static_cast<int>(sizeof(T)));
  if (it.index == 0 && tid == 0) {
    p.plan[2 * pair] = it.first;
    p.plan[2 * pair + 1] = it.count;
  }

  // A fragments of Q (row g = query head h * group + g, Sq == 1): per k-step, reg0 = dims 16k + 2t4 .. +1 and
  // reg2 = dims 16k + 8 + 2t4 .. +1; reg1 / reg3 (rows g + 8) are zero. Rows past the group are zero too.
  uint32_t qa[S::kKSteps][2];
  const bool row_ok = g < p.rows && pv.valid;
  auto load_q = [&]() {
    const int64_t base = b * p.q_stride_b + static_cast<int64_t>(h * p.group + (row_ok ? g : 0)) * p.q_stride_h;
#pragma unroll
    for (int k = 0; k < S::kKSteps; ++k) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int64_t i = base + 16 * k + 8 * half + 2 * t4;
        qa[k][half] = row_ok ? (q_bits<T>(p.q, i) | (q_bits<T>(p.q, i + 1) << 16)) : 0u;
      }
    }
  };
  if constexpr ((kVariant & kLateQ) == 0) load_q();  // the default instance: Q before the first K/V copies

  float o[S::kNTiles][4];
#pragma unroll
  for (int j = 0; j < S::kNTiles; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
  float m = -INFINITY, l = 0.f, dsum = 0.f;  // row g's stream over this warp's keys (l, dsum: this lane's part)

  int32_t t_begin = 0, t_end = 0;
  if (pv.valid) {
    const int32_t span = item_span(p, it, pv.n_keys);
    t_begin = it.index * span;
    t_end = min(pv.n_keys, t_begin + span);
  }
  const int n_tiles = (t_end - t_begin + S::kTileKeys - 1) / S::kTileKeys;
  constexpr int kRowBytes = D * 2;
  char* const sk = smem;
  char* const sv = smem + S::kStages * S::kTileBytes;

  // Copies of keys [t0, t0 + 64) of the item by cp.async (keys past the item: zeros) into stage `stage`.
  auto copy_tile = [&](int tile, int stage, bool plain) {
#pragma unroll
    for (int i = 0; i < S::kCopies; ++i) {
      const int part = tid + i * kThreads;
      const int key = part / S::kChunks, c = part % S::kChunks;
      const int32_t t = t_begin + tile * S::kTileKeys + key;
      const bool in = t < t_end;
      const int64_t off = in ? static_cast<int64_t>(key_row(pv, t, p.sink)) * kRowBytes + c * 16 : 0;
      const int soff = stage * S::kTileBytes + mma_smem_offset<D, kLayout>(key, c);
      if (plain) {
        cp_async16_l2(sk + soff, pv.k + off);
        cp_async16_l2(sv + soff, pv.v + off);
      } else {
        cp_async16(sk + soff, pv.k + off, in ? 16 : 0);
        cp_async16(sv + soff, pv.v + off, in ? 16 : 0);
      }
    }
  };
  const bool full_plain = p.copy_mode == 1;
  auto tile_full = [&](int tile) { return t_begin + (tile + 1) * S::kTileKeys <= t_end; };

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  // TMA: the first pool row of tile `tile` when its 64 rows are a contiguous run of a full tile, else -1.
  __shared__ __align__(8) uint64_t s_full_bar[kTma ? S::kStages : 1];
  const int slot = pv.valid ? p.slot[pair] : 0;
  auto tma_row0 = [&](int tile) -> int32_t {
    const int32_t t0 = t_begin + tile * S::kTileKeys;
    if (!tile_full(tile)) return -1;
    if (pv.whole || t0 + S::kTileKeys <= pv.n_sink) return t0;
    if (t0 < pv.n_sink) return -1;                     // across the sink / ring boundary
    const int32_t r = pv.rlo_row + (t0 - pv.n_sink);   // ring row of t0 before the (single) wrap
    if (r >= pv.ring) return p.sink + (r - pv.ring);   // already wrapped: no second wrap follows
    return r + S::kTileKeys <= pv.ring ? p.sink + r : -1;
  };
  const CUtensorMap* const map_k = pv.whole ? &maps.full_k : &maps.stream_k;
  const CUtensorMap* const map_v = pv.whole ? &maps.full_v : &maps.stream_v;
  auto bar_of = [&](int stage) { return static_cast<uint32_t>(__cvta_generic_to_shared(&s_full_bar[stage])); };
  if constexpr (kTma) {
    if (tid == 0) {
      for (int s = 0; s < S::kStages; ++s) sm90::mbar_init(bar_of(s), kThreads);
      asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");  // visible to the copy engine too
    }
    __syncthreads();
  }
#endif

  auto load_tile = [&](int tile, int stage) {
    if constexpr (kTma) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
      const uint32_t bar = bar_of(stage);
      const int32_t row0 = tma_row0(tile);
      if (row0 >= 0) {
        if (tid == 0) {
          sm90::mbar_arrive_expect_tx(bar, 2 * S::kTileBytes);
          const uint32_t dk = static_cast<uint32_t>(__cvta_generic_to_shared(sk + stage * S::kTileBytes));
          const uint32_t dv = static_cast<uint32_t>(__cvta_generic_to_shared(sv + stage * S::kTileBytes));
#pragma unroll
          for (int half = 0; half < D / 64; ++half) {
            sm90::tma_load_4d(dk + half * S::kTileKeys * 128, map_k, bar, 64 * half, row0, 0, slot);
            sm90::tma_load_4d(dv + half * S::kTileKeys * 128, map_v, bar, 64 * half, row0, 0, slot);
          }
        } else {
          sm90::mbar_arrive(bar);
        }
      } else {
        copy_tile(tile, stage, false);
        sm90::mbar_arrive_on_cp_async(bar);
      }
#endif
    } else {
      copy_tile(tile, stage, full_plain && tile_full(tile));
    }
  };

#pragma unroll
  for (int s = 0; s < S::kStages - 1; ++s) {
    if (s < n_tiles) load_tile(s, s);
    if constexpr (!kTma) cp_async_commit();
  }
  if constexpr ((kVariant & kLateQ) != 0) load_q();  // ELASTIC_DECODE_LATE_Q: after the first copies are issued
  const int key0 = warp * S::kKeysPerWarp;
  const int mi = lane / 8, mr = lane % 8;  // ldmatrix: this lane gives the address of row mr of matrix mi
  for (int tile = 0; tile < n_tiles; ++tile) {
    if constexpr (kTma) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
      sm90::mbar_wait(bar_of(tile % S::kStages), (tile / S::kStages) & 1);
      // A stage cp.async wrote (generic proxy) may be refilled by TMA (async proxy) after the barrier below.
      if (tma_row0(tile) < 0) sm90::fence_proxy_async();
#endif
    } else {
      cp_async_wait<S::kStages - 2>();
    }
    __syncthreads();
    if (tile + S::kStages - 1 < n_tiles) load_tile(tile + S::kStages - 1, (tile + S::kStages - 1) % S::kStages);
    if constexpr (!kTma) cp_async_commit();
    const char* const ks = sk + (tile % S::kStages) * S::kTileBytes;
    const char* const vs = sv + (tile % S::kStages) * S::kTileBytes;

    // S = Q K^T over this warp's 16 keys: n-tile 0 = keys key0 .. +7, n-tile 1 = key0 + 8 .. +15. One ldmatrix.x4
    // per k-step gives both n-tiles' B fragments: matrices (keys 0-7 | 8-15) x (dims 16k .. +7 | 16k + 8 .. +15).
    float sc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
    {
      const int key = key0 + (mi / 2) * 8 + mr;
#pragma unroll
      for (int k = 0; k < S::kKSteps; ++k) {
        const int c = 2 * k + (mi % 2);
        uint32_t kb[4];
        mma::ldsm_x4(kb, mma::smem_addr(ks + mma_smem_offset<D, kLayout>(key, c)));
        const uint32_t a[4] = {qa[k][0], 0u, qa[k][1], 0u};
        Mma::run(sc[0], a, kb[0], kb[1]);
        Mma::run(sc[1], a, kb[2], kb[3]);
      }
    }
    // Online softmax of row g over the 4 scores of this lane (keys key0 + 8j + 2 t4 + e); the 4 lanes of a row
    // agree on the max through 2 shuffles. Keys past the item are masked (every other key is visible: Sq == 1).
    const int32_t tk = t_begin + tile * S::kTileKeys + key0 + 2 * t4;
    float mx = -INFINITY;
#pragma unroll
    for (int j = 0; j < 2; ++j) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const bool in = tk + 8 * j + e < t_end;
        const float x = sc[j][e] * p.scale_log2;
        dsum += in ? x : 0.f;
        sc[j][e] = in ? x : -INFINITY;
        mx = fmaxf(mx, sc[j][e]);
      }
    }
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    const float m_new = fmaxf(m, mx);
    const float m_use = m_new == -INFINITY ? 0.f : m_new;  // nothing visible yet: every p and corr below is 0
    const float corr = exp2f(m - m_use);
    m = m_new;
    float pr[2][2];
#pragma unroll
    for (int j = 0; j < 2; ++j) {
#pragma unroll
      for (int e = 0; e < 2; ++e) pr[j][e] = exp2f(sc[j][e] - m_use);
    }
    l = l * corr + (pr[0][0] + pr[0][1]) + (pr[1][0] + pr[1][1]);
#pragma unroll
    for (int j = 0; j < S::kNTiles; ++j) {
      o[j][0] *= corr;
      o[j][1] *= corr;
    }
    // O += P V: P's C fragments are the A fragment of one k-step of 16 keys; one ldmatrix.x4.trans per pair of
    // n-tiles: matrices (keys 0-7 | 8-15) x (dims 16jj .. +7 | 16jj + 8 .. +15), transposed into B fragments.
    const uint32_t pa[4] = {Mma::pack(pr[0][0], pr[0][1]), 0u, Mma::pack(pr[1][0], pr[1][1]), 0u};
    {
      const int key = key0 + (mi % 2) * 8 + mr;
#pragma unroll
      for (int jj = 0; jj < S::kNTiles / 2; ++jj) {
        const int c = 2 * jj + mi / 2;
        uint32_t vb[4];
        mma::ldsm_x4_trans(vb, mma::smem_addr(vs + mma_smem_offset<D, kLayout>(key, c)));
        Mma::run(o[2 * jj], pa, vb[0], vb[1]);
        Mma::run(o[2 * jj + 1], pa, vb[2], vb[3]);
      }
    }
  }
  if constexpr (!kTma) cp_async_wait<0>();  // (TMA: every issued tile was waited for in the loop)
  __syncthreads();  // the pipeline's memory becomes the merge buffers

  // Row g's stream of this warp: l and dsum summed over its 4 lanes; marked (m = NaN) if the visible scores or
  // the accumulator hold a non-finite value anywhere in the 4 lanes.
  l += __shfl_xor_sync(0xffffffffu, l, 1);
  l += __shfl_xor_sync(0xffffffffu, l, 2);
  bool mine = !isfinite(dsum);
#pragma unroll
  for (int j = 0; j < S::kNTiles; ++j) mine |= !isfinite(o[j][0]) || !isfinite(o[j][1]);
  const bool bad = (__ballot_sync(0xffffffffu, mine) >> (4 * g) & 0xfu) != 0;
  float* sm_m = reinterpret_cast<float*>(smem);  // [kWarps][kRows]
  float* sm_l = sm_m + kWarps * kRows;            // [kWarps][kRows]
  float* sm_acc = sm_l + kWarps * kRows;          // [kWarps][kRows][D]
  if (g < kRows) {
    if (t4 == 0) {
      sm_m[warp * kRows + g] = bad ? __int_as_float(0x7fc00000) : m;
      sm_l[warp * kRows + g] = l;
    }
#pragma unroll
    for (int j = 0; j < S::kNTiles; ++j)
      *reinterpret_cast<float2*>(sm_acc + (warp * kRows + g) * D + 8 * j + 2 * t4) = make_float2(o[j][0], o[j][1]);
  }
  __syncthreads();
  write_rows<T, D, kRows, kWarps>(p, smem, pv, it, 0, b, h);
  if constexpr ((kVariant & kFusedMerge) != 0) {
    if (it.count > 1) merge_in_last_cta<T, D, kRows>(p, it, smem);
  } else {
    if (p.fused_combine && it.count > 1) combine_in_last_cta<T, D, kRows>(p, it);
  }
  // ELASTIC_DECODE_PDL=1: this CTA's outputs are stored; the combine may launch once every CTA got here (or exited).
  if constexpr (kTrigger == kTriggerEnd) signal_dependents();
}

}  // namespace decode
}  // namespace elastic
