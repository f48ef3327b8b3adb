// The gated MLP's activation on the CPU, forward and backward in one pass over memory each: out = act(gate) * up with
// act SiLU (Llama, Mistral, Qwen2: SwiGLU) or GELU's tanh approximation (Gemma: GeGLU). The reference is
// F.silu(gate) * up / F.gelu(gate, approximate="tanh") * up (fasttrain/ops/swiglu.py). fp16/bf16 are computed in fp32
// a block at a time and rounded once, through the vectorizing exp of cpu_math.h.
// Ops (schemas in ops.cpp): fasttrain::swiglu_cpu and fasttrain::swiglu_backward_cpu, CPU dispatch key.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <type_traits>

#include "cpu_math.h"

namespace fasttrain {
namespace {

constexpr float kSqrt2OverPi = 0.7978845608028654f;
constexpr float kCubic = 0.044715f;
constexpr int64_t kBlock = 1024;  // elements widened to fp32 at a time: 4 KiB per operand, in L1

// Both activations are x * sigmoid(z): z = x (SiLU) or z = 2 sqrt(2 / pi) (x + 0.044715 x^3) (GELU tanh, written so
// its negative tail loses no digits to 1 + tanh's cancellation). e = exp(-z), sigmoid(z) = 1 / (1 + e).
template <bool kGelu>
inline float neg_exp_z(float x) {
  if constexpr (kGelu) return exp_approx(-2.0f * kSqrt2OverPi * (x + kCubic * x * x * x));
  else return exp_approx(-x);
}

// out = act(g) * u
template <bool kGelu>
FT_CPU_CLONES void gated(const float* __restrict g, const float* __restrict u, float* __restrict out, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = g[i] / (1.0f + neg_exp_z<kGelu>(g[i])) * u[i];
}

// dg = dy * u * act'(g), du = dy * act(g); act'(g) = s + g s (1 - s) dz/dg, s = sigmoid(z), 1 - s = e s
template <bool kGelu>
FT_CPU_CLONES void gated_grad(const float* __restrict dy, const float* __restrict g, const float* __restrict u,
                              float* __restrict dg, float* __restrict du, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float x = g[i], e = neg_exp_z<kGelu>(x), s = 1.0f / (1.0f + e);
    const float dz = kGelu ? 2.0f * kSqrt2OverPi * (1.0f + 3.0f * kCubic * x * x) : 1.0f;
    dg[i] = dy[i] * u[i] * (s + x * s * (e * s) * dz);
    du[i] = dy[i] * x * s;
  }
}

// Runs f over n elements in parallel blocks: the kIn inputs widened to fp32, the kOut outputs rounded back to T.
template <typename T, int kIn, int kOut, typename F>
void blocks(const T* const (&in)[kIn], T* const (&out)[kOut], int64_t n, F&& f) {
  at::parallel_for(0, n, 16 * kBlock, [&](int64_t begin, int64_t end) {
    float a[kIn][kBlock], o[kOut][kBlock];
    for (int64_t i0 = begin; i0 < end; i0 += kBlock) {
      const int64_t m = std::min(kBlock, end - i0);
      for (int j = 0; j < kIn; ++j) widen(in[j] + i0, a[j], m);
      if constexpr (kIn == 2) f(a[0], a[1], o[0], m);
      else f(a[0], a[1], a[2], o[0], o[1], m);
      for (int j = 0; j < kOut; ++j) narrow(o[j], out[j] + i0, m);
    }
  });
}

void check(const at::Tensor& t, const at::Tensor& like, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), name, " must be a contiguous CPU tensor");
  TORCH_CHECK(t.sizes() == like.sizes() && t.scalar_type() == like.scalar_type(), name,
              " must have gate's shape and dtype");
}

at::Tensor swiglu_cpu(const at::Tensor& gate, const at::Tensor& up, bool gelu) {
  check(gate, gate, "gate");
  check(up, gate, "up");
  at::Tensor out = at::empty_like(gate);
  dispatch_dtype(gate.scalar_type(), "swiglu", [&](auto* type) {
    using T = std::remove_pointer_t<decltype(type)>;
    const T* const in[2] = {gate.data_ptr<T>(), up.data_ptr<T>()};
    T* const outs[1] = {out.data_ptr<T>()};
    blocks<T, 2, 1>(in, outs, gate.numel(), gelu ? gated<true> : gated<false>);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> swiglu_backward_cpu(const at::Tensor& grad, const at::Tensor& gate,
                                                       const at::Tensor& up, bool gelu) {
  check(grad, gate, "grad");
  check(gate, gate, "gate");
  check(up, gate, "up");
  at::Tensor dgate = at::empty_like(gate), dup = at::empty_like(up);
  dispatch_dtype(gate.scalar_type(), "swiglu", [&](auto* type) {
    using T = std::remove_pointer_t<decltype(type)>;
    const T* const in[3] = {grad.data_ptr<T>(), gate.data_ptr<T>(), up.data_ptr<T>()};
    T* const outs[2] = {dgate.data_ptr<T>(), dup.data_ptr<T>()};
    blocks<T, 3, 2>(in, outs, gate.numel(), gelu ? gated_grad<true> : gated_grad<false>);
  });
  return {dgate, dup};
}

}  // namespace

TORCH_LIBRARY_IMPL(fasttrain, CPU, m) {
  m.impl("swiglu_cpu", &swiglu_cpu);
  m.impl("swiglu_backward_cpu", &swiglu_backward_cpu);
}

}  // namespace fasttrain
