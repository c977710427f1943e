// CPU kernels of the training mix's elementwise ops (schemas and semantics: csrc/ops.cpp): the spec of the fused CUDA
// kernels (train_mix_cuda.cu), written with ATen in fp64 so that each result is rounded once. The training mix on
// the CPU itself (elastic_cuda/ops/_train_mix.py) keeps its torch expressions; these kernels exist for the tests and for callers
// of the ops.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <vector>

#include "train_mix/train_mix_checks.h"

namespace elastic {
namespace {

// int64 [rows]: the batch of each row, -1 for a row in no sequence. Varlen bounds are checked here (CPU values).
at::Tensor row_batches(const char* op, const MixRows& r, const c10::optional<at::Tensor>& cu_seqlens) {
  std::vector<int64_t> batch_of(static_cast<size_t>(r.rows), -1);
  if (!r.varlen) {
    for (int64_t row = 0; row < r.rows; ++row) batch_of[row] = row / r.seq_len;
  } else {
    const at::Tensor cu = cu_seqlens->contiguous();
    const int32_t* c = cu.data_ptr<int32_t>();
    for (int64_t b = 0; b < r.batch; ++b) {
      ELASTIC_CHECK(c[0] >= 0 && c[b] <= c[b + 1] && c[b + 1] <= r.rows, "elastic.", op,
                    ": cu_seqlens must start at >= 0, be non-decreasing and stay within the ", r.rows, " rows, got ",
                    "cu_seqlens[", b, "] = ", c[b], ", cu_seqlens[", b + 1, "] = ", c[b + 1]);
      for (int64_t row = c[b]; row < c[b + 1]; ++row) batch_of[row] = b;
    }
  }
  return at::tensor(batch_of, at::TensorOptions().dtype(at::kLong));
}

at::Tensor train_mix_combine_cpu(const at::Tensor& full, const at::Tensor& sparse, const at::Tensor& z,
                                 const c10::optional<at::Tensor>& cu_seqlens) {
  const char* op = "train_mix_combine";
  const MixRows r = check_mix_rows(op, full, "full", sparse, "sparse", cu_seqlens);
  check_mix_z(op, z, r, full.device());
  const int64_t group = r.heads / z.size(1);
  const at::Tensor batch = row_batches(op, r, cu_seqlens);          // [rows]
  const at::Tensor inside = batch.ge(0);
  const at::Tensor zh = z.to(at::kDouble).repeat_interleave(group, 1);  // [B, H]
  at::Tensor w = zh.index_select(0, batch.clamp_min(0));              // [rows, H]
  w = w.unsqueeze(-1);
  const at::Tensor a = full.reshape({r.rows, r.heads, r.head_dim}).to(at::kDouble);
  const at::Tensor s = sparse.reshape({r.rows, r.heads, r.head_dim}).to(at::kDouble);
  at::Tensor out = w * a + (1 - w) * s;
  out = at::where(inside.view({r.rows, 1, 1}), out, at::zeros({}, out.options()));
  return out.to(full.scalar_type()).reshape(full.sizes());
}

at::Tensor train_mix_dz_cpu(const at::Tensor& grad_out, const at::Tensor& out_full, const at::Tensor& out_sparse,
                            const c10::optional<at::Tensor>& cu_seqlens_q, int64_t kv_heads, int64_t max_seqlen_q) {
  (void)max_seqlen_q;  // sizes the CUDA grid only
  const char* op = "train_mix_dz";
  const MixRows r = check_mix_rows(op, grad_out, "grad_out", out_full, "out_full", cu_seqlens_q);
  const MixRows r2 = check_mix_rows(op, grad_out, "grad_out", out_sparse, "out_sparse", cu_seqlens_q);
  (void)r2;
  ELASTIC_CHECK(kv_heads > 0 && r.heads % kv_heads == 0, "elastic.", op, ": kv_heads must be > 0 and divide the ",
                r.heads, " heads of grad_out, got ", kv_heads);
  const at::Tensor batch = row_batches(op, r, cu_seqlens_q);
  const at::Tensor g = grad_out.reshape({r.rows, r.heads, r.head_dim}).to(at::kDouble);
  const at::Tensor diff = out_full.reshape({r.rows, r.heads, r.head_dim}).to(at::kDouble) -
                          out_sparse.reshape({r.rows, r.heads, r.head_dim}).to(at::kDouble);
  const at::Tensor per_row = (g * diff).sum(-1).view({r.rows, kv_heads, r.heads / kv_heads}).sum(-1);  // [rows, Hkv]
  at::Tensor dz = at::zeros({r.batch, kv_heads}, per_row.options());
  const at::Tensor inside = batch.ge(0);
  dz.index_add_(0, batch.masked_select(inside), per_row.index_select(0, inside.nonzero().squeeze(1)));
  return dz.to(mix_acc_type(grad_out));
}

}  // namespace

TORCH_LIBRARY_IMPL(elastic, CPU, m) {
  m.impl("train_mix_combine", &train_mix_combine_cpu);
  m.impl("train_mix_dz", &train_mix_dz_cpu);
}

}  // namespace elastic
