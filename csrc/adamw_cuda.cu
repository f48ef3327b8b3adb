// AdamW on CUDA: one multi-tensor launch (multi_tensor_apply.cuh) updates every tensor of a (device, dtype) group,
// fp32 math for fp32/bf16/fp16 (adamw.h), 16-byte vector loads where a chunk is aligned. Everything that could need a
// host sync is read on the device: the step counts, a tensor lr, GradScaler's scale and found_inf (the block returns
// before touching memory when found_inf > 0), and the global grad norm for clipping.
// Ops (schemas in ops.cpp): fasttrain::adamw_step_ and fasttrain::adamw_grad_sumsq, CUDA dispatch key.
//   compile-check without a GPU: tools/nvcc_check.sh
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>

#include "adamw.h"
#include "adamw_checks.h"
#include "multi_tensor_apply.cuh"

namespace fasttrain {
namespace {

constexpr int kThreads = 512;
// 64K elements per block: 128 per thread, 8 vector iterations of 16 bytes for fp32 at 512 threads.
constexpr int64_t kChunk = 65536;

template <typename T>
struct alignas(16) Vec16 {
  static constexpr int kSize = 16 / sizeof(T);
  T v[kSize];
};

template <typename T>
__device__ __forceinline__ bool aligned16(const T* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15) == 0;
}

template <typename T, bool AMSGRAD>
__global__ void __launch_bounds__(kThreads)
    adamw_kernel(TensorListMeta<AMSGRAD ? 5 : 4> meta, AdamWHyper hyper, const float* lr, const float* grad_scale,
                 const float* found_inf, const float* grad_norm) {
  if (found_inf != nullptr && *found_inf > 0.f) return;  // GradScaler saw inf/nan: skip, without a host sync
  const int t = meta.block_to_tensor[blockIdx.x];
  const int64_t start = static_cast<int64_t>(meta.block_to_chunk[blockIdx.x]) * kChunk;
  const int64_t n = min(kChunk, meta.sizes[t] - start);
  T* p = static_cast<T*>(meta.addresses[0][t]) + start;
  const T* g = static_cast<const T*>(meta.addresses[1][t]) + start;
  T* m = static_cast<T*>(meta.addresses[2][t]) + start;
  T* v = static_cast<T*>(meta.addresses[3][t]) + start;
  T* vmax = AMSGRAD ? static_cast<T*>(meta.addresses[AMSGRAD ? 4 : 0][t]) + start : nullptr;
  if (lr != nullptr) hyper.lr = *lr;
  // The step count is incremented by increment_steps after every block has read it.
  const double step = static_cast<double>(*static_cast<const float*>(meta.aux[t])) + 1.0;
  const AdamWElementScalars s = adamw_scalars(hyper, step, grad_scale, grad_norm);

  constexpr int kVec = Vec16<T>::kSize;
  int64_t vec_end = 0;
  if (aligned16(p) && aligned16(g) && aligned16(m) && aligned16(v) && (!AMSGRAD || aligned16(vmax))) {
    vec_end = n - n % kVec;
    for (int64_t i = static_cast<int64_t>(threadIdx.x) * kVec; i < vec_end; i += kThreads * kVec) {
      Vec16<T> vp = *reinterpret_cast<const Vec16<T>*>(p + i);
      const Vec16<T> vg = *reinterpret_cast<const Vec16<T>*>(g + i);
      Vec16<T> vm = *reinterpret_cast<const Vec16<T>*>(m + i);
      Vec16<T> vv = *reinterpret_cast<const Vec16<T>*>(v + i);
      Vec16<T> vx;
      if (AMSGRAD) vx = *reinterpret_cast<const Vec16<T>*>(vmax + i);
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        float fp = vp.v[k], fm = vm.v[k], fv = vv.v[k], fx = AMSGRAD ? static_cast<float>(vx.v[k]) : 0.f;
        adamw_element<AMSGRAD>(s, fp, static_cast<float>(vg.v[k]), fm, fv, fx);
        vp.v[k] = static_cast<T>(fp);
        vm.v[k] = static_cast<T>(fm);
        vv.v[k] = static_cast<T>(fv);
        if (AMSGRAD) vx.v[k] = static_cast<T>(fx);
      }
      *reinterpret_cast<Vec16<T>*>(p + i) = vp;
      *reinterpret_cast<Vec16<T>*>(m + i) = vm;
      *reinterpret_cast<Vec16<T>*>(v + i) = vv;
      if (AMSGRAD) *reinterpret_cast<Vec16<T>*>(vmax + i) = vx;
    }
  }
  for (int64_t i = vec_end + threadIdx.x; i < n; i += kThreads) {  // unaligned chunks and the tail
    float fp = p[i], fm = m[i], fv = v[i], fx = AMSGRAD ? static_cast<float>(vmax[i]) : 0.f;
    adamw_element<AMSGRAD>(s, fp, static_cast<float>(g[i]), fm, fv, fx);
    p[i] = static_cast<T>(fp);
    m[i] = static_cast<T>(fm);
    v[i] = static_cast<T>(fv);
    if (AMSGRAD) vmax[i] = static_cast<T>(fx);
  }
}

constexpr int kMaxSteps = 480;  // 3.8 KiB of pointers per launch
struct StepList {
  float* steps[kMaxSteps];
  int n;
};

__global__ void increment_steps(StepList list, const float* found_inf) {
  if (found_inf != nullptr && *found_inf > 0.f) return;
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < list.n) *list.steps[i] += 1.f;
}

const float* device_value(const std::optional<at::Tensor>& t, const at::Tensor& like, const char* name) {
  if (!t.has_value()) return nullptr;
  TORCH_CHECK(t->device() == like.device() && t->scalar_type() == at::kFloat && t->numel() == 1, "adamw_step_: ",
              name, " must be a 1-element float32 tensor on ", like.device(), ", got ", t->scalar_type(), " on ",
              t->device());
  return t->data_ptr<float>();
}

template <typename T, bool AMSGRAD>
void launch_adamw(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                  at::TensorList max_exp_avg_sqs, const std::vector<void*>& steps, const AdamWHyper& hyper,
                  const float* lr, const float* grad_scale, const float* found_inf, const float* grad_norm) {
  constexpr int kDepth = AMSGRAD ? 5 : 4;
  std::array<at::TensorList, kDepth> lists;
  lists[0] = params;
  lists[1] = grads;
  lists[2] = exp_avgs;
  lists[3] = exp_avg_sqs;
  if constexpr (AMSGRAD) lists[4] = max_exp_avg_sqs;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  multi_tensor_apply<kDepth>(lists, steps, kChunk, [&](const TensorListMeta<kDepth>& meta, int n_blocks) {
    adamw_kernel<T, AMSGRAD><<<n_blocks, kThreads, 0, stream>>>(meta, hyper, lr, grad_scale, found_inf, grad_norm);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

template <typename T>
void launch_adamw(bool amsgrad, at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                  at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, const std::vector<void*>& steps,
                  const AdamWHyper& hyper, const float* lr, const float* grad_scale, const float* found_inf,
                  const float* grad_norm) {
  if (amsgrad) {
    launch_adamw<T, true>(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, hyper, lr, grad_scale,
                          found_inf, grad_norm);
  } else {
    launch_adamw<T, false>(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, hyper, lr, grad_scale,
                           found_inf, grad_norm);
  }
}

void adamw_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                     at::TensorList max_exp_avg_sqs, at::TensorList steps, const std::optional<at::Tensor>& lr_tensor,
                     double lr, double beta1, double beta2, double eps, double weight_decay, bool amsgrad,
                     bool maximize, const std::optional<at::Tensor>& grad_scale,
                     const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& grad_norm,
                     double max_grad_norm) {
  check_adamw_lists(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, amsgrad, at::kCUDA);
  std::vector<void*> step_ptrs;
  step_ptrs.reserve(steps.size());
  for (const auto& s : steps) {
    TORCH_CHECK(s.device() == params[0].device(), "adamw_step_: steps must be on ", params[0].device(), ", got ",
                s.device());
    step_ptrs.push_back(s.data_ptr<float>());
  }
  const c10::cuda::CUDAGuard guard(params[0].device());
  const float* lr_ptr = device_value(lr_tensor, params[0], "lr_tensor");
  const float* scale_ptr = device_value(grad_scale, params[0], "grad_scale");
  const float* inf_ptr = device_value(found_inf, params[0], "found_inf");
  const float* norm_ptr = device_value(grad_norm, params[0], "grad_norm");
  const AdamWHyper hyper{lr, beta1, beta2, eps, weight_decay, grad_norm.has_value() ? max_grad_norm : 0.0, maximize};
  dispatch_native_dtype(params[0].scalar_type(), "adamw_step_: params", [&](auto tag) {
    launch_adamw<decltype(tag)>(amsgrad, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, step_ptrs, hyper,
                                lr_ptr, scale_ptr, inf_ptr, norm_ptr);
  });
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  for (size_t first = 0; first < step_ptrs.size(); first += kMaxSteps) {
    StepList list;
    list.n = static_cast<int>(std::min<size_t>(kMaxSteps, step_ptrs.size() - first));
    for (int i = 0; i < list.n; ++i) list.steps[i] = static_cast<float*>(step_ptrs[first + i]);
    increment_steps<<<1, kMaxSteps, 0, stream>>>(list, inf_ptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// Per block: the fp32 sum of squares of its chunk, written to partial[block]; no atomics, so the result is the same
// on every run. 16-byte loads where the chunk is aligned, as in adamw_kernel (bf16 grads: 8 elements per load).
template <typename T>
__global__ void __launch_bounds__(kThreads) sumsq_kernel(TensorListMeta<1> meta, float* partial) {
  const int t = meta.block_to_tensor[blockIdx.x];
  const int64_t start = static_cast<int64_t>(meta.block_to_chunk[blockIdx.x]) * kChunk;
  const int64_t n = min(kChunk, meta.sizes[t] - start);
  const T* x = static_cast<const T*>(meta.addresses[0][t]) + start;
  constexpr int kVec = Vec16<T>::kSize;
  float acc = 0.f;
  int64_t vec_end = 0;
  if (aligned16(x)) {
    vec_end = n - n % kVec;
    for (int64_t i = static_cast<int64_t>(threadIdx.x) * kVec; i < vec_end; i += kThreads * kVec) {
      const Vec16<T> vx = *reinterpret_cast<const Vec16<T>*>(x + i);
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        const float e = static_cast<float>(vx.v[k]);
        acc = fmaf(e, e, acc);
      }
    }
  }
  for (int64_t i = vec_end + threadIdx.x; i < n; i += kThreads) {
    const float e = static_cast<float>(x[i]);
    acc = fmaf(e, e, acc);
  }
  for (int offset = 16; offset > 0; offset /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, offset);
  __shared__ float warp_sums[kThreads / 32];
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = acc;
  __syncthreads();
  if (threadIdx.x < 32) {
    acc = threadIdx.x < kThreads / 32 ? warp_sums[threadIdx.x] : 0.f;
    for (int offset = 16; offset > 0; offset /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, offset);
    if (threadIdx.x == 0) partial[meta.block_offset + blockIdx.x] = acc;
  }
}

// One block adds the partials in a fixed order, in fp64.
__global__ void __launch_bounds__(1024) sum_partials_kernel(const float* partial, int64_t n, float* out) {
  __shared__ double red[1024];
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += 1024) acc += partial[i];
  red[threadIdx.x] = acc;
  __syncthreads();
  for (int width = 512; width > 0; width /= 2) {
    if (threadIdx.x < width) red[threadIdx.x] += red[threadIdx.x + width];
    __syncthreads();
  }
  if (threadIdx.x == 0) *out = static_cast<float>(red[0]);
}

template <typename T>
void launch_sumsq(at::TensorList grads, float* partial, cudaStream_t stream) {
  multi_tensor_apply<1>({grads}, {}, kChunk, [&](const TensorListMeta<1>& meta, int n_blocks) {
    sumsq_kernel<T><<<n_blocks, kThreads, 0, stream>>>(meta, partial);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor adamw_grad_sumsq_cuda(at::TensorList grads) {
  check_dense_same_dtype(grads, "grads", at::kCUDA);
  const c10::cuda::CUDAGuard guard(grads[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t n_blocks = mta_total_blocks(grads, kChunk);
  at::Tensor partial = at::empty({std::max<int64_t>(n_blocks, 1)}, grads[0].options().dtype(at::kFloat));
  at::Tensor out = at::empty({}, grads[0].options().dtype(at::kFloat));
  dispatch_native_dtype(grads[0].scalar_type(), "adamw_grad_sumsq: grads",
                        [&](auto tag) { launch_sumsq<decltype(tag)>(grads, partial.data_ptr<float>(), stream); });
  sum_partials_kernel<<<1, 1024, 0, stream>>>(partial.data_ptr<float>(), n_blocks, out.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace
}  // namespace fasttrain

TORCH_LIBRARY_IMPL(fasttrain, CUDA, m) {
  m.impl("adamw_step_", &fasttrain::adamw_step_cuda);
  m.impl("adamw_grad_sumsq", &fasttrain::adamw_grad_sumsq_cuda);
}
