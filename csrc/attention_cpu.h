// What the CPU attention forward and backward (attention_cpu.cpp) and the KV-cache decode (decode_cpu.cpp) share:
// rows of a tensor in flash-attn's layout, the problem every task reads (sequences, heads, scale, band), the online
// softmax's row update, and the forward itself, which a decode step with many query rows per K/V head takes.
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <utility>
#include <vector>

namespace fasttrain {

// Row (b, t), head h of a (B, T, H, D) tensor, or of a packed (total, H, D) one (b = 0), dense along D only.
template <typename T>
struct Rows {
  T* base;
  int64_t batch, row, head;
  T* at(int64_t b, int64_t t, int64_t h) const { return base + b * batch + t * row + h * head; }
};

// A T axis of one row may carry any stride (torch still calls the tensor contiguous) and the GEMMs take the row
// stride as their leading dimension, which BLAS refuses below D: such a row gets the stride of a dense one.
template <typename T>
Rows<T> rows_of(const at::Tensor& x) {
  const int64_t row = x.size(-3) == 1 ? x.size(-2) * x.size(-1) : x.stride(-3);
  return {static_cast<T*>(x.data_ptr()), x.dim() == 3 ? 0 : x.stride(0), row, x.stride(-2)};
}

// One sequence: the (batch, row) of its first query and first key, its lengths, the key rows present (k_end < Tk
// only for a KV cache shorter than the length it is given: keys stop at its end), where its head 0 starts in
// lse ((B, H, Tq) dense, (H, total_q) packed), and its index (its row of (B, H) ALiBi slopes).
struct Sequence {
  int64_t q_batch, q_row, k_batch, k_row, Tq, Tk, k_end, lse, id;
};

// What every task shares.
struct Problem {
  std::vector<Sequence> seqs;
  int64_t H, Hkv, D, lse_head;  // lse_head: lse's stride between heads
  float scale;
  double scale_exact;   // the scale as given: the backward's exact scores (attention_cpu.cpp) take it
  int64_t left, right;  // query i sees keys j with -left <= j - i - (Tk - Tq) <= right
  // Score modifiers (flash-attn's): softcap > 0 caps the scaled score x at softcap * tanh(x / softcap), then ALiBi
  // adds -slope * |i + Tk - Tq - j| with the slope of (sequence id, head h) when alibi is not null.
  float softcap = 0.0f;
  const float* alibi = nullptr;
  int64_t alibi_batch = 0;  // the slopes' stride between sequences: 0 for (H,) slopes

  int64_t group() const { return H / Hkv; }
  bool modified() const { return softcap > 0.0f || alibi != nullptr; }
  // Keys [lo, hi) seen by query row i of sequence s, clamped to [0, k_end).
  int64_t key_lo(const Sequence& s, int64_t i) const { return std::max<int64_t>(0, i + s.Tk - s.Tq - left); }
  int64_t key_hi(const Sequence& s, int64_t i) const {
    return std::min<int64_t>(s.k_end, std::max<int64_t>(0, i + s.Tk - s.Tq + right + 1));
  }
};

inline Problem make_problem(const at::Tensor& q, const at::Tensor& k, double scale, int64_t left, int64_t right) {
  Problem p;
  p.H = q.size(-2);
  p.Hkv = k.size(-2);
  p.D = q.size(-1);
  p.scale = static_cast<float>(scale);
  p.scale_exact = scale;
  p.left = left;
  p.right = right;
  return p;
}

// Raw scores row[0, n) (q . k) of query row i of sequence s, head h, against keys j0.. become the scores softmax
// takes (scaled, capped, biased: Problem's modifiers). dcap, when not null, gets d(capped)/d(scaled) = 1 - tanh^2.
void modify_scores(const Problem& P, const Sequence& s, int64_t h, int64_t i, int64_t j0, float* row, int64_t n,
                   float* dcap);

// The softcap and ALiBi slopes of an attention op's arguments set on P (checked: slopes float32 (H,) or (B, H)).
void set_modifiers(Problem& P, double softcap, const std::optional<at::Tensor>& alibi_slopes, int64_t batch);

// Every tensor named is on the CPU with a unit stride along its last dimension; the error names the first that is not.
void check_dense_last(std::initializer_list<std::pair<const char*, const at::Tensor*>> named);

// One row of the online softmax: raw scores row[0, cw) of which [a, b) are visible become probabilities (0 outside)
// against the row's running max m and sum l, and its accumulator acc[0, D) is rescaled to the new max.
void softmax_update(float* row, int64_t cw, int64_t a, int64_t b, float scale, float& m, float& l, float* acc,
                    int64_t D);

// Attention dropout: score (sequence b, head h, query i, key j) is kept when its Philox4x32-10 value (key seed,
// counter (j / 8, i, b * H + h, offset); kernels/_attention_dropout.py gives the layout) is below threshold, and
// scaled by `scale` = 1 / (1 - dropout_p). Off when `on` is false.
struct Dropout {
  bool on = false;
  uint64_t seed = 0;
  uint32_t offset = 0, threshold = 0;
  float scale = 1.0f;
};

// out (q's shape, dense, q's dtype) and lse (float32) of every sequence of P: one task per (sequence, K/V head, block
// of query rows), each an online softmax over tiles of keys whose matmuls go to the BLAS (attention_cpu.cpp).
void attention_forward(const Problem& P, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       at::Tensor& out, at::Tensor& lse, const Dropout& dropout = {});

}  // namespace fasttrain
