// Attention on the CPU in flash-attn's layout and masking; fasttrain/ops/attention_reference.py is the oracle.
// Forward: one task per (sequence, K/V head, block of kRows query rows, token-major over the heads of its GQA group),
// an online softmax over tiles of kKeys keys, so that scores exist only in a per-thread (kRows x kKeys) tile; inputs
// are read in place in their dtype and strides, widened to fp32 a tile at a time. The KV-cache decode
// (decode_cpu.cpp) takes this forward when a K/V head has many query rows. Backward: one task per (sequence, K/V
// head), which owns that head's dK and dV and the dQ of its GQA group, so no two threads write the same row; P is
// recomputed from the saved lse, five matmuls per tile (S, dP, dV, dK, dQ). The matmuls go to torch's BLAS (MKL in
// the x86 wheels) straight (cpu_blas.h), single-threaded inside the parallel region; the softmax loops are ours,
// vectorized by GCC in AVX-512 / AVX2 clones. fp16/bf16 inputs are computed in fp32 and rounded once at the end, as
// the GPU kernels do. Ops (schemas in ops.cpp): fasttrain::attention_forward_cpu and attention_backward_cpu, CPU
// dispatch key.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "attention_cpu.h"
#include "cpu_blas.h"
#include "cpu_math.h"
#include "cpu_simd.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
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

// s[0, n) *= scale; returns the largest, or NaN if any is NaN (a NaN input makes its row NaN, as softmax does).
FT_CPU_CLONES float scale_and_max(float* __restrict s, int64_t n, float scale) {
  float m = -kInf;
  int nan = 0;
#pragma omp simd reduction(max : m) reduction(| : nan)
  for (int64_t j = 0; j < n; ++j) {
    s[j] *= scale;
    m = s[j] > m ? s[j] : m;
    nan |= s[j] != s[j];
  }
  return nan ? std::numeric_limits<float>::quiet_NaN() : m;
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

// p[0, n) /= their sum, when it is positive (a row that sees no key stays 0, a NaN row NaN); returns the largest
// (0 for a row that sees no key or is NaN).
FT_CPU_CLONES float normalize(float* __restrict p, int64_t n) {
  float sum = 0.0f, top = 0.0f;
#pragma omp simd reduction(+ : sum) reduction(max : top)
  for (int64_t j = 0; j < n; ++j) {
    sum += p[j];
    top = p[j] > top ? p[j] : top;
  }
  if (!(sum > 0.0f)) return 0.0f;
  const float inv = 1.0f / sum;
  for (int64_t j = 0; j < n; ++j) p[j] *= inv;
  return top * inv;
}

// dp[0, n) = p * (dp - delta) * scale: the score gradient, in place.
FT_CPU_CLONES void score_grad(const float* __restrict p, float* __restrict dp, int64_t n, float delta, float scale) {
  for (int64_t j = 0; j < n; ++j) dp[j] = p[j] * (dp[j] - delta) * scale;
}

// s[0, n) = softcap * tanh(x), x = s * pre (pre = scale / softcap), with 1 - tanh^2 x into dcap when it is not
// null. tanh as Cephes' tanhf: an odd polynomial below |x| = 0.625 (within an ulp), where 1 - 2 / (e^2|x| + 1) would
// cancel to an absolute error of an ulp of 1 (times softcap in the score); above it tanh = sign(x) (1 - a) with
// a = 2 / (e^2|x| + 1). 1 - tanh^2 = a (2 - a), a = 1 - |tanh| on both sides: no cancellation where |tanh| nears 1
// (exp_approx saturates, so a large |x| gives a = 0).
FT_CPU_CLONES void cap_scores(float* __restrict s, int64_t n, float pre, float softcap, float* __restrict dcap) {
  for (int64_t j = 0; j < n; ++j) {
    const float x = s[j] * pre, ax = std::fabs(x), z = x * x;
    float poly = -5.70498872745e-3f;
    poly = poly * z + 2.06390887954e-2f;
    poly = poly * z - 5.37397155531e-2f;
    poly = poly * z + 1.33314422036e-1f;
    poly = poly * z - 3.33332819422e-1f;
    poly = poly * z * ax + ax;
    const bool small = ax < 0.625f;
    const float e = 2.0f / (exp_approx(2.0f * ax) + 1.0f);
    const float t = small ? poly : 1.0f - e, a = small ? 1.0f - poly : e;
    s[j] = softcap * (x < 0.0f ? -t : t);
    if (dcap) dcap[j] = a * (2.0f - a);
  }
}

// q . k over n floats, accumulated in double.
FT_CPU_CLONES double dot_exact(const float* __restrict q, const float* __restrict k, int64_t n) {
  double s = 0.0;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) s += static_cast<double>(q[j]) * static_cast<double>(k[j]);
  return s;
}

constexpr float kRefine = 1.0f / 32;  // the probabilities refine_row recomputes: at most 31 of a row
constexpr float kRefineRow = 0.25f;  // the rows it refines: one key holds over a quarter of the mass

// Row i's renormalized P over the keys [a, b) of a tile (key j at k + j * ldk), under softcap or ALiBi: each p above
// kRefine recomputed from its score in double, with its dcap. The fp32 score carries the rounding of a q . k sum whose
// terms can dwarf it and the ulp of a large capped or biased score, several ulps of p; where p is large so is the dS
// it adds to dK and dQ. Those keys keep the row's mass less the others' fp32 sum, shared by exp of their exact scores.
FT_CPU_CLONES void refine_row(const Problem& P, const Sequence& s, int64_t h, int64_t i, int64_t c0, const float* q,
                             const float* k, int64_t ldk, float* p, int64_t a, int64_t b, float* dcap) {
  // The others' mass, then the keys above kRefine: at most 31, as P sums to 1 (n stops at 31: a 32nd would only
  // overwrite the spare slot).
  double rest = 0.0;
#pragma omp simd reduction(+ : rest)
  for (int64_t j = a; j < b; ++j) rest += p[j] > kRefine ? 0.0 : static_cast<double>(p[j]);
  int64_t idx[32];
  double score[32], cap[32];
  int64_t n = 0;
  for (int64_t j = a; j < b; ++j) {
    idx[n] = j;
    n = std::min<int64_t>(n + (p[j] > kRefine), 31);
  }
  if (n == 0) return;
  double top = -std::numeric_limits<double>::infinity();
  const float slope = P.alibi != nullptr ? P.alibi[s.id * P.alibi_batch + h] : 0.0f;
  for (int64_t t = 0; t < n; ++t) {
    const int64_t key = c0 + idx[t];
    double x = dot_exact(q, k + idx[t] * ldk, P.D) * P.scale_exact;
    cap[t] = 1.0;
    if (P.softcap > 0.0f) {
      const double th = std::tanh(x / P.softcap);
      x = P.softcap * th;
      cap[t] = 1.0 - th * th;
    }
    x -= static_cast<double>(slope) * static_cast<double>(std::abs(i + s.Tk - s.Tq - key));
    score[t] = x;
    top = std::max(top, x);
  }
  double sum = 0.0;
  for (int64_t t = 0; t < n; ++t) {
    score[t] = exp_approx(static_cast<float>(score[t] - top));  // within ln 32 of 0: ulps of p
    sum += score[t];
  }
  const double share = std::max(0.0, 1.0 - rest) / sum;
  for (int64_t t = 0; t < n; ++t) {
    p[idx[t]] = static_cast<float>(score[t] * share);
    if (dcap) dcap[idx[t] - a] = static_cast<float>(cap[t]);
  }
}

// s[0, n) -= slope * |d - j|: ALiBi's bias for the key j columns before query position d.
FT_CPU_CLONES void alibi_scores(float* __restrict s, int64_t n, float slope, int64_t d) {
  for (int64_t j = 0; j < n; ++j) s[j] -= slope * static_cast<float>(std::abs(d - j));
}

// dst row i (ld floats apart) += src row i (D floats apart), for i < rows.
FT_CPU_CLONES void add_rows(float* __restrict dst, int64_t ld, const float* __restrict src, int64_t rows, int64_t D) {
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t d = 0; d < D; ++d) dst[i * ld + d] += src[i * D + d];
  }
}

FT_CPU_CLONES float dot(const float* __restrict a, const float* __restrict b, int64_t n) {
  float s;
  dot_rows<1>(a, b, n, &s, 0);
  return s;
}

constexpr int64_t kGroups = 64;  // Philox calls per batch of dropout_keep: 512 keys

// w[word][t]: Philox4x32-10 (as triton.language.random.philox) of counter (g0 + t, i, bh, offset) under key
// (k0, k1), for t in [0, m): one call per SIMD lane (the 32x32 -> 64-bit products vectorize).
FT_CPU_CLONES void philox_groups(uint32_t g0, int64_t m, uint32_t i, uint32_t bh, uint32_t offset, uint32_t k0,
                                 uint32_t k1, uint32_t (*__restrict w)[kGroups]) {
#pragma omp simd
  for (int64_t t = 0; t < m; ++t) {
    uint32_t c0 = g0 + static_cast<uint32_t>(t), c1 = i, c2 = bh, c3 = offset, a = k0, b = k1;
    for (int round = 0; round < 10; ++round) {
      const uint64_t pb = uint64_t{0xCD9E8D57} * c2, pa = uint64_t{0xD2511F53} * c0;
      const uint32_t n0 = static_cast<uint32_t>(pb >> 32) ^ c1 ^ a, n2 = static_cast<uint32_t>(pa >> 32) ^ c3 ^ b;
      c1 = static_cast<uint32_t>(pb);
      c3 = static_cast<uint32_t>(pa);
      c0 = n0;
      c2 = n2;
      a += 0x9E3779B9u;
      b += 0xBB67AE85u;
    }
    w[0][t] = c0;
    w[1][t] = c1;
    w[2][t] = c2;
    w[3][t] = c3;
  }
}

// keep[0, n): whether scores (query i, keys j0 .. j0 + n - 1) of head row bh = b * H + h are kept, one Philox call
// per eight keys (kernels/_attention_dropout.py: key j takes the 16-bit half j % 8 / 4 of word j % 4).
void dropout_keep(const Dropout& d, uint32_t bh, uint32_t i, int64_t j0, int64_t n, uint8_t* keep) {
  const uint32_t k0 = static_cast<uint32_t>(d.seed), k1 = static_cast<uint32_t>(d.seed >> 32);
  uint32_t w[4][kGroups];
  for (int64_t g = j0 / 8; g * 8 < j0 + n; g += kGroups) {
    const int64_t m = std::min(kGroups, (j0 + n + 7) / 8 - g);
    philox_groups(static_cast<uint32_t>(g), m, i, bh, d.offset, k0, k1, w);
    for (int64_t j = std::max(j0, g * 8); j < std::min(j0 + n, (g + m) * 8); ++j) {
      const int64_t t = j / 8 - g, e = j % 8;
      keep[j - j0] = ((w[e % 4][t] >> (16 * (e / 4))) & 0xFFFFu) < d.threshold;
    }
  }
}

// The Dropout of dropout_p and a (seed, offset) int64 tensor.
Dropout dropout_of(double dropout_p, const std::optional<at::Tensor>& seed) {
  Dropout d;
  if (dropout_p <= 0.0) return d;
  TORCH_CHECK(seed.has_value() && seed->numel() == 2 && seed->scalar_type() == at::kLong && seed->device().is_cpu(),
              "dropout_seed must be a CPU int64 tensor of (seed, offset)");
  const at::Tensor s = seed->contiguous();
  const int64_t* v = s.data_ptr<int64_t>();
  d.on = true;
  d.seed = static_cast<uint64_t>(v[0]);
  d.offset = static_cast<uint32_t>(static_cast<uint64_t>(v[1]));
  d.threshold = static_cast<uint32_t>(std::clamp<int64_t>(static_cast<int64_t>(65536.0 * (1.0 - dropout_p) + 0.5), 1,
                                                          65536));
  d.scale = static_cast<float>(1.0 / (1.0 - dropout_p));
  return d;
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
    if (x.row >= D) return {x.at(b, t0, h), x.row};  // BLAS takes no leading dimension below D (rows of stride 0)
  }
  for (int64_t i = 0; i < n; ++i) widen(x.at(b, t0 + i, h), scratch + i * D, D);
  return {scratch, D};
}

// The widest score tile any task needs: kKeys, or fewer when no sequence has that many keys.
int64_t tile_keys(const Problem& P) {
  int64_t keys = 0;
  for (const Sequence& s : P.seqs) keys = std::max(keys, s.k_end);
  return std::min(kKeys, keys);
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
      p.seqs.push_back({0, a[s], 0, b[s], a[s + 1] - a[s], Tk, Tk, a[s], s});
    }
    p.lse_head = q.size(0);
  } else {
    const int64_t B = q.size(0), Tq = q.size(1), Tk = k.size(1);
    for (int64_t b = 0; b < B; ++b) p.seqs.push_back({b, 0, b, 0, Tq, Tk, Tk, b * p.H * Tq, b});
    p.lse_head = Tq;
  }
  return p;
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
  std::vector<uint8_t> keep;  // one row's dropout mask
  ForwardScratch(int64_t D, int64_t keys)
      : q(kRows * D), tile(kRows * keys), k(keys * D), v(keys * D), acc(kRows * D), m(kRows), l(kRows), lo(kRows),
        hi(kRows), keep(keys) {}
};

// Rows [i0, i0 + n) of the Tq * group query rows of K/V head kvh in sequence s, token-major: row i is token
// i / group of head kvh * group + i % group, so the heads of a GQA group share every K/V tile (a decode step's
// group is one block). Writes their out and lse.
template <typename T>
void forward_block(const Problem& P, const Sequence& s, int64_t kvh, int64_t i0, const Rows<const T>& q,
                   const Rows<const T>& k, const Rows<const T>& v, const Rows<T>& out, float* lse,
                   ForwardScratch& w, const Dropout& dropout, int64_t seq) {
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
      const int64_t b = std::clamp<int64_t>(w.hi[r] - c0, a, cw);
      float scale = P.scale;
      if (P.modified()) {  // the visible scores made final here: softmax_update scales by 1
        modify_scores(P, s, kvh * G + (i0 + r) % G, (i0 + r) / G, c0 + a, tile + r * cw + a, b - a, nullptr);
        scale = 1.0f;
      }
      softmax_update(tile + r * cw, cw, a, b, scale, m[r], l[r], acc + r * D, D);
      if (dropout.on) {  // l keeps the undropped sum; only the kept probabilities reach acc
        const int64_t t = (i0 + r) / G, bh = seq * P.H + kvh * G + (i0 + r) % G;
        float* row = tile + r * cw;
        dropout_keep(dropout, static_cast<uint32_t>(bh), static_cast<uint32_t>(t), c0 + a, b - a, w.keep.data());
        for (int64_t j = a; j < b; ++j) row[j] = w.keep[j - a] ? row[j] : 0.0f;
      }
    }
    const Tile vt = rows_fp32(v, s.k_batch, s.k_row + c0, kvh, cw, D, w.v.data());
    gemm(false, false, n, D, cw, tile, cw, vt.p, vt.ld, 1.0f, acc, D);  // acc += (n, cw) @ (cw, D)
  }
  for (int64_t r = 0; r < n; ++r) {
    const int64_t t = (i0 + r) / G, h = kvh * G + (i0 + r) % G;
    T* o = out.at(s.q_batch, s.q_row + t, h);
    // A row that sees no key: 0, lse +inf (as the reference); a NaN row stays NaN, its lse too (backward's p NaN).
    const bool seen = l[r] > 0.0f || std::isnan(l[r]);
    const float inv = seen ? dropout.scale / l[r] : 0.0f;
    for (int64_t d = 0; d < D; ++d) acc[r * D + d] *= inv;
    narrow(acc + r * D, o, D);
    lse[s.lse + h * P.lse_head + t] = seen ? m[r] + std::log(l[r]) : kInf;
  }
}

// attention_forward (attention_cpu.h) for inputs of type T: one task per (sequence, K/V head, row block).
template <typename T>
void forward(const Problem& P, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
             at::Tensor& lse, const Dropout& dropout) {
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
    ForwardScratch w(P.D, tile_keys(P));
    for (int64_t t = begin; t < end; ++t) {
      const Task& task = tasks[t];
      forward_block<T>(P, P.seqs[task.seq], task.kvh, task.i0, qr, kr, vr, outr, lp, w, dropout, task.seq);
    }
  });
}

// Every query head of K/V head kvh in sequence s: dq of those heads, dk and dv of kvh (zeroed by the caller).
void backward_heads(const Problem& P, const Sequence& s, int64_t kvh, const Rows<const float>& dout,
                    const Rows<const float>& q, const Rows<const float>& k, const Rows<const float>& v,
                    const Rows<const float>& out, const float* lse, const float* dlse, const Rows<float>& dq,
                    const Rows<float>& dk, const Rows<float>& dv, float* p_tile, float* ds_tile, float* delta,
                    const Dropout& dropout, int64_t seq, uint8_t* keep, float* dcap, float* kv_tile) {
  const int64_t D = P.D, group = P.group();
  for (int64_t h = kvh * group; h < (kvh + 1) * group; ++h) {
    for (int64_t i0 = 0; i0 < s.Tq; i0 += kRows) {
      const int64_t n = std::min(kRows, s.Tq - i0);
      const int64_t lo = P.key_lo(s, i0), hi = P.key_hi(s, i0 + n - 1);
      if (lo >= hi) continue;
      const int64_t t0 = s.q_row + i0, lse0 = s.lse + h * P.lse_head + i0;
      const float *do_p = dout.at(s.q_batch, t0, h), *out_p = out.at(s.q_batch, t0, h);
      // With softcap or ALiBi, when the block's keys fit in one tile: each row's P renormalized to sum 1, since
      // exp(s - lse) carries lse's rounding (half an ulp of |lse|, large with capped or biased scores) into every p
      // of the row alike; in a row where one key holds over kRefineRow, its p above kRefine recomputed from exact
      // scores (refine_row: the rows whose dS is large); and delta = rowsum(P * dP) from that P (minus dlse:
      // d lse / d s = p). Otherwise delta = dO . O - dlse.
      const bool renormalize = P.modified() && hi - lo <= kKeys;
      for (int64_t r = 0; r < n; ++r) {
        const float d_o = renormalize ? 0.0f : dot(do_p + r * dout.row, out_p + r * out.row, D);
        delta[r] = d_o - (dlse ? dlse[lse0 + r] : 0.0f);
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
          const int64_t key_lo = P.key_lo(s, i0 + r), key_hi = P.key_hi(s, i0 + r);
          const int64_t a = std::clamp<int64_t>(key_lo - c0, 0, cw);
          const int64_t b = std::clamp<int64_t>(key_hi - c0, a, cw);
          std::fill(p, p + a, 0.0f);
          std::fill(p + b, p + cw, 0.0f);
          if (P.modified()) {
            modify_scores(P, s, h, i0 + r, c0 + a, p + a, b - a, P.softcap > 0.0f ? dcap : nullptr);
            probabilities(p + a, b - a, 1.0f, lse[lse0 + r]);
          } else {
            probabilities(p + a, b - a, P.scale, lse[lse0 + r]);  // lse +inf (no key) gives 0
          }
          if (renormalize) {
            if (normalize(p + a, b - a) > kRefineRow) {
              refine_row(P, s, h, i0 + r, c0, q_p + r * q.row, k_p, k.row, p, a, b, P.softcap > 0.0f ? dcap : nullptr);
            }
          }
          // A row with one visible key: its probability is exactly 1 (the forward's p / l, which the recomputed exp
          // may miss by an ulp) and delta = p dP - dlse, so that dS is exactly 0 (but for dlse), as the softmax of one
          // score is constant; dO . O, a sum in another order, would leave dP - delta an ulp of dP from 0.
          const bool one_key = key_hi - key_lo == 1 && b - a == 1;
          if (one_key && p[a] > 0.5f) p[a] = 1.0f;
          if (dropout.on) {  // dP through the mask Z / p_keep; then P Z / p_keep for dV
            dropout_keep(dropout, static_cast<uint32_t>(seq * P.H + h), static_cast<uint32_t>(i0 + r), c0 + a, b - a,
                         keep);
            for (int64_t j = a; j < b; ++j) ds[j] = keep[j - a] ? ds[j] * dropout.scale : 0.0f;
          }
          if (renormalize) {
            delta[r] += dot(p + a, ds + a, b - a);
          } else if (one_key) {
            delta[r] = p[a] * ds[a] - (dlse ? dlse[lse0 + r] : 0.0f);
          }
          score_grad(p, ds, cw, delta[r], P.scale);
          if (P.softcap > 0.0f) {  // through the cap: d(softcap * tanh(x / softcap)) / dx = 1 - tanh^2
            for (int64_t j = a; j < b; ++j) ds[j] *= dcap[j - a];
          }
          if (dropout.on) {
            for (int64_t j = a; j < b; ++j) p[j] = keep[j - a] ? p[j] * dropout.scale : 0.0f;
          }
        }
        // dV and dK sum over every query row of the GQA group. With fewer keys than rows (each p large: one key gives
        // dV = the sum of Tq * group dO rows) the block's share is summed apart and then added, since the BLAS sums
        // k sequentially into one fp32 accumulator; wider tiles add straight in (the extra pass costs time there).
        float *dv_p = dv.at(s.k_batch, k0, kvh), *dk_p = dk.at(s.k_batch, k0, kvh);
        if (cw < n) {
          gemm(true, false, cw, D, n, p_tile, cw, do_p, dout.row, 0.0f, kv_tile, D);  // (cw, D) P^T dO
          add_rows(dv_p, dv.row, kv_tile, cw, D);
          gemm(true, false, cw, D, n, ds_tile, cw, q_p, q.row, 0.0f, kv_tile, D);  // (cw, D) dS^T Q
          add_rows(dk_p, dk.row, kv_tile, cw, D);
        } else {
          gemm(true, false, cw, D, n, p_tile, cw, do_p, dout.row, 1.0f, dv_p, dv.row);  // (cw, D) P^T dO
          gemm(true, false, cw, D, n, ds_tile, cw, q_p, q.row, 1.0f, dk_p, dk.row);    // (cw, D) dS^T Q
        }
        gemm(false, false, n, D, cw, ds_tile, cw, k_p, k.row, 1.0f, dq_p, dq.row);  // (n, D) dS K
      }
    }
  }
}

at::Tensor widened(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

std::tuple<at::Tensor, at::Tensor> attention_forward_cpu(const at::Tensor& q, const at::Tensor& k,
                                                         const at::Tensor& v, const std::optional<at::Tensor>& cu_q,
                                                         const std::optional<at::Tensor>& cu_k, double scale,
                                                         int64_t left, int64_t right, double dropout_p,
                                                         const std::optional<at::Tensor>& dropout_seed, double softcap,
                                                         const std::optional<at::Tensor>& alibi_slopes) {
  check_inputs(q, k, v, cu_q, cu_k);
  Problem P = attention_problem(q, k, cu_q, cu_k, scale, left, right);
  set_modifiers(P, softcap, alibi_slopes, static_cast<int64_t>(P.seqs.size()));
  at::Tensor out = at::empty(q.sizes(), q.options());
  const auto lse_shape = cu_q.has_value() ? std::vector<int64_t>{P.H, q.size(0)}
                                          : std::vector<int64_t>{q.size(0), P.H, q.size(1)};
  at::Tensor lse = at::empty(lse_shape, q.options().dtype(at::kFloat));
  attention_forward(P, q, k, v, out, lse, dropout_of(dropout_p, dropout_seed));
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& dlse, const std::optional<at::Tensor>& cu_q,
    const std::optional<at::Tensor>& cu_k, double scale, int64_t left, int64_t right, double dropout_p,
    const std::optional<at::Tensor>& dropout_seed, double softcap, const std::optional<at::Tensor>& alibi_slopes) {
  check_inputs(q, k, v, cu_q, cu_k);
  const Dropout dropout = dropout_of(dropout_p, dropout_seed);
  TORCH_CHECK(dout.sizes() == q.sizes() && out.sizes() == q.sizes(), "dout and out must have q's shape");
  Problem P = attention_problem(q, k, cu_q, cu_k, scale, left, right);
  set_modifiers(P, softcap, alibi_slopes, static_cast<int64_t>(P.seqs.size()));
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
    std::vector<float> p_tile(kRows * tile_keys(P)), ds_tile(kRows * tile_keys(P)), delta(kRows),
        dcap(tile_keys(P));
    std::vector<float> kv_tile(std::min(kRows, tile_keys(P)) * P.D);
    std::vector<uint8_t> keep(tile_keys(P));
    for (int64_t t = begin; t < end; ++t) {
      backward_heads(P, P.seqs[t / P.Hkv], t % P.Hkv, dor, qr, kr, vr, outr, lp, dlp, dqr, dkr, dvr, p_tile.data(),
                     ds_tile.data(), delta.data(), dropout, t / P.Hkv, keep.data(), dcap.data(), kv_tile.data());
    }
  });
  return {dq.to(q.scalar_type()), dk.to(k.scalar_type()), dv.to(v.scalar_type())};
}

}  // namespace

void softmax_update(float* row, int64_t cw, int64_t a, int64_t b, float scale, float& m, float& l, float* acc,
                    int64_t D) {
  std::fill(row, row + a, 0.0f);
  std::fill(row + b, row + cw, 0.0f);
  if (a == b) return;
  const float row_max = scale_and_max(row + a, b - a, scale);
  const float m_new = std::isnan(row_max) || std::isnan(m) ? row_max + m : std::max(m, row_max);  // NaN stays
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

void modify_scores(const Problem& P, const Sequence& s, int64_t h, int64_t i, int64_t j0, float* row, int64_t n,
                   float* dcap) {
  if (P.softcap > 0.0f) {
    cap_scores(row, n, P.scale / P.softcap, P.softcap, dcap);
  } else {
    for (int64_t j = 0; j < n; ++j) row[j] *= P.scale;
  }
  if (P.alibi != nullptr) alibi_scores(row, n, P.alibi[s.id * P.alibi_batch + h], i + s.Tk - s.Tq - j0);
}

void set_modifiers(Problem& P, double softcap, const std::optional<at::Tensor>& alibi_slopes, int64_t batch) {
  TORCH_CHECK(softcap >= 0.0, "softcap must be >= 0, got ", softcap);
  P.softcap = static_cast<float>(softcap);
  if (!alibi_slopes.has_value()) return;
  const at::Tensor& a = *alibi_slopes;
  TORCH_CHECK(a.device().is_cpu() && a.scalar_type() == at::kFloat && a.is_contiguous(),
              "alibi_slopes must be a contiguous float32 CPU tensor");
  TORCH_CHECK((a.dim() == 1 && a.size(0) == P.H) || (a.dim() == 2 && a.size(0) == batch && a.size(1) == P.H),
              "alibi_slopes must be (H,) or (B, H)");
  P.alibi = a.data_ptr<float>();
  P.alibi_batch = a.dim() == 2 ? P.H : 0;
}

void check_dense_last(std::initializer_list<std::pair<const char*, const at::Tensor*>> named) {
  for (const auto& [name, t] : named) {
    TORCH_CHECK(t->device().is_cpu(), name, " must be a CPU tensor");
    // a last axis of size 1 may carry any stride (torch's contiguous() leaves it): one element is dense
    TORCH_CHECK(t->stride(-1) == 1 || t->size(-1) == 1, name, " must be contiguous in its last dimension");
  }
}

void attention_forward(const Problem& P, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       at::Tensor& out, at::Tensor& lse, const Dropout& dropout) {
  dispatch_dtype(q.scalar_type(), "attention", [&](auto* type) {
    forward<std::remove_pointer_t<decltype(type)>>(P, q, k, v, out, lse, dropout);
  });
}

TORCH_LIBRARY_IMPL(fasttrain, CPU, m) {
  m.impl("attention_forward_cpu", &attention_forward_cpu);
  m.impl("attention_backward_cpu", &attention_backward_cpu);
}

}  // namespace fasttrain
