// KV-cache decoding (flash_attn_with_kvcache's common eager call) launched from C++: kernels/decode.py's append,
// split-KV decode and combine, compiled ahead of time and shipped as cubins (aot_launch.h), so a decode step costs no
// Python launcher. The op does what kernels/decode.py `decode` does on a GPU for the calls its shipped set covers
// (kernels/decode.py _shipped): fp16/bf16, head_dim 64, 128 or 256, no rotary, no cache_batch_idx, no block table,
// no softcap or ALiBi; cache_leftpad optional; k/v appended or not; any Tq, GQA group, window and split count up to
// kMaxSplits. The same grids, arguments, split heuristic and outputs; the decode tile is chosen among the shipped
// ones by timing them at a shape class's first call (aot::tune, the JIT autotuner's key), as the JIT's autotuner
// chooses among its configs. The JIT's placeholders are kept: cache_seqlens stands for the absent
// cache_batch_idx, cache_leftpad and block table (the last as a (B, 1) view, stride 1), k_cache for the rotary tables.
// The cubins assume what the JIT finds on the usual tensors: 16-byte aligned pointers, strides that are multiples of
// 16 elements. Inputs that are not (q, k, v, the lengths) are copied; a cache that is not is refused (it is updated
// in place; fasttrain/ops/decode.py's aot column sends it to the JIT). int64 lengths are narrowed to int32, which
// is what the cubins read.
// Op (schema in ops.cpp): fasttrain::decode_aot; CUDA, and CPU while the launches are recorded (aot_launch.h); Meta
// for tracing.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/ScalarType.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <optional>
#include <vector>

#include "aot_launch.h"

namespace fasttrain {
namespace {

using at::Tensor;
using std::optional;

constexpr const char* kName = "decode_aot";
constexpr int64_t kMinKeysPerSplit = 128;  // kernels/decode.py MIN_KEYS_PER_SPLIT
constexpr int64_t kMaxSplits = 128;        // kernels/decode.py MAX_SPLITS: the widest combine shipped

int64_t next_power_of_2(int64_t n) {
  int64_t p = 1;
  while (p < n) p *= 2;
  return p;
}

// kernels/decode.py num_splits_heuristic: about two programs per SM, at least kMinKeysPerSplit keys per split.
int64_t num_splits_heuristic(int64_t batch_kv_heads, int64_t m_blocks, int64_t cache_len, int64_t num_sms) {
  const int64_t programs = batch_kv_heads * m_blocks;
  if (programs >= num_sms) return 1;
  const int64_t wanted = (2 * num_sms + programs - 1) / programs;
  const int64_t by_length = std::max<int64_t>(1, cache_len / kMinKeysPerSplit);
  return std::max<int64_t>(1, std::min({wanted, by_length, kMaxSplits}));
}

// The decode tiles, by BLOCK_N, that a head-dim class may ship (kernels/decode.py shipped_tiles), its first config's
// first: the same on sm_80 and sm_90 (tests/test_decode_aot.py holds the two to each other). The candidates of a
// call are those of the registry's arch that were shipped.
std::array<int64_t, 4> block_ns(int64_t head_dim) {
  if (head_dim <= 128) return {64, 16, 32, 128};
  return {32, 16, 64, 128};
}

bool aligned_16(const Tensor& t, int dims) {
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16) return false;
  for (int i = 0; i < dims; ++i) {
    if (t.stride(i) % 16) return false;
  }
  return true;
}

// An input whose address or leading strides the cubins do not take, copied into a fresh contiguous tensor (as the
// JIT would compile another kernel for it rather than launch this one).
Tensor as_compiled(const Tensor& t) { return aligned_16(t, 3) ? t : t.clone(at::MemoryFormat::Contiguous); }

// Lengths as the cubins read them: int32 at unit stride from an aligned address.
Tensor lengths(const Tensor& t) {
  Tensor out = t.scalar_type() == at::kInt ? t.contiguous() : t.to(at::kInt).contiguous();
  return reinterpret_cast<uintptr_t>(out.data_ptr()) % 16 ? out.clone() : out;
}

c10::DeviceIndex launch_device(const Tensor& q) {
  TORCH_CHECK(q.is_cuda() || (q.is_cpu() && aot::recording()), kName,
              ": takes CUDA tensors (CPU tensors only while launches are recorded), got ", q.device());
  return q.is_cuda() ? q.device().index() : -1;
}

void check(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache, const optional<Tensor>& k,
           const optional<Tensor>& v, const Tensor& cache_seqlens, const optional<Tensor>& cache_leftpad,
           int64_t num_splits) {
  TORCH_CHECK(q.dim() == 4, kName, ": q must be (B, Tq, H, D)");
  const int64_t B = q.size(0), H = q.size(2), D = q.size(3);
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16, kName,
              ": the shipped cubins take fp16 or bf16, got ", q.scalar_type());
  TORCH_CHECK(D == 64 || D == 128 || D == 256, kName, ": the shipped cubins take head_dim 64, 128 or 256, got ", D);
  for (const Tensor* c : {&k_cache, &v_cache}) {
    TORCH_CHECK(c->dim() == 4 && c->size(0) == B && c->size(3) == D && c->sizes() == k_cache.sizes() &&
                    c->scalar_type() == q.scalar_type() && c->device() == q.device() && c->stride(3) == 1,
                kName, ": k_cache and v_cache must be (B, Tmax, Hkv, D) in q's dtype on q's device, unit stride in D");
    TORCH_CHECK(aligned_16(*c, 3), kName,
                ": the caches must be 16-byte aligned with strides that are multiples of 16 (the JIT serves others)");
  }
  const int64_t Hkv = k_cache.size(2);
  TORCH_CHECK(Hkv > 0 && H % Hkv == 0, kName, ": q's heads must be a multiple of the caches'");
  TORCH_CHECK(k.has_value() == v.has_value(), kName, ": k and v must be given together");
  if (k) {
    for (const Tensor* t : {&*k, &*v}) {
      TORCH_CHECK(t->dim() == 4 && t->size(0) == B && t->size(1) == k->size(1) && t->size(2) == Hkv &&
                      t->size(3) == D && t->scalar_type() == q.scalar_type() && t->device() == q.device(),
                  kName, ": k and v must be (B, Tnew, Hkv, D) in q's dtype on q's device");
    }
  }
  for (const Tensor* t : {&cache_seqlens, cache_leftpad ? &*cache_leftpad : &cache_seqlens}) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == B && (t->scalar_type() == at::kInt || t->scalar_type() == at::kLong) &&
                    t->device() == q.device(),
                kName, ": cache_seqlens and cache_leftpad must be (B,) int32/int64 on q's device");
  }
  TORCH_CHECK(num_splits >= 0 && num_splits <= kMaxSplits, kName, ": num_splits must lie in [0, ", kMaxSplits,
              "], got ", num_splits);
}

std::tuple<Tensor, Tensor> decode_aot(const Tensor& q_in, const Tensor& k_cache, const Tensor& v_cache,
                                      const optional<Tensor>& k_in, const optional<Tensor>& v_in,
                                      const Tensor& cache_seqlens, const optional<Tensor>& cache_leftpad,
                                      double softmax_scale, int64_t window_left, int64_t window_right,
                                      int64_t num_splits) {
  check(q_in, k_cache, v_cache, k_in, v_in, cache_seqlens, cache_leftpad, num_splits);
  const c10::DeviceIndex device = launch_device(q_in);
  const Tensor q = as_compiled(q_in);
  const int64_t B = q.size(0), Tq = q.size(1), H = q.size(2), D = q.size(3);
  const int64_t Tmax = k_cache.size(1), Hkv = k_cache.size(2), G = H / Hkv;
  const at::ScalarType dtype = q.scalar_type();
  const Tensor seqlens = lengths(cache_seqlens);
  const optional<Tensor> leftpad = cache_leftpad ? optional<Tensor>(lengths(*cache_leftpad)) : std::nullopt;
  const Tensor& table = seqlens;  // the placeholder (B, 1) block table: its row stride is 1
  const int64_t t_new = k_in ? k_in->size(1) : 0;
  if (k_in) {
    const Tensor k = as_compiled(*k_in), v = as_compiled(*v_in);
    const int64_t t_rows = std::max(Tq, t_new);
    const aot::Entry& e = aot::find(aot::Kernel::DecodeAppend,
                                    {dtype, dtype, dtype, dtype, dtype, dtype, dtype, dtype, at::kInt, at::kInt,
                                     at::kInt},
                                    {D, 0, false, false, false, false, 0, D, 1});
    aot::launch(
        e, {static_cast<uint32_t>(B * t_rows), static_cast<uint32_t>(std::max(H, Hkv)), 1}, device,
        {aot::ptr(q),          aot::ptr(k),          aot::ptr(v),          aot::ptr(k_cache),
         aot::ptr(v_cache),    aot::ptr(q),          aot::ptr(k_cache),    aot::ptr(k_cache),
         aot::ptr(seqlens),    aot::ptr(seqlens),    aot::ptr(table),      aot::integer(q.stride(0)),
         aot::integer(q.stride(1)),       aot::integer(q.stride(2)),       aot::integer(k.stride(0)),
         aot::integer(k.stride(1)),       aot::integer(k.stride(2)),       aot::integer(v.stride(0)),
         aot::integer(v.stride(1)),       aot::integer(v.stride(2)),       aot::integer(k_cache.stride(0)),
         aot::integer(k_cache.stride(1)), aot::integer(k_cache.stride(2)), aot::integer(v_cache.stride(0)),
         aot::integer(v_cache.stride(1)), aot::integer(v_cache.stride(2)), aot::integer(1),
         aot::integer(q.stride(0)),       aot::integer(q.stride(1)),       aot::integer(q.stride(2)),
         aot::integer(0),       aot::integer(Tq),     aot::integer(t_new),  aot::integer(t_rows),
         aot::integer(H),       aot::integer(Hkv),    aot::integer(Tmax),   aot::integer(0)});
  }

  const int64_t rows = Tq * G;
  const int64_t block_m = std::min<int64_t>(64, std::max<int64_t>(16, next_power_of_2(rows)));
  const int64_t m_blocks = (rows + block_m - 1) / block_m;
  const int64_t splits =
      num_splits ? num_splits : num_splits_heuristic(B * Hkv, m_blocks, Tmax, aot::multiprocessors(device));
  const auto opts = q.options();
  Tensor out = at::empty({B, Tq, H, D}, opts);
  Tensor lse = at::empty({B, H, Tq}, opts.dtype(at::kFloat));
  Tensor o_dst = out, l_dst = lse;
  int64_t ls[4] = {0, lse.stride(0), lse.stride(2), lse.stride(1)};  // (split, b, t, h)
  int64_t os_stride = 0;
  if (splits > 1) {
    o_dst = at::empty({splits, B, Tq, H, D}, opts.dtype(at::kFloat));
    l_dst = at::empty({splits, B, Tq, H}, opts.dtype(at::kFloat));
    for (int i = 0; i < 4; ++i) ls[i] = l_dst.stride(i);
    os_stride = o_dst.stride(0);
  }
  const int64_t o_dim = o_dst.dim();
  const at::ScalarType o_type = splits > 1 ? at::kFloat : dtype;
  const std::array<int64_t, 4> tiles = block_ns(D);
  auto tile = [&](int64_t block_n, bool required) {
    const std::initializer_list<at::ScalarType> pointers = {dtype,    dtype,    dtype,  at::kInt,   at::kInt,
                                                            at::kInt, at::kInt, o_type, at::kFloat, at::kFloat};
    const std::initializer_list<int64_t> constexprs = {D, splits > 1, false, leftpad.has_value(), 0, block_m,
                                                       block_n, D, false, false};
    return required ? &aot::find(aot::Kernel::Decode, pointers, constexprs)
                    : aot::lookup(aot::Kernel::Decode, pointers, constexprs);
  };
  std::vector<const aot::Entry*> candidates;
  for (int64_t block_n : tiles) {
    if (const aot::Entry* e = tile(block_n, false)) candidates.push_back(e);
  }
  if (candidates.empty()) candidates.push_back(tile(tiles[0], true));  // none shipped: the registry's error
  // B * Hkv on the grid's first axis: CUDA caps the other two at 65535.
  auto launch_decode = [&](const aot::Entry& e) {
    aot::launch(
        e, {static_cast<uint32_t>(B * Hkv), static_cast<uint32_t>(splits), static_cast<uint32_t>(m_blocks)}, device,
        {aot::ptr(q),
         aot::ptr(k_cache),
         aot::ptr(v_cache),
         aot::ptr(seqlens),
         aot::ptr(seqlens),
         aot::ptr(leftpad ? *leftpad : seqlens),
         aot::ptr(table),
         aot::ptr(o_dst),
         aot::ptr(l_dst),
         aot::integer(q.stride(0)),
         aot::integer(q.stride(1)),
         aot::integer(q.stride(2)),
         aot::integer(k_cache.stride(0)),
         aot::integer(k_cache.stride(1)),
         aot::integer(k_cache.stride(2)),
         aot::integer(v_cache.stride(0)),
         aot::integer(v_cache.stride(1)),
         aot::integer(v_cache.stride(2)),
         aot::integer(1),
         aot::integer(o_dst.stride(o_dim - 4)),
         aot::integer(o_dst.stride(o_dim - 3)),
         aot::integer(o_dst.stride(o_dim - 2)),
         aot::integer(ls[0]),
         aot::integer(ls[1]),
         aot::integer(ls[2]),
         aot::integer(ls[3]),
         aot::integer(os_stride),
         aot::real(softmax_scale * 1.4426950408889634),  // log2(e), the double Python's math.log2(math.e) gives
         aot::integer(Tq),
         aot::integer(G),
         aot::integer(Hkv),
         aot::integer(t_new),
         aot::integer(window_left),
         aot::integer(window_right),
         aot::integer(Tmax),
         aot::integer(next_power_of_2(Tmax)),
         aot::integer(splits),
         aot::real(0.0),
         aot::ptr(at::Tensor()),
         aot::integer(0)});
  };
  // The tile, timed among the shipped ones at a shape class's first call: kernels/decode.py's autotuning key
  // (BLOCK_M, BLOCK_D, num_splits, t_cache_bucket) and the dtype. Every trial writes only out/lse or the partials.
  const int chosen =
      aot::tune(aot::Kernel::Decode, {static_cast<int64_t>(dtype), block_m, D, splits, next_power_of_2(Tmax)},
                static_cast<int>(candidates.size()), device, [&](int i) { launch_decode(*candidates[i]); });
  launch_decode(*candidates[chosen]);
  if (splits > 1) {
    const int64_t block_s = next_power_of_2(splits);
    const aot::Entry& c =
        aot::find(aot::Kernel::DecodeCombine, {at::kFloat, at::kFloat, dtype, at::kFloat}, {D, block_s, D});
    aot::launch(c, {static_cast<uint32_t>(B * Tq * H), 1, 1}, device,
                {aot::ptr(o_dst), aot::ptr(l_dst), aot::ptr(out), aot::ptr(lse), aot::integer(o_dst.stride(0)),
                 aot::integer(l_dst.stride(0)), aot::integer(out.stride(0)), aot::integer(out.stride(1)),
                 aot::integer(out.stride(2)), aot::integer(lse.stride(0)), aot::integer(lse.stride(1)),
                 aot::integer(lse.stride(2)), aot::integer(Tq), aot::integer(H), aot::integer(splits)});
  }
  return {out, lse};
}

// ---- Meta: shapes and dtypes only, for torch.compile's fake tensors ----

std::tuple<Tensor, Tensor> decode_aot_meta(const Tensor& q, const Tensor&, const Tensor&, const optional<Tensor>&,
                                           const optional<Tensor>&, const Tensor&, const optional<Tensor>&, double,
                                           int64_t, int64_t, int64_t) {
  return {at::empty(q.sizes(), q.options()),
          at::empty({q.size(0), q.size(2), q.size(1)}, q.options().dtype(at::kFloat))};
}

}  // namespace

TORCH_LIBRARY_IMPL(fasttrain, CUDA, m) { m.impl("decode_aot", &decode_aot); }

TORCH_LIBRARY_IMPL(fasttrain, CPU, m) { m.impl("decode_aot", &decode_aot); }

TORCH_LIBRARY_IMPL(fasttrain, Meta, m) { m.impl("decode_aot", &decode_aot_meta); }

}  // namespace fasttrain
