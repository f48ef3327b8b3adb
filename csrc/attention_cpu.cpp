// Attention on the CPU in flash-attn's layout and masking; fasttrain/ops/attention_reference.py is the oracle.
// Forward: one task per (sequence, K/V head, block of kRows query rows, token-major over the heads of its GQA group),
// an online softmax over tiles of kKeys keys, so that scores exist only in a per-thread (kRows x kKeys) tile; inputs
// are read in place in their dtype and strides, widened to fp32 a tile at a time. Decoding against a KV cache (each
// sequence's keys from its cache row, up to its length) takes the same forward when a K/V head has many query rows,
// else a path of its own that reads the cache in memory order (decode, below). Backward: one task per (sequence,
// K/V head), which owns that head's dK and dV and the dQ of its GQA group, so no two threads write the same row; P
// is recomputed from the saved lse, five matmuls per tile (S, dP, dV, dK, dQ). The matmuls go to torch's BLAS (MKL
// in the x86 wheels) straight (cpu_blas.h), single-threaded inside the parallel region; the softmax loops are
// ours, vectorized by GCC in AVX-512 / AVX2 clones. fp16/bf16 inputs are computed in fp32 and rounded once at the
// end, as the GPU kernels do. Ops (schemas in ops.cpp): fasttrain::attention_forward_cpu, attention_backward_cpu
// and attention_kvcache_cpu, CPU dispatch key.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu_blas.h"
#include "cpu_math.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace fasttrain {
namespace {

constexpr int64_t kRows = 64;   // query rows per task: the causal diagonal wastes at most half a (kRows)^2 tile
constexpr int64_t kKeys = 512;  // keys per score tile: 128 KiB of scores per thread, inside L2

// s[0, n) *= scale; returns the largest.
FT_CPU_CLONES float scale_and_max(float* __restrict s, int64_t n, float scale) {
  float m = -kInf;
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) {
    s[j] *= scale;
    m = s[j] > m ? s[j] : m;
  }
  return m;
}

// s[0, n) = exp(s - shift); returns their sum.
FT_CPU_CLONES float exp_shifted(float* __restrict s, int64_t n, float shift) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) {
    s[j] = exp_approx(s[j] - shift);
    sum += s[j];
  }
  return sum;
}

// p[0, n) = exp(s * scale - lse), in place.
FT_CPU_CLONES void probabilities(float* __restrict s, int64_t n, float scale, float lse) {
  for (int64_t j = 0; j < n; ++j) s[j] = exp_approx(s[j] * scale - lse);
}

// dp[0, n) = p * (dp - delta) * scale: the score gradient, in place.
FT_CPU_CLONES void score_grad(const float* __restrict p, float* __restrict dp, int64_t n, float delta, float scale) {
  for (int64_t j = 0; j < n; ++j) dp[j] = p[j] * (dp[j] - delta) * scale;
}

#if defined(__GNUC__)
#define FT_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define FT_ALWAYS_INLINE inline
#endif

// Eight fp32 lanes: one ymm register in the AVX2 and AVX-512 clones, two xmm in the baseline one. The decode loops
// below hold their accumulators in these explicitly: GCC's `omp simd` reduction stored the lanes to the stack and
// added them one after another (perf, AVX2 clone), and it does not keep a row block's accumulators in registers.
typedef float v8 __attribute__((vector_size(32)));

FT_ALWAYS_INLINE v8 load8(const float* p) {
  v8 x;
  std::memcpy(&x, p, sizeof x);
  return x;
}

FT_ALWAYS_INLINE void store8(float* p, v8 x) { std::memcpy(p, &x, sizeof x); }

// ((x0 + x4) + (x1 + x5)) + ((x2 + x6) + (x3 + x7)), in registers: reading the lanes by index had GCC store the
// vector to the stack and add them as scalars.
FT_ALWAYS_INLINE float sum8(v8 x) {
#if defined(__clang__)
  x += __builtin_shufflevector(x, x, 4, 5, 6, 7, 0, 1, 2, 3);
  x += __builtin_shufflevector(x, x, 1, 0, 3, 2, 5, 4, 7, 6);
  x += __builtin_shufflevector(x, x, 2, 3, 0, 1, 6, 7, 4, 5);
#else  // GCC before 12 has only __builtin_shuffle
  typedef int32_t i8 __attribute__((vector_size(32)));
  x += __builtin_shuffle(x, i8{4, 5, 6, 7, 0, 1, 2, 3});
  x += __builtin_shuffle(x, i8{1, 0, 3, 2, 5, 4, 7, 6});
  x += __builtin_shuffle(x, i8{2, 3, 0, 1, 6, 7, 4, 5});
#endif
  return x[0];
}

// s[r * ld] = q_r . key for the N rows q_r = q + r * D (a GQA group's): each 8 floats of the key loaded once for
// the N rows, each row's lanes summed as a tree at the end.
template <int N>
FT_ALWAYS_INLINE void dot_rows(const float* __restrict q, const float* __restrict key, int64_t D,
                               float* __restrict s, int64_t ld) {
  v8 a[N];
  for (int r = 0; r < N; ++r) a[r] = v8{};  // not `= {}`, which GCC made a memset of the stack
  int64_t d = 0;
  for (; d + 8 <= D; d += 8) {
    const v8 x = load8(key + d);
    for (int r = 0; r < N; ++r) a[r] += load8(q + r * D + d) * x;
  }
  for (int r = 0; r < N; ++r) {
    float tail = 0.0f;
    for (int64_t j = d; j < D; ++j) tail += q[r * D + j] * key[j];
    s[r * ld] = sum8(a[r]) + tail;
  }
}

FT_CPU_CLONES float dot(const float* __restrict a, const float* __restrict b, int64_t n) {
  float s;
  dot_rows<1>(a, b, n, &s, 0);
  return s;
}

// y[0, n) += a * x
FT_CPU_CLONES void axpy(float a, const float* __restrict x, float* __restrict y, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) y[j] += a * x[j];
}

// Columns [d, d + 8 W) of acc_r += sum_i p[r * ld + i] * value_i (i < cw, r < N; value_i = value + i * ldv,
// acc_r = acc + r * D), the N x W accumulators held in registers over the cw values.
template <int N, int W>
FT_ALWAYS_INLINE void accumulate_columns(const float* __restrict p, int64_t ld, int64_t cw,
                                         const float* __restrict value, int64_t ldv, int64_t D, int64_t d,
                                         float* __restrict acc) {
  v8 a[N][W];
  for (int r = 0; r < N; ++r) {
    for (int w = 0; w < W; ++w) a[r][w] = load8(acc + r * D + d + 8 * w);
  }
  for (int64_t i = 0; i < cw; ++i) {
    v8 x[W];
    for (int w = 0; w < W; ++w) x[w] = load8(value + i * ldv + d + 8 * w);
    for (int r = 0; r < N; ++r) {
      const float pr = p[r * ld + i];
      for (int w = 0; w < W; ++w) a[r][w] += pr * x[w];
    }
  }
  for (int r = 0; r < N; ++r) {
    for (int w = 0; w < W; ++w) store8(acc + r * D + d + 8 * w, a[r][w]);
  }
}

// acc_r += sum_i p[r * ld + i] * value_i over all D columns: 16 at a time for N <= 6 (2N accumulators, two values
// and a weight: at most 15 of AVX2's 16 registers; at N 6 1.04-1.12x the 8-column pass), else 8.
template <int N>
FT_ALWAYS_INLINE void accumulate_rows(const float* __restrict p, int64_t ld, int64_t cw,
                                      const float* __restrict value, int64_t ldv, int64_t D, float* __restrict acc) {
  int64_t d = 0;
  if constexpr (N <= 6) {
    for (; d + 16 <= D; d += 16) accumulate_columns<N, 2>(p, ld, cw, value, ldv, D, d, acc);
  }
  for (; d + 8 <= D; d += 8) accumulate_columns<N, 1>(p, ld, cw, value, ldv, D, d, acc);
  for (; d < D; ++d) {
    for (int64_t i = 0; i < cw; ++i) {
      for (int r = 0; r < N; ++r) acc[r * D + d] += p[r * ld + i] * value[i * ldv + d];
    }
  }
}

// One key row against every K/V head's n query rows (n <= kDecodeRows): s[(h * n + r) * ld] = q_{h, r} . key_h
// with q_{h, r} = q + (h * n + r) * D and key_h = key + h * hk. A call per key row, not per dot: a call through the
// clones' dispatch per dot held a GQA 32/8 decode to 13 GB/s.
FT_CPU_CLONES void score_key(const float* __restrict q, int64_t n, int64_t Hkv, const float* __restrict key,
                             int64_t hk, int64_t D, float* __restrict s, int64_t ld) {
  for (int64_t h = 0; h < Hkv; ++h) {
    const float *qh = q + h * n * D, *kh = key + h * hk;
    float* sh = s + h * n * ld;
    switch (n) {
      case 1: dot_rows<1>(qh, kh, D, sh, ld); break;
      case 2: dot_rows<2>(qh, kh, D, sh, ld); break;
      case 3: dot_rows<3>(qh, kh, D, sh, ld); break;
      case 4: dot_rows<4>(qh, kh, D, sh, ld); break;
      case 5: dot_rows<5>(qh, kh, D, sh, ld); break;
      case 6: dot_rows<6>(qh, kh, D, sh, ld); break;
      case 7: dot_rows<7>(qh, kh, D, sh, ld); break;
      case 8: dot_rows<8>(qh, kh, D, sh, ld); break;
      default: TORCH_INTERNAL_ASSERT(false, "score_key takes at most 8 rows per head, got ", n);
    }
  }
}

// A block of cw key rows' values into every K/V head's n accumulators: acc_{h, r} += sum_i p_{h, r}[i] value_{h, i}
// with p_{h, r} = p + (h * n + r) * cw, value_{h, i} = value + i * ldv + h * hv and acc_{h, r} = acc + (h * n + r) * D.
FT_CPU_CLONES void accumulate_block(const float* __restrict p, int64_t cw, int64_t n, int64_t Hkv,
                                    const float* __restrict value, int64_t ldv, int64_t hv, int64_t D,
                                    float* __restrict acc) {
  for (int64_t h = 0; h < Hkv; ++h) {
    const float *ph = p + h * n * cw, *vh = value + h * hv;
    float* ah = acc + h * n * D;
    switch (n) {
      case 1: accumulate_rows<1>(ph, cw, cw, vh, ldv, D, ah); break;
      case 2: accumulate_rows<2>(ph, cw, cw, vh, ldv, D, ah); break;
      case 3: accumulate_rows<3>(ph, cw, cw, vh, ldv, D, ah); break;
      case 4: accumulate_rows<4>(ph, cw, cw, vh, ldv, D, ah); break;
      case 5: accumulate_rows<5>(ph, cw, cw, vh, ldv, D, ah); break;
      case 6: accumulate_rows<6>(ph, cw, cw, vh, ldv, D, ah); break;
      case 7: accumulate_rows<7>(ph, cw, cw, vh, ldv, D, ah); break;
      case 8: accumulate_rows<8>(ph, cw, cw, vh, ldv, D, ah); break;
      default: TORCH_INTERNAL_ASSERT(false, "accumulate_block takes at most 8 rows per head, got ", n);
    }
  }
}

// One row of the online softmax: raw scores row[0, cw) of which [a, b) are visible become probabilities (0 outside)
// against the row's running max m and sum l, and its accumulator acc[0, D) is rescaled to the new max.
void softmax_update(float* row, int64_t cw, int64_t a, int64_t b, float scale, float& m, float& l, float* acc,
                    int64_t D) {
  std::fill(row, row + a, 0.0f);
  std::fill(row + b, row + cw, 0.0f);
  if (a == b) return;
  const float m_new = std::max(m, scale_and_max(row + a, b - a, scale));
  if (m_new == -kInf) {  // every visible score -inf: nothing to add yet
    std::fill(row + a, row + b, 0.0f);
    return;
  }
  const float alpha = std::exp(m - m_new);  // 0 on the row's first keys (m = -inf)
  l = l * alpha + exp_shifted(row + a, b - a, m_new);
  m = m_new;
  if (alpha != 1.0f) {
    for (int64_t d = 0; d < D; ++d) acc[d] *= alpha;
  }
}

// Row (b, t), head h of a (B, T, H, D) tensor, or of a packed (total, H, D) one (b = 0), dense along D only.
template <typename T>
struct Rows {
  T* base;
  int64_t batch, row, head;
  T* at(int64_t b, int64_t t, int64_t h) const { return base + b * batch + t * row + h * head; }
};

template <typename T>
Rows<T> rows_of(const at::Tensor& x) {
  return {static_cast<T*>(x.data_ptr()), x.dim() == 3 ? 0 : x.stride(0), x.stride(-3), x.stride(-2)};
}

// An fp32 matrix's rows, `ld` floats apart.
struct Tile {
  const float* p;
  int64_t ld;
};

// Rows [t0, t0 + n) of head h of x as an (n, D) fp32 matrix: in place for fp32 x, else x widened into scratch.
template <typename T>
Tile rows_fp32(const Rows<const T>& x, int64_t b, int64_t t0, int64_t h, int64_t n, int64_t D, float* scratch) {
  if constexpr (std::is_same_v<T, float>) {
    return {x.at(b, t0, h), x.row};
  } else {
    for (int64_t i = 0; i < n; ++i) widen(x.at(b, t0 + i, h), scratch + i * D, D);
    return {scratch, D};
  }
}

// One sequence: the (batch, row) of its first query and first key, its lengths, the key rows present (k_end < Tk
// only for a KV cache shorter than the length it is given: keys stop at its end), and where its head 0 starts in
// lse ((B, H, Tq) dense, (H, total_q) packed).
struct Sequence {
  int64_t q_batch, q_row, k_batch, k_row, Tq, Tk, k_end, lse;
};

// What every task shares.
struct Problem {
  std::vector<Sequence> seqs;
  int64_t H, Hkv, D, lse_head;  // lse_head: lse's stride between heads
  float scale;
  int64_t left, right;  // query i sees keys j with -left <= j - i - (Tk - Tq) <= right

  int64_t group() const { return H / Hkv; }
  // The widest score tile any task needs: kKeys, or fewer when no sequence has that many keys.
  int64_t tile_keys() const {
    int64_t keys = 0;
    for (const Sequence& s : seqs) keys = std::max(keys, s.k_end);
    return std::min(kKeys, keys);
  }
  // Keys [lo, hi) seen by query row i of sequence s, clamped to [0, k_end).
  int64_t key_lo(const Sequence& s, int64_t i) const { return std::max<int64_t>(0, i + s.Tk - s.Tq - left); }
  int64_t key_hi(const Sequence& s, int64_t i) const {
    return std::min<int64_t>(s.k_end, std::max<int64_t>(0, i + s.Tk - s.Tq + right + 1));
  }
};

Problem make_problem(const at::Tensor& q, const at::Tensor& k, double scale, int64_t left, int64_t right) {
  Problem p;
  p.H = q.size(-2);
  p.Hkv = k.size(-2);
  p.D = q.size(-1);
  p.scale = static_cast<float>(scale);
  p.left = left;
  p.right = right;
  return p;
}

// make_problem for attention_forward_cpu / attention_backward_cpu: dense (B, T, H, D) or packed with cu_seqlens.
Problem attention_problem(const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& cu_q,
                          const std::optional<at::Tensor>& cu_k, double scale, int64_t left, int64_t right) {
  Problem p = make_problem(q, k, scale, left, right);
  if (cu_q.has_value()) {
    const auto cq = cu_q->to(at::kLong).contiguous(), ck = cu_k->to(at::kLong).contiguous();
    const int64_t* a = cq.data_ptr<int64_t>();
    const int64_t* b = ck.data_ptr<int64_t>();
    TORCH_CHECK(cq.numel() == ck.numel() && cq.numel() >= 2, "cu_seqlens_q and cu_seqlens_k must hold B + 1 offsets");
    TORCH_CHECK(a[0] == 0 && b[0] == 0 && a[cq.numel() - 1] == q.size(0) && b[ck.numel() - 1] == k.size(0),
                "cu_seqlens must rise from 0 to the packed lengths");
    for (int64_t s = 0; s + 1 < cq.numel(); ++s) {
      TORCH_CHECK(a[s] <= a[s + 1] && b[s] <= b[s + 1], "cu_seqlens must not decrease");
      const int64_t Tk = b[s + 1] - b[s];
      p.seqs.push_back({0, a[s], 0, b[s], a[s + 1] - a[s], Tk, Tk, a[s]});
    }
    p.lse_head = q.size(0);
  } else {
    const int64_t B = q.size(0), Tq = q.size(1), Tk = k.size(1);
    for (int64_t b = 0; b < B; ++b) p.seqs.push_back({b, 0, b, 0, Tq, Tk, Tk, b * p.H * Tq});
    p.lse_head = Tq;
  }
  return p;
}

void check_dense_last(std::initializer_list<std::pair<const char*, const at::Tensor*>> named) {
  for (const auto& [name, t] : named) {
    TORCH_CHECK(t->device().is_cpu(), name, " must be a CPU tensor");
    TORCH_CHECK(t->stride(-1) == 1, name, " must be contiguous in its last dimension");
  }
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const std::optional<at::Tensor>& cu_q, const std::optional<at::Tensor>& cu_k) {
  const int64_t rank = cu_q.has_value() ? 3 : 4;
  TORCH_CHECK(cu_q.has_value() == cu_k.has_value(), "cu_seqlens_q and cu_seqlens_k must be given together");
  TORCH_CHECK(q.dim() == rank && k.dim() == rank && v.dim() == rank, "q, k and v must be ", rank, "-D");
  TORCH_CHECK(k.sizes() == v.sizes(), "k and v must have the same shape");
  TORCH_CHECK(q.size(-1) == k.size(-1) && k.size(-2) > 0 && q.size(-2) % k.size(-2) == 0,
              "k/v must match q's head_dim and their head count divide q's");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), "k and v must have q's dtype");
  check_dense_last({{"q", &q}, {"k", &k}, {"v", &v}});
}

// A forward task's buffers, fp32: its query rows, the score tile, widened K/V tiles, the output accumulator, the
// running max and sum, and each row's key range.
// Sized by the widest tile: kKeys of them are 128 KiB, which glibc's malloc maps afresh per call (page faults).
struct ForwardScratch {
  std::vector<float> q, tile, k, v, acc, m, l;
  std::vector<int64_t> lo, hi;
  ForwardScratch(int64_t D, int64_t keys)
      : q(kRows * D), tile(kRows * keys), k(keys * D), v(keys * D), acc(kRows * D), m(kRows), l(kRows), lo(kRows),
        hi(kRows) {}
};

// Rows [i0, i0 + n) of the Tq * group query rows of K/V head kvh in sequence s, token-major: row i is token
// i / group of head kvh * group + i % group, so the heads of a GQA group share every K/V tile (a decode step's
// group is one block). Writes their out and lse.
template <typename T>
void forward_block(const Problem& P, const Sequence& s, int64_t kvh, int64_t i0, const Rows<const T>& q,
                   const Rows<const T>& k, const Rows<const T>& v, const Rows<T>& out, float* lse,
                   ForwardScratch& w) {
  const int64_t D = P.D, G = P.group(), n = std::min(kRows, s.Tq * G - i0);
  for (int64_t r = 0; r < n; ++r) {
    const int64_t t = (i0 + r) / G;
    widen(q.at(s.q_batch, s.q_row + t, kvh * G + (i0 + r) % G), w.q.data() + r * D, D);
    w.lo[r] = P.key_lo(s, t);
    w.hi[r] = P.key_hi(s, t);
  }
  const int64_t lo = w.lo[0], hi = w.hi[n - 1];  // both rise with the token: the block's range is their union
  float *tile = w.tile.data(), *acc = w.acc.data(), *m = w.m.data(), *l = w.l.data();
  std::fill(acc, acc + n * D, 0.0f);
  std::fill(m, m + n, -kInf);
  std::fill(l, l + n, 0.0f);
  for (int64_t c0 = lo; c0 < hi; c0 += kKeys) {
    const int64_t cw = std::min(kKeys, hi - c0);
    const Tile kt = rows_fp32(k, s.k_batch, s.k_row + c0, kvh, cw, D, w.k.data());
    gemm(false, true, n, cw, D, w.q.data(), D, kt.p, kt.ld, 0.0f, tile, cw);  // (n, D) @ (cw, D)^T: scores
    for (int64_t r = 0; r < n; ++r) {
      const int64_t a = std::clamp<int64_t>(w.lo[r] - c0, 0, cw);
      softmax_update(tile + r * cw, cw, a, std::clamp<int64_t>(w.hi[r] - c0, a, cw), P.scale, m[r], l[r],
                     acc + r * D, D);
    }
    const Tile vt = rows_fp32(v, s.k_batch, s.k_row + c0, kvh, cw, D, w.v.data());
    gemm(false, false, n, D, cw, tile, cw, vt.p, vt.ld, 1.0f, acc, D);  // acc += (n, cw) @ (cw, D)
  }
  for (int64_t r = 0; r < n; ++r) {
    const int64_t t = (i0 + r) / G, h = kvh * G + (i0 + r) % G;
    T* o = out.at(s.q_batch, s.q_row + t, h);
    const float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;  // a row that sees no key: 0, lse +inf (as the reference)
    for (int64_t d = 0; d < D; ++d) acc[r * D + d] *= inv;
    narrow(acc + r * D, o, D);
    lse[s.lse + h * P.lse_head + t] = l[r] > 0.0f ? m[r] + std::log(l[r]) : kInf;
  }
}

// out (q's shape, dense) and lse (float32) of every sequence of P: one task per (sequence, K/V head, row block).
template <typename T>
void forward(const Problem& P, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
             at::Tensor& lse) {
  struct Task {
    int64_t seq, kvh, i0;
  };
  std::vector<Task> tasks;
  for (int64_t si = 0; si < static_cast<int64_t>(P.seqs.size()); ++si) {
    for (int64_t kvh = 0; kvh < P.Hkv; ++kvh) {
      for (int64_t i0 = 0; i0 < P.seqs[si].Tq * P.group(); i0 += kRows) tasks.push_back({si, kvh, i0});
    }
  }
  const Rows<const T> qr = rows_of<const T>(q), kr = rows_of<const T>(k), vr = rows_of<const T>(v);
  const Rows<T> outr = rows_of<T>(out);
  float* lp = lse.data_ptr<float>();
  at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t begin, int64_t end) {
    ForwardScratch w(P.D, P.tile_keys());
    for (int64_t t = begin; t < end; ++t) {
      const Task& task = tasks[t];
      forward_block<T>(P, P.seqs[task.seq], task.kvh, task.i0, qr, kr, vr, outr, lp, w);
    }
  });
}

// Every query head of K/V head kvh in sequence s: dq of those heads, dk and dv of kvh (zeroed by the caller).
void backward_heads(const Problem& P, const Sequence& s, int64_t kvh, const Rows<const float>& dout,
                    const Rows<const float>& q, const Rows<const float>& k, const Rows<const float>& v,
                    const Rows<const float>& out, const float* lse, const float* dlse, const Rows<float>& dq,
                    const Rows<float>& dk, const Rows<float>& dv, float* p_tile, float* ds_tile, float* delta) {
  const int64_t D = P.D, group = P.group();
  for (int64_t h = kvh * group; h < (kvh + 1) * group; ++h) {
    for (int64_t i0 = 0; i0 < s.Tq; i0 += kRows) {
      const int64_t n = std::min(kRows, s.Tq - i0);
      const int64_t lo = P.key_lo(s, i0), hi = P.key_hi(s, i0 + n - 1);
      if (lo >= hi) continue;
      const int64_t t0 = s.q_row + i0, lse0 = s.lse + h * P.lse_head + i0;
      const float *do_p = dout.at(s.q_batch, t0, h), *out_p = out.at(s.q_batch, t0, h);
      for (int64_t r = 0; r < n; ++r) {  // d lse / d s = p, so an lse gradient only shifts delta
        delta[r] = dot(do_p + r * dout.row, out_p + r * out.row, D) - (dlse ? dlse[lse0 + r] : 0.0f);
      }
      const float* q_p = q.at(s.q_batch, t0, h);
      float* dq_p = dq.at(s.q_batch, t0, h);
      for (int64_t c0 = lo; c0 < hi; c0 += kKeys) {
        const int64_t cw = std::min(kKeys, hi - c0), k0 = s.k_row + c0;
        const float *k_p = k.at(s.k_batch, k0, kvh), *v_p = v.at(s.k_batch, k0, kvh);
        gemm(false, true, n, cw, D, q_p, q.row, k_p, k.row, 0.0f, p_tile, cw);       // (n, cw) scores
        gemm(false, true, n, cw, D, do_p, dout.row, v_p, v.row, 0.0f, ds_tile, cw);  // (n, cw) dP
        for (int64_t r = 0; r < n; ++r) {
          float* p = p_tile + r * cw;
          float* ds = ds_tile + r * cw;
          const int64_t a = std::clamp<int64_t>(P.key_lo(s, i0 + r) - c0, 0, cw);
          const int64_t b = std::clamp<int64_t>(P.key_hi(s, i0 + r) - c0, a, cw);
          std::fill(p, p + a, 0.0f);
          std::fill(p + b, p + cw, 0.0f);
          probabilities(p + a, b - a, P.scale, lse[lse0 + r]);  // lse +inf (no key) gives 0
          score_grad(p, ds, cw, delta[r], P.scale);
        }
        gemm(true, false, cw, D, n, p_tile, cw, do_p, dout.row, 1.0f, dv.at(s.k_batch, k0, kvh), dv.row);  // P^T dO
        gemm(true, false, cw, D, n, ds_tile, cw, q_p, q.row, 1.0f, dk.at(s.k_batch, k0, kvh), dk.row);    // dS^T Q
        gemm(false, false, n, D, cw, ds_tile, cw, k_p, k.row, 1.0f, dq_p, dq.row);                         // dS K
      }
    }
  }
}

at::Tensor widened(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

std::tuple<at::Tensor, at::Tensor> attention_forward_cpu(const at::Tensor& q, const at::Tensor& k,
                                                         const at::Tensor& v, const std::optional<at::Tensor>& cu_q,
                                                         const std::optional<at::Tensor>& cu_k, double scale,
                                                         int64_t left, int64_t right) {
  check_inputs(q, k, v, cu_q, cu_k);
  const Problem P = attention_problem(q, k, cu_q, cu_k, scale, left, right);
  at::Tensor out = at::empty(q.sizes(), q.options());
  const auto lse_shape = cu_q.has_value() ? std::vector<int64_t>{P.H, q.size(0)}
                                          : std::vector<int64_t>{q.size(0), P.H, q.size(1)};
  at::Tensor lse = at::empty(lse_shape, q.options().dtype(at::kFloat));
  dispatch_dtype(q.scalar_type(), "attention", [&](auto* type) {
    forward<std::remove_pointer_t<decltype(type)>>(P, q, k, v, out, lse);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& dlse, const std::optional<at::Tensor>& cu_q,
    const std::optional<at::Tensor>& cu_k, double scale, int64_t left, int64_t right) {
  check_inputs(q, k, v, cu_q, cu_k);
  TORCH_CHECK(dout.sizes() == q.sizes() && out.sizes() == q.sizes(), "dout and out must have q's shape");
  const Problem P = attention_problem(q, k, cu_q, cu_k, scale, left, right);
  const at::Tensor dof = widened(dout), qf = widened(q), kf = widened(k), vf = widened(v), of = widened(out);
  const at::Tensor lf = widened(lse);
  const std::optional<at::Tensor> dlf = dlse.has_value() ? std::optional<at::Tensor>(widened(*dlse)) : std::nullopt;
  TORCH_CHECK(lf.numel() == P.H * q.size(0) * (cu_q.has_value() ? 1 : q.size(1)), "lse has the wrong size");
  at::Tensor dq = at::zeros(q.sizes(), qf.options()), dk = at::zeros(k.sizes(), qf.options()),
             dv = at::zeros(k.sizes(), qf.options());
  const Rows<const float> dor = rows_of<const float>(dof), qr = rows_of<const float>(qf),
                          kr = rows_of<const float>(kf), vr = rows_of<const float>(vf),
                          outr = rows_of<const float>(of);
  const Rows<float> dqr = rows_of<float>(dq), dkr = rows_of<float>(dk), dvr = rows_of<float>(dv);
  const float* lp = lf.data_ptr<float>();
  const float* dlp = dlf.has_value() ? dlf->data_ptr<float>() : nullptr;
  const int64_t n_tasks = static_cast<int64_t>(P.seqs.size()) * P.Hkv;
  at::parallel_for(0, n_tasks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> p_tile(kRows * P.tile_keys()), ds_tile(kRows * P.tile_keys()), delta(kRows);
    for (int64_t t = begin; t < end; ++t) {
      backward_heads(P, P.seqs[t / P.Hkv], t % P.Hkv, dor, qr, kr, vr, outr, lp, dlp, dqr, dkr, dvr, p_tile.data(),
                     ds_tile.data(), delta.data());
    }
  });
  return {dq.to(q.scalar_type()), dk.to(k.scalar_type()), dv.to(v.scalar_type())};
}

// Decoding: Tq * group <= kDecodeRows query rows per K/V head, so a key row costs a few dot products and reading
// the cache bounds the time. A task takes a range of one sequence's keys for every head and walks it in blocks of
// block_keys rows. The scores of a block are taken in memory order, each key row holding every K/V head: read one
// head at a time, the (B, Tmax, Hkv, D) cache strides Hkv * D elements between rows, which the prefetchers do not
// follow (measured on the 2-core EPYC, fp32 8 x 4096 x 12 x 64: summing each head in turn 8.2 GB/s, the whole cache
// 30 GB/s). The values are then taken a head at a time, each head's accumulators held in registers over the block;
// the scores pass has brought them into L2 (fp32: a prefetch per line) or widened them there (bf16, fp16). The ranges
// of a sequence (splits, enough for every thread) are combined through their max, sum and unnormalized out.
constexpr int64_t kDecodeRows = 8;
constexpr int64_t kDecodeKeys = 64;          // most keys per block: scores H * Tq x 64 floats, L1-resident
constexpr int64_t kDecodeValues = 32768;     // floats of values per block (128 KiB), inside the 512 KiB L2
constexpr int64_t kMinKeysPerSplit = 256;    // fewer would spend more on the combine than on the keys

// Keys per block: kDecodeKeys, fewer (a multiple of 8) where a block's values would outgrow kDecodeValues.
int64_t block_keys(const Problem& P) {
  return std::clamp<int64_t>(kDecodeValues / std::max<int64_t>(1, P.Hkv * P.D) / 8 * 8, 8, kDecodeKeys);
}

// Asks for the cache lines of [p, p + bytes) in L2, for a pass that reads them out of memory order.
inline void prefetch_l2(const void* p, int64_t bytes) {
  const auto first = reinterpret_cast<uintptr_t>(p) & ~uintptr_t{63};
  const auto end = reinterpret_cast<uintptr_t>(p) + static_cast<uintptr_t>(bytes);
  for (uintptr_t line = first; line < end; line += 64) __builtin_prefetch(reinterpret_cast<const void*>(line), 0, 2);
}

// Keys [k0, k1) of sequence s for every query row, ordered (K/V head, row of its block as in forward_block): the
// running max m, sum l and unnormalized out acc of each.
template <typename T>
void decode_split(const Problem& P, const Sequence& s, int64_t k0, int64_t k1, const Rows<const T>& q,
                  const Rows<const T>& k, const Rows<const T>& v, float* m, float* l, float* acc,
                  std::vector<float>& scratch) {
  constexpr bool in_place = std::is_same_v<T, float>;
  const int64_t D = P.D, G = P.group(), n = s.Tq * G, rows = P.Hkv * n, HD = P.Hkv * D, bk = block_keys(P);
  scratch.resize(rows * D + rows * bk + (in_place ? 0 : HD + bk * HD));
  // qs (rows, D); scores (rows, bk); widened K row (Hkv, D) and values (bk, Hkv, D) for bf16 and fp16
  float *qs = scratch.data(), *scores = qs + rows * D, *key_w = scores + rows * bk, *value_w = key_w + HD;
  for (int64_t R = 0; R < rows; ++R) {
    widen(q.at(s.q_batch, s.q_row + (R % n) / G, (R / n) * G + R % G), qs + R * D, D);
  }
  std::fill(m, m + rows, -kInf);
  std::fill(l, l + rows, 0.0f);
  std::fill(acc, acc + rows * D, 0.0f);
  for (int64_t c0 = k0; c0 < k1; c0 += bk) {
    const int64_t cw = std::min(bk, k1 - c0);
    for (int64_t i = 0; i < cw; ++i) {
      const int64_t j = c0 + i;
      if constexpr (in_place) {
        for (int64_t h = 0; h < P.Hkv; ++h) prefetch_l2(v.at(s.k_batch, j, h), D * sizeof(float));
        score_key(qs, n, P.Hkv, k.at(s.k_batch, j, 0), k.head, D, scores + i, cw);
      } else {
        for (int64_t h = 0; h < P.Hkv; ++h) {
          widen(k.at(s.k_batch, j, h), key_w + h * D, D);
          widen(v.at(s.k_batch, j, h), value_w + (i * P.Hkv + h) * D, D);
        }
        score_key(qs, n, P.Hkv, key_w, D, D, scores + i, cw);
      }
    }
    for (int64_t R = 0; R < rows; ++R) {
      const int64_t t = (R % n) / G, a = std::clamp<int64_t>(P.key_lo(s, t) - c0, 0, cw);
      softmax_update(scores + R * cw, cw, a, std::clamp<int64_t>(P.key_hi(s, t) - c0, a, cw), P.scale, m[R], l[R],
                     acc + R * D, D);
    }
    if constexpr (in_place) {
      accumulate_block(scores, cw, n, P.Hkv, v.at(s.k_batch, c0, 0), v.row, v.head, D, acc);
    } else {
      accumulate_block(scores, cw, n, P.Hkv, value_w, HD, D, D, acc);
    }
  }
}

template <typename T>
void decode(const Problem& P, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
            at::Tensor& lse) {
  const int64_t n_seq = static_cast<int64_t>(P.seqs.size()), rows = P.H * (n_seq ? P.seqs[0].Tq : 0), D = P.D;
  if (rows == 0) return;  // no query row (Tq 0): out and lse are empty
  struct Split {
    int64_t seq, k0, k1;
  };
  std::vector<Split> splits;
  std::vector<int64_t> first(n_seq + 1);
  const int64_t wanted = (4 * at::get_num_threads() + n_seq - 1) / std::max<int64_t>(n_seq, 1);
  const int64_t bk = block_keys(P);
  for (int64_t si = 0; si < n_seq; ++si) {
    const Sequence& s = P.seqs[si];
    const int64_t lo = P.key_lo(s, 0), hi = std::max(lo, P.key_hi(s, s.Tq - 1));
    const int64_t count = std::clamp<int64_t>(wanted, 1, std::max<int64_t>(1, (hi - lo) / kMinKeysPerSplit));
    const int64_t chunk = ((hi - lo + count - 1) / count + bk - 1) / bk * bk;
    first[si] = static_cast<int64_t>(splits.size());
    for (int64_t k0 = lo; k0 < hi || k0 == lo; k0 += std::max<int64_t>(chunk, 1)) {
      splits.push_back({si, k0, std::min(hi, k0 + chunk)});
    }
  }
  first[n_seq] = static_cast<int64_t>(splits.size());
  const int64_t n_splits = first[n_seq];
  std::vector<float> m(n_splits * rows), l(n_splits * rows), acc(n_splits * rows * D);
  const Rows<const T> qr = rows_of<const T>(q), kr = rows_of<const T>(k), vr = rows_of<const T>(v);
  at::parallel_for(0, n_splits, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch;
    for (int64_t i = begin; i < end; ++i) {
      const Split& sp = splits[i];
      decode_split<T>(P, P.seqs[sp.seq], sp.k0, sp.k1, qr, kr, vr, m.data() + i * rows, l.data() + i * rows,
                      acc.data() + i * rows * D, scratch);
    }
  });
  const Rows<T> outr = rows_of<T>(out);
  float* lp = lse.data_ptr<float>();
  at::parallel_for(0, n_seq, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> o(D);
    for (int64_t si = begin; si < end; ++si) {
      const Sequence& s = P.seqs[si];
      const int64_t G = P.group(), n = s.Tq * G;
      for (int64_t R = 0; R < rows; ++R) {
        float m_all = -kInf, l_all = 0.0f;
        for (int64_t i = first[si]; i < first[si + 1]; ++i) m_all = std::max(m_all, m[i * rows + R]);
        std::fill(o.begin(), o.end(), 0.0f);
        if (m_all != -kInf) {
          for (int64_t i = first[si]; i < first[si + 1]; ++i) {
            const float w = std::exp(m[i * rows + R] - m_all);  // 0 for a split whose keys this row does not see
            l_all += l[i * rows + R] * w;
            axpy(w, acc.data() + (i * rows + R) * D, o.data(), D);
          }
        }
        const int64_t t = (R % n) / G, h = (R / n) * G + R % G;
        const float inv = l_all > 0.0f ? 1.0f / l_all : 0.0f;  // no key: 0 and lse +inf, as forward_block
        T* dst = outr.at(s.q_batch, s.q_row + t, h);
        for (int64_t d = 0; d < D; ++d) o[d] *= inv;
        narrow(o.data(), dst, D);
        lp[s.lse + h * P.lse_head + t] = l_all > 0.0f ? m_all + std::log(l_all) : kInf;
      }
    }
  });
}

// Decoding against a KV cache (fasttrain/ops/decode.py appends the new rows first): query token t of sequence b
// sits at key position cache_lengths[b] - Tq + t and sees keys [0, cache_lengths[b]) of cache row
// cache_batch_idx[b] (or b) within the window, and no key past the cache's end.
std::tuple<at::Tensor, at::Tensor> attention_kvcache_cpu(const at::Tensor& q, const at::Tensor& k_cache,
                                                         const at::Tensor& v_cache, const at::Tensor& cache_lengths,
                                                         const std::optional<at::Tensor>& cache_batch_idx,
                                                         double scale, int64_t left, int64_t right) {
  TORCH_CHECK(q.dim() == 4 && k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes(),
              "q must be (B, Tq, H, D) and k_cache, v_cache the same (B_cache, Tmax, Hkv, D)");
  TORCH_CHECK(q.size(3) == k_cache.size(3) && k_cache.size(2) > 0 && q.size(2) % k_cache.size(2) == 0,
              "the caches must match q's head_dim and their head count divide q's");
  TORCH_CHECK(k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type(),
              "the caches must have q's dtype");
  check_dense_last({{"q", &q}, {"k_cache", &k_cache}, {"v_cache", &v_cache}});
  const int64_t B = q.size(0), Tq = q.size(1), Bc = k_cache.size(0), Tmax = k_cache.size(1);
  const at::Tensor lengths = cache_lengths.to(at::kLong).contiguous();
  TORCH_CHECK(lengths.numel() == B, "cache_lengths must hold one length per sequence (", B, "), got ", lengths.numel());
  at::Tensor rows;
  if (cache_batch_idx.has_value()) {
    rows = cache_batch_idx->to(at::kLong).contiguous();
    TORCH_CHECK(rows.numel() == B, "cache_batch_idx must hold one row per sequence (", B, "), got ", rows.numel());
  }
  Problem P = make_problem(q, k_cache, scale, left, right);
  P.lse_head = Tq;
  const int64_t* len = lengths.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    const int64_t row = rows.defined() ? rows.data_ptr<int64_t>()[b] : b;
    TORCH_CHECK(0 <= row && row < Bc, "cache_batch_idx must lie in [0, ", Bc, "), got ", row);
    P.seqs.push_back({b, 0, row, 0, Tq, len[b], std::clamp<int64_t>(len[b], 0, Tmax), b * P.H * Tq});
  }
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({B, P.H, Tq}, q.options().dtype(at::kFloat));
  dispatch_dtype(q.scalar_type(), "attention", [&](auto* type) {
    using T = std::remove_pointer_t<decltype(type)>;
    if (Tq * P.group() <= kDecodeRows) {
      decode<T>(P, q, k_cache, v_cache, out, lse);
    } else {
      forward<T>(P, q, k_cache, v_cache, out, lse);  // rows enough for the matmuls of the prefill path
    }
  });
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(fasttrain, CPU, m) {
  m.impl("attention_forward_cpu", &attention_forward_cpu);
  m.impl("attention_backward_cpu", &attention_backward_cpu);
  m.impl("attention_kvcache_cpu", &attention_kvcache_cpu);
}

}  // namespace fasttrain
