// The schemas of every torch.ops.fasttrain op. Kernels register implementations per dispatch key in their own
// files (TORCH_LIBRARY_IMPL(fasttrain, CPU / CUDA, m)); other op families add their schemas here.
#include <torch/library.h>

TORCH_LIBRARY(fasttrain, m) {
  // One AdamW step over one (device, dtype) group, in place. steps are incremented unless found_inf > 0.
  // lr_tensor, when given, replaces lr (read on the device); grad_scale is GradScaler's scale (grads are divided by
  // it); grad_norm with max_grad_norm > 0 clips by min(1, max_grad_norm / (grad_norm / grad_scale + 1e-6)).
  m.def(
      "adamw_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] steps, Tensor? lr_tensor, float lr, float beta1, float beta2, "
      "float eps, float weight_decay, bool amsgrad, bool maximize, Tensor? grad_scale, Tensor? found_inf, "
      "Tensor? grad_norm, float max_grad_norm) -> ()");
  // Sum of squares of every element of every grad, as a float32 scalar tensor on the grads' device.
  m.def("adamw_grad_sumsq(Tensor[] grads) -> Tensor");
  // Attention in flash-attn's layout ((B, T, H, D), or packed (total, H, D) with cu_seqlens): query i of a sequence
  // sees keys j with -left <= j - i - (Tk - Tq) <= right. Returns out in q's dtype and a float32 lse,
  // (B, H, Tq) or (H, total_q). The backward recomputes the probabilities from lse; dlse is lse's gradient.
  // dropout_p > 0 drops probabilities by the mask of dropout_seed (int64 (2,): seed, offset), the same in both.
  // softcap > 0 caps the scaled scores at softcap * tanh(s / softcap); alibi_slopes (float32 (H,) or (B, H)) adds
  // -slope * |i + Tk - Tq - j| after it (flash-attn's order).
  m.def(
      "attention_forward_cpu(Tensor q, Tensor k, Tensor v, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, "
      "float scale, int left, int right, float dropout_p=0., Tensor? dropout_seed=None, float softcap=0., "
      "Tensor? alibi_slopes=None) -> (Tensor, Tensor)");
  m.def(
      "attention_backward_cpu(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? dlse, "
      "Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, float scale, int left, int right, float dropout_p=0., "
      "Tensor? dropout_seed=None, float softcap=0., Tensor? alibi_slopes=None) -> (Tensor, Tensor, Tensor)");
  // The same attention against a KV cache (B_cache, Tmax, Hkv, D) that already holds the new rows: sequence b reads
  // cache row cache_batch_idx[b] (or b), keys [cache_leftpad[b] (or 0), cache_lengths[b]) clamped to Tmax; its Tq
  // queries are its last positions. Returns out (B, Tq, H, D) and a float32 lse (B, H, Tq).
  m.def(
      "attention_kvcache_cpu(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_lengths, "
      "Tensor? cache_batch_idx, Tensor? cache_leftpad, float scale, int left, int right, float softcap, "
      "Tensor? alibi_slopes) -> (Tensor, Tensor)");
  // GELU with the tanh approximation, y = x / 2 * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 x^3))), and its gradient
  // (grad_x from the output's gradient and x). Contiguous float32, bfloat16 or float16, computed in fp32.
  m.def("gelu_tanh_cpu(Tensor x) -> Tensor");
  m.def("gelu_tanh_backward_cpu(Tensor grad, Tensor x) -> Tensor");
  // The gated MLP's activation: out = act(gate) * up, act SiLU or (gelu) GELU's tanh approximation, and its gradients
  // (grad_gate, grad_up) from the output's gradient. Contiguous float32, bfloat16 or float16 of one shape, in fp32.
  m.def("swiglu_cpu(Tensor gate, Tensor up, bool gelu) -> Tensor");
  m.def("swiglu_backward_cpu(Tensor grad, Tensor gate, Tensor up, bool gelu) -> (Tensor, Tensor)");
  // Rotary embedding of x (B, T, H, D), unit stride along D: pairs (i, i + R/2), or (2i, 2i + 1) when interleaved,
  // R = 2 * cos.size(-1), rotated by the angles of cos/sin row t + offset (+ offsets[b]) of a (T_ro, R/2) table, or
  // row (b, t) of a (B, T, R/2) one; conjugate rotates by the opposite angle (the backward). Float32, bfloat16 or
  // float16 x, computed in fp32; out of place (a contiguous result) or in place.
  m.def(
      "rotary_cpu(Tensor x, Tensor cos, Tensor sin, Tensor? offsets, int offset, bool interleaved, bool conjugate) "
      "-> Tensor");
  m.def("rotary_cpu_(Tensor(a!) x, Tensor cos, Tensor sin, Tensor? offsets, int offset, bool interleaved) -> ()");
  // LayerNorm / RMSNorm over rows (M, N) of one dtype, with the residual add optionally fused, from the norms' Triton
  // kernels compiled ahead of time (norms_aot.cpp): fasttrain/ops/norms.py's forward and backward, the same outputs
  // (y, s = x + residual or empty, mean (empty for RMSNorm), rstd) and (dx, empty, dw or empty, db or empty).
  m.def(
      "norm_forward_aot(Tensor x, Tensor? residual, Tensor? weight, Tensor? bias, float eps, bool is_rms, "
      "ScalarType out_dtype) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "norm_backward_aot(Tensor dy, Tensor x, Tensor? weight, Tensor mean, Tensor rstd, bool is_rms, bool has_bias, "
      "Tensor? dres, ScalarType? dx2_dtype) -> (Tensor, Tensor, Tensor, Tensor)");
  // rotary_cpu and rotary_cpu_ from the rotary Triton kernel compiled ahead of time (rotary_aot.cpp), for CUDA x of
  // unit stride along D; the out-of-place op has its autograd (the same op with conjugate flipped).
  m.def(
      "rotary_aot(Tensor x, Tensor cos, Tensor sin, Tensor? offsets, int offset, bool interleaved, bool conjugate) "
      "-> Tensor");
  m.def("rotary_aot_(Tensor(a!) x, Tensor cos, Tensor sin, Tensor? offsets, int offset, bool interleaved) -> ()");
  // Cross-entropy over logits (N, V) and int64 targets (N,) from the Triton kernels compiled ahead of time
  // (cross_entropy_aot.cpp): fasttrain/ops/cross_entropy.py's forward (loss float32, (N,) per row with an ignored
  // row's 0, or reduced to a scalar by "sum" or "mean"; lse (N,) float32) and backward (d loss / d logits (N, V) in the
  // logits' dtype, from the per-row gradient grad_row).
  m.def(
      "cross_entropy_forward_aot(Tensor logits, Tensor target, int ignore_index, str reduction=\"none\") "
      "-> (Tensor, Tensor)");
  m.def(
      "cross_entropy_backward_aot(Tensor grad_row, Tensor logits, Tensor target, Tensor lse, int ignore_index) "
      "-> Tensor");
  // flash_attn_with_kvcache's common call from the decode kernels compiled ahead of time (decode_aot.cpp): k/v (if
  // given) appended at rows cache_seqlens.. of the caches in place, then out (B, Tq, H, D) in q's dtype and a float32
  // lse (B, H, Tq), as fasttrain/ops/decode.py's triton column. num_splits 0 picks the split count.
  m.def(
      "decode_aot(Tensor q, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor? k, Tensor? v, Tensor cache_seqlens, "
      "Tensor? cache_leftpad, float softmax_scale, int window_left, int window_right, int num_splits) "
      "-> (Tensor, Tensor)");
  // flash_attn_func's common forward from the attention kernel compiled ahead of time (attention_aot.cpp): q (B, Tq, H,
  // D), k and v (B, Tk, Hkv, D), query i seeing keys j with Tk - Tq - left <= j - i <= Tk - Tq + right; out (B, Tq, H,
  // D) in q's dtype and a float32 lse (B, H, Tq), as fasttrain/ops/attention.py's triton column. dropout_p > 0 drops
  // the mask of seed, the int64 (2,) (seed, offset) tensor on q's device (kernels/_attention_dropout.py); trailing
  // and defaulted, so that a call without dropout reads as before.
  m.def(
      "attention_forward_aot(Tensor q, Tensor k, Tensor v, float scale, int left, int right, float dropout_p=0., "
      "Tensor? seed=None) -> (Tensor, Tensor)");
  // The attention backward of flash_attn_func's common call from the Triton kernels compiled ahead of time
  // (attention_backward_aot.cpp): (dq, dk, dv) shaped like q, k, v, as kernels/attention_backward.py gives them for
  // dense inputs, no softcap or ALiBi; deterministic takes the dQ kernel rather than atomics; dropout_p and seed the
  // forward's, whose mask the kernels regenerate; dlse lse's gradient (shaped like lse, float32) or None.
  m.def(
      "attention_backward_aot(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, float scale, "
      "int left, int right, bool deterministic, float dropout_p=0., Tensor? seed=None, Tensor? dlse=None) "
      "-> (Tensor, Tensor, Tensor)");
  // The two above as one op with its autograd in C++ (attention_aot_autograd.cpp): out (B, Tq, H, D) of
  // attention_forward_aot, and in the backward attention_backward_aot's gradients of q, k and v; dropout_p and seed
  // passed to both.
  m.def(
      "attention_aot(Tensor q, Tensor k, Tensor v, float scale, int left, int right, bool deterministic, "
      "float dropout_p=0., Tensor? seed=None) -> Tensor");
  // The same for the packed functions (attention_aot_autograd.cpp): q, k and v views of qkv (B, T, 3, H, D), or q
  // and views of kv (B, Tk, 2, Hkv, D); the backward writes into views of one packed gradient per input.
  m.def(
      "attention_aot_packed(Tensor q_src, Tensor? kv_src, float scale, int left, int right, bool deterministic) "
      "-> Tensor");
  // attention_aot and attention_aot_packed for packed sequences (flash_attn_varlen_func and the varlen packed
  // functions): the varlen forward and backward ops below with the offsets and longest sequences as given.
  m.def(
      "attention_aot_varlen(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
      "int max_seqlen_q, int max_seqlen_k, float scale, int left, int right, bool deterministic, "
      "float dropout_p=0., Tensor? seed=None) -> Tensor");
  m.def(
      "attention_aot_varlen_packed(Tensor q_src, Tensor? kv_src, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
      "int max_seqlen_q, int max_seqlen_k, float scale, int left, int right, bool deterministic) -> Tensor");
  // attention_forward_aot and attention_backward_aot for packed sequences (flash_attn_varlen_func): q (total_q, H,
  // D), k and v (total_k, Hkv, D), int32 offsets (B + 1) of each and the longest sequences; lse (H, total_q). Ops of
  // their own, as flash-attn's, so that the dense ops' schemas stay as they are.
  m.def(
      "attention_varlen_forward_aot(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
      "int max_seqlen_q, int max_seqlen_k, float scale, int left, int right, float dropout_p=0., Tensor? seed=None) "
      "-> (Tensor, Tensor)");
  m.def(
      "attention_varlen_backward_aot(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, float scale, int left, "
      "int right, bool deterministic, float dropout_p=0., Tensor? seed=None, Tensor? dlse=None) "
      "-> (Tensor, Tensor, Tensor)");
  // The two backwards written into dq, dk and dv (shaped like q, k and v, any strides: the packed functions' views of
  // one packed gradient), as kernels/attention_backward.py `attention_backward` with `into`.
  m.def(
      "attention_backward_into_aot(Tensor(a!) dq, Tensor(b!) dk, Tensor(c!) dv, Tensor dout, Tensor q, Tensor k, "
      "Tensor v, Tensor out, Tensor lse, float scale, int left, int right, bool deterministic, float dropout_p=0., "
      "Tensor? seed=None, Tensor? dlse=None) -> ()");
  m.def(
      "attention_varlen_backward_into_aot(Tensor(a!) dq, Tensor(b!) dk, Tensor(c!) dv, Tensor dout, Tensor q, "
      "Tensor k, Tensor v, Tensor out, Tensor lse, Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, "
      "int max_seqlen_k, float scale, int left, int right, bool deterministic, float dropout_p=0., "
      "Tensor? seed=None, Tensor? dlse=None) -> ()");
}
