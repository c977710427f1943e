// Launch templates of the CUDA attention kernels, instantiated once per (dtype, head_dim) in
// attention_{fwd,bwd}_hdim{64,128}.cu so that the translation units compile in parallel.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "attention/attention_params.h"
#include "attention/kernel_options.h"

namespace at {
class Tensor;
}

namespace elastic {

template <typename T, int D>
void launch_attention_fwd(const AttentionFwdParams& p, int num_q_tiles_max, cudaStream_t stream);

// Hopper (sm_90a, wgmma) forward for every head mode (sm90/; BLOCK masks need block_size % kSm90BlockN == 0).
// available() says whether the current device is compute capability 9.x and the loaded binary holds the sm_90a body.
// counter: one zeroed 64-bit device word for the dynamic work-item hand-out, or nullptr (fixed stride).
// opt: the call's tuning options (its sm90_* fields; kernel_options.h).
template <typename T, int D>
bool attention_fwd_sm90_available();
template <typename T, int D>
void launch_attention_fwd_sm90(const AttentionFwdParams& p, int num_q_tiles_max, cudaStream_t stream,
                               unsigned long long* counter, const KernelOptions& opt);

// Query tile (rows) of both forward kernels, needed by the host to size the grid.
constexpr int kFwdBlockM = 128;
// Key tile of the sm80 kernels: BLOCK masks need block_size % kMaxBlockN == 0 on CUDA.
constexpr int kMaxBlockN = 64;
// Key tile of the Hopper forward: it takes BLOCK masks with block_size % kSm90BlockN == 0 (others go to sm80).
constexpr int kSm90BlockN = 128;

// Non-finite prepass (nonfinite.cuh): allocates the flag buffer on the stream, launches the kernel that fills it
// and points p.nf_flags / p.nf_tiles at it. The returned tensor owns the buffer: keep it until the forward launched.
template <typename T, int D>
at::Tensor launch_nonfinite_kv(AttentionFwdParams& p, int max_seqlen_k, const at::Tensor& like, cudaStream_t stream);

template <typename T>
void launch_attention_bwd_convert_dq(const float* dq_accum, T* dq, int64_t n, float scale, cudaStream_t stream);

template <typename T, int D>
void launch_attention_bwd(const AttentionBwdParams& p, int max_seqlen_q, int max_seqlen_k, cudaStream_t stream);

// Hopper (sm_90a, wgmma + TMA) backward for every head mode (sm90/attention_bwd_sm90_kernel.cuh; BLOCK masks need
// block_size % kSm90BlockN == 0). available(): compute capability 9.x and the loaded binary holds the sm_90a body.
// launch() runs the preprocess and the main kernel, like launch_attention_bwd, and returns false having launched
// nothing when it cannot take the call (a tensor map that cannot be built, a grid too large): the caller then runs
// the mma.sync backward.
template <typename T, int D>
bool attention_bwd_sm90_available();
template <typename T, int D>
bool launch_attention_bwd_sm90(const AttentionBwdParams& p, int max_seqlen_q, int max_seqlen_k, cudaStream_t stream,
                               const KernelOptions& opt);

}  // namespace elastic
