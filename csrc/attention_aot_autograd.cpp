// flash_attn_func's common eager call as one C++ op with its autograd in C++: the forward is attention_forward_aot
// (attention_aot.cpp), the backward attention_backward_aot (attention_backward_aot.cpp), the same ops, arguments and
// so the same launches as fasttrain/ops/attention.py's registered op on the aot column, without its Python autograd,
// checks and backend choice (fasttrain/ops/attention.py `_aot_short` calls it for the calls that column would take).
// The backward reads deterministic as that op's does: the call's flag, or torch.use_deterministic_algorithms(True)
// when the backward runs. A double backward (create_graph=True) takes the reference's gradients, as a graph, through
// the registered op fasttrain::attention_forward (defined by fasttrain/ops/attention.py) on the reference backend.
// attention_aot_packed does the same for flash_attn_qkvpacked_func's and flash_attn_kvpacked_func's common calls
// (fasttrain/ops/attention_packed.py `_packed_short`): q, k and v views of the packed inputs, the backward
// attention_backward_into_aot written into views of one packed gradient per input, once differentiable as that
// module's autograd Function.
// Ops (schema in ops.cpp): fasttrain::attention_aot and attention_aot_packed; CUDA, and CPU while the launches are
// recorded (aot_launch.h); Meta for tracing; Autograd.
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace fasttrain {
namespace {

using at::Tensor;

using ForwardFn = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, double, int64_t, int64_t);
using BackwardFn = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                      const Tensor&, const Tensor&, double, int64_t, int64_t, bool);

const c10::TypedOperatorHandle<ForwardFn>& forward_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("fasttrain::attention_forward_aot", "").typed<ForwardFn>();
  return op;
}

// Below autograd (inference, or nothing that takes a gradient): the forward's output alone.
Tensor attention_aot(const Tensor& q, const Tensor& k, const Tensor& v, double scale, int64_t left, int64_t right,
                     bool) {
  return std::get<0>(forward_op().call(q, k, v, scale, left, right));
}

Tensor attention_aot_meta(const Tensor& q, const Tensor&, const Tensor&, double, int64_t, int64_t, bool) {
  return at::empty(q.sizes(), q.options());
}

// The gradients of the reference attention as a graph (fasttrain/ops/_op.py reference_gradients): the registered
// op recomputes the forward on the reference backend, whose own backward builds a graph when asked to.
std::vector<Tensor> reference_gradients(const std::vector<Tensor>& qkv, const Tensor& dout, double scale,
                                        int64_t left, int64_t right) {
  const auto handle = c10::Dispatcher::singleton().findSchema({"fasttrain::attention_forward", ""});
  TORCH_CHECK(handle.has_value(),
              "attention_aot: a double backward takes the reference through fasttrain::attention_forward, which "
              "importing fasttrain.ops defines");
  // A view per slot: self-attention may pass one tensor as q, k and v, and each slot takes its own gradient.
  std::vector<Tensor> views, wanted;
  for (const Tensor& t : qkv) {
    views.push_back(t.requires_grad() ? t.view_as(t) : t);
    if (t.requires_grad()) wanted.push_back(views.back());
  }
  torch::jit::Stack stack = {views[0],     views[1],  views[2], c10::IValue(), c10::IValue(),
                             qkv[0].size(1), qkv[1].size(1), scale, left,      right,
                             c10::IValue(), 0.0,       c10::IValue(), 0.0,     c10::IValue(),
                             false,        std::string("reference")};
  handle->callBoxed(&stack);
  const Tensor out = stack[0].toTensor();
  std::vector<Tensor> found;
  if (!wanted.empty() && out.requires_grad()) {
    found = torch::autograd::grad({out}, wanted, {dout}, /*retain_graph=*/true, /*create_graph=*/true,
                                  /*allow_unused=*/true);
  }
  std::vector<Tensor> grads(3);
  size_t next = 0;
  for (size_t i = 0; i < 3; ++i) {
    if (qkv[i].requires_grad() && next < found.size()) grads[i] = found[next++];
  }
  return grads;
}

struct AttentionAot : public torch::autograd::Function<AttentionAot> {
  static Tensor forward(torch::autograd::AutogradContext* ctx, const Tensor& q, const Tensor& k, const Tensor& v,
                        double scale, int64_t left, int64_t right, bool deterministic) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, lse] = forward_op().call(q, k, v, scale, left, right);
    ctx->save_for_backward({q, k, v, out, lse});
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["band"] = std::vector<int64_t>{left, right, deterministic};
    return out;
  }

  static std::vector<Tensor> backward(torch::autograd::AutogradContext* ctx, std::vector<Tensor> grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &q = saved[0], &k = saved[1], &v = saved[2], &out = saved[3], &lse = saved[4];
    const double scale = ctx->saved_data["scale"].toDouble();
    const auto band = ctx->saved_data["band"].toIntVector();
    const int64_t left = band[0], right = band[1];
    if (at::GradMode::is_enabled()) {  // a double backward follows
      std::vector<Tensor> g = reference_gradients({q, k, v}, grads[0], scale, left, right);
      return {g[0], g[1], g[2], Tensor(), Tensor(), Tensor(), Tensor()};
    }
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("fasttrain::attention_backward_aot", "")
                               .typed<BackwardFn>();
    const bool deterministic = band[2] != 0 || at::globalContext().deterministicAlgorithms();
    // The cubins take int32 strides, and dO (a view of whatever the caller differentiated) may have larger ones,
    // even on a size-1 dim, which contiguous() keeps; a copy in row-major strides has out's, which fit.
    const auto& s = grads[0].strides();
    const bool wide = std::any_of(s.begin(), s.end(), [](int64_t x) { return x >= (int64_t{1} << 31); });
    const Tensor dout = wide ? grads[0].clone(at::MemoryFormat::Contiguous) : grads[0];
    auto [dq, dk, dv] = op.call(dout, q, k, v, out, lse, scale, left, right, deterministic);
    return {dq, dk, dv, Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

Tensor attention_aot_autograd(const Tensor& q, const Tensor& k, const Tensor& v, double scale, int64_t left,
                              int64_t right, bool deterministic) {
  // Nothing to record (no_grad, or no input that takes a gradient, and no forward-mode tangent): the op below
  // autograd, sparing the autograd Function's node, context and output wrapping.
  auto recorded = [](const Tensor& t) {
    return (at::GradMode::is_enabled() && t.requires_grad()) || t._fw_grad(0).defined();
  };
  if (!recorded(q) && !recorded(k) && !recorded(v)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return std::get<0>(forward_op().call(q, k, v, scale, left, right));
  }
  return AttentionAot::apply(q, k, v, scale, left, right, deterministic);
}

// ---- the packed functions: q, k and v views of qkv (..., 3, H, D), or q and views of kv (..., 2, Hkv, D) ----

std::array<Tensor, 3> split(const Tensor& q_src, const Tensor& kv_src) {
  if (!kv_src.defined()) {
    TORCH_CHECK(q_src.dim() >= 3 && q_src.size(-3) == 3, "attention_aot_packed: qkv must be (..., 3, H, D)");
    const std::vector<Tensor> qkv = q_src.unbind(-3);
    return {qkv[0], qkv[1], qkv[2]};
  }
  TORCH_CHECK(kv_src.dim() >= 3 && kv_src.size(-3) == 2, "attention_aot_packed: kv must be (..., 2, Hkv, D)");
  const std::vector<Tensor> kv = kv_src.unbind(-3);
  return {q_src, kv[0], kv[1]};
}

Tensor attention_aot_packed(const Tensor& q_src, const std::optional<Tensor>& kv_src, double scale, int64_t left,
                            int64_t right, bool) {
  const auto [q, k, v] = split(q_src, kv_src.value_or(Tensor()));
  return std::get<0>(forward_op().call(q, k, v, scale, left, right));
}

Tensor attention_aot_packed_meta(const Tensor& q_src, const std::optional<Tensor>& kv_src, double, int64_t, int64_t,
                                 bool) {
  const Tensor q = std::get<0>(split(q_src, kv_src.value_or(Tensor())));
  return at::empty(q.sizes(), q.options());
}

// Python's torch.autograd.function.once_differentiable for a backward run with create_graph: its gradients, as
// leaves of a node that raises the same error when they are differentiated.
struct OnceDifferentiable : public torch::autograd::Function<OnceDifferentiable> {
  static std::vector<Tensor> forward(torch::autograd::AutogradContext*, at::TensorList grads) {
    return grads.vec();
  }
  static std::vector<Tensor> backward(torch::autograd::AutogradContext*, std::vector<Tensor>) {
    TORCH_CHECK(false, "trying to differentiate twice a function that was marked with @once_differentiable");
    return {};
  }
};

struct AttentionAotPacked : public torch::autograd::Function<AttentionAotPacked> {
  // kv_src absent: qkvpacked (an optional, which autograd takes as no input rather than an undefined one)
  static Tensor forward(torch::autograd::AutogradContext* ctx, const Tensor& q_src,
                        const std::optional<Tensor>& kv_src, double scale, int64_t left, int64_t right,
                        bool deterministic) {
    at::AutoDispatchBelowADInplaceOrView guard;
    const auto [q, k, v] = split(q_src, kv_src.value_or(Tensor()));
    auto [out, lse] = forward_op().call(q, k, v, scale, left, right);
    ctx->save_for_backward({q_src, kv_src.value_or(Tensor()), out, lse});
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["band"] = std::vector<int64_t>{left, right, deterministic};
    return out;
  }

  static std::vector<Tensor> backward(torch::autograd::AutogradContext* ctx, std::vector<Tensor> grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &q_src = saved[0], &kv_src = saved[1], &out = saved[2], &lse = saved[3];
    const double scale = ctx->saved_data["scale"].toDouble();
    const auto band = ctx->saved_data["band"].toIntVector();
    using BackwardIntoFn = void(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                const Tensor&, const Tensor&, const Tensor&, const Tensor&, double, int64_t, int64_t,
                                bool);
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("fasttrain::attention_backward_into_aot", "")
                               .typed<BackwardIntoFn>();
    const bool deterministic = band[2] != 0 || at::globalContext().deterministicAlgorithms();
    const bool twice = at::GradMode::is_enabled() && grads[0].requires_grad();
    Tensor dq_src, dkv_src;
    {
      at::NoGradGuard no_grad;
      const auto& s = grads[0].strides();  // as attention_aot's backward: the cubins' int32 strides
      const bool wide = std::any_of(s.begin(), s.end(), [](int64_t x) { return x >= (int64_t{1} << 31); });
      const Tensor dout = wide ? grads[0].clone(at::MemoryFormat::Contiguous) : grads[0];
      dq_src = at::empty_like(q_src);
      dkv_src = kv_src.defined() ? at::empty_like(kv_src) : Tensor();
      const auto [dq, dk, dv] = split(dq_src, dkv_src);
      const auto [q, k, v] = split(q_src, kv_src);
      op.call(dq, dk, dv, dout, q, k, v, out, lse, scale, band[0], band[1], deterministic);
    }
    if (twice) {
      std::vector<Tensor> leaves = {dq_src.detach().set_requires_grad(true)};
      if (dkv_src.defined()) leaves.push_back(dkv_src.detach().set_requires_grad(true));
      const std::vector<Tensor> wrapped = OnceDifferentiable::apply(at::TensorList(leaves));
      dq_src = wrapped[0];
      if (dkv_src.defined()) dkv_src = wrapped[1];
    }
    return {dq_src, dkv_src, Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

Tensor attention_aot_packed_autograd(const Tensor& q_src, const std::optional<Tensor>& kv_src, double scale,
                                     int64_t left, int64_t right, bool deterministic) {
  const Tensor kv = kv_src.value_or(Tensor());
  auto recorded = [](const Tensor& t) {
    return t.defined() && ((at::GradMode::is_enabled() && t.requires_grad()) || t._fw_grad(0).defined());
  };
  if (!recorded(q_src) && !recorded(kv)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    const auto [q, k, v] = split(q_src, kv);
    return std::get<0>(forward_op().call(q, k, v, scale, left, right));
  }
  return AttentionAotPacked::apply(q_src, kv_src, scale, left, right, deterministic);
}

}  // namespace

TORCH_LIBRARY_IMPL(fasttrain, CUDA, m) {
  m.impl("attention_aot", &attention_aot);
  m.impl("attention_aot_packed", &attention_aot_packed);
}

TORCH_LIBRARY_IMPL(fasttrain, CPU, m) {
  m.impl("attention_aot", &attention_aot);
  m.impl("attention_aot_packed", &attention_aot_packed);
}

TORCH_LIBRARY_IMPL(fasttrain, Meta, m) {
  m.impl("attention_aot", &attention_aot_meta);
  m.impl("attention_aot_packed", &attention_aot_packed_meta);
}

TORCH_LIBRARY_IMPL(fasttrain, Autograd, m) {
  m.impl("attention_aot", &attention_aot_autograd);
  m.impl("attention_aot_packed", &attention_aot_packed_autograd);
}

}  // namespace fasttrain
