// GELU with the tanh approximation (GPT-2's) on the CPU, forward and backward, one pass over memory each; the reference
// is torch's F.gelu(x, approximate="tanh"), whose CPU kernel is several times slower than its exact (erf) GELU
// (benchmarks/NOTES.md). Through the vectorizing exp of cpu_math.h; fp16/bf16 are computed in fp32 a block at a time
// and rounded once.
// Ops (schemas in ops.cpp): fasttrain::gelu_tanh_cpu and fasttrain::gelu_tanh_backward_cpu, CPU dispatch key.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "cpu_math.h"

namespace fasttrain {
namespace {

constexpr float kSqrt2OverPi = 0.7978845608028654f;
constexpr float kCubic = 0.044715f;
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr int64_t kBlock = 1024;  // elements widened to fp32 at a time (fp16/bf16): 4 KiB, in L1

// x / 2 * (1 + tanh(u)) is x * sigmoid(2u): written so, the negative tail (1 + tanh(u) -> 0) loses no digits to
// cancellation, as 1 + tanh does in fp32 (torch's formula). With e = exp(-2u): sigmoid(2u) = 1 / (1 + e) and
// 1 - sigmoid(2u) = e / (1 + e).
inline float neg_exp_2u(float v) { return exp_approx(-2.0f * kSqrt2OverPi * (v + kCubic * v * v * v)); }

// y = x * sigmoid(2 sqrt(2 / pi) (x + 0.044715 x^3)); -inf gives NaN, as torch's (-inf * 0)
FT_CPU_CLONES void gelu_tanh(const float* __restrict x, float* __restrict y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i];
    const float out = v / (1.0f + neg_exp_2u(v));
    y[i] = v == -kInf ? kNaN : out;
  }
}

// dx = dy * (s + 2 x s (1 - s) du/dx), s = sigmoid(2u), du/dx = sqrt(2 / pi) (1 + 3 * 0.044715 x^2); NaN at +-inf
// (torch's: inf * 0)
FT_CPU_CLONES void gelu_tanh_grad(const float* __restrict dy, const float* __restrict x, float* __restrict dx,
                                  int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i], e = neg_exp_2u(v), s = 1.0f / (1.0f + e);
    const float du = kSqrt2OverPi * (1.0f + 3.0f * kCubic * v * v);
    const float out = dy[i] * (s + 2.0f * v * s * (e * s) * du);
    dx[i] = v == -kInf ? kNaN : out;
  }
}

// Applies f(const float* in..., float* out, n) over n elements of tensors of type T, in parallel; fp32 in place,
// fp16/bf16 through fp32 blocks.
template <typename T, int kInputs, typename F>
void elementwise(const T* const (&in)[kInputs], T* out, int64_t n, F&& f) {
  at::parallel_for(0, n, 16 * kBlock, [&](int64_t begin, int64_t end) {
    if constexpr (std::is_same_v<T, float>) {
      if constexpr (kInputs == 1) f(in[0] + begin, out + begin, end - begin);
      else f(in[0] + begin, in[1] + begin, out + begin, end - begin);
    } else {
      float a[kBlock], b[kBlock], o[kBlock];
      for (int64_t i0 = begin; i0 < end; i0 += kBlock) {
        const int64_t m = std::min(kBlock, end - i0);
        widen(in[0] + i0, a, m);
        if constexpr (kInputs == 1) {
          f(a, o, m);
        } else {
          widen(in[1] + i0, b, m);
          f(a, b, o, m);
        }
        narrow(o, out + i0, m);
      }
    }
  });
}

void check(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), name, " must be a contiguous CPU tensor");
}

at::Tensor gelu_tanh_cpu(const at::Tensor& x) {
  check(x, "x");
  at::Tensor y = at::empty_like(x);
  dispatch_dtype(x.scalar_type(), "GELU", [&](auto* type) {
    using T = std::remove_pointer_t<decltype(type)>;
    const T* const in[1] = {x.data_ptr<T>()};
    elementwise<T, 1>(in, y.data_ptr<T>(), x.numel(), gelu_tanh);
  });
  return y;
}

at::Tensor gelu_tanh_backward_cpu(const at::Tensor& grad, const at::Tensor& x) {
  check(grad, "grad");
  check(x, "x");
  TORCH_CHECK(grad.sizes() == x.sizes() && grad.scalar_type() == x.scalar_type(),
              "grad must have x's shape and dtype");
  at::Tensor dx = at::empty_like(x);
  dispatch_dtype(x.scalar_type(), "GELU", [&](auto* type) {
    using T = std::remove_pointer_t<decltype(type)>;
    const T* const in[2] = {grad.data_ptr<T>(), x.data_ptr<T>()};
    elementwise<T, 2>(in, dx.data_ptr<T>(), x.numel(), gelu_tanh_grad);
  });
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(fasttrain, CPU, m) {
  m.impl("gelu_tanh_cpu", &gelu_tanh_cpu);
  m.impl("gelu_tanh_backward_cpu", &gelu_tanh_backward_cpu);
}

}  // namespace fasttrain
