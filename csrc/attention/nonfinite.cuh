// Non-finite inputs in the CUDA attention kernels: the one home of the device code that implements the rule of
// head_mode.h / README "Non-finite inputs" (an output row and its lse are NaN iff its query row, or a key or value
// row it can see, holds a NaN or an infinity; invisible keys never matter).
//
// Why the kernels need help: a masked score is -inf and gives P = 0, but 0 * NaN (or 0 * inf) = NaN in P V, so a
// non-finite V row of a visited tile reaches rows that cannot see it; fmaxf drops a NaN score, and a non-finite
// query row meets the max / exp arithmetic in ways that can give out 0 and lse -inf. Checking every element in the
// hot loop would cost the Hopper forward per-element work on every tile, so the work is split by how rare it is:
//
//   * prepass (nonfinite_kv_kernel, one launch, no host sync): reads K and V once and writes, per (batch, KV head,
//     64-key tile of its sequence), a 64-bit mask of the keys whose K or V row is non-finite, and per (batch, KV
//     head) one "any" word. Cost: one read of K and V (32 MiB at 8K tokens of the Llama-3.1-8B shape, ~1% of that
//     dense forward; the share falls linearly with the length).
//   * forward kernels: per work item, one load of the head's "any" word, and a check of their own query rows (Q is
//     in shared memory once per item; the check runs while the first S = Q K^T is in flight). Per key tile one
//     warp-uniform branch on "any"; only when set (rare path) the tile's key mask is read, the rows that see a
//     flagged key are marked (a register bit per row), and the flagged V rows of the shared tile are zeroed before
//     P V reads them (harmless for the rows that see them: those rows are NaN anyway). The epilogue writes NaN out
//     and lse for marked rows.
//   * backward (attention_bwd_kernel.cuh): rows whose lse is NaN (the forward's NaN rows) or whose grad_out /
//     grad_lse is non-finite are "bad": their visible P and dS are NaN, masked P and dS are exactly 0 by selection,
//     and their Q / dO rows (and non-finite K / V rows) are zeroed in shared memory so that 0 * inf never reaches a
//     clean gradient. The checks run once per K/V tile (a CTA) and per query tile (one __syncthreads_or). The Hopper
//     backward (sm90/attention_bwd_sm90_kernel.cuh) does the same; its producer zero-fills bad Q / dO rows.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>

#include "attention/attention_params.h"
#include "attention/attention_tiles.cuh"
#include "attention/head_mode.h"
#include "attention/kernel_utils.cuh"

namespace elastic {
namespace nonfinite {

constexpr int kKeyTile = 64;  // keys per 64-bit mask of the prepass

// Exponent field of two packed 16-bit values: all ones means inf or NaN.
template <typename T>
struct Bits16;
template <>
struct Bits16<__nv_bfloat16> {
  static constexpr uint32_t kExp2 = 0x7f807f80u;
};
template <>
struct Bits16<__half> {
  static constexpr uint32_t kExp2 = 0x7c007c00u;
};

// Running max of |x| bit patterns of packed 16-bit pairs (sign cleared): for IEEE-like formats a larger magnitude
// has a larger pattern, and inf / NaN patterns are the largest, so one compare at the end decides "any non-finite".
__device__ __forceinline__ uint32_t absmax2(uint32_t acc, uint32_t w) { return __vmaxu2(acc, w & 0x7fff7fffu); }
__device__ __forceinline__ uint32_t absmax2(uint32_t acc, const uint4& v) {
  return __vmaxu2(__vmaxu2(acc, v.x & 0x7fff7fffu), __vmaxu2(v.y & 0x7fff7fffu, __vmaxu2(v.z & 0x7fff7fffu,
                                                                                          v.w & 0x7fff7fffu)));
}
template <typename T>
__device__ __forceinline__ bool any_nonfinite(uint32_t absmax) {
  return __vcmpgeu2(absmax, Bits16<T>::kExp2) != 0u;
}

__device__ __forceinline__ uint4 lds128(uint32_t addr) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(addr));
  return v;
}
__device__ __forceinline__ void sts128_zero(uint32_t addr) {
  asm volatile("st.shared.v4.u32 [%0], {%1, %1, %1, %1};\n" ::"r"(addr), "r"(0u) : "memory");
}

// ------------------------------------------------------------------------------------------------ prepass
// Words of the flag buffer (host: attention_fused_cuda.cu): masks [B, Hkv, tiles, 2] (tiles even, so that a 128-key
// tile's 4 words are one aligned 16-byte load), then the "any" words [B, Hkv]. Every word is written by the
// prepass except the "any" words, which start at 0 (the host zero-fills the buffer).
__host__ __device__ __forceinline__ int64_t mask_words(int64_t batch, int64_t heads_kv, int64_t tiles) {
  return batch * heads_kv * tiles * 2;
}
// 64-key tiles per (batch, KV head) for keys of at most max_seqlen_k per sequence, rounded up to even.
__host__ __device__ __forceinline__ int tiles_for(int max_seqlen_k) {
  return 2 * ((max_seqlen_k + 2 * kKeyTile - 1) / (2 * kKeyTile));
}
// The "any" word of pair (b, kvh): a FULL head that the grouped strategy must leave to the fused kernel.
__device__ __forceinline__ bool head_flagged(const AttentionFwdParams& p, int b, int kvh) {
  return p.nf_flags != nullptr &&
         p.nf_flags[mask_words(p.batch, p.heads_kv, p.nf_tiles) + int64_t(b) * p.heads_kv + kvh] != 0u;
}

// One CTA of 128 threads per (64-key tile, KV head, batch): every 16-byte chunk of the tile's K and V rows is read
// once (all loads of a thread issued before any test), rows past the sequence are not read and count as finite.
template <typename T, int D>
__global__ void __launch_bounds__(128) nonfinite_kv_kernel(const AttentionFwdParams p, uint32_t* flags) {
  constexpr int CH = D / 8, ITERS = kKeyTile * CH / 128;
  static_assert(kKeyTile * CH % 128 == 0, "chunks divide over the threads");
  const int t = blockIdx.x, kvh = blockIdx.y, b = blockIdx.z;
  int k_start = 0, len_k = p.seqlen_k;
  if (p.cu_seqlens_k != nullptr) {
    k_start = p.cu_seqlens_k[b];
    len_k = p.cu_seqlens_k[b + 1] - k_start;
  }
  __shared__ uint32_t bits[2];
  if (threadIdx.x < 2) bits[threadIdx.x] = 0u;
  __syncthreads();
  const int j0 = t * kKeyTile;
  const T* k = static_cast<const T*>(p.k) + b * p.k_stride_b + int64_t(k_start + j0) * p.k_stride_r + kvh * p.k_stride_h;
  const T* v = static_cast<const T*>(p.v) + b * p.v_stride_b + int64_t(k_start + j0) * p.v_stride_r + kvh * p.v_stride_h;
  uint4 kr[ITERS], vr[ITERS];
#pragma unroll
  for (int it = 0; it < ITERS; ++it) {
    const int i = it * 128 + threadIdx.x, r = i / CH, c = i % CH;
    const bool in = j0 + r < len_k;
    kr[it] = in ? __ldg(reinterpret_cast<const uint4*>(k + int64_t(r) * p.k_stride_r + c * 8)) : make_uint4(0, 0, 0, 0);
    vr[it] = in ? __ldg(reinterpret_cast<const uint4*>(v + int64_t(r) * p.v_stride_r + c * 8)) : make_uint4(0, 0, 0, 0);
  }
#pragma unroll
  for (int it = 0; it < ITERS; ++it) {
    const int r = (it * 128 + threadIdx.x) / CH;
    if (any_nonfinite<T>(absmax2(absmax2(0u, kr[it]), vr[it]))) atomicOr(&bits[r / 32], 1u << (r % 32));
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    const int64_t ph = int64_t(b) * p.heads_kv + kvh;
    *reinterpret_cast<uint2*>(flags + (ph * p.nf_tiles + t) * 2) = make_uint2(bits[0], bits[1]);
    // the "any" words are zero-filled by the host; every writer writes the same 1
    if ((bits[0] | bits[1]) != 0u) flags[mask_words(p.batch, p.heads_kv, p.nf_tiles) + ph] = 1u;
  }
}

// ------------------------------------------------------------------------------------------- forward kernels
// The prepass result as one work item sees it (its batch and KV head).
struct KvFlags {
  const uint32_t* masks = nullptr;  // this head's 64-key masks
  bool any = false;                 // some K / V row of the head is non-finite: the rare path runs

  __device__ __forceinline__ static KvFlags load(const AttentionFwdParams& p, int b, int kvh) {
    KvFlags f;
    if (p.nf_flags != nullptr) {
      f.masks = masks_of(p, b, kvh);
      f.any = p.nf_flags[mask_words(p.batch, p.heads_kv, p.nf_tiles) + int64_t(b) * p.heads_kv + kvh] != 0u;
    }
    return f;
  }
  // The masks of (b, kvh) alone, for kernels that keep only `any` live through their key loop (registers).
  __device__ __forceinline__ static const uint32_t* masks_of(const AttentionFwdParams& p, int b, int kvh) {
    return p.nf_flags + (int64_t(b) * p.heads_kv + kvh) * p.nf_tiles * 2;
  }
  // Flagged keys of the BN-key tile n (bit j: key n * BN + j), BN = 64 or 128.
  template <int BN>
  __device__ __forceinline__ void tile(int n, uint32_t (&m)[BN / 32]) const {
    static_assert(BN == 64 || BN == 128, "key tiles of 64 or 128");
    if constexpr (BN == 128) {
      const uint4 w = *reinterpret_cast<const uint4*>(masks + 4 * n);
      m[0] = w.x;
      m[1] = w.y;
      m[2] = w.z;
      m[3] = w.w;
    } else {
      const uint2 w = *reinterpret_cast<const uint2*>(masks + 2 * n);
      m[0] = w.x;
      m[1] = w.y;
    }
  }
};

template <int N>
__device__ __forceinline__ bool any_bit(const uint32_t (&m)[N]) {
  uint32_t x = 0u;
#pragma unroll
  for (int i = 0; i < N; ++i) x |= m[i];
  return x != 0u;
}

// Does the row at absolute position i see a flagged key among the columns of the key tile [j0, j0 + BN) that this
// thread holds in the m16n8 accumulator layout (nb * 8 + 2 * t4 + c: bits 2 t4, 2 t4 + 1 of every byte of a mask
// word)? The quad's four lanes together hold every column; callers OR the answer over the quad once, in the
// epilogue. key_visible() is the exact rule (head_mode.h); block_bit: the row's mask bit for this key tile's column
// (BLOCK heads). A loop over the set bits only: rare-path code stays small (it sits inside the kernels' key loops).
template <int BN>
__device__ __forceinline__ bool sees_flagged_key(const uint32_t (&m)[BN / 32], int i, int j0, int t4, int mode,
                                                 int len_k, int sink, int window, bool block_bit) {
  bool hit = false;
#pragma unroll 1
  for (int wd = 0; wd < BN / 32; ++wd) {
    uint32_t x = m[wd] & (0x03030303u << (2 * t4));
    while (x != 0u) {
      const int j = j0 + wd * 32 + __ffs(x) - 1;
      x &= x - 1u;
      hit |= j < len_k && key_visible(mode, i, j, sink, window, block_bit);
    }
  }
  return hit;
}

// Zero the flagged rows of a [BN, D] tile of 16-bit elements whose row r occupies the bytes [r * 128, r * 128 + 128)
// of each 64-column block (block cb at cb * col_block_bytes): the sm90 128-byte-swizzled tiles (col_block_bytes =
// BN * 128) and, with D = 64, the sm80 tiles. The swizzle permutes chunks inside a row, so zeroing whole rows needs
// no swizzle arithmetic. Threads tid = 0 .. nthreads - 1 of the caller share the work.
template <int BN, int D>
__device__ __forceinline__ void zero_rows_sw128(uint32_t tile, uint32_t col_block_bytes, const uint32_t (&m)[BN / 32],
                                                int tid, int nthreads) {
  constexpr int CH = D / 8;
  for (int i = tid; i < BN * CH; i += nthreads) {
    const int r = i / CH, c = i % CH;
    if ((m[r / 32] >> (r % 32)) & 1u) sts128_zero(tile + (c / 8) * col_block_bytes + r * 128 + (c % 8) * 16);
  }
}
// Same for the sm80 tiles (row r: the D contiguous elements at r * D, chunks swizzled inside the row).
template <int BN, int D>
__device__ __forceinline__ void zero_rows_dense(uint32_t tile, const uint32_t (&m)[BN / 32], int tid, int nthreads) {
  constexpr int CH = D / 8;
  for (int i = tid; i < BN * CH; i += nthreads) {
    const int r = i / CH, c = i % CH;
    if ((m[r / 32] >> (r % 32)) & 1u) sts128_zero(tile + r * (D * 2) + c * 16);
  }
}

// Is this thread's quarter of a query row non-finite? The row's D / 8 16-byte chunks lie in 64-column blocks
// (row_bytes apart inside a block, col_block_bytes between blocks); lane t4 of the quad reads chunks t4, t4 + 4, ...
// (their order inside the row does not matter, so the swizzle does not either). The quad ORs the answer later.
template <typename T, int D>
__device__ __forceinline__ bool q_row_part_nonfinite(uint32_t row_addr, uint32_t col_block_bytes, int t4) {
  uint32_t acc = 0u;
#pragma unroll
  for (int k = 0; k < D / 32; ++k) {
    const int c = t4 + 4 * k;
    acc = absmax2(acc, lds128(row_addr + (c / 8) * col_block_bytes + (c % 8) * 16));
  }
  return any_nonfinite<T>(acc);
}

// OR of a per-row bit mask over the quad (the four lanes that share the m16n8 rows).
__device__ __forceinline__ uint32_t quad_or(uint32_t x) {
  x |= __shfl_xor_sync(0xffffffffu, x, 1);
  x |= __shfl_xor_sync(0xffffffffu, x, 2);
  return x;
}

// A query tile that sees no key at all: each row is 0 / -inf, or NaN / NaN when its query row is non-finite (the
// rule holds for rows without visible keys too). Rows of D 16-bit elements at q + r * q_stride_r; one thread per row.
template <typename T, int D>
__device__ void fill_empty_rows(T* out, int64_t o_stride_r, float* lse, const T* q, int64_t q_stride_r, int r0,
                                int r_end, int tid, int nthreads) {
  for (int r = r0 + tid; r < r_end; r += nthreads) {
    uint32_t acc = 0u;
#pragma unroll 4
    for (int c = 0; c < D / 8; ++c) acc = absmax2(acc, __ldg(reinterpret_cast<const uint4*>(q + int64_t(r) * q_stride_r + c * 8)));
    const bool bad = any_nonfinite<T>(acc);
    const T f = to_elem<T>(bad ? NAN : 0.f);
#pragma unroll 1
    for (int c = 0; c < D; ++c) out[int64_t(r) * o_stride_r + c] = f;
    lse[r] = bad ? NAN : -INFINITY;
  }
}

}  // namespace nonfinite
}  // namespace elastic
