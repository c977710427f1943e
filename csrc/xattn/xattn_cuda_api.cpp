// CUDA implementation of elastic::xattn_block_mask (schema: csrc/ops.cpp): XAttention block masks of a prefill,
// the rule of elastic_cuda/attention/xattn.py (block_mass + select_blocks) computed on the GPU without a host
// sync. Checks arguments (messages name the argument), allocates the mask and a bounded fp32 workspace, and
// runs the query blocks in chunks (each chunk: scores kernel, then selection kernel; xattn_launch.cu).
//
// Documented behaviour:
//   * Only (b, KV head) pairs with head_mode == 2 (BLOCK), read on the device, are estimated; every mask row of
//     the query heads of a FULL or STREAM KV head (or of any other mode value) is all False: they need no mask,
//     and no score work is spent on them.
//   * Rows past a sequence's last block, and columns past the row's own block (the future), are False.
//   * Packed layout: a sequence longer than max_seqlen is estimated over its first max_seqlen tokens only, and a
//     sequence with invalid cu_seqlens bounds (negative, decreasing, past the tensor) gets all-False rows: the
//     device cannot raise. The torch path (xattn.py) raises for both.
// Compiled only into CUDA builds (setup.py and CMake define WITH_CUDA); CPU-only builds glob every .cpp.
#ifdef WITH_CUDA
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <climits>
#include <cmath>
#include <cstdlib>
#include <string>

#include "attention/check_msg.h"
#include "attention/kernel_options.h"
#include "xattn/xattn_launch.h"

namespace elastic {
namespace {

// Largest fp32 workspace of one chunk of query blocks. A whole 128K-token sequence with 32 query heads needs
// ~540 MB (Hq * per * NB^2 / 2 floats); chunks keep the transient allocation at or below this. The environment
// variable ELASTIC_XATTN_WORKSPACE_BYTES overrides it (tests use a tiny cap to run many chunks on short inputs).
constexpr int64_t kWorkspaceCapBytes = int64_t(256) << 20;

int64_t workspace_cap_bytes() {
  const char* env = std::getenv("ELASTIC_XATTN_WORKSPACE_BYTES");
  if (env == nullptr || *env == '\0') return kWorkspaceCapBytes;
  char* end = nullptr;
  const long long v = std::strtoll(env, &end, 10);
  ELASTIC_CHECK(end != nullptr && *end == '\0' && v >= 0, "elastic.xattn_block_mask: ELASTIC_XATTN_WORKSPACE_BYTES ",
                "must be a byte count, got '", std::string(env), "'");
  return static_cast<int64_t>(v);
}
// Shared memory of the selection kernel (sort keys of one mask row): bounds NB to 16384 blocks.
constexpr int64_t kSelectSmemCapBytes = 200 * 1024;

bool rows_16b_aligned(const at::Tensor& t) {
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0) return false;
  for (int64_t d = 0; d + 1 < t.dim(); ++d)
    if (t.size(d) > 1 && t.stride(d) % 8 != 0) return false;
  return t.stride(-1) == 1;
}

at::Tensor copy_rows(const at::Tensor& t) { return rows_16b_aligned(t) ? t : t.contiguous(); }

int64_t tri(int64_t x) { return x * (x + 1) / 2; }

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

at::Tensor xattn_block_mask_cuda(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& head_mode,
                                 const c10::optional<at::Tensor>& cu_seqlens, int64_t block_size, int64_t stride,
                                 double threshold, c10::optional<double> scale, int64_t max_seqlen) {
  const char* op = "elastic.xattn_block_mask: ";
  const bool varlen = cu_seqlens.has_value();
  const int64_t rank = varlen ? 3 : 4;
  ELASTIC_CHECK(q_in.dim() == rank, op, "q must have shape ", varlen ? "[T, Hq, D] (with cu_seqlens)" : "[B, S, Hq, D]",
                ", got ", dims_text(q_in.sizes()));
  ELASTIC_CHECK(k_in.dim() == rank, op, "k must have shape ",
                varlen ? "[T, Hkv, D] (with cu_seqlens)" : "[B, S, Hkv, D]", ", got ", dims_text(k_in.sizes()));
  ELASTIC_CHECK(q_in.is_cuda() && k_in.device() == q_in.device(), op,
                "q and k must be CUDA tensors on one device, got ", q_in.device(), " and ", k_in.device());
  ELASTIC_CHECK(q_in.scalar_type() == k_in.scalar_type() &&
                    (q_in.scalar_type() == at::kHalf || q_in.scalar_type() == at::kBFloat16),
                op, "q and k must both be float16 or bfloat16, got ", q_in.scalar_type(), " and ", k_in.scalar_type());
  const int64_t D = q_in.size(-1);
  ELASTIC_CHECK(D == 64 || D == 128, op, "head_dim (q.shape[-1]) must be 64 or 128, got ", D);
  ELASTIC_CHECK(k_in.size(-1) == D, op, "k head_dim ", k_in.size(-1), " != q head_dim ", D);
  const int64_t Hq = q_in.size(-2), Hkv = k_in.size(-2);
  ELASTIC_CHECK(Hkv > 0 && Hq % Hkv == 0, op, "q heads (", Hq, ") must be a multiple of k heads (", Hkv, ")");
  ELASTIC_CHECK(q_in.size(0) == k_in.size(0) && (varlen || q_in.size(1) == k_in.size(1)), op,
                "q and k must cover the same tokens (queries = keys, a prefill), got ", dims_text(q_in.sizes()),
                " and ", dims_text(k_in.sizes()));
  ELASTIC_CHECK(stride > 0, op, "stride must be > 0, got ", stride);
  ELASTIC_CHECK(block_size > 0 && block_size % stride == 0, op, "block_size must be a positive multiple of stride (",
                stride, "), got ", block_size);
  const int64_t per = block_size / stride;
  ELASTIC_CHECK(per <= 128 && (per & (per - 1)) == 0, op, "block_size / stride must be a power of two <= 128 on ",
                "CUDA, got ", block_size, " / ", stride);
  ELASTIC_CHECK(std::isfinite(threshold) && threshold >= 0.0 && threshold <= 1.0, op,
                "threshold must be in [0, 1], got ", threshold);
  ELASTIC_CHECK(!scale.has_value() || (std::isfinite(*scale) && *scale > 0.0), op,
                "scale must be a positive finite float, got ", scale.has_value() ? *scale : 0.0);

  int64_t B, S;
  if (varlen) {
    const at::Tensor& cu = *cu_seqlens;
    ELASTIC_CHECK(cu.dim() == 1 && cu.numel() >= 2 && cu.scalar_type() == at::kInt, op,
                  "cu_seqlens must be int32 of shape [B + 1], got ", cu.scalar_type(), " ", dims_text(cu.sizes()));
    ELASTIC_CHECK(cu.device() == q_in.device(), op, "cu_seqlens must be on the device of q (", q_in.device(), "), got ",
                  cu.device());
    ELASTIC_CHECK(max_seqlen > 0, op, "max_seqlen must be > 0 with cu_seqlens, got ", max_seqlen);
    B = cu.numel() - 1;
    S = max_seqlen;
  } else {
    B = q_in.size(0);
    S = q_in.size(1);
  }
  ELASTIC_CHECK(head_mode.dim() == 2 && head_mode.size(0) == B && head_mode.size(1) == Hkv &&
                    head_mode.scalar_type() == at::kInt,
                op, "head_mode must be int32 of shape [B, Hkv] = [", B, ", ", Hkv, "], got ", head_mode.scalar_type(),
                " ", dims_text(head_mode.sizes()));
  ELASTIC_CHECK(head_mode.device() == q_in.device(), op, "head_mode must be on the device of q (", q_in.device(),
                "), got ", head_mode.device());
  ELASTIC_CHECK(S < INT_MAX / 2, op, "sequence length ", S, " too long");
  ELASTIC_CHECK(B * Hkv <= INT_MAX && B <= 65535 && Hq <= 65535, op, "batch ", B, " x heads ", Hq, " too large");

  const c10::cuda::CUDAGuard guard(q_in.device());
  const int64_t NB = ceil_div(S, block_size);
  at::Tensor mask = at::empty({B, Hq, NB, NB}, q_in.options().dtype(at::kBool));
  if (mask.numel() == 0) return mask;
  ELASTIC_CHECK(xattn_select_smem_bytes(NB, NB) <= kSelectSmemCapBytes, op, "too many blocks per row (", NB,
                "): at most 16384 (sequence length / block_size)");

  at::Tensor q = copy_rows(q_in), k = copy_rows(k_in);
  if ((Hq - 1) * q.stride(-2) >= INT_MAX) q = q.contiguous();  // kernel 1 keeps head offsets in int32
  XattnParams p;
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.q_stride_b = varlen ? 0 : q.stride(0);
  p.k_stride_b = varlen ? 0 : k.stride(0);
  p.q_stride_t = q.stride(-3);
  p.k_stride_t = k.stride(-3);
  p.q_stride_h = q.stride(-2);
  p.k_stride_h = k.stride(-2);
  at::Tensor cu;
  if (varlen) {
    cu = cu_seqlens->contiguous();
    p.cu_seqlens = cu.data_ptr<int32_t>();
    p.total_tokens = q.size(0);
  }
  p.head_mode = head_mode.data_ptr<int32_t>();
  p.hm_stride_b = head_mode.stride(0);
  p.hm_stride_h = head_mode.stride(1);
  p.batch = static_cast<int>(B);
  p.heads_q = static_cast<int>(Hq);
  p.heads_kv = static_cast<int>(Hkv);
  p.group = static_cast<int>(Hq / Hkv);
  p.seqlen = static_cast<int>(S);
  p.stride = static_cast<int>(stride);
  p.block_size = static_cast<int>(block_size);
  p.per = static_cast<int>(per);
  p.num_blocks = static_cast<int>(NB);
  const double sc = scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(D));
  p.scale_log2 = static_cast<float>(sc / static_cast<double>(stride) * 1.4426950408889634  /* log2(e) */);
  p.threshold = threshold;
  p.mask = mask.data_ptr<bool>();

  // Chunks of query blocks from the last (longest rows) down; each holds at most kWorkspaceCapBytes of
  // workspace, and always at least one query block.
  const int64_t G = ceil_div(S, stride);  // query groups of the longest sequence
  const int64_t bytes_per_tri = B * Hq * per * 4;  // one ws_block entry per (b, head, query group, key block)
  const int64_t bytes_per_row = B * Hq * per * 4;  // one ws_row entry per (b, head, query group), per block
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const KernelOptions opt = kernel_options();  // kernel 1 on wgmma where the device is a Hopper
  const XattnScores scores = !opt.xattn_sm90       ? XattnScores::kMmaSync
                             : opt.xattn_sm90_wide ? XattnScores::kWgmmaWide
                                                   : XattnScores::kWgmma;
  const bool bf16 = q.scalar_type() == at::kBFloat16;
  const int64_t cap = workspace_cap_bytes();
  at::Tensor ws;
  int64_t r1 = NB;
  while (r1 > 0) {
    int64_t r0 = r1 - 1;
    if (threshold < 1.0) {  // threshold >= 1 keeps every causal block: no scores needed
      while (r0 > 0 && bytes_per_tri * (tri(r1) - tri(r0 - 1)) + bytes_per_row * (r1 - r0 + 1) <= cap)
        --r0;
    } else {
      r0 = 0;
    }
    p.r0 = static_cast<int>(r0);
    p.r1 = static_cast<int>(r1);
    int row_tiles = 0;
    if (threshold < 1.0) {
      p.ws_head_stride = per * (tri(r1) - tri(r0));
      const int64_t n_block = B * Hq * p.ws_head_stride, n_row = B * Hq * (r1 - r0) * per;
      if (!ws.defined() || ws.numel() < n_block + n_row)
        ws = at::empty({n_block + n_row}, q.options().dtype(at::kFloat));
      p.ws_block = ws.data_ptr<float>();
      p.ws_row = p.ws_block + n_block;
      const int64_t rows = (std::min(r1 * per, G) - r0 * per) * (Hq / Hkv);
      row_tiles = xattn_row_tiles(rows);
      ELASTIC_CHECK(row_tiles <= 65535, op, "too many query rows per chunk (", rows, ")");
    }
    launch_xattn_chunk(p, bf16, static_cast<int>(D), row_tiles, scores, stream);
    r1 = r0;
  }
  return mask;
}

}  // namespace

TORCH_LIBRARY_IMPL(elastic, CUDA, m) { m.impl("xattn_block_mask", &xattn_block_mask_cuda); }

}  // namespace elastic

#endif  // WITH_CUDA
