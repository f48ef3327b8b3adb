// Eight-lane fp32 vectors for the CPU kernels' register blocks: one ymm register in the AVX2 and AVX-512 clones
// (FT_CPU_CLONES, cpu_math.h), two xmm in the baseline one. Loops that keep several accumulators live across a pass
// (a block of query rows against one key, a block of values into a block of rows) hold them here explicitly: GCC's
// `omp simd` reduction stores its lanes to the stack and adds them one after another, and it does not keep a row
// block's accumulators in registers. Everything here is inlined into the calling clone, so it takes that clone's ISA.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__GNUC__)
#define FT_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define FT_ALWAYS_INLINE inline
#endif

namespace fasttrain {

// The helpers take and give vectors by reference: a 32-byte vector passed by value has one calling convention with AVX
// and another without, which GCC warns of (-Wpsabi) in the baseline build; inlined, the code is the same.
typedef float v8 __attribute__((vector_size(32)));

FT_ALWAYS_INLINE void load8(v8& x, const float* p) { std::memcpy(&x, p, sizeof x); }

FT_ALWAYS_INLINE void store8(float* p, const v8& x) { std::memcpy(p, &x, sizeof x); }

// ((x0 + x4) + (x1 + x5)) + ((x2 + x6) + (x3 + x7)), in registers: reading the lanes by index has GCC store the
// vector to the stack and add them as scalars.
FT_ALWAYS_INLINE float sum8(const v8& v) {
  v8 x = v;
#if defined(__clang__)
  x += __builtin_shufflevector(x, x, 4, 5, 6, 7, 0, 1, 2, 3);
  x += __builtin_shufflevector(x, x, 1, 0, 3, 2, 5, 4, 7, 6);
  x += __builtin_shufflevector(x, x, 2, 3, 0, 1, 6, 7, 4, 5);
#else  // GCC before 12 has only __builtin_shuffle
  typedef int32_t i8 __attribute__((vector_size(32)));
  x += __builtin_shuffle(x, i8{4, 5, 6, 7, 0, 1, 2, 3});
  x += __builtin_shuffle(x, i8{1, 0, 3, 2, 5, 4, 7, 6});
  x += __builtin_shuffle(x, i8{2, 3, 0, 1, 6, 7, 4, 5});
#endif
  return x[0];
}

// s[r * ld] = q_r . key for the N rows q_r = q + r * D (a GQA group's): each 8 floats of the key loaded once for
// the N rows, each row's lanes summed as a tree at the end.
template <int N>
FT_ALWAYS_INLINE void dot_rows(const float* __restrict q, const float* __restrict key, int64_t D,
                               float* __restrict s, int64_t ld) {
  v8 a[N];
  for (int r = 0; r < N; ++r) a[r] = v8{};  // not `= {}`, which GCC makes a memset of the stack
  int64_t d = 0;
  for (; d + 8 <= D; d += 8) {
    v8 x, y;
    load8(x, key + d);
    for (int r = 0; r < N; ++r) {
      load8(y, q + r * D + d);
      a[r] += y * x;
    }
  }
  for (int r = 0; r < N; ++r) {
    float tail = 0.0f;
    for (int64_t j = d; j < D; ++j) tail += q[r * D + j] * key[j];
    s[r * ld] = sum8(a[r]) + tail;
  }
}

// Columns [d, d + 8 W) of acc_r += sum_i p[r * ld + i] * value_i (i < cw, r < N; value_i = value + i * ldv,
// acc_r = acc + r * D), the N x W accumulators held in registers over the cw values.
template <int N, int W>
FT_ALWAYS_INLINE void accumulate_columns(const float* __restrict p, int64_t ld, int64_t cw,
                                         const float* __restrict value, int64_t ldv, int64_t D, int64_t d,
                                         float* __restrict acc) {
  v8 a[N][W];
  for (int r = 0; r < N; ++r) {
    for (int w = 0; w < W; ++w) load8(a[r][w], acc + r * D + d + 8 * w);
  }
  for (int64_t i = 0; i < cw; ++i) {
    v8 x[W];
    for (int w = 0; w < W; ++w) load8(x[w], value + i * ldv + d + 8 * w);
    for (int r = 0; r < N; ++r) {
      const float pr = p[r * ld + i];
      for (int w = 0; w < W; ++w) a[r][w] += pr * x[w];
    }
  }
  for (int r = 0; r < N; ++r) {
    for (int w = 0; w < W; ++w) store8(acc + r * D + d + 8 * w, a[r][w]);
  }
}

// acc_r += sum_i p[r * ld + i] * value_i over all D columns: 16 at a time for N <= 6 (2N accumulators, two values
// and a weight: at most 15 of AVX2's 16 registers), else 8.
template <int N>
FT_ALWAYS_INLINE void accumulate_rows(const float* __restrict p, int64_t ld, int64_t cw,
                                      const float* __restrict value, int64_t ldv, int64_t D, float* __restrict acc) {
  int64_t d = 0;
  if constexpr (N <= 6) {
    for (; d + 16 <= D; d += 16) accumulate_columns<N, 2>(p, ld, cw, value, ldv, D, d, acc);
  }
  for (; d + 8 <= D; d += 8) accumulate_columns<N, 1>(p, ld, cw, value, ldv, D, d, acc);
  for (; d < D; ++d) {
    for (int64_t i = 0; i < cw; ++i) {
      for (int r = 0; r < N; ++r) acc[r * D + d] += p[r * ld + i] * value[i * ldv + d];
    }
  }
}

}  // namespace fasttrain
