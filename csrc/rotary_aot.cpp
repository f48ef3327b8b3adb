// Rotary embedding of x (B, T, H, D) launched from C++: the rotary Triton kernel (kernels/rotary.py) compiled ahead of
// time and shipped as cubins (aot_launch.h), so an eager call costs no Python launcher, and the autograd below keeps
// an eager forward + backward out of Python (the backward is the same op with conjugate flipped: a rotation's
// transpose is the rotation by the opposite angle). The launch is the Python launcher's (kernels/rotary.py `rotary`)
// on a GPU: one program per (token, block of heads), the blocks of `blocks`, every argument as it passes them.
// The case is looked up by the pointers' element types (x and out in x's dtype; the tables'; the offsets', int64 when
// absent) and the constexprs; a call outside the shipped set (kernels/rotary.py aot_kernels(shipped=True)) is an error
// naming it, which fasttrain/ops/rotary.py's aot column never sends.
// Ops (schemas in ops.cpp): fasttrain::rotary_aot (out of place, Autograd) and fasttrain::rotary_aot_ (in place, no
// autograd); CUDA, and CPU while the launches are recorded (aot_launch.h); Meta for tracing.
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <c10/core/ScalarType.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>

#include "aot_launch.h"

namespace fasttrain {
namespace {

using at::Tensor;
using std::optional;

constexpr int64_t kBlockT = 1;     // kernels/rotary.py tokens_per_block on a GPU
constexpr int64_t kPassBlock = 64;  // kernels/rotary.py PASS_BLOCK

int64_t next_power_of_2(int64_t n) {
  int64_t p = 1;
  while (p < n) p *= 2;
  return p;
}

bool aligned16(const Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

// A pointer the cubin was compiled to take 16-byte aligned: a table or offsets view at an odd address is copied, as
// the JIT would compile another kernel for it rather than launch this one.
Tensor aligned(const Tensor& t) { return aligned16(t) ? t : t.clone(at::MemoryFormat::Contiguous); }

// x's (B, T, H) strides were compiled as multiples of 16 (tools/aot.py `divisible`).
bool strides16(const Tensor& x) { return x.stride(0) % 16 == 0 && x.stride(1) % 16 == 0 && x.stride(2) % 16 == 0; }

// The checks of fasttrain/ops/rotary.py's _check that reach the op (a direct caller gets an error, not a wild read),
// with its messages; offsets' values are not read (that would sync: a row past the table passes through unrotated).
void check(const char* name, const Tensor& x, const Tensor& cos, const Tensor& sin, const optional<Tensor>& offsets,
           int64_t offset) {
  TORCH_CHECK_TYPE(x.is_floating_point(), name, ": x must be a floating-point tensor, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() == 4, name, ": x must be a (B, T, H, D) tensor, got shape ", x.sizes());
  TORCH_CHECK(x.is_cuda() || (x.is_cpu() && aot::recording()), name,
              ": takes CUDA tensors (CPU tensors only while launches are recorded), got ", x.device());
  const int64_t B = x.size(0), T = x.size(1), D = x.size(3);
  for (const auto& [arg, t] : {std::pair<const char*, const Tensor&>{"cos", cos}, {"sin", sin}}) {
    TORCH_CHECK_TYPE(t.is_floating_point(), name, ": ", arg, " must be a floating-point tensor, got ",
                     t.scalar_type());
    TORCH_CHECK_VALUE(t.dim() == 2 || t.dim() == 3, name, ": ", arg,
                      " must be a (T_ro, R/2) or (B, T, R/2) tensor, got shape ", t.sizes());
    TORCH_CHECK_VALUE(t.device() == x.device(), name, ": ", arg, " must be on x's device (", x.device(), "), got ",
                      t.device());
    TORCH_CHECK_VALUE(t.stride(-1) == 1, name, ": ", arg, " must have unit stride along R/2");
  }
  TORCH_CHECK_VALUE(sin.sizes() == cos.sizes(), name, ": sin must have cos's shape ", cos.sizes(), ", got ",
                    sin.sizes());
  TORCH_CHECK_VALUE(1 <= 2 * cos.size(-1) && 2 * cos.size(-1) <= D, name, ": cos/sin must have 1..", D / 2,
                    " columns (rotary_dim / 2 <= head_dim / 2), got ", cos.size(-1));
  if (offsets) {
    TORCH_CHECK_TYPE(at::isIntegralType(offsets->scalar_type(), /*includeBool=*/false), name,
                     ": seqlen_offsets must be an int or an integer tensor, got ", offsets->scalar_type());
    TORCH_CHECK_VALUE(offsets->dim() == 1 && offsets->size(0) == B, name,
                      ": seqlen_offsets must be an integer tensor of shape (", B, ",), got ", offsets->sizes());
    TORCH_CHECK_VALUE(offsets->device() == x.device(), name, ": seqlen_offsets must be on x's device (", x.device(),
                      ")");
  }
  TORCH_CHECK_VALUE(offset >= 0, name, ": seqlen_offsets must be an int >= 0, got ", offset);
  if (cos.dim() == 3) {
    TORCH_CHECK_VALUE(cos.size(0) == B && cos.size(1) == T, name, ": per-sequence cos/sin must be (", B, ", ", T,
                      ", R/2), got ", cos.sizes());
    TORCH_CHECK_VALUE(offset == 0 && !offsets, name,
                      ": seqlen_offsets must be 0 with per-sequence (B, T, R/2) cos/sin");
  } else if (!offsets) {
    TORCH_CHECK_VALUE(offset + T <= cos.size(0), name, ": cos/sin have ", cos.size(0),
                      " positions, fewer than seqlen_offsets + T = ", offset + T);
  }
}

// kernels/rotary.py `rotary` on a GPU: x rotated into out (x itself in place), same grid and arguments.
void launch_rotary(const Tensor& x, const Tensor& cos_in, const Tensor& sin_in, const optional<Tensor>& offsets_in,
                   int64_t offset, bool interleaved, bool conjugate, const Tensor& out) {
  const int64_t B = x.size(0), T = x.size(1), H = x.size(2), D = x.size(3);
  if (B * T == 0 || H == 0) return;
  const Tensor cos = aligned(cos_in), sin = aligned(sin_in);
  const optional<Tensor> offsets = offsets_in ? optional<Tensor>(aligned(*offsets_in)) : std::nullopt;
  const int64_t half = cos.size(-1), n_pass = D - 2 * half;
  const bool per_sequence = cos.dim() == 3;
  const int64_t block_r = next_power_of_2(std::max<int64_t>(half, 1));
  const int64_t block_h = std::min(next_power_of_2(H), std::max<int64_t>(1, 2048 / block_r));
  const bool copy_pass = n_pass > 0 && out.data_ptr() != x.data_ptr();
  const aot::Entry& e = aot::find(
      aot::Kernel::Rotary,
      {x.scalar_type(), cos.scalar_type(), sin.scalar_type(), offsets ? offsets->scalar_type() : at::kLong,
       out.scalar_type()},
      {interleaved, conjugate, per_sequence, offsets.has_value(), copy_pass, kBlockT, block_h, block_r, kPassBlock});
  const c10::DeviceIndex device = x.is_cuda() ? x.device().index() : -1;
  const aot::Grid grid{static_cast<uint32_t>((B * T + kBlockT - 1) / kBlockT), static_cast<uint32_t>((H + block_h - 1) / block_h), 1};
  aot::launch(e, grid, device,
              {aot::ptr(x), aot::ptr(cos), aot::ptr(sin), aot::ptr(offsets), aot::ptr(out), aot::integer(B * T),
               aot::integer(T), aot::integer(H), aot::integer(cos.size(-2)), aot::integer(offset),
               aot::integer(half), aot::integer(n_pass), aot::integer(x.stride(0)), aot::integer(x.stride(1)),
               aot::integer(x.stride(2)), aot::integer(out.stride(0)), aot::integer(out.stride(1)),
               aot::integer(out.stride(2)), aot::integer(per_sequence ? cos.stride(0) : 0),
               aot::integer(cos.stride(-2))});
}

Tensor rotary_aot(const Tensor& x_in, const Tensor& cos, const Tensor& sin, const optional<Tensor>& offsets,
                  int64_t offset, bool interleaved, bool conjugate) {
  check("rotary_aot", x_in, cos, sin, offsets, offset);
  // The cubins take unit stride along D, (B, T, H) strides that are multiples of 16 and an aligned x: any other view
  // (a sum's expanded upstream gradient, a transposed one) is copied first, as the Python path copies a D-strided one.
  const Tensor x =
      x_in.stride(3) == 1 && strides16(x_in) && aligned16(x_in) ? x_in : x_in.clone(at::MemoryFormat::Contiguous);
  Tensor out = at::empty(x.sizes(), x.options());
  launch_rotary(x, cos, sin, offsets, offset, interleaved, conjugate, out);
  return out;
}

void rotary_aot_(Tensor& x, const Tensor& cos, const Tensor& sin, const optional<Tensor>& offsets, int64_t offset,
                 bool interleaved) {
  check("rotary_aot_", x, cos, sin, offsets, offset);
  if (x.numel() == 0 || (x.stride(3) == 1 && strides16(x) && aligned16(x))) {
    launch_rotary(x, cos, sin, offsets, offset, interleaved, false, x);
  } else {  // a layout the cubins were not compiled for: rotated in a contiguous copy, then copied back
    Tensor rotated = x.clone(at::MemoryFormat::Contiguous);
    launch_rotary(rotated, cos, sin, offsets, offset, interleaved, false, rotated);
    x.copy_(rotated);
  }
  torch::autograd::impl::bump_version(x);  // as a registered in-place op does: a saved x is seen as modified
}

// ---- Meta: shapes and dtypes only, for torch.compile's fake tensors ----

Tensor rotary_aot_meta(const Tensor& x, const Tensor&, const Tensor&, const optional<Tensor>&, int64_t, bool, bool) {
  return at::empty(x.sizes(), x.options());
}

void rotary_aot__meta(Tensor&, const Tensor&, const Tensor&, const optional<Tensor>&, int64_t, bool) {}

// ---- Autograd: fasttrain/ops/rotary.py's setup_context and backward ----

struct RotaryAot : public torch::autograd::Function<RotaryAot> {
  static Tensor forward(torch::autograd::AutogradContext* ctx, const Tensor& x, const Tensor& cos, const Tensor& sin,
                        const optional<Tensor>& offsets, int64_t offset, bool interleaved, bool conjugate) {
    static const auto op =
        c10::Dispatcher::singleton().findSchemaOrThrow("fasttrain::rotary_aot", "").typed<decltype(rotary_aot)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    // The tables get no gradient (fasttrain/ops/rotary.py detaches them): saved as plain inputs.
    ctx->save_for_backward({cos, sin, offsets ? *offsets : Tensor()});
    ctx->saved_data["offset"] = offset;
    ctx->saved_data["interleaved"] = interleaved;
    ctx->saved_data["conjugate"] = conjugate;
    return op.call(x, cos, sin, offsets, offset, interleaved, conjugate);
  }

  static std::vector<Tensor> backward(torch::autograd::AutogradContext* ctx, std::vector<Tensor> grads) {
    static const auto op =
        c10::Dispatcher::singleton().findSchemaOrThrow("fasttrain::rotary_aot", "").typed<decltype(rotary_aot)>();
    const auto saved = ctx->get_saved_variables();
    const optional<Tensor> offsets = saved[2].defined() ? optional<Tensor>(saved[2]) : std::nullopt;
    const int64_t offset = ctx->saved_data["offset"].toInt();
    const bool interleaved = ctx->saved_data["interleaved"].toBool();
    const bool conjugate = ctx->saved_data["conjugate"].toBool();
    Tensor dx;
    if (grads[0].defined()) {
      if (at::GradMode::is_enabled()) {  // a double backward: the op again, through its autograd (it is linear)
        dx = op.call(grads[0], saved[0], saved[1], offsets, offset, interleaved, !conjugate);
      } else {
        at::AutoDispatchBelowADInplaceOrView guard;
        dx = op.call(grads[0], saved[0], saved[1], offsets, offset, interleaved, !conjugate);
      }
    }
    return {dx, Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

Tensor rotary_aot_autograd(const Tensor& x, const Tensor& cos, const Tensor& sin, const optional<Tensor>& offsets,
                           int64_t offset, bool interleaved, bool conjugate) {
  return RotaryAot::apply(x, cos, sin, offsets, offset, interleaved, conjugate);
}

}  // namespace

TORCH_LIBRARY_IMPL(fasttrain, CUDA, m) {
  m.impl("rotary_aot", &rotary_aot);
  m.impl("rotary_aot_", &rotary_aot_);
}

TORCH_LIBRARY_IMPL(fasttrain, CPU, m) {
  m.impl("rotary_aot", &rotary_aot);
  m.impl("rotary_aot_", &rotary_aot_);
}

TORCH_LIBRARY_IMPL(fasttrain, Meta, m) {
  m.impl("rotary_aot", &rotary_aot_meta);
  m.impl("rotary_aot_", &rotary_aot__meta);
}

TORCH_LIBRARY_IMPL(fasttrain, Autograd, m) {
  m.impl("rotary_aot", &rotary_aot_autograd);
  // In place and without a gradient: an error if x requires grad.
  m.impl("rotary_aot_", torch::autograd::autogradNotImplementedFallback());
}

}  // namespace fasttrain
