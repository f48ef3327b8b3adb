// The attention backward (flash_attn_func's and flash_attn_varlen_func's common eager calls) launched from C++:
// kernels/attention_backward.py's preprocess, dK/dV and dQ kernels, compiled ahead of time and shipped as cubins
// (aot_launch.h), so a backward costs no Python launcher. The ops do what kernels/attention_backward.py
// `attention_backward` does on a GPU for the calls its shipped set covers (kernels/attention_backward.py _shipped):
// fp16/bf16, dense (B, T, H, D) or packed (total, H, D) tensors with int32 offsets (VARLEN), head_dim 64, 96, 128 or
// 256, GQA groups 1, 2, 4 or 8, any window, with or without dropout (at head_dim 64 or 128; the forward's dropout_p and
// seed tensor, whose mask the kernels regenerate: TMA_ALIGNED off, no warp-specialized tile, and the dQ kernel's plan
// where no atomic-dQ tile takes dropout without spilling, so none ships), with or without lse's gradient (dlse: the
// preprocess's HAS_DLSE cubin subtracts it from delta), no softcap or ALiBi. The same grids, arguments and outputs:
// delta by the preprocess, then dQ by float32 atomics from the dK/dV kernel (zeroed, then cast to q's dtype) or by its
// own kernel after dK/dV; deterministic takes the second, otherwise the two plans are timed at a shape class's first
// call (aot::tune, the JIT's _backward_plans key), and each kernel's tile is chosen among the shipped ones by timing
// them (the JIT autotuners' keys), as the JIT's autotuners choose among their configs.
// The cubins assume what the JIT finds on the usual tensors: 16-byte aligned pointers, strides that are nonzero
// multiples of 16 elements (so TMA_ALIGNED at a power-of-2 head dim); inputs that are not are copied into contiguous
// ones.
// The _into ops write the gradients into given tensors (the packed functions' views of one packed gradient, as the
// JIT's `into`): the kernels take their pointers and strides where they meet the same layout, which views of a
// contiguous (..., 3 or 2, H, D) gradient do for every shipped head_dim (offsets of H * D elements, 16-byte aligned;
// strides multiples of 16); a target that does not gets the gradient in a fresh tensor, then copied in. They take
// dropout and dlse as the others do.
// Ops (schemas in ops.cpp): fasttrain::attention_backward_aot, attention_varlen_backward_aot and their _into_aot
// forms; CUDA, and CPU while the launches are recorded (aot_launch.h); Meta for tracing.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/core/ScalarType.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <functional>
#include <optional>
#include <tuple>
#include <vector>

#include "aot_launch.h"
#include "attention_aot_common.h"

namespace fasttrain {
namespace {

using at::Tensor;
using namespace attention_aot;

constexpr const char* kName = "attention_backward_aot";
constexpr int64_t kPreprocessBlockM = 32;  // kernels/attention_backward.py _PREPROCESS_BLOCK_M

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The tiles a head-dim class may ship (kernels/attention_backward.py shipped_tiles), in the order of the JIT's
// configs: sm_90's, then those only sm_80 has. The registry holds one arch's cubins, so a call's candidates are those
// of its arch that were shipped (tests/test_attention_backward_aot.py holds this order to both archs' tables). d96
// is the d128 class's; d256's one tile is both archs'.
std::vector<Tile> dkdv_tiles(int64_t head_dim, bool atomic_dq) {
  if (head_dim == 256) return {{32, 32, false}};
  if (head_dim == 64) {
    if (atomic_dq) return {{64, 128, false}, {64, 64, false}};
    return {{64, 128, false}, {64, 64, false}, {64, 128, true}};
  }
  if (atomic_dq) return {{64, 64, false}, {32, 128, false}, {32, 64, false}};
  return {{64, 64, false}, {32, 128, false}, {32, 128, true}, {32, 64, false}};
}

std::vector<Tile> dq_tiles(int64_t head_dim) {
  if (head_dim == 256) return {{32, 32, false}};
  if (head_dim == 64) return {{128, 64, false}, {64, 64, false}};
  return {{64, 64, false}, {128, 64, false}, {64, 32, false}};
}

// varlen: q, out, dout (total_q, H, D), k and v (total_k, Hkv, D), lse (H, total_q) and int32 offsets (B + 1) of
// each; else (B, T, H, D) and lse (B, H, Tq).
void check(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& lse,
           const Tensor* cu_q, const Tensor* cu_k, double dropout_p, const std::optional<Tensor>& seed,
           const std::optional<Tensor>& dlse) {
  const bool varlen = cu_q != nullptr;
  TORCH_CHECK(q.dim() == (varlen ? 3 : 4), kName,
              varlen ? ": packed q must be (total_q, H, D)" : ": q must be (B, Tq, H, D)");
  const int64_t H = q.size(-2), D = q.size(-1);
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16, kName,
              ": the shipped cubins take fp16 or bf16, got ", q.scalar_type());
  TORCH_CHECK(shipped_head_dim(D), kName, ": the shipped cubins take head_dim 64, 96, 128 or 256, got ", D);
  TORCH_CHECK(k.dim() == q.dim() && (varlen || k.size(0) == q.size(0)) && k.size(-1) == D && v.sizes() == k.sizes(),
              kName,
              varlen ? ": packed k and v must be (total_k, Hkv, D) with q's D"
                     : ": k and v must be (B, Tk, Hkv, D) with q's B and D");
  const int64_t Hkv = k.size(-2);
  TORCH_CHECK(Hkv > 0 && H % Hkv == 0, kName, ": q's heads must be a multiple of k's");
  const int64_t G = H / Hkv;
  TORCH_CHECK(G == 1 || G == 2 || G == 4 || G == 8, kName, ": the shipped cubins take GQA groups 1, 2, 4 or 8, got ",
              G);
  for (const Tensor* t : {&k, &v, &out, &dout}) {
    TORCH_CHECK(t->scalar_type() == q.scalar_type() && t->device() == q.device(), kName,
                ": k, v, out and dout must be in q's dtype on q's device");
  }
  TORCH_CHECK(out.sizes() == q.sizes() && dout.sizes() == q.sizes(), kName, ": out and dout must have q's shape");
  check_dropout(kName, q, dropout_p, seed);
  if (dlse.has_value()) {  // lse's gradient: lse's shape, float32 (kernels/attention_backward.py's preprocess)
    TORCH_CHECK(dlse->sizes() == lse.sizes() && dlse->scalar_type() == at::kFloat && dlse->device() == q.device(),
                kName, ": dlse must have lse's shape, float32 on q's device");
  }
  if (varlen) {
    check_offsets(q, *cu_q, *cu_k, kName);
    TORCH_CHECK(lse.dim() == 2 && lse.size(0) == H && lse.size(1) == q.size(0) && lse.scalar_type() == at::kFloat &&
                    lse.device() == q.device(),
                kName, ": packed lse must be (H, total_q) float32 on q's device");
    return;
  }
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == q.size(0) && lse.size(1) == H && lse.size(2) == q.size(1) &&
                  lse.scalar_type() == at::kFloat && lse.device() == q.device(),
              kName, ": lse must be (B, H, Tq) float32 on q's device");
}

// Whether a kernel can write t as it is: the compiled layout, with strides the cubins' int32 arguments can pass.
bool direct_target(const Tensor& t) {
  if (!compiled_layout(t)) return false;
  const auto s = t.strides();
  return std::all_of(s.begin(), s.end(), [](int64_t x) { return x < (int64_t{1} << 31); });
}

// The gradients' destinations (dq, dk, dv) of an _into op, shaped and typed like q, k and v.
void check_into(const std::array<Tensor, 3>& into, const Tensor& q, const Tensor& k, const Tensor& v) {
  const Tensor* like[3] = {&q, &k, &v};
  for (int i = 0; i < 3; ++i) {
    TORCH_CHECK(into[i].sizes() == like[i]->sizes() && into[i].scalar_type() == q.scalar_type() &&
                    into[i].device() == q.device(),
                kName, ": dq, dk and dv must have the shapes of q, k and v, in q's dtype on q's device");
  }
}

// The backward of dense (cu_q null) or packed calls; Tq and Tk are the longest sequences when packed. into: where
// the gradients go (then the returned tensors are those), or null for fresh contiguous ones.
std::tuple<Tensor, Tensor, Tensor> backward(const Tensor& dout_in, const Tensor& q_in, const Tensor& k_in,
                                            const Tensor& v_in, const Tensor& out_in, const Tensor& lse_in,
                                            const Tensor* cu_q_in, const Tensor* cu_k_in, int64_t max_q,
                                            int64_t max_k, double scale, int64_t left, int64_t right,
                                            bool deterministic, double dropout_p,
                                            const std::optional<Tensor>& seed_in,
                                            const std::optional<Tensor>& dlse_in,
                                            const std::array<Tensor, 3>* into = nullptr) {
  check(dout_in, q_in, k_in, v_in, out_in, lse_in, cu_q_in, cu_k_in, dropout_p, seed_in, dlse_in);
  if (into != nullptr) check_into(*into, q_in, k_in, v_in);
  const bool dropout = dropout_p > 0.0;
  const Tensor seed = dropout ? compiled_buffer(*seed_in) : Tensor();
  const c10::DeviceIndex device = launch_device(q_in, kName);
  const bool varlen = cu_q_in != nullptr;
  auto bth = [varlen](const Tensor& t) {
    const std::array<int64_t, 3> s = bth_strides(t, varlen);
    return std::vector<aot::Value>{aot::integer(s[0]), aot::integer(s[1]), aot::integer(s[2])};
  };
  Tensor q = as_compiled(q_in), dout = as_compiled(dout_in);
  const Tensor k = as_compiled(k_in), v = as_compiled(v_in), out = as_compiled(out_in);
  const Tensor cu_q = varlen ? compiled_buffer(*cu_q_in) : Tensor();
  const Tensor cu_k = varlen ? compiled_buffer(*cu_k_in) : Tensor();
  const int64_t B = varlen ? cu_q.numel() - 1 : q.size(0), H = q.size(-2), D = q.size(-1), D_pad = next_power_of_2(D);
  const int64_t Tq = varlen ? max_q : q.size(1), Tk = varlen ? max_k : k.size(1), Hkv = k.size(-2), G = H / Hkv;
  // the dK/dV loop steps through a group's query heads by int32 offsets (kernels/attention_backward.py)
  if ((G - 1) * std::max(q.stride(-2), dout.stride(-2)) >= (int64_t{1} << 31)) {
    q = q.contiguous();
    dout = dout.contiguous();
  }
  const Tensor lse = lse_in.contiguous();
  // lse's gradient in lse's contiguous layout (the kernel reads it by lse's strides), at an aligned address
  const Tensor dlse = dlse_in.has_value() ? compiled_buffer(*dlse_in) : Tensor();
  const at::ScalarType dtype = q.scalar_type();
  const auto f32 = at::kFloat, i32 = at::kInt, i64 = at::kLong;
  Tensor delta = at::empty(lse.sizes(), lse.options());
  const int64_t tune_seqlen = next_power_of_2(std::max(Tq, Tk));
  const int64_t tune_left = band_class(left, tune_seqlen), tune_right = band_class(right, tune_seqlen);
  // kernels/_attention_launch.py full_tiles (dense): no tile has a row or column to mask
  const bool full = !varlen && Tq % 128 == 0 && Tk % 128 == 0 && left >= Tk - 1 && right >= Tq - 1;
  const bool tma = tma_head_dim(D) && !dropout;  // dK/dV's TMA_ALIGNED: dropout takes the pointer loop
  const aot::Value null = aot::ptr(Tensor()), cu_q_ptr = aot::ptr(cu_q), cu_k_ptr = aot::ptr(cu_k);
  // (batch, head) strides of lse: (H, total_q) when packed
  const std::vector<aot::Value> lse_strides = {aot::integer(varlen ? 0 : lse.stride(0)),
                                               aot::integer(varlen ? lse.stride(0) : lse.stride(1))};

  {
    const aot::Entry& e =
        aot::find(aot::Kernel::AttentionBackwardPreprocess, {dtype, dtype, f32, f32, i32, i32},
                  {D, D_pad, varlen, dlse.defined(), kPreprocessBlockM});
    const std::vector<aot::Value> o = bth(out), d = bth(dout);
    // The band too: a row that sees one key takes rowsum 0 (the kernel's docstring)
    aot::launch(e, {static_cast<uint32_t>(cdiv(Tq, kPreprocessBlockM)), static_cast<uint32_t>(H),
                    static_cast<uint32_t>(B)},
                device,
                {aot::ptr(out), aot::ptr(dout), aot::ptr(delta), aot::ptr(dlse), o[0], o[1], o[2], d[0], d[1], d[2],
                 lse_strides[0], lse_strides[1], cu_q_ptr, cu_k_ptr, aot::integer(Tq), aot::integer(Tk),
                 aot::integer(left), aot::integer(right)});
  }
  const auto opts = q.options();
  // A target the kernels cannot write as it is takes a fresh gradient, copied in at the end (`written`).
  auto target = [&](int i, const Tensor& like) {
    return into != nullptr && direct_target((*into)[i]) ? (*into)[i] : at::empty(like.sizes(), like.options());
  };
  auto written = [&](int i, const Tensor& g) {
    return into == nullptr || g.is_same((*into)[i]) ? g : (*into)[i].copy_(g);
  };
  Tensor dk = target(1, k), dv = target(2, v);
  const double scale_log2 = scale * kLog2e;
  // Q, K, V, dO, lse: the strides both kernels take after their pointers; then dK's and dV's (dK/dV only), dQ's.
  std::vector<aot::Value> common;
  for (const Tensor* t : std::initializer_list<const Tensor*>{&q, &k, &v, &dout}) {
    for (const aot::Value& s : bth(*t)) common.push_back(s);
  }
  common.insert(common.end(), lse_strides.begin(), lse_strides.end());
  // Seed (null without dropout), dropout_threshold, dropout_scale; then softcap_log2, Alibi, stride_ab: none.
  const int64_t threshold = dropout ? keep_threshold(dropout_p) : 0;
  const double dropout_scale = dropout ? 1.0 / (1.0 - dropout_p) : 1.0;
  const std::vector<aot::Value> tail = {aot::integer(Tq),          aot::integer(Tk),        aot::real(scale),
                                        aot::real(scale_log2),     aot::integer(left),      aot::integer(right),
                                        aot::integer(tune_seqlen), aot::integer(tune_left), aot::integer(tune_right),
                                        aot::ptr(seed),            aot::integer(threshold), aot::real(dropout_scale),
                                        aot::real(0.0),            null,                    aot::integer(0)};
  const std::vector<aot::Value> dk_s = bth(dk), dv_s = bth(dv);

  // One launch of a kernel whose arguments are pointers, then `common`, then extra strides, then `tail`.
  auto launch_with = [&](const aot::Entry& e, aot::Grid grid, std::vector<aot::Value> values,
                         const std::vector<aot::Value>& strides) {
    values.insert(values.end(), common.begin(), common.end());
    values.insert(values.end(), strides.begin(), strides.end());
    values.insert(values.end(), tail.begin(), tail.end());
    aot::launch(e, grid, device, values.data(), values.size());
  };

  // The shipped dK/dV tiles of this call's class (with or without atomic dQ), the JIT's first config's first; with
  // `required` the registry's error when none is, else none.
  auto dkdv_candidates = [&](bool atomic, bool required) {
    std::vector<const aot::Entry*> found;
    const std::initializer_list<at::ScalarType> pointers = {dtype, dtype, dtype, dtype, f32, f32,  dtype,
                                                            dtype, f32,   i32,   i32,   i64, f32};
    const std::vector<Tile> tiles = dkdv_tiles(D, atomic);
    for (const Tile& t : tiles) {
      if (t.warp_specialize && (!tma || !warp_specialize_on())) continue;  // the JIT's pruner: TMA_ALIGNED only
      // Only the warp-specialized loop reads FULL_TILES: the pipelined tiles ship (and launch) their False cubin.
      const bool full_cx = full && t.warp_specialize;
      const std::initializer_list<int64_t> cx = {G,         D,         D_pad,  varlen,  false, tma,
                                                 full_cx,   t.block_m, t.block_n, t.warp_specialize, atomic,
                                                 dropout,   false,     false};
      if (const aot::Entry* e = aot::lookup(aot::Kernel::AttentionBackwardDkdv, pointers, cx)) found.push_back(e);
    }
    if (found.empty() && required) {  // none shipped: the registry's error
      const Tile& t = tiles[0];
      found.push_back(&aot::find(aot::Kernel::AttentionBackwardDkdv, pointers,
                                 {G, D, D_pad, varlen, false, tma, full && t.warp_specialize, t.block_m, t.block_n,
                                  t.warp_specialize, atomic, dropout, false, false}));
    }
    return found;
  };
  // K/V blocks on the grid's first axis, as the JIT's grid_kv.
  auto kv_grid = [&](const aot::Entry& e) {
    const int64_t block_n = e.constexprs[8];
    return aot::Grid{static_cast<uint32_t>(cdiv(Tk, block_n)), static_cast<uint32_t>(Hkv), static_cast<uint32_t>(B)};
  };
  // The tile of a kernel, timed among the shipped ones at a shape class's first call: the JIT autotuner's key
  // (HEAD_DIM, tune_seqlen, GROUP, VARLEN, tune_left, tune_right, DROPOUT, which decides TMA_ALIGNED here; SOFTCAP
  // and ALIBI are fixed) and the dtype; `what` tells dK/dV without (0) and with (1) atomic dQ and dQ (2) apart.
  auto tuned = [&](int64_t what, aot::Kernel kernel, const std::vector<const aot::Entry*>& candidates,
                   const std::function<void(const aot::Entry&)>& run) {
    const int i = aot::tune(
        kernel, {what, static_cast<int64_t>(dtype), D, tune_seqlen, G, varlen, tune_left, tune_right, dropout},
        static_cast<int>(candidates.size()), device, [&](int c) { run(*candidates[c]); });
    return candidates[i];
  };

  std::vector<const aot::Entry*> atomic_candidates;  // the atomic plan's dK/dV tiles, found once it may run
  auto atomic_dq = [&]() {
    Tensor dq_acc = at::zeros(q.sizes(), opts.dtype(f32));  // contiguous, whatever q's strides
    const std::vector<aot::Value> dq_s = bth(dq_acc);
    std::vector<aot::Value> strides = dk_s;
    strides.insert(strides.end(), dv_s.begin(), dv_s.end());
    strides.insert(strides.end(), dq_s.begin(), dq_s.end());
    auto run = [&](const aot::Entry& e) {
      launch_with(e, kv_grid(e),
                  {aot::ptr(q), aot::ptr(k), aot::ptr(v), aot::ptr(dout), aot::ptr(lse), aot::ptr(delta),
                   aot::ptr(dk), aot::ptr(dv), aot::ptr(dq_acc), cu_q_ptr, cu_k_ptr},
                  strides);
    };
    bool trials = false;
    const aot::Entry* e = tuned(1, aot::Kernel::AttentionBackwardDkdv, atomic_candidates, [&](const aot::Entry& c) {
      dq_acc.zero_();  // the JIT autotuner's reset_to_zero before each trial
      trials = true;
      run(c);
    });
    if (trials) dq_acc.zero_();  // and once more after them
    run(*e);
    // the cast is the one copy, into the target as the JIT's copy_ (any strides)
    return into != nullptr ? (*into)[0].copy_(dq_acc) : dq_acc.to(dtype);
  };

  auto separate_dq = [&]() {
    std::vector<aot::Value> strides = dk_s;
    strides.insert(strides.end(), dv_s.begin(), dv_s.end());
    for (int i = 0; i < 3; ++i) strides.push_back(aot::integer(0));
    auto run_dkdv = [&](const aot::Entry& e) {
      launch_with(e, kv_grid(e),
                  {aot::ptr(q), aot::ptr(k), aot::ptr(v), aot::ptr(dout), aot::ptr(lse), aot::ptr(delta),
                   aot::ptr(dk), aot::ptr(dv), null, cu_q_ptr, cu_k_ptr},
                  strides);
    };
    run_dkdv(*tuned(0, aot::Kernel::AttentionBackwardDkdv, dkdv_candidates(false, true), run_dkdv));
    Tensor dq = target(0, q);
    const std::initializer_list<at::ScalarType> pointers = {dtype, dtype, dtype, dtype, f32, f32,
                                                            dtype, i32,   i32,   i64,   f32};
    std::vector<const aot::Entry*> candidates;
    const std::vector<Tile> tiles = dq_tiles(D);
    for (const Tile& t : tiles) {
      if (const aot::Entry* e = aot::lookup(aot::Kernel::AttentionBackwardDq, pointers,
                                            {G, D, D_pad, varlen, false, t.block_m, t.block_n, dropout, false,
                                             false})) {
        candidates.push_back(e);
      }
    }
    if (candidates.empty()) {
      candidates.push_back(&aot::find(aot::Kernel::AttentionBackwardDq, pointers,
                                      {G, D, D_pad, varlen, false, tiles[0].block_m, tiles[0].block_n, dropout,
                                       false, false}));
    }
    auto run_dq = [&](const aot::Entry& e) {
      const int64_t block_m = e.constexprs[5];
      launch_with(
          e, {static_cast<uint32_t>(cdiv(Tq, block_m)), static_cast<uint32_t>(H), static_cast<uint32_t>(B)},
          {aot::ptr(q), aot::ptr(k), aot::ptr(v), aot::ptr(dout), aot::ptr(lse), aot::ptr(delta), aot::ptr(dq),
           cu_q_ptr, cu_k_ptr},
          bth(dq));
    };
    run_dq(*tuned(2, aot::Kernel::AttentionBackwardDq, candidates, run_dq));
    return written(0, dq);
  };

  if (deterministic) {
    Tensor dq = separate_dq();
    return {dq, written(1, dk), written(2, dv)};
  }
  // With dropout, a head dim whose atomic-dQ tiles all spill on this arch has none shipped
  // (kernels/_attention_configs.py _DROPOUT_SPILLS): the dQ kernel's plan, as the JIT's takes_dropout check gives it.
  atomic_candidates = dkdv_candidates(true, !dropout);
  if (atomic_candidates.empty()) {
    Tensor dq = separate_dq();
    return {dq, written(1, dk), written(2, dv)};
  }
  // The plan, timed at a shape class's first call: kernels/attention_backward.py _backward_plans' key (dtype, the
  // tuning ints, B * Hkv rounded up to a power of 2, and the dK/dV launch's constexprs: GROUP, HEAD_DIM, VARLEN and
  // FULL_TILES and DROPOUT vary here). The preprocess has no tile to tune, so its kernel's slot keys the plans.
  // Candidate 0, the atomic plan, is the JIT's default where nothing can be timed.
  Tensor dq;
  const int plan = aot::tune(aot::Kernel::AttentionBackwardPreprocess,
                             {static_cast<int64_t>(dtype), tune_seqlen, tune_left, tune_right, next_power_of_2(B * Hkv),
                              G, D, varlen, full, dropout},
                             2, device, [&](int i) { dq = i == 0 ? atomic_dq() : separate_dq(); });
  dq = plan == 0 ? atomic_dq() : separate_dq();
  return {dq, written(1, dk), written(2, dv)};
}

std::tuple<Tensor, Tensor, Tensor> attention_backward_aot(const Tensor& dout, const Tensor& q, const Tensor& k,
                                                          const Tensor& v, const Tensor& out, const Tensor& lse,
                                                          double scale, int64_t left, int64_t right,
                                                          bool deterministic, double dropout_p,
                                                          const std::optional<Tensor>& seed,
                                                          const std::optional<Tensor>& dlse) {
  return backward(dout, q, k, v, out, lse, nullptr, nullptr, 0, 0, scale, left, right, deterministic, dropout_p,
                  seed, dlse);
}

std::tuple<Tensor, Tensor, Tensor> attention_varlen_backward_aot(const Tensor& dout, const Tensor& q, const Tensor& k,
                                                                 const Tensor& v, const Tensor& out, const Tensor& lse,
                                                                 const Tensor& cu_seqlens_q, const Tensor& cu_seqlens_k,
                                                                 int64_t max_seqlen_q, int64_t max_seqlen_k,
                                                                 double scale, int64_t left, int64_t right,
                                                                 bool deterministic, double dropout_p,
                                                                 const std::optional<Tensor>& seed,
                                                                 const std::optional<Tensor>& dlse) {
  return backward(dout, q, k, v, out, lse, &cu_seqlens_q, &cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, left,
                  right, deterministic, dropout_p, seed, dlse);
}

void attention_backward_into_aot(const Tensor& dq, const Tensor& dk, const Tensor& dv, const Tensor& dout,
                                 const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
                                 const Tensor& lse, double scale, int64_t left, int64_t right, bool deterministic,
                                 double dropout_p, const std::optional<Tensor>& seed,
                                 const std::optional<Tensor>& dlse) {
  const std::array<Tensor, 3> into = {dq, dk, dv};
  backward(dout, q, k, v, out, lse, nullptr, nullptr, 0, 0, scale, left, right, deterministic, dropout_p, seed, dlse,
           &into);
}

void attention_varlen_backward_into_aot(const Tensor& dq, const Tensor& dk, const Tensor& dv, const Tensor& dout,
                                        const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
                                        const Tensor& lse, const Tensor& cu_seqlens_q, const Tensor& cu_seqlens_k,
                                        int64_t max_seqlen_q, int64_t max_seqlen_k, double scale, int64_t left,
                                        int64_t right, bool deterministic, double dropout_p,
                                        const std::optional<Tensor>& seed, const std::optional<Tensor>& dlse) {
  const std::array<Tensor, 3> into = {dq, dk, dv};
  backward(dout, q, k, v, out, lse, &cu_seqlens_q, &cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, left, right,
           deterministic, dropout_p, seed, dlse, &into);
}

// ---- Meta: shapes and dtypes only, for torch.compile's fake tensors ----

std::tuple<Tensor, Tensor, Tensor> attention_backward_aot_meta(const Tensor&, const Tensor& q, const Tensor& k,
                                                               const Tensor& v, const Tensor&, const Tensor&, double,
                                                               int64_t, int64_t, bool, double,
                                                               const std::optional<Tensor>&,
                                                               const std::optional<Tensor>&) {
  return {at::empty(q.sizes(), q.options()), at::empty(k.sizes(), k.options()), at::empty(v.sizes(), v.options())};
}

std::tuple<Tensor, Tensor, Tensor> attention_varlen_backward_aot_meta(const Tensor&, const Tensor& q, const Tensor& k,
                                                                      const Tensor& v, const Tensor&, const Tensor&,
                                                                      const Tensor&, const Tensor&, int64_t, int64_t,
                                                                      double, int64_t, int64_t, bool, double,
                                                                      const std::optional<Tensor>&,
                                                                      const std::optional<Tensor>&) {
  return {at::empty(q.sizes(), q.options()), at::empty(k.sizes(), k.options()), at::empty(v.sizes(), v.options())};
}

// The _into ops write their arguments: nothing to make.
void attention_backward_into_aot_meta(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                      const Tensor&, const Tensor&, const Tensor&, const Tensor&, double, int64_t,
                                      int64_t, bool, double, const std::optional<Tensor>&,
                                      const std::optional<Tensor>&) {}

void attention_varlen_backward_into_aot_meta(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                             const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                             const Tensor&, const Tensor&, int64_t, int64_t, double, int64_t, int64_t,
                                             bool, double, const std::optional<Tensor>&,
                                             const std::optional<Tensor>&) {}

}  // namespace

TORCH_LIBRARY_IMPL(fasttrain, CUDA, m) {
  m.impl("attention_backward_aot", &attention_backward_aot);
  m.impl("attention_varlen_backward_aot", &attention_varlen_backward_aot);
  m.impl("attention_backward_into_aot", &attention_backward_into_aot);
  m.impl("attention_varlen_backward_into_aot", &attention_varlen_backward_into_aot);
}

TORCH_LIBRARY_IMPL(fasttrain, CPU, m) {
  m.impl("attention_backward_aot", &attention_backward_aot);
  m.impl("attention_varlen_backward_aot", &attention_varlen_backward_aot);
  m.impl("attention_backward_into_aot", &attention_backward_into_aot);
  m.impl("attention_varlen_backward_into_aot", &attention_varlen_backward_into_aot);
}

TORCH_LIBRARY_IMPL(fasttrain, Meta, m) {
  m.impl("attention_backward_aot", &attention_backward_aot_meta);
  m.impl("attention_varlen_backward_aot", &attention_varlen_backward_aot_meta);
  m.impl("attention_backward_into_aot", &attention_backward_into_aot_meta);
  m.impl("attention_varlen_backward_into_aot", &attention_varlen_backward_into_aot_meta);
}

}  // namespace fasttrain
