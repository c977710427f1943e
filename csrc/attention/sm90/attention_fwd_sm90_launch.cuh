// Launch template of the Hopper forward kernel (instantiated in attention_fwd_sm90_hdim*.cu), the check that
// the loaded binary of the current device really holds its sm_90a body, and the tensor maps of its TMA
// producer.
#pragma once
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdio>
#include <cstring>
#include <type_traits>

#include "attention/attention_launch.h"
#include "attention/sm90/sm90a_available.h"
#include "attention/sm90/attention_fwd_sm90_kernel.cuh"

namespace elastic {
namespace sm90 {

// K/V ring depth: head_dim 128 holds Q 32 KiB + 3 x (K + V) 64 KiB = 224 KiB (2 stages: an A/B-timing
// experiment, sm90/experiments/, built with ELASTIC_BUILD_EXPERIMENTS=1); head_dim 64 holds Q 16 KiB + 3 x 32 KiB.
template <typename T, int D, int STAGES = 3, bool BLOCK_MASK = false, bool SLOT_TILES = false>
using FwdSm90Config = FwdSm90Traits<T, D, STAGES, BLOCK_MASK, SLOT_TILES>;

// Tensor maps of q, k and v with 128-row boxes (dense [B, S, H, D]; varlen [1, tokens, H, D]); false when one
// of them cannot be built (the kernel then copies with cp.async); verbose: say why on stderr.
template <typename T, int D>
bool build_tma_maps(const AttentionFwdParams& p, TmaMaps& maps, bool verbose) {
  constexpr bool bf16 = std::is_same<T, __nv_bfloat16>::value;
  const bool varlen = p.cu_seqlens_q != nullptr;
  const int64_t batch = varlen ? 1 : p.batch;
  const char* why = sm90_host::encode_rows_map(&maps.q, p.q, bf16, D, p.rows_q, p.heads_q, batch, p.q_stride_r,
                                               p.q_stride_h, p.q_stride_b, 128);
  const char* which = "q";
  if (why == nullptr) {
    which = "k";
    why = sm90_host::encode_rows_map(&maps.k, p.k, bf16, D, p.rows_k, p.heads_kv, batch, p.k_stride_r, p.k_stride_h,
                                     p.k_stride_b, 128);
  }
  if (why == nullptr) {
    which = "v";
    why = sm90_host::encode_rows_map(&maps.v, p.v, bf16, D, p.rows_k, p.heads_kv, batch, p.v_stride_r, p.v_stride_h,
                                     p.v_stride_b, 128);
  }
  if (why != nullptr && verbose)
    std::fprintf(stderr, "elastic sm90: no tensor map for %s (%s): cp.async producer\n", which, why);
  return why == nullptr;
}

// KV heads per work-order chunk (item_coord): as many as keep their K and V (all batches) within half the L2, the
// other half left to the Q / O streams and the mask; at least one.
inline int l2_kv_chunk(const AttentionFwdParams& p, int head_dim, int dev) {
  int l2 = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, dev));
  const int64_t kv_bytes = int64_t(p.batch) * std::max(p.seqlen_k, 1) * head_dim * 2 /* bytes */ * 2 /* K, V */;
  return static_cast<int>(std::clamp<int64_t>(int64_t(l2) / 2 / kv_bytes, 1, std::max(p.heads_kv, 1)));
}

// The tuning switches of opt (kernel_options.h) become the launch's grid, work order and kernel flags.
template <typename T, typename Tr>
void launch_config(const AttentionFwdParams& p_in, int num_q_tiles_max, cudaStream_t stream,
                   unsigned long long* counter, const KernelOptions& opt) {
  static_assert(Tr::BM == kFwdBlockM, "host grid uses kFwdBlockM");
  static_assert(Tr::BN == kSm90BlockN, "host sends BLOCK masks here by kSm90BlockN");
  // ELASTIC_SM90_PV_WAIT_FIRST: the instances with FlashAttention-4's key-loop order (fwd_consumer), the O rescale
  // lazy or (ELASTIC_SM90_LAZY_RESCALE=0) branch-free; SLOT_TILES instances exist in the default order only
  auto kernel = attention_fwd_sm90_kernel<T, Tr>;
  if constexpr (!Tr::SLOT_TILES) {
    if (opt.sm90_pv_wait_first)
      kernel = opt.sm90_lazy_rescale ? attention_fwd_sm90_kernel<T, Tr, kLoopPvFirst>
                                     : attention_fwd_sm90_kernel<T, Tr, kLoopPvFirstEager>;
  }
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Tr::SMEM_BYTES));
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  AttentionFwdParams p = p_in;
  p.sched_kv_chunk = opt.sm90_l2_order ? l2_kv_chunk(p, Tr::D, dev) : 0;
  const int64_t num_items = int64_t(num_q_tiles_max) * p.heads_q * p.batch;
  int64_t grid = std::min<int64_t>(num_items, INT_MAX);  // CTAs stride over the items: any count is covered
  if (opt.sm90_persistent) {
    int sms = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
    grid = std::min<int64_t>(grid, std::max(sms, 1));  // one CTA per SM (shared memory allows no second)
  }
  TmaMaps maps;
  std::memset(&maps, 0, sizeof(maps));
  unsigned flags = 0;
  if (opt.sm90_pingpong) flags |= kFlagPingPong;
  if (opt.sm90_proxy_fence) flags |= kFlagProxyFence;
  if (opt.sm90_tma && build_tma_maps<T, Tr::D>(p, maps, opt.sm90_verbose)) flags |= kFlagTma;
  if (opt.sm90_dynamic && counter != nullptr) flags |= kFlagDynamic;
  if (opt.sm90_lazy_rescale) flags |= kFlagLazyRescale;
  if (opt.sm90_exact_alpha) flags |= kFlagExactAlpha;
  if (opt.sm90_max_slack) flags |= kFlagMaxSlack;
  if (opt.sm90_walk_cached) flags |= kFlagWalkCached;
  kernel<<<static_cast<unsigned>(grid), Tr::NTHREADS, Tr::SMEM_BYTES, stream>>>(p, maps, num_q_tiles_max, num_items,
                                                                                 flags, counter);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace sm90

template <typename T, int D>
bool attention_fwd_sm90_available() {
  static std::atomic<int> verdict[sm90::kMaxDevices];
  const void* kernel = reinterpret_cast<const void*>(&sm90::attention_fwd_sm90_kernel<T, sm90::FwdSm90Config<T, D>>);
  return sm90::sm90a_body_runnable(kernel, verdict);
}

// counter: a zeroed device word for the dynamic item hand-out (nullptr: fixed stride).
template <typename T, int D>
void launch_attention_fwd_sm90(const AttentionFwdParams& p, int num_q_tiles_max, cudaStream_t stream,
                               unsigned long long* counter, const KernelOptions& opt) {
  if (num_q_tiles_max <= 0 || p.batch == 0 || p.heads_q == 0) return;
#if defined(ELASTIC_EXPERIMENTS)
  if constexpr (D == 128) {  // the 2-stage instance (sm90/experiments/attention_fwd_sm90_hdim128_s2.cu)
    if (opt.sm90_stages == 2) {
      sm90::launch_config<T, sm90::FwdSm90Config<T, D, 2>>(p, num_q_tiles_max, stream, counter, opt);
      return;
    }
  }
#endif
  // Without the experiments, kernel_options() never yields sm90_stages == 2 (it rejects ELASTIC_SM90_STAGES=2).
  // Key tiles handed to the consumers by the producer (FwdSm90Traits::SLOT_TILES): launches with a block mask, or
  // every launch (ELASTIC_SM90_SLOT_TILES=1 / 2), in the default key-loop order (kernel_options.h).
  const bool slot_tiles = !opt.sm90_pv_wait_first &&
                          (opt.sm90_slot_tiles == 2 || (opt.sm90_slot_tiles == 1 && p.block_mask != nullptr));
  if (p.block_mask != nullptr) {
    if (slot_tiles)
      sm90::launch_config<T, sm90::FwdSm90Config<T, D, 3, true, true>>(p, num_q_tiles_max, stream, counter, opt);
    else
      sm90::launch_config<T, sm90::FwdSm90Config<T, D, 3, true>>(p, num_q_tiles_max, stream, counter, opt);
  } else {
    if (slot_tiles)
      sm90::launch_config<T, sm90::FwdSm90Config<T, D, 3, false, true>>(p, num_q_tiles_max, stream, counter, opt);
    else
      sm90::launch_config<T, sm90::FwdSm90Config<T, D>>(p, num_q_tiles_max, stream, counter, opt);
  }
}

}  // namespace elastic
