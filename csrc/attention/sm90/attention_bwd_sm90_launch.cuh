// Launch template of the Hopper backward kernel (instantiated in attention_bwd_sm90_hdim*.cu): the check that the
// loaded binary holds its sm_90a body, its tensor maps, and the launch of preprocess + main kernel (the caller
// converts dq_accum, as after the mma.sync backward).
#pragma once
#include <c10/cuda/CUDAException.h>

#include <atomic>
#include <cstdio>
#include <cstring>
#include <type_traits>

#include "attention/attention_bwd_launch.cuh"  // launch_attention_bwd_preprocess (delta), shared with sm80
#include "attention/attention_launch.h"
#include "attention/check_msg.h"
#include "attention/sm90/sm90a_available.h"
#include "attention/sm90/attention_bwd_sm90_kernel.cuh"

namespace elastic {
namespace sm90 {

// Tensor maps of q, dout (64-row boxes), k, v (128-row boxes) and, with DQ_TMA, dq_accum; false when one of them
// cannot be built (verbose: say why on stderr).
template <typename T, typename Tr>
bool build_bwd_tma_maps(const AttentionBwdParams& p, BwdTmaMaps& maps, bool verbose) {
  constexpr bool bf16 = std::is_same<T, __nv_bfloat16>::value;
  const bool varlen = p.cu_seqlens_q != nullptr;
  const int64_t batch = varlen ? 1 : p.batch;
  const char* which = "q";
  const char* why = sm90_host::encode_rows_map(&maps.q, p.q, bf16, Tr::D, p.rows_q, p.heads_q, batch, p.q_stride_r,
                                               p.q_stride_h, p.q_stride_b, Tr::BM);
  if (why == nullptr) {
    which = "grad_out";
    why = sm90_host::encode_rows_map(&maps.dout, p.dout, bf16, Tr::D, p.rows_q, p.heads_q, batch, p.do_stride_r,
                                     p.do_stride_h, p.do_stride_b, Tr::BM);
  }
  if (why == nullptr) {
    which = "k";
    why = sm90_host::encode_rows_map(&maps.k, p.k, bf16, Tr::D, p.rows_k, p.heads_kv, batch, p.k_stride_r,
                                     p.k_stride_h, p.k_stride_b, Tr::BN);
  }
  if (why == nullptr) {
    which = "v";
    why = sm90_host::encode_rows_map(&maps.v, p.v, bf16, Tr::D, p.rows_k, p.heads_kv, batch, p.v_stride_r,
                                     p.v_stride_h, p.v_stride_b, Tr::BN);
  }
  if (why == nullptr && Tr::DQ_TMA) {
    which = "dq_accum";
    why = sm90_host::encode_rows_map_f32(&maps.dq, p.dq_accum, Tr::D, p.rows_q, p.heads_q, batch, p.dqa_stride_r,
                                         p.dqa_stride_h, p.dqa_stride_b, Tr::DQ_BOX_ROWS);
  }
  if (why != nullptr && verbose)
    std::fprintf(stderr, "elastic sm90 backward: no tensor map for %s (%s): mma.sync backward\n", which, why);
  return why == nullptr;
}

}  // namespace sm90

template <typename T, int D>
bool attention_bwd_sm90_available() {
  static std::atomic<int> verdict[sm90::kMaxDevices];
  const void* kernel = reinterpret_cast<const void*>(&sm90::attention_bwd_sm90_kernel<T, sm90::BwdSm90Traits<T, D>>);
  return sm90::sm90a_body_runnable(kernel, verdict);
}

namespace sm90 {

template <typename T, typename Tr>
bool launch_bwd_config(const AttentionBwdParams& p, int max_seqlen_q, int max_seqlen_k, cudaStream_t stream,
                       const KernelOptions& opt) {
  if (p.batch == 0 || p.heads_q == 0) return true;
  const int64_t num_k_tiles = (int64_t(max_seqlen_k) + Tr::BN - 1) / Tr::BN;
  // (one-dimensional grid; the mma.sync backward, which takes over, checks its own limits and says so)
  const int64_t ctas = bwd_grid_ctas(p.batch, p.heads_kv, num_k_tiles, opt.sm90_bwd_mode_order);
  if (ctas > INT32_MAX) return false;
  BwdTmaMaps maps;
  std::memset(&maps, 0, sizeof(maps));
  if (max_seqlen_k > 0 && !build_bwd_tma_maps<T, Tr>(p, maps, opt.sm90_verbose)) return false;

  launch_attention_bwd_preprocess<T, Tr::D>(p, max_seqlen_q, stream);
  // The main kernel runs even without queries: it is what writes the (zero) dK, dV.
  if (max_seqlen_k > 0) {
    auto kernel = attention_bwd_sm90_kernel<T, Tr>;
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Tr::SMEM_BYTES));
    const unsigned grid = static_cast<unsigned>(ctas);
    AttentionBwdParams pk = p;
    pk.sm90_bwd_unmasked = opt.sm90_bwd_unmasked ? 1 : 0;
    pk.sm90_bwd_mode_order = opt.sm90_bwd_mode_order ? 1 : 0;
    kernel<<<grid, Tr::NTHREADS, Tr::SMEM_BYTES, stream>>>(pk, maps, static_cast<int>(num_k_tiles));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return true;
}

}  // namespace sm90

template <typename T, int D>
bool launch_attention_bwd_sm90(const AttentionBwdParams& p, int max_seqlen_q, int max_seqlen_k, cudaStream_t stream,
                               const KernelOptions& opt) {
  if (p.dq_sem != nullptr)  // deterministic dQ (attention_fused_cuda.cu allocates the counters)
    return sm90::launch_bwd_config<T, sm90::BwdSm90Traits<T, D, false, false, true>>(p, max_seqlen_q, max_seqlen_k,
                                                                                    stream, opt);
#if defined(ELASTIC_EXPERIMENTS)
  // the early-release experiment (kernel_options.h; read_env rejects it in other builds)
  if (opt.sm90_bwd_early_release) {
    if (opt.sm90_bwd_dq_tma)
      return sm90::launch_bwd_config<T, sm90::BwdSm90Traits<T, D, true, true>>(p, max_seqlen_q, max_seqlen_k, stream,
                                                                               opt);
    return sm90::launch_bwd_config<T, sm90::BwdSm90Traits<T, D, false, true>>(p, max_seqlen_q, max_seqlen_k, stream,
                                                                              opt);
  }
#endif
  if (opt.sm90_bwd_dq_tma && opt.sm90_bwd_overlap == 2)
    return sm90::launch_bwd_config<T, sm90::BwdSm90Traits<T, D, true, false, false, true, true>>(
        p, max_seqlen_q, max_seqlen_k, stream, opt);
  if (opt.sm90_bwd_dq_tma && opt.sm90_bwd_overlap == 1)
    return sm90::launch_bwd_config<T, sm90::BwdSm90Traits<T, D, true, false, false, true>>(p, max_seqlen_q,
                                                                                          max_seqlen_k, stream, opt);
  if (opt.sm90_bwd_dq_tma && opt.sm90_bwd_lean && opt.sm90_bwd_banks)
    return sm90::launch_bwd_config<T, sm90::BwdSm90Traits<T, D, true, false, false, false, false, true, true>>(
        p, max_seqlen_q, max_seqlen_k, stream, opt);
  if (opt.sm90_bwd_dq_tma && opt.sm90_bwd_lean)
    return sm90::launch_bwd_config<T, sm90::BwdSm90Traits<T, D, true, false, false, false, false, true>>(
        p, max_seqlen_q, max_seqlen_k, stream, opt);
  if (opt.sm90_bwd_dq_tma)
    return sm90::launch_bwd_config<T, sm90::BwdSm90Traits<T, D, true>>(p, max_seqlen_q, max_seqlen_k, stream, opt);
  return sm90::launch_bwd_config<T, sm90::BwdSm90Traits<T, D>>(p, max_seqlen_q, max_seqlen_k, stream, opt);
}

}  // namespace elastic
