// Forward kernel of the fused strategy: FlashAttention-2 style (mma.sync m16n8k16 with fp32 accumulation,
// ldmatrix, cp.async), one CTA per (query tile, query head, batch) work item. Each work item reads its
// KV head's mode from the device head_mode tensor and visits only the key tiles that mode can make
// visible (attention_tiles.cuh): FULL all causal tiles, STREAM sink + window tiles, BLOCK set bits.
//
// Layout per CTA: NWARPS warps, each owning BM / NWARPS consecutive query rows (MT = rows / 16 m-tiles);
// Q [BM, D] stays in shared memory, K and V [BN, D] tiles are single-buffered but loaded so that the V
// load overlaps Q K^T and the next K load overlaps softmax + P V (FlashAttention-2's schedule).
#pragma once
#include <cmath>

#include "attention/attention_mma.cuh"
#include "attention/attention_params.h"
#include "attention/attention_tiles.cuh"
#include "attention/kernel_utils.cuh"
#include "attention/nonfinite.cuh"

namespace elastic {

template <typename T, int D_, int BM_, int BN_, int NWARPS_>
struct FwdTraits {
  static constexpr int D = D_, BM = BM_, BN = BN_, NWARPS = NWARPS_, NTHREADS = NWARPS * 32;
  static constexpr int ROWS_PER_WARP = BM / NWARPS;
  static constexpr int MT = ROWS_PER_WARP / 16;  // m16 tiles per warp
  static constexpr int NB = BN / 8;              // n8 blocks of S per m-tile
  static constexpr int DB = D / 8;               // n8 blocks of O per m-tile
  static constexpr int SMEM_BYTES = (BM + 2 * BN) * D * static_cast<int>(sizeof(T));
  static_assert(ROWS_PER_WARP % 16 == 0, "each warp owns whole m16 tiles");
};

// Non-finite rule, rare path (nonfinite.cuh): bit 2 mt + hf set when this thread's row (mt, hf), at absolute position
// i0 + 16 mt + 8 hf, sees a flagged key of key tile n among its columns. Out of line, arguments by value: the key loop
// keeps only the call's branch (the kernel is at its register limit).
template <int MT, int BN>
__device__ __noinline__ uint32_t fwd_rows_seeing_flagged(nonfinite::KvFlags kv, int n, int i0, int t4, int mode,
                                                         int len_k, int sink, int window, BlockBits bb) {
  uint32_t m[BN / 32];
  kv.tile<BN>(n, m);
  const int j0 = n * BN, cb = mode == kBlock ? j0 / bb.block_size : 0;
  uint32_t rows = 0u;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const int i = i0 + mt * 16 + hf * 8;
      const bool bit = mode == kBlock && bb.bit_of_position(i, cb);
      if (nonfinite::sees_flagged_key<BN>(m, i, j0, t4, mode, len_k, sink, window, bit)) rows |= 1u << (2 * mt + hf);
    }
  return rows;
}

// Rare path: zero the flagged V rows of key tile n in sV (shared address) before P V, then sync the CTA. Returns at
// once (every thread: the same words) when the tile holds no flagged key.
template <int BN, int D, int NTHREADS>
__device__ __noinline__ void fwd_zero_flagged_v(const uint32_t* masks, int n, uint32_t sv) {
  uint32_t m[BN / 32];
  nonfinite::KvFlags{masks, true}.tile<BN>(n, m);
  if (!nonfinite::any_bit(m)) return;
  nonfinite::zero_rows_dense<BN, D>(sv, m, threadIdx.x, NTHREADS);
  __syncthreads();
}

template <typename T, typename Tr>
__global__ void __launch_bounds__(Tr::NTHREADS, 2) attention_fwd_kernel(const AttentionFwdParams p) {
  constexpr int D = Tr::D, BM = Tr::BM, BN = Tr::BN, NTHREADS = Tr::NTHREADS, MT = Tr::MT, NB = Tr::NB,
                DB = Tr::DB;
  using Op = mma::MmaOp<T>;

  // Longest work items first: gridDim.z walks query tiles from the last (most keys) down.
  const int m_block = gridDim.z - 1 - blockIdx.z;
  const int h = blockIdx.x;
  const int b = blockIdx.y;
  const int kvh = h / p.group;
  const SeqInfo seq = seq_info(p, b);
  const int r0 = m_block * BM;
  if (r0 >= seq.len_q) return;
  const int mode = p.head_mode[b * p.head_mode_stride_b + kvh * p.head_mode_stride_h];
  // (FULL heads with a non-finite K / V row are left to this kernel by the grouped strategy: nonfinite.cuh)
  if (mode == kFull && p.skip_full_heads && !nonfinite::head_flagged(p, b, kvh)) return;

  const T* q = static_cast<const T*>(p.q) + b * p.q_stride_b + int64_t(seq.q_start) * p.q_stride_r + h * p.q_stride_h;
  const T* k = static_cast<const T*>(p.k) + b * p.k_stride_b + int64_t(seq.k_start) * p.k_stride_r + kvh * p.k_stride_h;
  const T* v = static_cast<const T*>(p.v) + b * p.v_stride_b + int64_t(seq.k_start) * p.v_stride_r + kvh * p.v_stride_h;
  T* out = static_cast<T*>(p.out) + b * p.o_stride_b + int64_t(seq.q_start) * p.o_stride_r + h * p.o_stride_h;
  float* lse = p.lse + b * p.lse_stride_b + h * p.lse_stride_h + seq.q_start;
  const int r_end = min(r0 + BM, seq.len_q);

  if (!mode_is_valid(mode, p)) {  // documented: an invalid mode (or BLOCK without a mask) gives NaN
    fill_rows<T, D>(out, p.o_stride_r, lse, r0, r_end, NAN, NAN, threadIdx.x, NTHREADS);
    return;
  }

  const int i_first = r0 + seq.offset;
  const int i_last = r_end - 1 + seq.offset;
  const BlockBits bb = block_bits(p, b, h, kvh);
  KeyTileWalker<BN> walker;
  walker.init(mode, i_first, i_last, seq.len_k, p.sink, p.window, bb);
  int n = walker.first();
  if (n < 0) {  // no visible key for any row of the tile: 0 and -inf (NaN for non-finite query rows)
    nonfinite::fill_empty_rows<T, D>(out, p.o_stride_r, lse, q, p.q_stride_r, r0, r_end, threadIdx.x, NTHREADS);
    return;
  }
  // Non-finite rule (nonfinite.cuh): the head's flags, and bit 2 mt + hf of nf_rows: this thread's row (mt, hf) is
  // NaN (its query row, or a flagged key it sees; OR-ed over the quad in the epilogue).
  const bool nf_any = nonfinite::KvFlags::load(p, b, kvh).any;  // (the masks pointer is not kept: registers)
  uint32_t nf_rows = 0u;

  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + BM * D;
  T* sV = sK + BN * D;

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int warp_row0 = warp * Tr::ROWS_PER_WARP;

  mma::load_tile_async<BM, D, NTHREADS>(sQ, q + int64_t(r0) * p.q_stride_r, p.q_stride_r, seq.len_q - r0);
  mma::load_tile_async<BN, D, NTHREADS>(sK, k + int64_t(n) * BN * p.k_stride_r, p.k_stride_r, seq.len_k - n * BN);
  mma::cp_async_commit();

  float acc_o[MT][DB][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int db = 0; db < DB; ++db)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc_o[mt][db][c] = 0.f;
  float row_max[MT][2], row_sum[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      row_max[mt][hf] = -INFINITY;
      row_sum[mt][hf] = 0.f;
    }

  // Absolute positions of this thread's rows (mt, half): warp rows + lane / 4 (+ 8).
  const int g = lane / 4, t4 = lane % 4;

  while (n >= 0) {
    const int n_next = walker.prev(n);
    mma::cp_async_wait_all();
    __syncthreads();  // K[n] (and Q) visible to all; every warp is done with the previous V
    mma::load_tile_async<BN, D, NTHREADS>(sV, v + int64_t(n) * BN * p.v_stride_r, p.v_stride_r,
                                          seq.len_k - n * BN);
    mma::cp_async_commit();

    // S = Q K^T for this warp's rows.
    float acc_s[MT][NB][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int nb = 0; nb < NB; ++nb)
#pragma unroll
        for (int c = 0; c < 4; ++c) acc_s[mt][nb][c] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t a[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
        mma::ldsm_x4(a[mt], mma::smem_addr(sQ + mma::swz<D>(warp_row0 + mt * 16 + (lane & 15), kk * 16 + (lane >> 4) * 8)));
#pragma unroll
      for (int np = 0; np < NB / 2; ++np) {
        uint32_t bk[4];
        mma::ldsm_x4(bk, mma::smem_addr(sK + mma::swz<D>(np * 16 + (lane & 7) + ((lane >> 4) << 3),
                                                          kk * 16 + ((lane >> 3) & 1) * 8)));
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          Op::run(acc_s[mt][2 * np], a[mt], bk[0], bk[1]);
          Op::run(acc_s[mt][2 * np + 1], a[mt], bk[2], bk[3]);
        }
      }
    }

    // Element-wise mask on tiles that are not fully visible (diagonal, sequence end, window/sink edges,
    // block-row boundaries).
    const int j0 = n * BN;
    if (!tile_fully_visible(mode, i_first, i_last, j0, j0 + BN - 1, seq.len_k, p.sink, p.window, bb)) {
      const int cb = mode == kBlock ? j0 / bb.block_size : 0;
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          const int i = r0 + warp_row0 + mt * 16 + g + hf * 8 + seq.offset;
          const bool bit = mode == kBlock && i < seq.len_k && bb.bit_of_position(i, cb);
#pragma unroll
          for (int nb = 0; nb < NB; ++nb)
#pragma unroll
            for (int c = 0; c < 2; ++c) {
              const int j = j0 + nb * 8 + t4 * 2 + c;
              if (j >= seq.len_k || !key_visible(mode, i, j, p.sink, p.window, bit))
                acc_s[mt][nb][hf * 2 + c] = -INFINITY;
            }
        }
    }

    if (nf_any)  // rare path: rows that see a flagged key of this tile are NaN
      nf_rows |= fwd_rows_seeing_flagged<MT, BN>(nonfinite::KvFlags{nonfinite::KvFlags::masks_of(p, b, kvh), true}, n,
                                                  r0 + warp_row0 + g + seq.offset, t4, mode, seq.len_k, p.sink,
                                                  p.window, bb);

    mma::cp_async_wait_all();
    __syncthreads();  // V[n] visible; every warp is done reading K[n]
    // rare path: zero the flagged V rows before P V (0 * NaN would reach rows that cannot see them)
    if (nf_any) fwd_zero_flagged_v<BN, D, NTHREADS>(nonfinite::KvFlags::masks_of(p, b, kvh), n, mma::smem_addr(sV));
    if (n_next >= 0) {
      mma::load_tile_async<BN, D, NTHREADS>(sK, k + int64_t(n_next) * BN * p.k_stride_r, p.k_stride_r,
                                            seq.len_k - n_next * BN);
      mma::cp_async_commit();
    }

    // Online softmax (base 2): rows are spread over the 4 lanes of a quad.
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        float mx = row_max[mt][hf];
#pragma unroll
        for (int nb = 0; nb < NB; ++nb)
          mx = fmaxf(mx, fmaxf(acc_s[mt][nb][hf * 2], acc_s[mt][nb][hf * 2 + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float m_scaled = mx == -INFINITY ? 0.f : mx * p.scale_log2;
        const float alpha = exp2f(row_max[mt][hf] * p.scale_log2 - m_scaled);
        row_max[mt][hf] = mx;
        float sum = 0.f;
#pragma unroll
        for (int nb = 0; nb < NB; ++nb)
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            const float e = exp2f(acc_s[mt][nb][hf * 2 + c] * p.scale_log2 - m_scaled);
            acc_s[mt][nb][hf * 2 + c] = e;
            sum += e;
          }
        row_sum[mt][hf] = row_sum[mt][hf] * alpha + sum;
#pragma unroll
        for (int db = 0; db < DB; ++db) {
          acc_o[mt][db][hf * 2] *= alpha;
          acc_o[mt][db][hf * 2 + 1] *= alpha;
        }
      }

    // O += P V, P taken from the S accumulators (C layout == A layout, see attention_mma.cuh).
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      uint32_t a[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        a[mt][0] = Op::pack(acc_s[mt][2 * kk][0], acc_s[mt][2 * kk][1]);
        a[mt][1] = Op::pack(acc_s[mt][2 * kk][2], acc_s[mt][2 * kk][3]);
        a[mt][2] = Op::pack(acc_s[mt][2 * kk + 1][0], acc_s[mt][2 * kk + 1][1]);
        a[mt][3] = Op::pack(acc_s[mt][2 * kk + 1][2], acc_s[mt][2 * kk + 1][3]);
      }
#pragma unroll
      for (int dp = 0; dp < DB / 2; ++dp) {
        uint32_t bv[4];
        mma::ldsm_x4_trans(bv, mma::smem_addr(sV + mma::swz<D>(kk * 16 + (lane & 15), dp * 16 + (lane >> 4) * 8)));
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          Op::run(acc_o[mt][2 * dp], a[mt], bv[0], bv[1]);
          Op::run(acc_o[mt][2 * dp + 1], a[mt], bv[2], bv[3]);
        }
      }
    }
    n = n_next;
  }

  // Epilogue: normalise, write out and lse (natural log). Rows that saw no key: out 0, lse -inf; rows the
  // non-finite rule marked: NaN and NaN. Q is still in shared memory (never overwritten): its check runs here, once.
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const int row = warp_row0 + mt * 16 + g + hf * 8;
      if (nonfinite::q_row_part_nonfinite<T, D>(mma::smem_addr(sQ + row * D), 128u, t4)) nf_rows |= 1u << (2 * mt + hf);
    }
  nf_rows = nonfinite::quad_or(nf_rows);
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      float sum = row_sum[mt][hf];
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      sum += __shfl_xor_sync(0xffffffffu, sum, 2);
      const int r = r0 + warp_row0 + mt * 16 + g + hf * 8;
      if (r >= r_end) continue;
      const bool nan_row = (nf_rows >> (2 * mt + hf)) & 1u;
      const float inv = nan_row ? NAN : sum > 0.f ? 1.f / sum : 0.f;
      T* orow = out + int64_t(r) * p.o_stride_r;
#pragma unroll
      for (int db = 0; db < DB; ++db) {
        const uint32_t packed = Op::pack(acc_o[mt][db][hf * 2] * inv, acc_o[mt][db][hf * 2 + 1] * inv);
        *reinterpret_cast<uint32_t*>(orow + db * 8 + t4 * 2) = packed;
      }
      if (t4 == 0) lse[r] = nan_row ? NAN : sum > 0.f ? row_max[mt][hf] * p.scale + logf(sum) : -INFINITY;
    }
}

}  // namespace elastic
