// elastic::router_decision (schema in csrc/ops.cpp): an eval router's whole decision in one operator, for the
// prefill of a small model, which is host-bound on a GPU (#15: the eager decision is a boundary pool plus ~13
// small kernels and their Python per layer).
//
// The MLP is AttentionRouter's (elastic_cuda/router.py): mlp = the weight and bias of its five Linear layers in
// order (task_mlp[0], task_mlp[2], router_mlp[0], router_mlp[2], router_mlp[4]), SiLU after layers 0, 2 and 3.
// Shared argument checks and the composite formulation (the same ATen ops as the eager router, in its order).
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <tuple>

namespace elastic {

constexpr int kRouterLayers = 5;
// SiLU after these Linear layers (task_mlp: Linear, SiLU, Linear; router_mlp: Linear, SiLU, Linear, SiLU, Linear).
// (A function, not an array: device code reads it through --expt-relaxed-constexpr.)
constexpr bool router_silu_after(int layer) { return layer == 0 || layer == 2 || layer == 3; }

struct RouterDecisionShape {
  int64_t batch, heads, dim;
  bool varlen;
};

// ValueError-style checks naming the argument (ELASTIC_CHECK): shapes, dtypes, devices. Values are not read.
RouterDecisionShape check_router_decision_args(const at::Tensor& keys, const c10::optional<at::Tensor>& cu_seqlens,
                                               at::TensorList mlp, const c10::optional<at::Tensor>& input_mean,
                                               const c10::optional<at::Tensor>& input_std,
                                               const c10::optional<at::Tensor>& head_bias,
                                               const c10::optional<at::Tensor>& shift, int64_t n_first,
                                               int64_t n_last, int64_t sparse_mode);

// The decision from the pooled keys [B, Hkv, D] (elastic::boundary_pool's output) with the ATen ops the eager
// router runs (AttentionRouter.logits_of_pooled, full_heads_of, head_modes_of), in its order: bit for bit its
// logits and head modes on any device. Returns (head_mode int32 [B, Hkv], logits [B, Hkv, 2] in mlp's dtype).
std::tuple<at::Tensor, at::Tensor> router_decision_from_pooled(at::Tensor pooled, at::TensorList mlp,
                                                               const c10::optional<at::Tensor>& input_mean,
                                                               const c10::optional<at::Tensor>& input_std,
                                                               const c10::optional<at::Tensor>& head_bias,
                                                               const c10::optional<at::Tensor>& shift,
                                                               double shift_value, int64_t sparse_mode);

}  // namespace elastic
