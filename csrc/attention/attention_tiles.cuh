// Which (query tile, key tile) pairs a head mode can make visible, shared by the forward and backward
// kernels. Tiles are skipped only when they provably hold no visible pair (head_mode.h); a visited tile
// that is not fully visible is masked element-wise with key_visible().
#pragma once
#include "attention/attention_params.h"
#include "attention/head_mode.h"

namespace elastic {

// Lengths and start rows of sequence b (dense: rows start at 0 of the batch slice).
struct SeqInfo {
  int q_start, k_start;  // first row of the sequence in the packed tensor (0 for dense)
  int len_q, len_k;
  int offset;            // len_k - len_q: absolute position of query row r is r + offset
};

__device__ __forceinline__ SeqInfo seq_info(const AttentionSeqParams& p, int b) {
  SeqInfo s;
  if (p.cu_seqlens_q != nullptr) {
    s.q_start = p.cu_seqlens_q[b];
    s.k_start = p.cu_seqlens_k[b];
    s.len_q = p.cu_seqlens_q[b + 1] - s.q_start;
    s.len_k = p.cu_seqlens_k[b + 1] - s.k_start;
  } else {
    s.q_start = 0;
    s.k_start = 0;
    s.len_q = p.seqlen_q;
    s.len_k = p.seqlen_k;
  }
  s.offset = s.len_k - s.len_q;
  return s;
}

__device__ __forceinline__ bool mode_is_valid(int mode, const AttentionSeqParams& p) {
  return mode == kFull || mode == kStream || (mode == kBlock && p.block_mask != nullptr);
}

// The rows of one block mask head (batch b, mask head mh): bit(rb, cb) = mask[b, mh, rb, cb].
struct BlockBits {
  const bool* base = nullptr;
  int stride_r = 0, stride_c = 0;  // inside one head (NB x NB bits): an int; fewer registers in the sm90 consumer
  int block_size = 1, nb = 0;
  __device__ __forceinline__ bool bit(int rb, int cb) const {
    return base[rb * stride_r + cb * stride_c];
  }
  // Bit of absolute query position i and key block cb; positions outside [0, nb*bs) see nothing.
  __device__ __forceinline__ bool bit_of_position(int i, int cb) const {
    if (i < 0) return false;
    const int rb = i / block_size;
    return rb < nb && bit(rb, cb);
  }
  // Any bit set in column cb for the query positions [i_first, i_last] (clipped to valid rows)?
  __device__ __forceinline__ bool any_in_rows(int i_first, int i_last, int cb) const {
    const int rb0 = i_first < 0 ? 0 : i_first / block_size;
    int rb1 = i_last / block_size;
    if (rb1 >= nb) rb1 = nb - 1;
    for (int rb = rb0; rb <= rb1; ++rb)
      if (bit(rb, cb)) return true;
    return false;
  }
  __device__ __forceinline__ bool all_in_rows(int i_first, int i_last, int cb) const {
    if (i_first < 0) return false;
    const int rb0 = i_first / block_size;
    const int rb1 = i_last / block_size;
    if (rb1 >= nb) return false;
    for (int rb = rb0; rb <= rb1; ++rb)
      if (!bit(rb, cb)) return false;
    return true;
  }
  // The one mask row that holds every query position of [i_first, i_last], or -1 (rows straddle two mask rows,
  // or fall outside [0, nb)). Prefill query tiles are aligned to the blocks, so this is the common case.
  __device__ __forceinline__ int single_row(int i_first, int i_last) const {
    if (i_first < 0) return -1;
    const int rb = i_first / block_size;
    return rb == i_last / block_size && rb < nb ? rb : -1;
  }
  // Largest column c <= cb with bit(rb, c) set, or -1. Contiguous rows (stride_c 1, torch's bool layout) are read 16
  // bytes at a time from 16-byte aligned addresses, so a walk over a sparse row costs one dependent load per 16
  // blocks instead of one per block (the bytes of such a load that lie before the row belong to the mask tensor's
  // allocation, which is 16-byte aligned, and are ignored).
  __device__ __forceinline__ int last_set_at_or_below(int rb, int cb) const {
    const bool* row = base + int64_t(rb) * stride_r;
    if (stride_c != 1) {
      for (; cb >= 0; --cb)
        if (row[int64_t(cb) * stride_c]) return cb;
      return -1;
    }
    while (cb >= 0) {
      const uintptr_t addr = reinterpret_cast<uintptr_t>(row + cb);
      const int top = static_cast<int>(addr & 15u);  // byte of column cb inside the aligned 16 bytes
      const uint4 v = __ldg(reinterpret_cast<const uint4*>(addr - top));
      const int first = cb - top;                    // column of byte 0 (negative: before the row)
      // bit k of nz: byte k is non-zero (bool bytes are 0 or 1; any non-zero byte counts)
      const uint32_t w[4] = {v.x, v.y, v.z, v.w};
      uint32_t nz = 0;
#pragma unroll
      for (int q = 0; q < 4; ++q)
#pragma unroll
        for (int k = 0; k < 4; ++k) nz |= ((w[q] >> (8 * k)) & 0xffu) != 0u ? 1u << (4 * q + k) : 0u;
      nz &= (2u << top) - 1u;                         // columns <= cb
      if (first < 0) nz &= ~((1u << (-first)) - 1u);  // columns >= 0
      if (nz != 0u) return first + 31 - __clz(nz);
      cb = first - 1;
    }
    return -1;
  }
};

__device__ __forceinline__ BlockBits block_bits(const AttentionSeqParams& p, int b, int head_q, int head_kv) {
  BlockBits bb;
  if (p.block_mask == nullptr) return bb;
  const int mh = p.mask_heads == p.heads_q ? head_q : head_kv;
  bb.base = p.block_mask + b * p.bm_stride_b + mh * p.bm_stride_h;
  bb.stride_r = p.bm_stride_r;
  bb.stride_c = p.bm_stride_c;
  bb.block_size = p.block_size;
  bb.nb = p.mask_blocks;
  return bb;
}

// Can the query positions [i_first, i_last] and keys [j_first, j_last] hold a visible pair?
// (Exact for FULL and STREAM, a superset for BLOCK, whose bits are per block row.)
__device__ __forceinline__ bool tile_may_be_visible(int mode, int i_first, int i_last, int j_first, int j_last,
                                                    int sink, int window, const BlockBits& bb) {
  if (i_last < j_first) return false;  // every key is in the future of every query
  if (mode == kFull) return true;
  if (mode == kStream) return j_first < sink || (window > 0 && i_first - j_last < window);
  if (mode == kBlock) return bb.any_in_rows(i_first, i_last, j_first / bb.block_size);
  return false;
}

// Is every pair of the tile visible (so the kernel may skip element-wise masking)? len_k bounds the keys.
// (BLOCK reads the mask; a walker-visited tile whose rows are one mask row is decided without a read by
// visited_tile_fully_visible below.)
__device__ __forceinline__ bool tile_fully_visible(int mode, int i_first, int i_last, int j_first, int j_last,
                                                   int len_k, int sink, int window, const BlockBits& bb) {
  if (j_last >= len_k || j_last > i_first || i_first < 0) return false;
  if (mode == kFull) return true;
  if (mode == kStream) return j_last < sink || i_last - j_first < window;
  if (mode == kBlock) return bb.all_in_rows(i_first, i_last, j_first / bb.block_size);
  return false;
}

// tile_fully_visible for a tile the KeyTileWalker visits: a visited BLOCK tile whose query rows lie in one mask row
// has that row's bit set (the walker checked it), so only the causal / length bounds remain; no mask read, which
// matters in the sm90 consumer, where this sits between the S wait and the softmax.
// single_rb: the walker's KeyTileWalker::single_rb (the query tile's one mask row, computed once per item), or
// kSingleRowUnknown to compute it here (two integer divisions by the block size per tile).
constexpr int kSingleRowUnknown = -2;
__device__ __forceinline__ bool visited_tile_fully_visible(int mode, int i_first, int i_last, int j_first, int j_last,
                                                           int len_k, int sink, int window, const BlockBits& bb,
                                                           int single_rb = kSingleRowUnknown) {
  if (single_rb == kSingleRowUnknown && mode == kBlock) single_rb = bb.single_row(i_first, i_last);
  if (mode == kBlock && single_rb >= 0)
    return j_last < len_k && j_last <= i_first && i_first >= 0;
  return tile_fully_visible(mode, i_first, i_last, j_first, j_last, len_k, sink, window, bb);
}

// Key tiles (of BN keys) visited by one query tile with positions [i_first, i_last], walked from the
// last one down (the diagonal tiles, which need masking, come first, as in FlashAttention-2).
template <int BN>
struct KeyTileWalker {
  int mode, n_end, win_lo_tile, sink_tiles, i_first, i_last;
  int single_rb;  // BLOCK: bb.single_row(i_first, i_last), once per item instead of per tile; else -1
  BlockBits bb;

  __device__ __forceinline__ void init(int mode_, int i_first_, int i_last_, int len_k, int sink, int window,
                                       const BlockBits& bb_) {
    mode = mode_;
    i_first = i_first_;
    i_last = i_last_;
    bb = bb_;
    int causal_keys = i_last + 1 < len_k ? i_last + 1 : len_k;  // keys [0, causal_keys) are not in the future
    if (causal_keys < 0) causal_keys = 0;
    n_end = (causal_keys + BN - 1) / BN;
    if (window > 0) {
      const int lo = i_first - window + 1;
      win_lo_tile = lo <= 0 ? 0 : lo / BN;
    } else {
      win_lo_tile = n_end;  // no window keys
    }
    const int sink_keys = sink < causal_keys ? sink : causal_keys;
    sink_tiles = (sink_keys + BN - 1) / BN;
    single_rb = mode == kBlock ? bb.single_row(i_first, i_last) : -1;
  }
  // Largest visited tile index below n, or -1. cached (the sm90 consumers' key loop, ELASTIC_SM90_WALK_CACHED):
  // BLOCK uses single_rb and, for block_size == BN, key tile = mask column without dividing; false: both
  // recomputed per call. The default stays false so that the sm90 producer (56 registers; holding single_rb
  // spilled 20 more bytes) and the sm80 kernel are unchanged.
  __device__ __forceinline__ int prev(int n, bool cached = false) const {
    int t = n - 1;
    if (mode == kFull) return t;
    if (mode == kStream) {
      if (t >= win_lo_tile) return t;
      return t < sink_tiles - 1 ? t : sink_tiles - 1;
    }
    if (t < 0) return -1;
    const int rb = cached ? single_rb : bb.single_row(i_first, i_last);
    if (rb >= 0) {  // one mask row: jump to the last tile of the nearest set column (vector loads)
      const bool one_tile_blocks = cached && bb.block_size == BN;
      const int c = bb.last_set_at_or_below(rb, one_tile_blocks ? t : (t * BN) / bb.block_size);
      if (c < 0) return -1;
      if (one_tile_blocks) return c;
      const int last_tile_of_c = ((c + 1) * bb.block_size) / BN - 1;  // block_size is a multiple of BN
      return t < last_tile_of_c ? t : last_tile_of_c;
    }
    while (t >= 0 && !bb.any_in_rows(i_first, i_last, (t * BN) / bb.block_size)) --t;
    return t;
  }
  __device__ __forceinline__ int first() const { return prev(n_end); }
};

}  // namespace elastic
