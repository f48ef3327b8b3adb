// What the CPU kernels share: the clones GCC compiles a hot loop into (AVX-512, AVX2, baseline x86-64, one picked
// at load time), and an exp that vectorizes. Included by attention_cpu.cpp and activation_cpu.cpp, both compiled
// with -fno-trapping-math (CMakeLists.txt), without which GCC leaves the selects below scalar.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FT_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FT_CPU_CLONES
#endif

namespace fasttrain {

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

}  // namespace fasttrain
