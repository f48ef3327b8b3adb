// Attention on the CPU in flash-attn's layout and masking; fasttrain/ops/attention_reference.py is the oracle.
// Forward: one task per (sequence, head, block of kRows query rows), an online softmax over tiles of kKeys keys, so
// that scores exist only in a per-thread (kRows x kKeys) tile. Backward: one task per (sequence, K/V head), which owns
// that head's dK and dV and the dQ of its GQA group, so no two threads write the same row; P is recomputed from the
// saved lse, five matmuls per tile (S, dP, dV, dK, dQ). The matmuls go to torch's BLAS (MKL in the x86 wheels)
// through at::mm on views, single-threaded inside the parallel region; the softmax loops are ours, vectorized by GCC
// in AVX-512 / AVX2 clones. fp16/bf16 inputs are computed in fp32 and rounded once at the end, as the GPU kernels do.
// Ops (schemas in ops.cpp): fasttrain::attention_forward_cpu and fasttrain::attention_backward_cpu, CPU dispatch key.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

namespace fasttrain {
namespace {

constexpr int64_t kRows = 64;   // query rows per task: the causal diagonal wastes at most half a (kRows)^2 tile
constexpr int64_t kKeys = 512;  // keys per score tile: 128 KiB of scores per thread, inside L2
constexpr float kInf = std::numeric_limits<float>::infinity();

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FT_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FT_CPU_CLONES
#endif

// exp(x) by Cephes' expf polynomial on a range-reduced argument (about 2 ulp), written so that GCC vectorizes it:
// libm's expf does not vectorize without -ffast-math, which would also drop the -inf handling the masks need.
// Arguments below -87 (exp < 2e-38, masked scores at -inf among them) give exactly 0.
inline float exp_approx(float x) {
  // Selects, not std::min/max (which return references and leave branches that stop the vectorizer).
  float c = x < -87.0f ? -87.0f : x;
  c = c > 88.0f ? 88.0f : c;
  const float n = std::floor(c * 1.44269504088896341f + 0.5f);
  const float r = c - n * 0.693359375f + n * 2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n; n in [-126, 127] after the clamp
  float pow2n;
  std::memcpy(&pow2n, &bits, sizeof pow2n);  // C++17's bit cast, which GCC vectorizes as one
  return x < -87.0f ? 0.0f : y * pow2n;
}

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

FT_CPU_CLONES float dot(const float* __restrict a, const float* __restrict b, int64_t n) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) sum += a[j] * b[j];
  return sum;
}

// A (rows, cols) view of row-major floats `ld` apart.
at::Tensor mat(const float* p, int64_t rows, int64_t cols, int64_t ld) {
  return at::from_blob(const_cast<float*>(p), {rows, cols}, {ld, 1}, at::TensorOptions().dtype(at::kFloat));
}

// One sequence of a dense (B, T, H, D) or packed (total, H, D) batch: the offsets, in rows, of its first query and
// first key, its lengths, and where its head 0 starts in lse ((B, H, Tq) dense, (H, total_q) packed).
struct Sequence {
  int64_t q_row, k_row, Tq, Tk, lse;
};

// What every task shares. Rows of q-like tensors (q, out, dout, dq) are H * D floats apart, of k-like ones
// (k, v, dk, dv) Hkv * D: every tensor here is contiguous.
struct Problem {
  std::vector<Sequence> seqs;
  int64_t H, Hkv, D, lse_head;  // lse_head: lse's stride between heads
  float scale;
  int64_t left, right;  // query i sees keys j with -left <= j - i - (Tk - Tq) <= right

  int64_t q_ld() const { return H * D; }
  int64_t k_ld() const { return Hkv * D; }
  // Keys [lo, hi) seen by query row i of sequence s, clamped to [0, Tk).
  int64_t key_lo(const Sequence& s, int64_t i) const { return std::max<int64_t>(0, i + s.Tk - s.Tq - left); }
  int64_t key_hi(const Sequence& s, int64_t i) const {
    return std::min<int64_t>(s.Tk, std::max<int64_t>(0, i + s.Tk - s.Tq + right + 1));
  }
};

Problem make_problem(const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& cu_q,
                     const std::optional<at::Tensor>& cu_k, double scale, int64_t left, int64_t right) {
  Problem p;
  p.H = q.size(-2);
  p.Hkv = k.size(-2);
  p.D = q.size(-1);
  p.scale = static_cast<float>(scale);
  p.left = left;
  p.right = right;
  if (cu_q.has_value()) {
    const auto cq = cu_q->to(at::kLong).contiguous(), ck = cu_k->to(at::kLong).contiguous();
    const int64_t* a = cq.data_ptr<int64_t>();
    const int64_t* b = ck.data_ptr<int64_t>();
    TORCH_CHECK(cq.numel() == ck.numel() && cq.numel() >= 2, "cu_seqlens_q and cu_seqlens_k must hold B + 1 offsets");
    TORCH_CHECK(a[0] == 0 && b[0] == 0 && a[cq.numel() - 1] == q.size(0) && b[ck.numel() - 1] == k.size(0),
                "cu_seqlens must rise from 0 to the packed lengths");
    for (int64_t s = 0; s + 1 < cq.numel(); ++s) {
      TORCH_CHECK(a[s] <= a[s + 1] && b[s] <= b[s + 1], "cu_seqlens must not decrease");
      p.seqs.push_back({a[s], b[s], a[s + 1] - a[s], b[s + 1] - b[s], a[s]});
    }
    p.lse_head = q.size(0);
  } else {
    const int64_t B = q.size(0), Tq = q.size(1), Tk = k.size(1);
    for (int64_t b = 0; b < B; ++b) p.seqs.push_back({b * Tq, b * Tk, Tq, Tk, b * p.H * Tq});
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
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), "q, k and v must be CPU tensors");
}

// Rows [i0, i0 + n) of head h of sequence s: out and lse.
void forward_block(const Problem& P, const Sequence& s, int64_t h, int64_t i0, const float* q, const float* k,
                   const float* v, float* out, float* lse, float* tile, float* acc, float* m, float* l) {
  const int64_t D = P.D, n = std::min(kRows, s.Tq - i0), kvh = h / (P.H / P.Hkv);
  const int64_t lo = P.key_lo(s, i0), hi = P.key_hi(s, i0 + n - 1);
  const float* qb = q + (s.q_row + i0) * P.q_ld() + h * D;
  std::fill(acc, acc + n * D, 0.0f);
  std::fill(m, m + n, -kInf);
  std::fill(l, l + n, 0.0f);
  at::Tensor acc_t = mat(acc, n, D, D);
  for (int64_t c0 = lo; c0 < hi; c0 += kKeys) {
    const int64_t cw = std::min(kKeys, hi - c0);
    const float* kb = k + (s.k_row + c0) * P.k_ld() + kvh * D;
    const float* vb = v + (s.k_row + c0) * P.k_ld() + kvh * D;
    at::Tensor tile_t = mat(tile, n, cw, cw);
    at::mm_out(tile_t, mat(qb, n, D, P.q_ld()), mat(kb, cw, D, P.k_ld()).t());  // (n, cw) scores
    for (int64_t r = 0; r < n; ++r) {
      float* row = tile + r * cw;
      const int64_t a = std::clamp<int64_t>(P.key_lo(s, i0 + r) - c0, 0, cw);
      const int64_t b = std::clamp<int64_t>(P.key_hi(s, i0 + r) - c0, a, cw);
      std::fill(row, row + a, 0.0f);
      std::fill(row + b, row + cw, 0.0f);
      if (a == b) continue;
      const float m_new = std::max(m[r], scale_and_max(row + a, b - a, P.scale));
      if (m_new == -kInf) {  // every visible score -inf: nothing to add yet
        std::fill(row + a, row + b, 0.0f);
        continue;
      }
      const float alpha = std::exp(m[r] - m_new);  // 0 on the row's first keys (m = -inf)
      l[r] = l[r] * alpha + exp_shifted(row + a, b - a, m_new);
      m[r] = m_new;
      if (alpha != 1.0f) {
        for (int64_t d = 0; d < D; ++d) acc[r * D + d] *= alpha;
      }
    }
    acc_t.addmm_(tile_t, mat(vb, cw, D, P.k_ld()));  // (n, cw) @ (cw, D)
  }
  for (int64_t r = 0; r < n; ++r) {
    float* o = out + (s.q_row + i0 + r) * P.q_ld() + h * D;
    const float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;  // a row that sees no key: 0, lse +inf (as the reference)
    for (int64_t d = 0; d < D; ++d) o[d] = acc[r * D + d] * inv;
    lse[s.lse + h * P.lse_head + i0 + r] = l[r] > 0.0f ? m[r] + std::log(l[r]) : kInf;
  }
}

// Every query head of K/V head kvh in sequence s: dq of those heads, dk and dv of kvh (zeroed by the caller).
void backward_heads(const Problem& P, const Sequence& s, int64_t kvh, const float* dout, const float* q,
                    const float* k, const float* v, const float* out, const float* lse, const float* dlse,
                    float* dq, float* dk, float* dv, float* p_tile, float* ds_tile, float* delta) {
  const int64_t D = P.D, group = P.H / P.Hkv;
  for (int64_t h = kvh * group; h < (kvh + 1) * group; ++h) {
    for (int64_t i0 = 0; i0 < s.Tq; i0 += kRows) {
      const int64_t n = std::min(kRows, s.Tq - i0);
      const int64_t lo = P.key_lo(s, i0), hi = P.key_hi(s, i0 + n - 1);
      if (lo >= hi) continue;
      const int64_t row0 = (s.q_row + i0) * P.q_ld() + h * D;
      const int64_t lse0 = s.lse + h * P.lse_head + i0;
      for (int64_t r = 0; r < n; ++r) {  // d lse / d s = p, so an lse gradient only shifts delta
        delta[r] = dot(dout + row0 + r * P.q_ld(), out + row0 + r * P.q_ld(), D) - (dlse ? dlse[lse0 + r] : 0.0f);
      }
      const at::Tensor q_b = mat(q + row0, n, D, P.q_ld()), do_b = mat(dout + row0, n, D, P.q_ld());
      at::Tensor dq_b = mat(dq + row0, n, D, P.q_ld());
      for (int64_t c0 = lo; c0 < hi; c0 += kKeys) {
        const int64_t cw = std::min(kKeys, hi - c0), krow0 = (s.k_row + c0) * P.k_ld() + kvh * D;
        const at::Tensor k_c = mat(k + krow0, cw, D, P.k_ld()), v_c = mat(v + krow0, cw, D, P.k_ld());
        at::Tensor p_t = mat(p_tile, n, cw, cw), ds_t = mat(ds_tile, n, cw, cw);
        at::mm_out(p_t, q_b, k_c.t());   // (n, cw) scores
        at::mm_out(ds_t, do_b, v_c.t());  // (n, cw) dP
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
        mat(dv + krow0, cw, D, P.k_ld()).addmm_(p_t.t(), do_b);  // (cw, n) @ (n, D)
        mat(dk + krow0, cw, D, P.k_ld()).addmm_(ds_t.t(), q_b);
        dq_b.addmm_(ds_t, k_c);  // (n, cw) @ (cw, D)
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
  const Problem P = make_problem(q, k, cu_q, cu_k, scale, left, right);
  const at::Tensor qf = widened(q), kf = widened(k), vf = widened(v);
  at::Tensor out = at::empty(q.sizes(), qf.options());
  const auto lse_shape = cu_q.has_value() ? std::vector<int64_t>{P.H, q.size(0)}
                                          : std::vector<int64_t>{q.size(0), P.H, q.size(1)};
  at::Tensor lse = at::empty(lse_shape, qf.options());
  struct Task {
    int64_t seq, h, i0;
  };
  std::vector<Task> tasks;
  for (int64_t si = 0; si < static_cast<int64_t>(P.seqs.size()); ++si) {
    for (int64_t h = 0; h < P.H; ++h) {
      for (int64_t i0 = 0; i0 < P.seqs[si].Tq; i0 += kRows) tasks.push_back({si, h, i0});
    }
  }
  const float *qp = qf.data_ptr<float>(), *kp = kf.data_ptr<float>(), *vp = vf.data_ptr<float>();
  float *op = out.data_ptr<float>(), *lp = lse.data_ptr<float>();
  at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> tile(kRows * kKeys), acc(kRows * P.D), m(kRows), l(kRows);
    for (int64_t t = begin; t < end; ++t) {
      const Task& task = tasks[t];
      forward_block(P, P.seqs[task.seq], task.h, task.i0, qp, kp, vp, op, lp, tile.data(), acc.data(), m.data(),
                    l.data());
    }
  });
  return {out.to(q.scalar_type()), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& dlse, const std::optional<at::Tensor>& cu_q,
    const std::optional<at::Tensor>& cu_k, double scale, int64_t left, int64_t right) {
  check_inputs(q, k, v, cu_q, cu_k);
  TORCH_CHECK(dout.sizes() == q.sizes() && out.sizes() == q.sizes(), "dout and out must have q's shape");
  const Problem P = make_problem(q, k, cu_q, cu_k, scale, left, right);
  const at::Tensor dof = widened(dout), qf = widened(q), kf = widened(k), vf = widened(v), of = widened(out);
  const at::Tensor lf = widened(lse);
  const std::optional<at::Tensor> dlf = dlse.has_value() ? std::optional<at::Tensor>(widened(*dlse)) : std::nullopt;
  TORCH_CHECK(lf.numel() == P.H * q.size(0) * (cu_q.has_value() ? 1 : q.size(1)), "lse has the wrong size");
  at::Tensor dq = at::zeros(q.sizes(), qf.options()), dk = at::zeros(k.sizes(), qf.options()),
             dv = at::zeros(k.sizes(), qf.options());
  const float *dop = dof.data_ptr<float>(), *qp = qf.data_ptr<float>(), *kp = kf.data_ptr<float>(),
              *vp = vf.data_ptr<float>(), *outp = of.data_ptr<float>(), *lp = lf.data_ptr<float>();
  const float* dlp = dlf.has_value() ? dlf->data_ptr<float>() : nullptr;
  float *dqp = dq.data_ptr<float>(), *dkp = dk.data_ptr<float>(), *dvp = dv.data_ptr<float>();
  const int64_t n_tasks = static_cast<int64_t>(P.seqs.size()) * P.Hkv;
  at::parallel_for(0, n_tasks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> p_tile(kRows * kKeys), ds_tile(kRows * kKeys), delta(kRows);
    for (int64_t t = begin; t < end; ++t) {
      backward_heads(P, P.seqs[t / P.Hkv], t % P.Hkv, dop, qp, kp, vp, outp, lp, dlp, dqp, dkp, dvp, p_tile.data(),
                     ds_tile.data(), delta.data());
    }
  });
  return {dq.to(q.scalar_type()), dk.to(k.scalar_type()), dv.to(v.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(fasttrain, CPU, m) {
  m.impl("attention_forward_cpu", &attention_forward_cpu);
  m.impl("attention_backward_cpu", &attention_backward_cpu);
}

}  // namespace fasttrain
