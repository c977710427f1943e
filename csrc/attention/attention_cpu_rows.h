// Row-wise loops of the CPU attention kernels on a [rows, cols] tile (row-major, contiguous).
// The float versions are vectorised (OpenMP simd + target_clones for AVX2/AVX-512, with a
// polynomial exp), because ATen's per-op overhead and exp dominate at tile sizes; the double
// versions use std::exp and serve gradcheck, where exactness matters more than speed.
#pragma once
#include <cstdint>

namespace elastic {
namespace cpu {

// s[r, j] = exp(scale * s[r, j] - shift[r]) (exactly 0 where s is -inf; scale > 0); row_sum[r] = sum_j of
// the result when row_sum is not null. The forward passes the softmax scale here, on unscaled scores.
void exp_shifted(float* s, int64_t rows, int64_t cols, float scale, const float* shift, float* row_sum);
void exp_shifted(double* s, int64_t rows, int64_t cols, double scale, const double* shift, double* row_sum);

// dp[r, j] = p[r, j] * (dp[r, j] - delta[r])   (softmax backward: dS from dP).
void softmax_grad(float* dp, const float* p, int64_t rows, int64_t cols, const float* delta);
void softmax_grad(double* dp, const double* p, int64_t rows, int64_t cols, const double* delta);

// out[r] = scale * max_j s[r, j] (-inf for a row of -inf; scale > 0), s unchanged. Row r starts at s + r * ld.
void scaled_row_max(const float* s, int64_t rows, int64_t cols, int64_t ld, float scale, float* out);
void scaled_row_max(const double* s, int64_t rows, int64_t cols, int64_t ld, double scale, double* out);

// exp(scale * s[r, j] - shift[r]) rounded to bfloat16 (nearest even; the bits) into lowp (row r at lowp + r * ld_p),
// s unchanged (row r at s + r * ld_s): the probabilities operand of a bfloat16 P.V GEMM; columns
// [cols, ld_p) of lowp are written as 0 (padding for a GEMM whose K must be even). row_sum sums the fp32 values.
void exp_shifted_bf16(const float* s, int64_t rows, int64_t cols, int64_t ld_s, float scale, const float* shift,
                      float* row_sum, uint16_t* lowp, int64_t ld_p);

// Copies n elements (src == dst allowed) and says whether they are all finite; a non-finite row is written as zeros, so
// that it cannot reach other rows through a GEMM (0 * inf = NaN). bf16 is passed as its bits.
bool copy_finite_or_zero(const float* src, float* dst, int64_t n);
bool copy_finite_or_zero(const double* src, double* dst, int64_t n);
bool copy_finite_or_zero(const uint16_t* src, uint16_t* dst, int64_t n);

// x[r, :] *= factor[r].
void scale_rows(float* x, int64_t rows, int64_t cols, const float* factor);
void scale_rows(double* x, int64_t rows, int64_t cols, const double* factor);

}  // namespace cpu
}  // namespace elastic
