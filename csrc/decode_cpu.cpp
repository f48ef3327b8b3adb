// Decoding against a KV cache on the CPU (op fasttrain::attention_kvcache_cpu, schema in ops.cpp, CPU dispatch key):
// Tq * group <= kDecodeRows query rows per K/V head, so a key row costs a few dot products and reading the cache
// bounds the time. A task takes a range of one sequence's keys for every head and walks it in blocks of block_keys
// rows. The scores of a block are taken in memory order, each key row holding every K/V head: read one head at a
// time, the (B, Tmax, Hkv, D) cache strides Hkv * D elements between rows, which the prefetchers do not follow (about
// a quarter of the in-order bandwidth: benchmarks/NOTES.md, Decode on the CPU). The values are then taken a head at a
// time, each head's accumulators held in registers over the block (cpu_simd.h); the scores pass has brought them into
// L2 (fp32: a prefetch per line) or widened them there (bf16, fp16). The ranges of a sequence (splits, enough for
// every thread) are combined through their max, sum and unnormalized out. More query rows per K/V head take the
// attention forward (attention_cpu.cpp), whose matmuls then pay off. fasttrain/ops/attention_reference.py is the
// oracle.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "attention_cpu.h"
#include "cpu_math.h"
#include "cpu_simd.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

namespace fasttrain {
namespace {

constexpr int64_t kDecodeRows = 8;                 // query rows per K/V head, at most: score_key's register blocks
constexpr int64_t kDecodeKeys = 64;        // most keys per block: scores H * Tq x 64 floats, L1-resident
constexpr int64_t kDecodeValues = 32768;   // floats of values per block (128 KiB), inside a 512 KiB L2
constexpr int64_t kMinKeysPerSplit = 256;  // fewer would spend more on the combine than on the keys

// y[0, n) += a * x
FT_CPU_CLONES void axpy(float a, const float* __restrict x, float* __restrict y, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) y[j] += a * x[j];
}

// One key row against every K/V head's n query rows (n <= kDecodeRows): s[(h * n + r) * ld] = q_{h, r} . key_h
// with q_{h, r} = q + (h * n + r) * D and key_h = key + h * hk. A call per key row, not per dot, so that the clones'
// dispatch (an indirect call) is paid once per key row (benchmarks/NOTES.md, Decode on the CPU).
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

// Keys [k0, k1) of sequence s (counted from its first key row, s.k_row) for every query row, ordered (K/V head, row of its block as in forward_block): the
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
      const int64_t j = s.k_row + c0 + i;  // keys are counted from the sequence's first row (after any left padding)
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
      const int64_t b = std::clamp<int64_t>(P.key_hi(s, t) - c0, a, cw);
      float scale = P.scale;
      if (P.modified()) {  // the visible scores made final here: softmax_update scales by 1
        modify_scores(P, s, (R / n) * G + R % G, t, c0 + a, scores + R * cw + a, b - a, nullptr);
        scale = 1.0f;
      }
      softmax_update(scores + R * cw, cw, a, b, scale, m[R], l[R], acc + R * D, D);
    }
    if constexpr (in_place) {
      accumulate_block(scores, cw, n, P.Hkv, v.at(s.k_batch, s.k_row + c0, 0), v.row, v.head, D, acc);
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
        for (int64_t i = first[si]; i < first[si + 1]; ++i) {
          const float mi = m[i * rows + R];
          m_all = std::isnan(mi) || std::isnan(m_all) ? mi + m_all : std::max(m_all, mi);  // a NaN split: NaN
        }
        std::fill(o.begin(), o.end(), 0.0f);
        if (m_all != -kInf) {
          for (int64_t i = first[si]; i < first[si + 1]; ++i) {
            const float w = std::exp(m[i * rows + R] - m_all);  // 0 for a split whose keys this row does not see
            l_all += l[i * rows + R] * w;
            axpy(w, acc.data() + (i * rows + R) * D, o.data(), D);
          }
        }
        const int64_t t = (R % n) / G, h = (R / n) * G + R % G;
        const bool seen = l_all > 0.0f || std::isnan(l_all);  // no key: 0 and lse +inf; NaN stays, as forward_block
        const float inv = seen ? 1.0f / l_all : 0.0f;
        T* dst = outr.at(s.q_batch, s.q_row + t, h);
        for (int64_t d = 0; d < D; ++d) o[d] *= inv;
        narrow(o.data(), dst, D);
        lp[s.lse + h * P.lse_head + t] = seen ? m_all + std::log(l_all) : kInf;
      }
    }
  });
}

// Decoding against a KV cache (fasttrain/ops/decode.py appends the new rows first): query token t of sequence b
// sits at key position cache_lengths[b] - Tq + t and sees keys [cache_leftpad[b] (or 0), cache_lengths[b]) of cache
// row cache_batch_idx[b] (or b) within the window, and no key past the cache's end. A left-padded sequence is the
// problem's sequence that starts at its first real row: positions relative to it are those relative to row 0.
std::tuple<at::Tensor, at::Tensor> attention_kvcache_cpu(const at::Tensor& q, const at::Tensor& k_cache,
                                                         const at::Tensor& v_cache, const at::Tensor& cache_lengths,
                                                         const std::optional<at::Tensor>& cache_batch_idx,
                                                         const std::optional<at::Tensor>& cache_leftpad,
                                                         double scale, int64_t left, int64_t right,
                                                         double softcap,
                                                         const std::optional<at::Tensor>& alibi_slopes) {
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
  at::Tensor pads;
  if (cache_leftpad.has_value()) {
    pads = cache_leftpad->to(at::kLong).contiguous();
    TORCH_CHECK(pads.numel() == B, "cache_leftpad must hold one offset per sequence (", B, "), got ", pads.numel());
  }
  Problem P = make_problem(q, k_cache, scale, left, right);
  P.lse_head = Tq;
  set_modifiers(P, softcap, alibi_slopes, B);
  const int64_t* len = lengths.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    const int64_t row = rows.defined() ? rows.data_ptr<int64_t>()[b] : b;
    TORCH_CHECK(0 <= row && row < Bc, "cache_batch_idx must lie in [0, ", Bc, "), got ", row);
    const int64_t pad = pads.defined() ? pads.data_ptr<int64_t>()[b] : 0;
    TORCH_CHECK(0 <= pad && pad <= len[b], "cache_leftpad must lie in [0, cache_lengths], got ", pad, " of ", len[b]);
    const int64_t end = std::clamp<int64_t>(len[b], pad, std::max(pad, Tmax));
    P.seqs.push_back({b, 0, row, pad, Tq, len[b] - pad, end - pad, b * P.H * Tq, b});
  }
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({B, P.H, Tq}, q.options().dtype(at::kFloat));
  if (Tq * P.group() <= kDecodeRows) {
    dispatch_dtype(q.scalar_type(), "attention", [&](auto* type) {
      decode<std::remove_pointer_t<decltype(type)>>(P, q, k_cache, v_cache, out, lse);
    });
  } else {
    attention_forward(P, q, k_cache, v_cache, out, lse);  // rows enough for the matmuls of the prefill path
  }
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(fasttrain, CPU, m) { m.impl("attention_kvcache_cpu", &attention_kvcache_cpu); }

}  // namespace fasttrain
