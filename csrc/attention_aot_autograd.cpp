// flash_attn_func's common eager call as one C++ op with its autograd in C++: the forward is attention_forward_aot
// (attention_aot.cpp), the backward attention_backward_aot (attention_backward_aot.cpp), the same ops, arguments and
// so the same launches as fasttrain/ops/attention.py's registered op on the aot column, without its Python autograd,
// checks and backend choice (fasttrain/ops/attention.py `_aot_short` calls it for the calls that column would take).
// The backward reads deterministic as that op's does: the call's flag, or torch.use_deterministic_algorithms(True)
// when the backward runs. Dropout: the caller's dropout_p and seed (drawn as the registered op's caller draws it),
// passed to the forward and to the backward, which regenerates the mask. A double backward (create_graph=True) takes
// the reference's gradients, as a graph, through the registered op fasttrain::attention_forward (defined by
// fasttrain/ops/attention.py) on the reference backend.
// attention_aot_packed does the same for flash_attn_qkvpacked_func's and flash_attn_kvpacked_func's common calls
// (fasttrain/ops/attention_packed.py `_packed_short`): q, k and v views of the packed inputs, the backward
// attention_backward_into_aot written into views of one packed gradient per input, once differentiable as that
// module's autograd Function.
// attention_aot_varlen and attention_aot_varlen_packed are the two for packed sequences (flash_attn_varlen_func and
// its packed variants): the varlen forward and backward ops with the offsets and longest sequences the caller checked.
// Ops (schema in ops.cpp): fasttrain::attention_aot, attention_aot_packed, attention_aot_varlen and
// attention_aot_varlen_packed; CUDA, and CPU while the launches are recorded (aot_launch.h); Meta for tracing;
// Autograd.
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

// The ops' schemas end in dropout_p and seed: attention_aot's and attention_aot_varlen's (the backward regenerates
// the forward's mask from the seed), the packed ops' 0 and none (their short paths take no dropout: a packed call
// with dropout takes the general path, whose _into backward does).
using ForwardFn = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, double, int64_t, int64_t,
                                             double, const std::optional<Tensor>&);
using BackwardFn = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                      const Tensor&, const Tensor&, double, int64_t, int64_t, bool,
                                                      double, const std::optional<Tensor>&,
                                                      const std::optional<Tensor>&);
using BackwardIntoFn = void(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                            const Tensor&, const Tensor&, const Tensor&, double, int64_t, int64_t, bool, double,
                            const std::optional<Tensor>&, const std::optional<Tensor>&);
using VarlenForwardFn = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                   const Tensor&, int64_t, int64_t, double, int64_t, int64_t, double,
                                                   const std::optional<Tensor>&);
using VarlenBackwardFn = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                            const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                            int64_t, int64_t, double, int64_t, int64_t, bool, double,
                                                            const std::optional<Tensor>&,
                                                            const std::optional<Tensor>&);
using VarlenBackwardIntoFn = void(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                  const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                  const Tensor&, int64_t, int64_t, double, int64_t, int64_t, bool, double,
                                  const std::optional<Tensor>&, const std::optional<Tensor>&);

template <typename Fn>
c10::TypedOperatorHandle<Fn> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Fn>();
}

// What a call attends over besides q, k and v: the scale, the band, for packed sequences (cu_q defined) the offsets
// (B + 1) and longest sequences, and dropout_p with its seed (the int64 (2,) tensor; undefined without dropout).
struct Call {
  Tensor cu_q, cu_k;
  int64_t max_q = 0, max_k = 0;
  double scale = 0.0;
  int64_t left = 0, right = 0;
  bool deterministic = false;
  double dropout_p = 0.0;
  Tensor seed;

  bool varlen() const { return cu_q.defined(); }
  std::optional<Tensor> seed_arg() const { return seed.defined() ? std::optional<Tensor>(seed) : std::nullopt; }

  std::tuple<Tensor, Tensor> forward(const Tensor& q, const Tensor& k, const Tensor& v) const {
    if (varlen()) {
      static const auto op = find_op<VarlenForwardFn>("fasttrain::attention_varlen_forward_aot");
      return op.call(q, k, v, cu_q, cu_k, max_q, max_k, scale, left, right, dropout_p, seed_arg());
    }
    static const auto op = find_op<ForwardFn>("fasttrain::attention_forward_aot");
    return op.call(q, k, v, scale, left, right, dropout_p, seed_arg());
  }

  std::tuple<Tensor, Tensor, Tensor> backward(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                                              const Tensor& out, const Tensor& lse, bool det) const {
    if (varlen()) {
      static const auto op = find_op<VarlenBackwardFn>("fasttrain::attention_varlen_backward_aot");
      return op.call(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale, left, right, det, dropout_p,
                     seed_arg(), std::nullopt);
    }
    static const auto op = find_op<BackwardFn>("fasttrain::attention_backward_aot");
    return op.call(dout, q, k, v, out, lse, scale, left, right, det, dropout_p, seed_arg(), std::nullopt);
  }

  // (the packed ops' calls, which take no dropout)
  void backward_into(const Tensor& dq, const Tensor& dk, const Tensor& dv, const Tensor& dout, const Tensor& q,
                     const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& lse, bool det) const {
    if (varlen()) {
      static const auto op = find_op<VarlenBackwardIntoFn>("fasttrain::attention_varlen_backward_into_aot");
      op.call(dq, dk, dv, dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale, left, right, det, 0.0,
              std::nullopt, std::nullopt);
      return;
    }
    static const auto op = find_op<BackwardIntoFn>("fasttrain::attention_backward_into_aot");
    op.call(dq, dk, dv, dout, q, k, v, out, lse, scale, left, right, det, 0.0, std::nullopt, std::nullopt);
  }

  // Kept in an autograd context beside the saved tensors (the offsets and the seed among those).
  void save(torch::autograd::AutogradContext* ctx) const {
    ctx->saved_data["floats"] = std::vector<double>{scale, dropout_p};
    ctx->saved_data["ints"] = std::vector<int64_t>{max_q, max_k, left, right, deterministic};
  }

  static Call saved(torch::autograd::AutogradContext* ctx, const Tensor& cu_q, const Tensor& cu_k,
                    const Tensor& seed) {
    const auto ints = ctx->saved_data["ints"].toIntVector();
    const auto floats = ctx->saved_data["floats"].toDoubleVector();
    return {cu_q, cu_k, ints[0], ints[1], floats[0], ints[2], ints[3], ints[4] != 0, floats[1], seed};
  }
};

Call dense_call(double scale, int64_t left, int64_t right, bool deterministic, double dropout_p = 0.0,
               const std::optional<Tensor>& seed = std::nullopt) {
  return {Tensor(), Tensor(), 0, 0, scale, left, right, deterministic, dropout_p, seed.value_or(Tensor())};
}

Call varlen_call(const Tensor& cu_q, const Tensor& cu_k, int64_t max_q, int64_t max_k, double scale, int64_t left,
                 int64_t right, bool deterministic, double dropout_p = 0.0,
                 const std::optional<Tensor>& seed = std::nullopt) {
  return {cu_q, cu_k, max_q, max_k, scale, left, right, deterministic, dropout_p, seed.value_or(Tensor())};
}

// The cubins take int32 strides, and dO (a view of whatever the caller differentiated) may have larger ones, even on
// a size-1 dim, which contiguous() keeps; a copy in row-major strides has out's, which fit.
Tensor launchable(const Tensor& dout) {
  const auto& s = dout.strides();
  const bool wide = std::any_of(s.begin(), s.end(), [](int64_t x) { return x >= (int64_t{1} << 31); });
  return wide ? dout.clone(at::MemoryFormat::Contiguous) : dout;
}

// The gradients of the reference attention as a graph (fasttrain/ops/_op.py reference_gradients): the registered
// op recomputes the forward on the reference backend, whose own backward builds a graph when asked to.
std::vector<Tensor> reference_gradients(const std::vector<Tensor>& qkv, const Tensor& dout, const Call& call) {
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
  const bool varlen = call.varlen();
  torch::jit::Stack stack = {views[0],
                             views[1],
                             views[2],
                             varlen ? c10::IValue(call.cu_q) : c10::IValue(),
                             varlen ? c10::IValue(call.cu_k) : c10::IValue(),
                             varlen ? call.max_q : qkv[0].size(1),
                             varlen ? call.max_k : qkv[1].size(1),
                             call.scale,
                             call.left,
                             call.right,
                             c10::IValue(),
                             call.dropout_p,
                             call.seed.defined() ? c10::IValue(call.seed) : c10::IValue(),
                             0.0,
                             c10::IValue(),
                             false,
                             std::string("reference")};
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

// Whether autograd records a call with these inputs (undefined ones take no part).
bool recorded(const Tensor& t) {
  return t.defined() && ((at::GradMode::is_enabled() && t.requires_grad()) || t._fw_grad(0).defined());
}

// ---- q, k and v as given: flash_attn_func, flash_attn_varlen_func ----

struct AttentionAot : public torch::autograd::Function<AttentionAot> {
  // cu_q and cu_k absent: dense inputs; seed absent: no dropout (optionals, which autograd takes as no input rather
  // than undefined ones)
  static Tensor forward(torch::autograd::AutogradContext* ctx, const Tensor& q, const Tensor& k, const Tensor& v,
                        const std::optional<Tensor>& cu_q, const std::optional<Tensor>& cu_k, int64_t max_q,
                        int64_t max_k, double scale, int64_t left, int64_t right, bool deterministic,
                        double dropout_p, const std::optional<Tensor>& seed) {
    at::AutoDispatchBelowADInplaceOrView guard;
    const Call call{cu_q.value_or(Tensor()), cu_k.value_or(Tensor()), max_q, max_k, scale, left, right,
                    deterministic, dropout_p, seed.value_or(Tensor())};
    auto [out, lse] = call.forward(q, k, v);
    ctx->save_for_backward({q, k, v, out, lse, call.cu_q, call.cu_k, call.seed});
    call.save(ctx);
    return out;
  }

  static std::vector<Tensor> backward(torch::autograd::AutogradContext* ctx, std::vector<Tensor> grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &q = saved[0], &k = saved[1], &v = saved[2], &out = saved[3], &lse = saved[4];
    const Call call = Call::saved(ctx, saved[5], saved[6], saved[7]);
    std::vector<Tensor> result(13);
    if (at::GradMode::is_enabled()) {  // a double backward follows
      std::vector<Tensor> g = reference_gradients({q, k, v}, grads[0], call);
      std::copy(g.begin(), g.end(), result.begin());
      return result;
    }
    const bool deterministic = call.deterministic || at::globalContext().deterministicAlgorithms();
    std::tie(result[0], result[1], result[2]) = call.backward(launchable(grads[0]), q, k, v, out, lse, deterministic);
    return result;
  }
};

Tensor attention_autograd(const Tensor& q, const Tensor& k, const Tensor& v, const Call& call) {
  // Nothing to record (no_grad, or no input that takes a gradient, and no forward-mode tangent): the op below
  // autograd, sparing the autograd Function's node, context and output wrapping.
  if (!recorded(q) && !recorded(k) && !recorded(v)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return std::get<0>(call.forward(q, k, v));
  }
  const auto cu = [&](const Tensor& t) { return t.defined() ? std::optional<Tensor>(t) : std::nullopt; };
  return AttentionAot::apply(q, k, v, cu(call.cu_q), cu(call.cu_k), call.max_q, call.max_k, call.scale, call.left,
                             call.right, call.deterministic, call.dropout_p, call.seed_arg());
}

// Below autograd (inference, or nothing that takes a gradient): the forward's output alone.
Tensor attention_aot(const Tensor& q, const Tensor& k, const Tensor& v, double scale, int64_t left, int64_t right,
                     bool deterministic, double dropout_p, const std::optional<Tensor>& seed) {
  return std::get<0>(dense_call(scale, left, right, deterministic, dropout_p, seed).forward(q, k, v));
}

Tensor attention_aot_meta(const Tensor& q, const Tensor&, const Tensor&, double, int64_t, int64_t, bool, double,
                          const std::optional<Tensor>&) {
  return at::empty(q.sizes(), q.options());
}

Tensor attention_aot_autograd(const Tensor& q, const Tensor& k, const Tensor& v, double scale, int64_t left,
                              int64_t right, bool deterministic, double dropout_p,
                              const std::optional<Tensor>& seed) {
  return attention_autograd(q, k, v, dense_call(scale, left, right, deterministic, dropout_p, seed));
}

Tensor attention_aot_varlen(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& cu_q, const Tensor& cu_k,
                            int64_t max_q, int64_t max_k, double scale, int64_t left, int64_t right,
                            bool deterministic, double dropout_p, const std::optional<Tensor>& seed) {
  const Call call = varlen_call(cu_q, cu_k, max_q, max_k, scale, left, right, deterministic, dropout_p, seed);
  return std::get<0>(call.forward(q, k, v));
}

Tensor attention_aot_varlen_meta(const Tensor& q, const Tensor&, const Tensor&, const Tensor&, const Tensor&, int64_t,
                                 int64_t, double, int64_t, int64_t, bool, double, const std::optional<Tensor>&) {
  return at::empty(q.sizes(), q.options());
}

Tensor attention_aot_varlen_autograd(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& cu_q,
                                     const Tensor& cu_k, int64_t max_q, int64_t max_k, double scale, int64_t left,
                                     int64_t right, bool deterministic, double dropout_p,
                                     const std::optional<Tensor>& seed) {
  return attention_autograd(
      q, k, v, varlen_call(cu_q, cu_k, max_q, max_k, scale, left, right, deterministic, dropout_p, seed));
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
  // kv_src absent: qkvpacked; cu_q and cu_k absent: dense inputs
  static Tensor forward(torch::autograd::AutogradContext* ctx, const Tensor& q_src,
                        const std::optional<Tensor>& kv_src, const std::optional<Tensor>& cu_q,
                        const std::optional<Tensor>& cu_k, int64_t max_q, int64_t max_k, double scale, int64_t left,
                        int64_t right, bool deterministic) {
    at::AutoDispatchBelowADInplaceOrView guard;
    const Call call{cu_q.value_or(Tensor()), cu_k.value_or(Tensor()), max_q, max_k, scale, left, right,
                    deterministic, 0.0, Tensor()};
    const auto [q, k, v] = split(q_src, kv_src.value_or(Tensor()));
    auto [out, lse] = call.forward(q, k, v);
    ctx->save_for_backward({q_src, kv_src.value_or(Tensor()), out, lse, call.cu_q, call.cu_k});
    call.save(ctx);
    return out;
  }

  static std::vector<Tensor> backward(torch::autograd::AutogradContext* ctx, std::vector<Tensor> grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &q_src = saved[0], &kv_src = saved[1], &out = saved[2], &lse = saved[3];
    const Call call = Call::saved(ctx, saved[4], saved[5], Tensor());
    const bool deterministic = call.deterministic || at::globalContext().deterministicAlgorithms();
    const bool twice = at::GradMode::is_enabled() && grads[0].requires_grad();
    Tensor dq_src, dkv_src;
    {
      at::NoGradGuard no_grad;
      const Tensor dout = launchable(grads[0]);
      dq_src = at::empty_like(q_src);
      dkv_src = kv_src.defined() ? at::empty_like(kv_src) : Tensor();
      const auto [dq, dk, dv] = split(dq_src, dkv_src);
      const auto [q, k, v] = split(q_src, kv_src);
      call.backward_into(dq, dk, dv, dout, q, k, v, out, lse, deterministic);
    }
    if (twice) {
      std::vector<Tensor> leaves = {dq_src.detach().set_requires_grad(true)};
      if (dkv_src.defined()) leaves.push_back(dkv_src.detach().set_requires_grad(true));
      const std::vector<Tensor> wrapped = OnceDifferentiable::apply(at::TensorList(leaves));
      dq_src = wrapped[0];
      if (dkv_src.defined()) dkv_src = wrapped[1];
    }
    std::vector<Tensor> result(10);
    result[0] = dq_src;
    result[1] = dkv_src;
    return result;
  }
};

Tensor packed_forward(const Tensor& q_src, const std::optional<Tensor>& kv_src, const Call& call) {
  const auto [q, k, v] = split(q_src, kv_src.value_or(Tensor()));
  return std::get<0>(call.forward(q, k, v));
}

Tensor packed_meta(const Tensor& q_src, const std::optional<Tensor>& kv_src) {
  const Tensor q = std::get<0>(split(q_src, kv_src.value_or(Tensor())));
  return at::empty(q.sizes(), q.options());
}

Tensor packed_autograd(const Tensor& q_src, const std::optional<Tensor>& kv_src, const Call& call) {
  if (!recorded(q_src) && !recorded(kv_src.value_or(Tensor()))) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return packed_forward(q_src, kv_src, call);
  }
  const auto cu = [&](const Tensor& t) { return t.defined() ? std::optional<Tensor>(t) : std::nullopt; };
  return AttentionAotPacked::apply(q_src, kv_src, cu(call.cu_q), cu(call.cu_k), call.max_q, call.max_k, call.scale,
                                   call.left, call.right, call.deterministic);
}

Tensor attention_aot_packed(const Tensor& q_src, const std::optional<Tensor>& kv_src, double scale, int64_t left,
                            int64_t right, bool deterministic) {
  return packed_forward(q_src, kv_src, dense_call(scale, left, right, deterministic));
}

Tensor attention_aot_packed_meta(const Tensor& q_src, const std::optional<Tensor>& kv_src, double, int64_t, int64_t,
                                 bool) {
  return packed_meta(q_src, kv_src);
}

Tensor attention_aot_packed_autograd(const Tensor& q_src, const std::optional<Tensor>& kv_src, double scale,
                                     int64_t left, int64_t right, bool deterministic) {
  return packed_autograd(q_src, kv_src, dense_call(scale, left, right, deterministic));
}

Tensor attention_aot_varlen_packed(const Tensor& q_src, const std::optional<Tensor>& kv_src, const Tensor& cu_q,
                                   const Tensor& cu_k, int64_t max_q, int64_t max_k, double scale, int64_t left,
                                   int64_t right, bool deterministic) {
  return packed_forward(q_src, kv_src, varlen_call(cu_q, cu_k, max_q, max_k, scale, left, right, deterministic));
}

Tensor attention_aot_varlen_packed_meta(const Tensor& q_src, const std::optional<Tensor>& kv_src, const Tensor&,
                                        const Tensor&, int64_t, int64_t, double, int64_t, int64_t, bool) {
  return packed_meta(q_src, kv_src);
}

Tensor attention_aot_varlen_packed_autograd(const Tensor& q_src, const std::optional<Tensor>& kv_src,
                                            const Tensor& cu_q, const Tensor& cu_k, int64_t max_q, int64_t max_k,
                                            double scale, int64_t left, int64_t right, bool deterministic) {
  return packed_autograd(q_src, kv_src, varlen_call(cu_q, cu_k, max_q, max_k, scale, left, right, deterministic));
}

}  // namespace

TORCH_LIBRARY_IMPL(fasttrain, CUDA, m) {
  m.impl("attention_aot", &attention_aot);
  m.impl("attention_aot_packed", &attention_aot_packed);
  m.impl("attention_aot_varlen", &attention_aot_varlen);
  m.impl("attention_aot_varlen_packed", &attention_aot_varlen_packed);
}

TORCH_LIBRARY_IMPL(fasttrain, CPU, m) {
  m.impl("attention_aot", &attention_aot);
  m.impl("attention_aot_packed", &attention_aot_packed);
  m.impl("attention_aot_varlen", &attention_aot_varlen);
  m.impl("attention_aot_varlen_packed", &attention_aot_varlen_packed);
}

TORCH_LIBRARY_IMPL(fasttrain, Meta, m) {
  m.impl("attention_aot", &attention_aot_meta);
  m.impl("attention_aot_packed", &attention_aot_packed_meta);
  m.impl("attention_aot_varlen", &attention_aot_varlen_meta);
  m.impl("attention_aot_varlen_packed", &attention_aot_varlen_packed_meta);
}

TORCH_LIBRARY_IMPL(fasttrain, Autograd, m) {
  m.impl("attention_aot", &attention_aot_autograd);
  m.impl("attention_aot_packed", &attention_aot_packed_autograd);
  m.impl("attention_aot_varlen", &attention_aot_varlen_autograd);
  m.impl("attention_aot_varlen_packed", &attention_aot_varlen_packed_autograd);
}

}  // namespace fasttrain
