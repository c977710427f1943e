// CUDA implementation of elastic::decode_attention (schema: csrc/ops.cpp; reference: elastic_cuda/_decode_cpu.py).
// Checks the arguments (messages name the argument), allocates the outputs and the work-item workspace (sized from
// static shapes only, so a CUDA graph can capture the call; the kernel cuts the real lengths into items on the
// device) and launches on the current stream.
// Compiled only into CUDA builds (WITH_CUDA); CPU-only builds glob every .cpp, so the whole file is guarded.
#ifdef WITH_CUDA
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <mutex>

#include "attention/check_msg.h"
#include "attention/kernel_options.h"
#include "decode/decode_params.h"

namespace elastic {
namespace {

constexpr const char* kOp = "elastic.decode_attention: ";

void check_device(const at::Tensor& t, const char* name, const at::Device& device) {
  ELASTIC_CHECK(t.is_cuda() && t.device() == device, kOp, name, " must be a CUDA tensor on the device of q (",
                device.str(), "), got ", t.device().str());
}

void check_pool(const at::Tensor& t, const char* name, const at::Tensor& q, int64_t D) {
  check_device(t, name, q.device());
  ELASTIC_CHECK(t.dim() == 3 && t.size(2) == D, kOp, name, " must have shape [pairs, tokens, D=", D, "]");
  ELASTIC_CHECK(t.scalar_type() == q.scalar_type(), kOp, name, " must have the dtype of q");
  if (t.numel() == 0) return;
  // 16-byte loads of whole rows: D contiguous elements per row, rows and pairs 16-byte aligned.
  ELASTIC_CHECK(t.stride(2) == 1 && t.stride(1) == D, kOp, name, " must have contiguous [tokens, D] rows");
  ELASTIC_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 && (t.stride(0) * t.element_size()) % 16 == 0,
                kOp, name, " must start 16-byte aligned with a 16-byte multiple between pairs");
  ELASTIC_CHECK(t.size(1) <= INT32_MAX && t.size(0) <= INT32_MAX, kOp, name, " is too large (int32 indexing)");
}

void check_table(const at::Tensor& t, const char* name, const at::Device& device, at::IntArrayRef shape) {
  check_device(t, name, device);
  ELASTIC_CHECK(t.scalar_type() == at::kInt && t.sizes() == shape && t.is_contiguous(), kOp, name,
                " must be a contiguous int32 tensor of shape ", shape.size() == 1 ? "[B]" : "[B, Hkv]");
}

// SM count of a device, queried once per device (an attribute read, no synchronisation).
int sm_count(int device) {
  static std::atomic<int> cached[64] = {};
  if (device < 0 || device >= 64) device = 0;
  int n = cached[device].load(std::memory_order_relaxed);
  if (n == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
    cached[device].store(n, std::memory_order_relaxed);
  }
  return n;
}

// ELASTIC_DECODE_FUSED_COMBINE=v2_keep (diagnostic: what the per-call ticket memset costs): one ticket buffer per
// device, zeroed when it is allocated, outside any capture (a capture would record the zeroing instead of running
// it); every call's last CTA of each split pair puts its ticket back to 0 (decode_fused_merge.cuh), so calls ordered
// on one stream (or one graph's replays) find zeros. Calls running concurrently on several streams would share the
// tickets: not safe there, which is why the default keeps the memset.
int32_t* kept_tickets(int device, int64_t pairs, const at::TensorOptions& options) {
  static std::mutex mutex;
  static at::Tensor buffers[64];
  std::lock_guard<std::mutex> lock(mutex);
  at::Tensor& t = buffers[device >= 0 && device < 64 ? device : 0];
  if (!t.defined() || t.numel() < pairs) {
    cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
    C10_CUDA_CHECK(cudaStreamIsCapturing(c10::cuda::getCurrentCUDAStream().stream(), &status));
    ELASTIC_CHECK(status == cudaStreamCaptureStatusNone, kOp,
                  "ELASTIC_DECODE_FUSED_COMBINE=v2_keep allocates its ticket buffer outside graph capture: call ",
                  "decode_attention once (with at least as many sample x KV head pairs) before capturing");
    t = at::zeros({std::max<int64_t>(pairs, 4096)}, options.dtype(at::kInt));
  }
  return t.data_ptr<int32_t>();
}

std::tuple<at::Tensor, at::Tensor> decode_attention_cuda(const at::Tensor& q, const at::Tensor& full_k,
                                                         const at::Tensor& full_v, const at::Tensor& stream_k,
                                                         const at::Tensor& stream_v, const at::Tensor& head_mode,
                                                         const at::Tensor& slot, const at::Tensor& seq_lens,
                                                         int64_t sink, int64_t window, c10::optional<double> scale,
                                                         int64_t num_splits) {
  ELASTIC_CHECK(q.is_cuda(), kOp, "q must be a CUDA tensor");
  ELASTIC_CHECK(q.dim() == 4, kOp, "q must have shape [B, Sq, Hq, D]");
  const int64_t B = q.size(0), Sq = q.size(1), Hq = q.size(2), D = q.size(3);
  ELASTIC_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16, kOp,
                "q must be float16 or bfloat16 on CUDA");
  ELASTIC_CHECK(D == 64 || D == 128, kOp, "head_dim (q.shape[-1]) must be 64 or 128 on CUDA, got ", D);
  ELASTIC_CHECK(Sq >= 1 && Sq <= 16, kOp, "q must hold 1..16 queries per sample (q.shape[1]), got ", Sq);
  ELASTIC_CHECK(q.stride(3) == 1, kOp, "q must be contiguous in its last dimension");
  ELASTIC_CHECK(B >= 1, kOp, "q must hold at least one sample");
  const at::Device device = q.device();
  check_pool(full_k, "full_k", q, D);
  check_pool(full_v, "full_v", q, D);
  check_pool(stream_k, "stream_k", q, D);
  check_pool(stream_v, "stream_v", q, D);
  ELASTIC_CHECK(full_v.sizes() == full_k.sizes(), kOp, "full_v must have the shape of full_k");
  ELASTIC_CHECK(stream_v.sizes() == stream_k.sizes(), kOp, "stream_v must have the shape of stream_k");
  ELASTIC_CHECK(head_mode.dim() == 2 && head_mode.size(0) == B, kOp, "head_mode must have shape [B, Hkv]");
  const int64_t Hkv = head_mode.size(1);
  ELASTIC_CHECK(Hkv >= 1 && Hq % Hkv == 0, kOp, "q heads (", Hq, ") must be a multiple of the KV heads (", Hkv, ")");
  check_table(head_mode, "head_mode", device, {B, Hkv});
  check_table(slot, "slot", device, {B, Hkv});
  check_table(seq_lens, "seq_lens", device, {B});
  ELASTIC_CHECK(sink >= 0 && window >= 1 && sink < INT32_MAX && window < INT32_MAX, kOp,
                "sink must be >= 0 and window >= 1");
  ELASTIC_CHECK(stream_k.size(0) == 0 || stream_k.size(1) >= sink + window + Sq - 1, kOp,
                "stream_k must hold sink + window + Sq - 1 tokens per pair (sink plus the ring)");
  const double softmax_scale = scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(D));
  ELASTIC_CHECK(std::isfinite(softmax_scale) && softmax_scale > 0, kOp, "scale must be positive and finite");
  ELASTIC_CHECK(num_splits >= 0, kOp, "num_splits must be >= 0 (0 = automatic)");

  c10::cuda::CUDAGuard guard(device);
  auto out = at::empty({B, Sq, Hq, D}, q.options());
  auto lse = at::empty({B, Hq, Sq}, q.options().dtype(at::kFloat));
  const int64_t group = Hq / Hkv, rows = group * Sq;
  const int rows_per_chunk = rows <= 4 ? 4 : 8;
  const int64_t row_chunks = (rows + rows_per_chunk - 1) / rows_per_chunk;
  ELASTIC_CHECK(B * Hkv <= 65535 && rows <= 65535, kOp, "B * Hkv (", B * Hkv, ") and Hq / Hkv * Sq (", rows,
                ") must be <= 65535");
  // Work items: the automatic target is one wave of the split kernel (SMs x CTAs per SM, shared by the row
  // chunks); num_splits > 0 sets the target instead (tests force 1 item per pair, or many). The kernel picks one
  // chunk length >= total keys / target, so a launch has at most target + B * Hkv items.
  const bool bf16 = q.scalar_type() == at::kBFloat16;
  // One query per step (every listed key visible to every row of a CTA): the tensor-core kernel, unless
  // ELASTIC_DECODE_MMA=0 (kernel_options.h) asks for the FMA one.
  const bool mma = Sq == 1 && rows <= 8 && kernel_options().decode_mma;
  int64_t target = num_splits;
  if (target == 0) {
    const int64_t slots = static_cast<int64_t>(sm_count(device.index())) *
                          decode_ctas_per_sm(bf16, static_cast<int>(D), rows_per_chunk, mma);
    target = std::max<int64_t>(1, slots / row_chunks);
  }
  target = std::min<int64_t>(target, 1 << 20);
  const int64_t items_max = target + B * Hkv;
  DecodeParams p{};
  p.q = q.data_ptr();
  p.q_stride_b = q.stride(0);
  p.q_stride_s = q.stride(1);
  p.q_stride_h = q.stride(2);
  p.full_k = full_k.data_ptr();
  p.full_v = full_v.data_ptr();
  p.full_k_stride_pair = full_k.stride(0);
  p.full_v_stride_pair = full_v.stride(0);
  p.full_pairs = static_cast<int32_t>(full_k.size(0));
  p.full_tokens = static_cast<int32_t>(full_k.size(1));
  p.stream_k = stream_k.data_ptr();
  p.stream_v = stream_v.data_ptr();
  p.stream_k_stride_pair = stream_k.stride(0);
  p.stream_v_stride_pair = stream_v.stride(0);
  p.stream_pairs = static_cast<int32_t>(stream_k.size(0));
  p.stream_tokens = static_cast<int32_t>(stream_k.size(1));
  p.head_mode = head_mode.data_ptr<int32_t>();
  p.slot = slot.data_ptr<int32_t>();
  p.seq_lens = seq_lens.data_ptr<int32_t>();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  // Partials of every possible item (no zero fill: the combine reads only the items the split kernel wrote).
  const int64_t parts = row_chunks * items_max * rows_per_chunk;
  auto part_out = at::empty({parts, D}, q.options().dtype(at::kFloat));
  auto part_lse = at::empty({parts}, q.options().dtype(at::kFloat));
  auto plan = at::empty({B * Hkv, 2}, q.options().dtype(at::kInt));
  p.part_out = part_out.data_ptr<float>();
  p.part_lse = part_lse.data_ptr<float>();
  p.plan = plan.data_ptr<int32_t>();
  p.items_max = static_cast<int32_t>(items_max);
  p.target_items = static_cast<int32_t>(target);
  p.one_wave = kernel_options().decode_one_wave ? 1 : 0;
  p.batch = static_cast<int32_t>(B);
  p.sq = static_cast<int32_t>(Sq);
  p.hq = static_cast<int32_t>(Hq);
  p.hkv = static_cast<int32_t>(Hkv);
  p.group = static_cast<int32_t>(group);
  p.rows = static_cast<int32_t>(rows);
  p.row_chunks = static_cast<int32_t>(row_chunks);
  p.sink = static_cast<int32_t>(sink);
  p.window = static_cast<int32_t>(window);
  p.scale_log2 = static_cast<float>(softmax_scale * 1.4426950408889634);
  // Tensor-core kernel's A/B switches (kernel_options.h): K/V copy form, and the combine fused into the last CTA of
  // each split pair. The tickets are zeroed by a memset on the stream (a graph captures it as a memset node), except
  // under ELASTIC_DECODE_FUSED_COMBINE=v2_keep (kept_tickets: zeroed once, left at 0 by every call's last CTAs).
  p.copy_mode = mma ? kernel_options().decode_copy : 0;
  const int fused = mma ? kernel_options().decode_fused_combine : 0;  // 0 off, 1 serial, 2 all-thread, 3 + kept
  p.fused_combine = fused == 3 ? 2 : fused;
  at::Tensor ticket;
  if (fused == 3) {
    p.ticket = kept_tickets(device.index(), B * Hkv, q.options());
  } else if (fused != 0) {
    ticket = at::empty({B * Hkv}, q.options().dtype(at::kInt));
    C10_CUDA_CHECK(cudaMemsetAsync(ticket.data_ptr(), 0, ticket.numel() * sizeof(int32_t),
                                   c10::cuda::getCurrentCUDAStream().stream()));
    p.ticket = ticket.data_ptr<int32_t>();
  }
  // Combine kernel and launch form (ELASTIC_DECODE_COMBINE / ELASTIC_DECODE_PDL; decode_launch.cu).
  p.combine_v2 = kernel_options().decode_combine == 2 ? 1 : 0;
  p.pdl = kernel_options().decode_pdl;
  p.late_q = mma && kernel_options().decode_late_q ? 1 : 0;
  launch_decode_attention(p, bf16, static_cast<int>(D), rows_per_chunk, mma,
                          c10::cuda::getCurrentCUDAStream().stream());
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(elastic, CUDA, m) { m.impl("decode_attention", &decode_attention_cuda); }

}  // namespace elastic
#endif  // WITH_CUDA
