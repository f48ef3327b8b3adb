// What the attention ops launched from shipped cubins share (attention_aot.cpp, attention_backward_aot.cpp): the
// tuning key's rounding (kernels/_launch.py, kernels/_attention_launch.py), the FASTTRAIN_ATTENTION_WS switch, the
// layout the cubins were compiled for, dropout's arguments, and the device a call launches on.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>

#include "aot_launch.h"

namespace fasttrain::attention_aot {

constexpr double kLog2e = 1.4426950408889634;  // kernels/_attention_launch.py LOG2E: scores in log2 units

// A tile of the configs' tables: (BLOCK_M, BLOCK_N, WARP_SPECIALIZE).
struct Tile {
  int64_t block_m, block_n;
  bool warp_specialize;
};

// kernels/_launch.py next_power_of_2: the smallest power of 2 >= n, 0 for 0.
inline int64_t next_power_of_2(int64_t n) {
  int64_t p = 1;
  while (p < n) p *= 2;
  return n > 0 ? p : 0;
}

// The head dims whose cubins ship (kernels/attention.py and attention_backward.py SHIPPED_HEAD_DIMS).
inline bool shipped_head_dim(int64_t d) { return d == 64 || d == 96 || d == 128 || d == 256; }

// The head dims whose dropout cubins ship (SHIPPED_DROPOUT_HEAD_DIMS there).
inline bool shipped_dropout_head_dim(int64_t d) { return d == 64 || d == 128; }

// Whether TMA could read a head dim's rows (kernels/_attention_launch.py tma_aligned: a power of 2); the kernels mask
// the others' padding to HEAD_DIM_PAD, next_power_of_2(head_dim), and take no warp-specialized tile.
inline bool tma_head_dim(int64_t d) { return d == next_power_of_2(d); }

// kernels/_attention_launch.py band_class: a band edge as the tuners key it.
inline int64_t band_class(int64_t edge, int64_t tune_seqlen) {
  if ((edge >= 0 ? edge : -edge) >= tune_seqlen) return edge > 0 ? tune_seqlen : -tune_seqlen;
  return edge >= 0 ? next_power_of_2(edge) : -next_power_of_2(-edge);
}

// FASTTRAIN_ATTENTION_WS=0 drops the warp-specialized configs from the JIT's tables at import; so here.
inline bool warp_specialize_on() {
  static const bool on = [] {
    const char* v = std::getenv("FASTTRAIN_ATTENTION_WS");
    return v == nullptr || std::strcmp(v, "0") != 0;
  }();
  return on;
}

// Whether the cubins take t (B, T, H, D), or packed (total, H, D), as it is: a 16-byte aligned base, nonzero strides
// but D's that are multiples of 16 elements (what the JIT specializes on, and what makes
// kernels/_attention_launch.py tma_aligned hold), unit stride along D.
inline bool compiled_layout(const at::Tensor& t) {
  const int64_t last = t.dim() - 1;
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 || t.stride(last) != 1) return false;
  for (int64_t i = 0; i < last; ++i) {
    if (t.stride(i) == 0 || t.stride(i) % 16) return false;
  }
  return true;
}

inline at::Tensor as_compiled(const at::Tensor& t) {
  return compiled_layout(t) ? t : t.clone(at::MemoryFormat::Contiguous);
}

// Packed sequences' offsets as both ops take them: cu_q and cu_k int32 (B + 1), B >= 1, on q's device.
inline void check_offsets(const at::Tensor& q, const at::Tensor& cu_q, const at::Tensor& cu_k, const char* op) {
  for (const at::Tensor* cu : {&cu_q, &cu_k}) {
    TORCH_CHECK(cu->dim() == 1 && cu->numel() >= 2 && cu->numel() == cu_q.numel() && cu->scalar_type() == at::kInt &&
                    cu->device() == q.device(),
                op, ": cu_seqlens_q and cu_seqlens_k must be int32 (B + 1) offsets on q's device");
  }
}

// Packed sequences' int32 offsets (B + 1) and dropout's (seed, offset) as the cubins read them: contiguous from a
// 16-byte aligned base (the pointers were compiled as multiples of 16, as the JIT specializes a fresh allocation).
inline at::Tensor compiled_buffer(const at::Tensor& t) {
  const bool aligned = reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  return aligned && t.is_contiguous() ? t : t.clone(at::MemoryFormat::Contiguous);
}

// (batch, token, head) strides of t as the kernels take them: a packed (total, H, D) tensor has batch stride 0
// (kernels/_attention_launch.py bth_strides).
inline std::array<int64_t, 3> bth_strides(const at::Tensor& t, bool varlen) {
  if (varlen) return {0, t.stride(0), t.stride(1)};
  return {t.stride(0), t.stride(1), t.stride(2)};
}

// Dropout's arguments (kernels/_attention_dropout.py): dropout_p in [0, 1); with dropout_p > 0 the int64 (2,)
// (seed, offset) tensor on q's device that the mask is drawn from.
inline void check_dropout(const char* op, const at::Tensor& q, double dropout_p,
                          const std::optional<at::Tensor>& seed) {
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, op, ": dropout_p must be in [0, 1), got ", dropout_p);
  if (dropout_p == 0.0) return;
  TORCH_CHECK(shipped_dropout_head_dim(q.size(-1)), op, ": the shipped cubins take dropout at head_dim 64 or 128, got ",
              q.size(-1));
  TORCH_CHECK(seed.has_value() && seed->defined() && seed->dim() == 1 && seed->numel() == 2 &&
                  seed->scalar_type() == at::kLong && seed->device() == q.device(),
              op, ": dropout needs seed, an int64 (2,) (seed, offset) tensor on q's device");
}

// kernels/_attention_dropout.py keep_threshold: round(65536 * (1 - dropout_p)), at least 1.
inline int64_t keep_threshold(double dropout_p) {
  return std::max<int64_t>(1, std::min<int64_t>(65536, static_cast<int64_t>(65536.0 * (1.0 - dropout_p) + 0.5)));
}

// q's CUDA device index, or -1 for CPU tensors, which only the launch recorder takes.
inline c10::DeviceIndex launch_device(const at::Tensor& q, const char* op) {
  TORCH_CHECK(q.is_cuda() || (q.is_cpu() && aot::recording()), op,
              ": takes CUDA tensors (CPU tensors only while launches are recorded), got ", q.device());
  return q.is_cuda() ? q.device().index() : -1;
}

}  // namespace fasttrain::attention_aot
