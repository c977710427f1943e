// Backward kernels of elastic attention (both strategies compute the same function):
//   1. preprocess: delta_i = rowsum(dO_i * O_i) - grad_lse_i (fp32, layout of lse);
//   2. main: one CTA per (key tile, KV head, batch). It keeps dK, dV of its BN keys in registers, loops
//      over the G query heads of the KV head and the query tiles that can see its key tile (mode aware),
//      and adds dQ through fp32 atomics into a scratch buffer (no atomics for dK/dV);
//   3. convert: dq = dq_accum * scale in the input dtype.
// With P = exp(S * scale - lse) and dP = dO V^T: dS = P * (dP - delta) (the grad_lse term enters as
// d lse / d s = p), dV = P^T dO, dK = scale * dS^T Q, dQ = scale * dS K.
//
// Warp layout of the main kernel: warp w owns key rows [16w, 16w + 16) of the tile and computes the
// transposed products S^T = K Q^T and dP^T = V dO^T, whose C fragments are directly the A operands of
// dV += P^T dO and dK += dS^T Q. dS^T goes through shared memory once, for dQ = dS K (warp w: query rows
// [16w, 16w + 16)).
#pragma once
#include <cmath>

#include "attention/attention_mma.cuh"
#include "attention/attention_params.h"
#include "attention/attention_tiles.cuh"
#include "attention/kernel_utils.cuh"
#include "attention/nonfinite.cuh"

namespace elastic {

template <typename T, int D_>
struct BwdTraits {
  static constexpr int D = D_, BM = 64, BN = 64, NWARPS = 4, NTHREADS = 128;
  static constexpr int DB = D / 8;
  static constexpr int SMEM_BYTES =
      (2 * BN * D + 2 * BM * D + BN * BM) * static_cast<int>(sizeof(T)) + 3 * BM * static_cast<int>(sizeof(float));
  static_assert(BN == 16 * NWARPS && BM == 16 * NWARPS, "one m16 tile of keys / queries per warp");
};

// delta = rowsum(dO * O) - grad_lse; D / 8 lanes per (query row, head), each with one 16-byte load of O and of dO
// (rows are 16-byte aligned: rows_aligned in attention_cuda_api.cpp). One warp per row with 2-byte loads ran at ~2.3
// TB/s (0.21-0.24 ms for O and dO of a 32K Llama-shaped call on an H200; 8-byte loads per lane did not change it).
// Non-finite rule (nonfinite.cuh): a "bad" row (lse NaN: a NaN row of the forward; or a non-finite dO / grad_lse row,
// which makes delta non-finite) gets delta = NaN, which the main kernel reads as the row's mark, and a NaN dq_accum
// row (its dq is NaN even when it sees no key; the main kernel's atomics add to the NaN).
// grid (ceil(max_len_q * Hq / kPairs), B): launch_attention_bwd_preprocess (attention_bwd_launch.cuh).
template <int D>
struct BwdPreprocessShape {
  static constexpr int kLanes = D / 8, kThreads = 128, kPairs = kThreads / kLanes;  // (row, head) pairs per CTA
  static_assert(D % 8 == 0 && 32 % kLanes == 0, "a pair's lanes inside one warp");
};

template <typename T, int D>
__global__ void __launch_bounds__(BwdPreprocessShape<D>::kThreads) attention_bwd_preprocess_kernel(
    const AttentionBwdParams p) {
  using Shape = BwdPreprocessShape<D>;
  const int b = blockIdx.y;
  const SeqInfo seq = seq_info(p, b);
  const int64_t pair = int64_t(blockIdx.x) * Shape::kPairs + threadIdx.x / Shape::kLanes;
  const int r = static_cast<int>(pair / p.heads_q);
  const int h = static_cast<int>(pair % p.heads_q);
  const int c0 = (threadIdx.x % Shape::kLanes) * 8;  // this lane's 8 columns
  const bool live = r < seq.len_q;                   // uniform over the pair's lanes; all lanes reach the shuffles
  float sum = 0.f;
  if (live) {
    const T* o = static_cast<const T*>(p.out) + b * p.o_stride_b + int64_t(seq.q_start + r) * p.o_stride_r +
                 h * p.o_stride_h;
    const T* d_o = static_cast<const T*>(p.dout) + b * p.do_stride_b + int64_t(seq.q_start + r) * p.do_stride_r +
                   h * p.do_stride_h;
    const uint4 o_v = *reinterpret_cast<const uint4*>(o + c0);
    const uint4 do_v = *reinterpret_cast<const uint4*>(d_o + c0);
    const T* o_e = reinterpret_cast<const T*>(&o_v);
    const T* do_e = reinterpret_cast<const T*>(&do_v);
#pragma unroll
    for (int e = 0; e < 8; ++e) sum += static_cast<float>(o_e[e]) * static_cast<float>(do_e[e]);
  }
#pragma unroll
  for (int off = Shape::kLanes / 2; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
  if (!live) return;
  const int64_t at = b * p.lse_stride_b + h * p.lse_stride_h + seq.q_start + r;
  const float delta = sum - (p.grad_lse != nullptr ? p.grad_lse[at] : 0.f);
  const bool bad = isnan(p.lse[at]) || !isfinite(delta);
  if (c0 == 0) p.delta[at] = bad ? NAN : delta;
  if (bad) {
    float* dqa = p.dq_accum + b * p.dqa_stride_b + int64_t(seq.q_start + r) * p.dqa_stride_r + h * p.dqa_stride_h;
#pragma unroll
    for (int e = 0; e < 8; ++e) dqa[c0 + e] = NAN;
  }
}

// dq = dq_accum * scale, over the n elements of the (contiguous) dq tensor. kVec8: 8 elements per thread and
// step, two 16-byte streaming loads and one 16-byte store (both buffers 16-byte aligned; the launch checks), the
// scalar tail after n / 8 * 8. One element per thread ran at ~1.8 TB/s (0.43 ms for a 32K Llama-shaped dq on an
// H200, about 2.5x the time its 768 MB of traffic take at HBM speed).
template <typename T, bool kVec8>
__global__ void attention_bwd_convert_dq_kernel(const float* dq_accum, T* dq, int64_t n, float scale) {
  const int64_t step = int64_t(gridDim.x) * blockDim.x;
  const int64_t first = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  int64_t done = 0;
  if constexpr (kVec8) {
    using Op = mma::MmaOp<T>;
    const float4* src = reinterpret_cast<const float4*>(dq_accum);
    uint4* dst = reinterpret_cast<uint4*>(dq);
    done = n / 8 * 8;
    for (int64_t i = first; i < n / 8; i += step) {
      const float4 a = __ldcs(src + 2 * i), b = __ldcs(src + 2 * i + 1);
      dst[i] = make_uint4(Op::pack(a.x * scale, a.y * scale), Op::pack(a.z * scale, a.w * scale),
                          Op::pack(b.x * scale, b.y * scale), Op::pack(b.z * scale, b.w * scale));
    }
  }
  for (int64_t idx = done + first; idx < n; idx += step) dq[idx] = to_elem<T>(dq_accum[idx] * scale);
}

template <typename T, typename Tr>
__device__ __forceinline__ void bwd_store_rows(T* base, int64_t row_stride, const float (&acc)[Tr::DB][4], int row0,
                                               int valid_rows, float mul) {
  using Op = mma::MmaOp<T>;
  const int lane = threadIdx.x % 32, g = lane / 4, t4 = lane % 4;
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    const int r = row0 + g + hf * 8;
    if (r >= valid_rows) continue;
#pragma unroll
    for (int db = 0; db < Tr::DB; ++db)
      *reinterpret_cast<uint32_t*>(base + int64_t(r) * row_stride + db * 8 + t4 * 2) =
          Op::pack(acc[db][hf * 2] * mul, acc[db][hf * 2 + 1] * mul);
  }
}

template <typename T, typename Tr>
__global__ void __launch_bounds__(Tr::NTHREADS) attention_bwd_kernel(const AttentionBwdParams p) {
  constexpr int D = Tr::D, BM = Tr::BM, BN = Tr::BN, NTHREADS = Tr::NTHREADS, DB = Tr::DB;
  constexpr int QB = BM / 8;  // n8 blocks of query columns in S^T
  using Op = mma::MmaOp<T>;

  const int n_block = blockIdx.x;
  const int kvh = blockIdx.y;
  const int b = blockIdx.z;
  const SeqInfo seq = seq_info(p, b);
  const int j0 = n_block * BN;
  if (j0 >= seq.len_k) return;
  const int valid_k = min(BN, seq.len_k - j0);
  const int mode = p.head_mode[b * p.head_mode_stride_b + kvh * p.head_mode_stride_h];

  const T* k = static_cast<const T*>(p.k) + b * p.k_stride_b + int64_t(seq.k_start + j0) * p.k_stride_r + kvh * p.k_stride_h;
  const T* v = static_cast<const T*>(p.v) + b * p.v_stride_b + int64_t(seq.k_start + j0) * p.v_stride_r + kvh * p.v_stride_h;
  T* dk = static_cast<T*>(p.dk) + b * p.dk_stride_b + int64_t(seq.k_start + j0) * p.dk_stride_r + kvh * p.dk_stride_h;
  T* dv = static_cast<T*>(p.dv) + b * p.dv_stride_b + int64_t(seq.k_start + j0) * p.dv_stride_r + kvh * p.dv_stride_h;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t4 = lane % 4;
  float acc_dk[DB][4], acc_dv[DB][4];
  const bool valid_mode = mode_is_valid(mode, p);
  const float fill = valid_mode ? 0.f : NAN;  // invalid mode: NaN gradients for the head's keys, like its output
#pragma unroll
  for (int db = 0; db < DB; ++db)
#pragma unroll
    for (int c = 0; c < 4; ++c) acc_dk[db][c] = acc_dv[db][c] = fill;

  if (valid_mode) {
    extern __shared__ __align__(128) unsigned char smem_raw[];
    T* sK = reinterpret_cast<T*>(smem_raw);
    T* sV = sK + BN * D;
    T* sQ = sV + BN * D;
    T* sdO = sQ + BM * D;
    T* sdS = sdO + BM * D;                                   // dS^T [BN][BM]
    float* s_lse2 = reinterpret_cast<float*>(sdS + BN * BM);  // lse * log2(e), +inf past the sequence
    float* s_delta = s_lse2 + BM;
    float* s_bit = s_delta + BM;                              // BLOCK bit of each query row for this key block

    mma::load_tile_async<BN, D, NTHREADS>(sK, k, p.k_stride_r, valid_k);
    mma::load_tile_async<BN, D, NTHREADS>(sV, v, p.v_stride_r, valid_k);
    mma::cp_async_commit();
    // Non-finite rule: zero the non-finite K / V rows of this key tile once (the rows that see them are the forward's
    // NaN rows, whose P is NaN below; a zero row keeps 0 * inf out of every other gradient).
    {
      __shared__ uint32_t s_kv_bad[BN / 32];
      if (threadIdx.x < BN / 32) s_kv_bad[threadIdx.x] = 0u;
      mma::cp_async_wait_all();
      __syncthreads();
      constexpr int CH = D / 8;
      for (int i = threadIdx.x; i < BN * CH; i += NTHREADS) {
        const int r = i / CH, c = i % CH;
        const uint32_t acc = nonfinite::absmax2(nonfinite::absmax2(0u, nonfinite::lds128(mma::smem_addr(sK + r * D + c * 8))),
                                                nonfinite::lds128(mma::smem_addr(sV + r * D + c * 8)));
        if (nonfinite::any_nonfinite<T>(acc)) atomicOr(&s_kv_bad[r / 32], 1u << (r % 32));
      }
      __syncthreads();
      uint32_t m[BN / 32];
#pragma unroll
      for (int w = 0; w < BN / 32; ++w) m[w] = s_kv_bad[w];
      if (nonfinite::any_bit(m)) {  // the same words in every thread: a uniform branch
        nonfinite::zero_rows_dense<BN, D>(mma::smem_addr(sK), m, threadIdx.x, NTHREADS);
        nonfinite::zero_rows_dense<BN, D>(mma::smem_addr(sV), m, threadIdx.x, NTHREADS);
      }
      // the loop's first __syncthreads orders these stores before any read
    }

    const int j_last = j0 + valid_k - 1;
    const int num_m = (seq.len_q + BM - 1) / BM;
    const int m_min = max(0, j0 - seq.offset) / BM;  // first query tile with a row at or after key j0
    const int kr0 = warp * 16;                       // this warp's key rows
    constexpr float kLog2e = 1.4426950408889634f;

    for (int hh = 0; hh < p.group; ++hh) {
      const int h = kvh * p.group + hh;
      const BlockBits bb = block_bits(p, b, h, kvh);
      const T* q = static_cast<const T*>(p.q) + b * p.q_stride_b + int64_t(seq.q_start) * p.q_stride_r + h * p.q_stride_h;
      const T* d_o = static_cast<const T*>(p.dout) + b * p.do_stride_b + int64_t(seq.q_start) * p.do_stride_r +
                     h * p.do_stride_h;
      const float* lse = p.lse + b * p.lse_stride_b + h * p.lse_stride_h + seq.q_start;
      const float* delta = p.delta + b * p.lse_stride_b + h * p.lse_stride_h + seq.q_start;
      float* dqa = p.dq_accum + b * p.dqa_stride_b + int64_t(seq.q_start) * p.dqa_stride_r + h * p.dqa_stride_h;

      for (int m = m_min; m < num_m; ++m) {
        const int r0 = m * BM;
        const int r_end = min(r0 + BM, seq.len_q);
        const int i_first = r0 + seq.offset, i_last = r_end - 1 + seq.offset;
        if (!tile_may_be_visible(mode, i_first, i_last, j0, j_last, p.sink, p.window, bb)) {
          // STREAM keys outside the sink are seen only by queries within the window: later tiles can't.
          if (mode == kStream && j0 >= p.sink && i_first - j_last >= p.window) break;
          continue;
        }
        const bool full = tile_fully_visible(mode, i_first, i_last, j0, j0 + BN - 1, seq.len_k, p.sink, p.window, bb);

        __syncthreads();  // the previous tile's Q, dO, dS^T are no longer read
        mma::load_tile_async<BM, D, NTHREADS>(sQ, q + int64_t(r0) * p.q_stride_r, p.q_stride_r, r_end - r0);
        mma::load_tile_async<BM, D, NTHREADS>(sdO, d_o + int64_t(r0) * p.do_stride_r, p.do_stride_r, r_end - r0);
        mma::cp_async_commit();
        int bad_rows = 0;  // a row of this tile is bad (delta NaN, set by the preprocess)
        for (int rr = threadIdx.x; rr < BM; rr += NTHREADS) {
          const int r = r0 + rr;
          const bool in = r < r_end;
          const float d = in ? delta[r] : 0.f;
          bad_rows |= isnan(d);
          s_lse2[rr] = in ? (isnan(d) ? NAN : lse[r] * kLog2e) : INFINITY;  // bad rows: visible P is NaN
          s_delta[rr] = d;
          s_bit[rr] = (in && mode == kBlock && bb.bit_of_position(r + seq.offset, j0 / bb.block_size)) ? 1.f : 0.f;
        }
        mma::cp_async_wait_all();
        if (__syncthreads_or(bad_rows)) {  // rare path: zero the bad rows' Q and dO (0 * inf in masked products)
          constexpr int CH = D / 8;
          for (int i = threadIdx.x; i < BM * CH; i += NTHREADS) {
            const int rr = i / CH, c = i % CH;
            if (isnan(s_delta[rr])) {
              nonfinite::sts128_zero(mma::smem_addr(sQ + rr * D + c * 8));
              nonfinite::sts128_zero(mma::smem_addr(sdO + rr * D + c * 8));
            }
          }
          __syncthreads();
        }

        // S^T = K Q^T and dP^T = V dO^T for this warp's 16 keys x BM queries.
        float acc_s[QB][4], acc_dp[QB][4];
#pragma unroll
        for (int nb = 0; nb < QB; ++nb)
#pragma unroll
          for (int c = 0; c < 4; ++c) acc_s[nb][c] = acc_dp[nb][c] = 0.f;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
          uint32_t ak[4], av[4];
          mma::ldsm_x4(ak, mma::smem_addr(sK + mma::swz<D>(kr0 + (lane & 15), kk * 16 + (lane >> 4) * 8)));
          mma::ldsm_x4(av, mma::smem_addr(sV + mma::swz<D>(kr0 + (lane & 15), kk * 16 + (lane >> 4) * 8)));
#pragma unroll
          for (int np = 0; np < QB / 2; ++np) {
            const int row = np * 16 + (lane & 7) + ((lane >> 4) << 3);
            const int col = kk * 16 + ((lane >> 3) & 1) * 8;
            uint32_t bq[4], bo[4];
            mma::ldsm_x4(bq, mma::smem_addr(sQ + mma::swz<D>(row, col)));
            mma::ldsm_x4(bo, mma::smem_addr(sdO + mma::swz<D>(row, col)));
            Op::run(acc_s[2 * np], ak, bq[0], bq[1]);
            Op::run(acc_s[2 * np + 1], ak, bq[2], bq[3]);
            Op::run(acc_dp[2 * np], av, bo[0], bo[1]);
            Op::run(acc_dp[2 * np + 1], av, bo[2], bo[3]);
          }
        }

        // P^T (masked) and dS^T = P^T * (dP^T - delta), in place of acc_s / acc_dp.
#pragma unroll
        for (int nb = 0; nb < QB; ++nb)
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            const int kr = kr0 + g + (c >> 1) * 8;
            const int qc = nb * 8 + t4 * 2 + (c & 1);
            bool vis = full;
            if (!full) {
              const int j = j0 + kr, r = r0 + qc;
              vis = j < seq.len_k && r < r_end &&
                    key_visible(mode, r + seq.offset, j, p.sink, p.window, s_bit[qc] != 0.f);
            }
            // masked P and dS are 0 by selection: a bad row's NaN lse / delta must not reach them
            const float pr = vis ? exp2f(acc_s[nb][c] * p.scale_log2 - s_lse2[qc]) : 0.f;
            acc_s[nb][c] = pr;
            acc_dp[nb][c] = vis ? pr * (acc_dp[nb][c] - s_delta[qc]) : 0.f;
          }

        // dV += P^T dO and dK += dS^T Q (the query rows are the k dimension).
#pragma unroll
        for (int kk = 0; kk < BM / 16; ++kk) {
          uint32_t ap[4], ads[4];
          ap[0] = Op::pack(acc_s[2 * kk][0], acc_s[2 * kk][1]);
          ap[1] = Op::pack(acc_s[2 * kk][2], acc_s[2 * kk][3]);
          ap[2] = Op::pack(acc_s[2 * kk + 1][0], acc_s[2 * kk + 1][1]);
          ap[3] = Op::pack(acc_s[2 * kk + 1][2], acc_s[2 * kk + 1][3]);
          ads[0] = Op::pack(acc_dp[2 * kk][0], acc_dp[2 * kk][1]);
          ads[1] = Op::pack(acc_dp[2 * kk][2], acc_dp[2 * kk][3]);
          ads[2] = Op::pack(acc_dp[2 * kk + 1][0], acc_dp[2 * kk + 1][1]);
          ads[3] = Op::pack(acc_dp[2 * kk + 1][2], acc_dp[2 * kk + 1][3]);
#pragma unroll
          for (int dp = 0; dp < DB / 2; ++dp) {
            const int row = kk * 16 + (lane & 15);
            const int col = dp * 16 + (lane >> 4) * 8;
            uint32_t bo[4], bq[4];
            mma::ldsm_x4_trans(bo, mma::smem_addr(sdO + mma::swz<D>(row, col)));
            mma::ldsm_x4_trans(bq, mma::smem_addr(sQ + mma::swz<D>(row, col)));
            Op::run(acc_dv[2 * dp], ap, bo[0], bo[1]);
            Op::run(acc_dv[2 * dp + 1], ap, bo[2], bo[3]);
            Op::run(acc_dk[2 * dp], ads, bq[0], bq[1]);
            Op::run(acc_dk[2 * dp + 1], ads, bq[2], bq[3]);
          }
          // dS^T to shared memory (16-bit, as the matmul consumes it).
          *reinterpret_cast<uint32_t*>(sdS + mma::swz<BM>(kr0 + g, kk * 16 + t4 * 2)) = ads[0];
          *reinterpret_cast<uint32_t*>(sdS + mma::swz<BM>(kr0 + g + 8, kk * 16 + t4 * 2)) = ads[1];
          *reinterpret_cast<uint32_t*>(sdS + mma::swz<BM>(kr0 + g, kk * 16 + 8 + t4 * 2)) = ads[2];
          *reinterpret_cast<uint32_t*>(sdS + mma::swz<BM>(kr0 + g + 8, kk * 16 + 8 + t4 * 2)) = ads[3];
        }
        __syncthreads();  // dS^T complete

        // dQ[q rows 16w..] += dS K, in 64-column halves to bound registers; fp32 atomics.
        const int qr0 = warp * 16;
#pragma unroll
        for (int dh = 0; dh < D / 64; ++dh) {
          float acc_dq[8][4];
#pragma unroll
          for (int nb = 0; nb < 8; ++nb)
#pragma unroll
            for (int c = 0; c < 4; ++c) acc_dq[nb][c] = 0.f;
#pragma unroll
          for (int kk = 0; kk < BN / 16; ++kk) {
            uint32_t a[4];
            mma::ldsm_x4_trans(a, mma::smem_addr(sdS + mma::swz<BM>(kk * 16 + (lane & 7) + ((lane >> 4) << 3),
                                                                     qr0 + ((lane >> 3) & 1) * 8)));
#pragma unroll
            for (int dp = 0; dp < 4; ++dp) {
              uint32_t bk[4];
              mma::ldsm_x4_trans(bk, mma::smem_addr(sK + mma::swz<D>(kk * 16 + (lane & 15),
                                                                      dh * 64 + dp * 16 + (lane >> 4) * 8)));
              Op::run(acc_dq[2 * dp], a, bk[0], bk[1]);
              Op::run(acc_dq[2 * dp + 1], a, bk[2], bk[3]);
            }
          }
#pragma unroll
          for (int hf = 0; hf < 2; ++hf) {
            const int r = r0 + qr0 + g + hf * 8;
            if (r >= r_end) continue;
            float* row = dqa + int64_t(r) * p.dqa_stride_r + dh * 64 + t4 * 2;
#pragma unroll
            for (int nb = 0; nb < 8; ++nb) {
              atomicAdd(row + nb * 8, acc_dq[nb][hf * 2]);
              atomicAdd(row + nb * 8 + 1, acc_dq[nb][hf * 2 + 1]);
            }
          }
        }
      }
    }
  }

  bwd_store_rows<T, Tr>(dv, p.dv_stride_r, acc_dv, warp * 16, valid_k, 1.f);
  bwd_store_rows<T, Tr>(dk, p.dk_stride_r, acc_dk, warp * 16, valid_k, p.scale);
}

}  // namespace elastic
