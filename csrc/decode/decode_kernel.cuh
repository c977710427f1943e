// Decode attention kernels over a static elastic KV cache (split-KV with a combine step, as FlashDecoding).
//
// Byte count first (Llama-3.1-8B shape: Hq 32, Hkv 8, D 128, bf16, Sq 1): one step reads K and V of every cached
// token of every (sample, KV head) pair, 2 * 128 * 2 = 512 bytes per token and pair, and does 2 * G * D = 1024 FMAs
// on them (G = 4 query heads of the group: QK and PV), i.e. 2 FMAs per byte. At 75% of the H200's 4.8 TB/s that is
// 7.2 TFMA/s, a fraction of what CUDA cores issue, so plain fp32 FMA suffices; the bound is keeping HBM busy:
//  - Every SM must have tens of KB of loads in flight all the time (latency ~1 us x 36 GB/s per SM). Each CTA
//    runs a kStages-deep cp.async pipeline of K/V tiles (8 KB of K and 8 KB of V per tile, 16-byte copies that
//    bypass L1); three CTAs per SM keep up to 9 tiles (144 KB) in flight while the fourth stage is computed.
//  - Every SM must get the same number of bytes. Batch 1 at 32K with 8 KV heads has only 8 pairs, and with 6 of 8
//    heads STREAM the pairs differ 15x in length. So the work is cut into items of one chunk length for the whole
//    launch, chosen on the device from the real lengths (chunk = total keys / target items, target = SMs x CTAs
//    per SM; re-cut with total / (target - pairs) when that makes more than target items, see plan_item): a pair
//    of n keys gets ceil(n / chunk) items (its keys spread evenly over them), numbered in pair order, and
//    CTA i takes item i. No host read of the lengths, so a CUDA graph can capture the launch and replay it as the
//    lengths grow; the grid is the static bound target + pairs and CTAs past the real item count exit at once.
//  - Pairs of one item write their output directly; the others write normalised partials and a log2-sum-exp,
//    merged by the combine kernel (a few KB per pair, read from L2).
//
// Inside a CTA: kLanesPerKey = D / 8 lanes share one key (8 elements = 16 bytes each) and keep their 8 elements of
// each of the kRows query rows (the GQA group x Sq) in registers; a warp covers 32 / kLanesPerKey keys of a tile
// per pass. Each lane group is an independent online-softmax stream over its keys; the streams merge in shared
// memory at the end.
//
// Key list of a pair (logical positions in order): FULL/BLOCK pairs [0, n); STREAM pairs the sink
// [0, min(sink, n)) then the recent keys [rlo, n), rlo = max(sink, n - Sq - window + 1) (all that the Sq queries
// can see). A key in the list may still be invisible to some row (causal among the Sq queries, window edges).
//
// Non-finite inputs (README "Non-finite inputs"): a row is NaN iff its q row or a K/V row it can see holds a
// non-finite value. A visible key's score is non-finite iff its K row or the q row is (inf * 0 and inf - inf give
// NaN; overflow of q . k beyond fp32 from finite inputs is the one false positive), so the score is tested; V
// enters the accumulator only for visible keys (P = 0 times an invisible inf would be NaN), so a non-finite
// accumulator means a visible non-finite V row. Either marks the row; marked rows are NaN with lse NaN.
//
// Invalid values, which cannot raise without a host sync (mode not 0/1/2, slot outside its pool, seq_lens < Sq or
// beyond the pool): the pair's output rows and lse are NaN.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>

#include "attention/kernel_utils.cuh"
#include "decode/decode_params.h"
#include "decode/decode_pdl.cuh"

namespace elastic {
namespace decode {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kStages = 4;                 // K/V tiles in the pipeline of one CTA (3 in flight while one computes)
constexpr int kTileBytes = 8192;           // K bytes of one tile (and as many of V)
constexpr int kSmemBytes = kStages * 2 * kTileBytes;  // dynamic shared memory of the split kernel (64 KB)

template <typename T>
struct Vec8;  // 8 elements of T in one 16-byte register group, converted to fp32
template <>
struct Vec8<__half> {
  __device__ __forceinline__ static void to_float(const uint4& raw, float (&f)[8]) {
    const __half2* h = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 x = __half22float2(h[i]);
      f[2 * i] = x.x;
      f[2 * i + 1] = x.y;
    }
  }
  __device__ __forceinline__ static float load1(const void* base, int64_t i) {
    return __half2float(reinterpret_cast<const __half*>(base)[i]);
  }
};
template <>
struct Vec8<__nv_bfloat16> {
  __device__ __forceinline__ static void to_float(const uint4& raw, float (&f)[8]) {
    // bf16 -> fp32 is a 16-bit shift: two integer ops per pair instead of the conversion intrinsics.
    const uint32_t* w = reinterpret_cast<const uint32_t*>(&raw);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      f[2 * i] = __uint_as_float(w[i] << 16);
      f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
  }
  __device__ __forceinline__ static float load1(const void* base, int64_t i) {
    return __bfloat162float(reinterpret_cast<const __nv_bfloat16*>(base)[i]);
  }
};

// 16-byte global -> shared copy that bypasses L1 (each K/V byte is read once); src_bytes 0 fills zeros.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, int src_bytes) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(src_bytes) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// What one pair reads: its pool row base pointers, key-list geometry, and whether its values are in range.
struct PairView {
  const char* k;
  const char* v;
  bool whole;     // FULL or BLOCK: position j at row j; STREAM: sink + ring
  bool valid;
  int32_t n;      // valid tokens (queries are the last Sq)
  int32_t n_sink; // STREAM: keys of the sink in the list (0 for whole pairs)
  int32_t rlo;    // first recent position in the list after the sink
  int32_t n_keys; // length of the key list
  int32_t ring;   // STREAM ring rows
  int32_t rlo_row;  // STREAM: ring row of position rlo; later list entries follow it, wrapping once at most
};

__device__ __forceinline__ PairView view_pair(const DecodeParams& p, int pair, int elem_bytes) {
  PairView v{};
  const int mode = p.head_mode[pair];
  const int slot = p.slot[pair];
  v.n = p.seq_lens[pair / p.hkv];
  v.whole = mode == 0 || mode == 2;
  const bool mode_ok = mode >= 0 && mode <= 2;
  const int pairs = v.whole ? p.full_pairs : p.stream_pairs;
  v.valid = mode_ok && slot >= 0 && slot < pairs && v.n >= p.sq && (!v.whole || v.n <= p.full_tokens);
  if (!v.valid) return v;
  if (v.whole) {
    v.k = static_cast<const char*>(p.full_k) + static_cast<int64_t>(slot) * p.full_k_stride_pair * elem_bytes;
    v.v = static_cast<const char*>(p.full_v) + static_cast<int64_t>(slot) * p.full_v_stride_pair * elem_bytes;
    v.n_sink = 0;
    v.rlo = 0;
    v.n_keys = v.n;
    v.ring = 1;
    v.rlo_row = 0;
  } else {
    v.k = static_cast<const char*>(p.stream_k) + static_cast<int64_t>(slot) * p.stream_k_stride_pair * elem_bytes;
    v.v = static_cast<const char*>(p.stream_v) + static_cast<int64_t>(slot) * p.stream_v_stride_pair * elem_bytes;
    v.n_sink = v.n < p.sink ? v.n : p.sink;
    const int32_t recent = v.n - p.sq - p.window + 1;
    v.rlo = recent > p.sink ? recent : p.sink;
    v.n_keys = v.n_sink + (v.n > v.rlo ? v.n - v.rlo : 0);
    v.ring = p.stream_tokens - p.sink;
    // The recent keys [rlo, n) are at most window + Sq - 1 <= ring positions: consecutive ring rows from rlo's row
    // that wrap at most once, so the per-key row needs one compare instead of a modulo.
    v.rlo_row = v.ring > 0 ? (v.rlo - p.sink) % v.ring : 0;
  }
  return v;
}

// Length of a pair's key list for the work plan (0 for an invalid pair, which still gets one item: its NaN rows).
__device__ __forceinline__ int32_t pair_keys(const DecodeParams& p, int pair) {
  return view_pair(p, pair, 2).n_keys;  // only n_keys is read: the element size does not matter
}

__device__ __forceinline__ int32_t items_of(int32_t keys, int32_t chunk) {
  return keys > 0 ? (keys + chunk - 1) / chunk : 1;
}

// Logical position and pool row of entry t of a pair's key list.
__device__ __forceinline__ int32_t key_pos(const PairView& pv, int32_t t) {
  return t < pv.n_sink ? t : pv.rlo + (t - pv.n_sink);
}
__device__ __forceinline__ int32_t key_row(const PairView& pv, int32_t t, int32_t sink) {
  if (pv.whole || t < pv.n_sink) return t;
  const int32_t r = pv.rlo_row + (t - pv.n_sink);
  return sink + (r >= pv.ring ? r - pv.ring : r);
}

template <typename V>
__device__ __forceinline__ V warp_sum(V x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// The launch's work plan, as every CTA derives it from the tables (the same arithmetic in every CTA, so they agree
// without communicating): the chunk length, and for item `item` its pair, its index within the pair and the
// pair's first item and item count. live is false past the last item.
struct Item {
  int32_t pair, index, first, count, chunk;
  bool live;
};

__device__ Item plan_item(const DecodeParams& p, int item) {
  __shared__ long long s_warp[kWarps];
  __shared__ int s_item[4];
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int P = p.batch * p.hkv;
  if (tid == 0) s_item[0] = -1;  // stays -1 past the last item
  // Thread tid plans the contiguous pairs [lo, hi): prefix sums in pair order come from one block scan.
  const int per = (P + kThreads - 1) / kThreads;
  const int lo = min(P, tid * per), hi = min(P, lo + per);

  // The key counts of the first kCached pairs of the range stay in registers (each is three dependent-free table
  // reads, but the planning is on every CTA's critical path: read them once). Ranges are longer only beyond
  // kCached * kThreads = 512 pairs.
  constexpr int kCached = 4;
  int32_t cached[kCached];
  long long keys = 0;
#pragma unroll
  for (int j = 0; j < kCached; ++j) {
    cached[j] = lo + j < hi ? pair_keys(p, lo + j) : 0;
    keys += cached[j];
  }
  for (int q = lo + kCached; q < hi; ++q) keys += pair_keys(p, q);
  keys = warp_sum(keys);
  if (lane == 0) s_warp[warp] = keys;
  __syncthreads();
  long long total = 0;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) total += s_warp[w];
  // Chunk: the total spread over `slots` items, rounded up to whole tiles (a tile is >= 32 keys) and >= one tile.
  constexpr int kTileKeysMin = 32;
  auto chunk_for = [&](long long slots) {
    long long chunk = (total + slots - 1) / slots;
    chunk = ((chunk + kTileKeysMin - 1) / kTileKeysMin) * kTileKeysMin;
    return static_cast<int32_t>(chunk < kTileKeysMin ? kTileKeysMin : (chunk > (1 << 30) ? (1 << 30) : chunk));
  };
  int32_t c = chunk_for(p.target_items);

  // Pass 0: chunk = total / target. Its items number up to target + pairs (each pair's last item is partial), and
  // the ones past target run as a second, partial wave: at 32K / 128K batch 8 (64 pairs, 264 slots) all-FULL pairs
  // get 5 items each = 320, so 56 chunk-long items ran after the first wave (measured 68% of HBM peak there, and
  // 528 forced items no better: 576 items, 48 in a third wave). Pass 1 (one_wave, when pass 0 overflows and
  // 2 x pairs <= target): chunk = total / (target - pairs), which bounds the items by sum(keys / chunk + 1) <=
  // target, one wave; its chunk is at most twice pass 0's (pairs <= target / 2), so it never costs more than the
  // two waves it replaces. The condition is the same in every thread (block-uniform), so the loop's barriers are.
  int local = 0, incl = 0, before = 0, all = 0;
  for (int pass = 0; pass < 2; ++pass) {
    local = 0;
#pragma unroll
    for (int j = 0; j < kCached; ++j) local += lo + j < hi ? items_of(cached[j], c) : 0;
    for (int q = lo + kCached; q < hi; ++q) local += items_of(pair_keys(p, q), c);
    // Exclusive block scan of `local`.
    incl = local;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int y = __shfl_up_sync(0xffffffffu, incl, o);
      if (lane >= o) incl += y;
    }
    __syncthreads();  // the previous reads of s_warp (the key sums, or pass 0's scan) are done
    if (lane == 31) s_warp[warp] = incl;
    __syncthreads();
    before = 0;
    all = 0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      before += w < warp ? static_cast<int>(s_warp[w]) : 0;
      all += static_cast<int>(s_warp[w]);
    }
    if (pass == 1 || !p.one_wave || all <= p.target_items || 2 * P > p.target_items) break;
    c = chunk_for(p.target_items - P);
  }
  int start = before + incl - local;
  if (item >= start && item < start + local) {
    // The pair of `item` among this thread's range (the cached counts first: unrolled, so they stay registers).
    auto take = [&](int q, int n) {
      s_item[0] = q;
      s_item[1] = item - start;
      s_item[2] = start;
      s_item[3] = n;
    };
    bool found = false;
#pragma unroll
    for (int j = 0; j < kCached; ++j) {
      if (!found && lo + j < hi) {
        const int n = items_of(cached[j], c);
        if (item < start + n) {
          take(lo + j, n);
          found = true;
        } else {
          start += n;
        }
      }
    }
    for (int q = lo + kCached; !found && q < hi; ++q) {
      const int n = items_of(pair_keys(p, q), c);
      if (item < start + n) {
        take(q, n);
        found = true;
      } else {
        start += n;
      }
    }
  }
  __syncthreads();
  Item it;
  it.live = item < all;
  it.pair = s_item[0];
  it.index = s_item[1];
  it.first = s_item[2];
  it.count = s_item[3];
  it.chunk = c;
  return it;
}

// Keys of each item of a pair with n_keys keys: the plan's chunk, or with one_wave the pair's keys spread evenly over
// its it.count items (rounded up to 32 keys, as the chunk), so that no item is longer than it must be (128K batch 8:
// 4 items of 32768 keys instead of 3 of 41952 and a short one). Every item is non-empty and they cover the list:
// count = ceil(n / chunk) gives ceil(n / count) <= chunk, so span <= chunk (a multiple of 32) and (count - 1) *
// span <= (count - 1) * chunk < n, while count * span >= n. Items [index * span, min(n, (index + 1) * span)).
__device__ __forceinline__ int32_t item_span(const DecodeParams& p, const Item& it, int32_t n_keys) {
  if (!p.one_wave || it.count <= 1) return it.chunk;
  const int32_t even = (n_keys + it.count - 1) / it.count;
  return (even + 31) / 32 * 32;
}

// Passes [kPass0, kPass0 + kPasses) of one tile (K and V rows in shared memory) into the lane group's online-softmax
// stream: this lane's key of each pass, its 8 elements, and every row of the CTA. kAllVisible: no row needs a
// visibility test.
// dsum accumulates the row's visible scores: non-finite iff a visible score is (the non-finite rule's K and q part:
// NaN and +-inf scores, which the max and the exponentials would otherwise drop or hide).
template <typename T, int D, int kRows, bool kAllVisible, int kPass0, int kPasses>
__device__ __forceinline__ void attend_passes(const char* ks, const char* vs, int32_t t0, int32_t t_end,
                                            const PairView& pv, const DecodeParams& p, const int32_t (&qpos)[kRows],
                                            const bool (&row_ok)[kRows], int stream_id, int li,
                                            const float (&q)[kRows][8], float (&m)[kRows], float (&l)[kRows],
                                            float (&dsum)[kRows], float (&acc)[kRows][8]) {
  constexpr int kLanesPerKey = D / 8;
  constexpr int kStreams = kWarps * (32 / kLanesPerKey);
  constexpr int kRowBytes = D * static_cast<int>(sizeof(T));
  float s[kPasses][kRows];
  bool vis[kPasses][kRows];
#pragma unroll
  for (int ps = 0; ps < kPasses; ++ps) {
    const int key = (kPass0 + ps) * kStreams + stream_id;
    const uint4 kraw = *reinterpret_cast<const uint4*>(ks + key * kRowBytes + li * 16);
    float kf[8];
    Vec8<T>::to_float(kraw, kf);
    int32_t t = 0, kpos = 0;
    if constexpr (!kAllVisible) {
      t = t0 + key;
      kpos = key_pos(pv, t);
    }
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      float dot = 0.f;
#pragma unroll
      for (int e = 0; e < 8; ++e) dot = fmaf(q[r][e], kf[e], dot);
#pragma unroll
      for (int o = 1; o < kLanesPerKey; o <<= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
      if constexpr (kAllVisible) {
        vis[ps][r] = row_ok[r];
      } else {
        vis[ps][r] = row_ok[r] && t < t_end && kpos <= qpos[r] &&
                     (pv.whole || kpos < p.sink || qpos[r] - kpos < p.window);
      }
      dsum[r] += vis[ps][r] ? dot : 0.f;
      s[ps][r] = vis[ps][r] ? dot : -INFINITY;
    }
  }
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    float mx = m[r];
#pragma unroll
    for (int ps = 0; ps < kPasses; ++ps) mx = fmaxf(mx, s[ps][r]);
    if (mx == -INFINITY) continue;  // nothing visible to this row yet (NaN scores are in dsum)
    const float corr = exp2f(m[r] - mx);
    m[r] = mx;
    l[r] *= corr;
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[r][e] *= corr;
  }
#pragma unroll
  for (int ps = 0; ps < kPasses; ++ps) {
    const int key = (kPass0 + ps) * kStreams + stream_id;
    const uint4 vraw = *reinterpret_cast<const uint4*>(vs + key * kRowBytes + li * 16);
    float vf[8];
    Vec8<T>::to_float(vraw, vf);
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      // Invisible V never enters (P = 0 times an inf would be NaN); in an all-visible tile only padding rows
      // (row_ok false, never written) are invisible, and they may take the product.
      if (!kAllVisible && !vis[ps][r]) continue;
      const float pu = exp2f(s[ps][r] - m[r]);
      l[r] += pu;
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[r][e] = fmaf(pu, vf[e], acc[r][e]);
    }
  }
}

// A whole tile: its passes at once at 4 rows; in two halves at 8 rows (the scores of 4 passes x 8 rows would not
// fit in the 255 registers beside the accumulators).
template <typename T, int D, int kRows, bool kAllVisible>
__device__ __forceinline__ void attend_tile(const char* ks, const char* vs, int32_t t0, int32_t t_end,
                                            const PairView& pv, const DecodeParams& p, const int32_t (&qpos)[kRows],
                                            const bool (&row_ok)[kRows], int stream_id, int li,
                                            const float (&q)[kRows][8], float (&m)[kRows], float (&l)[kRows],
                                            float (&dsum)[kRows], float (&acc)[kRows][8]) {
  constexpr int kStreams = kWarps * (32 / (D / 8));
  constexpr int kPasses = kTileBytes / (D * 2) / kStreams;
  constexpr int kSplit = kRows > 4 ? kPasses / 2 : kPasses;
  attend_passes<T, D, kRows, kAllVisible, 0, kSplit>(ks, vs, t0, t_end, pv, p, qpos, row_ok, stream_id, li, q, m, l,
                                                      dsum, acc);
  if constexpr (kSplit < kPasses)
    attend_passes<T, D, kRows, kAllVisible, kSplit, kPasses - kSplit>(ks, vs, t0, t_end, pv, p, qpos, row_ok,
                                                                       stream_id, li, q, m, l, dsum, acc);
}

// The CTA's kStreams online-softmax streams are in shared memory (sm_m [kStreams][kRows], NaN for a stream whose
// row saw a non-finite value; sm_l likewise; sm_acc [kStreams][kRows][D]): merge them per row and write the rows of
// this row chunk: the output and lse directly when the pair has one item, else this item's partials.
template <typename T, int D, int kRows, int kStreams>
__device__ __forceinline__ void write_rows(const DecodeParams& p, const char* smem, const PairView& pv,
                                           const Item& it, int rchunk, int b, int h) {
  const float* sm_m = reinterpret_cast<const float*>(smem);
  const float* sm_l = sm_m + kStreams * kRows;
  const float* sm_acc = sm_l + kStreams * kRows;
  const float nan = __int_as_float(0x7fc00000);
  const bool direct = it.count == 1;
  for (int idx = threadIdx.x; idx < kRows * D; idx += kThreads) {
    const int r = idx / D, d = idx % D;
    const int row = rchunk * kRows + r;
    if (row >= p.rows) continue;
    float M = -INFINITY;
    bool row_bad = !pv.valid;
#pragma unroll
    for (int s2 = 0; s2 < kStreams; ++s2) {
      const float x = sm_m[s2 * kRows + r];
      row_bad |= isnan(x);
      M = fmaxf(M, x);
    }
    float L = 0.f, o = 0.f;
    if (M != -INFINITY) {
#pragma unroll
      for (int s2 = 0; s2 < kStreams; ++s2) {
        const float x = sm_m[s2 * kRows + r];
        if (x == -INFINITY || isnan(x)) continue;
        const float w = exp2f(x - M);
        L = fmaf(sm_l[s2 * kRows + r], w, L);
        o = fmaf(sm_acc[(s2 * kRows + r) * D + d], w, o);
      }
    }
    float lse2 = L > 0.f ? M + log2f(L) : -INFINITY;
    o = L > 0.f ? o / L : 0.f;
    if (row_bad) {
      o = nan;
      lse2 = nan;
    }
    if (direct) {
      const int qi = row / p.group, hq = h * p.group + row % p.group;
      T* out = static_cast<T*>(p.out);
      out[((static_cast<int64_t>(b) * p.sq + qi) * p.hq + hq) * D + d] = to_elem<T>(o);
      if (d == 0) p.lse[(static_cast<int64_t>(b) * p.hq + hq) * p.sq + qi] = lse2 * 0.69314718055994531f;
    } else {
      const int64_t part = (static_cast<int64_t>(rchunk) * p.items_max + blockIdx.x) * kRows + r;
      p.part_out[part * D + d] = o;
      if (d == 0) p.part_lse[part] = lse2;
    }
  }
}

// Residency: 3 CTAs per SM at 4 rows (3 x 64 KB of pipeline), 2 at 8 rows (registers).
template <typename T, int D, int kRows>
__global__ void __launch_bounds__(kThreads, kRows == 4 ? 3 : 2) decode_split_kernel(const DecodeParams p) {
  constexpr int kLanesPerKey = D / 8;
  constexpr int kKeysPerWarp = 32 / kLanesPerKey;
  constexpr int kStreams = kWarps * kKeysPerWarp;          // lane groups of the CTA, one key each per pass
  constexpr int kTileKeys = kTileBytes / (D * 2);          // 32 keys at D 128, 64 at D 64
  constexpr int kPasses = kTileKeys / kStreams;            // 4 either way
  constexpr int kCopies = kTileBytes / 16 / kThreads;      // 16-byte copies per thread per tile, K and V each
  static_assert(D == 64 || D == 128, "head_dim 64 or 128");
  static_assert(kPasses * kStreams == kTileKeys && kCopies * kThreads * 16 == kTileBytes, "tile shape");
  static_assert(kStreams * kRows * (D + 2) * 4 <= kSmemBytes, "merge buffers fit in the pipeline's memory");

  extern __shared__ __align__(16) char smem[];
  // Grid (items_max, row_chunks). Rows beyond one chunk (Sq x group > 8) re-read the item's K/V, from L2 when
  // the launch is one wave (the automatic target divides the SM slots among the row chunks).
  const int rchunk = blockIdx.y;
  const Item it = plan_item(p, blockIdx.x);
  if (!it.live) return;
  const int pair = it.pair;
  const int b = pair / p.hkv, h = pair % p.hkv;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int sub = lane / kLanesPerKey, li = lane % kLanesPerKey;
  const int stream_id = warp * kKeysPerWarp + sub;
  const PairView pv = view_pair(p, pair, static_cast<int>(sizeof(T)));
  if (it.index == 0 && rchunk == 0 && tid == 0) {
    p.plan[2 * pair] = it.first;
    p.plan[2 * pair + 1] = it.count;
  }

  // This chunk's query rows (row = q_index * group + g), their positions, and this lane's 8 elements of each.
  float q[kRows][8];
  int32_t qpos[kRows];
  bool row_ok[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int row = rchunk * kRows + r;
    row_ok[r] = row < p.rows && pv.valid;
    const int qi = row / p.group, g = row % p.group;
    qpos[r] = pv.n - p.sq + qi;
    const int64_t base = b * p.q_stride_b + static_cast<int64_t>(qi) * p.q_stride_s +
                         static_cast<int64_t>(h * p.group + g) * p.q_stride_h + li * 8;
#pragma unroll
    for (int e = 0; e < 8; ++e) q[r][e] = row_ok[r] ? Vec8<T>::load1(p.q, base + e) * p.scale_log2 : 0.f;
  }

  float m[kRows], l[kRows], dsum[kRows], acc[kRows][8];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    m[r] = -INFINITY;
    l[r] = 0.f;
    dsum[r] = 0.f;
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[r][e] = 0.f;
  }

  int32_t t_begin = 0, t_end = 0;
  if (pv.valid) {
    const int32_t span = item_span(p, it, pv.n_keys);
    t_begin = it.index * span;
    t_end = min(pv.n_keys, t_begin + span);
  }
  const int n_tiles = (t_end - t_begin + kTileKeys - 1) / kTileKeys;
  constexpr int kRowBytes = D * static_cast<int>(sizeof(T));
  char* const sk = smem;                           // [kStages][kTileKeys][D]
  char* const sv = smem + kStages * kTileBytes;    // [kStages][kTileKeys][D]

  // Copy tile `tile` of the item into stage `stage`: thread tid copies 16-byte parts tid + i * kThreads of the
  // tile's K and V rows (consecutive threads -> consecutive 16 bytes of a row); rows past the item are zeros.
  auto load_tile = [&](int tile, int stage) {
#pragma unroll
    for (int i = 0; i < kCopies; ++i) {
      const int part = tid + i * kThreads;
      const int key = part / kLanesPerKey, col = part % kLanesPerKey;
      const int32_t t = t_begin + tile * kTileKeys + key;
      const bool in = t < t_end;
      const int64_t off = in ? static_cast<int64_t>(key_row(pv, t, p.sink)) * kRowBytes + col * 16 : 0;
      const int soff = stage * kTileBytes + part * 16;
      cp_async16(sk + soff, pv.k + off, in ? 16 : 0);
      cp_async16(sv + soff, pv.v + off, in ? 16 : 0);
    }
  };

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < n_tiles) load_tile(s, s);
    cp_async_commit();
  }
  for (int tile = 0; tile < n_tiles; ++tile) {
    cp_async_wait<kStages - 2>();  // this thread's copies of `tile` have landed
    __syncthreads();               // everyone's have, and everyone is done with the stage reloaded next
    if (tile + kStages - 1 < n_tiles) load_tile(tile + kStages - 1, (tile + kStages - 1) % kStages);
    cp_async_commit();

    // A tile every row of the CTA sees whole (all of it inside the item, causally before the first query, and for
    // STREAM inside every query's window or in the sink) skips the per-key visibility tests: with one query per
    // step, every tile but an item's last one.
    const int32_t t0 = t_begin + tile * kTileKeys, t_last = t0 + kTileKeys - 1;
    bool all_visible = t_last < t_end && key_pos(pv, t_last) <= pv.n - p.sq;
    if (!pv.whole && t_last >= pv.n_sink)
      all_visible = all_visible && (pv.n - 1) - key_pos(pv, max(t0, pv.n_sink)) < p.window;
    const char* const ks = sk + (tile % kStages) * kTileBytes;
    const char* const vs = sv + (tile % kStages) * kTileBytes;
    if (all_visible)
      attend_tile<T, D, kRows, true>(ks, vs, t0, t_end, pv, p, qpos, row_ok, stream_id, li, q, m, l, dsum, acc);
    else
      attend_tile<T, D, kRows, false>(ks, vs, t0, t_end, pv, p, qpos, row_ok, stream_id, li, q, m, l, dsum, acc);
  }
  cp_async_wait<0>();
  __syncthreads();  // the pipeline's memory becomes the merge buffers

  // A non-finite score sum means a visible non-finite K row or q row; a non-finite accumulator element a visible
  // non-finite V row. The lanes of a stream agree through a ballot so the whole row is marked.
  bool bad[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    bool mine = !isfinite(dsum[r]);
#pragma unroll
    for (int e = 0; e < 8; ++e) mine |= !isfinite(acc[r][e]);
    const unsigned ball = __ballot_sync(0xffffffffu, mine);
    const unsigned group_mask = ((1u << kLanesPerKey) - 1u) << (sub * kLanesPerKey);  // kLanesPerKey is 8 or 16
    bad[r] = (ball & group_mask) != 0;
  }

  // Merge the kStreams online-softmax streams of this CTA; a marked stream carries m = NaN.
  float* sm_m = reinterpret_cast<float*>(smem);             // [kStreams][kRows]
  float* sm_l = sm_m + kStreams * kRows;                      // [kStreams][kRows]
  float* sm_acc = sm_l + kStreams * kRows;                    // [kStreams][kRows][D]
  const float nan = __int_as_float(0x7fc00000);
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    if (li == 0) {
      sm_m[stream_id * kRows + r] = bad[r] ? nan : m[r];
      sm_l[stream_id * kRows + r] = l[r];
    }
    float4* dst = reinterpret_cast<float4*>(sm_acc + (stream_id * kRows + r) * D + li * 8);
    dst[0] = make_float4(acc[r][0], acc[r][1], acc[r][2], acc[r][3]);
    dst[1] = make_float4(acc[r][4], acc[r][5], acc[r][6], acc[r][7]);
  }
  __syncthreads();

  write_rows<T, D, kRows, kStreams>(p, smem, pv, it, rchunk, b, h);
}

// Merges element d of query row `row` of pair `pair` from the partials of the pair's `count` items (from `first`)
// and writes the output (and the lse at d == 0). Partials are read through L2 (ld.global.cg): in the fused combine
// they were written by other CTAs of the same launch, and this SM's L1 must not serve a stale line.
// The end of a vectorised merge (decode_combine_v2.cuh, decode_fused_merge.cuh): elements [4 vec, 4 vec + 4) of
// query row `row` of pair (b, h) from the weighted sum acc of its items' outputs, their weights' sum L and the log2
// max M the weights share, and (vec 0) the row's lse; a row with a NaN input (bad) gets NaN and NaN.
template <typename T, int D>
__device__ __forceinline__ void write_merged4(const DecodeParams& p, int b, int h, int row, int vec, const float4& acc,
                                              float L, float M, bool bad) {
  const float nan = __int_as_float(0x7fc00000);
  const float inv = L > 0.f ? 1.f / L : 0.f;
  const float res[4] = {acc.x * inv, acc.y * inv, acc.z * inv, acc.w * inv};
  const int qi = row / p.group, hq = h * p.group + row % p.group;
  T* out = static_cast<T*>(p.out) + ((static_cast<int64_t>(b) * p.sq + qi) * p.hq + hq) * D + 4 * vec;
#pragma unroll
  for (int e = 0; e < 4; ++e) out[e] = to_elem<T>(bad ? nan : res[e]);
  if (vec == 0) {
    const float lse = bad ? nan : (L > 0.f ? (M + log2f(L)) * 0.69314718055994531f : -INFINITY);
    p.lse[(static_cast<int64_t>(b) * p.hq + hq) * p.sq + qi] = lse;
  }
}

template <typename T, int D, int kRows>
__device__ __forceinline__ void combine_element(const DecodeParams& p, int pair, int first, int count, int row,
                                                int d) {
  const int b = pair / p.hkv, h = pair % p.hkv;
  const int rchunk = row / kRows, r = row % kRows;
  const int64_t base = static_cast<int64_t>(rchunk) * p.items_max * kRows + r;  // + item * kRows
  float M = -INFINITY;
  bool bad = false;
  for (int s = 0; s < count; ++s) {
    const float x = __ldcg(p.part_lse + base + static_cast<int64_t>(first + s) * kRows);
    bad |= isnan(x);
    M = fmaxf(M, x);
  }
  float L = 0.f, o = 0.f;
  if (M != -INFINITY && !bad) {
#pragma unroll 4
    for (int s = 0; s < count; ++s) {
      const int64_t part = base + static_cast<int64_t>(first + s) * kRows;
      const float x = __ldcg(p.part_lse + part);
      if (x == -INFINITY) continue;  // an item with no visible key for this row (0 * its zero output)
      const float w = exp2f(x - M);
      L += w;
      o = fmaf(w, __ldcg(p.part_out + part * D + d), o);
    }
  }
  const float nan = __int_as_float(0x7fc00000);
  o = bad ? nan : (L > 0.f ? o / L : 0.f);
  const float lse = bad ? nan : (L > 0.f ? (M + log2f(L)) * 0.69314718055994531f : -INFINITY);
  const int qi = row / p.group, hq = h * p.group + row % p.group;
  T* out = static_cast<T*>(p.out);
  out[((static_cast<int64_t>(b) * p.sq + qi) * p.hq + hq) * D + d] = to_elem<T>(o);
  if (d == 0) p.lse[(static_cast<int64_t>(b) * p.hq + hq) * p.sq + qi] = lse;
}

// One CTA of D threads per (pair, query row): merges the partials of the pair's items (pairs of one item were
// written by the split kernel). kPdl: the instance launched as a programmatic dependent launch
// (ELASTIC_DECODE_PDL, decode_pdl.cuh) first waits for the split grid; the default instance has no wait.
template <typename T, int D, int kRows, bool kPdl = false>
__global__ void __launch_bounds__(D) decode_combine_kernel(const DecodeParams p) {
  if constexpr (kPdl) wait_for_prior_grid();  // the plan and the partials are the split grid's writes
  const int pair = blockIdx.x, row = blockIdx.y, d = threadIdx.x;
  const int count = p.plan[2 * pair + 1];
  if (count <= 1) return;
  combine_element<T, D, kRows>(p, pair, p.plan[2 * pair], count, row, d);
}

// The fused combine (p.fused_combine; tensor-core kernel, one row chunk): called by every CTA of a split pair after
// it wrote its partials. Each CTA publishes its partials (__threadfence) and takes a ticket; the CTA that takes the
// last one merges all rows of the pair and puts the ticket back to 0 (the launch zeroes the tickets anyway; the
// reset keeps the counter right for anything that replays the kernel alone). Classic last-block reduction: the
// fence before the ticket orders this CTA's partial writes before it, the fence after it orders the reads.
template <typename T, int D, int kRows>
__device__ __forceinline__ void combine_in_last_cta(const DecodeParams& p, const Item& it) {
  __shared__ int s_last;
  __threadfence();
  __syncthreads();  // every thread's partial writes are fenced before thread 0 takes the ticket
  if (threadIdx.x == 0) {
    const int done = atomicAdd(p.ticket + it.pair, 1) + 1;
    s_last = done == it.count;
    if (done == it.count) p.ticket[it.pair] = 0;
  }
  __syncthreads();
  if (!s_last) return;
  __threadfence();
  for (int idx = threadIdx.x; idx < p.rows * D; idx += kThreads)
    combine_element<T, D, kRows>(p, it.pair, it.first, it.count, idx / D, idx % D);
}

}  // namespace decode
}  // namespace elastic
