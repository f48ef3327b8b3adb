"""flash-attn's packed attention functions: q, k and v stacked in one tensor (`qkv`), or k and v (`kv`).

The kernels read q, k and v as strided views of the packed tensor, and the backward writes dq, dk and dv into views
of one packed gradient, so no concatenation happens either way (the Triton kernels and the aot ops write the views
directly; the CPU kernel and the reference copy their gradients in). Semantics, arguments and returns are
flash-attn's; masks, GQA, backends and lse_grad (softmax_lse's gradient ignored, as flash-attn ignores it, unless
lse_grad=True) as in fasttrain.ops.flash_attn_func / flash_attn_varlen_func. Their common calls take a short path as
flash_attn_func's and flash_attn_varlen_func's do (`_packed_short`, `_varlen_packed_short`).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from fasttrain import _backend
from fasttrain._backend import ArgumentError, ArgumentTypeError
from fasttrain.ops.attention import (
    _AOT_OP,
    _AOT_VARLEN_OP,
    ATTENTION,
    _backward_into_op,
    _check_lse_grad,
    _flash_band,
    _forward_op,
    _short_scale,
    _short_varlen_scale,
    _varlen_backward_unshipped,
    _varlen_flash_lse,
    attn_probs,
    flash_lse,
    returned_lse,
)
from fasttrain.ops.attention_checks import (
    _check_alibi,
    _check_dropout,
    _check_qkv,
    _check_softcap,
    _check_varlen,
    _scale,
    _window,
)
from fasttrain.ops.attention_dropout import dropout_seed


def _split(q_src: Tensor, kv_src: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """(q, k, v) views: of qkv (..., 3, H, D) when kv_src is None, else q_src and kv_src (..., 2, Hkv, D)."""
    return q_src.unbind(-3) if kv_src is None else (q_src, *kv_src.unbind(-3))


class _PackedAttention(torch.autograd.Function):
    """The attention op over views of packed inputs, its backward into views of packed gradients."""

    @staticmethod
    def forward(ctx, q_src, kv_src, cu_q, cu_k, max_q, max_k, scale, left, right, dropout_p, seed, deterministic,
                backend, softcap, alibi, lse_grad):  # fmt: skip
        q, k, v = _split(q_src, kv_src)
        name = ATTENTION.choose(q, k, v, cu_q, max_q, max_k, None, dropout_p, softcap, alibi, backend=backend)
        args = (cu_q, cu_k, max_q, max_k, scale, left, right)
        out, lse = _forward_op(q, k, v, *args, None, dropout_p, seed, softcap, alibi, deterministic, name)
        ctx.save_for_backward(q_src, kv_src, out, lse, cu_q, cu_k, seed, alibi)
        ctx.args, ctx.dropout_p, ctx.deterministic, ctx.backend = args, dropout_p, deterministic, name
        ctx.softcap, ctx.lse_grad = softcap, lse_grad
        ctx.set_materialize_grads(False)  # an lse nobody differentiates gives dlse None: no zeros made or read
        return out, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, dlse):
        q_src, kv_src, out, lse, cu_q, cu_k, seed, alibi = ctx.saved_tensors
        # an lse whose gradient is ignored (lse_grad False, or not returned) reads no dlse, though torch.compile's
        # AOTAutograd hands zeros (set_materialize_grads does not survive its trace): the kernels' column without one
        dlse = dlse if ctx.lse_grad else None
        grads = (torch.empty_like(q_src), None if kv_src is None else torch.empty_like(kv_src))
        dq, dk, dv = _split(*grads)
        q, k, v = _split(q_src, kv_src)
        dout = torch.zeros_like(out) if dout is None else dout
        deterministic = ctx.deterministic or torch.are_deterministic_algorithms_enabled()
        args = (*ctx.args, ctx.dropout_p, seed, ctx.softcap, alibi, deterministic, ctx.backend)
        _backward_into_op(dq, dk, dv, dout, q, k, v, out, lse, dlse, *args)
        return *grads, *(None,) * 14  # the slopes take no gradient, as in flash-attn


# forward and backward in one C++ op with its autograd in C++ (csrc/attention_aot_autograd.cpp attention_aot_packed)
_AOT_PACKED_OP = (
    torch.ops.fasttrain.attention_aot_packed.default
    if _AOT_OP is not None and _backend.native_op_reason("attention_aot_packed") is None
    else None
)


def _short_views(q_src, kv_src, rank: int) -> tuple[Tensor, Tensor, Tensor] | None:
    """`_split`'s (q, k, v) views for the short paths: the packed tensor (qkv, or kv when kv_src is given) of `rank`
    dims with 3 (or 2) along axis -3, else None (the general path checks and raises)."""
    packed, n = (q_src, 3) if kv_src is None else (kv_src, 2)
    if type(q_src) is not Tensor or type(packed) is not Tensor or packed.dim() != rank or packed.shape[-3] != n:
        return None
    return _split(q_src, kv_src)


def _packed_short(q_src, kv_src, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic):
    """out of flash_attn_qkvpacked_func (kv_src None: q_src is qkv (B, T, 3, H, D)) or flash_attn_kvpacked_func (q_src
    q, kv_src kv (B, Tk, 2, Hkv, D)) from the aot ops, for a call that the general path (`_packed`) would send to the
    aot column as it is (fasttrain.ops.attention `_flash_band`, `_short_scale` of the views), else None. The same
    launches, forward and backward (the gradients written into views of the packed gradients), and once
    differentiable alike (tests/test_attention_short_path.py)."""
    if _AOT_PACKED_OP is None or (band := _flash_band(dropout_p, causal, window_size, softcap, alibi_slopes)) is None:
        return None
    if (views := _short_views(q_src, kv_src, 5)) is None:
        return None
    if (scale := _short_scale(*views, softmax_scale)) is None:
        return None
    return _AOT_PACKED_OP(q_src, kv_src, scale, *band, bool(deterministic))


# the same for packed sequences (attention_aot_varlen_packed)
_AOT_VARLEN_PACKED_OP = (
    torch.ops.fasttrain.attention_aot_varlen_packed.default
    if _AOT_VARLEN_OP is not None
    and _AOT_PACKED_OP is not None
    and _backend.native_op_reason("attention_varlen_backward_into_aot") is None
    and _backend.native_op_reason("attention_aot_varlen_packed") is None
    else None
)


def _varlen_packed_short(q_src, kv_src, cu_q, cu_k, max_q, max_k, dropout_p, softmax_scale, causal, window_size,
                         softcap, alibi_slopes, deterministic):  # fmt: skip
    """`_packed_short` for the varlen packed functions: qkv (total, 3, H, D) (kv_src None), or q (total_q, H, D) and
    kv (total_k, 2, Hkv, D), with the offsets and longest sequences as fasttrain.ops.attention `_short_varlen_scale`
    takes them, where its backward's cubins ship."""
    band = _flash_band(dropout_p, causal, window_size, softcap, alibi_slopes)
    if _AOT_VARLEN_PACKED_OP is None or band is None or (views := _short_views(q_src, kv_src, 4)) is None:
        return None
    if (scale := _short_varlen_scale(*views, cu_q, cu_k, max_q, max_k, softmax_scale)) is None:
        return None
    if _varlen_backward_unshipped(views[0], 0.0):  # no dropout here
        return None
    return _AOT_VARLEN_PACKED_OP(q_src, kv_src, cu_q, cu_k, max_q, max_k, scale, *band, bool(deterministic))


def _check_packed(packed: Tensor, name: str, rank: int, n: int, layout: str) -> Tensor:
    """packed (rank-D, n tensors along axis -3), with unit stride along head_dim (what the kernels need of each
    view)."""
    if not isinstance(packed, Tensor):
        raise ArgumentTypeError(f"{name} must be a torch.Tensor, got {type(packed).__name__}")
    if packed.dim() != rank or packed.shape[-3] != n:
        raise ArgumentError(f"{name} must be {layout}, got shape {tuple(packed.shape)}")
    return packed if packed.stride(-1) == 1 else packed.contiguous()


def _packed(q_src, kv_src, cu_q, cu_k, max_q, max_k, dropout_p, softmax_scale, causal, window_size, softcap,
            alibi_slopes, deterministic, return_attn_probs, backend, lse_grad):  # fmt: skip
    """max_q and max_k: None for (B, T, ...) inputs (their T)."""
    softcap, lse_grad = _check_softcap(softcap), _check_lse_grad(lse_grad)
    if kv_src is not None:
        if not isinstance(q_src, Tensor):
            raise ArgumentTypeError(f"q must be a torch.Tensor, got {type(q_src).__name__}")
        q_src = q_src if q_src.stride(-1) == 1 else q_src.contiguous()  # the kernels need unit stride on head_dim
    q, k, v = _split(q_src, kv_src)
    rank, layout = (3, "(total, H, D)") if cu_q is not None else (4, "(B, T, H, D)")
    _check_qkv(q, k, v, rank, layout)
    if cu_q is not None:
        cu_q, cu_k = _check_varlen(q, k, cu_q, cu_k, max_q, max_k)
    else:
        max_q, max_k = q.shape[1], k.shape[1]
    batch = q.shape[0] if cu_q is None else cu_q.numel() - 1
    alibi_slopes = _check_alibi(alibi_slopes, batch, q.shape[-2], q.device)
    scale, (left, right) = _scale(softmax_scale, q.shape[-1]), _window(causal, window_size)
    dropout_p = _check_dropout(dropout_p)
    seed = dropout_seed(q.device) if dropout_p > 0.0 else None  # every backend's mask; the backward reads it again
    args = (cu_q, cu_k, max_q, max_k, scale, left, right, float(dropout_p), seed, bool(deterministic), backend)
    args = (*args, softcap, alibi_slopes, lse_grad and bool(return_attn_probs))
    out, lse = _PackedAttention.apply(q_src, kv_src, *args)
    if not return_attn_probs:
        return out
    probs = attn_probs(q, k, seed, dropout_p, scale, left, right, cu_q, cu_k, max_q, max_k, softcap, alibi_slopes)
    if cu_q is not None:
        lse = _varlen_flash_lse(lse, alibi_slopes, left, right, max_k, cu_q, cu_k)
        return out, returned_lse(lse, lse_grad), probs
    shift = torch.arange(max_q, device=q.device)[None] + (max_k - max_q)  # (1, Tq)
    return out, returned_lse(flash_lse(lse, alibi_slopes, left, right, max_k, shift), lse_grad), probs


def flash_attn_qkvpacked_func(
    qkv: Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    *,
    backend: str | None = None,
    lse_grad: bool = False,
):
    """flash-attn's `flash_attn_qkvpacked_func`: qkv (B, T, 3, H, D) -> out (B, T, H, D), or (out, softmax_lse
    (B, H, T), S_dmask) with return_attn_probs. Arguments as in `flash_attn_func`."""
    if backend is None and not return_attn_probs and type(lse_grad) is bool:
        out = _packed_short(qkv, None, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                            deterministic)  # fmt: skip
        if out is not None:
            return out
    qkv = _check_packed(qkv, "qkv", 5, 3, "(B, T, 3, H, D)")
    return _packed(qkv, None, None, None, None, None, dropout_p, softmax_scale, causal, window_size, softcap,
                   alibi_slopes, deterministic, return_attn_probs, backend, lse_grad)  # fmt: skip


def flash_attn_kvpacked_func(
    q: Tensor,
    kv: Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    *,
    backend: str | None = None,
    lse_grad: bool = False,
):
    """flash-attn's `flash_attn_kvpacked_func`: q (B, Tq, H, D), kv (B, Tk, 2, Hkv, D) -> out (B, Tq, H, D), or
    (out, softmax_lse (B, H, Tq), S_dmask) with return_attn_probs. Arguments as in `flash_attn_func`."""
    if backend is None and not return_attn_probs and type(lse_grad) is bool:
        out = _packed_short(q, kv, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic)
        if out is not None:
            return out
    kv = _check_packed(kv, "kv", 5, 2, "(B, Tk, 2, Hkv, D)")
    return _packed(q, kv, None, None, None, None, dropout_p, softmax_scale, causal, window_size,
                   softcap, alibi_slopes, deterministic, return_attn_probs, backend, lse_grad)  # fmt: skip


def flash_attn_varlen_qkvpacked_func(
    qkv: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    *,
    backend: str | None = None,
    lse_grad: bool = False,
):
    """flash-attn's `flash_attn_varlen_qkvpacked_func`: qkv (total, 3, H, D) with cu_seqlens (B + 1,) int32 offsets
    for queries and keys alike -> out (total, H, D), or (out, softmax_lse (H, total), S_dmask) with return_attn_probs.
    Arguments as in `flash_attn_varlen_func`."""
    if backend is None and not return_attn_probs and type(lse_grad) is bool:
        args = (cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p, softmax_scale, causal, window_size)
        out = _varlen_packed_short(qkv, None, *args, softcap, alibi_slopes, deterministic)
        if out is not None:
            return out
    qkv = _check_packed(qkv, "qkv", 4, 3, "(total, 3, H, D)")
    return _packed(qkv, None, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p, softmax_scale, causal,
                   window_size, softcap, alibi_slopes, deterministic, return_attn_probs, backend, lse_grad)  # fmt: skip


def flash_attn_varlen_kvpacked_func(
    q: Tensor,
    kv: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    *,
    backend: str | None = None,
    lse_grad: bool = False,
):
    """flash-attn's `flash_attn_varlen_kvpacked_func`: q (total_q, H, D), kv (total_k, 2, Hkv, D) -> out
    (total_q, H, D), or (out, softmax_lse (H, total_q), S_dmask) with return_attn_probs. Arguments as in
    `flash_attn_varlen_func`."""
    if backend is None and not return_attn_probs and type(lse_grad) is bool:
        args = (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal, window_size)
        out = _varlen_packed_short(q, kv, *args, softcap, alibi_slopes, deterministic)
        if out is not None:
            return out
    kv = _check_packed(kv, "kv", 4, 2, "(total_k, 2, Hkv, D)")
    return _packed(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal,
                   window_size, softcap, alibi_slopes, deterministic, return_attn_probs, backend, lse_grad)  # fmt: skip
