// LayerNorm and RMSNorm on rows (M, N), with the residual add optionally fused, launched from C++: the norms' Triton
// kernels (kernels/norms.py) compiled ahead of time and shipped as cubins (aot_launch.h), so an eager call costs no
// Python launcher, and the autograd below keeps an eager forward + backward out of Python. The ops compute what the
// Python launcher (kernels/norms.py norm_forward / norm_backward) computes on a GPU, with the same launches: one
// program per row forward; 4 per SM (at most one per row) backward, each writing a partial row of dw/db summed here.
// The dtypes a call may mix are the shipped profiles of kernels/norms.py (_pointer_types): one dtype throughout; fp32
// rows with the output in half precision (autocast); a half-precision branch added onto an fp32 residual. The case is
// looked up by each pointer's element type, an absent tensor counting as the profile's (the rows' dtype: the stream's
// for weight, bias, dres and dx2, x's for the residual); a mix that was not shipped is an error naming it, which
// fasttrain/ops/norms.py's aot column never sends. Statistics fp32.
// Ops (schemas in ops.cpp): fasttrain::norm_forward_aot, fasttrain::norm_backward_aot; CUDA, and CPU while the
// launches are recorded (aot_launch.h); Meta for tracing; Autograd for norm_forward_aot.
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <c10/core/ScalarType.h>
#include <ATen/ops/zeros_like.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>

#include "aot_launch.h"

namespace fasttrain {
namespace {

using at::Tensor;
using std::optional;

// kernels/norms.py block_and_warps: the row in registers, 8 elements per thread forward, 4 backward, up to 16 warps.
int64_t block_of(int64_t n_cols) {
  int64_t block = 1;
  while (block < n_cols) block *= 2;
  return block;
}

// A pointer the cubins were compiled to take 16-byte aligned (every tensor argument): an input that is not (a view
// at an odd offset) is copied, as the JIT would compile another kernel for it rather than launch this one.
Tensor aligned(const Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 ? t : t.clone(at::MemoryFormat::Contiguous);
}
optional<Tensor> aligned(const optional<Tensor>& t) {
  return t ? optional<Tensor>(aligned(*t)) : std::nullopt;
}

c10::DeviceIndex launch_device(const Tensor& x) {
  TORCH_CHECK(x.is_cuda() || (x.is_cpu() && aot::recording()),
              "norm_forward_aot: takes CUDA tensors (CPU tensors only while launches are recorded), got ", x.device());
  return x.is_cuda() ? x.device().index() : -1;
}

void check_rows(const char* name, const char* arg, const Tensor& t, const Tensor& x) {
  TORCH_CHECK(t.dim() == 2 && t.sizes() == x.sizes() && t.stride(1) == 1 && t.device() == x.device(), name, ": ",
              arg, " must be (M, N) rows with unit column stride like x, on x's device");
}

void check_param(const char* name, const char* arg, const optional<Tensor>& t, const Tensor& x) {
  TORCH_CHECK(!t || (t->dim() == 1 && t->size(0) == x.size(1) && t->stride(0) == 1 && t->device() == x.device()),
              name, ": ", arg, " must be an (N,) unit-stride tensor on x's device");
}

at::ScalarType dtype_or(const optional<Tensor>& t, at::ScalarType absent) { return t ? t->scalar_type() : absent; }

std::tuple<Tensor, Tensor, Tensor, Tensor> norm_forward_aot(const Tensor& x_in, const optional<Tensor>& residual_in,
                                                            const optional<Tensor>& weight_in,
                                                            const optional<Tensor>& bias_in, double eps, bool is_rms,
                                                            at::ScalarType out_dtype) {
  constexpr const char* kName = "norm_forward_aot";
  TORCH_CHECK(x_in.dim() == 2 && x_in.stride(1) == 1, kName, ": x must be (M, N) rows with unit column stride");
  if (residual_in) check_rows(kName, "residual", *residual_in, x_in);
  check_param(kName, "weight", weight_in, x_in);
  check_param(kName, "bias", bias_in, x_in);
  const c10::DeviceIndex device = launch_device(x_in);
  const Tensor x = aligned(x_in);
  const optional<Tensor> residual = aligned(residual_in), weight = aligned(weight_in), bias = aligned(bias_in);
  const int64_t M = x.size(0), N = x.size(1);
  const auto opts = x.options();
  const at::ScalarType stream = residual ? at::promote_types(x.scalar_type(), residual->scalar_type()) : x.scalar_type();
  Tensor y = at::empty({M, N}, opts.dtype(out_dtype));
  Tensor s = at::empty(residual ? at::IntArrayRef{M, N} : at::IntArrayRef{0}, opts.dtype(stream));
  Tensor mean = at::empty({is_rms ? 0 : M}, opts.dtype(at::kFloat));
  Tensor rstd = at::empty({M}, opts.dtype(at::kFloat));
  if (M > 0) {
    const int64_t block = block_of(N);
    const aot::Entry& e = aot::find(aot::Kernel::NormForward,
                                    {x.scalar_type(), dtype_or(residual, x.scalar_type()), dtype_or(weight, stream),
                                     dtype_or(bias, stream), out_dtype, stream, at::kFloat, at::kFloat},
                                    {is_rms, residual.has_value(), weight.has_value(), bias.has_value(), 1, block});
    aot::launch(e, {static_cast<uint32_t>(M), 1, 1}, device,
                {aot::ptr(x), aot::ptr(residual), aot::ptr(weight), aot::ptr(bias), aot::ptr(y), aot::ptr(s),
                 aot::ptr(mean), aot::ptr(rstd), aot::integer(x.stride(0)),
                 aot::integer(residual ? residual->stride(0) : 0), aot::integer(y.stride(0)), aot::integer(M),
                 aot::integer(N), aot::real(eps)});
  }
  return {y, s, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> norm_backward_aot(const Tensor& dy_in, const Tensor& x_in,
                                                             const optional<Tensor>& weight_in, const Tensor& mean,
                                                             const Tensor& rstd, bool is_rms, bool has_bias,
                                                             const optional<Tensor>& dres_in,
                                                             optional<at::ScalarType> dx2_dtype) {
  constexpr const char* kName = "norm_backward_aot";
  TORCH_CHECK(x_in.dim() == 2 && x_in.stride(1) == 1, kName, ": x must be (M, N) rows with unit column stride");
  check_rows(kName, "dy", dy_in, x_in);
  if (dres_in) check_rows(kName, "dres", *dres_in, x_in);
  check_param(kName, "weight", weight_in, x_in);
  const int64_t M = x_in.size(0), N = x_in.size(1);
  TORCH_CHECK(rstd.dim() == 1 && rstd.size(0) == M && rstd.scalar_type() == at::kFloat && rstd.is_contiguous() &&
                  mean.dim() == 1 && mean.size(0) == (is_rms ? 0 : M) && mean.scalar_type() == at::kFloat &&
                  mean.is_contiguous(),
              kName, ": mean and rstd must be the forward's fp32 statistics");
  const c10::DeviceIndex device = launch_device(x_in);
  const Tensor dy = aligned(dy_in), x = aligned(x_in);
  const optional<Tensor> weight = aligned(weight_in), dres = aligned(dres_in);
  const auto opts = x.options();
  Tensor dx = at::empty({M, N}, opts);
  Tensor dx2 = at::empty(dx2_dtype ? at::IntArrayRef{M, N} : at::IntArrayRef{0}, opts.dtype(dx2_dtype.value_or(x.scalar_type())));
  // Programs: kernels/norms.py _programs, enough to fill every SM a few times over; each writes one partial row.
  const int64_t programs = std::max<int64_t>(1, std::min<int64_t>(M, 4 * aot::multiprocessors(device)));
  const int64_t rows_per_program = M ? (M + programs - 1) / programs : 0;
  const bool has_weight = weight.has_value();
  Tensor dw = at::empty(has_weight ? at::IntArrayRef{programs, N} : at::IntArrayRef{0}, opts.dtype(at::kFloat));
  Tensor db = at::empty(has_bias ? at::IntArrayRef{programs, N} : at::IntArrayRef{0}, opts.dtype(at::kFloat));
  if (M > 0) {
    const int64_t block = block_of(N);
    const at::ScalarType rows = x.scalar_type();
    const aot::Entry& e = aot::find(aot::Kernel::NormBackward,
                                    {dy.scalar_type(), rows, dtype_or(weight, rows), at::kFloat, at::kFloat,
                                     dtype_or(dres, rows), rows, dx2_dtype.value_or(rows), at::kFloat, at::kFloat},
                                    {is_rms, has_weight, has_bias, dres.has_value(), dx2_dtype.has_value(), 1, block});
    // Without dx2 the JIT gets None for DX2, the cubin a null pointer it never reads (HAS_DX2 is false).
    aot::launch(e, {static_cast<uint32_t>(programs), 1, 1}, device,
                {aot::ptr(dy), aot::ptr(x), aot::ptr(weight), aot::ptr(mean), aot::ptr(rstd), aot::ptr(dres),
                 aot::ptr(dx), aot::ptr(dx2_dtype ? dx2 : Tensor()), aot::ptr(dw), aot::ptr(db), aot::integer(dy.stride(0)),
                 aot::integer(x.stride(0)), aot::integer(dres ? dres->stride(0) : 0), aot::integer(dx.stride(0)),
                 aot::integer(M), aot::integer(N), aot::integer(rows_per_program)});
  } else {  // no rows, so no program ran: the (1, N) partials must read as zeros
    dw.zero_();
    db.zero_();
  }
  const auto param = opts.dtype(has_weight ? weight->scalar_type() : x.scalar_type());
  return {dx, dx2, has_weight ? dw.sum(0).to(param.dtype()) : at::empty({0}, param),
          has_bias ? db.sum(0).to(param.dtype()) : at::empty({0}, param)};
}

// ---- Meta: shapes and dtypes only, for torch.compile's fake tensors ----

std::tuple<Tensor, Tensor, Tensor, Tensor> norm_forward_aot_meta(const Tensor& x, const optional<Tensor>& residual,
                                                                 const optional<Tensor>&, const optional<Tensor>&,
                                                                 double, bool is_rms, at::ScalarType out_dtype) {
  const int64_t M = x.size(0), N = x.size(1);
  const auto opts = x.options();
  const at::ScalarType stream = residual ? at::promote_types(x.scalar_type(), residual->scalar_type()) : x.scalar_type();
  return {at::empty({M, N}, opts.dtype(out_dtype)),
          at::empty(residual ? at::IntArrayRef{M, N} : at::IntArrayRef{0}, opts.dtype(stream)),
          at::empty({is_rms ? 0 : M}, opts.dtype(at::kFloat)), at::empty({M}, opts.dtype(at::kFloat))};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> norm_backward_aot_meta(const Tensor&, const Tensor& x,
                                                                  const optional<Tensor>& weight, const Tensor&,
                                                                  const Tensor&, bool, bool has_bias,
                                                                  const optional<Tensor>&,
                                                                  optional<at::ScalarType> dx2_dtype) {
  const auto opts = x.options();
  const auto param = opts.dtype(weight ? weight->scalar_type() : x.scalar_type());
  return {at::empty(x.sizes(), opts),
          at::empty(dx2_dtype ? x.sizes() : at::IntArrayRef{0}, opts.dtype(dx2_dtype.value_or(x.scalar_type()))),
          at::empty({weight ? x.size(1) : 0}, param),
          at::empty({has_bias ? x.size(1) : 0}, param)};
}

// ---- Autograd: fasttrain/ops/norms.py's setup_context and backward, for the one-dtype calls this op takes ----

// What the backward needs of the forward's arguments, packed into one integer: flags in bits 0-2, dtypes above.
struct Call {
  bool is_rms, has_bias, has_residual;
  at::ScalarType x_dtype, residual_dtype;

  int64_t pack() const {
    return int64_t{is_rms} | int64_t{has_bias} << 1 | int64_t{has_residual} << 2 |
           static_cast<int64_t>(x_dtype) << 8 | static_cast<int64_t>(residual_dtype) << 16;
  }
  static Call unpack(int64_t v) {
    return {(v & 1) != 0, (v & 2) != 0, (v & 4) != 0, static_cast<at::ScalarType>((v >> 8) & 0xff),
            static_cast<at::ScalarType>((v >> 16) & 0xff)};
  }
};

struct NormAot : public torch::autograd::Function<NormAot> {
  static std::vector<Tensor> forward(torch::autograd::AutogradContext* ctx, const Tensor& x,
                                     const optional<Tensor>& residual, const optional<Tensor>& weight,
                                     const optional<Tensor>& bias, double eps, bool is_rms, at::ScalarType out_dtype) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("fasttrain::norm_forward_aot", "")
                               .typed<decltype(norm_forward_aot)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, s, mean, rstd] = op.call(x, residual, weight, bias, eps, is_rms, out_dtype);
    // The rows normalized: the new residual stream when the add is fused, else x.
    ctx->save_for_backward({residual ? s : x, weight ? *weight : Tensor(), mean, rstd});
    // One entry (each is a string-keyed map insertion): the flags, and with a residual the two inputs' dtypes.
    ctx->saved_data["call"] = Call{is_rms, bias.has_value(), residual.has_value(), x.scalar_type(),
                                   residual ? residual->scalar_type() : x.scalar_type()}
                                  .pack();
    ctx->mark_non_differentiable({mean, rstd});
    // An output nobody used (the final norm's residual stream) brings an undefined gradient, not zeros.
    ctx->set_materialize_grads(false);
    return {y, s, mean, rstd};
  }

  static std::vector<Tensor> backward(torch::autograd::AutogradContext* ctx, std::vector<Tensor> grads) {
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "norm_forward_aot: a double backward (create_graph=True) is not supported on the aot backend; "
                "set FASTTRAIN_AOT=0 or pass backend='triton'");
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("fasttrain::norm_backward_aot", "")
                               .typed<decltype(norm_backward_aot)>();
    const auto saved = ctx->get_saved_variables();
    const Tensor &rows = saved[0], &mean = saved[2], &rstd = saved[3];
    const optional<Tensor> weight = saved[1].defined() ? optional<Tensor>(saved[1]) : std::nullopt;
    const auto [is_rms, has_bias, has_residual, x_dtype, residual_dtype] = Call::unpack(ctx->saved_data["call"].toInt());
    // The kernels take any row stride but unit column stride (a sum's upstream gradient arrives expanded, stride 0).
    auto unit = [](const Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); };
    const Tensor dy = grads[0].defined() ? unit(grads[0]) : at::zeros_like(rows);
    if (!has_residual) {
      auto [dx, dx2, dw, db] = op.call(dy, rows, weight, mean, rstd, is_rms, has_bias, std::nullopt, std::nullopt);
      return {dx, Tensor(), weight ? dw : Tensor(), has_bias ? db : Tensor(), Tensor(), Tensor(), Tensor()};
    }
    // s = x + residual: both get the gradient arriving at s (through the norm and from the stream downstream), each
    // in its own dtype. s has the wider of the two, so at most one needs a second copy (dx2).
    optional<Tensor> dres;
    if (grads[1].defined()) dres = unit(grads[1]);
    optional<at::ScalarType> other;
    if (x_dtype != rows.scalar_type()) other = x_dtype;
    if (residual_dtype != rows.scalar_type()) other = residual_dtype;
    auto [dx, dx2, dw, db] = op.call(dy, rows, weight, mean, rstd, is_rms, has_bias, dres, other);
    return {x_dtype == other ? dx2 : dx, residual_dtype == other ? dx2 : dx, weight ? dw : Tensor(),
            has_bias ? db : Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

std::tuple<Tensor, Tensor, Tensor, Tensor> norm_forward_aot_autograd(const Tensor& x, const optional<Tensor>& residual,
                                                                     const optional<Tensor>& weight,
                                                                     const optional<Tensor>& bias, double eps,
                                                                     bool is_rms, at::ScalarType out_dtype) {
  // Nothing to record (no_grad, or no input that takes a gradient, and no forward-mode tangent): the op below
  // autograd, sparing the autograd Function's node, context and output wrapping.
  auto recorded = [](const optional<Tensor>& t) {
    return t && ((at::GradMode::is_enabled() && t->requires_grad()) || t->_fw_grad(0).defined());
  };
  if (!recorded(x) && !recorded(residual) && !recorded(weight) && !recorded(bias)) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("fasttrain::norm_forward_aot", "")
                               .typed<decltype(norm_forward_aot)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    return op.call(x, residual, weight, bias, eps, is_rms, out_dtype);
  }
  auto out = NormAot::apply(x, residual, weight, bias, eps, is_rms, out_dtype);
  return {out[0], out[1], out[2], out[3]};
}

}  // namespace

TORCH_LIBRARY_IMPL(fasttrain, CUDA, m) {
  m.impl("norm_forward_aot", &norm_forward_aot);
  m.impl("norm_backward_aot", &norm_backward_aot);
}

TORCH_LIBRARY_IMPL(fasttrain, CPU, m) {
  m.impl("norm_forward_aot", &norm_forward_aot);
  m.impl("norm_backward_aot", &norm_backward_aot);
}

TORCH_LIBRARY_IMPL(fasttrain, Meta, m) {
  m.impl("norm_forward_aot", &norm_forward_aot_meta);
  m.impl("norm_backward_aot", &norm_backward_aot_meta);
}

TORCH_LIBRARY_IMPL(fasttrain, Autograd, m) { m.impl("norm_forward_aot", &norm_forward_aot_autograd); }

}  // namespace fasttrain
