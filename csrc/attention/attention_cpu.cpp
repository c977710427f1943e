// CPU kernels of elastic::attention and elastic::attention_backward.
//
// Flash-attention style: each task owns one tile of queries (forward, dq) or of keys (dk/dv) of one
// (sequence, KV head), walks the tiles on the other side with an online softmax, skips tiles with no
// visible pair and masks only tiles that are partially visible (attention_cpu_tiles.h), so memory is
// O(tile) per thread and STREAM heads cost O(S * (sink + window)). The G query heads of a KV head are
// stacked as rows of one GEMM operand, so K/V are never repeated for GQA. Tasks run on at::parallel_for,
// most expensive first (backward: one pass over key tiles for dk/dv, one over query tiles for dq, so no
// two threads write the same rows).
//
// Forward (attention_cpu_forward.cpp): raw-pointer GEMMs through ATen's brgemm (oneDNN micro-kernels;
// AMX with VNNI-packed K/V for bf16), runs of up to 4 visited key tiles per GEMM, vectorised row loops
// (attention_cpu_rows.cpp), q / out / lse read and written in place. Backward (this file): ATen GEMMs on
// tensors packed per KV head: q/out/dO as [Hkv, Tq, G, D] (a tile of r query positions is one contiguous
// [r*G, D] matrix, row = position * G + head in group), k/v as [Hkv, Tk, D], lse as [Hkv, Tq*G].
// Dense inputs are treated as varlen with equal lengths. Accumulation is fp32 (fp64 for fp64 inputs, so
// gradcheck is exact). Non-finite inputs follow the rule of head_mode.h in every dtype.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "attention/attention_checks.h"
#include "attention/attention_cpu_problem.h"
#include "attention/attention_cpu_rows.h"

namespace elastic {
namespace cpu {

std::vector<Task> make_tasks(const Problem& p, bool over_key_tiles, bool keep_empty) {
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

}  // namespace cpu

namespace {

using at::Tensor;
using cpu::HeadVisibility;
using cpu::KeyTile;
using cpu::kKeyTile;
using cpu::mask_tile;
using cpu::Problem;
using cpu::query_tile_positions;
using cpu::QueryTile;
using cpu::Sequence;
using cpu::Task;
using cpu::make_tasks;
using cpu::run_tasks;
using cpu::TileVisibility;

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
  cpu::exp_shifted(s.data_ptr<T>(), s.size(0), kt.len, T(1), lse_rows, nullptr);
  return s;
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
  return cpu::attention_forward(p, q, k, v);
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
