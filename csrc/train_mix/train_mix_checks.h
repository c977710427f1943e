// Shared argument checks of the training mix's elementwise ops, elastic::train_mix_combine and elastic::train_mix_dz
// (schemas: csrc/ops.cpp; CPU kernels: train_mix_cpu.cpp, CUDA kernels: train_mix_cuda.cu). Both read rows of
// [B, S, H, D] (dense) or packed [T, H, D] (with cu_seqlens int32 [B+1]); a row's batch is b = row / S, or the b with
// cu_seqlens[b] <= row < cu_seqlens[b + 1] (rows in no sequence: out 0, no share of dz).
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include "attention/check_msg.h"

namespace elastic {

struct MixRows {
  int64_t batch;      // B
  int64_t rows;       // B * S (dense) or T (varlen)
  int64_t seq_len;    // S (dense); 0 for varlen
  int64_t heads;      // H of the tensors
  int64_t head_dim;   // D
  bool varlen;
};

// a, b: the two tensors read row by row (same shape, dtype and device; last dim contiguous).
inline MixRows check_mix_rows(const char* op, const at::Tensor& a, const char* a_name, const at::Tensor& b,
                              const char* b_name, const c10::optional<at::Tensor>& cu_seqlens) {
  MixRows r;
  r.varlen = cu_seqlens.has_value() && cu_seqlens->defined();
  ELASTIC_CHECK(a.dim() == (r.varlen ? 3 : 4), "elastic.", op, ": ", a_name, " must have shape ",
                r.varlen ? "[T, H, D] (with cu_seqlens)" : "[B, S, H, D]", ", got ", a.sizes());
  ELASTIC_CHECK(b.sizes() == a.sizes(), "elastic.", op, ": ", b_name, " must have the shape of ", a_name, " ",
                a.sizes(), ", got ", b.sizes());
  ELASTIC_CHECK(b.scalar_type() == a.scalar_type(), "elastic.", op, ": ", b_name, " must have the dtype of ", a_name,
                " (", a.scalar_type(), "), got ", b.scalar_type());
  ELASTIC_CHECK(b.device() == a.device(), "elastic.", op, ": ", b_name, " must be on the device of ", a_name, " (",
                a.device(), "), got ", b.device());
  ELASTIC_CHECK(at::isFloatingType(a.scalar_type()), "elastic.", op, ": ", a_name, " must be floating point, got ",
                a.scalar_type());
  if (r.varlen) {
    ELASTIC_CHECK(cu_seqlens->dim() == 1 && cu_seqlens->numel() >= 2 && cu_seqlens->scalar_type() == at::kInt,
                  "elastic.", op, ": cu_seqlens must be an int32 tensor of shape [B+1], B >= 1");
    ELASTIC_CHECK(cu_seqlens->device() == a.device(), "elastic.", op, ": cu_seqlens must be on the device of ", a_name,
                  " (", a.device(), "), got ", cu_seqlens->device());
    r.batch = cu_seqlens->numel() - 1;
    r.rows = a.size(0);
    r.seq_len = 0;
  } else {
    r.batch = a.size(0);
    r.seq_len = a.size(1);
    r.rows = r.batch * r.seq_len;
  }
  r.heads = a.size(-2);
  r.head_dim = a.size(-1);
  return r;
}

// z [B, Hz] floating, Hz divides H: head h of a row of batch b is weighed by z[b, h / (H / Hz)].
inline void check_mix_z(const char* op, const at::Tensor& z, const MixRows& r, const at::Device& device) {
  ELASTIC_CHECK(z.dim() == 2 && z.size(0) == r.batch, "elastic.", op, ": z must have shape [B, Hz] with B = ",
                r.batch, ", got ", z.sizes());
  ELASTIC_CHECK(z.size(1) > 0 && r.heads % z.size(1) == 0, "elastic.", op, ": z's heads (", z.size(1),
                ") must divide the tensors' heads (", r.heads, ")");
  ELASTIC_CHECK(at::isFloatingType(z.scalar_type()), "elastic.", op, ": z must be floating point, got ",
                z.scalar_type());
  ELASTIC_CHECK(z.device() == device, "elastic.", op, ": z must be on the device of the tensors (", device, "), got ",
                z.device());
}

// The accumulation type: fp64 for fp64 tensors, fp32 otherwise.
inline at::ScalarType mix_acc_type(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace elastic
