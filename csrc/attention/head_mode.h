// Head modes and the token-level visibility rule shared by every kernel (CPU and CUDA).
// This header is the single statement of the semantics; kernels may skip whole tiles, but a tile
// they skip must contain no visible (query, key) pair, and a tile they partially visit must be
// masked element-wise with key_visible().
//
// Non-finite inputs: an output row (and its lse) is NaN iff an element of its query row, or of a key or
// value row it can see (key_visible), is non-finite (NaN, +inf, -inf); keys and values it cannot see
// never affect it. Backward: dq of a NaN row is NaN; dk / dv of a key are NaN iff a NaN row sees it.
// A kernel must not let an invisible non-finite value in through arithmetic (a masked score of -inf
// still meets 0 * NaN in P.V): the CPU kernels zero non-finite rows and apply the rule through flags; the CUDA
// kernels flag non-finite K / V rows in a prepass and take a rare path only where one is (attention/nonfinite.cuh).
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define ELASTIC_HD __host__ __device__ __forceinline__
#else
#define ELASTIC_HD inline
#endif

namespace elastic {

enum HeadMode : int32_t {
  kFull = 0,    // causal attention over every earlier key
  kStream = 1,  // sink + sliding window: j < sink || i - j < window
  kBlock = 2,   // block-sparse: block (i / bs, j / bs) set in the head's block mask
};
constexpr int32_t kNumHeadModes = 3;

// Absolute query position of query row r when the queries are the last Sq of Skv positions
// (causal aligned bottom-right: chunked prefill and decode).
ELASTIC_HD int64_t query_position(int64_t r, int64_t Sq, int64_t Skv) { return r + (Skv - Sq); }

// Is key position j visible to query position i under `mode`? `block_bit` is the head's block-mask
// entry for (i / block_size, j / block_size); it is only read in kBlock mode.
ELASTIC_HD bool key_visible(int32_t mode, int64_t i, int64_t j, int64_t sink, int64_t window, bool block_bit) {
  if (j > i) return false;
  if (mode == kFull) return true;
  if (mode == kStream) return j < sink || i - j < window;
  if (mode == kBlock) return block_bit;
  return false;
}

// Key range [lo, hi) that can hold visible keys of the STREAM window for the query rows with absolute
// positions [i_first, i_last]: the union of windows is [i_first - window + 1, i_last].
ELASTIC_HD int64_t stream_window_begin(int64_t i_first, int64_t window) {
  int64_t lo = i_first - window + 1;
  return lo < 0 ? 0 : lo;
}

}  // namespace elastic
