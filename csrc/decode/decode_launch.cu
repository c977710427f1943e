// Instantiates and launches the decode attention kernels (decode_kernel.cuh) for fp16/bf16, D 64/128 and 4 or 8
// query rows per CTA (4 covers one query of a GQA group of <= 4 heads without idle rows; 8 halves the re-reads of
// K/V for bigger groups or speculative steps).
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <atomic>

#include "decode/decode_kernel.cuh"

namespace elastic {
namespace {

// The split kernel takes 64 KB of dynamic shared memory (above the 48 KB default): raised once per instance
// (the first call normally runs before any graph capture; the attribute is not a stream operation either way).
template <typename T, int D, int kRows>
void prepare() {
  static std::atomic<bool> done{false};
  if (done.load(std::memory_order_acquire)) return;
  C10_CUDA_CHECK(cudaFuncSetAttribute(decode::decode_split_kernel<T, D, kRows>,
                                      cudaFuncAttributeMaxDynamicSharedMemorySize, decode::kSmemBytes));
  done.store(true, std::memory_order_release);
}

template <typename T, int D, int kRows>
int ctas_per_sm() {
  static std::atomic<int> cached{0};
  int n = cached.load(std::memory_order_relaxed);
  if (n == 0) {
    prepare<T, D, kRows>();
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, decode::decode_split_kernel<T, D, kRows>,
                                                                 decode::kThreads, decode::kSmemBytes));
    n = n < 1 ? 1 : n;
    cached.store(n, std::memory_order_relaxed);
  }
  return n;
}

template <typename T, int D, int kRows>
void launch(const DecodeParams& p, cudaStream_t stream) {
  prepare<T, D, kRows>();
  decode::decode_split_kernel<T, D, kRows>
      <<<dim3(p.items_max, p.row_chunks), decode::kThreads, decode::kSmemBytes, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  decode::decode_combine_kernel<T, D, kRows><<<dim3(p.batch * p.hkv, p.rows), D, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

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
  static int run() { return ctas_per_sm<T, D, R>(); }
};
template <typename T, int D, int R>
struct Launch {
  static int run(const DecodeParams* p, cudaStream_t s) {
    launch<T, D, R>(*p, s);
    return 0;
  }
};

}  // namespace

int decode_ctas_per_sm(bool bf16, int head_dim, int rows_per_chunk) {
  return dispatch<Occupancy>(bf16, head_dim, rows_per_chunk);
}

void launch_decode_attention(const DecodeParams& p, bool bf16, int head_dim, int rows_per_chunk, void* stream) {
  dispatch<Launch>(bf16, head_dim, rows_per_chunk, &p, static_cast<cudaStream_t>(stream));
}

}  // namespace elastic
