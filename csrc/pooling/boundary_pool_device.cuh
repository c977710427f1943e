// Device steps of the boundary pool, shared by elastic::boundary_pool's kernel (boundary_pool_cuda.cu) and the fused
// router decision (csrc/router/router_decision_cuda.cu): one summation order, so both give the same pooled bits.
// Layout: kPoolDimLanes head-dim lanes (consecutive d: coalesced loads) x kPoolTokenLanes token lanes; each thread
// sums its tokens, the token lanes are then added in shared memory in lane order and divided by the count.
#pragma once
#include <cstdint>
#include <limits>

namespace elastic {

constexpr int kPoolDimLanes = 32;
constexpr int kPoolTokenLanes = 8;

// The pooled tokens of sequence b: the first `head` ones and those from tail_start on (a token in both windows
// counts once). Varlen bounds that are decreasing or outside the keys make valid false (the result is NaN).
struct PoolRange {
  int64_t start, head, tail_start, count;
  bool valid;
};

__device__ inline PoolRange pool_range(const int32_t* cu_seqlens, int64_t b, int64_t dense_len, int64_t total_tokens,
                                       int64_t n_first, int64_t n_last) {
  PoolRange r;
  r.start = 0;
  r.valid = true;
  int64_t len = dense_len;
  if (cu_seqlens != nullptr) {
    const int64_t lo = cu_seqlens[b], hi = cu_seqlens[b + 1];
    r.valid = lo >= 0 && lo <= hi && hi <= total_tokens;
    r.start = lo;
    len = r.valid ? hi - lo : 0;
  }
  r.head = len < n_first ? len : n_first;
  r.tail_start = (len - n_last) > r.head ? (len - n_last) : r.head;
  r.count = r.head + (len - r.tail_start);
  return r;
}

// One thread's sum over the pooled tokens token_lane, token_lane + kPoolTokenLanes, ...; base points at the
// sequence's first token for this thread's (head, dim).
template <typename scalar_t, typename acc_t>
__device__ inline acc_t pool_partial(const scalar_t* __restrict__ base, int64_t stride_s, const PoolRange& r,
                                     int token_lane) {
  acc_t acc = 0;
  for (int64_t i = token_lane; i < r.count; i += kPoolTokenLanes) {
    const int64_t t = i < r.head ? i : r.tail_start + (i - r.head);
    acc += static_cast<acc_t>(base[t * stride_s]);
  }
  return acc;
}

// pool_partial for kDims dims at once (base + j * dim_step for dim j): the same per-dim summation order (so the same
// bits) with the loads of all dims in flight together, for a kernel that pools a whole head in one CTA.
template <typename scalar_t, typename acc_t, int kDims>
__device__ inline void pool_partial_dims(const scalar_t* __restrict__ base, int64_t stride_s, int64_t dim_step,
                                         int n_dims, const PoolRange& r, int token_lane, acc_t (&acc)[kDims]) {
#pragma unroll
  for (int j = 0; j < kDims; ++j) acc[j] = 0;
  for (int64_t i = token_lane; i < r.count; i += kPoolTokenLanes) {
    const int64_t t = i < r.head ? i : r.tail_start + (i - r.head);
#pragma unroll
    for (int j = 0; j < kDims; ++j) {
      if (j < n_dims) acc[j] += static_cast<acc_t>(base[t * stride_s + j * dim_step]);
    }
  }
}

// The pooled value of one dim from the token lanes' partial sums (partial[y][dim_lane], y in lane order).
template <typename acc_t>
__device__ inline acc_t pool_finish(const acc_t (*partial)[kPoolDimLanes], int dim_lane, const PoolRange& r) {
  acc_t sum = 0;
#pragma unroll
  for (int y = 0; y < kPoolTokenLanes; ++y) sum += partial[y][dim_lane];
  if (!r.valid) return std::numeric_limits<acc_t>::quiet_NaN();
  return r.count > 0 ? sum / static_cast<acc_t>(r.count) : acc_t(0);  // an empty sequence pools to zeros
}

}  // namespace elastic
