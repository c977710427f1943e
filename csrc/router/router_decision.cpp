// Argument checks and the composite formulation of elastic::router_decision (router_decision.h), and its CPU kernel:
// the boundary pool's CPU kernel, then the eager router's ATen ops, so that the CPU decision is the eager one bit for
// bit (tests/test_router_decision.py). Plain host code, built into CPU-only and CUDA builds.
#include "router/router_decision.h"

#include <torch/library.h>

#include "attention/check_msg.h"
#include "pooling/boundary_pool.h"

namespace elastic {

RouterDecisionShape check_router_decision_args(const at::Tensor& keys, const c10::optional<at::Tensor>& cu_seqlens,
                                               at::TensorList mlp, const c10::optional<at::Tensor>& input_mean,
                                               const c10::optional<at::Tensor>& input_std,
                                               const c10::optional<at::Tensor>& head_bias,
                                               const c10::optional<at::Tensor>& shift, int64_t n_first,
                                               int64_t n_last, int64_t sparse_mode) {
  const PoolShape pool = check_boundary_pool_args(keys, n_first, n_last, cu_seqlens);
  RouterDecisionShape s{pool.batch, pool.heads, pool.dim, pool.varlen};
  ELASTIC_CHECK(sparse_mode == 1 || sparse_mode == 2,
                "elastic.router_decision: sparse_mode must be 1 (STREAM) or 2 (BLOCK), got ", sparse_mode);
  ELASTIC_CHECK(static_cast<int64_t>(mlp.size()) == 2 * kRouterLayers, "elastic.router_decision: mlp must hold the ",
                "weight and bias of the router's ", kRouterLayers, " Linear layers (", 2 * kRouterLayers,
                " tensors), got ", static_cast<int64_t>(mlp.size()));
  const auto dtype = mlp[0].scalar_type();
  ELASTIC_CHECK(at::isFloatingType(dtype), "elastic.router_decision: mlp weights must be floating point, got ", dtype);
  int64_t width = s.dim;
  for (int i = 0; i < kRouterLayers; ++i) {
    const at::Tensor& w = mlp[2 * i];
    const at::Tensor& b = mlp[2 * i + 1];
    ELASTIC_CHECK(w.dim() == 2 && w.size(1) == width, "elastic.router_decision: mlp[", 2 * i, "] (layer ", i,
                  " weight) must have shape [out, ", width, "], got ", w.sizes());
    ELASTIC_CHECK(b.dim() == 1 && b.size(0) == w.size(0), "elastic.router_decision: mlp[", 2 * i + 1, "] (layer ", i,
                  " bias) must have shape [", w.size(0), "], got ", b.sizes());
    for (const at::Tensor* t : {&w, &b}) {
      ELASTIC_CHECK(t->scalar_type() == dtype, "elastic.router_decision: mlp tensors must share one dtype, got ",
                    dtype, " and ", t->scalar_type());
      ELASTIC_CHECK(t->device() == keys.device(), "elastic.router_decision: mlp tensors must be on the device of ",
                    "keys (", keys.device(), "), got ", t->device());
    }
    width = w.size(0);
  }
  ELASTIC_CHECK(width == 2, "elastic.router_decision: the last layer must give 2 logits, gives ", width);
  ELASTIC_CHECK(input_mean.has_value() == input_std.has_value(),
                "elastic.router_decision: input_mean and input_std must be given together");
  const std::pair<const char*, const c10::optional<at::Tensor>*> per_head[] = {
      {"input_mean", &input_mean}, {"input_std", &input_std}, {"head_bias", &head_bias}};
  for (const auto& [name, t] : per_head) {
    if (!t->has_value()) continue;
    const int64_t last = t == &head_bias ? 2 : s.dim;
    ELASTIC_CHECK((*t)->dim() == 2 && (*t)->size(0) == s.heads && (*t)->size(1) == last, "elastic.router_decision: ",
                  name, " must have shape [", s.heads, ", ", last, "], got ", (*t)->sizes());
    ELASTIC_CHECK((*t)->scalar_type() == dtype, "elastic.router_decision: ", name, " must have the mlp's dtype ",
                  dtype, ", got ", (*t)->scalar_type());
    ELASTIC_CHECK((*t)->device() == keys.device(), "elastic.router_decision: ", name, " must be on the device of keys");
  }
  if (shift.has_value()) {
    ELASTIC_CHECK(shift->dim() == 1 && shift->size(0) == s.batch && shift->scalar_type() == at::kFloat,
                  "elastic.router_decision: shift must be a float32 tensor [B] = [", s.batch, "], got ",
                  shift->scalar_type(), " ", shift->sizes());
    ELASTIC_CHECK(shift->device() == keys.device(), "elastic.router_decision: shift must be on the device of keys");
  }
  return s;
}

std::tuple<at::Tensor, at::Tensor> router_decision_from_pooled(at::Tensor pooled, at::TensorList mlp,
                                                               const c10::optional<at::Tensor>& input_mean,
                                                               const c10::optional<at::Tensor>& input_std,
                                                               const c10::optional<at::Tensor>& head_bias,
                                                               const c10::optional<at::Tensor>& shift,
                                                               double shift_value, int64_t sparse_mode) {
  // AttentionRouter.pooled / logits_of_pooled: the same ops on the same values in the same order.
  if (pooled.scalar_type() != mlp[0].scalar_type()) pooled = pooled.to(mlp[0].scalar_type());
  if (input_mean.has_value()) pooled = at::div(at::sub(pooled, *input_mean), *input_std);
  const int64_t B = pooled.size(0), H = pooled.size(1);
  at::Tensor x = pooled.reshape({B * H, pooled.size(2)});
  for (int i = 0; i < kRouterLayers; ++i) {
    x = at::linear(x, mlp[2 * i], mlp[2 * i + 1]);  // what F.linear dispatches
    if (router_silu_after(i)) x = at::silu(x);
  }
  at::Tensor logits = x.view({B, H, x.size(1)});
  if (head_bias.has_value()) logits = at::add(logits, *head_bias);
  // full_heads_of: logit_full > logit_sparse at a float shift of 0 (+-0.0), else logit_full - logit_sparse > shift;
  // a per-request shift [B] as the column [B, 1].
  const at::Tensor full_logit = logits.select(-1, 1), sparse_logit = logits.select(-1, 0);
  at::Tensor full;
  if (shift.has_value()) {
    full = at::gt(at::sub(full_logit, sparse_logit), shift->unsqueeze(1));
  } else if (shift_value == 0.0) {
    full = at::gt(full_logit, sparse_logit);
  } else {
    full = at::gt(at::sub(full_logit, sparse_logit), shift_value);
  }
  const auto mode_opts = logits.options().dtype(at::kInt);
  at::Tensor head_mode = at::where(full, at::scalar_tensor(0, mode_opts), at::scalar_tensor(sparse_mode, mode_opts));
  return {head_mode, logits};
}

namespace {

std::tuple<at::Tensor, at::Tensor> router_decision_cpu(const at::Tensor& keys,
                                                       const c10::optional<at::Tensor>& cu_seqlens, at::TensorList mlp,
                                                       const c10::optional<at::Tensor>& input_mean,
                                                       const c10::optional<at::Tensor>& input_std,
                                                       const c10::optional<at::Tensor>& head_bias,
                                                       const c10::optional<at::Tensor>& shift, int64_t n_first,
                                                       int64_t n_last, double shift_value, int64_t sparse_mode) {
  check_router_decision_args(keys, cu_seqlens, mlp, input_mean, input_std, head_bias, shift, n_first, n_last,
                             sparse_mode);
  return router_decision_from_pooled(boundary_pool_cpu(keys, cu_seqlens, n_first, n_last), mlp, input_mean, input_std,
                                     head_bias, shift, shift_value, sparse_mode);
}

}  // namespace

TORCH_LIBRARY_IMPL(elastic, CPU, m) { m.impl("router_decision", &router_decision_cpu); }

}  // namespace elastic
