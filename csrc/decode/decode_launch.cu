// Instantiates and launches the decode attention kernels for fp16/bf16, D 64/128 and 4 or 8 query rows per CTA (4
// covers one query of a GQA group of <= 4 heads without idle rows; 8 halves the re-reads of K/V for bigger groups or
// speculative steps): the tensor-core split kernel (decode_mma_kernel.cuh) for one query per step, the FMA split
// kernel (decode_kernel.cuh) otherwise, then the combine kernel (round 1's, or round 2's decode_combine_v2.cuh under
// ELASTIC_DECODE_COMBINE=v2; as a programmatic dependent launch under ELASTIC_DECODE_PDL, decode_pdl.cuh).
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <atomic>

#include "attention/sm90/tma.cuh"
#include "decode/decode_combine_v2.cuh"
#include "decode/decode_mma_kernel.cuh"
#include "decode/decode_tma.h"

namespace elastic {
namespace {

// Compute capability major of the current device, cached per device (an attribute read, no synchronisation).
int device_major() {
  static std::atomic<int> cached[64] = {};
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  std::atomic<int>& slot = cached[dev >= 0 && dev < 64 ? dev : 0];
  int major = slot.load(std::memory_order_relaxed);
  if (major == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
    slot.store(major, std::memory_order_relaxed);
  }
  return major;
}

// The combine kernel after the split kernel: round 1's (D threads per CTA) or the latency-light one
// (ELASTIC_DECODE_COMBINE=v2, decode_combine_v2.cuh). With pdl, a programmatic dependent launch (decode_pdl.cuh):
// it may be scheduled before the split grid completes and waits for it in griddepcontrol.wait; a CUDA graph
// captures the attribute as a programmatic edge.
template <typename T, int D, int kRows>
void launch_combine(const DecodeParams& p, bool pdl, cudaStream_t stream) {
  const dim3 grid(p.batch * p.hkv, p.rows);
  if (!pdl) {
    if (p.combine_v2)
      decode::decode_combine_v2_kernel<T, D, kRows><<<grid, decode::kCombineV2Threads, 0, stream>>>(p);
    else
      decode::decode_combine_kernel<T, D, kRows><<<grid, D, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = grid;
  cfg.blockDim = dim3(p.combine_v2 ? decode::kCombineV2Threads : D);
  cfg.dynamicSmemBytes = 0;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  if (p.combine_v2)
    C10_CUDA_CHECK(cudaLaunchKernelEx(&cfg, decode::decode_combine_v2_kernel<T, D, kRows>, p));
  else
    C10_CUDA_CHECK(cudaLaunchKernelEx(&cfg, decode::decode_combine_kernel<T, D, kRows, true>, p));
}

// The split kernels take 64-96 KB of dynamic shared memory (above the 48 KB default): raised once per instance
// (the first call normally runs before any graph capture; the attribute is not a stream operation either way).
// kLayout: the tensor-core kernel's copy / shared-memory layout (decode_mma_kernel.cuh): 0 cp.async, 1 TMA
// (ELASTIC_DECODE_COPY=tma; 1 KB more for the 1024-byte alignment), 2 the diagnostic pairs layout. kTrigger: where
// the tensor-core kernel signals a programmatic dependent combine (decode_pdl.cuh; instances of layout 0 only).
// kVariant: the tensor-core instance's batch-1 variant flags (decode_mma_kernel.cuh MmaVariant): kFusedMerge
// (ELASTIC_DECODE_FUSED_COMBINE=v2, decode_fused_merge.cuh), kLateQ (ELASTIC_DECODE_LATE_Q=1).
template <typename T, int D, int kRows, bool kMma, int kLayout = 0, int kTrigger = decode::kTriggerNone,
          int kVariant = 0>
struct Split {
  static constexpr bool kTma = kLayout == 1;
  static constexpr int kSmem = kMma ? (kTma ? decode::MmaShape<D>::kSmemBytesTma : decode::MmaShape<D>::kSmemBytes)
                                    : decode::kSmemBytes;
  static auto kernel() {
    if constexpr (kMma)
      return decode::decode_mma_kernel<T, D, kRows, kLayout, kTrigger, kVariant>;
    else
      return decode::decode_split_kernel<T, D, kRows>;
  }
  static void prepare() {
    static std::atomic<bool> done{false};
    if (done.load(std::memory_order_acquire)) return;
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel(), cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem));
    done.store(true, std::memory_order_release);
  }
  // Whether this instance's sm_90 body (kTma) runs on the current device: built for compute 9.x (ptxVersion; a
  // body JIT-compiled from sm_80 PTX has the TMA path compiled out and traps). Cached per instance (one device kind
  // per process is the case served; a mixed-device process asks the first device).
  static bool runnable() {
    static std::atomic<int> verdict{0};  // 0 unknown, 1 yes, 2 no
    int v = verdict.load(std::memory_order_relaxed);
    if (v == 0) {
      cudaFuncAttributes attr;
      int dev = 0, major = 0;
      const bool ok = cudaGetDevice(&dev) == cudaSuccess &&
                      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess &&
                      major == 9 && cudaFuncGetAttributes(&attr, kernel()) == cudaSuccess && attr.ptxVersion >= 90 &&
                      attr.binaryVersion >= 90;
      (void)cudaGetLastError();
      v = ok ? 1 : 2;
      verdict.store(v, std::memory_order_relaxed);
    }
    return v == 1;
  }
  static int ctas_per_sm() {
    static std::atomic<int> cached{0};
    int n = cached.load(std::memory_order_relaxed);
    if (n == 0) {
      prepare();
      C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel(), decode::kThreads, kSmem));
      n = n < 1 ? 1 : n;
      cached.store(n, std::memory_order_relaxed);
    }
    return n;
  }
  // pdl: the combine as a programmatic dependent launch. An instance without a trigger is still correct under it
  // (the split grid then signals implicitly when it completes).
  static void launch(const DecodeParams& p, const DecodeMaps& maps, bool pdl, cudaStream_t stream) {
    prepare();
    if constexpr (kMma)
      kernel()<<<dim3(p.items_max, p.row_chunks), decode::kThreads, kSmem, stream>>>(p, maps);
    else
      kernel()<<<dim3(p.items_max, p.row_chunks), decode::kThreads, kSmem, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (kMma && p.fused_combine) return;  // the last CTA of each split pair merged it
    launch_combine<T, D, kRows>(p, pdl, stream);
  }
};

// One function per instance of (dtype, D, rows): F<T, D, R>::run(args...).
template <template <typename, int, int> class F, typename... A>
auto dispatch(bool bf16, int head_dim, int rows_per_chunk, A... args) {
  if (bf16) {
    if (head_dim == 64)
      return rows_per_chunk == 4 ? F<__nv_bfloat16, 64, 4>::run(args...) : F<__nv_bfloat16, 64, 8>::run(args...);
    return rows_per_chunk == 4 ? F<__nv_bfloat16, 128, 4>::run(args...) : F<__nv_bfloat16, 128, 8>::run(args...);
  }
  if (head_dim == 64) return rows_per_chunk == 4 ? F<__half, 64, 4>::run(args...) : F<__half, 64, 8>::run(args...);
  return rows_per_chunk == 4 ? F<__half, 128, 4>::run(args...) : F<__half, 128, 8>::run(args...);
}

template <typename T, int D, int R>
struct Occupancy {
  static int run(bool mma) { return mma ? Split<T, D, R, true>::ctas_per_sm() : Split<T, D, R, false>::ctas_per_sm(); }
};
template <typename T, int D, int R>
struct Launch {
  static int run(const DecodeParams* p, bool mma, bool bf16, cudaStream_t s) {
    DecodeMaps maps{};
    // Programmatic dependent combine launch (ELASTIC_DECODE_PDL) where the device has it (sm_90+).
    const bool pdl = p->pdl != 0 && device_major() >= 9;
    // TMA copies (ELASTIC_DECODE_COPY=tma) where the sm_90 body runs and every pool can be mapped; else zero-fill
    // cp.async (copy_mode 2 means zfill to the cp.async instance).
    // The batch-1 variants (ELASTIC_DECODE_FUSED_COMBINE=v2, ELASTIC_DECODE_LATE_Q=1): their own cp.async instances
    // (copy plain or zfill by p.copy_mode; tma falls back to zfill there), without a PDL trigger (a PDL combine after
    // the late-Q instance is still correct: the split grid signals when it completes); the fused one launches no
    // combine.
    if (mma && (p->fused_combine == 2 || p->late_q)) {
      if (p->fused_combine == 2 && p->late_q)
        Split<T, D, R, true, 0, decode::kTriggerNone, decode::kFusedMerge | decode::kLateQ>::launch(*p, maps, pdl, s);
      else if (p->fused_combine == 2)
        Split<T, D, R, true, 0, decode::kTriggerNone, decode::kFusedMerge>::launch(*p, maps, pdl, s);
      else
        Split<T, D, R, true, 0, decode::kTriggerNone, decode::kLateQ>::launch(*p, maps, pdl, s);
      return 0;
    }
    if (mma && p->copy_mode == 2 && Split<T, D, R, true, 1>::runnable() &&
        encode_decode_maps(*p, bf16, D, maps, nullptr)) {
      Split<T, D, R, true, 1>::launch(*p, maps, pdl, s);
      return 0;
    }
    if (mma && p->copy_mode == 3) {  // diagnostic: zero-fill cp.async into the 32-byte-unit layout
      Split<T, D, R, true, 2>::launch(*p, maps, pdl, s);
      return 0;
    }
    if (mma && pdl && p->pdl == 1)
      Split<T, D, R, true, 0, decode::kTriggerEnd>::launch(*p, maps, pdl, s);
    else if (mma && pdl && p->pdl == 2)
      Split<T, D, R, true, 0, decode::kTriggerStart>::launch(*p, maps, pdl, s);
    else if (mma)
      Split<T, D, R, true>::launch(*p, maps, pdl, s);
    else
      Split<T, D, R, false>::launch(*p, maps, pdl, s);
    return 0;
  }
};

// One pool's map: [pairs, tokens, D] as (D, tokens, 1, pairs), 64 x 64 boxes (decode_tma.h). An empty pool is
// never read: a zeroed map stands in.
const char* encode_pool_map(CUtensorMap* map, const void* base, int64_t stride_pair, int32_t pairs, int32_t tokens,
                            bool bf16, int head_dim) {
  if (pairs == 0 || tokens == 0) {
    *map = CUtensorMap{};
    return nullptr;
  }
  return sm90_host::encode_rows_map(map, base, bf16, head_dim, tokens, 1, pairs, head_dim, head_dim, stride_pair, 64);
}

}  // namespace

bool encode_decode_maps(const DecodeParams& p, bool bf16, int head_dim, DecodeMaps& maps, const char** why) {
  const char* e = encode_pool_map(&maps.full_k, p.full_k, p.full_k_stride_pair, p.full_pairs, p.full_tokens, bf16,
                                  head_dim);
  if (e == nullptr)
    e = encode_pool_map(&maps.full_v, p.full_v, p.full_v_stride_pair, p.full_pairs, p.full_tokens, bf16, head_dim);
  if (e == nullptr)
    e = encode_pool_map(&maps.stream_k, p.stream_k, p.stream_k_stride_pair, p.stream_pairs, p.stream_tokens, bf16,
                        head_dim);
  if (e == nullptr)
    e = encode_pool_map(&maps.stream_v, p.stream_v, p.stream_v_stride_pair, p.stream_pairs, p.stream_tokens, bf16,
                        head_dim);
  if (why != nullptr) *why = e;
  return e == nullptr;
}

int decode_ctas_per_sm(bool bf16, int head_dim, int rows_per_chunk, bool mma) {
  return dispatch<Occupancy>(bf16, head_dim, rows_per_chunk, mma);
}

void launch_decode_attention(const DecodeParams& p, bool bf16, int head_dim, int rows_per_chunk, bool mma,
                             void* stream) {
  dispatch<Launch>(bf16, head_dim, rows_per_chunk, &p, mma, bf16, static_cast<cudaStream_t>(stream));
}

}  // namespace elastic
