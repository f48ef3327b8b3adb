// Input checks shared by the CPU and CUDA AdamW ops: every list lines up with params, and every tensor is dense
// memory laid out like its param, so a kernel can walk it as numel() consecutive elements. Also the one dtype switch
// both ops use (dispatch_native_dtype).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

namespace fasttrain {

inline void check_dense_same_dtype(at::TensorList ts, const char* name, c10::DeviceType device) {
  TORCH_CHECK(!ts.empty(), name, " must not be empty");
  for (const auto& t : ts) {
    TORCH_CHECK(t.device().type() == device, name, ": expected ", device, " tensors, got ", t.device());
    TORCH_CHECK(t.device() == ts[0].device(), name, ": all tensors must be on one device, got ", ts[0].device(),
                " and ", t.device());
    TORCH_CHECK(t.scalar_type() == ts[0].scalar_type(), name, ": all tensors must have one dtype, got ",
                ts[0].scalar_type(), " and ", t.scalar_type());
    TORCH_CHECK(t.is_non_overlapping_and_dense(), name, ": tensors must be dense (non-overlapping), got sizes ",
                t.sizes(), " strides ", t.strides());
  }
}

inline void check_like(at::TensorList ts, at::TensorList params, const char* name) {
  TORCH_CHECK(ts.size() == params.size(), name, " has ", ts.size(), " tensors, params has ", params.size());
  for (size_t i = 0; i < ts.size(); ++i) {
    TORCH_CHECK(ts[i].device() == params[i].device() && ts[i].scalar_type() == params[i].scalar_type() &&
                    ts[i].sizes() == params[i].sizes() && ts[i].strides() == params[i].strides(),
                name, "[", i, "] must match params[", i, "] in device, dtype, sizes and strides; got ",
                ts[i].scalar_type(), ts[i].sizes(), " strides ", ts[i].strides(), " on ", ts[i].device(), " vs ",
                params[i].scalar_type(), params[i].sizes(), " strides ", params[i].strides(), " on ",
                params[i].device());
  }
}

inline void check_adamw_lists(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                              at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList steps,
                              bool amsgrad, c10::DeviceType device) {
  check_dense_same_dtype(params, "params", device);
  check_like(grads, params, "grads");
  check_like(exp_avgs, params, "exp_avgs");
  check_like(exp_avg_sqs, params, "exp_avg_sqs");
  if (amsgrad) {
    check_like(max_exp_avg_sqs, params, "max_exp_avg_sqs");
  } else {
    TORCH_CHECK(max_exp_avg_sqs.empty(), "max_exp_avg_sqs must be empty when amsgrad is false");
  }
  TORCH_CHECK(steps.size() == params.size(), "steps has ", steps.size(), " tensors, params has ", params.size());
  for (const auto& s : steps) {
    TORCH_CHECK(s.scalar_type() == at::kFloat && s.numel() == 1, "steps must be 1-element float32 tensors, got ",
                s.scalar_type(), s.sizes());
  }
}

// Calls f(T{}) with T the element type of dtype: float, c10::BFloat16 or c10::Half (f is a generic lambda that reads
// T as decltype of its argument). Any other dtype raises "<what> must be float32, bfloat16 or float16, got <dtype>".
template <typename F>
void dispatch_native_dtype(at::ScalarType dtype, const char* what, F&& f) {
  switch (dtype) {
    case at::kFloat: f(float{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    case at::kHalf: f(c10::Half{}); break;
    default: TORCH_CHECK(false, what, " must be float32, bfloat16 or float16, got ", dtype);
  }
}

}  // namespace fasttrain
