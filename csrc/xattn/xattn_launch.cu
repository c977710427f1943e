// Launches of the XAttention estimate kernels (xattn_scores_kernel.cuh, xattn_select_kernel.cuh) for one chunk of
// query blocks; the host API (xattn_cuda_api.cpp) checks the arguments, sizes the chunks and the workspace.
#include <c10/cuda/CUDAException.h>

#include <atomic>

#include "attention/check_msg.h"
#include "xattn/xattn_launch.h"
#include "xattn/xattn_scores_sm90_kernel.cuh"
#include "xattn/xattn_select_kernel.cuh"

namespace elastic {

namespace {

template <typename T, int D>
void launch_scores(const XattnParams& p, int row_tiles, cudaStream_t stream) {
  auto kernel = xattn::xattn_scores_kernel<T, D>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, xattn::kScoreSmemBytes));
  const dim3 grid(static_cast<unsigned>(p.batch * p.heads_kv), static_cast<unsigned>(row_tiles));
  kernel<<<grid, xattn::kThreads, xattn::kScoreSmemBytes, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Is the wgmma body of kernel 1 in this build (a 9.0a pass) and is the current device a Hopper?
template <typename T, int D, int kKeyTiles>
bool scores_sm90_available() {
  static std::atomic<int> verdict[sm90::kMaxDevices];
  return sm90::sm90a_body_runnable(
      reinterpret_cast<const void*>(&xattn::xattn_scores_sm90_kernel<T, D, kKeyTiles>), verdict);
}

template <typename T, int D, int kKeyTiles>
void launch_scores_sm90(const XattnParams& p, int row_tiles, cudaStream_t stream) {
  using Shape = xattn::Sm90ScoresShape<kKeyTiles>;
  auto kernel = xattn::xattn_scores_sm90_kernel<T, D, kKeyTiles>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Shape::kSmemBytes));
  const dim3 grid(static_cast<unsigned>(p.batch * p.heads_kv), static_cast<unsigned>(row_tiles));
  kernel<<<grid, xattn::kSm90Threads, Shape::kSmemBytes, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int D>
void launch_scores_any(const XattnParams& p, int row_tiles, XattnScores scores, cudaStream_t stream) {
  if (scores == XattnScores::kWgmmaWide && scores_sm90_available<T, D, 2>())
    launch_scores_sm90<T, D, 2>(p, row_tiles, stream);
  else if (scores != XattnScores::kMmaSync && scores_sm90_available<T, D, 1>())
    launch_scores_sm90<T, D, 1>(p, row_tiles, stream);
  else
    launch_scores<T, D>(p, row_tiles, stream);
}

}  // namespace

int xattn_row_tiles(int64_t rows) { return static_cast<int>((rows + xattn::kRows - 1) / xattn::kRows); }

int64_t xattn_select_smem_bytes(int64_t max_len, int64_t num_blocks) {
  return xattn::select_smem_bytes(max_len, num_blocks);
}

void launch_xattn_chunk(const XattnParams& p, bool bf16, int head_dim, int row_tiles, XattnScores scores,
                        cudaStream_t stream) {
  if (row_tiles > 0) {
    if (bf16) {
      if (head_dim == 128) launch_scores_any<__nv_bfloat16, 128>(p, row_tiles, scores, stream);
      else launch_scores_any<__nv_bfloat16, 64>(p, row_tiles, scores, stream);
    } else {
      if (head_dim == 128) launch_scores_any<__half, 128>(p, row_tiles, scores, stream);
      else launch_scores_any<__half, 64>(p, row_tiles, scores, stream);
    }
  }
  const int64_t smem = xattn::select_smem_bytes(p.r1, p.num_blocks);
  C10_CUDA_CHECK(cudaFuncSetAttribute(xattn::xattn_select_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(smem)));
  const dim3 grid(static_cast<unsigned>(p.r1 - p.r0), static_cast<unsigned>(p.heads_q),
                  static_cast<unsigned>(p.batch));
  xattn::xattn_select_kernel<<<grid, xattn::kSelectThreads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace elastic
