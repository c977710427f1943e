// Vectorised row loops of the CPU attention kernels (see attention_cpu_rows.h).
#include "attention/attention_cpu_rows.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

// One clone per ISA level, picked at load time (GCC ifunc): x86-64-v4 (AVX-512), v3 (AVX2 + FMA; the
// exp polynomial is FMA-bound) and the portable default.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define ELASTIC_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define ELASTIC_CPU_CLONES
#endif

// GCC/Clang vector extensions: 16 float lanes, lowered to one AVX-512 register in the v4 clone, two
// AVX2 registers in the v3 one and four SSE registers in the default one (auto-vectorisation of the
// exp loop is not reliable).
#pragma GCC diagnostic ignored "-Wpsabi"  // vfloat never crosses an ABI boundary: everything is inlined
typedef float vfloat __attribute__((vector_size(64)));  // kLanes floats
typedef int32_t vint __attribute__((vector_size(64)));
typedef uint32_t vuint __attribute__((vector_size(64)));
typedef uint16_t vhalf __attribute__((vector_size(32)));  // kLanes bfloat16 bits
constexpr int64_t kLanes = 16;
#define ELASTIC_INLINE __attribute__((always_inline)) inline

namespace elastic {
namespace cpu {
namespace {

ELASTIC_INLINE vfloat splat(float x) { return vfloat{} + x; }

// Lanes [0, n) of p, the rest `fill` (n <= kLanes).
ELASTIC_INLINE vfloat load(const float* p, int64_t n, float fill) {
  vfloat v = splat(fill);
  std::memcpy(&v, p, sizeof(float) * n);
  return v;
}
ELASTIC_INLINE void store(float* p, vfloat v, int64_t n) { std::memcpy(p, &v, sizeof(float) * n); }
ELASTIC_INLINE vfloat load_full(const float* p) {
  vfloat v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
ELASTIC_INLINE void store_full(float* p, vfloat v) { std::memcpy(p, &v, sizeof v); }

// exp(x) for x <= 88, relative error ~2 ulp; exactly 0 for x < -87.3 (so exp(-inf) = 0).
// Range reduction x = n ln2 + f with |f| <= ln2 / 2 (ln2 split in two parts so n ln2 is exact),
// e^f by the degree-6 minimax polynomial of Cephes' expf, 2^n built in the exponent bits.
ELASTIC_INLINE vfloat exp_lanes(vfloat x) {
  const vfloat lowest = splat(-87.3f), highest = splat(88.0f);
  const vint keep = x >= lowest;
  x = x < lowest ? lowest : x;
  x = x > highest ? highest : x;
  const vfloat round_magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to the nearest integer
  const vfloat t = x * 1.44269504088896341f + round_magic;
  const vfloat n = t - round_magic;
  const vint n_int = (vint)t - (vint)round_magic;
  const vfloat f = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  vfloat p = splat(1.9875691500e-4f);
  p = p * f + 1.3981999507e-3f;
  p = p * f + 8.3334519073e-3f;
  p = p * f + 4.1665795894e-2f;
  p = p * f + 1.6666665459e-1f;
  p = p * f + 5.0000001201e-1f;
  const vfloat e = (p * (f * f) + f + 1.0f) * (vfloat)((n_int + 127) << 23);
  return (vfloat)((vint)e & keep);
}

ELASTIC_INLINE float horizontal_sum(vfloat v) {
  float s = 0.0f;
  for (int l = 0; l < kLanes; ++l) s += v[l];
  return s;
}
ELASTIC_INLINE float horizontal_max(vfloat v) {
  float m = v[0];
  for (int l = 1; l < kLanes; ++l) m = v[l] > m ? v[l] : m;
  return m;
}

}  // namespace

ELASTIC_CPU_CLONES void exp_shifted(float* s, int64_t rows, int64_t cols, float scale, const float* shift,
                                    float* row_sum) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  for (int64_t r = 0; r < rows; ++r) {
    float* x = s + r * cols;
    vfloat sum = splat(0.0f);
    int64_t j = 0;
    for (; j + kLanes <= cols; j += kLanes) {
      const vfloat e = exp_lanes(load_full(x + j) * scale - shift[r]);
      store_full(x + j, e);
      sum += e;
    }
    if (j < cols) {
      const vfloat e = exp_lanes(load(x + j, cols - j, neg_inf) * scale - shift[r]);  // padding: exp(-inf) = 0
      store(x + j, e, cols - j);
      sum += e;
    }
    if (row_sum) row_sum[r] = horizontal_sum(sum);
  }
}

ELASTIC_CPU_CLONES void scaled_row_max(const float* s, int64_t rows, int64_t cols, int64_t ld, float scale,
                                       float* out) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  for (int64_t r = 0; r < rows; ++r) {
    const float* x = s + r * ld;
    vfloat m = splat(neg_inf);
    int64_t j = 0;
    for (; j + kLanes <= cols; j += kLanes) {
      const vfloat v = load_full(x + j);
      m = v > m ? v : m;
    }
    if (j < cols) {
      const vfloat v = load(x + j, cols - j, neg_inf);
      m = v > m ? v : m;
    }
    out[r] = horizontal_max(m) * scale;
  }
}

// float -> bfloat16 bits, round to nearest even (inputs are finite probabilities here).
ELASTIC_INLINE vint to_bf16_bits(vfloat x) {
  const vint u = (vint)x;
  return (vint)(((vuint)u + ((((vuint)u) >> 16) & 1u) + 0x7FFFu) >> 16);
}

ELASTIC_CPU_CLONES void exp_shifted_bf16(const float* s, int64_t rows, int64_t cols, int64_t ld_s, float scale,
                                         const float* shift, float* row_sum, uint16_t* lowp, int64_t ld_p) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  for (int64_t r = 0; r < rows; ++r) {
    const float* x = s + r * ld_s;
    uint16_t* y = lowp + r * ld_p;
    std::fill(y + cols, y + ld_p, uint16_t(0));
    vfloat sum = splat(0.0f);
    int64_t j = 0;
    for (; j + kLanes <= cols; j += kLanes) {
      const vfloat e = exp_lanes(load_full(x + j) * scale - shift[r]);
      const vhalf b = __builtin_convertvector(to_bf16_bits(e), vhalf);
      std::memcpy(y + j, &b, sizeof b);
      sum += e;
    }
    if (j < cols) {
      const vfloat e = exp_lanes(load(x + j, cols - j, neg_inf) * scale - shift[r]);  // padding: exp(-inf) = 0
      const vhalf b = __builtin_convertvector(to_bf16_bits(e), vhalf);
      std::memcpy(y + j, &b, sizeof(uint16_t) * (cols - j));
      sum += e;
    }
    row_sum[r] = horizontal_sum(sum);
  }
}

// x - x is 0 for finite x and NaN for inf / NaN; summing it keeps the loop branch-free and vectorised.
template <typename T>
ELASTIC_INLINE bool copy_finite_or_zero_impl(const T* src, T* dst, int64_t n) {
  if (dst != src) std::memcpy(dst, src, sizeof(T) * n);
  T probe = T(0);
#pragma omp simd reduction(+ : probe)
  for (int64_t i = 0; i < n; ++i) probe += src[i] - src[i];
  if (probe == T(0)) return true;
  std::fill(dst, dst + n, T(0));
  return false;
}
ELASTIC_CPU_CLONES bool copy_finite_or_zero(const float* src, float* dst, int64_t n) {
  return copy_finite_or_zero_impl(src, dst, n);
}
bool copy_finite_or_zero(const double* src, double* dst, int64_t n) { return copy_finite_or_zero_impl(src, dst, n); }
ELASTIC_CPU_CLONES bool copy_finite_or_zero(const uint16_t* src, uint16_t* dst, int64_t n) {
  if (dst != src) std::memcpy(dst, src, sizeof(uint16_t) * n);
  uint32_t non_finite = 0;  // bfloat16: non-finite iff the 8 exponent bits are all ones
#pragma omp simd reduction(+ : non_finite)
  for (int64_t i = 0; i < n; ++i) non_finite += (src[i] & 0x7F80u) == 0x7F80u;
  if (non_finite == 0) return true;
  std::fill(dst, dst + n, uint16_t(0));
  return false;
}

void scaled_row_max(const double* s, int64_t rows, int64_t cols, int64_t ld, double scale, double* out) {
  for (int64_t r = 0; r < rows; ++r) {
    const double* x = s + r * ld;
    double m = -std::numeric_limits<double>::infinity();
    for (int64_t j = 0; j < cols; ++j) m = x[j] > m ? x[j] : m;
    out[r] = m * scale;
  }
}

void exp_shifted(double* s, int64_t rows, int64_t cols, double scale, const double* shift, double* row_sum) {
  for (int64_t r = 0; r < rows; ++r) {
    double* x = s + r * cols;
    const double sh = shift[r];
    double sum = 0.0;
    for (int64_t j = 0; j < cols; ++j) {
      const double e = std::exp(x[j] * scale - sh);
      x[j] = e;
      sum += e;
    }
    if (row_sum) row_sum[r] = sum;
  }
}

ELASTIC_CPU_CLONES void softmax_grad(float* dp, const float* p, int64_t rows, int64_t cols, const float* delta) {
  for (int64_t r = 0; r < rows; ++r) {
    float* x = dp + r * cols;
    const float* pr = p + r * cols;
    const float d = delta[r];
#pragma omp simd
    for (int64_t j = 0; j < cols; ++j) x[j] = pr[j] * (x[j] - d);
  }
}

void softmax_grad(double* dp, const double* p, int64_t rows, int64_t cols, const double* delta) {
  for (int64_t r = 0; r < rows; ++r) {
    double* x = dp + r * cols;
    const double* pr = p + r * cols;
    for (int64_t j = 0; j < cols; ++j) x[j] = pr[j] * (x[j] - delta[r]);
  }
}

ELASTIC_CPU_CLONES void scale_rows(float* x, int64_t rows, int64_t cols, const float* factor) {
  for (int64_t r = 0; r < rows; ++r) {
    float* xr = x + r * cols;
    const float f = factor[r];
#pragma omp simd
    for (int64_t j = 0; j < cols; ++j) xr[j] *= f;
  }
}

void scale_rows(double* x, int64_t rows, int64_t cols, const double* factor) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < cols; ++j) x[r * cols + j] *= factor[r];
}

}  // namespace cpu
}  // namespace elastic
