// The eager short paths of the aot ops (fasttrain/ops/norms.py, cross_entropy.py and decode.py, _aot_short): whether
// a public call goes straight to its aot op, decided on the Python arguments in C++, then one unboxed call of the op
// through the dispatcher (its Autograd kernel first, so autograd, Meta and every other key behave as for any call of it).
// Each function returns None for a call it does not take, and raises nothing on bad input: the Python general path
// then checks, chooses and calls, and gives the errors. What stays in Python: the backend argument, the aot column's
// device check, FASTTRAIN_BACKEND, and Dynamo or a TorchFunctionMode (fasttrain/_backend.py owns those).
#include <ATen/autocast_mode.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <pybind11/pybind11.h>
#include <torch/csrc/Size.h>
#include <torch/csrc/autograd/python_variable.h>

#include <cmath>
#include <limits>
#include <optional>
#include <tuple>

namespace fasttrain {
namespace {

namespace py = pybind11;
using at::Tensor;
using std::optional;

// A tensor or Parameter (THPVariable_CheckExact): a subclass may give the op its own meaning, so it takes the general
// path. nullptr for anything else.
const Tensor* plain(PyObject* obj) { return THPVariable_CheckExact(obj) ? &THPVariable_Unpack(obj) : nullptr; }

// A Python int (not a bool, not an int subclass) that fits int64.
bool exact_int(PyObject* obj, int64_t& out) {
  if (!PyLong_CheckExact(obj)) return false;
  int overflow = 0;
  out = PyLong_AsLongLongAndOverflow(obj, &overflow);
  if (out == -1 && PyErr_Occurred()) {
    PyErr_Clear();
    return false;
  }
  return overflow == 0;
}

// normalized_shape as one width: one int in a tuple, list or torch.Size (a bare int takes the general path, which
// refuses it as torch does).
bool one_width(PyObject* shape, int64_t& n) {
  if (PyTuple_CheckExact(shape) || THPSize_Check(shape))
    return PyTuple_GET_SIZE(shape) == 1 && exact_int(PyTuple_GET_ITEM(shape, 0), n);
  if (PyList_CheckExact(shape)) return PyList_GET_SIZE(shape) == 1 && exact_int(PyList_GET_ITEM(shape, 0), n);
  return false;
}

// RMSNorm's eps when none is given, as torch takes it: the machine epsilon of the type it computes in, float32
// for every shipped dtype (fp16 and bf16 rows are normalized in fp32).
double machine_eps(at::ScalarType) { return std::numeric_limits<float>::epsilon(); }

// fasttrain/ops/norms.py _rows: (M, N) rows with unit column stride, a view where one serves.
Tensor rows(const Tensor& t, int64_t n) {
  if (t.dim() == 2 && t.stride(1) == 1) return t;
  Tensor r = t.reshape({-1, n});  // (M, N): one row per normalized slice
  return r.stride(1) == 1 ? r : r.contiguous();
}

// An (N,) unit-stride parameter of the rows' dtype and device (what norms.py _flat passes on as it is), or absent.
bool param_fits(PyObject* obj, optional<Tensor>& out, at::ScalarType dtype, at::Device device, int64_t n) {
  if (obj == Py_None) return true;
  const Tensor* t = plain(obj);
  if (t == nullptr || t->scalar_type() != dtype || t->device() != device || t->dim() != 1 || t->size(0) != n ||
      t->stride(0) != 1)
    return false;
  out = *t;
  return true;
}

py::object wrap(Tensor t) { return py::reinterpret_steal<py::object>(THPVariable_Wrap(std::move(t))); }

constexpr int64_t kNormMaxN = 4096;  // fasttrain/ops/norms.py _AOT_MAX_N: the shipped widths

using NormForward = std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor&, const optional<Tensor>&,
                                                               const optional<Tensor>&, const optional<Tensor>&, double,
                                                               bool, at::ScalarType);

// fasttrain/ops/norms.py _aot_short past its Python checks: y (no residual) or (y, s) from norm_forward_aot, or None.
py::object norm_short(py::handle input_obj, py::handle residual_obj, py::handle shape_obj, py::handle weight_obj,
                      py::handle bias_obj, py::handle eps_obj, bool is_rms) {
  const Tensor* input = plain(input_obj.ptr());
  int64_t n = 0;
  if (input == nullptr || !one_width(shape_obj.ptr(), n) || n <= 0 || n > kNormMaxN) return py::none();
  const at::ScalarType dtype = input->scalar_type();
  if (dtype != at::kHalf && dtype != at::kBFloat16 && dtype != at::kFloat) return py::none();
  if (input->dim() == 0 || input->size(-1) != n) return py::none();
  double eps = 0;
  if (PyFloat_CheckExact(eps_obj.ptr()))
    eps = PyFloat_AS_DOUBLE(eps_obj.ptr());
  else if (eps_obj.is_none() && is_rms)
    eps = machine_eps(dtype);
  else
    return py::none();
  if (!(eps >= 0)) return py::none();
  const at::Device device = input->device();
  optional<Tensor> weight, bias, residual;
  if (!param_fits(weight_obj.ptr(), weight, dtype, device, n) || !param_fits(bias_obj.ptr(), bias, dtype, device, n))
    return py::none();
  const bool has_residual = !residual_obj.is_none();
  if (has_residual) {
    const Tensor* r = plain(residual_obj.ptr());
    if (r == nullptr || r->scalar_type() != dtype || r->device() != device || !r->sizes().equals(input->sizes()))
      return py::none();
    residual = *r;
  }
  if (at::autocast::is_autocast_enabled(device.type())) return py::none();
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("fasttrain::norm_forward_aot", "").typed<NormForward>();
  Tensor y, s;
  {
    py::gil_scoped_release no_gil;
    const Tensor x = rows(*input, n);
    if (residual) residual = rows(*residual, n);
    std::tie(y, s, std::ignore, std::ignore) = op.call(x, residual, weight, bias, eps, is_rms, dtype);
    if (!x.is_same(*input)) {
      y = y.view(input->sizes());
      if (has_residual) s = s.view(input->sizes());
    }
  }
  if (!has_residual) return wrap(std::move(y));
  return py::make_tuple(wrap(std::move(y)), wrap(std::move(s)));
}

constexpr int64_t kI32 = std::numeric_limits<int32_t>::max();

using CrossEntropyForward = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, int64_t, c10::string_view);

// fasttrain/ops/cross_entropy.py _aot_short past its Python checks: the loss from cross_entropy_forward_aot, or None.
py::object cross_entropy_short(py::handle input_obj, py::handle target_obj, py::handle ignore_obj,
                               py::handle reduction_obj) {
  const Tensor* input = plain(input_obj.ptr());
  const Tensor* target = plain(target_obj.ptr());
  int64_t ignore_index = 0;
  if (input == nullptr || target == nullptr || !exact_int(ignore_obj.ptr(), ignore_index) ||
      ignore_index < -kI32 - 1 || ignore_index > kI32 || !PyUnicode_CheckExact(reduction_obj.ptr()))
    return py::none();
  Py_ssize_t length = 0;
  const char* chars = PyUnicode_AsUTF8AndSize(reduction_obj.ptr(), &length);
  if (chars == nullptr) {
    PyErr_Clear();
    return py::none();
  }
  const c10::string_view reduction(chars, length);
  if (reduction != "mean" && reduction != "sum" && reduction != "none") return py::none();
  const at::ScalarType dtype = input->scalar_type();
  if (dtype != at::kHalf && dtype != at::kBFloat16 && dtype != at::kFloat) return py::none();
  if (target->scalar_type() != at::kLong || input->dim() != 2 || target->dim() != 1) return py::none();
  // _aot_input_reason's checks: the JIT takes what fails them (an i64 variant, a misaligned view)
  const int64_t n = input->size(0), v = input->size(1);
  if (input->stride(1) != 1 || v == 0 || v > kI32 || input->stride(0) > kI32 || target->size(0) != n ||
      target->device() != input->device() || input->storage_offset() * input->element_size() % 16 != 0)
    return py::none();
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fasttrain::cross_entropy_forward_aot", "")
                             .typed<CrossEntropyForward>();
  Tensor loss;
  {
    py::gil_scoped_release no_gil;
    loss = std::get<0>(op.call(*input, *target, ignore_index, reduction));
  }
  return wrap(std::move(loss));
}

constexpr int64_t kUnbounded = int64_t{1} << 30;  // fasttrain/ops/attention_reference.py UNBOUNDED
constexpr int64_t kDecodeMaxSplits = 128;          // fasttrain/ops/decode.py _AOT_MAX_SPLITS

// A cache, or an appended k or v, of q's dtype and device with unit last stride.
bool like_q(const Tensor* t, at::ScalarType dtype, at::Device device) {
  return t != nullptr && t->dim() == 4 && t->scalar_type() == dtype && t->device() == device && t->stride(3) == 1;
}

// cache_seqlens or cache_leftpad: an int32 or int64 (B,) tensor on q's device.
bool index_fits(PyObject* obj, optional<Tensor>& out, int64_t B, at::Device device) {
  const Tensor* t = plain(obj);
  if (t == nullptr || (t->scalar_type() != at::kInt && t->scalar_type() != at::kLong) || t->dim() != 1 ||
      t->size(0) != B || t->device() != device)
    return false;
  out = *t;
  return true;
}

using DecodeAot = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const optional<Tensor>&,
                                             const optional<Tensor>&, const Tensor&, const optional<Tensor>&, double,
                                             int64_t, int64_t, int64_t);

// fasttrain/ops/decode.py _aot_short past its Python checks: out from decode_aot (k and v appended in place), or None.
py::object decode_short(py::handle q_obj, py::handle k_cache_obj, py::handle v_cache_obj, py::handle k_obj,
                        py::handle v_obj, py::handle seqlens_obj, py::handle leftpad_obj, py::handle scale_obj,
                        py::handle causal_obj, py::handle window_obj, py::handle splits_obj) {
  const Tensor* q = plain(q_obj.ptr());
  if (q == nullptr || q->dim() != 4) return py::none();
  const at::ScalarType dtype = q->scalar_type();
  const at::Device device = q->device();
  if ((dtype != at::kHalf && dtype != at::kBFloat16) || q->stride(3) != 1) return py::none();
  const int64_t B = q->size(0), H = q->size(2), D = q->size(3);
  const Tensor *k_cache = plain(k_cache_obj.ptr()), *v_cache = plain(v_cache_obj.ptr());
  if (!like_q(k_cache, dtype, device) || !like_q(v_cache, dtype, device)) return py::none();
  const int64_t Hkv = k_cache->size(2);
  if (k_cache->size(0) != B || k_cache->size(3) != D || (D != 64 && D != 128 && D != 256) || Hkv == 0 || H % Hkv ||
      !v_cache->sizes().equals(k_cache->sizes()))
    return py::none();
  for (const Tensor* cache : {k_cache, v_cache}) {  // updated in place, so never copied: 16-byte aligned rows
    if (cache->stride(0) % 16 || cache->stride(1) % 16 || cache->stride(2) % 16 ||
        cache->storage_offset() * cache->element_size() % 16)
      return py::none();
  }
  optional<Tensor> k, v;
  if (k_obj.is_none() != v_obj.is_none()) return py::none();
  if (!k_obj.is_none()) {
    const Tensor *k_in = plain(k_obj.ptr()), *v_in = plain(v_obj.ptr());
    for (const Tensor* t : {k_in, v_in}) {
      if (!like_q(t, dtype, device) || t->size(0) != B || t->size(2) != Hkv || t->size(3) != D ||
          t->size(1) != k_in->size(1))
        return py::none();
    }
    k = *k_in;
    v = *v_in;
  }
  optional<Tensor> seqlens, leftpad;  // no lengths: the general path fills in the whole cache, or refuses k
  if (!index_fits(seqlens_obj.ptr(), seqlens, B, device)) return py::none();
  if (!leftpad_obj.is_none() && !index_fits(leftpad_obj.ptr(), leftpad, B, device)) return py::none();
  double scale = std::pow(static_cast<double>(D), -0.5);
  if (PyFloat_CheckExact(scale_obj.ptr()))
    scale = PyFloat_AS_DOUBLE(scale_obj.ptr());
  else if (!scale_obj.is_none())
    return py::none();
  // fasttrain/ops/attention_checks.py _window, for a bool causal and a tuple of two ints >= -1
  PyObject* window = window_obj.ptr();
  int64_t left = 0, right = 0, splits = 0;
  if (!PyBool_Check(causal_obj.ptr()) || !PyTuple_CheckExact(window) || PyTuple_GET_SIZE(window) != 2 ||
      !exact_int(PyTuple_GET_ITEM(window, 0), left) || !exact_int(PyTuple_GET_ITEM(window, 1), right) || left < -1 ||
      right < -1 || !exact_int(splits_obj.ptr(), splits) || splits < 0 || splits > kDecodeMaxSplits)
    return py::none();
  left = left == -1 ? kUnbounded : left;
  right = causal_obj.ptr() == Py_True ? 0 : (right == -1 ? kUnbounded : right);
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("fasttrain::decode_aot", "").typed<DecodeAot>();
  Tensor out;
  {
    py::gil_scoped_release no_gil;
    out = std::get<0>(op.call(*q, *k_cache, *v_cache, k, v, *seqlens, leftpad, scale, left, right, splits));
  }
  return wrap(std::move(out));
}

}  // namespace

void bind_aot_short(py::module_& m) {
  m.def("norm_short", &norm_short,
        "fasttrain/ops/norms.py's short path: y, or (y, s) with a residual, from norm_forward_aot; None for a call "
        "the general path must take");
  m.def("cross_entropy_short", &cross_entropy_short,
        "fasttrain/ops/cross_entropy.py's short path: the loss from cross_entropy_forward_aot; None for a call the "
        "general path must take");
  m.def("decode_short", &decode_short,
        "fasttrain/ops/decode.py's short path: out from decode_aot (k and v appended in place); None for a call the "
        "general path must take");
}

}  // namespace fasttrain
