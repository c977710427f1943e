// Tile GEMMs of the CPU attention kernels, on raw row-major pointers: C[M, N] (+)= A[M, K] . B[K, N].
//
// float and bfloat16 go through ATen's batch-reduce GEMM (at::native::cpublas::brgemm): oneDNN's
// brgemm micro-kernel where oneDNN is built in (a JIT kernel cached per shape and thread, no threading
// and no per-call tensor overhead, which at::mm pays on every 128-key tile), ATen's cpublas gemm
// otherwise. bfloat16 operands accumulate in fp32 (the plain layout, is_vnni = false: the same gemm
// torch's own CPU flash attention runs for bfloat16). double goes through at::mm on views of the
// buffers: it serves gradcheck, where exactness matters and speed does not.
#pragma once
#include <ATen/ATen.h>
#include <ATen/native/CPUBlas.h>

#include <cstdint>

namespace elastic {
namespace cpu {

inline void gemm_nn(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
                    float* C, int64_t ldc, bool add_C) {
  at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, add_C, A, B, C, /*is_vnni=*/false);
}

inline void gemm_nn(int64_t M, int64_t N, int64_t K, const at::BFloat16* A, int64_t lda, const at::BFloat16* B,
                    int64_t ldb, float* C, int64_t ldc, bool add_C) {
  at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, add_C, A, B, C, /*is_vnni=*/false);
}

// B in oneDNN's VNNI layout (cpublas::pack): AMX tiles where present. Threads that used it call
// at::native::cpublas::brgemm_release() when done, which gives the AMX tile state back.
inline void gemm_nn_vnni(int64_t M, int64_t N, int64_t K, const at::BFloat16* A, int64_t lda, const at::BFloat16* B,
                         int64_t ldb, float* C, int64_t ldc, bool add_C) {
  at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, add_C, A, B, C, /*is_vnni=*/true);
}

inline void gemm_nn(int64_t M, int64_t N, int64_t K, const double* A, int64_t lda, const double* B, int64_t ldb,
                    double* C, int64_t ldc, bool add_C) {
  const auto opt = at::TensorOptions().dtype(at::kDouble);
  const at::Tensor a = at::from_blob(const_cast<double*>(A), {M, K}, {lda, 1}, opt);
  const at::Tensor b = at::from_blob(const_cast<double*>(B), {K, N}, {ldb, 1}, opt);
  at::Tensor c = at::from_blob(C, {M, N}, {ldc, 1}, opt);
  if (add_C) {
    c.addmm_(a, b);
  } else {
    at::mm_out(c, a, b);
  }
}

}  // namespace cpu
}  // namespace elastic
