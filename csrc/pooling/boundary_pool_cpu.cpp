// CPU reference of elastic::boundary_pool: mean over the union of the first n_first and the last
// n_last tokens of each sequence (a token in both windows counts once), per KV head, in fp32
// (fp64 for fp64 keys, so gradcheck is exact).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>

#include "pooling/boundary_pool.h"

namespace elastic {

at::Tensor boundary_pool_cpu(const at::Tensor& keys, const c10::optional<at::Tensor>& cu_seqlens, int64_t n_first,
                             int64_t n_last) {
  const PoolShape s = check_boundary_pool_args(keys, n_first, n_last, cu_seqlens);
  const auto acc = keys.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::zeros({s.batch, s.heads, s.dim}, keys.options().dtype(acc));
  at::Tensor cu = s.varlen ? cu_seqlens->contiguous() : at::Tensor();
  for (int64_t b = 0; b < s.batch; ++b) {
    at::Tensor seq;  // [S, H, D]
    if (s.varlen) {
      const int32_t* c = cu.data_ptr<int32_t>();
      ELASTIC_CHECK(c[0] >= 0 && c[b] <= c[b + 1] && c[b + 1] <= keys.size(0), "elastic.boundary_pool: cu_seqlens ",
                    "must start at >= 0, be non-decreasing and stay within the ", keys.size(0), " tokens of keys");
      seq = keys.narrow(0, c[b], c[b + 1] - c[b]);
    } else {
      seq = keys[b];
    }
    const int64_t S = seq.size(0);
    if (S == 0) continue;  // an empty sequence pools to zeros
    const int64_t head = std::min(n_first, S);
    const int64_t tail_start = std::max(head, S - n_last);  // tokens already in the head window count once
    at::Tensor sum = seq.narrow(0, 0, head).to(acc).sum(0);
    if (tail_start < S) sum += seq.narrow(0, tail_start, S - tail_start).to(acc).sum(0);
    const int64_t count = head + (S - tail_start);
    out[b].copy_(sum / static_cast<double>(count));
  }
  return out;
}

TORCH_LIBRARY_IMPL(elastic, CPU, m) { m.impl("boundary_pool", &boundary_pool_cpu); }

}  // namespace elastic
