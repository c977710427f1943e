// Programmatic dependent launch (PDL, sm_90+) of the decode combine kernel (ELASTIC_DECODE_PDL, kernel_options.h).
//
// With the launch attribute (decode_launch.cu), the combine grid may be scheduled once every CTA of the split grid
// has executed signal_dependents (or exited); its CTAs then block in wait_for_prior_grid until the split grid has
// completed and its writes are visible. What it saves is the combine's launch latency and the gap between the two
// kernels, which sit on the critical path of a short (batch 1) call. Without the attribute, or below sm_90, both are
// no-ops (griddepcontrol.wait returns at once when the prior grid completed before this one launched).
//
// Where the split kernel signals (template parameter kTrigger of decode_mma_kernel): round 2 signalled as the
// first instruction of every split CTA (SASS: PREEXIT at the top). Its split kernel then ran 10-30% slower at batch
// 8 with plain copies (32K B8 every head FULL 0.3546 vs round 1's 0.2676 ms) although its copy instructions were
// round 1's, and ELASTIC_DECODE_PDL=0 did not bring it back: that setting dropped the launch attribute but kept the
// early PREEXIT in the split kernel, so the signal itself was never isolated. Here the default split instance has
// no signal at all (its SASS is round 1's), PDL=1 signals as the last instruction of each CTA (after its output
// stores: the combine's CTAs are scheduled only once every split CTA has done its work, so they cannot hold SM
// slots, registers or shared memory beside split CTAs that still stream K/V), and
// PDL=early reproduces round 2's placement so that one A/B run can tell whether the early signal was the cause.
#pragma once

namespace elastic {
namespace decode {

// Where a split kernel instance executes griddepcontrol.launch_dependents.
enum PdlTrigger : int { kTriggerNone = 0, kTriggerEnd = 1, kTriggerStart = 2 };

__device__ __forceinline__ void signal_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void wait_for_prior_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

}  // namespace decode
}  // namespace elastic
