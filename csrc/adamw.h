// AdamW math shared by the CPU kernel (adamw_cpu.cpp) and the CUDA kernel (adamw_cuda.cu), so the two cannot drift.
// The order of operations is torch's single-tensor AdamW (torch/optim/adam.py, _single_tensor_adam) in fp32:
//   p *= 1 - lr*wd;  m = lerp(m, g, 1-beta1);  v = v*beta2 + (1-beta2)*g*g;  [vmax = max(vmax, v)]
//   p += -(lr / bc1) * m / (sqrt(v) / sqrt(bc2) + eps)
// Scalars that torch computes in Python doubles are computed here in double and rounded to float once, as torch
// rounds a Python scalar to the tensor's opmath type.
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define FT_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FT_HOST_DEVICE inline
#endif

namespace fasttrain {

// Per call (one param group on one device and dtype).
struct AdamWHyper {
  double lr;
  double beta1;
  double beta2;
  double eps;
  double weight_decay;
  double max_grad_norm;  // <= 0: no clipping
  bool maximize;
};

// Per tensor, from its step count: what the element loop needs, in fp32.
struct AdamWElementScalars {
  float decay;          // 1 - lr * weight_decay
  float lerp_weight;    // 1 - beta1
  float beta2;
  float one_minus_beta2;
  float eps;
  float neg_step_size;  // -lr / (1 - beta1^step)
  float bc2_sqrt;       // sqrt(1 - beta2^step)
  float grad_coef;      // +-1 / grad_scale * clip coefficient (sign from maximize)
};

// step is the count after this step's increment; grad_scale, grad_norm may be null (no GradScaler, no clipping).
FT_HOST_DEVICE AdamWElementScalars adamw_scalars(const AdamWHyper& h, double step, const float* grad_scale,
                                                 const float* grad_norm) {
  AdamWElementScalars s;
  s.decay = static_cast<float>(1.0 - h.lr * h.weight_decay);
  s.lerp_weight = static_cast<float>(1.0 - h.beta1);
  s.beta2 = static_cast<float>(h.beta2);
  s.one_minus_beta2 = static_cast<float>(1.0 - h.beta2);
  s.eps = static_cast<float>(h.eps);
  s.neg_step_size = static_cast<float>(-(h.lr / (1.0 - pow(h.beta1, step))));
  s.bc2_sqrt = static_cast<float>(sqrt(1.0 - pow(h.beta2, step)));
  double coef = 1.0;
  if (grad_scale != nullptr) coef = 1.0 / static_cast<double>(*grad_scale);
  if (grad_norm != nullptr && h.max_grad_norm > 0) {
    // The norm was taken over the scaled grads: unscale it before comparing with max_grad_norm.
    const double norm = static_cast<double>(*grad_norm) * coef;
    const double clip = h.max_grad_norm / (norm + 1e-6);
    coef *= clip < 1.0 ? clip : 1.0;
  }
  s.grad_coef = static_cast<float>(h.maximize ? -coef : coef);
  return s;
}

// Products and sums that must round on their own, as torch's separate ops do: nvcc would otherwise contract
// p * decay + update into one fma. The CPU file is compiled with -ffp-contract=off for the same reason.
#if defined(__CUDA_ARCH__)
#define FT_MUL(a, b) __fmul_rn(a, b)
#define FT_ADD(a, b) __fadd_rn(a, b)
#else
#define FT_MUL(a, b) ((a) * (b))
#define FT_ADD(a, b) ((a) + (b))
#endif

// One element, fp32 in registers. AMSGRAD is a template flag so that the element loop has no data-dependent branch.
// The fmas are where ATen's CPU kernels have them (checked bit for bit against torch 2.13 on AVX-512): lerp is
// fma(w, g - m, m) (or fma(w - 1, g - m, g) for w >= 0.5) and addcmul is fma(c * g, g, v * beta2); addcdiv is
// p + (s * m) / denom with no fma.
template <bool AMSGRAD>
FT_HOST_DEVICE void adamw_element(const AdamWElementScalars& s, float& p, float g, float& m, float& v, float& vmax) {
  g = FT_MUL(g, s.grad_coef);
  p = FT_MUL(p, s.decay);
  const float diff = g - m;
  m = s.lerp_weight < 0.5f ? fmaf(s.lerp_weight, diff, m) : fmaf(s.lerp_weight - 1.0f, diff, g);
  v = fmaf(FT_MUL(s.one_minus_beta2, g), g, FT_MUL(v, s.beta2));
  float second = v;
  if (AMSGRAD) {
    vmax = vmax > v ? vmax : v;
    second = vmax;
  }
  const float denom = FT_ADD(sqrtf(second) / s.bc2_sqrt, s.eps);
  p = FT_ADD(p, FT_MUL(s.neg_step_size, m) / denom);
}

}  // namespace fasttrain
