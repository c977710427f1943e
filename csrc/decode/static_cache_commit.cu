// CUDA implementation of elastic::static_cache_commit (schema: csrc/ops.cpp; the CPU kernel and reference:
// elastic_cuda/_decode_cpu.py): writes a prefill's keys and values into the pools of an ElasticStaticCache layer
// (elastic_cuda/integrations/static_cache.py) in one launch, with the routing read on the device.
//
// Why a kernel: the commit was ~25 small torch ops per layer (index uploads from pinned memory, advanced-index
// gathers and scatters per sample), ~0.8 ms of host time a layer; on a launch-bound model that doubled the prefill
// (SmolLM2-135M at 8K on the H200: every head FULL 32.5 ms without the static cache, 56.5 ms with it;
// benchmarks/results/prefill_profile/2026-12-03_h200_static_commit/after_fix.txt).
//
// One CTA per (pair, chunk of kTokensPerCta tokens). A pair's pool row (its slot) is its rank among the pairs of
// its kind (FULL/BLOCK "whole" or STREAM) in (sample, head) order, counted by every CTA over the head_mode table
// (B x Hkv int32, a few KB at most), so the kernel needs nothing from the host but pointers and shapes. Rows are
// copied in the widest word that every row start allows (16 bytes for fp16/bf16 with D 64/128).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <cstdint>

#include "attention/check_msg.h"
#include "decode/decode_params.h"

namespace elastic {
namespace {

constexpr const char* kOp = "elastic.static_cache_commit: ";
constexpr int kThreads = 128;
constexpr int kTokensPerCta = 64;

struct CommitParams {
  const char* keys;
  const char* values;
  int64_t k_stride_b, k_stride_h, k_stride_s;  // bytes
  int64_t v_stride_b, v_stride_h, v_stride_s;
  int32_t batch, heads, seqlen;                // keys [B, H, S, D]
  int32_t row_words;                           // D * element size / sizeof(Word)
  const int32_t* head_mode;                    // [B, H]
  const int32_t* cu_seqlens;                   // [B + 1] or null (every sample has S tokens)
  const int64_t* token_index;                  // [T] flat indices into [B * S] or null
  char* full_k;
  char* full_v;
  int64_t full_stride_pair;                    // bytes; token rows are row_words words apart
  int32_t full_pairs, full_tokens;
  char* stream_k;
  char* stream_v;
  int64_t stream_stride_pair;
  int32_t stream_pairs, stream_tokens;
  int32_t sink;
  int32_t* mode_table;                         // [B, H] out: head_mode
  int32_t* slot;                               // [B, H] out
  bool* is_whole;                              // [B, H] out
  int32_t* seq_lens;                           // [B] out
};

template <typename Word>
__global__ void __launch_bounds__(kThreads) static_cache_commit_kernel(const CommitParams p) {
  const int32_t pair = blockIdx.y;
  const int32_t b = pair / p.heads, h = pair % p.heads;
  const int32_t mode = p.head_mode[pair];
  const bool whole = mode != kStream;  // FULL and BLOCK keep their whole history
  // Rank among the earlier pairs of the same kind (every thread gets the same count).
  int32_t rank = 0;
  for (int32_t base = 0; base < pair; base += kThreads) {
    const int32_t j = base + static_cast<int32_t>(threadIdx.x);
    rank += __syncthreads_count(j < pair && (p.head_mode[j] != kStream) == whole);
  }
  const int32_t start = p.cu_seqlens != nullptr ? p.cu_seqlens[b] : 0;
  const int32_t n = p.cu_seqlens != nullptr ? p.cu_seqlens[b + 1] - start : p.seqlen;
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    p.mode_table[pair] = mode;
    p.slot[pair] = rank;
    p.is_whole[pair] = whole;
    if (h == 0) p.seq_lens[b] = n;
  }
  // The caller sized the pools from the same routing and lengths (ElasticStaticLayer.finish_commit).
  CUDA_KERNEL_ASSERT(rank < (whole ? p.full_pairs : p.stream_pairs));
  CUDA_KERNEL_ASSERT(n >= 0 && n <= p.seqlen && (!whole || n <= p.full_tokens));

  const int32_t t0 = static_cast<int32_t>(blockIdx.x) * kTokensPerCta;
  const int32_t t1 = min(t0 + kTokensPerCta, n);
  const int32_t ring = p.stream_tokens - p.sink;
  char* dst_k = whole ? p.full_k + rank * p.full_stride_pair : p.stream_k + rank * p.stream_stride_pair;
  char* dst_v = whole ? p.full_v + rank * p.full_stride_pair : p.stream_v + rank * p.stream_stride_pair;
  const int64_t row_bytes = static_cast<int64_t>(p.row_words) * sizeof(Word);
  for (int32_t e = threadIdx.x; e < (t1 - t0) * p.row_words; e += kThreads) {
    const int32_t i = t0 + e / p.row_words, w = e % p.row_words;  // token i of the sample, word w of its row
    int32_t row = i;
    if (!whole) {  // sink tokens, then the last `ring` tokens at their ring rows (stream_ring_row)
      if (i >= p.sink && i < n - ring) continue;
      row = stream_ring_row(i, p.sink, ring);
    }
    int64_t s = i;
    if (p.token_index != nullptr) {
      s = p.token_index[start + i] - static_cast<int64_t>(b) * p.seqlen;
      CUDA_KERNEL_ASSERT(s >= 0 && s < p.seqlen);
    }
    const int64_t src_k = b * p.k_stride_b + h * p.k_stride_h + s * p.k_stride_s;
    const int64_t src_v = b * p.v_stride_b + h * p.v_stride_h + s * p.v_stride_s;
    reinterpret_cast<Word*>(dst_k + row * row_bytes)[w] = reinterpret_cast<const Word*>(p.keys + src_k)[w];
    reinterpret_cast<Word*>(dst_v + row * row_bytes)[w] = reinterpret_cast<const Word*>(p.values + src_v)[w];
  }
}

void check_cuda(const at::Tensor& t, const char* name, const at::Device& device) {
  ELASTIC_CHECK(t.is_cuda() && t.device() == device, kOp, name, " must be a CUDA tensor on the device of keys (",
                device.str(), "), got ", t.device().str());
}

void check_pool(const at::Tensor& t, const char* name, const at::Tensor& keys) {
  check_cuda(t, name, keys.device());
  const int64_t D = keys.size(3);
  ELASTIC_CHECK(t.dim() == 3 && t.size(2) == D, kOp, name, " must have shape [pairs, tokens, D=", D, "], got ",
                t.sizes());
  ELASTIC_CHECK(t.scalar_type() == keys.scalar_type(), kOp, name, " must have the dtype of keys");
  ELASTIC_CHECK(t.stride(2) == 1 && t.stride(1) == D, kOp, name, " must have contiguous [tokens, D] rows");
  ELASTIC_CHECK(t.size(0) <= INT32_MAX && t.size(1) <= INT32_MAX, kOp, name, " is too large (int32 indexing)");
}

void check_table(const at::Tensor& t, const char* name, const at::Device& device, at::IntArrayRef shape) {
  check_cuda(t, name, device);
  ELASTIC_CHECK(t.scalar_type() == at::kInt && t.sizes() == shape && t.is_contiguous(), kOp, name,
                " must be a contiguous int32 tensor of shape ", shape);
}

// The widest word (16, 8, 4, 2 or 1 bytes) that divides every row start and the row length.
int word_bytes(const at::Tensor& keys, const at::Tensor& values, std::initializer_list<const at::Tensor*> pools) {
  const int64_t es = keys.element_size();
  uint64_t bits = static_cast<uint64_t>(keys.size(3) * es);
  for (const at::Tensor* t : {&keys, &values}) {
    bits |= reinterpret_cast<uintptr_t>(t->data_ptr());
    for (int d = 0; d < 3; ++d) bits |= static_cast<uint64_t>(t->stride(d) * es);
  }
  for (const at::Tensor* t : pools) {
    bits |= reinterpret_cast<uintptr_t>(t->data_ptr()) | static_cast<uint64_t>(t->stride(0) * es);
  }
  for (int w = 16; w > 1; w /= 2) {
    if (bits % w == 0) return w;
  }
  return 1;
}

void static_cache_commit_cuda(const at::Tensor& keys, const at::Tensor& values, const at::Tensor& head_mode,
                              const c10::optional<at::Tensor>& cu_seqlens, const c10::optional<at::Tensor>& token_index,
                              const at::Tensor& full_k, const at::Tensor& full_v, const at::Tensor& stream_k,
                              const at::Tensor& stream_v, const at::Tensor& mode_table, const at::Tensor& slot,
                              const at::Tensor& is_whole, const at::Tensor& seq_lens, int64_t sink) {
  ELASTIC_CHECK(keys.is_cuda(), kOp, "keys must be a CUDA tensor");
  const at::Device device = keys.device();
  ELASTIC_CHECK(keys.dim() == 4, kOp, "keys must have shape [B, Hkv, S, D], got ", keys.sizes());
  ELASTIC_CHECK(values.sizes() == keys.sizes() && values.scalar_type() == keys.scalar_type(), kOp,
                "values must have the shape and dtype of keys ", keys.sizes());
  check_cuda(values, "values", device);
  ELASTIC_CHECK(keys.stride(3) == 1 && values.stride(3) == 1, kOp, "keys and values must have contiguous head dims");
  const int64_t B = keys.size(0), H = keys.size(1), S = keys.size(2);
  ELASTIC_CHECK(B * H <= 65535 && S <= INT32_MAX, kOp, "keys ", keys.sizes(), " exceed the launch's limits (B * Hkv <= 65535)");
  check_table(head_mode, "head_mode", device, {B, H});
  check_table(mode_table, "mode_table", device, {B, H});
  check_table(slot, "slot", device, {B, H});
  check_cuda(is_whole, "is_whole", device);
  ELASTIC_CHECK(is_whole.scalar_type() == at::kBool && is_whole.sizes() == slot.sizes() && is_whole.is_contiguous(),
                kOp, "is_whole must be a contiguous bool tensor of shape [B, Hkv]");
  check_table(seq_lens, "seq_lens", device, {B});
  ELASTIC_CHECK(cu_seqlens.has_value() == token_index.has_value(), kOp,
                "cu_seqlens and token_index come together (a padded prompt) or not at all");
  if (cu_seqlens.has_value()) {
    check_table(*cu_seqlens, "cu_seqlens", device, {B + 1});
    check_cuda(*token_index, "token_index", device);
    ELASTIC_CHECK(token_index->dim() == 1 && token_index->scalar_type() == at::kLong && token_index->is_contiguous(),
                  kOp, "token_index must be a contiguous int64 tensor [T]");
  }
  check_pool(full_k, "full_k", keys);
  check_pool(full_v, "full_v", keys);
  check_pool(stream_k, "stream_k", keys);
  check_pool(stream_v, "stream_v", keys);
  ELASTIC_CHECK(full_v.sizes() == full_k.sizes() && full_v.stride(0) == full_k.stride(0), kOp,
                "full_v must have the shape and strides of full_k");
  ELASTIC_CHECK(stream_v.sizes() == stream_k.sizes() && stream_v.stride(0) == stream_k.stride(0), kOp,
                "stream_v must have the shape and strides of stream_k");
  ELASTIC_CHECK(sink >= 0 && sink < stream_k.size(1), kOp, "sink must lie in [0, stream_k.shape[1]=",
                stream_k.size(1), "), got ", sink);
  if (B * H == 0 || S == 0) return;

  const int64_t es = keys.element_size();
  const int word = word_bytes(keys, values, {&full_k, &full_v, &stream_k, &stream_v});
  CommitParams p;
  p.keys = static_cast<const char*>(keys.data_ptr());
  p.values = static_cast<const char*>(values.data_ptr());
  p.k_stride_b = keys.stride(0) * es, p.k_stride_h = keys.stride(1) * es, p.k_stride_s = keys.stride(2) * es;
  p.v_stride_b = values.stride(0) * es, p.v_stride_h = values.stride(1) * es, p.v_stride_s = values.stride(2) * es;
  p.batch = static_cast<int32_t>(B), p.heads = static_cast<int32_t>(H), p.seqlen = static_cast<int32_t>(S);
  p.row_words = static_cast<int32_t>(keys.size(3) * es / word);
  p.head_mode = head_mode.data_ptr<int32_t>();
  p.cu_seqlens = cu_seqlens.has_value() ? cu_seqlens->data_ptr<int32_t>() : nullptr;
  p.token_index = token_index.has_value() ? token_index->data_ptr<int64_t>() : nullptr;
  p.full_k = static_cast<char*>(full_k.data_ptr()), p.full_v = static_cast<char*>(full_v.data_ptr());
  p.full_stride_pair = full_k.stride(0) * es;
  p.full_pairs = static_cast<int32_t>(full_k.size(0)), p.full_tokens = static_cast<int32_t>(full_k.size(1));
  p.stream_k = static_cast<char*>(stream_k.data_ptr()), p.stream_v = static_cast<char*>(stream_v.data_ptr());
  p.stream_stride_pair = stream_k.stride(0) * es;
  p.stream_pairs = static_cast<int32_t>(stream_k.size(0)), p.stream_tokens = static_cast<int32_t>(stream_k.size(1));
  p.sink = static_cast<int32_t>(sink);
  p.mode_table = mode_table.data_ptr<int32_t>();
  p.slot = slot.data_ptr<int32_t>();
  p.is_whole = is_whole.data_ptr<bool>();
  p.seq_lens = seq_lens.data_ptr<int32_t>();

  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index());
  const dim3 grid(static_cast<unsigned>((S + kTokensPerCta - 1) / kTokensPerCta), static_cast<unsigned>(B * H));
  switch (word) {
    case 16: static_cache_commit_kernel<uint4><<<grid, kThreads, 0, stream>>>(p); break;
    case 8: static_cache_commit_kernel<uint2><<<grid, kThreads, 0, stream>>>(p); break;
    case 4: static_cache_commit_kernel<uint32_t><<<grid, kThreads, 0, stream>>>(p); break;
    case 2: static_cache_commit_kernel<uint16_t><<<grid, kThreads, 0, stream>>>(p); break;
    default: static_cache_commit_kernel<uint8_t><<<grid, kThreads, 0, stream>>>(p); break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(elastic, CUDA, m) { m.impl("static_cache_commit", &static_cache_commit_cuda); }

}  // namespace elastic
