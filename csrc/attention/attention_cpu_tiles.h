// Tile-level view of the head-mode semantics for the CPU kernels (attention_cpu.cpp).
// A tile is a rectangle of absolute query positions [i0, i1] x key positions [j0, j1] of one
// (sequence, KV head). classify() decides whether the kernel may skip the tile (no visible pair),
// use it unmasked (every pair visible) or must mask it element-wise with visible(), which is
// key_visible() of head_mode.h, so tiling never changes the token-level semantics.
#pragma once
#include <algorithm>
#include <cstdint>

#include "attention/head_mode.h"

namespace elastic {
namespace cpu {

enum class TileVisibility { kSkip, kPartial, kFull };

// Visibility rule of one (sequence b, KV head hk) and its G query heads.
struct HeadVisibility {
  int32_t mode = kFull;
  int64_t sink = 0;
  int64_t window = 0;
  int64_t block_size = 1;
  int64_t num_blocks = 0;            // NB: block-mask rows == cols
  const bool* block_mask = nullptr;  // [NB, NB] of query head 0 of the group (BLOCK mode only)
  int64_t mask_head_stride = 0;      // NB*NB when the mask is per query head, 0 when per KV head
  int64_t group = 1;                 // G query heads share this KV head

  bool block_bit(int64_t g, int64_t i, int64_t j) const {
    return block_mask[g * mask_head_stride + (i / block_size) * num_blocks + j / block_size];
  }

  // Token-level rule for query head g (of the group) at absolute position i, key position j.
  bool visible(int64_t g, int64_t i, int64_t j) const {
    const bool bit = (mode == kBlock && j <= i) ? block_bit(g, i, j) : false;
    return key_visible(mode, i, j, sink, window, bit);
  }

  // Conservative classification: kSkip only when no (row, key) pair of any of the G heads is
  // visible, kFull only when every pair of every head is visible; otherwise kPartial.
  TileVisibility classify(int64_t i0, int64_t i1, int64_t j0, int64_t j1) const {
    if (j0 > i1) return TileVisibility::kSkip;  // entirely above the causal diagonal
    const bool causal_full = j1 <= i0;
    if (mode == kFull) return causal_full ? TileVisibility::kFull : TileVisibility::kPartial;
    if (mode == kStream) {
      // Sink keys are seen by every later query (j0 <= i1 here). The closest pair is (i0, j1) when the
      // tile lies below the diagonal, distance 0 when it straddles it; windows reach back window - 1.
      const bool any = j0 < sink || (window > 0 && i0 - j1 < window);
      if (!any) return TileVisibility::kSkip;
      const bool all = causal_full && (j1 < sink || i1 - j0 < window);
      return all ? TileVisibility::kFull : TileVisibility::kPartial;
    }
    if (mode == kBlock) return classify_block(i0, i1, j0, j1);
    return TileVisibility::kSkip;  // invalid modes are rejected before the kernels run
  }

 private:
  TileVisibility classify_block(int64_t i0, int64_t i1, int64_t j0, int64_t j1) const {
    bool any = false, all = true;
    const int64_t heads = mask_head_stride == 0 ? 1 : group;
    for (int64_t g = 0; g < heads; ++g) {
      const bool* m = block_mask + g * mask_head_stride;
      for (int64_t qb = i0 / block_size; qb <= i1 / block_size; ++qb) {
        const int64_t ri0 = std::max(i0, qb * block_size), ri1 = std::min(i1, qb * block_size + block_size - 1);
        for (int64_t kb = j0 / block_size; kb <= j1 / block_size; ++kb) {
          const int64_t cj0 = std::max(j0, kb * block_size), cj1 = std::min(j1, kb * block_size + block_size - 1);
          if (cj0 > ri1 || !m[qb * num_blocks + kb]) {  // no causal pair, or block not selected
            all = false;
            continue;
          }
          any = true;
          if (cj1 > ri0) all = false;  // the block straddles the diagonal
        }
      }
    }
    if (!any) return TileVisibility::kSkip;
    return all ? TileVisibility::kFull : TileVisibility::kPartial;
  }
};

}  // namespace cpu
}  // namespace elastic
