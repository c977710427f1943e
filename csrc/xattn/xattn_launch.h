// Host-side entry points of the XAttention estimate kernels (defined in xattn_launch.cu).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "xattn/xattn_params.h"

namespace elastic {

// CTAs of kernel 1 along its row-tile axis for `rows` (query head, query group) rows per KV head.
int xattn_row_tiles(int64_t rows);
// Dynamic shared memory of kernel 2 for mask rows of at most max_len causal blocks out of num_blocks.
int64_t xattn_select_smem_bytes(int64_t max_len, int64_t num_blocks);
// Which body runs kernel 1 (KernelOptions::xattn_sm90, xattn_sm90_wide): the wgmma ones run where the build and
// the device have them, else the mma.sync one.
enum class XattnScores { kMmaSync, kWgmma, kWgmmaWide };

// Kernel 1 (scores and row/block statistics, skipped when row_tiles is 0) then kernel 2 (masses, selection,
// mask rows r0 .. r1 - 1) for the chunk [p.r0, p.r1).
void launch_xattn_chunk(const XattnParams& p, bool bf16, int head_dim, int row_tiles, XattnScores scores,
                        cudaStream_t stream);

}  // namespace elastic
