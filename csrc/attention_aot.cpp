// The attention forward (flash_attn_func's and flash_attn_varlen_func's common eager calls) launched from C++:
// kernels/attention.py's _attn_fwd_kernel compiled ahead of time and shipped as cubins (aot_launch.h), so a forward
// costs no Python launcher. The ops do what kernels/attention.py `attention_forward` does on a GPU for the calls its
// shipped set covers (kernels/attention.py _shipped): dense (B, T, H, D) or packed (total, H, D) tensors with int32
// offsets (VARLEN), fp16/bf16, head_dim 64, 96, 128 or 256, GQA groups 1, 2, 4 or 8, any window (left, right as
// fasttrain/ops/attention.py _window gives them), with or without dropout (at head_dim 64 or 128: dropout_p and the
// int64 (2,) seed tensor kernels/_attention_dropout.py draws the mask from), no softcap or ALiBi. The same grid,
// strides, constexprs (TMA_ALIGNED, on for a power-of-2 head dim without dropout; HEAD_DIM_PAD; FULL_TILES where the
// tile reads it; DROPOUT) and tuning key (tune_seqlen, the band classes, dropout); the tile is chosen among the shipped
// configs of the head dim's class by timing them at a shape class's first call (aot::tune), as the JIT's autotuner
// chooses among the configs its pruner keeps (with dropout or a head dim TMA cannot read: no warp-specialized one). The
// warp-specialized configs (sm_90) build TMA descriptors on the device in global scratch, which the launcher allocates.
// The cubins assume what the JIT finds on the usual tensors: 16-byte aligned pointers, strides that are nonzero
// multiples of 16 elements (so TMA can read them). Inputs that are not are copied contiguous first.
// Ops (schemas in ops.cpp): fasttrain::attention_forward_aot and attention_varlen_forward_aot; CUDA, and CPU while the
// launches are recorded (aot_launch.h); Meta for tracing.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/ScalarType.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "aot_launch.h"
#include "attention_aot_common.h"

namespace fasttrain {
namespace {

using at::Tensor;
using namespace attention_aot;

constexpr const char* kName = "attention_forward_aot";
constexpr int64_t kGridYZMax = 65535;           // CUDA's limit on a grid's y and z axes (H and B here)

// The forward's tiles in the order of kernels/_attention_configs.py _FWD's lists (sm_90's; sm_80's are a subsequence
// of them), the same for head-dim classes d64 and d128, and d256's (sm_90's, then sm_80's): the candidates of a call
// are those shipped for the registry's arch (tests/test_attention_aot.py holds these lists to the tables).
std::vector<Tile> tiles(int64_t head_dim) {
  if (head_dim == 256) return {{32, 32, false}, {64, 32, false}};
  return {{128, 64, false}, {128, 128, false}, {64, 64, false}, {128, 128, true}};
}

// varlen: q (total_q, H, D), k and v (total_k, Hkv, D) and int32 offsets (B + 1) of each; else (B, T, H, D).
void check(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor* cu_q, const Tensor* cu_k, double dropout_p,
           const std::optional<Tensor>& seed) {
  const bool varlen = cu_q != nullptr;
  const int64_t dims = varlen ? 3 : 4;
  TORCH_CHECK(q.dim() == dims, kName, varlen ? ": packed q must be (total_q, H, D)" : ": q must be (B, Tq, H, D)");
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16, kName,
              ": the shipped cubins take fp16 or bf16, got ", q.scalar_type());
  const int64_t D = q.size(-1);
  TORCH_CHECK(shipped_head_dim(D), kName, ": the shipped cubins take head_dim 64, 96, 128 or 256, got ", D);
  for (const Tensor* t : {&k, &v}) {
    TORCH_CHECK(t->dim() == dims && (varlen || t->size(0) == q.size(0)) && t->size(-1) == D &&
                    t->sizes() == k.sizes() && t->scalar_type() == q.scalar_type() && t->device() == q.device(),
                kName,
                varlen ? ": packed k and v must be (total_k, Hkv, D) in q's dtype on q's device"
                       : ": k and v must be (B, Tk, Hkv, D) in q's dtype on q's device");
  }
  const int64_t H = q.size(-2), Hkv = k.size(-2);
  TORCH_CHECK(Hkv > 0 && H % Hkv == 0, kName, ": q's heads must be a multiple of k's");
  const int64_t G = H / Hkv;
  TORCH_CHECK(G == 1 || G == 2 || G == 4 || G == 8, kName, ": the shipped cubins take GQA groups 1, 2, 4 or 8, got ",
              G);
  int64_t B = q.size(0);
  if (varlen) {
    check_offsets(q, *cu_q, *cu_k, kName);
    B = cu_q->numel() - 1;
  }
  TORCH_CHECK(B <= kGridYZMax && H <= kGridYZMax, kName, ": B and H must be at most ", kGridYZMax);
  check_dropout(kName, q, dropout_p, seed);
}

// The forward of dense (cu_q null) or packed calls; Tq and Tk are the longest sequences when packed.
std::tuple<Tensor, Tensor> forward(const Tensor& q_in, const Tensor& k_in, const Tensor& v_in, const Tensor* cu_q_in,
                                   const Tensor* cu_k_in, int64_t max_q, int64_t max_k, double scale, int64_t left,
                                   int64_t right, double dropout_p, const std::optional<Tensor>& seed_in) {
  check(q_in, k_in, v_in, cu_q_in, cu_k_in, dropout_p, seed_in);
  const bool dropout = dropout_p > 0.0;
  const Tensor seed = dropout ? compiled_buffer(*seed_in) : Tensor();
  const c10::DeviceIndex device = launch_device(q_in, kName);
  const bool varlen = cu_q_in != nullptr;
  const Tensor q = as_compiled(q_in), k = as_compiled(k_in), v = as_compiled(v_in);
  const Tensor cu_q = varlen ? compiled_buffer(*cu_q_in) : Tensor();
  const Tensor cu_k = varlen ? compiled_buffer(*cu_k_in) : Tensor();
  const int64_t B = varlen ? cu_q.numel() - 1 : q.size(0), H = q.size(-2), D = q.size(-1);
  const int64_t Tq = varlen ? max_q : q.size(1), Tk = varlen ? max_k : k.size(1), G = H / k.size(-2);
  const at::ScalarType dtype = q.scalar_type();
  Tensor out = at::empty(q.sizes(), q.options());
  // float32 lse: (H, total_q) when packed, else (B, H, Tq)
  Tensor lse = varlen ? at::empty({H, q.size(0)}, q.options().dtype(at::kFloat))
                      : at::empty({B, H, Tq}, q.options().dtype(at::kFloat));
  // kernels/_attention_launch.py launch_params and full_tiles
  const int64_t tune_seqlen = next_power_of_2(std::max(Tq, Tk));
  const int64_t tune_left = band_class(left, tune_seqlen), tune_right = band_class(right, tune_seqlen);
  const bool full = !varlen && Tq % 128 == 0 && Tk % 128 == 0 && left >= Tk - 1 && right >= Tq - 1;
  const std::array<int64_t, 3> qs = bth_strides(q, varlen), ks = bth_strides(k, varlen), vs = bth_strides(v, varlen),
                               os = bth_strides(out, varlen);
  const int64_t lse_b = varlen ? 0 : lse.stride(0), lse_h = varlen ? lse.stride(0) : lse.stride(1);

  // TMA_ALIGNED: a power-of-2 head dim (the op copies inputs of other layouts), off with dropout, which takes the
  // pointer loop (kernels/attention.py attention_forward)
  const bool tma = tma_head_dim(D) && !dropout;
  auto entry = [&](const Tile& t, bool required) {
    const std::initializer_list<at::ScalarType> pointers = {dtype,    dtype,    dtype,   dtype,     at::kFloat,
                                                            at::kInt, at::kInt, at::kLong, at::kFloat};
    // Only the warp-specialized loop reads FULL_TILES: the pipelined tiles ship (and launch) their False cubin.
    const bool full_cx = full && t.warp_specialize;
    const std::initializer_list<int64_t> constexprs = {G,         D,         next_power_of_2(D), varlen, false,
                                                       tma,       full_cx,   t.block_m,          t.block_n,
                                                       t.warp_specialize, dropout, false, false};
    return required ? &aot::find(aot::Kernel::AttentionForward, pointers, constexprs)
                    : aot::lookup(aot::Kernel::AttentionForward, pointers, constexprs);
  };
  std::vector<const aot::Entry*> candidates;
  std::vector<int64_t> block_ms;
  const std::vector<Tile> class_tiles = tiles(D);
  for (const Tile& t : class_tiles) {
    if (t.warp_specialize && (!tma || !warp_specialize_on())) continue;  // the JIT's pruner: TMA_ALIGNED only
    if (const aot::Entry* e = entry(t, false)) {
      candidates.push_back(e);
      block_ms.push_back(t.block_m);
    }
  }
  if (candidates.empty()) {  // none shipped: the registry's error
    candidates.push_back(entry(class_tiles[0], true));
    block_ms.push_back(class_tiles[0].block_m);
  }
  auto launch = [&](int i) {
    const uint32_t blocks = static_cast<uint32_t>((Tq + block_ms[i] - 1) / block_ms[i]);
    aot::launch(*candidates[i], {blocks, static_cast<uint32_t>(H), static_cast<uint32_t>(B)}, device,
                {aot::ptr(q),
                 aot::ptr(k),
                 aot::ptr(v),
                 aot::ptr(out),
                 aot::ptr(lse),
                 aot::ptr(cu_q),
                 aot::ptr(cu_k),
                 aot::integer(qs[0]),
                 aot::integer(qs[1]),
                 aot::integer(qs[2]),
                 aot::integer(ks[0]),
                 aot::integer(ks[1]),
                 aot::integer(ks[2]),
                 aot::integer(vs[0]),
                 aot::integer(vs[1]),
                 aot::integer(vs[2]),
                 aot::integer(os[0]),
                 aot::integer(os[1]),
                 aot::integer(os[2]),
                 aot::integer(lse_b),
                 aot::integer(lse_h),
                 aot::integer(Tq),
                 aot::integer(Tk),
                 aot::real(scale * kLog2e),
                 aot::integer(left),
                 aot::integer(right),
                 aot::integer(tune_seqlen),
                 aot::integer(tune_left),
                 aot::integer(tune_right),
                 aot::ptr(seed),  // null without dropout
                 aot::integer(dropout ? keep_threshold(dropout_p) : 0),
                 aot::real(dropout ? 1.0 / (1.0 - dropout_p) : 1.0),
                 aot::real(0.0),  // softcap_log2: no softcap
                 aot::ptr(at::Tensor()),  // Alibi
                 aot::integer(0)});
  };
  // The tile, timed among the shipped ones at a shape class's first call: the JIT autotuner's key (HEAD_DIM,
  // tune_seqlen, GROUP, VARLEN, tune_left, tune_right, DROPOUT, which decides TMA_ALIGNED here; the rest fixed for the
  // op's calls) and the dtype. Every trial writes only out and lse.
  const int chosen = aot::tune(aot::Kernel::AttentionForward,
                               {static_cast<int64_t>(dtype), D, tune_seqlen, G, varlen, tune_left, tune_right, dropout},
                               static_cast<int>(candidates.size()), device, launch);
  launch(chosen);
  return {out, lse};
}

std::tuple<Tensor, Tensor> attention_forward_aot(const Tensor& q, const Tensor& k, const Tensor& v, double scale,
                                                 int64_t left, int64_t right, double dropout_p,
                                                 const std::optional<Tensor>& seed) {
  return forward(q, k, v, nullptr, nullptr, 0, 0, scale, left, right, dropout_p, seed);
}

std::tuple<Tensor, Tensor> attention_varlen_forward_aot(const Tensor& q, const Tensor& k, const Tensor& v,
                                                        const Tensor& cu_seqlens_q, const Tensor& cu_seqlens_k,
                                                        int64_t max_seqlen_q, int64_t max_seqlen_k, double scale,
                                                        int64_t left, int64_t right, double dropout_p,
                                                        const std::optional<Tensor>& seed) {
  return forward(q, k, v, &cu_seqlens_q, &cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, left, right, dropout_p,
                 seed);
}

// ---- Meta: shapes and dtypes only, for torch.compile's fake tensors ----

std::tuple<Tensor, Tensor> attention_forward_aot_meta(const Tensor& q, const Tensor&, const Tensor&, double, int64_t,
                                                      int64_t, double, const std::optional<Tensor>&) {
  return {at::empty(q.sizes(), q.options()),
          at::empty({q.size(0), q.size(2), q.size(1)}, q.options().dtype(at::kFloat))};
}

std::tuple<Tensor, Tensor> attention_varlen_forward_aot_meta(const Tensor& q, const Tensor&, const Tensor&,
                                                             const Tensor&, const Tensor&, int64_t, int64_t, double,
                                                             int64_t, int64_t, double, const std::optional<Tensor>&) {
  return {at::empty(q.sizes(), q.options()), at::empty({q.size(1), q.size(0)}, q.options().dtype(at::kFloat))};
}

}  // namespace

TORCH_LIBRARY_IMPL(fasttrain, CUDA, m) {
  m.impl("attention_forward_aot", &attention_forward_aot);
  m.impl("attention_varlen_forward_aot", &attention_varlen_forward_aot);
}

TORCH_LIBRARY_IMPL(fasttrain, CPU, m) {
  m.impl("attention_forward_aot", &attention_forward_aot);
  m.impl("attention_varlen_forward_aot", &attention_varlen_forward_aot);
}

TORCH_LIBRARY_IMPL(fasttrain, Meta, m) {
  m.impl("attention_forward_aot", &attention_forward_aot_meta);
  m.impl("attention_varlen_forward_aot", &attention_varlen_forward_aot_meta);
}

}  // namespace fasttrain
