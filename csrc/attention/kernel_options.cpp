// Reading the tuning options (kernel_options.h) from the environment, once, and the
// torch.ops.elastic.reload_kernel_options operator (schema in csrc/ops.cpp) that reads them again.
// Plain host code, built into CPU-only builds too (there the options are read but no kernel uses them).
#include "attention/kernel_options.h"

#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <mutex>
#include <optional>

#include "attention/check_msg.h"

namespace elastic {
namespace {

// nullptr when the variable is unset or empty (the default applies).
const char* env_value(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr && v[0] != '\0' ? v : nullptr;
}

bool env_bool(const char* name, bool fallback) {
  const char* v = env_value(name);
  if (v == nullptr) return fallback;
  ELASTIC_CHECK(std::strcmp(v, "0") == 0 || std::strcmp(v, "1") == 0, "elastic: environment variable ", name,
                " must be 0 or 1 (A/B timing switch, kernel_options.h), got \"", v, "\"");
  return v[0] == '1';
}

KernelOptions read_env() {
  KernelOptions o;
  o.sm90 = env_bool("ELASTIC_CUDA_SM90", o.sm90);
  o.sm90_bwd = env_bool("ELASTIC_CUDA_SM90_BWD", o.sm90_bwd);
  o.sm90_bwd_dq_tma = env_bool("ELASTIC_SM90_BWD_DQ_TMA", o.sm90_bwd_dq_tma);
  o.sm90_bwd_unmasked = env_bool("ELASTIC_SM90_BWD_UNMASKED", o.sm90_bwd_unmasked);
  if (const char* v = env_value("ELASTIC_SM90_BWD_OVERLAP")) {
    ELASTIC_CHECK((v[0] == '0' || v[0] == '1' || v[0] == '2') && v[1] == '\0',
                  "elastic: environment variable ELASTIC_SM90_BWD_OVERLAP must be 0, 1 or 2, got \"", v, "\"");
    o.sm90_bwd_overlap = v[0] - '0';
  }
  o.sm90_bwd_lean = env_bool("ELASTIC_SM90_BWD_LEAN", o.sm90_bwd_lean);
  o.sm90_bwd_banks = env_bool("ELASTIC_SM90_BWD_BANKS", o.sm90_bwd_banks);
  o.sm90_bwd_mode_order = env_bool("ELASTIC_SM90_BWD_MODE_ORDER", o.sm90_bwd_mode_order);
  o.sm90_bwd_early_release = env_bool("ELASTIC_SM90_BWD_EARLY_RELEASE", o.sm90_bwd_early_release);
  ELASTIC_CHECK(!o.sm90_bwd_early_release || kExperimentsBuilt,
                "elastic: ELASTIC_SM90_BWD_EARLY_RELEASE=1 selects a Hopper backward instance that is an A/B-timing ",
                "experiment this build does not contain; rebuild with ELASTIC_BUILD_EXPERIMENTS=1");
  if (const char* v = env_value("ELASTIC_SM90_STAGES")) {
    ELASTIC_CHECK(std::strcmp(v, "2") == 0 || std::strcmp(v, "3") == 0,
                  "elastic: environment variable ELASTIC_SM90_STAGES must be 2 or 3, got \"", v, "\"");
    o.sm90_stages = v[0] - '0';
    ELASTIC_CHECK(o.sm90_stages == 3 || kExperimentsBuilt,
                  "elastic: ELASTIC_SM90_STAGES=2 selects the 2-stage head_dim-128 Hopper instance, an A/B-timing ",
                  "experiment this build does not contain; rebuild with ELASTIC_BUILD_EXPERIMENTS=1");
  }
  o.sm90_tma = env_bool("ELASTIC_SM90_TMA", o.sm90_tma);
  o.sm90_pingpong = env_bool("ELASTIC_SM90_PINGPONG", o.sm90_pingpong);
  o.sm90_proxy_fence = env_bool("ELASTIC_SM90_PROXY_FENCE", o.sm90_proxy_fence);
  o.sm90_persistent = env_bool("ELASTIC_SM90_PERSISTENT", o.sm90_persistent);
  o.sm90_dynamic = env_bool("ELASTIC_SM90_DYNAMIC", o.sm90_dynamic);
  o.sm90_lazy_rescale = env_bool("ELASTIC_SM90_LAZY_RESCALE", o.sm90_lazy_rescale);
  o.sm90_exact_alpha = env_bool("ELASTIC_SM90_EXACT_ALPHA", o.sm90_exact_alpha);
  o.sm90_max_slack = env_bool("ELASTIC_SM90_MAX_SLACK", o.sm90_max_slack);
  o.sm90_walk_cached = env_bool("ELASTIC_SM90_WALK_CACHED", o.sm90_walk_cached);
  if (const char* v = env_value("ELASTIC_SM90_SLOT_TILES")) {
    ELASTIC_CHECK((v[0] == '0' || v[0] == '1' || v[0] == '2') && v[1] == '\0',
                  "elastic: environment variable ELASTIC_SM90_SLOT_TILES must be 0, 1 or 2, got \"", v, "\"");
    o.sm90_slot_tiles = v[0] - '0';
  }
  o.sm90_l2_order = env_bool("ELASTIC_SM90_L2_ORDER", o.sm90_l2_order);
  o.sm90_pv_wait_first = env_bool("ELASTIC_SM90_PV_WAIT_FIRST", o.sm90_pv_wait_first);
  o.sm90_verbose = env_bool("ELASTIC_SM90_VERBOSE", o.sm90_verbose);
  o.xattn_sm90 = env_bool("ELASTIC_XATTN_SM90", o.xattn_sm90);
  o.xattn_sm90_wide = env_bool("ELASTIC_XATTN_SM90_WIDE", o.xattn_sm90_wide);
  o.decode_mma = env_bool("ELASTIC_DECODE_MMA", o.decode_mma);
  o.decode_one_wave = env_bool("ELASTIC_DECODE_ONE_WAVE", o.decode_one_wave);
  if (const char* v = env_value("ELASTIC_DECODE_COPY")) {
    const bool zfill = std::strcmp(v, "zfill") == 0, plain = std::strcmp(v, "plain") == 0,
               tma = std::strcmp(v, "tma") == 0, pairs = std::strcmp(v, "pairs") == 0;
    ELASTIC_CHECK(zfill || plain || tma || pairs, "elastic: environment variable ELASTIC_DECODE_COPY must be zfill, ",
                  "plain, tma or pairs, got \"", v, "\"");
    o.decode_copy = zfill ? 0 : (plain ? 1 : (tma ? 2 : 3));
  }
  if (const char* v = env_value("ELASTIC_DECODE_FUSED_COMBINE")) {
    const bool off = std::strcmp(v, "0") == 0, serial = std::strcmp(v, "1") == 0, par = std::strcmp(v, "v2") == 0,
               keep = std::strcmp(v, "v2_keep") == 0;
    ELASTIC_CHECK(off || serial || par || keep, "elastic: environment variable ELASTIC_DECODE_FUSED_COMBINE must be 0, ",
                  "1, v2 or v2_keep, got \"", v, "\"");
    o.decode_fused_combine = off ? 0 : (serial ? 1 : (par ? 2 : 3));
  }
  if (const char* v = env_value("ELASTIC_DECODE_COMBINE")) {
    const bool v1 = std::strcmp(v, "v1") == 0, v2 = std::strcmp(v, "v2") == 0;
    ELASTIC_CHECK(v1 || v2, "elastic: environment variable ELASTIC_DECODE_COMBINE must be v1 or v2, got \"", v, "\"");
    o.decode_combine = v1 ? 1 : 2;
  }
  if (const char* v = env_value("ELASTIC_DECODE_PDL")) {
    const bool off = std::strcmp(v, "0") == 0, end = std::strcmp(v, "1") == 0, early = std::strcmp(v, "early") == 0;
    ELASTIC_CHECK(off || end || early, "elastic: environment variable ELASTIC_DECODE_PDL must be 0, 1 or early, got \"",
                  v, "\"");
    o.decode_pdl = off ? 0 : (end ? 1 : 2);
  }
  o.decode_late_q = env_bool("ELASTIC_DECODE_LATE_Q", o.decode_late_q);
  o.nonfinite_prepass = env_bool("ELASTIC_NONFINITE_PREPASS", o.nonfinite_prepass);
  o.train_mix_fused = env_bool("ELASTIC_TRAIN_MIX_FUSED", o.train_mix_fused);
  o.router_kernel = env_bool("ELASTIC_ROUTER_KERNEL", o.router_kernel);
  return o;
}

std::mutex g_mutex;
std::optional<KernelOptions> g_options;  // unset until the first successful read

std::string reload_kernel_options_op() { return describe(reload_kernel_options()); }
std::string kernel_options_op() { return describe(kernel_options()); }

}  // namespace

KernelOptions kernel_options() {
  std::lock_guard<std::mutex> lock(g_mutex);
  if (!g_options) g_options = read_env();  // a bad value throws and is read (and reported) again next call
  return *g_options;
}

KernelOptions reload_kernel_options() {
  KernelOptions o = read_env();
  std::lock_guard<std::mutex> lock(g_mutex);
  g_options = o;
  return o;
}

std::string describe(const KernelOptions& o) {
  auto b = [](bool x) { return x ? "1" : "0"; };
  return check_detail::msg("sm90=", b(o.sm90), " stages=", o.sm90_stages, " tma=", b(o.sm90_tma),
                           " pingpong=", b(o.sm90_pingpong), " proxy_fence=", b(o.sm90_proxy_fence),
                           " persistent=", b(o.sm90_persistent), " dynamic=", b(o.sm90_dynamic),
                           " lazy_rescale=", b(o.sm90_lazy_rescale), " exact_alpha=", b(o.sm90_exact_alpha),
                           " max_slack=", b(o.sm90_max_slack),
                           " walk_cached=", b(o.sm90_walk_cached), " slot_tiles=", o.sm90_slot_tiles,
                           " l2_order=", b(o.sm90_l2_order),
                           " verbose=", b(o.sm90_verbose),
                           " experiments_built=", b(kExperimentsBuilt), " sm90_bwd=", b(o.sm90_bwd),
                           " bwd_dq_tma=", b(o.sm90_bwd_dq_tma), " bwd_unmasked=", b(o.sm90_bwd_unmasked),
                           " bwd_early_release=", b(o.sm90_bwd_early_release), " bwd_overlap=", o.sm90_bwd_overlap,
                           " bwd_lean=", b(o.sm90_bwd_lean), " bwd_banks=", b(o.sm90_bwd_banks),
                           " bwd_mode_order=", b(o.sm90_bwd_mode_order),
                           " pv_wait_first=", b(o.sm90_pv_wait_first),
                           " xattn_sm90=", b(o.xattn_sm90), " xattn_sm90_wide=", b(o.xattn_sm90_wide),
                           " decode_mma=", b(o.decode_mma), " decode_one_wave=", b(o.decode_one_wave),
                           " decode_copy=",
                           (o.decode_copy == 0   ? "zfill"
                            : o.decode_copy == 1 ? "plain"
                            : o.decode_copy == 2 ? "tma"
                                                 : "pairs"),
                           " decode_fused_combine=", (o.decode_fused_combine == 0   ? "0"
                                                            : o.decode_fused_combine == 1 ? "1"
                                                            : o.decode_fused_combine == 2 ? "v2"
                                                                                          : "v2_keep"),
                           " decode_combine=", o.decode_combine == 2 ? "v2" : "v1",
                           " decode_pdl=", (o.decode_pdl == 0 ? "0" : o.decode_pdl == 1 ? "1" : "early"),
                           " decode_late_q=", b(o.decode_late_q),
                           " nonfinite_prepass=", b(o.nonfinite_prepass),
                           " train_mix_fused=", b(o.train_mix_fused), " router_kernel=", b(o.router_kernel));
}

// No tensor arguments: CompositeExplicitAutograd is also the kernel for an empty dispatch key set.
TORCH_LIBRARY_IMPL(elastic, CompositeExplicitAutograd, m) {
  m.impl("reload_kernel_options", &reload_kernel_options_op);
  m.impl("kernel_options", &kernel_options_op);
}

}  // namespace elastic
