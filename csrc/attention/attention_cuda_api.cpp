// CUDA implementations of elastic::attention and elastic::attention_backward (schemas: csrc/ops.cpp).
// Checks arguments (messages name the argument), allocates outputs, sets the device guard and picks the
// strategy; the kernels run on the current stream and never synchronise with the host.
// Compiled only into CUDA builds (setup.py and CMake define WITH_CUDA there); CPU-only builds glob every
// .cpp, so the whole file is guarded.
#ifdef WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <string>

#include "attention/attention_checks.h"
#include "attention/attention_cuda.h"
#include "attention/strategy.h"
#include "attention/attention_launch.h"

namespace elastic {
namespace {

bool aligned16(const at::Tensor& t) {
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0) return false;
  for (int64_t d = 0; d + 1 < t.dim(); ++d)
    if (t.size(d) > 1 && t.stride(d) % 8 != 0) return false;
  return true;
}

// The kernels copy rows in 16-byte pieces: rows must start 16-byte aligned. Any other layout (last dim
// contiguous is already checked) is copied once into a contiguous tensor.
at::Tensor rows_aligned(const at::Tensor& t) { return aligned16(t) ? t : t.contiguous(); }

void check_cuda_tensor(const at::Tensor& t, const char* name, const at::Device& device) {
  ELASTIC_CHECK(t.is_cuda(), "elastic.attention: ", name, " must be a CUDA tensor, got device ", t.device());
  ELASTIC_CHECK(t.device() == device, "elastic.attention: ", name, " must be on the device of q (", device, "), got ",
                t.device());
}

AttentionArgs make_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& head_mode,
                        const c10::optional<at::Tensor>& block_mask, const c10::optional<at::Tensor>& cu_seqlens_q,
                        const c10::optional<at::Tensor>& cu_seqlens_k, int64_t sink, int64_t window,
                        int64_t block_size, c10::optional<double> scale, int64_t max_seqlen_q,
                        int64_t max_seqlen_k) {
  AttentionArgs a;
  a.shape = check_attention_args(q, k, v, head_mode, sink, window, block_mask, block_size, scale, cu_seqlens_q,
                                 cu_seqlens_k, max_seqlen_q, max_seqlen_k);
  const at::Device device = q.device();
  check_cuda_tensor(q, "q", device);
  check_cuda_tensor(k, "k", device);
  check_cuda_tensor(v, "v", device);
  check_cuda_tensor(head_mode, "head_mode", device);
  if (block_mask.has_value()) check_cuda_tensor(*block_mask, "block_mask", device);
  if (cu_seqlens_q.has_value()) check_cuda_tensor(*cu_seqlens_q, "cu_seqlens_q", device);
  if (cu_seqlens_k.has_value()) check_cuda_tensor(*cu_seqlens_k, "cu_seqlens_k", device);
  ELASTIC_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
                "elastic.attention: q/k/v dtype on CUDA must be float16 or bfloat16, got ", q.scalar_type());
  ELASTIC_CHECK(a.shape.head_dim == 64 || a.shape.head_dim == 128,
                "elastic.attention: head_dim (q.shape[-1]) on CUDA must be 64 or 128, got ", a.shape.head_dim);
  // BLOCK heads skip whole key tiles, so a key tile must never straddle two mask blocks.
  ELASTIC_CHECK(!block_mask.has_value() || block_size % kMaxBlockN == 0,
                "elastic.attention: block_size must be a multiple of ", kMaxBlockN,
                " on CUDA when block_mask is given, got ", block_size);
  ELASTIC_CHECK(a.shape.seqlen_q < INT_MAX && a.shape.seqlen_k < INT_MAX,
                "elastic.attention: sequence lengths must be below 2^31 on CUDA");
  a.q = rows_aligned(q);
  a.k = rows_aligned(k);
  a.v = rows_aligned(v);
  a.head_mode = head_mode;
  a.block_mask = block_mask;
  if (cu_seqlens_q.has_value()) a.cu_seqlens_q = cu_seqlens_q->contiguous();
  if (cu_seqlens_k.has_value()) a.cu_seqlens_k = cu_seqlens_k->contiguous();
  a.sink = sink;
  a.window = window;
  a.block_size = block_size;
  a.options = kernel_options();
  return a;
}

std::vector<int64_t> lse_shape(const AttentionArgs& a) {
  if (a.shape.varlen) return {a.shape.heads_q, a.q.size(0)};
  return {a.shape.batch, a.shape.heads_q, a.shape.seqlen_q};
}

std::tuple<at::Tensor, at::Tensor> attention_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                  const at::Tensor& head_mode,
                                                  const c10::optional<at::Tensor>& block_mask,
                                                  const c10::optional<at::Tensor>& cu_seqlens_q,
                                                  const c10::optional<at::Tensor>& cu_seqlens_k, int64_t sink,
                                                  int64_t window, int64_t block_size, c10::optional<double> scale,
                                                  int64_t max_seqlen_q, int64_t max_seqlen_k,
                                                  c10::string_view strategy) {
  const std::string strat(strategy.data(), strategy.size());
  check_strategy(strategy);
  c10::cuda::CUDAGuard guard(q.device());
  AttentionArgs a = make_args(q, k, v, head_mode, block_mask, cu_seqlens_q, cu_seqlens_k, sink, window, block_size,
                              scale, max_seqlen_q, max_seqlen_k);
  // Varlen: rows outside every sequence (padding past cu_seqlens[-1]) read as empty rows (0, -inf).
  at::Tensor out = a.shape.varlen ? at::zeros(a.q.sizes(), a.q.options()) : at::empty(a.q.sizes(), a.q.options());
  at::Tensor lse = a.shape.varlen ? at::full(lse_shape(a), -INFINITY, a.q.options().dtype(at::kFloat))
                                  : at::empty(lse_shape(a), a.q.options().dtype(at::kFloat));
  const bool grouped = strat == "grouped" || strat == "grouped_cudnn" ||
                       (strat == "auto" && prefer_grouped_strategy(a.shape, fused_forward_uses_sm90(a)));
  if (grouped) {
    ELASTIC_CHECK(!a.shape.varlen, "elastic.attention: strategy='", strat, "' needs the dense layout; use 'fused' ",
                  "(or 'auto') with cu_seqlens");
    attention_fwd_grouped_cuda(a, out, lse, /*dense_on_host_count=*/strat == "grouped_cudnn");
  } else {
    attention_fwd_fused_cuda(a, out, lse, /*skip_full_heads=*/false);
  }
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_cuda(
    const at::Tensor& grad_out, const c10::optional<at::Tensor>& grad_lse, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, const at::Tensor& head_mode,
    const c10::optional<at::Tensor>& block_mask, const c10::optional<at::Tensor>& cu_seqlens_q,
    const c10::optional<at::Tensor>& cu_seqlens_k, int64_t sink, int64_t window, int64_t block_size,
    c10::optional<double> scale, int64_t max_seqlen_q, int64_t max_seqlen_k) {
  c10::cuda::CUDAGuard guard(q.device());
  AttentionArgs a = make_args(q, k, v, head_mode, block_mask, cu_seqlens_q, cu_seqlens_k, sink, window, block_size,
                              scale, max_seqlen_q, max_seqlen_k);
  const at::Device device = q.device();
  check_cuda_tensor(grad_out, "grad_out", device);
  check_cuda_tensor(out, "out", device);
  check_cuda_tensor(lse, "lse", device);
  ELASTIC_CHECK(grad_out.sizes() == q.sizes() && grad_out.scalar_type() == q.scalar_type(),
                "elastic.attention_backward: grad_out must have the shape and dtype of q ", dims_str(q), " ",
                q.scalar_type(), ", got ", dims_text(grad_out.sizes()), " ", grad_out.scalar_type());
  ELASTIC_CHECK(out.sizes() == q.sizes() && out.scalar_type() == q.scalar_type(),
                "elastic.attention_backward: out must have the shape and dtype of q ", dims_str(q), ", got ",
                dims_text(out.sizes()), " ", out.scalar_type());
  ELASTIC_CHECK(grad_out.stride(-1) == 1 && out.stride(-1) == 1,
                "elastic.attention_backward: grad_out and out must be contiguous in the last dimension");
  const std::vector<int64_t> lshape = lse_shape(a);
  ELASTIC_CHECK(lse.scalar_type() == at::kFloat && lse.sizes() == at::IntArrayRef(lshape),
                "elastic.attention_backward: lse must be float32 of shape ", c10::IntArrayRef(lshape), ", got ",
                lse.scalar_type(), " ", dims_text(lse.sizes()));
  at::Tensor g_lse;
  if (grad_lse.has_value() && grad_lse->defined()) {
    check_cuda_tensor(*grad_lse, "grad_lse", device);
    ELASTIC_CHECK(grad_lse->sizes() == lse.sizes(), "elastic.attention_backward: grad_lse must have the shape of lse ",
                  dims_text(lse.sizes()), ", got ", dims_text(grad_lse->sizes()));
    g_lse = grad_lse->to(at::kFloat).contiguous();
  }
  const at::Tensor lse_c = lse.contiguous();
  const at::Tensor out_a = rows_aligned(out);
  const at::Tensor grad_out_a = rows_aligned(grad_out);

  // Contiguous gradients; varlen rows outside every sequence get zero gradients.
  auto alloc = [&](const at::Tensor& like) {
    return a.shape.varlen ? at::zeros(like.sizes(), like.options()) : at::empty(like.sizes(), like.options());
  };
  at::Tensor dq = at::empty(a.q.sizes(), a.q.options());
  at::Tensor dk = alloc(a.k);
  at::Tensor dv = alloc(a.v);
  attention_bwd_cuda(a, out_a, lse_c, grad_out_a, g_lse, dq, dk, dv);
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(elastic, CUDA, m) {
  m.impl("attention", &attention_cuda);
  m.impl("attention_backward", &attention_backward_cuda);
}

}  // namespace elastic

#endif  // WITH_CUDA
