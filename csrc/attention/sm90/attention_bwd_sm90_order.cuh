// The order in which the Hopper backward's CTAs (one per (batch, KV head) pair and 128-key tile) are handed out.
// The grid is one-dimensional; the hardware starts CTAs in index order, each CTA maps its index to its work here
// and reads its pair's mode from the device head_mode table (no host sync).
//
// Why not simply key tile by key tile (every pair's tile 0, then every pair's tile 1, ...: the first version's
// (Hkv, B, key tiles) grid, still ELASTIC_SM90_BWD_MODE_ORDER=0): that order starts the long CTAs first (a causal
// key tile's CTA visits every later query tile, so tile 0 is the longest), and when every pair has the same mode
// adjacent key tiles start together and meet on the same query tiles' Q, dO and dQ rows a few stages apart, in the
// L2. With FULL and short-window STREAM pairs mixed, the short STREAM CTAs (~136 stages at window 2048) finishing
// around the long FULL ones hand the SMs to the next key tiles at scattered times, so the FULL key tiles no longer
// start together and their shared rows go to HBM and back between them. ncu, H200, 32K, Llama shape, 2 FULL + 6
// STREAM KV heads (results/attention/2026-12-03_h200_session9_bwd_stage_rate/): L2 hit rate 64% and DRAM 43% of
// peak (31 GB in 14.9 ms) against 88% and 13% with every head FULL, and 14% (32K) / 18% (128K, where the FULL heads
// are 90% of the stages) more time per stage, while the same STREAM code path with window = S runs at the FULL rate
// (experiments/time_bwd_stage_rate.py).
//
// The order (the default): the grid has two passes over the (pair, key tile) CTAs, and each CTA of a pass
// either runs its work or returns at once when the other pass runs it:
//   pass 1, key tile by key tile (the first version's order): key tile 0 of every pair (the longest CTA of every
//     mode: a STREAM pair's sink tile is seen by all queries) and key tiles 1.. of the pairs that walk long,
//     decreasing columns (FULL, BLOCK, STREAM with a window longer than a quarter of the keys), so the longest
//     CTAs still start first;
//   pass 2, pair by pair: key tiles 1.. of the short-window STREAM pairs, ~132 consecutive key tiles of one pair
//     together (a query tile's ~17 window key tiles then run side by side). Their CTAs all have about the same
//     length, so handing them out last leaves no long tail.
// Why two passes of which half the CTAs return at once, rather than one CTA per work item ranked by a scan of the
// head_mode table: a CTA's batch, KV head and key tile are then functions of blockIdx and the parameters, which
// ptxas recomputes where they are used; taken from a scan they are values the 24-register producer and the
// 240-register consumers must hold, and ptxas spilled 250-390 bytes per thread (consumer loop included) for them.
// An empty CTA is a launch, a load of its pair's mode and a return (pairs x (key tiles - 1) of them).
// Measured (H200, 2 FULL + 6 STREAM): L2 hit rate 64% -> 86%, DRAM 43% -> 16% of peak at 32K; backward 18.3 -> 16.5
// ms at 32K, 237 -> 200 ms at 128K; every head STREAM unchanged (its CTAs were already in lockstep), every head FULL
// unchanged (the same order) (kernel_options.h has the table).
// Every CTA's lower key tiles of the same pair have lower indices, which the deterministic mode's turn order
// relies on (bwd_consumer).
#pragma once
#include <cstdint>

#include "attention/attention_params.h"
#include "attention/head_mode.h"

namespace elastic {
namespace sm90 {

struct BwdWorkItem {
  int b, kvh, n_block;
  bool second_pass;
};

// Does a STREAM pair's window count as short (pass 2 above)? Its CTAs past the sink then visit ~(window + BN) / BM
// query tiles each, a quarter of a causal tile 0's walk at most.
__host__ __device__ __forceinline__ bool bwd_short_window(int window, int num_k_tiles, int block_n) {
  return int64_t(window) * 4 <= int64_t(num_k_tiles) * block_n;
}

// CTAs of the grid: pairs x key tiles, and with the mode order the second pass's pairs x (key tiles - 1).
inline int64_t bwd_grid_ctas(int batch, int heads_kv, int64_t num_k_tiles, bool mode_order) {
  const int64_t pairs = int64_t(batch) * heads_kv;
  return pairs * num_k_tiles + (mode_order ? pairs * (num_k_tiles - 1) : 0);
}

#if defined(__CUDACC__)
// This CTA's (batch, KV head, key tile) and pass.
__device__ __forceinline__ BwdWorkItem bwd_work_item(const AttentionBwdParams& p, int num_k_tiles) {
  const int pairs = p.batch * p.heads_kv;
  const int i = blockIdx.x;
  if (i < pairs * num_k_tiles) {  // pass 1: every pair's key tile n, n = 0, 1, ...
    const int pair = i % pairs;
    return BwdWorkItem{pair / p.heads_kv, pair % p.heads_kv, i / pairs, false};
  }
  const int j = i - pairs * num_k_tiles, rest = num_k_tiles - 1;  // pass 2: pair by pair, key tiles 1..
  const int pair = j / rest;
  return BwdWorkItem{pair / p.heads_kv, pair % p.heads_kv, 1 + j % rest, true};
}

// Does this CTA's pass run its work (else the other pass does)? `mode`: the pair's head_mode.
template <int BN>
__device__ __forceinline__ bool bwd_work_runs_here(const AttentionBwdParams& p, const BwdWorkItem& w, int mode,
                                                   int num_k_tiles) {
  if (!p.sm90_bwd_mode_order) return true;  // one pass
  const bool pass2 = w.n_block > 0 && mode == kStream && bwd_short_window(p.window, num_k_tiles, BN);
  return pass2 == w.second_pass;
}
#endif

}  // namespace sm90
}  // namespace elastic
