// The fp16/bf16 conversions of cpu_math.h that need instructions or clones of their own. c10::Half picks F16C at
// compile time only, so in a baseline x86-64 build it converts fp16 bit by bit, and GCC 12 vectorizes no _Float16
// conversion even in an F16C clone; c10::BFloat16's rounding is a scalar branch on NaN. What this buys per kernel:
// benchmarks/NOTES.md, fp16 and bf16 conversions on the CPU.
#include "cpu_math.h"

// clang accepts __builtin_cpu_supports("f16c") from 18 on
#if defined(__GNUC__) && defined(__x86_64__) && (!defined(__clang__) || __clang_major__ >= 18)
#define FT_F16C 1
#include <immintrin.h>
#endif

namespace fasttrain {
namespace {

#if defined(FT_F16C)
bool has_f16c() {
  static const bool yes = __builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c");
  return yes;
}

__attribute__((target("avx,f16c"))) void widen_f16c(const c10::Half* src, float* dst, int64_t n) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    _mm256_storeu_ps(dst + j, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + j))));
  }
  for (; j < n; ++j) dst[j] = static_cast<float>(src[j]);
}

// Round to nearest even, as c10::Half's conversion (NaNs stay NaN; their payloads may differ).
__attribute__((target("avx,f16c"))) void narrow_f16c(const float* src, c10::Half* dst, int64_t n) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(src + j), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + j), h);
  }
  for (; j < n; ++j) dst[j] = static_cast<c10::Half>(src[j]);
}
#endif

// c10::BFloat16's round to nearest even in integer arithmetic, which vectorizes: NaN to 0x7FC0, as c10 does.
FT_CPU_CLONES void narrow_bf16(const float* __restrict src, uint16_t* __restrict dst, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    uint32_t bits;
    std::memcpy(&bits, src + j, sizeof bits);
    const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
    dst[j] = static_cast<uint16_t>((bits & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FC0u : rounded);
  }
}

}  // namespace

template <>
void widen(const c10::Half* src, float* dst, int64_t n) {
#if defined(FT_F16C)
  if (has_f16c()) return widen_f16c(src, dst, n);
#endif
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<float>(src[j]);
}

template <>
void narrow(const float* src, c10::Half* dst, int64_t n) {
#if defined(FT_F16C)
  if (has_f16c()) return narrow_f16c(src, dst, n);
#endif
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<c10::Half>(src[j]);
}

template <>
void narrow(const float* src, c10::BFloat16* dst, int64_t n) {
  static_assert(sizeof(c10::BFloat16) == sizeof(uint16_t));
  narrow_bf16(src, reinterpret_cast<uint16_t*>(dst), n);
}

}  // namespace fasttrain
