// What the CPU kernels share: the clones GCC compiles a hot loop into (AVX-512, AVX2, baseline x86-64, one picked
// at load time), an exp that vectorizes, the conversions between fp16/bf16 and fp32 (F16C for fp16) and the dispatch
// on the three dtypes. Included by adamw_cpu.cpp, attention_cpu.cpp, activation_cpu.cpp and rotary_cpu.cpp; the two
// whose loops call exp_approx (attention, activation) are compiled with -fno-trapping-math (CMakeLists.txt), without
// which GCC leaves its selects scalar.
#pragma once

#include <ATen/core/Tensor.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FT_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FT_CPU_CLONES
#endif

namespace fasttrain {

constexpr float kInf = std::numeric_limits<float>::infinity();

// exp(x) by Cephes' expf polynomial on a range-reduced argument (about 2 ulp), written so that GCC vectorizes it:
// libm's expf does not vectorize without -ffast-math, which would also drop the -inf handling the masks need.
// Arguments below -87 (exp < 2e-38, masked scores at -inf among them) give exactly 0.
inline float exp_approx(float x) {
  // Selects, not std::min/max (which return references and leave branches that stop the vectorizer).
  float c = x < -87.0f ? -87.0f : x;
  c = c > 88.0f ? 88.0f : c;
  const float n = std::floor(c * 1.44269504088896341f + 0.5f);
  const float r = c - n * 0.693359375f + n * 2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n; n in [-126, 127] after the clamp
  float pow2n;
  std::memcpy(&pow2n, &bits, sizeof pow2n);  // C++17's bit cast, which GCC vectorizes as one
  return x < -87.0f ? 0.0f : y * pow2n;
}

inline void widen(const float* src, float* dst, int64_t n) { std::memcpy(dst, src, n * sizeof(float)); }
inline void narrow(const float* src, float* dst, int64_t n) { std::memcpy(dst, src, n * sizeof(float)); }

// dst[0, n) = src as fp32 (c10::BFloat16 or c10::Half)
template <typename T>
void widen(const T* src, float* dst, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<float>(src[j]);
}

// dst[0, n) = src rounded to T (c10::BFloat16 or c10::Half), to nearest even
template <typename T>
void narrow(const float* src, T* dst, int64_t n);

// In cpu_math.cpp: fp16 by F16C's vcvtph2ps / vcvtps2ph where the CPU has them, bf16's rounding in the clones, each
// giving c10's conversions' bits.
template <>
void widen(const c10::Half* src, float* dst, int64_t n);
template <>
void narrow(const float* src, c10::Half* dst, int64_t n);
template <>
void narrow(const float* src, c10::BFloat16* dst, int64_t n);

// Calls f with a null pointer to the C++ type of dtype (float, c10::BFloat16, c10::Half), for f to dispatch on;
// another dtype is an error naming the kernel.
template <typename F>
void dispatch_dtype(at::ScalarType dtype, const char* kernel, F&& f) {
  switch (dtype) {
    case at::kFloat: return f(static_cast<float*>(nullptr));
    case at::kBFloat16: return f(static_cast<c10::BFloat16*>(nullptr));
    case at::kHalf: return f(static_cast<c10::Half*>(nullptr));
    default: TORCH_CHECK(false, "the CPU ", kernel, " kernel takes float32, bfloat16 or float16, got ", dtype);
  }
}

}  // namespace fasttrain
