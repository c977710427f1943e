// Warpgroup MMA (wgmma, sm_90a) primitives of the Hopper forward and backward kernels: the MMA instructions with
// fp32 accumulators, shared-memory matrix descriptors for 128-byte-swizzled tiles, and the fence /
// commit / wait of the asynchronous MMA queue. Only compiled into the sm_90a device pass (callers guard
// with ELASTIC_SM90A_ENABLED).
//
// Accumulator layout of m64nN (per warp w of the warpgroup, lane = 4g + t): d[4i + c] holds row
// 16w + g + 8 * (c / 2), column 8i + 2t + (c % 2): the mma.sync m16n8 C layout repeated over N / 8 blocks,
// so a pair of 8-column blocks converts to the m16k16 A fragment of the register-A MMA (as in sm80).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define ELASTIC_SM90A_ENABLED 1
#endif

namespace elastic {
namespace sm90 {

// Descriptor of a K-major or MN-major operand tile stored as 128-byte rows (64 16-bit elements) whose
// 16-byte chunks are XOR-swizzled by (row % 8), i.e. in 1024-byte atoms of 8 rows (layout type B128).
// lbo: byte stride between 64-element column blocks (MN-major; K-major ignores it, 16 by convention);
// sbo: byte stride between 8-row groups.
__device__ __forceinline__ uint64_t smem_desc_b128(uint32_t smem_addr, uint32_t lbo, uint32_t sbo) {
  uint64_t desc = 0;
  desc |= uint64_t((smem_addr >> 4) & 0x3FFF);
  desc |= uint64_t((lbo >> 4) & 0x3FFF) << 16;
  desc |= uint64_t((sbo >> 4) & 0x3FFF) << 32;
  desc |= uint64_t(1) << 62;  // 128-byte swizzle
  return desc;
}

// The same descriptor kept as two 32-bit halves, so that addressing a k-step inside the tile is one 32-bit add:
// the start-address field (addr >> 4, bits 0-13) cannot carry into the next field for shared addresses below
// 256 KiB, hence desc(addr + off) == desc(addr) + (off >> 4) for 16-byte multiples off.
struct SmemDesc {
  uint32_t lo, hi;
  __device__ __forceinline__ uint64_t at(uint32_t byte_offset) const {
    return (uint64_t(hi) << 32) | (lo + (byte_offset >> 4));
  }
};
__device__ __forceinline__ SmemDesc smem_desc_b128_split(uint32_t smem_addr, uint32_t lbo, uint32_t sbo) {
  const uint64_t d = smem_desc_b128(smem_addr, lbo, sbo);
  return {static_cast<uint32_t>(d), static_cast<uint32_t>(d >> 32)};
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

// Keeps the compiler from moving accesses of accumulator registers across the asynchronous MMA window.
template <int N>
__device__ __forceinline__ void fence_regs(float (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}
template <int N>
__device__ __forceinline__ void fence_regs(uint32_t (&r)[N][4]) {
#pragma unroll
  for (int i = 0; i < N; ++i)
#pragma unroll
    for (int c = 0; c < 4; ++c) asm volatile("" : "+r"(r[i][c])::"memory");
}

#if defined(ELASTIC_SM90A_ENABLED)
// Ends the basic block here with a branch the compiler cannot resolve (`never` is false at run time) and that
// reads `a` and `b`. ptxas schedules within blocks: it hoists a wgmma wait (WARPGROUP.DEPBAR) to the top of
// its block and sinks arithmetic toward its uses, which puts the softmax behind O += P V instead of beside it.
// Behind this fence the wait stays below, and whatever feeds a and b (the row sums: every exp) stays above.
__device__ __forceinline__ void schedule_fence(bool never, float a, float b) {
  if (never & (a == b)) asm volatile("nanosleep.u32 0;\n" ::: "memory");
}

#define ELASTIC_WGMMA_ACC32 \
    "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
    "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
    "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
    "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
#define ELASTIC_WGMMA_REGS32 "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}"
#define ELASTIC_WGMMA_ACC64 \
    "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
    "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
    "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
    "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), \
    "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), \
    "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), \
    "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), \
    "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
#define ELASTIC_WGMMA_REGS64 "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63}"

// D[64 x 64] (+)= A[64 x 16] B[16 x 64], A and B K-major in shared memory; accumulate == 0 overwrites D.
#define ELASTIC_WGMMA_SS_N64(TY)                                                                       \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"                                        \
               "wgmma.mma_async.sync.aligned.m64n64k16.f32." TY "." TY " " ELASTIC_WGMMA_REGS32       \
               ", %32, %33, p, 1, 1, 0, 0;\n}\n"                                                 \
               : ELASTIC_WGMMA_ACC32                                                               \
               : "l"(desc_a), "l"(desc_b), "r"(accumulate))
template <typename T>
__device__ __forceinline__ void wgmma_ss_n64(float (&d)[32], uint64_t desc_a, uint64_t desc_b, int accumulate) {
  if constexpr (std::is_same<T, __nv_bfloat16>::value) ELASTIC_WGMMA_SS_N64("bf16");
  else ELASTIC_WGMMA_SS_N64("f16");
}

// D[64 x 64] += A[64 x 16] B[16 x 64], A in registers (m16k16 A fragment per warp), B MN-major in shared
// memory (transposed read: V rows are keys, its columns the output's head dims).
#define ELASTIC_WGMMA_RS_N64(TY)                                                                       \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"                                        \
               "wgmma.mma_async.sync.aligned.m64n64k16.f32." TY "." TY " " ELASTIC_WGMMA_REGS32       \
               ", {%32,%33,%34,%35}, %36, p, 1, 1, 1;\n}\n"                           \
               : ELASTIC_WGMMA_ACC32                                                               \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1))
template <typename T>
__device__ __forceinline__ void wgmma_rs_n64_mn(float (&d)[32], const uint32_t (&a)[4], uint64_t desc_b) {
  if constexpr (std::is_same<T, __nv_bfloat16>::value) ELASTIC_WGMMA_RS_N64("bf16");
  else ELASTIC_WGMMA_RS_N64("f16");
}

// D[64 x 64] (+)= A[64 x 16] B[16 x 64], A and B both MN-major in shared memory (transposed reads; 16-bit types
// only): the backward's dQ = dS K, whose A is dS^T as stored (query columns contiguous) and B the K tile (head-dim
// columns contiguous). Descriptors as for the MN-major B of O += P V.
#define ELASTIC_WGMMA_SS_N64_TT(TY)                                                                    \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"                                        \
               "wgmma.mma_async.sync.aligned.m64n64k16.f32." TY "." TY " " ELASTIC_WGMMA_REGS32       \
               ", %32, %33, p, 1, 1, 1, 1;\n}\n"                                                 \
               : ELASTIC_WGMMA_ACC32                                                               \
               : "l"(desc_a), "l"(desc_b), "r"(accumulate))
template <typename T>
__device__ __forceinline__ void wgmma_ss_n64_tt(float (&d)[32], uint64_t desc_a, uint64_t desc_b, int accumulate) {
  if constexpr (std::is_same<T, __nv_bfloat16>::value) ELASTIC_WGMMA_SS_N64_TT("bf16");
  else ELASTIC_WGMMA_SS_N64_TT("f16");
}

// D[64 x 128] (+)= A[64 x 16] B[16 x 128], A and B K-major in shared memory; accumulate == 0 overwrites D.
#define ELASTIC_WGMMA_SS_N128(TY)                                                                       \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"                                        \
               "wgmma.mma_async.sync.aligned.m64n128k16.f32." TY "." TY " " ELASTIC_WGMMA_REGS64       \
               ", %64, %65, p, 1, 1, 0, 0;\n}\n"                                                 \
               : ELASTIC_WGMMA_ACC64                                                               \
               : "l"(desc_a), "l"(desc_b), "r"(accumulate))
template <typename T>
__device__ __forceinline__ void wgmma_ss_n128(float (&d)[64], uint64_t desc_a, uint64_t desc_b, int accumulate) {
  if constexpr (std::is_same<T, __nv_bfloat16>::value) ELASTIC_WGMMA_SS_N128("bf16");
  else ELASTIC_WGMMA_SS_N128("f16");
}

// D[64 x N] += A[64 x 16] B[16 x N], A K-major and B MN-major in shared memory: the backward's dK += dS^T Q with
// dS^T read back from its shared-memory tile (ELASTIC_SM90_BWD_OVERLAP=2, which keeps no dS^T registers).
#define ELASTIC_WGMMA_SS_KMN(N, TY, REGS, ACC, IA, IB)                                                  \
  asm volatile("wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." TY "." TY " " REGS ", %" #IA ", %" #IB \
               ", 1, 1, 1, 0, 1;\n"                                                                     \
               : ACC                                                                                   \
               : "l"(desc_a), "l"(desc_b))
template <typename T>
__device__ __forceinline__ void wgmma_ss_n128_kmn(float (&d)[64], uint64_t desc_a, uint64_t desc_b) {
  if constexpr (std::is_same<T, __nv_bfloat16>::value)
    ELASTIC_WGMMA_SS_KMN(128, "bf16", ELASTIC_WGMMA_REGS64, ELASTIC_WGMMA_ACC64, 64, 65);
  else ELASTIC_WGMMA_SS_KMN(128, "f16", ELASTIC_WGMMA_REGS64, ELASTIC_WGMMA_ACC64, 64, 65);
}
template <typename T>
__device__ __forceinline__ void wgmma_ss_n64_kmn(float (&d)[32], uint64_t desc_a, uint64_t desc_b) {
  if constexpr (std::is_same<T, __nv_bfloat16>::value)
    ELASTIC_WGMMA_SS_KMN(64, "bf16", ELASTIC_WGMMA_REGS32, ELASTIC_WGMMA_ACC32, 32, 33);
  else ELASTIC_WGMMA_SS_KMN(64, "f16", ELASTIC_WGMMA_REGS32, ELASTIC_WGMMA_ACC32, 32, 33);
}

// D[64 x 128] += A[64 x 16] B[16 x 128], A in registers (m16k16 A fragment per warp), B MN-major in shared
// memory (transposed read: V rows are keys, its columns the output's head dims).
#define ELASTIC_WGMMA_RS_N128(TY)                                                                       \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"                                        \
               "wgmma.mma_async.sync.aligned.m64n128k16.f32." TY "." TY " " ELASTIC_WGMMA_REGS64       \
               ", {%64,%65,%66,%67}, %68, p, 1, 1, 1;\n}\n"                           \
               : ELASTIC_WGMMA_ACC64                                                               \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1))
template <typename T>
__device__ __forceinline__ void wgmma_rs_n128_mn(float (&d)[64], const uint32_t (&a)[4], uint64_t desc_b) {
  if constexpr (std::is_same<T, __nv_bfloat16>::value) ELASTIC_WGMMA_RS_N128("bf16");
  else ELASTIC_WGMMA_RS_N128("f16");
}

#endif  // ELASTIC_SM90A_ENABLED

}  // namespace sm90
}  // namespace elastic
