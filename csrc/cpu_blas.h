// Row-major fp32 matrix products for the CPU attention kernels' tiles, straight into the BLAS that libtorch carries:
// at::mm on a tile pays for the dispatcher, from_blob views and the output checks, and a layer's attention makes
// hundreds of tile products forward and backward at small shapes. x86 wheels link MKL into libtorch_cpu and export its
// Fortran sgemm_; the weak declaration leaves the symbol null where a torch build does not (or FASTTRAIN_CPU_BLAS=aten
// asks for it), and the tiles then go through at::mm. Called inside at::parallel_for, MKL runs single-threaded either
// way, as it does under at::mm.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>

extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc) __attribute__((weak));

namespace fasttrain {

using Sgemm = decltype(&sgemm_);

// The BLAS the tiles call, or null for at::mm: read once per process.
inline Sgemm tile_blas() {
  static const Sgemm f = [] {
    const char* env = std::getenv("FASTTRAIN_CPU_BLAS");
    return env != nullptr && std::strcmp(env, "aten") == 0 ? nullptr : &sgemm_;
  }();
  return f;
}

// A (rows, cols) fp32 view of row-major data `ld` apart.
inline at::Tensor mat(const float* p, int64_t rows, int64_t cols, int64_t ld) {
  return at::from_blob(const_cast<float*>(p), {rows, cols}, {ld, 1}, at::TensorOptions().dtype(at::kFloat));
}

// c (m, n) = op(a) @ op(b) + beta * c, row-major with leading dimensions lda, ldb, ldc; op(a) is a (m, k), or with
// ta the transpose of a stored (k, m); op(b) is b (k, n), or with tb of b stored (n, k). beta is 0 (c is not read)
// or 1.
inline void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
                 int64_t ldb, float beta, float* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (const Sgemm blas = tile_blas(); blas != nullptr && k > 0) {
    constexpr int64_t kMax = std::numeric_limits<int>::max();
    TORCH_CHECK(m <= kMax && n <= kMax && k <= kMax && lda <= kMax && ldb <= kMax && ldc <= kMax,
                "attention tile too large for a 32-bit BLAS");
    // Column-major BLAS sees each row-major matrix transposed: c^T = op(b)^T op(a)^T.
    const int M = static_cast<int>(n), N = static_cast<int>(m), K = static_cast<int>(k);
    const int LDA = static_cast<int>(ldb), LDB = static_cast<int>(lda), LDC = static_cast<int>(ldc);
    const float alpha = 1.0f;
    blas(tb ? "T" : "N", ta ? "T" : "N", &M, &N, &K, &alpha, b, &LDA, a, &LDB, &beta, c, &LDC);
    return;
  }
  const at::Tensor A = ta ? mat(a, k, m, lda).t() : mat(a, m, k, lda);
  const at::Tensor B = tb ? mat(b, n, k, ldb).t() : mat(b, k, n, ldb);
  at::Tensor C = mat(c, m, n, ldc);
  if (beta == 0.0f) {
    at::mm_out(C, A, B);
  } else {
    C.addmm_(A, B);
  }
}

}  // namespace fasttrain
