// mbarrier and tensor-memory-accelerator (TMA) primitives of the Hopper forward and backward kernels, and the host
// side that encodes their tensor maps.
//
// Device: mbarrier init / arrive / wait, the expect-tx arrive of a TMA transaction, the 4-D tiled TMA
// load (cp.async.bulk.tensor, plain sm_90) that completes on an mbarrier, and the 4-D tiled reduce-add (the
// backward's dQ).
// Host: cuTensorMapEncodeTiled reached through the runtime's driver entry point (no -lcuda link), and the
// map shapes of the kernels, chiefly: a [rows, 64-column] box of a [batch, rows, heads, D] (or varlen
// [1, tokens, heads, D]) 16-bit tensor, 128-byte swizzled, which is exactly the shared-memory layout the
// wgmma descriptors of the kernel read (128-byte rows, 16-byte chunks XOR-ed with row % 8).
#pragma once
#include <cuda.h>  // CUtensorMap and its enums only: the encode function comes from cudaGetDriverEntryPoint*
#include <cuda_runtime.h>

#include <cstdint>

namespace elastic {
namespace sm90 {

// The kernel's three tensor maps, passed by value as one __grid_constant__ parameter (CUtensorMap is
// 64-byte aligned; the TMA unit reads it from parameter space).
struct TmaMaps {
  CUtensorMap q, k, v;
};

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900

__device__ __forceinline__ void mbar_init(uint32_t bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint32_t bar, int parity) {
  uint32_t done;
  do {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
  } while (!done);
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("{\n.reg .b64 state;\nmbarrier.arrive.shared::cta.b64 state, [%0];\n}\n" ::"r"(bar) : "memory");
}
// Arrives and adds `bytes` to the transaction count the phase waits for (the TMA copies complete it).
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
// Arrives on the barrier when every cp.async this thread issued so far has landed (counted in the
// barrier's expected arrivals: .noinc).
__device__ __forceinline__ void mbar_arrive_on_cp_async(uint32_t bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared.b64 [%0];\n" ::"r"(bar) : "memory");
}
// Waits for every cp.async this thread issued, committed to a group or not.
__device__ __forceinline__ void cp_async_wait_all_issued() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }
// Orders this thread's generic-proxy shared-memory writes (cp.async, st.shared) before later async-proxy
// accesses (wgmma reads, TMA) that a barrier hands the buffer to.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

__device__ __forceinline__ void tma_prefetch_map(const CUtensorMap* map) {
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
}
// One box of a 4-D tiled map (coordinates innermost first, in elements) into shared memory at `dst`
// (1024-byte aligned for the 128-byte swizzle); completes `bytes` of the barrier's transaction count.
// Box elements outside the tensor are written as zeros (and still counted).
__device__ __forceinline__ void tma_load_4d(uint32_t dst, const CUtensorMap* map, uint32_t bar, int c0, int c1, int c2,
                                            int c3) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5}], "
      "[%6];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(bar)
      : "memory");
}

// Adds a 4-D box of fp32 from shared memory at `src` into global memory (the tensor's `map`; elements outside the
// tensor are dropped), as one bulk-async group of the issuing thread.
__device__ __forceinline__ void tma_reduce_add_4d(const CUtensorMap* map, uint32_t src, int c0, int c1, int c2,
                                                  int c3) {
  asm volatile(
      "cp.reduce.async.bulk.tensor.4d.global.shared::cta.add.tile.bulk_group [%0, {%2, %3, %4, %5}], [%1];\n" ::"l"(
          reinterpret_cast<uint64_t>(map)),
      "r"(src), "r"(c0), "r"(c1), "r"(c2), "r"(c3)
      : "memory");
}
__device__ __forceinline__ void bulk_commit_group() { asm volatile("cp.async.bulk.commit_group;\n" ::: "memory"); }
// Waits until the issuing thread's bulk groups have finished reading shared memory (the source may be rewritten).
__device__ __forceinline__ void bulk_wait_group_read0() {
  asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory");
}
// The same, leaving the newest N groups possibly still reading.
template <int N>
__device__ __forceinline__ void bulk_wait_group_read() {
  asm volatile("cp.async.bulk.wait_group.read %0;\n" ::"n"(N) : "memory");
}

#endif  // __CUDA_ARCH__ >= 900

}  // namespace sm90

// ---------------------------------------------------------------------------------------------- host
namespace sm90_host {

using EncodeTiledFn = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                   const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                   CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

// The driver's cuTensorMapEncodeTiled (ABI of CUDA 12.0), or nullptr when the driver has none.
inline EncodeTiledFn encode_tiled_fn() {
  static const EncodeTiledFn fn = []() -> EncodeTiledFn {
    void* ptr = nullptr;
    cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
    const cudaError_t err =
        cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &ptr, 12000, cudaEnableDefault, &found);
    if (err != cudaSuccess || found != cudaDriverEntryPointSuccess || ptr == nullptr) {
      (void)cudaGetLastError();
      return nullptr;
    }
    return reinterpret_cast<EncodeTiledFn>(ptr);
  }();
  return fn;
}

// Encodes the map of one [batch, rows, heads, D] tensor of `elem_bytes`-byte elements (element strides sb, sr, sh;
// D contiguous) with a box of box_cols columns x box_rows rows of one head, 128-byte swizzled in shared memory
// (box_cols * elem_bytes must be at most 128). TMA needs a 16-byte aligned base, byte strides that are positive
// multiples of 16 below 2^40, and extents in [1, 2^32]; a size-1 dimension's stride is never used, so any valid
// value stands in for it. Anything else: no map (the reason is returned; nullptr when built).
inline const char* encode_map_4d(CUtensorMap* map, const void* base, CUtensorMapDataType dtype, int elem_bytes,
                                 int64_t D, int64_t rows, int64_t heads, int64_t batch, int64_t sr, int64_t sh,
                                 int64_t sb, int box_cols, int box_rows) {
  const EncodeTiledFn encode = encode_tiled_fn();
  if (encode == nullptr) return "driver has no cuTensorMapEncodeTiled";
  if (base == nullptr || reinterpret_cast<uintptr_t>(base) % 16 != 0) return "base address not 16-byte aligned";
  const int64_t ext[3] = {rows, heads, batch};
  const int64_t str[3] = {sr, sh, sb};
  constexpr int64_t kMaxStride = int64_t(1) << 40, kMaxExtent = int64_t(1) << 32;
  int64_t filler = 16;
  for (int i = 0; i < 3; ++i)
    if (ext[i] > 1 && str[i] * elem_bytes > filler) filler = str[i] * elem_bytes;
  cuuint64_t dims[4] = {cuuint64_t(D), 0, 0, 0}, strides[3];
  for (int i = 0; i < 3; ++i) {
    if (ext[i] < 1 || ext[i] > kMaxExtent) return "extent outside [1, 2^32]";
    int64_t bytes = str[i] * elem_bytes;
    if (ext[i] == 1) bytes = (filler + 15) / 16 * 16;
    if (bytes <= 0 || bytes % 16 != 0 || bytes >= kMaxStride) return "stride not a positive multiple of 16 bytes";
    dims[i + 1] = cuuint64_t(ext[i]);
    strides[i] = cuuint64_t(bytes);
  }
  const cuuint32_t box[4] = {cuuint32_t(box_cols), cuuint32_t(box_rows), 1, 1};
  const cuuint32_t elem_strides[4] = {1, 1, 1, 1};
  const CUresult res = encode(map, dtype, 4, const_cast<void*>(base), dims, strides, box, elem_strides,
                              CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                              CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return res == CUDA_SUCCESS ? nullptr : "cuTensorMapEncodeTiled failed";
}

// A 16-bit (bf16 / fp16) [batch, rows, heads, D] tensor with [box_rows, 64-column] boxes: the Q / K / V / dO tiles.
inline const char* encode_rows_map(CUtensorMap* map, const void* base, bool bf16, int64_t D, int64_t rows,
                                   int64_t heads, int64_t batch, int64_t sr, int64_t sh, int64_t sb, int box_rows) {
  return encode_map_4d(map, base, bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 2, D,
                       rows, heads, batch, sr, sh, sb, 64, box_rows);
}

// An fp32 [batch, rows, heads, D] tensor with [box_rows, 32-column] boxes (32 floats: one 128-byte row): the
// backward's dQ accumulator, which the Hopper backward adds tiles into by TMA reduce-add.
inline const char* encode_rows_map_f32(CUtensorMap* map, const void* base, int64_t D, int64_t rows, int64_t heads,
                                       int64_t batch, int64_t sr, int64_t sh, int64_t sb, int box_rows) {
  return encode_map_4d(map, base, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, 4, D, rows, heads, batch, sr, sh, sb, 32,
                       box_rows);
}

}  // namespace sm90_host
}  // namespace elastic
