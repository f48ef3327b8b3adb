// The attention forward (flash_attn_func's common eager call) launched from C++: kernels/attention.py's
// _attn_fwd_kernel compiled ahead of time and shipped as cubins (aot_launch.h), so a forward costs no Python launcher.
// The op does what kernels/attention.py `attention_forward` does on a GPU for the calls its shipped set covers
// (kernels/attention.py _shipped): dense (B, T, H, D) tensors, fp16/bf16, head_dim 64 or 128, GQA groups 1, 2, 4 or
// 8, any window (left, right as fasttrain/ops/attention.py _window gives them), no dropout, softcap or ALiBi. The same
// grid, strides, constexprs (TMA_ALIGNED, FULL_TILES where the tile reads it) and tuning key (tune_seqlen and the band classes); the tile is
// chosen among the shipped configs of the head dim's class by timing them at a shape class's first call (aot::tune),
// as the JIT's autotuner chooses among the configs its pruner keeps. The warp-specialized configs (sm_90) build TMA
// descriptors on the device in global scratch, which the launcher allocates.
// The cubins assume what the JIT finds on the usual tensors: 16-byte aligned pointers, strides that are nonzero
// multiples of 16 elements (so TMA can read them). Inputs that are not are copied contiguous first.
// Op (schema in ops.cpp): fasttrain::attention_forward_aot; CUDA, and CPU while the launches are recorded
// (aot_launch.h); Meta for tracing.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/ScalarType.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
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
// of them), the same for head-dim classes d64 and d128: the candidates of a call are those shipped for the
// registry's arch (tests/test_attention_aot.py holds this list to the tables).
constexpr std::array<Tile, 4> kTiles = {{{128, 64, false}, {128, 128, false}, {64, 64, false}, {128, 128, true}}};

void check(const Tensor& q, const Tensor& k, const Tensor& v) {
  TORCH_CHECK(q.dim() == 4, kName, ": q must be (B, Tq, H, D)");
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16, kName,
              ": the shipped cubins take fp16 or bf16, got ", q.scalar_type());
  const int64_t D = q.size(3);
  TORCH_CHECK(D == 64 || D == 128, kName, ": the shipped cubins take head_dim 64 or 128, got ", D);
  for (const Tensor* t : {&k, &v}) {
    TORCH_CHECK(t->dim() == 4 && t->size(0) == q.size(0) && t->size(3) == D && t->sizes() == k.sizes() &&
                    t->scalar_type() == q.scalar_type() && t->device() == q.device(),
                kName, ": k and v must be (B, Tk, Hkv, D) in q's dtype on q's device");
  }
  const int64_t H = q.size(2), Hkv = k.size(2);
  TORCH_CHECK(Hkv > 0 && H % Hkv == 0, kName, ": q's heads must be a multiple of k's");
  const int64_t G = H / Hkv;
  TORCH_CHECK(G == 1 || G == 2 || G == 4 || G == 8, kName, ": the shipped cubins take GQA groups 1, 2, 4 or 8, got ",
              G);
  TORCH_CHECK(q.size(0) <= kGridYZMax && H <= kGridYZMax, kName, ": B and H must be at most ", kGridYZMax);
}

std::tuple<Tensor, Tensor> attention_forward_aot(const Tensor& q_in, const Tensor& k_in, const Tensor& v_in,
                                                 double scale, int64_t left, int64_t right) {
  check(q_in, k_in, v_in);
  const c10::DeviceIndex device = launch_device(q_in, kName);
  const Tensor q = as_compiled(q_in), k = as_compiled(k_in), v = as_compiled(v_in);
  const int64_t B = q.size(0), Tq = q.size(1), H = q.size(2), D = q.size(3);
  const int64_t Tk = k.size(1), G = H / k.size(2);
  const at::ScalarType dtype = q.scalar_type();
  Tensor out = at::empty(q.sizes(), q.options());
  Tensor lse = at::empty({B, H, Tq}, q.options().dtype(at::kFloat));
  // kernels/_attention_launch.py launch_params and full_tiles
  const int64_t tune_seqlen = next_power_of_2(std::max(Tq, Tk));
  const int64_t tune_left = band_class(left, tune_seqlen), tune_right = band_class(right, tune_seqlen);
  const bool full = Tq % 128 == 0 && Tk % 128 == 0 && left >= Tk - 1 && right >= Tq - 1;

  auto entry = [&](const Tile& t, bool required) {
    const std::initializer_list<at::ScalarType> pointers = {dtype,    dtype,    dtype,   dtype,     at::kFloat,
                                                            at::kInt, at::kInt, at::kLong, at::kFloat};
    // Only the warp-specialized loop reads FULL_TILES: the pipelined tiles ship (and launch) their False cubin.
    const bool full_cx = full && t.warp_specialize;
    const std::initializer_list<int64_t> constexprs = {G,    D,         D,         false, false,
                                                       true, full_cx,   t.block_m, t.block_n,
                                                       t.warp_specialize, false, false, false};
    return required ? &aot::find(aot::Kernel::AttentionForward, pointers, constexprs)
                    : aot::lookup(aot::Kernel::AttentionForward, pointers, constexprs);
  };
  std::vector<const aot::Entry*> candidates;
  std::vector<int64_t> block_ms;
  for (const Tile& t : kTiles) {
    if (t.warp_specialize && !warp_specialize_on()) continue;
    if (const aot::Entry* e = entry(t, false)) {
      candidates.push_back(e);
      block_ms.push_back(t.block_m);
    }
  }
  if (candidates.empty()) {  // none shipped: the registry's error
    candidates.push_back(entry(kTiles[0], true));
    block_ms.push_back(kTiles[0].block_m);
  }
  auto launch = [&](int i) {
    const uint32_t blocks = static_cast<uint32_t>((Tq + block_ms[i] - 1) / block_ms[i]);
    aot::launch(*candidates[i], {blocks, static_cast<uint32_t>(H), static_cast<uint32_t>(B)}, device,
                {aot::ptr(q),
                 aot::ptr(k),
                 aot::ptr(v),
                 aot::ptr(out),
                 aot::ptr(lse),
                 aot::ptr(at::Tensor()),
                 aot::ptr(at::Tensor()),
                 aot::integer(q.stride(0)),
                 aot::integer(q.stride(1)),
                 aot::integer(q.stride(2)),
                 aot::integer(k.stride(0)),
                 aot::integer(k.stride(1)),
                 aot::integer(k.stride(2)),
                 aot::integer(v.stride(0)),
                 aot::integer(v.stride(1)),
                 aot::integer(v.stride(2)),
                 aot::integer(out.stride(0)),
                 aot::integer(out.stride(1)),
                 aot::integer(out.stride(2)),
                 aot::integer(lse.stride(0)),
                 aot::integer(lse.stride(1)),
                 aot::integer(Tq),
                 aot::integer(Tk),
                 aot::real(scale * kLog2e),
                 aot::integer(left),
                 aot::integer(right),
                 aot::integer(tune_seqlen),
                 aot::integer(tune_left),
                 aot::integer(tune_right),
                 aot::ptr(at::Tensor()),  // Seed: no dropout
                 aot::integer(0),
                 aot::real(1.0),
                 aot::real(0.0),  // softcap_log2: no softcap
                 aot::ptr(at::Tensor()),  // Alibi
                 aot::integer(0)});
  };
  // The tile, timed among the shipped ones at a shape class's first call: the JIT autotuner's key (HEAD_DIM,
  // tune_seqlen, GROUP, tune_left, tune_right; the rest fixed for the op's calls) and the dtype. Every trial writes
  // only out and lse.
  const int chosen = aot::tune(aot::Kernel::AttentionForward,
                               {static_cast<int64_t>(dtype), D, tune_seqlen, G, tune_left, tune_right},
                               static_cast<int>(candidates.size()), device, launch);
  launch(chosen);
  return {out, lse};
}

// ---- Meta: shapes and dtypes only, for torch.compile's fake tensors ----

std::tuple<Tensor, Tensor> attention_forward_aot_meta(const Tensor& q, const Tensor&, const Tensor&, double, int64_t,
                                                      int64_t) {
  return {at::empty(q.sizes(), q.options()),
          at::empty({q.size(0), q.size(2), q.size(1)}, q.options().dtype(at::kFloat))};
}

}  // namespace

TORCH_LIBRARY_IMPL(fasttrain, CUDA, m) { m.impl("attention_forward_aot", &attention_forward_aot); }

TORCH_LIBRARY_IMPL(fasttrain, CPU, m) { m.impl("attention_forward_aot", &attention_forward_aot); }

TORCH_LIBRARY_IMPL(fasttrain, Meta, m) { m.impl("attention_forward_aot", &attention_forward_aot_meta); }

}  // namespace fasttrain
