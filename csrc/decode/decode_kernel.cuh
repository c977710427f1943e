// Decode attention kernels over a static elastic KV cache (split-KV with a combine step, as FlashDecoding).
//
// Byte count first (Llama-3.1-8B shape: Hq 32, Hkv 8, D 128, bf16, Sq 1): one step reads K and V of every cached
// token of every (sample, KV head) pair, 2 * 128 * 2 = 512 bytes per token and pair, and does 2 * G * D = 1024 FMAs
// on them (G = 4 query heads of the group: QK and PV), i.e. 2 FMAs per byte. At 75% of the H200's 4.8 TB/s that is
// 7.2 TFMA/s, a fraction of what CUDA cores issue, so plain FMA in fp32 suffices for one query per head; a tensor-core
// tile would only pay for Sq x G rows in the tens (speculative decoding), where the rows are split into chunks here.
// The bound is memory: every lane keeps four 16-byte loads of K and four of V in flight per iteration, rows of K/V
// are read exactly once per row chunk, and the key range of a pair is split over enough CTAs to fill the SMs.
//
// Work decomposition: CTA (row chunk, pair = b * Hkv + h, split). A pair's key list is its logical positions in
// order: FULL/BLOCK pairs [0, n); STREAM pairs the sink [0, min(sink, n)) then the recent keys [rlo, n),
// rlo = max(sink, n - Sq - window + 1) (all the Sq queries can see); split s takes an equal share of that list. In a
// warp, kLanesPerKey = D / 8 lanes share one key (8 elements = 16 bytes each), so a warp covers 32 / kLanesPerKey
// keys per load; each group of kLanesPerKey lanes is an independent online-softmax stream over its keys, and the
// streams of a CTA merge in shared memory at the end. A split writes its normalised partial output and log2-sum-exp
// (or the final output directly when there is one split); the combine kernel merges the splits of every row.
//
// Non-finite inputs (the rule of attention/head_mode.h; nonfinite.cuh): a lane whose 16 bytes of a key's K or V row
// hold an inf / NaN zeroes its V bytes and makes its partial dot product NaN, so after the lanes' reduction the key's
// score is NaN in every lane of the key; a visible NaN score marks the row and is dropped (-inf), an
// invisible one is -inf by selection anyway. Non-finite query rows are marked at load. The mark is l = NaN (no extra
// register), which the merge and the combine kernel turn into a NaN row and lse. Decode's share of the rule is the
// three marked blocks below.
//
// Invalid values, which cannot raise without a host sync (mode not 0/1/2, slot outside its pool, seq_lens < Sq or
// beyond the pool): the pair's output rows and lse are NaN.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>

#include "attention/kernel_utils.cuh"
#include "attention/nonfinite.cuh"
#include "decode/decode_params.h"

namespace elastic {
namespace decode {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kUnroll = 4;       // key loads in flight per lane and per iteration (K and V each)

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
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 x = __bfloat1622float2(h[i]);
      f[2 * i] = x.x;
      f[2 * i + 1] = x.y;
    }
  }
  __device__ __forceinline__ static float load1(const void* base, int64_t i) {
    return __bfloat162float(reinterpret_cast<const __nv_bfloat16*>(base)[i]);
  }
};

// Streaming 16-byte load that does not allocate in L1 (each K/V byte is read once).
__device__ __forceinline__ uint4 load_stream16(const void* p) {
  uint4 r;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
               : "l"(p));
  return r;
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

template <int D>
__device__ __forceinline__ PairView view_pair(const DecodeParams& p, int b, int h, int elem_bytes) {
  PairView v{};
  const int mode = p.head_mode[b * p.hkv + h];
  const int slot = p.slot[b * p.hkv + h];
  v.n = p.seq_lens[b];
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

// Residency: 4 CTAs per SM at 4 rows (128 registers, no spills; 48 KB of K/V loads in flight per SM), 2 at 8 rows.
template <typename T, int D, int kRows>
__global__ void __launch_bounds__(kThreads, kRows == 4 ? 4 : 2) decode_split_kernel(const DecodeParams p) {
  constexpr int kLanesPerKey = D / 8;
  constexpr int kKeysPerLoad = 32 / kLanesPerKey;
  constexpr int kStreams = kWarps * kKeysPerLoad;
  constexpr int kKeysPerIter = kWarps * kKeysPerLoad * kUnroll;
  static_assert(D == 64 || D == 128, "head_dim 64 or 128");

  // Row chunks vary fastest in launch order: the chunks of one (pair, split) run together and all but the first
  // find their K/V in L2 (Sq x group rows beyond one chunk would otherwise re-read HBM).
  const int chunk = blockIdx.x, pair = blockIdx.y, split = blockIdx.z;
  const int b = pair / p.hkv, h = pair % p.hkv;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int sub = lane / kLanesPerKey, li = lane % kLanesPerKey;
  const int stream_id = warp * kKeysPerLoad + sub;
  const PairView pv = view_pair<D>(p, b, h, static_cast<int>(sizeof(T)));

  // This chunk's query rows (row = q_index * group + g), their positions, and this lane's 8 elements of each.
  float q[kRows][8];
  int32_t qpos[kRows];
  bool row_ok[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int row = chunk * kRows + r;
    row_ok[r] = row < p.rows && pv.valid;
    const int qi = row / p.group, g = row % p.group;
    qpos[r] = pv.n - p.sq + qi;
    const int64_t base = b * p.q_stride_b + static_cast<int64_t>(qi) * p.q_stride_s +
                         static_cast<int64_t>(h * p.group + g) * p.q_stride_h + li * 8;
#pragma unroll
    for (int e = 0; e < 8; ++e) q[r][e] = row_ok[r] ? Vec8<T>::load1(p.q, base + e) * p.scale_log2 : 0.f;
  }

  // [non-finite 1/3] query rows with an inf / NaN (in any lane of the key's lane group) start with l = NaN: the row's
  // mark, which no later update clears (NaN * corr + p stays NaN)
  uint32_t q_bad = 0u;
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    bool bad = false;
#pragma unroll
    for (int e = 0; e < 8; ++e) bad |= !isfinite(q[r][e]);
    if (bad) q_bad |= 1u << r;
  }
#pragma unroll
  for (int o = 1; o < kLanesPerKey; o <<= 1) q_bad |= __shfl_xor_sync(0xffffffffu, q_bad, o);
  float m[kRows], l[kRows], acc[kRows][8];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    m[r] = -INFINITY;
    l[r] = (q_bad >> r) & 1u ? NAN : 0.f;
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[r][e] = 0.f;
  }

  int32_t t_begin = 0, t_end = 0;
  if (pv.valid) {
    const int32_t per = (pv.n_keys + p.num_splits - 1) / p.num_splits;
    t_begin = split * per;
    t_end = min(pv.n_keys, t_begin + per);
  }
  const int64_t row_bytes = static_cast<int64_t>(D) * sizeof(T);
  for (int32_t t0 = t_begin + warp * kKeysPerLoad * kUnroll; t0 < t_end; t0 += kKeysPerIter) {
    uint4 kraw[kUnroll], vraw[kUnroll];
    int32_t kpos[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int32_t t = t0 + u * kKeysPerLoad + sub;
      const bool in_sink = t < pv.n_sink;
      kpos[u] = in_sink ? t : pv.rlo + (t - pv.n_sink);
      if (t < t_end) {
        int32_t prow = kpos[u];  // whole pairs and sink tokens: the position itself
        if (!pv.whole && !in_sink) {
          const int32_t r = pv.rlo_row + (t - pv.n_sink);
          prow = p.sink + (r >= pv.ring ? r - pv.ring : r);
        }
        const int64_t off = prow * row_bytes + li * 16;
        kraw[u] = load_stream16(pv.k + off);
        vraw[u] = load_stream16(pv.v + off);
      } else {
        kpos[u] = INT32_MAX;  // masked for every row below
        kraw[u] = make_uint4(0, 0, 0, 0);
        vraw[u] = make_uint4(0, 0, 0, 0);
      }
    }
    float s[kUnroll][kRows];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      // [non-finite 2/3] this lane's 16 bytes of the key's K or V row: zero its V bytes, NaN into the dot product
      const bool kv_bad = nonfinite::any_nonfinite<T>(nonfinite::absmax2(nonfinite::absmax2(0u, kraw[u]), vraw[u]));
      if (kv_bad) vraw[u] = make_uint4(0, 0, 0, 0);
      float kf[8];
      Vec8<T>::to_float(kraw[u], kf);
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        float dot = kv_bad ? NAN : 0.f;
#pragma unroll
        for (int e = 0; e < 8; ++e) dot = fmaf(q[r][e], kf[e], dot);
#pragma unroll
        for (int o = 1; o < kLanesPerKey; o <<= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
        const bool visible = row_ok[r] && kpos[u] <= qpos[r] &&
                             (pv.whole || kpos[u] < p.sink || qpos[r] - kpos[u] < p.window);
        if (visible && isnan(dot)) l[r] = NAN;  // the row's mark (see above)
        s[u][r] = visible && !isnan(dot) ? dot : -INFINITY;
      }
    }
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      float mx = m[r];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) mx = fmaxf(mx, s[u][r]);
      if (mx == -INFINITY) continue;  // nothing visible to this row yet
      const float corr = exp2f(m[r] - mx);
      m[r] = mx;
      l[r] *= corr;
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[r][e] *= corr;
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const float pu = exp2f(s[u][r] - mx);
        l[r] += pu;
        float vf[8];
        Vec8<T>::to_float(vraw[u], vf);
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[r][e] = fmaf(pu, vf[e], acc[r][e]);
      }
    }
  }

  // Merge the kStreams online-softmax streams of this CTA.
  __shared__ float sm_m[kStreams][kRows], sm_l[kStreams][kRows];
  __shared__ float sm_acc[kStreams][kRows][D];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    if (li == 0) {
      sm_m[stream_id][r] = m[r];
      sm_l[stream_id][r] = l[r];
    }
#pragma unroll
    for (int e = 0; e < 8; ++e) sm_acc[stream_id][r][li * 8 + e] = acc[r][e];
  }
  __syncthreads();

  const float nan = __int_as_float(0x7fc00000);
  for (int idx = threadIdx.x; idx < kRows * D; idx += kThreads) {
    const int r = idx / D, d = idx % D;
    const int row = chunk * kRows + r;
    if (row >= p.rows) continue;
    float M = -INFINITY;
    bool nf_row = false;  // [non-finite 3/3] some stream marked the row (l = NaN)
#pragma unroll
    for (int s2 = 0; s2 < kStreams; ++s2) {
      M = fmaxf(M, sm_m[s2][r]);
      nf_row |= isnan(sm_l[s2][r]);
    }
    float L = 0.f, o = 0.f;
    if (M != -INFINITY) {
#pragma unroll
      for (int s2 = 0; s2 < kStreams; ++s2) {
        const float w = exp2f(sm_m[s2][r] - M);
        L = fmaf(sm_l[s2][r], w, L);
        o = fmaf(sm_acc[s2][r][d], w, o);
      }
    }
    float lse2 = L > 0.f ? M + log2f(L) : -INFINITY;
    o = L > 0.f ? o / L : 0.f;
    if (!pv.valid || nf_row) {
      o = nan;
      lse2 = nan;
    }
    const int qi = row / p.group, hq = h * p.group + row % p.group;
    if (p.num_splits == 1) {
      T* out = static_cast<T*>(p.out);
      out[((static_cast<int64_t>(b) * p.sq + qi) * p.hq + hq) * D + d] = to_elem<T>(o);
      if (d == 0) p.lse[(static_cast<int64_t>(b) * p.hq + hq) * p.sq + qi] = lse2 * 0.69314718055994531f;
    } else {
      const int64_t part = (static_cast<int64_t>(pair) * p.row_chunks * kRows + row) * p.num_splits + split;
      p.part_out[part * D + d] = o;
      if (d == 0) p.part_lse[part] = lse2;
    }
  }
}

// One CTA of D threads per (pair, query row): merges the num_splits partials of that row.
template <typename T, int D, int kRows>
__global__ void __launch_bounds__(D) decode_combine_kernel(const DecodeParams p) {
  const int pair = blockIdx.x, row = blockIdx.y, d = threadIdx.x;
  const int b = pair / p.hkv, h = pair % p.hkv;
  const int64_t base = (static_cast<int64_t>(pair) * p.row_chunks * kRows + row) * p.num_splits;
  float M = -INFINITY;
  bool bad = false;
  for (int s = 0; s < p.num_splits; ++s) {
    const float x = p.part_lse[base + s];
    bad |= isnan(x);
    M = fmaxf(M, x);
  }
  float L = 0.f, o = 0.f;
  if (M != -INFINITY) {
    for (int s = 0; s < p.num_splits; ++s) {
      const float x = p.part_lse[base + s];
      if (x == -INFINITY) continue;  // an empty split (0 * its zero output)
      const float w = exp2f(x - M);
      L += w;
      o = fmaf(w, p.part_out[(base + s) * D + d], o);
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

}  // namespace decode
}  // namespace elastic
