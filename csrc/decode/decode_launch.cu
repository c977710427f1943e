// Instantiates and launches the decode attention kernels (decode_kernel.cuh) for fp16/bf16, D 64/128 and 4 or 8
// query rows per CTA (4 covers one query of a GQA group of <= 4 heads without idle rows; 8 halves the re-reads of
// K/V for bigger groups or speculative steps).
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include "decode/decode_kernel.cuh"

namespace elastic {
namespace {

template <typename T, int D, int kRows>
void launch(const DecodeParams& p, cudaStream_t stream) {
  const dim3 grid(p.row_chunks, p.batch * p.hkv, p.num_splits);
  decode::decode_split_kernel<T, D, kRows><<<grid, decode::kThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (p.num_splits > 1) {
    decode::decode_combine_kernel<T, D, kRows><<<dim3(p.batch * p.hkv, p.rows), D, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename T, int D>
void launch_rows(const DecodeParams& p, int rows_per_chunk, cudaStream_t stream) {
  if (rows_per_chunk == 4)
    launch<T, D, 4>(p, stream);
  else
    launch<T, D, 8>(p, stream);
}

template <typename T>
void launch_dim(const DecodeParams& p, int head_dim, int rows_per_chunk, cudaStream_t stream) {
  if (head_dim == 64)
    launch_rows<T, 64>(p, rows_per_chunk, stream);
  else
    launch_rows<T, 128>(p, rows_per_chunk, stream);
}

}  // namespace

void launch_decode_attention(const DecodeParams& p, bool bf16, int head_dim, int rows_per_chunk, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (bf16)
    launch_dim<__nv_bfloat16>(p, head_dim, rows_per_chunk, s);
  else
    launch_dim<__half>(p, head_dim, rows_per_chunk, s);
}

}  // namespace elastic
