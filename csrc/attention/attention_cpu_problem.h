// Internal types of the CPU attention kernels (attention_cpu.cpp: checks, backward, the op entry points;
// attention_cpu_forward.cpp: the forward): the problem after the argument checks, its query / key tiles,
// the task scheduler and the element-wise mask of partially visible tiles.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

#include "attention/attention_checks.h"
#include "attention/attention_cpu_tiles.h"

namespace elastic {
namespace cpu {

using at::Tensor;


constexpr int64_t kKeyTile = 128;  // a multiple of the default block_size tiles BLOCK heads exactly
// The forward merges consecutive visited key tiles of one chunk into one run (one S GEMM, one softmax
// pass, one P.V GEMM with K up to kKeyChunk): longer GEMMs, and 4x fewer rescales of the accumulator.
constexpr int64_t kTilesPerChunk = 4;
constexpr int64_t kKeyChunk = kKeyTile * kTilesPerChunk;

// Query positions per tile: a power of two in [16, 128] with about 256 stacked rows (G * rows),
// big enough for efficient GEMMs, small enough for the score tile to stay in L2.
inline int64_t query_tile_positions(int64_t group) {
  int64_t rows = 128;
  while (rows > 16 && rows * group > 256) rows /= 2;
  return rows;
}

struct Sequence {
  int64_t q_begin = 0, q_len = 0;  // rows of the packed q
  int64_t k_begin = 0, k_len = 0;  // rows of the packed k/v
};

// Everything the tile loops need; built once per call after the argument checks.
struct Problem {
  AttentionShape shape;
  std::vector<Sequence> seqs;
  int64_t total_q = 0, total_k = 0;
  int64_t q_tile = 0;
  Tensor head_mode;   // contiguous int32 [B, Hkv]
  Tensor block_mask;  // contiguous bool [B, Hm, NB, NB] or undefined
  int64_t sink = 0, window = 0, block_size = 1;

  HeadVisibility visibility(int64_t b, int64_t hk) const {
    HeadVisibility hv;
    hv.mode = head_mode.data_ptr<int32_t>()[b * shape.heads_kv + hk];
    hv.sink = sink;
    hv.window = window;
    hv.block_size = block_size;
    hv.group = shape.group;
    if (hv.mode == kBlock) {
      const int64_t nb = shape.mask_blocks;
      const bool per_query_head = shape.mask_heads == shape.heads_q;
      hv.num_blocks = nb;
      const int64_t first_head = per_query_head ? hk * shape.group : hk;
      hv.block_mask = block_mask.data_ptr<bool>() + (b * shape.mask_heads + first_head) * nb * nb;
      hv.mask_head_stride = per_query_head ? nb * nb : 0;
    }
    return hv;
  }
  int64_t num_q_tiles(const Sequence& s) const { return (s.q_len + q_tile - 1) / q_tile; }
  static int64_t num_k_tiles(const Sequence& s) { return (s.k_len + kKeyTile - 1) / kKeyTile; }
};

// Query tile qt of a sequence: its row range and absolute positions [i0, i1].
struct QueryTile {
  int64_t r0, rows, i0, i1;
  QueryTile(const Problem& p, const Sequence& s, int64_t qt) {
    r0 = qt * p.q_tile;
    rows = std::min(p.q_tile, s.q_len - r0);
    i0 = query_position(r0, s.q_len, s.k_len);
    i1 = i0 + rows - 1;
  }
};
struct KeyTile {
  int64_t j0, len, j1;
  KeyTile(const Sequence& s, int64_t kt) : j0(kt * kKeyTile), len(std::min(kKeyTile, s.k_len - kt * kKeyTile)) {
    j1 = j0 + len - 1;
  }
};

// ----------------------------------------------------------------------------- scheduling
struct Task {
  int64_t b, hk, tile, cost;
};

// MKL (bundled with x86 builds of torch) opens an OpenMP region for every gemm called outside one,
// even a tiny one; on a busy machine each region costs milliseconds. The serial path asks MKL for
// one thread, on this thread only (weak: absent without MKL, then nothing is changed). The C entry
// point is MKL_Set_Num_Threads_Local; the lower-case symbol is the Fortran one (takes int*).
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));
struct SingleThreadedBlas {
  int previous = 0;
  SingleThreadedBlas() {
    if (MKL_Set_Num_Threads_Local) previous = MKL_Set_Num_Threads_Local(1);
  }
  ~SingleThreadedBlas() {
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(previous);  // 0 = back to the global setting
  }
};

// Below this many score elements in all (about a millisecond of work) a call runs on the calling
// thread: waking the pool costs more than it saves, badly so on a loaded machine (gradcheck).
constexpr int64_t kMinParallelScores = int64_t(1) << 18;

// Runs tasks on every ATen thread, most expensive first, each thread pulling the next task
// (causal tiles differ in cost by up to S/tile, so static chunks would leave one thread idle).
template <typename Worker>
void run_tasks(std::vector<Task>& tasks, const Worker& worker) {
  std::sort(tasks.begin(), tasks.end(), [](const Task& x, const Task& y) { return x.cost > y.cost; });
  int64_t total_cost = 0;
  for (const Task& t : tasks) total_cost += t.cost;
  if (total_cost < kMinParallelScores || at::get_num_threads() == 1 || tasks.size() == 1) {
    SingleThreadedBlas one_thread;
    auto state = worker.make_workspace();
    for (const Task& t : tasks) worker.run(t, state);
    return;
  }
  std::atomic<size_t> next{0};
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), tasks.size());
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t unused = begin; unused < end; ++unused) {
      auto state = worker.make_workspace();
      for (size_t t = next.fetch_add(1); t < tasks.size(); t = next.fetch_add(1)) worker.run(tasks[t], state);
    }
  });
}

// Tasks over query tiles (forward, dq) or key tiles (dk/dv); cost = score elements of the visited tiles.
// Tiles that see nothing get no task unless keep_empty (the forward writes every row of its output).
std::vector<Task> make_tasks(const Problem& p, bool over_key_tiles, bool keep_empty = false);

// ----------------------------------------------------------------------------- tile helpers
// Writes -inf into the scores of invisible pairs of a partially visible tile.
// scores: the tile's first column in a [rows * G, >= len] matrix with leading dimension ld,
// row = (query position - i0) * G + head in group.
// Rows are intervals, filled directly: keys after i; for STREAM also [sink, i - window]; for BLOCK the
// segments of key blocks whose bit is unset (key_visible of head_mode.h, one block at a time).
template <typename T>
void mask_tile(const HeadVisibility& hv, T* scores, int64_t ld, const QueryTile& qt, const KeyTile& kt) {
  const T neg_inf = -std::numeric_limits<T>::infinity();
  const int64_t j_end = kt.j0 + kt.len;
  for (int64_t r = 0; r < qt.rows; ++r) {
    const int64_t i = qt.i0 + r;
    for (int64_t g = 0; g < hv.group; ++g) {
      T* row = scores + (r * hv.group + g) * ld;
      const int64_t future = std::min(std::max<int64_t>(i + 1, kt.j0), j_end);  // keys j > i
      std::fill(row + (future - kt.j0), row + kt.len, neg_inf);
      if (hv.mode == kBlock) {  // the bit is constant over each key block: fill the unset blocks' segments
        for (int64_t j = kt.j0; j < future;) {
          const int64_t segment_end = std::min(future, (j / hv.block_size + 1) * hv.block_size);
          if (!hv.block_bit(g, i, j)) std::fill(row + (j - kt.j0), row + (segment_end - kt.j0), neg_inf);
          j = segment_end;
        }
        continue;
      }
      if (hv.mode == kStream) {  // keys past the sink and before the window: sink <= j <= i - window
        const int64_t lo = std::max(hv.sink, kt.j0), hi = std::min(i - hv.window + 1, future);
        if (lo < hi) std::fill(row + (lo - kt.j0), row + (hi - kt.j0), neg_inf);
      }
    }
  }
}

// The forward (attention_cpu_forward.cpp): out [.., Hq, D] in q's dtype and lse (fp32, fp64 for fp64).
std::tuple<Tensor, Tensor> attention_forward(const Problem& p, const Tensor& q, const Tensor& k, const Tensor& v);

}  // namespace cpu
}  // namespace elastic
