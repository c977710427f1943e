// CPU kernels of elastic::attention and elastic::attention_backward.
//
// Flash-attention style: each task owns one tile of queries (forward, dq) or of keys (dk/dv) of one
// (sequence, KV head), walks the tiles on the other side with an online softmax, skips tiles with no
// visible pair and masks element-wise only tiles that are partially visible (attention_cpu_tiles.h),
// so memory is O(tile) per thread and STREAM heads cost O(S * (sink + window)). The G query heads of
// a KV head are stacked as rows of one GEMM operand, so K/V are never repeated for GQA. GEMMs go
// through ATen (BLAS) on tile views, the row loops (max, exp, softmax gradient) are vectorised in
// attention_cpu_rows.cpp, and tasks run on at::parallel_for (backward: one pass over key tiles for
// dk/dv, one over query tiles for dq, so no two threads write the same rows).
//
// Internally every tensor is packed per KV head: q/out/dO as [Hkv, Tq, G, D] (a tile of r query
// positions is then one contiguous [r*G, D] matrix, row = position * G + head in group), k/v as
// [Hkv, Tk, D], lse as [Hkv, Tq*G]. Dense inputs are treated as varlen with equal lengths.
// Accumulation is fp32 (fp64 for fp64 inputs, so gradcheck is exact); bf16 is computed in fp32.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "attention/attention_checks.h"
#include "attention/attention_cpu_gemm.h"
#include "attention/attention_cpu_rows.h"
#include "attention/attention_cpu_tiles.h"

namespace elastic {
namespace {

using at::Tensor;
using cpu::HeadVisibility;
using cpu::TileVisibility;

constexpr int64_t kKeyTile = 128;  // a multiple of the default block_size tiles BLOCK heads exactly
// The forward merges consecutive visited key tiles of one chunk into one run (one S GEMM, one softmax
// pass, one P.V GEMM with K up to kKeyChunk): longer GEMMs, and 4x fewer rescales of the accumulator.
constexpr int64_t kTilesPerChunk = 4;
constexpr int64_t kKeyChunk = kKeyTile * kTilesPerChunk;

// Query positions per tile: a power of two in [16, 128] with about 256 stacked rows (G * rows),
// big enough for efficient GEMMs, small enough for the score tile to stay in L2.
int64_t query_tile_positions(int64_t group) {
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

// ----------------------------------------------------------------------------- argument checks
void check_cpu_dtype(const Tensor& q) {
  const auto t = q.scalar_type();
  ELASTIC_CHECK(t == at::kFloat || t == at::kDouble || t == at::kBFloat16,
                "elastic.attention: q/k/v dtype on CPU must be float32, float64 or bfloat16, got ", t);
}

std::vector<Sequence> make_sequences(const AttentionShape& s, const c10::optional<Tensor>& cu_seqlens_q,
                                     const c10::optional<Tensor>& cu_seqlens_k, int64_t total_q, int64_t total_k) {
  std::vector<Sequence> seqs(s.batch);
  if (!s.varlen) {
    for (int64_t b = 0; b < s.batch; ++b) seqs[b] = {b * s.seqlen_q, s.seqlen_q, b * s.seqlen_k, s.seqlen_k};
    return seqs;
  }
  const Tensor cq = cu_seqlens_q->contiguous(), ck = cu_seqlens_k->contiguous();
  const int32_t* a = cq.data_ptr<int32_t>();
  const int32_t* c = ck.data_ptr<int32_t>();
  ELASTIC_CHECK(a[0] >= 0 && c[0] >= 0, "elastic.attention: cu_seqlens_q and cu_seqlens_k must start at >= 0, got ",
                a[0], " and ", c[0]);
  for (int64_t b = 0; b < s.batch; ++b) {  // order first, so lengths below are meaningful
    ELASTIC_CHECK(a[b + 1] >= a[b], "elastic.attention: cu_seqlens_q must be non-decreasing, got cu_seqlens_q[", b,
                  "] = ", a[b], " > cu_seqlens_q[", b + 1, "] = ", a[b + 1]);
    ELASTIC_CHECK(c[b + 1] >= c[b], "elastic.attention: cu_seqlens_k must be non-decreasing, got cu_seqlens_k[", b,
                  "] = ", c[b], " > cu_seqlens_k[", b + 1, "] = ", c[b + 1]);
  }
  ELASTIC_CHECK(a[s.batch] <= total_q, "elastic.attention: cu_seqlens_q[-1] = ", a[s.batch], " exceeds the ", total_q,
                " tokens of q");
  ELASTIC_CHECK(c[s.batch] <= total_k, "elastic.attention: cu_seqlens_k[-1] = ", c[s.batch], " exceeds the ", total_k,
                " tokens of k/v");
  for (int64_t b = 0; b < s.batch; ++b) {
    seqs[b] = {a[b], a[b + 1] - a[b], c[b], c[b + 1] - c[b]};
    ELASTIC_CHECK(seqs[b].q_len <= seqs[b].k_len, "elastic.attention: sequence ", b, " has ", seqs[b].q_len,
                  " queries but ", seqs[b].k_len, " keys (cu_seqlens_q / cu_seqlens_k); queries are the last Sq ",
                  "positions of their sequence, so Sq must not exceed Skv");
    ELASTIC_CHECK(seqs[b].q_len <= s.seqlen_q, "elastic.attention: sequence ", b, " has ", seqs[b].q_len,
                  " queries, more than max_seqlen_q = ", s.seqlen_q);
    ELASTIC_CHECK(seqs[b].k_len <= s.seqlen_k, "elastic.attention: sequence ", b, " has ", seqs[b].k_len,
                  " keys, more than max_seqlen_k = ", s.seqlen_k);
  }
  return seqs;
}

Problem make_problem(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& head_mode,
                     const c10::optional<Tensor>& block_mask, const c10::optional<Tensor>& cu_seqlens_q,
                     const c10::optional<Tensor>& cu_seqlens_k, int64_t sink, int64_t window, int64_t block_size,
                     c10::optional<double> scale, int64_t max_seqlen_q, int64_t max_seqlen_k) {
  Problem p;
  p.shape = check_attention_args(q, k, v, head_mode, sink, window, block_mask, block_size, scale, cu_seqlens_q,
                                 cu_seqlens_k, max_seqlen_q, max_seqlen_k);
  ELASTIC_CHECK(q.device().is_cpu(), "elastic.attention: the CPU kernel got q on ", q.device());
  check_cpu_dtype(q);
  check_head_mode_values_cpu(head_mode, block_mask.has_value());
  p.total_q = p.shape.varlen ? q.size(0) : p.shape.batch * p.shape.seqlen_q;
  p.total_k = p.shape.varlen ? k.size(0) : p.shape.batch * p.shape.seqlen_k;
  p.seqs = make_sequences(p.shape, cu_seqlens_q, cu_seqlens_k, p.total_q, p.total_k);
  p.q_tile = query_tile_positions(p.shape.group);
  p.head_mode = head_mode.contiguous();
  if (block_mask.has_value()) p.block_mask = block_mask->contiguous();
  p.sink = sink;
  p.window = window;
  p.block_size = block_size;
  return p;
}

// ----------------------------------------------------------------------------- packing
at::ScalarType accumulate_type(const Tensor& q) { return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

// [.., Hq, D] (dense or packed) -> [Hkv, T, G, D] contiguous in the accumulation dtype, times mul.
Tensor pack_query_like(const Tensor& x, const Problem& p, at::ScalarType acc, double mul = 1.0) {
  const auto& s = p.shape;
  Tensor y = at::empty({s.heads_kv, p.total_q, s.group, s.head_dim}, x.options().dtype(acc));
  y.permute({1, 0, 2, 3}).copy_(x.reshape({p.total_q, s.heads_kv, s.group, s.head_dim}));
  if (mul != 1.0) y.mul_(mul);
  return y;
}

// [.., Hkv, D] -> [Hkv, T, D] contiguous in the accumulation dtype.
Tensor pack_kv(const Tensor& x, const Problem& p, at::ScalarType acc) {
  const auto& s = p.shape;
  Tensor y = at::empty({s.heads_kv, p.total_k, s.head_dim}, x.options().dtype(acc));
  y.permute({1, 0, 2}).copy_(x.reshape({p.total_k, s.heads_kv, s.head_dim}));
  return y;
}

// lse-like [B, Hq, Sq] (dense) or [Hq, Tq] (varlen) <-> packed [Hkv, Tq * G].
Tensor lse_packed_view_source(const Tensor& lse, const Problem& p) {
  const auto& s = p.shape;
  if (s.varlen) return lse.reshape({s.heads_kv, s.group, p.total_q}).permute({0, 2, 1});
  return lse.reshape({s.batch, s.heads_kv, s.group, s.seqlen_q}).permute({1, 0, 3, 2});
}
Tensor pack_lse_like(const Tensor& lse, const Problem& p, at::ScalarType acc) {
  Tensor y = at::empty({p.shape.heads_kv, p.total_q * p.shape.group}, lse.options().dtype(acc));
  const Tensor source = lse_packed_view_source(lse, p);  // [Hkv, Tq, G] or [Hkv, B, Sq, G]
  y.view(source.sizes()).copy_(source);
  return y;
}
void unpack_lse(const Tensor& packed, Tensor& lse, const Problem& p) {
  const auto& s = p.shape;
  if (s.varlen) {
    lse.view({s.heads_kv, s.group, p.total_q}).copy_(packed.view({s.heads_kv, p.total_q, s.group}).permute({0, 2, 1}));
  } else {
    lse.view({s.batch, s.heads_kv, s.group, s.seqlen_q})
        .copy_(packed.view({s.heads_kv, s.batch, s.seqlen_q, s.group}).permute({1, 0, 3, 2}));
  }
}

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
std::vector<Task> make_tasks(const Problem& p, bool over_key_tiles, bool keep_empty = false) {
  std::vector<Task> tasks;
  for (int64_t b = 0; b < p.shape.batch; ++b) {
    const Sequence& s = p.seqs[b];
    if (s.q_len == 0) continue;
    const int64_t nq = p.num_q_tiles(s), nk = Problem::num_k_tiles(s);
    for (int64_t hk = 0; hk < p.shape.heads_kv; ++hk) {
      const HeadVisibility hv = p.visibility(b, hk);
      std::vector<int64_t> cost(over_key_tiles ? nk : nq, 0);
      for (int64_t qt = 0; qt < nq; ++qt) {
        const QueryTile qtile(p, s, qt);
        for (int64_t kt = 0; kt < nk; ++kt) {
          const KeyTile ktile(s, kt);
          if (hv.classify(qtile.i0, qtile.i1, ktile.j0, ktile.j1) != TileVisibility::kSkip)
            cost[over_key_tiles ? kt : qt] += qtile.rows * p.shape.group * ktile.len;
        }
      }
      for (int64_t t = 0; t < static_cast<int64_t>(cost.size()); ++t)
        if (cost[t] > 0 || keep_empty) tasks.push_back({b, hk, t, std::max<int64_t>(cost[t], 1)});
    }
  }
  return tasks;
}

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

struct TileBuffers {
  Tensor scores, scores2;  // [rows * kKeyTile] each
  TileBuffers(int64_t rows, at::TensorOptions opt)
      : scores(at::empty({rows * kKeyTile}, opt)), scores2(at::empty({rows * kKeyTile}, opt)) {}
  static Tensor tile(const Tensor& buf, int64_t rows, int64_t cols) {
    return buf.narrow(0, 0, rows * cols).view({rows, cols});
  }
};

// Scores of a tile, as probabilities exp(s - lse) (backward) with invisible pairs at 0.
template <typename T>
Tensor probabilities(const HeadVisibility& hv, TileVisibility vis, const Tensor& q_rows, const Tensor& k_rows,
                     const T* lse_rows, const QueryTile& qt, const KeyTile& kt, const Tensor& buf) {
  Tensor s = TileBuffers::tile(buf, q_rows.size(0), kt.len);
  at::mm_out(s, q_rows, k_rows.t());
  if (vis == TileVisibility::kPartial) mask_tile<T>(hv, s.data_ptr<T>(), kt.len, qt, kt);
  cpu::exp_shifted(s.data_ptr<T>(), s.size(0), kt.len, lse_rows, nullptr);
  return s;
}

// ----------------------------------------------------------------------------- forward
// The forward reads q, v, out and lse in place (no packed copies) and packs only K, transposed per key
// chunk. A row of q, k or v holding a non-finite element is used as zeros and flagged, so no GEMM
// spreads it to rows that cannot see it (0 * NaN = NaN); the flags apply the non-finite rule of
// head_mode.h exactly, in every dtype.
template <typename Tin>
struct ForwardOperands {
  const Tin* q = nullptr;  // [Tq, Hkv, G, D] (the input, contiguous)
  const Tin* v = nullptr;  // [Tk, Hkv, D]: the input, or a copy with non-finite rows zeroed
  Tensor kt;               // [Hkv, key chunks, D, kKeyChunk]: the B operand of S = Q K^T, fixed ldb
  Tensor kv_bad;           // uint8 [Hkv, Tk]: 1 where the k row or the v row of that key is non-finite
  std::vector<int64_t> key_chunk_begin;  // per sequence: index of its first chunk in kt
  int64_t key_chunks = 0;
  Tensor q_keep, v_keep;  // owners of q / v when they had to be made contiguous or cleaned
  // bfloat16 on a CPU with AMX: K and V in the VNNI layout of oneDNN's brgemm (rows in pairs, panels of
  // kPanel columns, packed by cpublas::pack), so both GEMMs run on the AMX tiles with nothing to repack
  // per call; kt / v above are then unused. Per (KV head, chunk):
  //   kpack [kKeyChunk / kPanel key panels][D * kPanel]   (K^T: K dimension = D)
  //   vpack [D / kPanel dim panels][kKeyChunk * kPanel]    (V: K dimension = keys, zero-padded to even)
  bool vnni = false;
  Tensor kpack, vpack;
};

constexpr int64_t kPanel = 64;  // oneDNN's pack supports output leading dimensions 16, 32, 48, 64

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Whether the bfloat16 forward can use the VNNI / AMX path (oneDNN pack available, D a panel multiple).
inline bool use_vnni(at::ScalarType dtype, int64_t head_dim) {
  return dtype == at::kBFloat16 && head_dim % kPanel == 0 && at::native::cpublas::could_pack(at::kBFloat16);
}

// bfloat16 is checked through its bits (attention_cpu_rows.h has no ATen types).
inline bool copy_row(const float* src, float* dst, int64_t n) { return cpu::copy_finite_or_zero(src, dst, n); }
inline bool copy_row(const double* src, double* dst, int64_t n) { return cpu::copy_finite_or_zero(src, dst, n); }
inline bool copy_row(const at::BFloat16* src, at::BFloat16* dst, int64_t n) {
  return cpu::copy_finite_or_zero(reinterpret_cast<const uint16_t*>(src), reinterpret_cast<uint16_t*>(dst), n);
}

// Packs one (KV head, chunk) into the VNNI layout: kt_tmp [D, kKeyChunk] (K^T) and v_tmp [kKeyChunk, D], both
// with zeros past `len` keys. cpublas::pack reads a contiguous [K, kPanel] input, hence the panel copies.
template <typename Tin>
void pack_vnni_chunk(ForwardOperands<Tin>& in, int64_t hk, int64_t chunk_index, int64_t len, int64_t D,
                     std::vector<Tin>& kt_tmp, std::vector<Tin>& v_tmp, std::vector<Tin>& panel_tmp) {
  const auto bf16 = at::kBFloat16;
  Tin* kdst = in.kpack.template data_ptr<Tin>() + (hk * in.kpack.size(1) + chunk_index) * kKeyChunk * D;
  Tin* vdst = in.vpack.template data_ptr<Tin>() + (hk * in.vpack.size(1) + chunk_index) * kKeyChunk * D;
  for (int64_t p = 0; p < round_up(len, kPanel) / kPanel; ++p) {  // K^T: key panels of [D, kPanel]
    for (int64_t d = 0; d < D; ++d)
      std::copy_n(kt_tmp.data() + d * kKeyChunk + p * kPanel, kPanel, panel_tmp.data() + d * kPanel);
    at::native::cpublas::pack(D, kPanel, kPanel, kPanel, bf16, bf16, panel_tmp.data(), kdst + p * D * kPanel);
  }
  const int64_t rows = round_up(len, 2);  // VNNI pairs rows: an odd tail gets a zero row
  for (int64_t p = 0; p < D / kPanel; ++p) {  // V: dim panels of [keys, kPanel]
    for (int64_t j = 0; j < rows; ++j)
      std::copy_n(v_tmp.data() + j * D + p * kPanel, kPanel, panel_tmp.data() + j * kPanel);
    at::native::cpublas::pack(rows, kPanel, kPanel, kPanel, bf16, bf16, panel_tmp.data(),
                              vdst + p * kKeyChunk * kPanel);
  }
  std::fill(kt_tmp.begin(), kt_tmp.end(), Tin(0));  // the next chunk may be shorter
  std::fill(v_tmp.begin(), v_tmp.end(), Tin(0));
}

template <typename Tin>
ForwardOperands<Tin> pack_forward_operands(const Problem& p, const Tensor& q_in, const Tensor& k_in,
                                           const Tensor& v_in) {
  const auto& s = p.shape;
  const int64_t Hkv = s.heads_kv, D = s.head_dim, Tk = p.total_k;
  ForwardOperands<Tin> in;
  in.q_keep = q_in.contiguous();
  in.q = in.q_keep.template data_ptr<Tin>();
  in.key_chunk_begin.resize(p.seqs.size());
  std::vector<std::pair<int64_t, int64_t>> chunks;  // (sequence, chunk in sequence)
  for (size_t b = 0; b < p.seqs.size(); ++b) {
    in.key_chunk_begin[b] = in.key_chunks;
    const int64_t n = (p.seqs[b].k_len + kKeyChunk - 1) / kKeyChunk;
    for (int64_t t = 0; t < n; ++t) chunks.emplace_back(b, t);
    in.key_chunks += n;
  }
  const auto opt = q_in.options().memory_format(at::MemoryFormat::Contiguous);
  in.vnni = use_vnni(q_in.scalar_type(), D);
  const int64_t chunks_alloc = std::max<int64_t>(in.key_chunks, 1);
  in.kt = at::empty({Hkv, in.vnni ? 1 : chunks_alloc, D, kKeyChunk}, opt);
  if (in.vnni) {
    in.kpack = at::empty({Hkv, chunks_alloc, kKeyChunk * D}, opt);
    in.vpack = at::empty({Hkv, chunks_alloc, kKeyChunk * D}, opt);
  }
  in.kv_bad = at::zeros({Hkv, Tk}, opt.dtype(at::kByte));
  const Tensor kc = k_in.contiguous();
  Tensor vc = v_in.contiguous();
  const Tin *k_src = kc.data_ptr<Tin>(), *v_src = vc.data_ptr<Tin>();
  Tin* kt_dst = in.kt.template data_ptr<Tin>();
  uint8_t* kv_bad = in.kv_bad.template data_ptr<uint8_t>();
  std::atomic<bool> any_bad_v{false};
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t i0, int64_t i1) {
    std::vector<Tin> row(D), panel_tmp, kt_tmp, v_tmp;
    if (in.vnni) {  // zero-filled: keys past the sequence end pack as zeros
      panel_tmp.resize(kKeyChunk * kPanel);
      kt_tmp.assign(D * kKeyChunk, Tin(0));
      v_tmp.assign(kKeyChunk * D, Tin(0));
    }
    for (int64_t i = i0; i < i1; ++i) {
      const auto [b, chunk] = chunks[i];
      const Sequence& sq = p.seqs[b];
      const int64_t j0 = chunk * kKeyChunk, len = std::min(kKeyChunk, sq.k_len - j0);
      for (int64_t hk = 0; hk < Hkv; ++hk) {
        const int64_t chunk_index = in.key_chunk_begin[b] + chunk;
        // plain path: straight into kt; VNNI path: kt_tmp, then packed with v_tmp below
        Tin* kt_chunk = in.vnni ? kt_tmp.data() : kt_dst + (hk * in.key_chunks + chunk_index) * D * kKeyChunk;
        for (int64_t c = 0; c < len; ++c) {
          const int64_t pos = sq.k_begin + j0 + c;
          const bool v_ok = copy_row(v_src + (pos * Hkv + hk) * D, in.vnni ? v_tmp.data() + c * D : row.data(), D);
          const bool k_ok = copy_row(k_src + (pos * Hkv + hk) * D, row.data(), D);
          for (int64_t d = 0; d < D; ++d) kt_chunk[d * kKeyChunk + c] = row[d];
          if (!(k_ok && v_ok)) kv_bad[hk * Tk + pos] = 1;
          if (!v_ok) any_bad_v = true;
        }
        if (in.vnni) pack_vnni_chunk(in, hk, chunk_index, len, D, kt_tmp, v_tmp, panel_tmp);
      }
    }
  });
  if (any_bad_v) {  // rare: a copy of v with its non-finite rows zeroed
    vc = vc.clone();
    Tin* v = vc.data_ptr<Tin>();
    for (int64_t row = 0; row < Tk * Hkv; ++row) copy_row(v + row * D, v + row * D, D);
  }
  in.v_keep = vc;
  in.v = vc.data_ptr<Tin>();
  return in;
}

// Where a row of the forward's out and lse lives: out [Tq, Hkv, G, D]; lse [B, Hq, Sq] (dense) or [Hq, Tq].
struct ForwardOutput {
  void* out;
  void* lse;
  bool varlen;
  int64_t heads_q, seqlen_q, total_q;
  // lse element of query head h at `position` in sequence b, whose first query is token q_begin
  int64_t lse_index(int64_t b, int64_t h, int64_t q_begin, int64_t position) const {
    return varlen ? h * total_q + q_begin + position : (b * heads_q + h) * seqlen_q + position;
  }
};

// One task = one query tile of one (sequence, KV head): its q rows are gathered into a [R, D] matrix
// (row = position * G + head in group); per visited run of key tiles S = Q K^T, masked where partially
// visible, online softmax in Tacc, O += P V; then out and lse are written in place. Tin = Tacc except
// bfloat16 (Tacc float, P rounded to bfloat16 for the P V GEMM, as torch's CPU flash attention does).
template <typename Tin, typename Tacc>
struct ForwardWorker {
  const Problem& p;
  const ForwardOperands<Tin>& in;
  ForwardOutput dst;
  Tacc scale;

  struct Workspace {
    std::vector<Tin> q, probs;  // probs: P in bfloat16 (bfloat16 inputs only)
    std::vector<Tacc> scores, acc, m, l, mx, al, sh;
    std::vector<uint8_t> poisoned;
  };
  Workspace make_workspace() const {
    const int64_t rows = p.q_tile * p.shape.group, D = p.shape.head_dim;
    Workspace ws;
    ws.q.resize(rows * D);
    ws.acc.resize(rows * D);
    ws.scores.resize(rows * kKeyChunk);
    for (auto* x : {&ws.m, &ws.l, &ws.mx, &ws.al, &ws.sh}) x->resize(rows);
    if (!std::is_same<Tin, Tacc>::value) ws.probs.resize(rows * kKeyChunk);
    ws.poisoned.resize(rows);
    return ws;
  }

  // Rows that see a key whose k or v is non-finite become NaN (head_mode.h).
  static void mark_poisoned(const HeadVisibility& hv, const uint8_t* bad, const QueryTile& qt, int64_t j0,
                            int64_t j1, uint8_t* poisoned) {
    if (std::none_of(bad + j0, bad + j1 + 1, [](uint8_t x) { return x != 0; })) return;
    for (int64_t j = j0; j <= j1; ++j) {
      if (!bad[j]) continue;
      for (int64_t r = 0; r < qt.rows; ++r)
        for (int64_t g = 0; g < hv.group; ++g)
          if (hv.visible(g, qt.i0 + r, j)) poisoned[r * hv.group + g] = 1;
    }
  }

  // Consumes the key tiles [t0, t1) of one chunk, all visited: S, masks, online softmax, O += P V.
  void run_keys(const HeadVisibility& hv, const QueryTile& qt, const Sequence& s, int64_t t0, int64_t t1,
                const TileVisibility* vis, const Tin* kt_seq, const Tin* v_seq, int64_t v_ld, bool first,
                Workspace& ws) const {
    const int64_t R = qt.rows * p.shape.group, D = p.shape.head_dim;
    const int64_t j0 = t0 * kKeyTile, len = std::min(t1 * kKeyTile, s.k_len) - j0;
    const Tin* kt = kt_seq + (j0 / kKeyChunk) * D * kKeyChunk + j0 % kKeyChunk;
    Tacc* sp = ws.scores.data();
    cpu::gemm_nn(R, len, D, ws.q.data(), D, kt, kKeyChunk, sp, len, false);
    for (int64_t t = t0; t < t1; ++t) {
      if (vis[t - t0] != TileVisibility::kPartial) continue;
      const KeyTile tile(s, t);
      mask_tile<Tacc>(hv, sp + (tile.j0 - j0), len, qt, tile);
    }
    cpu::scale_row_max(sp, R, len, len, scale, ws.mx.data());
    online_softmax_step(R, ws);
    const Tin* probs;
    if constexpr (std::is_same<Tin, Tacc>::value) {
      cpu::exp_shifted(sp, R, len, ws.sh.data(), ws.mx.data());  // mx now holds the row sums
      probs = sp;
    } else {
      cpu::exp_shifted_bf16(sp, R, len, len, ws.sh.data(), ws.mx.data(),
                            reinterpret_cast<uint16_t*>(ws.probs.data()), len);
      probs = ws.probs.data();
    }
    accumulate_row_sums(R, D, first, ws);
    cpu::gemm_nn(R, D, len, probs, len, v_seq + j0 * v_ld, v_ld, ws.acc.data(), D, /*add_C=*/!first);
  }

  // The same on the VNNI operands (bfloat16 with AMX): S is computed per kPanel-key panel into a buffer with
  // a kPanel-multiple leading dimension, P has an even number of columns (zero padded) for the P V GEMM.
  void run_keys_vnni(const HeadVisibility& hv, const QueryTile& qt, const Sequence& s, int64_t hk, int64_t chunk_index,
                     int64_t t0, int64_t t1, const TileVisibility* vis, bool first, Workspace& ws) const {
    if constexpr (!std::is_same<Tin, Tacc>::value) {
      const int64_t R = qt.rows * p.shape.group, D = p.shape.head_dim;
      const int64_t j0 = t0 * kKeyTile, len = std::min(t1 * kKeyTile, s.k_len) - j0;
      const int64_t ld_s = round_up(len, kPanel), k_even = round_up(len, 2), in_chunk = j0 % kKeyChunk;
      const int64_t chunk_offset = (hk * in.kpack.size(1) + chunk_index) * kKeyChunk * D;
      const Tin* kp = in.kpack.template data_ptr<Tin>() + chunk_offset + in_chunk * D;  // panel in_chunk / kPanel
      const Tin* vp = in.vpack.template data_ptr<Tin>() + chunk_offset + in_chunk * kPanel;  // row pair in_chunk / 2
      Tacc* sp = ws.scores.data();
      for (int64_t panel = 0; panel < ld_s / kPanel; ++panel)
        cpu::gemm_nn_vnni(R, kPanel, D, ws.q.data(), D, kp + panel * D * kPanel, kPanel, sp + panel * kPanel, ld_s,
                          false);
      for (int64_t t = t0; t < t1; ++t) {
        if (vis[t - t0] != TileVisibility::kPartial) continue;
        const KeyTile tile(s, t);
        mask_tile<Tacc>(hv, sp + (tile.j0 - j0), ld_s, qt, tile);
      }
      cpu::scale_row_max(sp, R, len, ld_s, scale, ws.mx.data());
      online_softmax_step(R, ws);
      cpu::exp_shifted_bf16(sp, R, len, ld_s, ws.sh.data(), ws.mx.data(),
                            reinterpret_cast<uint16_t*>(ws.probs.data()), k_even);
      accumulate_row_sums(R, D, first, ws);
      for (int64_t panel = 0; panel < D / kPanel; ++panel)
        cpu::gemm_nn_vnni(R, kPanel, k_even, ws.probs.data(), k_even, vp + panel * kKeyChunk * kPanel, kPanel,
                          ws.acc.data() + panel * kPanel, D, /*add_C=*/!first);
    }
  }

  // Online softmax: new row maxima from the tile maxima in mx; al = rescale factor of what was accumulated,
  // sh = the shift of this tile's exponentials.
  static void online_softmax_step(int64_t R, Workspace& ws) {
    Tacc *m = ws.m.data(), *mx = ws.mx.data(), *al = ws.al.data(), *sh = ws.sh.data();
    for (int64_t r = 0; r < R; ++r) {
      const Tacc m_new = std::max(m[r], mx[r]);
      al[r] = std::isinf(m[r]) ? Tacc(0) : std::exp(m[r] - m_new);
      sh[r] = std::isinf(m_new) ? Tacc(0) : m_new;  // a row seeing nothing yet keeps exp(-inf) = 0
      m[r] = m_new;
    }
  }
  // l = l * al + (tile row sums, in mx); the accumulator is rescaled by al unless this is the first tile.
  static void accumulate_row_sums(int64_t R, int64_t D, bool first, Workspace& ws) {
    for (int64_t r = 0; r < R; ++r) ws.l[r] = ws.l[r] * ws.al[r] + ws.mx[r];
    if (!first) cpu::scale_rows(ws.acc.data(), R, D, ws.al.data());
  }

  void run(const Task& task, Workspace& ws) const {
    const Sequence& s = p.seqs[task.b];
    const HeadVisibility hv = p.visibility(task.b, task.hk);
    const QueryTile qt(p, s, task.tile);
    const int64_t Hkv = p.shape.heads_kv, G = p.shape.group, D = p.shape.head_dim, R = qt.rows * G;
    const int64_t t_first = s.q_begin + qt.r0;  // token of the tile's first query row
    std::fill(ws.poisoned.begin(), ws.poisoned.begin() + R, uint8_t(0));
    for (int64_t r = 0; r < qt.rows; ++r)  // gather the tile's q rows; non-finite ones poison their row
      for (int64_t g = 0; g < G; ++g) {
        const int64_t row = r * G + g;
        if (!copy_row(in.q + (((t_first + r) * Hkv + task.hk) * G + g) * D, ws.q.data() + row * D, D))
          ws.poisoned[row] = 1;
      }
    const Tin* kt_seq = in.kt.template data_ptr<Tin>() +
                        (task.hk * in.key_chunks + in.key_chunk_begin[task.b]) * D * kKeyChunk;
    const Tin* v_seq = in.v + s.k_begin * Hkv * D + task.hk * D;
    const uint8_t* bad_seq = in.kv_bad.template data_ptr<uint8_t>() + task.hk * p.total_k + s.k_begin;
    std::fill(ws.m.begin(), ws.m.begin() + R, -std::numeric_limits<Tacc>::infinity());
    std::fill(ws.l.begin(), ws.l.begin() + R, Tacc(0));
    std::fill(ws.acc.begin(), ws.acc.begin() + R * D, Tacc(0));

    bool first = true;
    const int64_t nk = Problem::num_k_tiles(s);
    for (int64_t c0 = 0; c0 < nk; c0 += kTilesPerChunk) {  // runs of visited tiles inside each chunk
      const int64_t c1 = std::min(nk, c0 + kTilesPerChunk);
      TileVisibility vis[kTilesPerChunk];
      for (int64_t t = c0; t < c1; ++t) {
        const KeyTile tile(s, t);
        vis[t - c0] = hv.classify(qt.i0, qt.i1, tile.j0, tile.j1);
      }
      for (int64_t t0 = c0; t0 < c1;) {
        if (vis[t0 - c0] == TileVisibility::kSkip) {
          ++t0;
          continue;
        }
        int64_t t1 = t0 + 1;
        while (t1 < c1 && vis[t1 - c0] != TileVisibility::kSkip) ++t1;
        if (in.vnni) {
          run_keys_vnni(hv, qt, s, task.hk, in.key_chunk_begin[task.b] + c0 / kTilesPerChunk, t0, t1,
                        vis + (t0 - c0), first, ws);
        } else {
          run_keys(hv, qt, s, t0, t1, vis + (t0 - c0), kt_seq, v_seq, Hkv * D, first, ws);
        }
        first = false;
        mark_poisoned(hv, bad_seq, qt, t0 * kKeyTile, std::min(t1 * kKeyTile, s.k_len) - 1, ws.poisoned.data());
        t0 = t1;
      }
    }
    if (in.vnni) at::native::cpublas::brgemm_release();  // AMX tile state back, before the thread moves on
    write_rows(task, s, qt, ws);
  }

  void write_rows(const Task& task, const Sequence& s, const QueryTile& qt, const Workspace& ws) const {
    const int64_t Hkv = p.shape.heads_kv, G = p.shape.group, D = p.shape.head_dim;
    using Tout = Tin;
    using Tlse = typename std::conditional<std::is_same<Tacc, double>::value, double, float>::type;
    Tout* out = static_cast<Tout*>(dst.out);
    Tlse* lse = static_cast<Tlse*>(dst.lse);
    for (int64_t r = 0; r < qt.rows; ++r)
      for (int64_t g = 0; g < G; ++g) {
        const int64_t row = r * G + g, h = task.hk * G + g, position = qt.r0 + r;
        const Tacc* a = ws.acc.data() + row * D;
        Tout* o = out + (((s.q_begin + position) * Hkv + task.hk) * G + g) * D;
        Tlse& lse_row = lse[dst.lse_index(task.b, h, s.q_begin, position)];
        const Tacc l = ws.l[row];
        if (ws.poisoned[row]) {
          std::fill(o, o + D, static_cast<Tout>(std::numeric_limits<float>::quiet_NaN()));
          lse_row = std::numeric_limits<Tlse>::quiet_NaN();
        } else if (l > Tacc(0)) {
          const Tacc inv = Tacc(1) / l;
          for (int64_t d = 0; d < D; ++d) o[d] = static_cast<Tout>(a[d] * inv);
          lse_row = static_cast<Tlse>(ws.m[row] + std::log(l));
        } else {  // no visible key: out 0, lse -inf
          std::fill(o, o + D, static_cast<Tout>(0));
          lse_row = -std::numeric_limits<Tlse>::infinity();
        }
      }
  }
};

template <typename Tin, typename Tacc>
std::tuple<Tensor, Tensor> attention_forward_impl(const Problem& p, const Tensor& q, const Tensor& k, const Tensor& v) {
  const auto& s = p.shape;
  const ForwardOperands<Tin> in = pack_forward_operands<Tin>(p, q, k, v);
  const auto lse_dtype = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  int64_t rows_in_sequences = 0;
  for (const Sequence& sq : p.seqs) rows_in_sequences += sq.q_len;
  // Every row of a sequence is written by its task; rows outside every sequence (varlen) stay 0 / -inf.
  const bool gaps = rows_in_sequences < p.total_q;
  const auto out_opt = q.options().memory_format(at::MemoryFormat::Contiguous);
  Tensor out = gaps ? at::zeros(q.sizes(), out_opt) : at::empty(q.sizes(), out_opt);
  const std::vector<int64_t> lse_shape = s.varlen ? std::vector<int64_t>{s.heads_q, p.total_q}
                                                  : std::vector<int64_t>{s.batch, s.heads_q, s.seqlen_q};
  Tensor lse = gaps ? at::full(lse_shape, -std::numeric_limits<double>::infinity(), q.options().dtype(lse_dtype))
                    : at::empty(lse_shape, q.options().dtype(lse_dtype));
  const ForwardOutput dst{out.data_ptr(), lse.data_ptr(), s.varlen, s.heads_q, s.seqlen_q, p.total_q};
  std::vector<Task> tasks = make_tasks(p, /*over_key_tiles=*/false, /*keep_empty=*/true);
  run_tasks(tasks, ForwardWorker<Tin, Tacc>{p, in, dst, static_cast<Tacc>(s.scale)});
  return {out, lse};
}

std::tuple<Tensor, Tensor> attention_cpu(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& head_mode,
                                         const c10::optional<Tensor>& block_mask,
                                         const c10::optional<Tensor>& cu_seqlens_q,
                                         const c10::optional<Tensor>& cu_seqlens_k, int64_t sink, int64_t window,
                                         int64_t block_size, c10::optional<double> scale, int64_t max_seqlen_q,
                                         int64_t max_seqlen_k, c10::string_view strategy) {
  at::NoGradGuard no_grad;
  check_strategy(strategy);
  const Problem p = make_problem(q, k, v, head_mode, block_mask, cu_seqlens_q, cu_seqlens_k, sink, window, block_size,
                                 scale, max_seqlen_q, max_seqlen_k);
  switch (q.scalar_type()) {
    case at::kDouble:
      return attention_forward_impl<double, double>(p, q, k, v);
    case at::kBFloat16:
      return attention_forward_impl<at::BFloat16, float>(p, q, k, v);
    default:
      return attention_forward_impl<float, float>(p, q, k, v);
  }
}

// ----------------------------------------------------------------------------- backward
// P = exp(s - lse), dS = P * (dO V^T - D) with D = rowsum(dO * O) - dlse;
// dV = P^T dO, dK = dS^T (scale q), dQ = scale * dS K.
//
// Non-finite values (head_mode.h): a poisoned row (lse NaN, i.e. the forward row is NaN, or a
// non-finite grad_out / grad_lse row) is computed as a row that sees nothing and its dq set to NaN
// afterwards; dk / dv of a key are NaN iff a poisoned row sees it. Non-finite q / k / v rows are used
// as zeros, so nothing reaches rows or keys that cannot see them (0 * NaN = NaN in a GEMM).
struct BackwardInputs {
  Tensor qh, kh, vh, doh;  // packed, q scaled, non-finite rows zeroed
  Tensor lse_rows;         // [Hkv, Tq*G], -inf (and poisoned rows) as +inf so exp(s - lse) = 0
  Tensor delta_rows;       // [Hkv, Tq*G], 0 on poisoned rows
  Tensor poisoned;         // uint8 [Hkv, Tq*G]
};

// Zeroes the rows (last dimension) of x holding a non-finite element; returns the bool row mask.
Tensor zero_non_finite_rows(Tensor& x) {
  const Tensor bad = at::logical_not(at::isfinite(x).all(-1, /*keepdim=*/true));
  x.masked_fill_(bad, 0);
  return bad.squeeze(-1);
}

template <typename T>
struct KeyValueGradWorker {  // one task = one key tile: dk, dv summed over every query (and head) seeing it
  const Problem& p;
  const BackwardInputs& in;
  Tensor &dkh, &dvh;  // [Hkv, Tk, D] zeros

  TileBuffers make_workspace() const { return TileBuffers(p.q_tile * p.shape.group, in.qh.options()); }

  void run(const Task& task, TileBuffers& ws) const {
    const Sequence& s = p.seqs[task.b];
    const HeadVisibility hv = p.visibility(task.b, task.hk);
    const KeyTile kt(s, task.tile);
    const int64_t G = p.shape.group, D = p.shape.head_dim;
    const Tensor k_rows = in.kh[task.hk].narrow(0, s.k_begin + kt.j0, kt.len);
    const Tensor v_rows = in.vh[task.hk].narrow(0, s.k_begin + kt.j0, kt.len);
    Tensor dk = dkh[task.hk].narrow(0, s.k_begin + kt.j0, kt.len);
    Tensor dv = dvh[task.hk].narrow(0, s.k_begin + kt.j0, kt.len);
    const Tensor q_all = in.qh[task.hk].view({-1, D}), do_all = in.doh[task.hk].view({-1, D});
    const T* lse_all = in.lse_rows[task.hk].data_ptr<T>();
    const T* delta_all = in.delta_rows[task.hk].data_ptr<T>();
    const uint8_t* poisoned_all = in.poisoned[task.hk].data_ptr<uint8_t>();
    std::vector<uint8_t> key_poisoned(kt.len, 0);
    for (int64_t qt_index = 0; qt_index < p.num_q_tiles(s); ++qt_index) {
      const QueryTile qt(p, s, qt_index);
      const TileVisibility vis = hv.classify(qt.i0, qt.i1, kt.j0, kt.j1);
      if (vis == TileVisibility::kSkip) continue;
      const int64_t row0 = (s.q_begin + qt.r0) * G, R = qt.rows * G;
      const Tensor q_rows = q_all.narrow(0, row0, R), do_rows = do_all.narrow(0, row0, R);
      const Tensor prob = probabilities<T>(hv, vis, q_rows, k_rows, lse_all + row0, qt, kt, ws.scores);
      dv.addmm_(prob.t(), do_rows);
      Tensor ds = TileBuffers::tile(ws.scores2, R, kt.len);
      at::mm_out(ds, do_rows, v_rows.t());
      cpu::softmax_grad(ds.data_ptr<T>(), prob.data_ptr<T>(), R, kt.len, delta_all + row0);
      dk.addmm_(ds.t(), q_rows);
      mark_seen_by_poisoned(hv, poisoned_all + row0, qt, kt, key_poisoned);
    }
    for (int64_t j = 0; j < kt.len; ++j) {
      if (!key_poisoned[j]) continue;
      dk[j].fill_(std::numeric_limits<double>::quiet_NaN());
      dv[j].fill_(std::numeric_limits<double>::quiet_NaN());
    }
  }

  // key_poisoned[j - kt.j0] = 1 for the keys of the tile that a poisoned row of the query tile sees.
  static void mark_seen_by_poisoned(const HeadVisibility& hv, const uint8_t* poisoned, const QueryTile& qt,
                                    const KeyTile& kt, std::vector<uint8_t>& key_poisoned) {
    const int64_t R = qt.rows * hv.group;
    if (std::none_of(poisoned, poisoned + R, [](uint8_t x) { return x != 0; })) return;
    for (int64_t r = 0; r < qt.rows; ++r)
      for (int64_t g = 0; g < hv.group; ++g)
        if (poisoned[r * hv.group + g])
          for (int64_t j = kt.j0; j <= kt.j1; ++j)
            if (hv.visible(g, qt.i0 + r, j)) key_poisoned[j - kt.j0] = 1;
  }
};

template <typename T>
struct QueryGradWorker {  // one task = one query tile: dq (unscaled; the caller multiplies by scale)
  const Problem& p;
  const BackwardInputs& in;
  Tensor& dqh;  // [Hkv, Tq, G, D] zeros

  TileBuffers make_workspace() const { return TileBuffers(p.q_tile * p.shape.group, in.qh.options()); }

  void run(const Task& task, TileBuffers& ws) const {
    const Sequence& s = p.seqs[task.b];
    const HeadVisibility hv = p.visibility(task.b, task.hk);
    const QueryTile qt(p, s, task.tile);
    const int64_t G = p.shape.group, D = p.shape.head_dim, R = qt.rows * G;
    const int64_t row0 = (s.q_begin + qt.r0) * G;
    const Tensor q_rows = in.qh[task.hk].view({-1, D}).narrow(0, row0, R);
    const Tensor do_rows = in.doh[task.hk].view({-1, D}).narrow(0, row0, R);
    const T* lse_rows = in.lse_rows[task.hk].data_ptr<T>() + row0;
    const T* delta = in.delta_rows[task.hk].data_ptr<T>() + row0;
    const Tensor k_seq = in.kh[task.hk].narrow(0, s.k_begin, s.k_len);
    const Tensor v_seq = in.vh[task.hk].narrow(0, s.k_begin, s.k_len);
    Tensor dq = dqh[task.hk].view({-1, D}).narrow(0, row0, R);
    for (int64_t kt_index = 0; kt_index < Problem::num_k_tiles(s); ++kt_index) {
      const KeyTile kt(s, kt_index);
      const TileVisibility vis = hv.classify(qt.i0, qt.i1, kt.j0, kt.j1);
      if (vis == TileVisibility::kSkip) continue;
      const Tensor k_rows = k_seq.narrow(0, kt.j0, kt.len);
      const Tensor prob = probabilities<T>(hv, vis, q_rows, k_rows, lse_rows, qt, kt, ws.scores);
      Tensor ds = TileBuffers::tile(ws.scores2, R, kt.len);
      at::mm_out(ds, do_rows, v_seq.narrow(0, kt.j0, kt.len).t());
      cpu::softmax_grad(ds.data_ptr<T>(), prob.data_ptr<T>(), R, kt.len, delta);
      dq.addmm_(ds, k_rows);
    }
  }
};

void check_backward_tensors(const Problem& p, const Tensor& grad_out, const c10::optional<Tensor>& grad_lse,
                            const Tensor& q, const Tensor& out, const Tensor& lse) {
  const auto& s = p.shape;
  const std::vector<int64_t> lse_shape =
      s.varlen ? std::vector<int64_t>{s.heads_q, p.total_q} : std::vector<int64_t>{s.batch, s.heads_q, s.seqlen_q};
  ELASTIC_CHECK(grad_out.sizes() == q.sizes(), "elastic.attention_backward: grad_out must have the shape of q ",
                q.sizes(), ", got ", grad_out.sizes());
  ELASTIC_CHECK(out.sizes() == q.sizes(), "elastic.attention_backward: out must have the shape of q ", q.sizes(),
                ", got ", out.sizes());
  ELASTIC_CHECK(lse.sizes() == at::IntArrayRef(lse_shape), "elastic.attention_backward: lse must have shape ",
                at::IntArrayRef(lse_shape), s.varlen ? " [Hq, Tq]" : " [B, Hq, Sq]", ", got ", lse.sizes());
  for (const auto& [name, t] : {std::pair<const char*, const Tensor*>{"grad_out", &grad_out}, {"out", &out}, {"lse", &lse}}) {
    ELASTIC_CHECK(t->device() == q.device(), "elastic.attention_backward: ", name, " must be on the device of q (",
                  q.device(), "), got ", t->device());
    ELASTIC_CHECK(at::isFloatingType(t->scalar_type()), "elastic.attention_backward: ", name,
                  " must be a floating tensor, got ", t->scalar_type());
  }
  if (grad_lse.has_value()) {
    ELASTIC_CHECK(grad_lse->sizes() == lse.sizes(), "elastic.attention_backward: grad_lse must have the shape of lse ",
                  lse.sizes(), ", got ", grad_lse->sizes());
    ELASTIC_CHECK(grad_lse->device() == q.device() && at::isFloatingType(grad_lse->scalar_type()),
                  "elastic.attention_backward: grad_lse must be a floating tensor on the device of q");
  }
}

template <typename T>
std::tuple<Tensor, Tensor, Tensor> attention_backward_impl(const Problem& p, const Tensor& grad_out,
                                                           const c10::optional<Tensor>& grad_lse, const Tensor& q,
                                                           const Tensor& k, const Tensor& v, const Tensor& out,
                                                           const Tensor& lse) {
  const auto acc = accumulate_type(q);
  const auto& s = p.shape;
  BackwardInputs in;
  in.qh = pack_query_like(q, p, acc, s.scale);
  in.kh = pack_kv(k, p, acc);
  in.vh = pack_kv(v, p, acc);
  in.doh = pack_query_like(grad_out, p, acc);
  for (Tensor* x : {&in.qh, &in.kh, &in.vh}) zero_non_finite_rows(*x);
  const Tensor lse_packed = pack_lse_like(lse, p, acc);
  Tensor poisoned = at::isnan(lse_packed).logical_or_(zero_non_finite_rows(in.doh).view({s.heads_kv, -1}));
  Tensor out_packed = pack_query_like(out, p, acc);
  zero_non_finite_rows(out_packed);  // poisoned rows only: their delta is replaced below
  in.delta_rows = (in.doh * out_packed).sum(-1).view({s.heads_kv, -1});
  if (grad_lse.has_value()) {
    const Tensor dlse = pack_lse_like(*grad_lse, p, acc);
    poisoned.logical_or_(at::logical_not(at::isfinite(dlse)));
    in.delta_rows.sub_(dlse);
  }
  const double inf = std::numeric_limits<double>::infinity();
  in.lse_rows = lse_packed.masked_fill(poisoned.logical_or(lse_packed == -inf), inf);
  in.delta_rows.masked_fill_(poisoned, 0);
  in.poisoned = poisoned.to(at::kByte).contiguous();

  Tensor dqh = at::zeros_like(in.qh), dkh = at::zeros_like(in.kh), dvh = at::zeros_like(in.vh);
  std::vector<Task> key_tasks = make_tasks(p, /*over_key_tiles=*/true);
  run_tasks(key_tasks, KeyValueGradWorker<T>{p, in, dkh, dvh});
  std::vector<Task> query_tasks = make_tasks(p, /*over_key_tiles=*/false);
  run_tasks(query_tasks, QueryGradWorker<T>{p, in, dqh});
  dqh.mul_(s.scale);
  dqh.view({s.heads_kv, -1, s.head_dim}).masked_fill_(in.poisoned.to(at::kBool).unsqueeze(-1),
                                                        std::numeric_limits<double>::quiet_NaN());

  Tensor dq = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  dq.view({p.total_q, s.heads_kv, s.group, s.head_dim}).copy_(dqh.permute({1, 0, 2, 3}));
  Tensor dk = at::empty(k.sizes(), k.options().memory_format(at::MemoryFormat::Contiguous));
  Tensor dv = at::empty(v.sizes(), v.options().memory_format(at::MemoryFormat::Contiguous));
  dk.view({p.total_k, s.heads_kv, s.head_dim}).copy_(dkh.permute({1, 0, 2}));
  dv.view({p.total_k, s.heads_kv, s.head_dim}).copy_(dvh.permute({1, 0, 2}));
  return {dq, dk, dv};
}

std::tuple<Tensor, Tensor, Tensor> attention_backward_cpu(
    const Tensor& grad_out, const c10::optional<Tensor>& grad_lse, const Tensor& q, const Tensor& k, const Tensor& v,
    const Tensor& out, const Tensor& lse, const Tensor& head_mode, const c10::optional<Tensor>& block_mask,
    const c10::optional<Tensor>& cu_seqlens_q, const c10::optional<Tensor>& cu_seqlens_k, int64_t sink,
    int64_t window, int64_t block_size, c10::optional<double> scale, int64_t max_seqlen_q, int64_t max_seqlen_k) {
  at::NoGradGuard no_grad;
  const Problem p = make_problem(q, k, v, head_mode, block_mask, cu_seqlens_q, cu_seqlens_k, sink, window, block_size,
                                 scale, max_seqlen_q, max_seqlen_k);
  check_backward_tensors(p, grad_out, grad_lse, q, out, lse);
  if (accumulate_type(q) == at::kDouble)
    return attention_backward_impl<double>(p, grad_out, grad_lse, q, k, v, out, lse);
  return attention_backward_impl<float>(p, grad_out, grad_lse, q, k, v, out, lse);
}

}  // namespace

TORCH_LIBRARY_IMPL(elastic, CPU, m) {
  m.impl("attention", &attention_cpu);
  m.impl("attention_backward", &attention_backward_cpu);
}

}  // namespace elastic
