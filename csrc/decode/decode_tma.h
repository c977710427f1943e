// TMA tensor maps of the tensor-core decode kernel's K/V pools (ELASTIC_DECODE_COPY=tma, kernel_options.h).
//
// Each pool [pairs, tokens, D] is one 4-D map (D, tokens, 1, pairs) with a box of 64 columns x 64 rows, 128-byte
// swizzled (chunk c of row r of a box at c ^ (r % 8)): one box is one 128-byte column half of a 64-key tile, which
// is the shared-memory layout decode_mma_kernel.cuh's ldmatrix addressing reads when kTma (mma_smem_offset).
// Passed by value (__grid_constant__) beside DecodeParams; an empty pool gets a zeroed map that no tile uses.
#pragma once
#include <cuda.h>

namespace elastic {

struct DecodeMaps {
  CUtensorMap full_k, full_v, stream_k, stream_v;
};

// Encodes the four maps of p's pools (16-bit elements, D 64 or 128). False when the driver or a pool cannot be
// mapped (the launch then uses the cp.async kernel); `why` says which.
struct DecodeParams;
bool encode_decode_maps(const DecodeParams& p, bool bf16, int head_dim, DecodeMaps& maps, const char** why);

}  // namespace elastic
