// Cross-entropy over logits (N, V) launched from C++: the Triton kernels of kernels/cross_entropy.py compiled ahead
// of time and shipped as cubins (aot_launch.h), so an eager call costs no Python launcher, and the autograd below
// keeps an eager forward + backward out of Python. The ops compute what the Python launchers
// (kernels/cross_entropy.py cross_entropy_forward / cross_entropy_backward) compute, with the same launches: one
// program per row, BLOCK_V columns per chunk, whatever the vocabulary. The forward op reduces the per-row losses as
// fasttrain/ops/cross_entropy.py does after its registered op ("none", "sum", or "mean": the sum over the rows not
// ignored, divided by their count, NaN when every row is), so a public call makes one C++ call; its autograd gives the
// backward op the per-row gradient those torch ops' autograd would.
// Logits fp16, bf16 or fp32; targets int64; loss and logsumexp fp32. The cubins were compiled for 16-byte aligned
// pointers: a misaligned target or upstream gradient (a shifted view of the tokens) is copied, as is misaligned logits
// (which the op's aot column sends to the JIT instead, sparing the copy).
// Ops (schemas in ops.cpp): fasttrain::cross_entropy_forward_aot, fasttrain::cross_entropy_backward_aot; CUDA, and CPU
// while the launches are recorded (aot_launch.h); Meta for tracing; Autograd for cross_entropy_forward_aot.
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/div.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/ne.h>
#include <ATen/ops/sum.h>
#include <c10/core/ScalarType.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "aot_launch.h"

namespace fasttrain {
namespace {

using at::Tensor;

// kernels/cross_entropy.py BLOCK_V: the compiled case's constexpr (a mismatch finds no shipped cubin).
constexpr int64_t kBlockV = 4096;

Tensor aligned(const Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 ? t : t.clone(at::MemoryFormat::Contiguous);
}

// The (N,) per-row vectors the kernels index by row: unit stride, 16-byte aligned.
Tensor rows_vector(const Tensor& t) { return aligned(t.is_contiguous() ? t : t.contiguous()); }

c10::DeviceIndex launch_device(const char* name, const Tensor& logits) {
  TORCH_CHECK(logits.is_cuda() || (logits.is_cpu() && aot::recording()), name,
              ": takes CUDA tensors (CPU tensors only while launches are recorded), got ", logits.device());
  return logits.is_cuda() ? logits.device().index() : -1;
}

void check_logits(const char* name, const Tensor& logits) {
  TORCH_CHECK(logits.dim() == 2 && logits.size(1) >= 1 && logits.stride(1) == 1, name,
              ": logits must be (N, V) with V >= 1 and unit column stride");
}

void check_row_vector(const char* name, const char* arg, const Tensor& t, const Tensor& logits,
                      at::ScalarType dtype) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == logits.size(0) && t.scalar_type() == dtype &&
                  t.device() == logits.device(),
              name, ": ", arg, " must be an (N,) ", c10::toString(dtype), " tensor on logits' device");
}

enum class Reduction { None, Sum, Mean };

Reduction reduction_of(const char* name, c10::string_view reduction) {
  if (reduction == "none") return Reduction::None;
  if (reduction == "sum") return Reduction::Sum;
  TORCH_CHECK(reduction == "mean", name, ": reduction must be one of ('mean', 'sum', 'none'), got '", reduction, "'");
  return Reduction::Mean;
}

// The per-row losses before the reduction, and their logsumexp.
std::tuple<Tensor, Tensor> cross_entropy_rows(const Tensor& logits_in, const Tensor& target_in, int64_t ignore_index) {
  constexpr const char* kName = "cross_entropy_forward_aot";
  check_logits(kName, logits_in);
  check_row_vector(kName, "target", target_in, logits_in, at::kLong);
  const c10::DeviceIndex device = launch_device(kName, logits_in);
  const Tensor logits = aligned(logits_in), target = rows_vector(target_in);
  const int64_t N = logits.size(0), V = logits.size(1);
  const auto opts = logits.options().dtype(at::kFloat);
  Tensor loss = at::empty({N}, opts), lse = at::empty({N}, opts);
  if (N > 0) {
    const aot::Entry& e = aot::find(aot::Kernel::CrossEntropyForward,
                                    {logits.scalar_type(), at::kLong, at::kFloat, at::kFloat}, {kBlockV});
    aot::launch(e, {static_cast<uint32_t>(N), 1, 1}, device,
                {aot::ptr(logits), aot::ptr(target), aot::ptr(loss), aot::ptr(lse), aot::integer(logits.stride(0)),
                 aot::integer(V), aot::integer(ignore_index)});
  }
  return {loss, lse};
}

// The rows not ignored (0-dim): the mean's divisor, as fasttrain/ops/cross_entropy.py counts them. Summed as fp32,
// the type the division casts the count to anyway: the sum casts the mask once, and neither division casts again.
Tensor kept_rows(const Tensor& target, int64_t ignore_index) { return at::ne(target, ignore_index).sum(at::kFloat); }

std::tuple<Tensor, Tensor> cross_entropy_forward_aot(const Tensor& logits, const Tensor& target, int64_t ignore_index,
                                                     c10::string_view reduction) {
  const Reduction r = reduction_of("cross_entropy_forward_aot", reduction);
  auto [loss, lse] = cross_entropy_rows(logits, target, ignore_index);
  if (r == Reduction::Sum) return {loss.sum(), lse};
  if (r == Reduction::Mean) return {loss.sum().div_(kept_rows(target, ignore_index)), lse};
  return {loss, lse};
}

Tensor cross_entropy_backward_aot(const Tensor& grad_row_in, const Tensor& logits_in, const Tensor& target_in,
                                  const Tensor& lse_in, int64_t ignore_index) {
  constexpr const char* kName = "cross_entropy_backward_aot";
  check_logits(kName, logits_in);
  check_row_vector(kName, "grad_row", grad_row_in, logits_in, at::kFloat);
  check_row_vector(kName, "target", target_in, logits_in, at::kLong);
  check_row_vector(kName, "lse", lse_in, logits_in, at::kFloat);
  const c10::DeviceIndex device = launch_device(kName, logits_in);
  const Tensor logits = aligned(logits_in), target = rows_vector(target_in);
  const Tensor grad_row = rows_vector(grad_row_in), lse = rows_vector(lse_in);
  const int64_t N = logits.size(0), V = logits.size(1);
  Tensor grad = at::empty({N, V}, logits.options());
  if (N > 0) {
    const at::ScalarType dtype = logits.scalar_type();
    const aot::Entry& e = aot::find(aot::Kernel::CrossEntropyBackward,
                                    {at::kFloat, dtype, at::kLong, at::kFloat, dtype}, {kBlockV});
    aot::launch(e, {static_cast<uint32_t>(N), 1, 1}, device,
                {aot::ptr(grad_row), aot::ptr(logits), aot::ptr(target), aot::ptr(lse), aot::ptr(grad),
                 aot::integer(logits.stride(0)), aot::integer(grad.stride(0)), aot::integer(V),
                 aot::integer(ignore_index)});
  }
  return grad;
}

// ---- Meta: shapes and dtypes only, for torch.compile's fake tensors ----

std::tuple<Tensor, Tensor> cross_entropy_forward_aot_meta(const Tensor& logits, const Tensor&, int64_t,
                                                          c10::string_view reduction) {
  const auto opts = logits.options().dtype(at::kFloat);
  const bool rows = reduction_of("cross_entropy_forward_aot", reduction) == Reduction::None;
  return {at::empty(rows ? at::IntArrayRef{logits.size(0)} : at::IntArrayRef{}, opts),
          at::empty({logits.size(0)}, opts)};
}

Tensor cross_entropy_backward_aot_meta(const Tensor&, const Tensor& logits, const Tensor&, const Tensor&, int64_t) {
  return at::empty(logits.sizes(), logits.options());
}

// ---- Autograd: fasttrain/ops/cross_entropy.py's setup_context and backward, and its reduction's ----

struct CrossEntropyAot : public torch::autograd::Function<CrossEntropyAot> {
  static std::vector<Tensor> forward(torch::autograd::AutogradContext* ctx, const Tensor& logits,
                                     const Tensor& target, int64_t ignore_index, c10::string_view reduction) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("fasttrain::cross_entropy_forward_aot", "")
                               .typed<decltype(cross_entropy_forward_aot)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    const Reduction r = reduction_of("cross_entropy_forward_aot", reduction);
    auto [loss, lse] = op.call(logits, target, ignore_index, "none");
    Tensor count;
    if (r == Reduction::Mean) count = kept_rows(target, ignore_index);
    ctx->save_for_backward({logits, target, lse, count});
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->saved_data["reduction"] = static_cast<int64_t>(r);
    if (r == Reduction::Sum) loss = loss.sum();
    if (r == Reduction::Mean) loss = loss.sum().div_(count);  // the fresh sum divided in place
    ctx->mark_non_differentiable({lse});  // the logsumexp never leaves cross_entropy
    ctx->set_materialize_grads(false);      // so the backward gets no zeros made for it
    return {loss, lse};
  }

  static std::vector<Tensor> backward(torch::autograd::AutogradContext* ctx, std::vector<Tensor> grads) {
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "cross_entropy_forward_aot: a double backward (create_graph=True) is not supported on the aot "
                "backend; set FASTTRAIN_AOT=0 or pass backend='triton'");
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("fasttrain::cross_entropy_backward_aot", "")
                               .typed<decltype(cross_entropy_backward_aot)>();
    if (!grads[0].defined()) return {Tensor(), Tensor(), Tensor(), Tensor()};  // no gradient reached the loss
    const auto saved = ctx->get_saved_variables();
    // The per-row gradient, fp32 and unit stride: a sum's spreads the upstream gradient over the rows; a mean's also
    // divides it by the count, the values torch's autograd of sum / count gives.
    const auto r = static_cast<Reduction>(ctx->saved_data["reduction"].toInt());
    Tensor grad_row = grads[0].to(at::kFloat);
    if (r != Reduction::None) grad_row = grad_row.expand({saved[0].size(0)});
    if (r == Reduction::Mean) grad_row = at::div(grad_row, saved[3]);  // a new dense (N,) vector: no copy below
    grad_row = grad_row.contiguous();
    Tensor grad = op.call(grad_row, saved[0], saved[1], saved[2], ctx->saved_data["ignore_index"].toInt());
    return {grad, Tensor(), Tensor(), Tensor()};
  }
};

std::tuple<Tensor, Tensor> cross_entropy_forward_aot_autograd(const Tensor& logits, const Tensor& target,
                                                              int64_t ignore_index, c10::string_view reduction) {
  // Nothing to record (no_grad, or logits that take no gradient, and no forward-mode tangent): the op below
  // autograd, sparing the autograd Function's node, context and output wrapping.
  if (!(at::GradMode::is_enabled() && logits.requires_grad()) && !logits._fw_grad(0).defined()) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("fasttrain::cross_entropy_forward_aot", "")
                               .typed<decltype(cross_entropy_forward_aot)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    return op.call(logits, target, ignore_index, reduction);
  }
  auto out = CrossEntropyAot::apply(logits, target, ignore_index, reduction);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(fasttrain, CUDA, m) {
  m.impl("cross_entropy_forward_aot", &cross_entropy_forward_aot);
  m.impl("cross_entropy_backward_aot", &cross_entropy_backward_aot);
}

TORCH_LIBRARY_IMPL(fasttrain, CPU, m) {
  m.impl("cross_entropy_forward_aot", &cross_entropy_forward_aot);
  m.impl("cross_entropy_backward_aot", &cross_entropy_backward_aot);
}

TORCH_LIBRARY_IMPL(fasttrain, Meta, m) {
  m.impl("cross_entropy_forward_aot", &cross_entropy_forward_aot_meta);
  m.impl("cross_entropy_backward_aot", &cross_entropy_backward_aot_meta);
}

TORCH_LIBRARY_IMPL(fasttrain, Autograd, m) {
  m.impl("cross_entropy_forward_aot", &cross_entropy_forward_aot_autograd);
}

}  // namespace fasttrain
