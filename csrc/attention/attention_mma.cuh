// Warp-level tensor-core primitives shared by the attention kernels (SM80+ PTX: mma.sync m16n8k16,
// ldmatrix, cp.async) and the swizzled shared-memory tile layout they read.
//
// Fragment layouts (PTX ISA, mma.m16n8k16, 16-bit inputs, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4):
//   A 16x16 (row major): reg0 = (g, 2t..2t+1), reg1 = (g+8, 2t..), reg2 = (g, 2t+8..), reg3 = (g+8, 2t+8..)
//   B 16x8  ("col"):     reg0 = (k 2t..2t+1, n g), reg1 = (k 2t+8.., n g)
//   C 16x8  fp32:        c0,c1 = (g, 2t..2t+1), c2,c3 = (g+8, 2t..2t+1)
// A C fragment pair (n-blocks 2k, 2k+1) converted to 16-bit is exactly the A fragment of k-step k, which
// is how P = softmax(S) feeds the second matmul without a trip through shared memory.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>

namespace elastic {
namespace mma {

// Shared-memory tiles are rows of 16-byte chunks; chunk c of row r lives at chunk (c ^ (r & 7)).
// ldmatrix reads 8 rows of one logical chunk per 8x8 matrix, which this XOR spreads over all 32 banks.
template <int ROW_ELEMS>
__device__ __forceinline__ int swz(int row, int col) {
  static_assert(ROW_ELEMS % 64 == 0, "swizzle needs at least 8 chunks of 16 bytes per row");
  return row * ROW_ELEMS + ((((col >> 3) ^ (row & 7))) << 3) + (col & 7);
}

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

template <typename T>
struct MmaOp;

template <>
struct MmaOp<__nv_bfloat16> {
  __device__ __forceinline__ static void run(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  __device__ __forceinline__ static uint32_t pack(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
};

template <>
struct MmaOp<__half> {
  __device__ __forceinline__ static void run(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  __device__ __forceinline__ static uint32_t pack(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
};

// 16-byte asynchronous global->shared copy; when `valid` is false the 16 bytes are zero-filled
// (src-size 0), so rows past a sequence end read as zeros (never NaN garbage times a zero weight).
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)), "l"(gmem),
               "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::); }

// Copy a [ROWS, D] tile of 16-bit elements (row r at gmem + r * row_stride) into a swizzled shared
// tile; rows >= valid_rows are zero-filled. All NTHREADS threads take part.
template <int ROWS, int D, int NTHREADS, typename T>
__device__ __forceinline__ void load_tile_async(T* smem, const T* gmem, int64_t row_stride, int valid_rows) {
  constexpr int CHUNKS_PER_ROW = D / 8;
  constexpr int TOTAL = ROWS * CHUNKS_PER_ROW;
  static_assert(TOTAL % NTHREADS == 0, "tile chunks must divide evenly over the threads");
#pragma unroll
  for (int it = 0; it < TOTAL / NTHREADS; ++it) {
    const int idx = it * NTHREADS + threadIdx.x;
    const int r = idx / CHUNKS_PER_ROW;
    const int c = idx % CHUNKS_PER_ROW;
    const bool valid = r < valid_rows;
    const T* src = valid ? gmem + r * row_stride + c * 8 : gmem;
    cp_async16(smem + swz<D>(r, c * 8), src, valid);
  }
}

}  // namespace mma
}  // namespace elastic
