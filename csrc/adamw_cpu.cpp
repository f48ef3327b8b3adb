// AdamW on the CPU: one call updates every tensor of a (device, dtype) group. All tensors are cut into fixed-size
// chunks and OpenMP runs over the chunks; the element loop is fp32 math (adamw.h) that GCC vectorizes in x86-64-v4
// (AVX-512), v3 (AVX2 + FMA) and baseline clones picked at load time (target_clones). bf16/fp16 tensors are widened
// to fp32 tiles first. Built with -ffp-contract=off -fno-math-errno (CMakeLists.txt): fmas only where written, and
// a sqrtf that vectorizes.
// Ops (schemas in ops.cpp): fasttrain::adamw_step_ and fasttrain::adamw_grad_sumsq, CPU dispatch key.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <omp.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <type_traits>
#include <vector>

#include "adamw.h"
#include "adamw_checks.h"
#include "cpu_math.h"

namespace fasttrain {
namespace {

// 64K elements (256 KiB per fp32 stream) per chunk: long sequential runs for the prefetchers on each of the 4-5
// streams (timings against torch's fused CPU AdamW: benchmarks/NOTES.md).
constexpr int64_t kChunk = 65536;
// Below this many elements a parallel region costs more than it saves.
constexpr int64_t kParallelMin = 1 << 16;
// fp32 tile for bf16/fp16 tensors: 5 x 4 KiB on the stack.
constexpr int64_t kTile = 1024;

FT_CPU_CLONES void adamw_span_f32(const AdamWElementScalars& s, float* __restrict p, const float* __restrict g,
                                  float* __restrict m, float* __restrict v, int64_t n) {
  float unused = 0.f;
  for (int64_t i = 0; i < n; ++i) {
    adamw_element<false>(s, p[i], g[i], m[i], v[i], unused);
  }
}

FT_CPU_CLONES void adamw_span_f32_amsgrad(const AdamWElementScalars& s, float* __restrict p,
                                          const float* __restrict g, float* __restrict m, float* __restrict v,
                                          float* __restrict vmax, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    adamw_element<true>(s, p[i], g[i], m[i], v[i], vmax[i]);
  }
}

void adamw_span(const AdamWElementScalars& s, float* p, const float* g, float* m, float* v, float* vmax, int64_t n) {
  if (vmax != nullptr) {
    adamw_span_f32_amsgrad(s, p, g, m, v, vmax, n);
  } else {
    adamw_span_f32(s, p, g, m, v, n);
  }
}

// bf16/fp16: widen a tile of each stream to fp32, run the fp32 loop, round back.
template <typename T>
void adamw_span(const AdamWElementScalars& s, T* p, const T* g, T* m, T* v, T* vmax, int64_t n) {
  float fp[kTile], fg[kTile], fm[kTile], fv[kTile], fx[kTile];
  for (int64_t off = 0; off < n; off += kTile) {
    const int64_t len = std::min(kTile, n - off);
    widen(p + off, fp, len);
    widen(g + off, fg, len);
    widen(m + off, fm, len);
    widen(v + off, fv, len);
    if (vmax != nullptr) widen(vmax + off, fx, len);
    adamw_span(s, fp, fg, fm, fv, vmax != nullptr ? fx : nullptr, len);
    narrow(fp, p + off, len);
    narrow(fm, m + off, len);
    narrow(fv, v + off, len);
    if (vmax != nullptr) narrow(fx, vmax + off, len);
  }
}

struct Chunk {
  int64_t tensor;
  int64_t offset;
  int64_t size;
};

std::vector<Chunk> make_chunks(at::TensorList tensors, int64_t* total) {
  std::vector<Chunk> chunks;
  *total = 0;
  for (int64_t t = 0; t < static_cast<int64_t>(tensors.size()); ++t) {
    const int64_t n = tensors[t].numel();
    *total += n;
    for (int64_t off = 0; off < n; off += kChunk) chunks.push_back({t, off, std::min(kChunk, n - off)});
  }
  return chunks;
}

const float* optional_value(const std::optional<at::Tensor>& t, const char* name) {
  if (!t.has_value()) return nullptr;
  TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->numel() == 1, "adamw_step_: ", name,
              " must be a 1-element float32 CPU tensor, got ", t->scalar_type(), " on ", t->device());
  return t->data_ptr<float>();
}

template <typename T>
void adamw_group(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                 at::TensorList max_exp_avg_sqs, const std::vector<AdamWElementScalars>& scalars) {
  int64_t total = 0;
  const std::vector<Chunk> chunks = make_chunks(params, &total);
  const bool amsgrad = !max_exp_avg_sqs.empty();
  const int64_t n_chunks = static_cast<int64_t>(chunks.size());
  // Dynamic: a thread that the OS preempts (shared cores) leaves its chunks to the others instead of stalling the
  // whole step until it runs again.
#pragma omp parallel for schedule(dynamic, 1) if (total >= kParallelMin)
  for (int64_t c = 0; c < n_chunks; ++c) {
    const Chunk& k = chunks[c];
    T* vmax = amsgrad ? max_exp_avg_sqs[k.tensor].data_ptr<T>() + k.offset : nullptr;
    adamw_span(scalars[k.tensor], params[k.tensor].data_ptr<T>() + k.offset,
               grads[k.tensor].data_ptr<T>() + k.offset, exp_avgs[k.tensor].data_ptr<T>() + k.offset,
               exp_avg_sqs[k.tensor].data_ptr<T>() + k.offset, vmax, k.size);
  }
}

void adamw_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                    at::TensorList max_exp_avg_sqs, at::TensorList steps, const std::optional<at::Tensor>& lr_tensor,
                    double lr, double beta1, double beta2, double eps, double weight_decay, bool amsgrad,
                    bool maximize, const std::optional<at::Tensor>& grad_scale,
                    const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& grad_norm,
                    double max_grad_norm) {
  check_adamw_lists(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, amsgrad, at::kCPU);
  for (const auto& s : steps) {
    TORCH_CHECK(s.device().is_cpu(), "adamw_step_: steps of CPU params must be CPU tensors, got ", s.device());
  }
  const float* inf = optional_value(found_inf, "found_inf");
  if (inf != nullptr && *inf > 0.f) return;  // GradScaler found inf/nan: skip the update and the step count
  if (const float* lr_value = optional_value(lr_tensor, "lr_tensor")) lr = *lr_value;
  const AdamWHyper hyper{lr, beta1, beta2, eps, weight_decay, grad_norm.has_value() ? max_grad_norm : 0.0, maximize};
  const float* scale = optional_value(grad_scale, "grad_scale");
  const float* norm = optional_value(grad_norm, "grad_norm");
  std::vector<AdamWElementScalars> scalars;
  scalars.reserve(steps.size());
  for (const auto& s : steps) {
    float* step = s.data_ptr<float>();
    *step += 1.f;
    scalars.push_back(adamw_scalars(hyper, static_cast<double>(*step), scale, norm));
  }
  dispatch_native_dtype(params[0].scalar_type(), "adamw_step_: params", [&](auto tag) {
    adamw_group<decltype(tag)>(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, scalars);
  });
}

// 16 independent fp64 lanes: a fixed-order sum that GCC vectorizes without -ffast-math, and is deterministic.
template <typename T>
double sumsq_span(const T* x, int64_t n) {
  double lanes[16] = {0.0};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    for (int j = 0; j < 16; ++j) {
      const double e = static_cast<float>(x[i + j]);
      lanes[j] += e * e;
    }
  }
  for (; i < n; ++i) {
    const double e = static_cast<float>(x[i]);
    lanes[0] += e * e;
  }
  double acc = 0.0;
  for (double l : lanes) acc += l;
  return acc;
}

template <typename T>
double sumsq_group(at::TensorList grads) {
  int64_t total = 0;
  const std::vector<Chunk> chunks = make_chunks(grads, &total);
  const int64_t n_chunks = static_cast<int64_t>(chunks.size());
  std::vector<double> partial(chunks.size());
#pragma omp parallel for schedule(dynamic, 1) if (total >= kParallelMin)
  for (int64_t c = 0; c < n_chunks; ++c) {
    partial[c] = sumsq_span(grads[chunks[c].tensor].data_ptr<T>() + chunks[c].offset, chunks[c].size);
  }
  double acc = 0.0;
  for (double p : partial) acc += p;  // in chunk order: the same result for any thread count
  return acc;
}

at::Tensor adamw_grad_sumsq_cpu(at::TensorList grads) {
  check_dense_same_dtype(grads, "grads", at::kCPU);
  double acc = 0.0;
  dispatch_native_dtype(grads[0].scalar_type(), "adamw_grad_sumsq: grads",
                        [&](auto tag) { acc = sumsq_group<decltype(tag)>(grads); });
  at::Tensor out = at::empty({}, grads[0].options().dtype(at::kFloat));
  *out.data_ptr<float>() = static_cast<float>(acc);
  return out;
}

}  // namespace
}  // namespace fasttrain

TORCH_LIBRARY_IMPL(fasttrain, CPU, m) {
  m.impl("adamw_step_", &fasttrain::adamw_step_cpu);
  m.impl("adamw_grad_sumsq", &fasttrain::adamw_grad_sumsq_cpu);
}
