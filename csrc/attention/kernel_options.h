// Tuning options of the CUDA attention forward and backward: one struct, the one home of these switches.
//
// The defaults are the product. The environment variables below exist only for A/B timing and tests: the
// extension reads them once per process (at the first CUDA attention call, or when
// torch.ops.elastic.reload_kernel_options() is called), never in the launch path. Each call copies the options
// in effect into AttentionArgs::options (attention_cuda.h) and passes them down to the launches.
//
//   ELASTIC_CUDA_SM90=0          the mma.sync (sm80) forward on Hopper too
//   ELASTIC_CUDA_SM90_BWD=0      the mma.sync (sm80) backward on Hopper too
//   ELASTIC_SM90_BWD_DQ_TMA=0    Hopper backward: dQ by vector atomics from registers (3 Q/dO stages) instead of TMA
//                                reduce-add of shared-memory tiles (2 stages)
//   ELASTIC_SM90_BWD_UNMASKED=0  Hopper backward: fully visible tiles run the masked stage too (bit tests and selects
//                                per entry) instead of its unmasked instance
//   ELASTIC_SM90_BWD_OVERLAP=1   Hopper backward (TMA dQ): FlashAttention-4's stage order (dS by stmatrix, dQ's MMA
//                                before dK's, dQ staged and reduce-added per warp while dK runs); =2 also leaves
//                                each stage's dK MMA running into the next stage (3 Q/dO stages); untimed A/B
//   ELASTIC_SM90_BWD_LEAN=0      Hopper backward (TMA dQ, default stage order): the plain stage tail instead of the
//                                lean one (lean: dS^T stored by stmatrix, the dQ staging addressed by XOR of one base
//                                and double-buffered (one named barrier less), the ring unrolled over its 2 slots
//                                (descriptors = base + constants), lse / delta read by LDS.128); same results (dK, dV
//                                bit-equal)
//   ELASTIC_SM90_BWD_BANKS=0     Hopper backward (lean tail): lse / delta rows unpadded and the dQ staging's column
//                                blocks in lane order, i.e. with the shared-memory bank conflicts of the first lean
//                                tail (BANKS=1, the default, has none); same bits
//   ELASTIC_SM90_BWD_MODE_ORDER=0  Hopper backward: CTAs handed out key tile by key tile for every pair instead of
//                                by mode (short-window STREAM pairs last, pair by pair; attention_bwd_sm90_order.cuh)
//   ELASTIC_SM90_STAGES=2        2 K/V stages at head_dim 128 instead of 3 (only in ELASTIC_BUILD_EXPERIMENTS=1 builds)
//   ELASTIC_SM90_BWD_EARLY_RELEASE=1  Hopper backward: a stage's Q/dO slot goes back to the producer once dV and dK
//                                are done, while dQ's MMA still runs (untimed experiment; only in
//                                ELASTIC_BUILD_EXPERIMENTS=1 builds)
//   ELASTIC_SM90_TMA=0           the cp.async producer instead of TMA
//   ELASTIC_SM90_PINGPONG=0      the two consumer warpgroups issue freely (no ping-pong)
//   ELASTIC_SM90_PROXY_FENCE=0   no generic-to-async proxy fence after each K/V wait (cp.async producer)
//   ELASTIC_SM90_PERSISTENT=0    one CTA per work item instead of one per SM
//   ELASTIC_SM90_DYNAMIC=0       work items walked with a fixed stride instead of taken from a global counter
//   ELASTIC_SM90_LAZY_RESCALE=0  O rescaled after every key tile
//   ELASTIC_SM90_EXACT_ALPHA=0   the rescale factor alpha of a row whose max did not move is exp2 of a rounding error
//                                (often not exactly 1), as before 2026-12-02, so the lazy O rescale fires ~every tile
//   ELASTIC_SM90_MAX_SLACK=0     a row's max (and O's scale) moves whenever a key tile exceeds it, instead of keeping it
//                                until a tile exceeds it by more than 8 in log2 units (P <= 256; FlashAttention-4's rule)
//   ELASTIC_SM90_WALK_CACHED=0   BLOCK heads, sm90 consumers: the query tile's mask row and mask column recomputed per
//                                key tile (integer divisions by the block size) instead of taken from the walker
//   ELASTIC_SM90_PV_WAIT_FIRST=1  Hopper forward key loop in FlashAttention-4's order: the softmax's max phase beside
//                                P V(n-1), then its wait, then exp2 with the P packing between the MUFU.EX2
//                                (fwd_consumer in sm90/attention_fwd_sm90_kernel.cuh); with ELASTIC_SM90_LAZY_RESCALE=0
//                                the O rescale there too, branch-free (its own instance); untimed when written
//   ELASTIC_SM90_L2_ORDER=0      every head's work items handed out together instead of in L2-sized chunks of KV
//                                heads (item_coord in sm90/attention_fwd_sm90_pipeline.cuh)
//   ELASTIC_SM90_VERBOSE=1       say on stderr why a TMA tensor map was not built
//   ELASTIC_XATTN_SM90=0         XAttention estimate (csrc/xattn/): kernel 1 (scores, block partials) on mma.sync on
//                                Hopper too, instead of its wgmma body (xattn_scores_sm90_kernel.cuh)
//   ELASTIC_XATTN_SM90_WIDE=0    ... and the wgmma body one key tile per step instead of two (the narrow instance)
//   ELASTIC_DECODE_MMA=0         decode steps of one query run the FMA decode kernel instead of the tensor-core
//                                one (csrc/decode/decode_mma_kernel.cuh)
//   ELASTIC_DECODE_ONE_WAVE=0    decode work plan of round 1: one chunk length total / target for every pair (up to
//                                target + pairs items, i.e. a partial second wave) and chunk-long items, the last
//                                one of a pair shorter (plan_item in csrc/decode/decode_kernel.cuh)
//   ELASTIC_DECODE_COPY=zfill    tensor-core decode kernel: how K/V tiles reach shared memory. plain (default): full
//                                tiles by plain 16-byte cp.async with the .L2::256B prefetch hint (zero-fill only on
//                                an item's last, partial tile); zfill: 16-byte cp.async with the src-size (zero-fill)
//                                operand on every copy (before 2026-12-02); tma: TMA boxes (128-byte swizzle) completing on one
//                                mbarrier per stage for full tiles of contiguous pool rows, cp.async for the rest
//                                (sm_90 devices; elsewhere, or if a map cannot be encoded, zfill); pairs: diagnostic,
//                                zfill copies into a shared layout that keeps each 32-byte sector's halves together
//                                (2-way ldmatrix bank conflicts; decode_mma_kernel.cuh mma_smem_offset)
//   ELASTIC_DECODE_FUSED_COMBINE=1  tensor-core decode kernel: the last CTA of each split pair merges the pair's
//                                partials (an atomic ticket per pair) instead of a second, combine launch (measured
//                                slower in every case on the H200, up to 1.86x at 32K B1 with 6/8 heads STREAM)
//   ELASTIC_DECODE_FUSED_COMBINE=v2  the same one launch, but the last CTA of a split pair merges the partials with
//                                all its threads at once (every item's lse in one load per thread, per-row max / sum
//                                by warps, float4 partial reads with 8 in flight per thread; release / acquire ticket
//                                by one atomic after a barrier; csrc/decode/decode_fused_merge.cuh). Why the first
//                                fused combine lost: its merge walked the items serially per output element (two
//                                chains of ~33-100 dependent L2 loads per thread, 4 elements per thread) on the
//                                critical path of the call's last CTA
//   ELASTIC_DECODE_FUSED_COMBINE=v2_keep  diagnostic: v2 without the per-call memset of the tickets (a per-device ticket
//                                buffer zeroed once and left at 0 by each call's last CTAs; not safe for decode calls
//                                running concurrently on several streams; decode_api.cpp kept_tickets)
//   ELASTIC_DECODE_COMBINE=v1    decode: round 1's combine kernel (each thread walks the items' lse one after
//                                another) instead of round 2's latency-light one (v2, the default: csrc/decode/
//                                decode_combine_v2.cuh, lse of all items loaded at once with a block max / sum, float4
//                                partial reads, 8 loads in flight)
//   ELASTIC_DECODE_PDL=1         decode: the combine as a programmatic dependent launch (sm_90+; elsewhere ignored),
//                                the split kernel (tensor-core, cp.async copies) signalling it as each CTA's last
//                                instruction; PDL=early: diagnostic, the signal as the split CTA's first instruction,
//                                as in round 2 (whose split kernel ran 10-30% slower at batch 8; decode_pdl.cuh)
//   ELASTIC_DECODE_LATE_Q=1      tensor-core decode kernel: Q's fragments loaded after the pipeline prologue's K/V
//                                copies are issued (default: before; the SASS packs Q's halves right after its loads,
//                                so the first LDGSTS waits one memory round trip; decode_mma_kernel.cuh kLateQ)
//   ELASTIC_TRAIN_MIX_FUSED=0    the training mix (elastic::train_mix, elastic_cuda/ops/_train_mix.py) computes its output mix,
//                                dz and the branch-gradient sums with torch elementwise ops (weighted dO per branch)
//                                instead of the fused train_mix_combine / train_mix_dz kernels (csrc/train_mix/)
//   ELASTIC_ROUTER_KERNEL=0      elastic::router_decision on CUDA runs the eager router's kernels (boundary pool, addmm,
//                                silu, ...: its bits, ~14 launches) instead of its one fused kernel
//                                (csrc/router/router_decision_cuda.cu: the same decisions away from near-ties)
//   ELASTIC_NONFINITE_PREPASS=0  skip the non-finite K / V prepass (nonfinite.cuh): times the forward without it;
//                                the non-finite rule then fails for non-finite K / V rows (timing only)
// Unset or empty means the default; any other value than those listed (0 / 1, STAGES 2 / 3, COPY zfill / plain /
// tma / pairs, COMBINE v1 / v2, FUSED_COMBINE 0 / 1 / v2 / v2_keep, PDL 0 / 1 / early) is an error naming
// the variable, so that a typo never times the wrong kernel.
#pragma once
#include <string>

namespace elastic {

struct KernelOptions {
  bool sm90 = true;               // Hopper wgmma forward where it applies (attention_fused_cuda.cu)
  bool sm90_bwd = true;           // Hopper wgmma backward where it applies (attention_fused_cuda.cu)
  // dQ by TMA reduce-add (the default) vs red.global.add.v2.f32 from registers. H200, Llama shape (Hq 32, Hkv 8,
  // D 128, bf16, B 1), backward alone, atomics -> TMA: 8K dense 3.72 -> 3.39 ms, 8K 6/8 STREAM 2.42 -> 2.17,
  // 32K dense 59.12 -> 49.60, 32K 6/8 STREAM 22.68 -> 20.52 (fwd+bwd 32K dense 71.68 -> 62.73 ms; 8K dense
  // fwd+bwd 4.78 vs 4.82, within noise): the gain grows with the length. The reduce-add sends each 64 x 64 fp32
  // tile as one bulk copy instead of 2048 vector atomics, at the price of one Q/dO stage (2 instead of 3).
  bool sm90_bwd_dq_tma = true;
  // Hopper backward: fully visible (query tile x key tile) stages run an instance without visibility bits and
  // selects (553 instead of 757 SASS instructions per warp and stage, bf16 D128); untimed when written.
  bool sm90_bwd_unmasked = true;
  // Hopper backward with TMA dQ: the overlapped stage order (BwdSm90Traits::OVERLAP); untimed when written.
  // A/B on the H200 (experiments/time_bwd_det.py, 3 interleaved rounds, results/attention/2026-12-02_h200_bwd_overlap/),
  // backward ms default | 1 | 2: 8K dense 3.20 | 3.16 | 3.20, 32K dense 47.05 | 47.05 | 47.43, 32K 6/8 STREAM 19.40 |
  // 19.04 | 19.41: no gain beyond the spread, so 0 stays.
  int sm90_bwd_overlap = 0;  // 0, 1 (overlapped order) or 2 (and dK deferred into the next stage)
  // Hopper backward with TMA dQ and the default order: the lean stage tail (BwdSm90Traits::LEAN; same shared-memory
  // bytes, so the same results): static SASS of the bf16 D128 unmasked stage per warp 556 -> 468 / 417 (ring slot
  // 0 / 1; benchmarks/NOTES.md "The lean stage tail"). Default since the A/B on the H200 (experiments/time_bwd_det.py,
  // 3 interleaved rounds, backward ms plain -> lean): 8K dense 3.07 -> 3.03, 32K dense 46.36 -> 43.94 (-5.2%), 32K 6/8
  // STREAM 18.50 -> 17.66 (-4.5%); memcheck clean (tests/gpu_sanitize.py runs the plain tail too).
  bool sm90_bwd_lean = true;
  // Hopper backward, lean tail: its lse / delta loads and dQ staging stores without shared-memory bank conflicts
  // (BwdSm90Traits::BANKS: 16% of the lean tail's 6.8G wavefronts were excess under ncu at 32K dense, 0.2% after).
  // H200, Llama shape, B 1, lean -> banks (experiments/time_bwd_det.py, 3 interleaved rounds, two runs,
  // results/attention/2026-12-03_h200_session11_bwd_banks/), fwd+bwd ms: 8K dense 3.92 -> 3.77 / 3.87 -> 3.76, 32K
  // dense 59.32 -> 58.26 / 59.84 -> 57.51, 32K 6/8 STREAM 21.70 -> 21.57 / 21.86 -> 21.06 (the backward alone at 32K
  // dense 45.87 -> 42.75 / 43.68 -> 43.30: 4 iterations, noisier); ncu 32K dense kernel 39.09 -> 36.88 ms, SM
  // throughput 57.6 -> 61.6%.
  bool sm90_bwd_banks = true;
  bool sm90_bwd_early_release = false;  // experiment (ELASTIC_BUILD_EXPERIMENTS=1 builds only)
  // Hopper backward work order by mode (attention_bwd_sm90_order.cuh says why). H200, Llama shape, B 1, backward
  // alone, key-tile order -> mode order (experiments/time_bwd_det.py, 3 interleaved rounds,
  // results/attention/2026-12-03_h200_session9_bwd_mode_order/): 6/8 STREAM 8K 1.96 -> 2.01 (spread), 32K 18.32 ->
  // 16.48, 128K 237.3 -> 200.0 ms; every head FULL and every head STREAM unchanged (the same or nearly the same order).
  bool sm90_bwd_mode_order = true;
  int sm90_stages = 3;            // K/V ring depth at head_dim 128
  bool sm90_tma = true;
  bool sm90_pingpong = true;
  bool sm90_proxy_fence = true;
  bool sm90_persistent = true;
  bool sm90_dynamic = true;
  bool sm90_lazy_rescale = true;
  // alpha exactly 1 for rows whose max stayed, so the lazy rescale really skips (it fired on ~every tile), and
  // FA4's slack rule on top: a row keeps its max while a tile exceeds it by <= 8 (log2), P <= 256 in fp32.
  // H200, Llama shape, bf16, B 1, medians of 3 interleaved rounds (experiments/time_sm90_softmax.py,
  // results/sm90_kernel/2026-12-02_h200_softmax/), ms before -> exact -> exact + slack: dense 8K 0.997 -> 0.988
  // -> 0.984, dense 32K 14.87 -> 14.58 -> 14.60, 6/8 STREAM 32K 5.45 -> 5.39 -> 5.32, all-BLOCK 32K 5.68 -> 5.63
  // -> 5.52 (1-3%, at the edge of the 1-2% spread, never slower).
  bool sm90_exact_alpha = true;
  bool sm90_max_slack = true;
  // BLOCK: the mask row computed once per item in the consumers (no divisions by the block size per tile):
  // all-BLOCK 32K 6.25 -> 5.63 ms (1.11x) in the same run; FULL / STREAM unchanged. Only where the consumers walk
  // (sm90_slot_tiles, below: 0, or 1 for launches without a mask); the SLOT_TILES producer walks with the cached row.
  bool sm90_walk_cached = true;
  // Key tiles of the Hopper forward handed to the consumers by the producer, one word beside each K slot
  // (FwdSm90Traits::SLOT_TILES says why), instead of each consumer warp walking them again: 0 never, 1 launches with
  // a block mask (BLOCK heads, whose walk reads the mask), 2 every launch. Default key-loop order only
  // (ELASTIC_SM90_PV_WAIT_FIRST=1 runs without). H200, Llama shape, bf16, B 1, medians of 3 interleaved rounds, ms
  // walk (0) -> slot tiles (2), outputs bit-equal (experiments/time_sm90_softmax.py ... slot, results/sm90_kernel/
  // 2026-12-03_h200_session10_slot_tiles/): all-BLOCK 32K 5.563 -> 4.868, 128K 82.46 -> 71.28 (1.14x / 1.16x; with
  // the producer still walking without the cached mask row, 1.08x: time_slot_producer_uncached.txt); dense 32K
  // 14.36 -> 14.15; in the first run dense 8K 0.993 -> 0.985, 128K 233.76 -> 232.93, 6/8 STREAM 32K 5.431 -> 5.400,
  // 128K 65.65 -> 65.35 (0.4-1.5%, every round of 128K faster; one 2-round run gave dense 32K 14.23 -> 14.64 with a
  // 14.88 round): so every launch.
  int sm90_slot_tiles = 2;
  bool sm90_l2_order = true;
  // Key loop order of the Hopper forward consumers: false = whole softmax beside P V(n-1), then rescale and P
  // packing after its wait (the proven path); true = FlashAttention-4's order (ELASTIC_SM90_PV_WAIT_FIRST).
  // A/B on the H200 (experiments/time_sm90_softmax.py ... order, 2 interleaved rounds, results/sm90_kernel/
  // 2026-12-02_h200_order/): pv_first 1.01x / 1.01x / 1.02x at dense 8K / 32K / 128K but 0.97x at all-BLOCK 32K;
  // the branch-free rescale form 1.04x / 1.01x / 1.00x and 0.98x: within the rounds' spread, so the proven order stays.
  bool sm90_pv_wait_first = false;
  bool sm90_verbose = false;
  // XAttention estimate, kernel 1 on Hopper: wgmma (two 64-row warpgroups, m64n128k16 from the swizzled cp.async
  // ring) instead of mma.sync; elsewhere (or in a build without a 9.0a pass) always mma.sync. H200, every head
  // BLOCK, Llama shape, mma.sync -> wgmma: 0.286 -> 0.153 / 1.476 -> 1.266 / 25.7 -> 19.25 ms at 8K / 32K / 128K
  // (results/sm90_kernel/2026-12-03_h200_session8_xattn_copies_under_mma/).
  bool xattn_sm90 = true;
  // ... in its wide instance (ELASTIC_XATTN_SM90_WIDE=0: the narrow one): two key tiles per step, so the CTA's private
  // A rows are streamed from HBM once per two key tiles (xattn_scores_sm90_kernel.cuh). H200, narrow -> wide, masks
  // bit-equal: every head BLOCK 0.154 -> 0.132 / 1.196 -> 1.065 / 18.73 -> 16.24 ms at 8K / 32K / 128K, 6 of 8 heads
  // BLOCK 0.144 -> 0.127 / 0.961 -> 0.829 / 14.11 -> 12.30 (1.12-1.17x; results/sm90_kernel/
  // 2026-12-03_h200_session9_xattn_wide/).
  bool xattn_sm90_wide = true;
  bool decode_mma = true;         // tensor-core decode kernel for one query per step (csrc/decode/)
  bool decode_one_wave = true;    // decode plan: at most target items when 2 x pairs <= target, even items per pair
  // Tensor-core decode K/V copies: 0 zfill cp.async, 1 plain cp.async + L2::256B (the default), 2 TMA, 3 pairs.
  // H200, bf16, Llama-3.1-8B shape, every head FULL, ms (% of 4.8 TB/s), zfill -> plain (-> tma):
  // 32K B1 0.0536 (52%) -> 0.0494 (57%); 32K B8 0.3264 (69%) -> 0.2676 (84%) (0.2667); 128K B1 0.1794 (62%) ->
  // 0.1483 (75%) (0.1472); 128K B8 1.2597 (71%) -> 1.0182 (88%) (1.0217) (results/decode/2026-12-02_h200_copy_
  // variants/). The zero-fill operand on every copy made ncu count 32 L2 sectors per 512 contiguous bytes.
  int decode_copy = 1;
  // Tensor-core decode, combine fused into the split kernel: 0 off (a combine launch), 1 the last CTA of a split pair
  // merges its partials one element per thread (combine_element: serial over the items; measured slower everywhere),
  // 2 ("v2") the last CTA merges them across all its threads (decode_fused_merge.cuh; untimed when written), 3
  // ("v2_keep") v2 with tickets kept zero across calls instead of a memset per call (diagnostic).
  int decode_fused_combine = 0;
  // Decode combine kernel: 1 round 1's, 2 round 2's latency-light one (the default). On round 1's split kernel, H200,
  // bf16, Llama-3.1-8B shape (experiments/time_decode_variants.py, results/decode/2026-12-02_h200_combine_v2/), ms
  // v1 -> v2: 32K B1 FULL 0.0485 -> 0.0427, 32K B1 6/8 STREAM 0.0413 -> 0.0221, 128K B1 FULL 0.1471 -> 0.1402,
  // 128K B1 6/8 STREAM 0.0691 -> 0.0472; batch 8 within +-0.5% (32K 0.2664 -> 0.2651, 128K 1.0096 -> 1.0115).
  int decode_combine = 2;
  // Decode combine as a programmatic dependent launch: 0 off (the default), 1 signalled at the end of each split CTA,
  // 2 ("early") at its start (round 2's placement). Same run: 1 and early within +-1% of 0 in every case (and early
  // not slower at batch 8, so round 2's batch-8 loss is not explained by it), so no PDL.
  int decode_pdl = 0;
  bool decode_late_q = false;  // tensor-core decode: Q loaded after the prologue's K/V copies (untimed when written)
  bool nonfinite_prepass = true;  // forward: flag non-finite K / V rows first (the non-finite rule needs it)
  // Training mix, CUDA fp16/bf16: the output mix, dz and dq/dk/dv as fused kernels (one read of each operand, no
  // fp32 temporaries; the branches' backward takes dO unweighted and the weights are applied when the two branches'
  // gradients are combined). Read by Python (elastic_cuda/ops/_train_mix.py _mix_fused) through kernel_options().
  bool train_mix_fused = true;
  // elastic::router_decision on CUDA: its one fused kernel (fp32 routers) instead of the eager decision's kernels.
  // Only reached with enable(..., fused_router=True), itself off by default until timed on a GPU.
  bool router_kernel = true;
};

// Is the A/B-timing experiment code (the 2-stage head_dim-128 sm90 instance, csrc/attention/sm90/experiments/)
// compiled in? setup.py / CMake define ELASTIC_EXPERIMENTS with ELASTIC_BUILD_EXPERIMENTS=1.
#if defined(ELASTIC_EXPERIMENTS)
constexpr bool kExperimentsBuilt = true;
#else
constexpr bool kExperimentsBuilt = false;
#endif

// The options in effect: read from the environment at the first call, then kept (thread-safe).
KernelOptions kernel_options();
// Read the environment again and keep the result (tests and A/B timing switch kernels within one process).
KernelOptions reload_kernel_options();
// "sm90=1 stages=3 tma=1 ..." (what reload_kernel_options reports to Python).
std::string describe(const KernelOptions& o);

}  // namespace elastic
