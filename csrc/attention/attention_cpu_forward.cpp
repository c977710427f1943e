// Forward of the CPU attention kernel (see attention_cpu.cpp for the overall design).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "attention/attention_cpu_gemm.h"
#include "attention/attention_cpu_problem.h"
#include "attention/attention_cpu_rows.h"

namespace elastic {
namespace cpu {
namespace {

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
    cpu::scaled_row_max(sp, R, len, len, scale, ws.mx.data());
    online_softmax_step(R, ws);
    const Tin* probs;
    if constexpr (std::is_same<Tin, Tacc>::value) {
      cpu::exp_shifted(sp, R, len, scale, ws.sh.data(), ws.mx.data());  // mx now holds the row sums
      probs = sp;
    } else {
      cpu::exp_shifted_bf16(sp, R, len, len, scale, ws.sh.data(), ws.mx.data(),
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
      cpu::scaled_row_max(sp, R, len, ld_s, scale, ws.mx.data());
      online_softmax_step(R, ws);
      cpu::exp_shifted_bf16(sp, R, len, ld_s, scale, ws.sh.data(), ws.mx.data(),
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

}  // namespace

std::tuple<Tensor, Tensor> attention_forward(const Problem& p, const Tensor& q, const Tensor& k, const Tensor& v) {
  switch (q.scalar_type()) {
    case at::kDouble:
      return attention_forward_impl<double, double>(p, q, k, v);
    case at::kBFloat16:
      return attention_forward_impl<at::BFloat16, float>(p, q, k, v);
    default:
      return attention_forward_impl<float, float>(p, q, k, v);
  }
}

}  // namespace cpu
}  // namespace elastic
