// Rotary position embedding on the CPU, x (B, T, H, D) read once and the result written once, forward and backward
// (the backward is the rotation by the opposite angle, conjugate=true); the reference is
// fasttrain.ops.rotary.apply_rotary_emb_reference, which makes an fp32 copy, slices, four products and two cats (and
// as many again backward), where this kernel moves the bytes of x.clone() (timings: benchmarks/NOTES.md).
// Pairs (i, i + R/2) (GPT-NeoX) or (2i, 2i + 1) (GPT-J), R = 2 * cos.size(-1) <= D; the dims past R are copied
// through. x may be a strided view with unit stride along D (q and k are slices of one qkv projection), so nothing is
// copied first. fp16/bf16 are computed in fp32 a token at a time.
// Ops (schemas in ops.cpp): fasttrain::rotary_cpu (out of place) and fasttrain::rotary_cpu_ (in place).
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <ATen/TensorIterator.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

#include "cpu_math.h"

namespace fasttrain {
namespace {

// One token's heads: o = x rotated by the angles whose cos/sin rows are c/s (sin negated when sign is -1). Heads are
// `x_head`/`o_head` floats apart; o may be x (in place): pair i reads and writes only its own two elements, so the
// iterations stay independent and `omp simd` holds either way.
FT_CPU_CLONES void rotate_token(const float* x, int64_t x_head, float* o, int64_t o_head, int64_t heads,
                                const float* c, const float* s, float sign, int64_t half, bool interleaved) {
  for (int64_t h = 0; h < heads; ++h) {
    const float* xh = x + h * x_head;
    float* oh = o + h * o_head;
    if (interleaved) {
#pragma omp simd
      for (int64_t i = 0; i < half; ++i) {
        const float x1 = xh[2 * i], x2 = xh[2 * i + 1], si = sign * s[i];
        oh[2 * i] = x1 * c[i] - x2 * si;
        oh[2 * i + 1] = x2 * c[i] + x1 * si;
      }
    } else {
#pragma omp simd
      for (int64_t i = 0; i < half; ++i) {
        const float x1 = xh[i], x2 = xh[i + half], si = sign * s[i];
        oh[i] = x1 * c[i] - x2 * si;
        oh[i + half] = x2 * c[i] + x1 * si;
      }
    }
  }
}

struct Rotation {
  int64_t B, T, H, D, half;
  const float* cos;        // (n_pos, half), or (B * T, half) per sequence; contiguous fp32
  const float* sin;
  bool per_sequence;
  const int64_t* offsets;  // (B,) or null
  int64_t offset;
  bool interleaved;
  float sign;              // -1: rotate by the opposite angle (the backward)

  int64_t n_pos;           // rows in the shared table

  int64_t row(int64_t b, int64_t t) const {
    return per_sequence ? b * T + t : t + offset + (offsets ? offsets[b] : 0);
  }
  // Whether token (b, t) has a row: tensor offsets may run past the table (flash-attn's kernel leaves such a row
  // unrotated; checking them first would sync a GPU). Compared without a sum that could overflow: |offset| <= n_pos.
  bool in_table(int64_t b, int64_t t) const {
    if (per_sequence || !offsets) return true;
    const int64_t base = t + offset;
    return offsets[b] >= -base && offsets[b] < n_pos - base;
  }
};

// out (may be x) = x rotated; strides in elements, unit along D for both.
template <typename T>
void rotate(const Rotation& r, const T* x, at::IntArrayRef xs, T* out, at::IntArrayRef os) {
  const int64_t tokens = r.B * r.T, per_token = r.H * r.D, rot = 2 * r.half;
  const bool copy_pass = rot < r.D && out != x;
  // Tokens per thread at least: ATen's grain for its own elementwise kernels, 32k elements.
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(per_token, 1));
  at::parallel_for(0, tokens, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> buffer(std::is_same_v<T, float> ? 0 : r.H * rot);  // the token's rotated dims, (H, R)
    for (int64_t token = begin; token < end; ++token) {
      const int64_t b = token / r.T, t = token % r.T;
      const T* xt = x + b * xs[0] + t * xs[1];
      T* ot = out + b * os[0] + t * os[1];
      if (!r.in_table(b, t)) {  // the identity rotation: a copy, or nothing in place
        if (out != x) {
          for (int64_t h = 0; h < r.H; ++h) std::memcpy(ot + h * os[2], xt + h * xs[2], r.D * sizeof(T));
        }
        continue;
      }
      const float* c = r.cos + r.row(b, t) * r.half;
      const float* s = r.sin + r.row(b, t) * r.half;
      if constexpr (std::is_same_v<T, float>) {
        rotate_token(xt, xs[2], ot, os[2], r.H, c, s, r.sign, r.half, r.interleaved);
      } else {
        for (int64_t h = 0; h < r.H; ++h) widen(xt + h * xs[2], buffer.data() + h * rot, rot);
        rotate_token(buffer.data(), rot, buffer.data(), rot, r.H, c, s, r.sign, r.half, r.interleaved);
        for (int64_t h = 0; h < r.H; ++h) narrow(buffer.data() + h * rot, ot + h * os[2], rot);
      }
      if (copy_pass) {
        for (int64_t h = 0; h < r.H; ++h) {
          std::memcpy(ot + h * os[2] + rot, xt + h * xs[2] + rot, (r.D - rot) * sizeof(T));
        }
      }
    }
  });
}

// Checks the inputs the Python wrapper already validated (a direct caller of torch.ops.fasttrain gets an error, not a
// wild read) and rotates x into out.
void rotary_into(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                 const std::optional<at::Tensor>& offsets, int64_t offset, bool interleaved, bool conjugate,
                 at::Tensor& out) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 4, "rotary_cpu: x must be a (B, T, H, D) CPU tensor, got ",
              x.sizes());
  TORCH_CHECK(cos.device().is_cpu() && sin.device().is_cpu() && cos.sizes() == sin.sizes() &&
                  (cos.dim() == 2 || cos.dim() == 3) && cos.is_floating_point() && sin.is_floating_point(),
              "rotary_cpu: cos and sin must be floating-point CPU tensors of one shape, (T_ro, R/2) or (B, T, R/2)");
  TORCH_CHECK(out.sizes() == x.sizes() && out.scalar_type() == x.scalar_type(),
              "rotary_cpu: out must have x's shape and dtype");
  const int64_t B = x.size(0), T = x.size(1), half = cos.size(-1);
  const bool per_sequence = cos.dim() == 3;
  TORCH_CHECK(2 * half <= x.size(3), "rotary_cpu: cos/sin have ", half, " columns, more than head_dim / 2");
  TORCH_CHECK(!per_sequence || (cos.size(0) == B && cos.size(1) == T),
              "rotary_cpu: per-sequence cos/sin must be (B, T, R/2)");
  TORCH_CHECK(!per_sequence || (offset == 0 && !offsets), "rotary_cpu: offsets need a shared (T_ro, R/2) table");
  if (offsets) {
    TORCH_CHECK(offsets->device().is_cpu() && offsets->dim() == 1 && offsets->size(0) == B &&
                    at::isIntegralType(offsets->scalar_type(), /*includeBool=*/false),
                "rotary_cpu: offsets must be a (B,) integer CPU tensor");
  }
  if (x.numel() == 0) return;  // also before the stride checks: a sum's empty upstream gradient has stride 0 on D
  TORCH_CHECK(x.stride(3) == 1 && out.stride(3) == 1, "rotary_cpu: x and out need unit stride along D");
  const at::Tensor c = cos.to(at::kFloat).contiguous(), s = sin.to(at::kFloat).contiguous();
  // Rows t + offset, t < T, must lie in [0, n_pos); with tensor offsets a row outside passes through unrotated (as
  // on the Triton kernel), and offset is bounded so that Rotation::in_table's comparisons cannot overflow int64.
  const int64_t n_pos = per_sequence ? T : cos.size(0);
  at::Tensor offs;
  if (offsets) {
    TORCH_CHECK(-n_pos <= offset && offset <= n_pos, "rotary_cpu: offset ", offset, " with seqlen_offsets is past the ",
                n_pos, " positions of cos/sin");
    offs = offsets->to(at::kLong).contiguous();
  } else if (!per_sequence) {
    TORCH_CHECK(offset >= 0 && offset <= n_pos - T, "rotary_cpu: offset ", offset, " + T = ", T,
                " is past the ", n_pos, " positions of cos/sin");
  }
  const Rotation r{B, T, x.size(2), x.size(3), half, c.data_ptr<float>(), s.data_ptr<float>(), per_sequence,
                   offsets ? offs.data_ptr<int64_t>() : nullptr, offset, interleaved, conjugate ? -1.0f : 1.0f, n_pos};
  dispatch_dtype(x.scalar_type(), "rotary", [&](auto* type) {
    using T_ = std::remove_pointer_t<decltype(type)>;
    rotate<T_>(r, x.data_ptr<T_>(), x.strides(), out.data_ptr<T_>(), out.strides());
  });
}

at::Tensor rotary_cpu(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                      const std::optional<at::Tensor>& offsets, int64_t offset, bool interleaved, bool conjugate) {
  at::Tensor out = at::empty(x.sizes(), x.options());
  rotary_into(x, cos, sin, offsets, offset, interleaved, conjugate, out);
  return out;
}

void rotary_cpu_(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, const std::optional<at::Tensor>& offsets,
                 int64_t offset, bool interleaved) {
  at::assert_no_internal_overlap(x);  // an expanded x would be rotated once per alias, by racing threads
  rotary_into(x, cos, sin, offsets, offset, interleaved, false, x);
}

}  // namespace

TORCH_LIBRARY_IMPL(fasttrain, CPU, m) {
  m.impl("rotary_cpu", &rotary_cpu);
  m.impl("rotary_cpu_", &rotary_cpu_);
}

}  // namespace fasttrain
