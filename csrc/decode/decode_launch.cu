// Instantiates and launches the decode attention kernels for fp16/bf16, D 64/128 and 4 or 8 query rows per CTA (4
// covers one query of a GQA group of <= 4 heads without idle rows; 8 halves the re-reads of K/V for bigger groups or
// speculative steps): the tensor-core split kernel (decode_mma_kernel.cuh) for one query per step, the FMA split
// kernel (decode_kernel.cuh) otherwise, then the combine kernel.
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <atomic>

#include "decode/decode_mma_kernel.cuh"

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

// The combine kernel. With p.pdl on an sm_90+ device it is a programmatic dependent launch: it may start while the
// split grid runs (the split kernel allows it at its start, decode_kernel.cuh allow_dependent_launch) and its CTAs
// wait in griddepcontrol.wait until the split grid completed. Why: at batch 1 the call is short (32K B1 with 6/8
// heads STREAM: 0.041 ms for 40 MB of K/V, 8 us at HBM peak) and ncu put ~14 us per call in the combine launch and
// the gap before it (128K B1). A CUDA graph captures the attribute as a programmatic edge.
template <typename T, int D, int kRows>
void launch_combine(const DecodeParams& p, cudaStream_t stream) {
  const dim3 grid(p.batch * p.hkv, p.rows);
  if (p.pdl && device_major() >= 9) {
    cudaLaunchConfig_t cfg{};
    cfg.gridDim = grid;
    cfg.blockDim = dim3(decode::kCombineThreads);
    cfg.dynamicSmemBytes = 0;
    cfg.stream = stream;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    C10_CUDA_CHECK(cudaLaunchKernelEx(&cfg, decode::decode_combine_kernel<T, D, kRows>, p));
  } else {
    decode::decode_combine_kernel<T, D, kRows><<<grid, decode::kCombineThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// The split kernels take 64-96 KB of dynamic shared memory (above the 48 KB default): raised once per instance
// (the first call normally runs before any graph capture; the attribute is not a stream operation either way).
template <typename T, int D, int kRows, bool kMma>
struct Split {
  static constexpr int kSmem = kMma ? decode::MmaShape<D>::kSmemBytes : decode::kSmemBytes;
  static auto kernel() {
    if constexpr (kMma)
      return decode::decode_mma_kernel<T, D, kRows>;
    else
      return decode::decode_split_kernel<T, D, kRows>;
  }
  static void prepare() {
    static std::atomic<bool> done{false};
    if (done.load(std::memory_order_acquire)) return;
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel(), cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem));
    done.store(true, std::memory_order_release);
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
  static void launch(const DecodeParams& p, cudaStream_t stream) {
    prepare();
    kernel()<<<dim3(p.items_max, p.row_chunks), decode::kThreads, kSmem, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    launch_combine<T, D, kRows>(p, stream);
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
  static int run(const DecodeParams* p, bool mma, cudaStream_t s) {
    if (mma)
      Split<T, D, R, true>::launch(*p, s);
    else
      Split<T, D, R, false>::launch(*p, s);
    return 0;
  }
};

}  // namespace

int decode_ctas_per_sm(bool bf16, int head_dim, int rows_per_chunk, bool mma) {
  return dispatch<Occupancy>(bf16, head_dim, rows_per_chunk, mma);
}

void launch_decode_attention(const DecodeParams& p, bool bf16, int head_dim, int rows_per_chunk, bool mma,
                             void* stream) {
  dispatch<Launch>(bf16, head_dim, rows_per_chunk, &p, mma, static_cast<cudaStream_t>(stream));
}

}  // namespace elastic
