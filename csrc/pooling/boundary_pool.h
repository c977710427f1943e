// Shared argument checks of elastic::boundary_pool (router input pooling).
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include "attention/check_msg.h"

namespace elastic {

struct PoolShape {
  int64_t batch, heads, dim;
  bool varlen;
};

inline PoolShape check_boundary_pool_args(const at::Tensor& keys, int64_t n_first, int64_t n_last,
                                          const c10::optional<at::Tensor>& cu_seqlens) {
  PoolShape s;
  s.varlen = cu_seqlens.has_value();
  ELASTIC_CHECK(keys.dim() == (s.varlen ? 3 : 4), "elastic.boundary_pool: keys must have shape ",
                s.varlen ? "[T, Hkv, D] (with cu_seqlens)" : "[B, S, Hkv, D]", ", got ", keys.sizes());
  ELASTIC_CHECK(n_first >= 0 && n_last >= 0 && n_first + n_last > 0,
                "elastic.boundary_pool: n_first and n_last must be >= 0 and not both 0, got ", n_first, ", ", n_last);
  ELASTIC_CHECK(at::isFloatingType(keys.scalar_type()), "elastic.boundary_pool: keys must be floating point, got ",
                keys.scalar_type());
  if (s.varlen) {
    ELASTIC_CHECK(cu_seqlens->dim() == 1 && cu_seqlens->numel() >= 2 && cu_seqlens->scalar_type() == at::kInt,
                  "elastic.boundary_pool: cu_seqlens must be int32 [B+1]");
    ELASTIC_CHECK(cu_seqlens->device() == keys.device(), "elastic.boundary_pool: cu_seqlens must be on the device of keys");
    s.batch = cu_seqlens->numel() - 1;
  } else {
    s.batch = keys.size(0);
  }
  s.heads = keys.size(-2);
  s.dim = keys.size(-1);
  return s;
}

// The kernels (boundary_pool_cpu.cpp / boundary_pool_cuda.cu), also called by the fused router decision
// (csrc/router/), which pools its keys exactly as elastic::boundary_pool does.
at::Tensor boundary_pool_cpu(const at::Tensor& keys, const c10::optional<at::Tensor>& cu_seqlens, int64_t n_first,
                             int64_t n_last);
at::Tensor boundary_pool_cuda(const at::Tensor& keys, const c10::optional<at::Tensor>& cu_seqlens, int64_t n_first,
                              int64_t n_last);

}  // namespace elastic
