"""Fused attention: flash-attn's `flash_attn_func` / `flash_attn_varlen_func` and torch's
`scaled_dot_product_attention` over one registered op.

Backends: `aot` (the kernels compiled ahead of time and launched from C++, csrc/attention_aot.cpp and
attention_backward_aot.cpp, for flash_attn_func's and flash_attn_varlen_func's common calls, which skip the general
checks and choice too, `_aot_short` and `_varlen_short`, straight to one C++ op with its autograd in C++), `triton`
(kernels/attention*.py: CUDA fp16/bf16; CPU tensors under TRITON_INTERPRET=1), `cpu`
(csrc/attention_cpu.cpp: CPU tensors in fp32, bf16 or fp16, computed in fp32) and `reference`
(fasttrain/ops/attention_reference.py: plain PyTorch, any device and dtype, and the only one with an `attn_mask`).
Attention dropout draws the same mask on every backend: a pure function of an int64 (2,) seed tensor on q's device
(fasttrain/ops/attention_dropout.py), which the backward reads again.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fasttrain import _backend
from fasttrain._backend import ArgumentError, ArgumentTypeError
from fasttrain.ops._op import custom_op, reference_gradients
from fasttrain.ops.attention_checks import (
    _check_alibi,
    _check_dropout,
    _check_qkv,
    _check_softcap,
    _check_varlen,
    _keys_from_pages,
    _known_longest,
    _scale,
    _window,
    _window_side,
)
from fasttrain.ops.attention_dropout import dropout_seed
from fasttrain.ops.attention_masks import Segments, kernel_plan
from fasttrain.ops.attention_reference import (
    UNBOUNDED,
    attention_reference,
    attention_reference_backward,
    lse_dtype,
    s_dmask,
)

HEAD_DIMS = (32, 64, 96, 128, 256)
_KERNEL_DTYPES_CUDA = (torch.float16, torch.bfloat16)
GRID_YZ_MAX = 65535  # CUDA's limit on a grid's y and z axes (the kernels put H and B there)


# ---- the backends: what each computes -------------------------------------------------------------------------------
# forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, left, right, attn_mask, dropout_p,
#   dropout_seed, softcap, alibi_slopes) -> (out, lse); backward(do, q, k, v, out, lse, dlse, the forward's arguments
#   from cu_seqlens_q, deterministic, into) -> (dq, dk, dv), written into `into` (three tensors shaped like q, k, v:
#   views of one packed gradient) when it is given. The kernels serve no attn_mask (their reasons say so).


def _written(grads, into):
    """grads as they are, or copied into the given tensors (a backend that cannot write into views)."""
    if into is None:
        return tuple(g.contiguous() for g in grads)
    return tuple(dst.copy_(g) for dst, g in zip(into, grads))


class Reference:
    @staticmethod
    def forward(q, k, v, cu_q, cu_k, max_q, max_k, scale, left, right, attn_mask, dropout_p, seed, softcap, alibi):
        args = (cu_q, cu_k, attn_mask, dropout_p, seed, softcap, alibi)
        out, lse = attention_reference(q, k, v, scale, left, right, *args)
        return out.contiguous(), lse.contiguous()  # fresh tensors: a custom op may not return views of its inputs

    @staticmethod
    def backward(
        do, q, k, v, out, lse, dlse, cu_q, cu_k, max_q, max_k, scale, left, right, mask, p, seed, cap, alibi, det, into
    ):
        args = (scale, left, right, cu_q, cu_k, mask, p, seed, cap, alibi)
        grads = attention_reference_backward(do, q, k, v, out, lse, dlse, *args)
        return _written(grads, into)

    @staticmethod
    def traced(
        q, k, v, cu_q, cu_k, max_q, max_k, scale, left, right, attn_mask, dropout_p, seed, softcap, alibi, deterministic
    ):
        """What a torch.compile trace records for the reference backend: its plain torch ops, inline, dropout
        included (the seed's mask, as every backend draws it: plain tensor ops on the seed tensor, which autograd
        keeps for the backward); packed sequences, whose offsets it would read on the host, keep the registered op."""
        if cu_q is not None:
            args = (cu_q, cu_k, max_q, max_k, scale, left, right, attn_mask, dropout_p, seed, softcap, alibi)
            return _forward_op.op(q, k, v, *args, deterministic, "reference")
        return attention_reference(q, k, v, scale, left, right, None, None, attn_mask, dropout_p, seed, softcap, alibi)


class Triton:
    @staticmethod
    def forward(q, k, v, cu_q, cu_k, max_q, max_k, scale, left, right, attn_mask, dropout_p, seed, softcap, alibi):
        return _backend.kernels("attention").attention_forward(
            q, k, v, cu_q, cu_k, max_q, max_k, scale, left, right, dropout_p, seed, softcap, alibi
        )

    @staticmethod
    def backward(
        do, q, k, v, out, lse, dlse, cu_q, cu_k, max_q, max_k, scale, left, right, mask, p, seed, cap, alibi, det, into
    ):
        return _backend.kernels("attention_backward").attention_backward(
            do, q, k, v, out, lse, dlse, cu_q, cu_k, max_q, max_k, scale, left, right, det, into, p, seed, cap, alibi
        )


class Aot:
    """csrc/attention_aot.cpp: kernels/attention.py's forward launched from C++, for the calls _aot_reason lets
    through (dense or packed, with or without dropout; no softcap, ALiBi or mask: the ops take q, k, v, the packed
    offsets, scale, the window, dropout_p and the seed); the backward likewise from csrc/attention_backward_aot.cpp."""

    @staticmethod
    def forward(q, k, v, cu_q, cu_k, max_q, max_k, scale, left, right, attn_mask, dropout_p, seed, softcap, alibi):
        # a caller that chose without passing the score modifiers to the reason must not get them silently dropped
        if attn_mask is not None or softcap > 0.0 or alibi is not None:
            raise RuntimeError("attention: the aot column takes no mask, softcap or ALiBi")
        if cu_q is not None:
            args = (cu_q, cu_k, max_q, max_k, scale, left, right, dropout_p, seed)
            return torch.ops.fasttrain.attention_varlen_forward_aot(q, k, v, *args)
        return torch.ops.fasttrain.attention_forward_aot(q, k, v, scale, left, right, dropout_p, seed)

    @staticmethod
    def backward(
        do, q, k, v, out, lse, dlse, cu_q, cu_k, max_q, max_k, scale, left, right, mask, p, seed, cap, alibi, det, into
    ):
        """The C++ backward for what the forward took, with lse's gradient when it has one, written into `into` (the
        packed functions' gradient views: the _into ops, which write them in place where their layout is the cubins'
        and copy in elsewhere), but a dO whose strides the op cannot pass or a packed dropout backward whose cubins do
        not ship (_varlen_backward_unshipped): those take the triton column's."""
        unshipped = cu_q is not None and _varlen_backward_unshipped(q, p)
        if not unshipped and _AOT_BACKWARD_OP_REASON is None and _stride_reason("dO", do) is None:
            tail = (det, p, seed, dlse)
            if into is not None:
                if cu_q is not None:
                    args = (cu_q, cu_k, max_q, max_k, scale, left, right, *tail)
                    torch.ops.fasttrain.attention_varlen_backward_into_aot(*into, do, q, k, v, out, lse, *args)
                else:
                    args = (scale, left, right, *tail)
                    torch.ops.fasttrain.attention_backward_into_aot(*into, do, q, k, v, out, lse, *args)
                return into
            if cu_q is not None:
                args = (cu_q, cu_k, max_q, max_k, scale, left, right, *tail)
                return torch.ops.fasttrain.attention_varlen_backward_aot(do, q, k, v, out, lse, *args)
            return torch.ops.fasttrain.attention_backward_aot(do, q, k, v, out, lse, scale, left, right, *tail)
        args = (cu_q, cu_k, max_q, max_k, scale, left, right, mask, p, seed, cap, alibi, det, into)
        return Triton.backward(do, q, k, v, out, lse, dlse, *args)


class Cpu:
    @staticmethod
    def forward(q, k, v, cu_q, cu_k, max_q, max_k, scale, left, right, attn_mask, dropout_p, seed, softcap, alibi):
        args = (scale, left, right, dropout_p, seed, softcap, alibi)
        return torch.ops.fasttrain.attention_forward_cpu(q, k, v, cu_q, cu_k, *args)

    @staticmethod
    def backward(
        do, q, k, v, out, lse, dlse, cu_q, cu_k, max_q, max_k, scale, left, right, mask, p, seed, cap, alibi, det, into
    ):
        args = (scale, left, right, p, seed, cap, alibi)
        grads = torch.ops.fasttrain.attention_backward_cpu(do, q, k, v, out, lse, dlse, cu_q, cu_k, *args)
        return _written(grads, into)


# ---- the table: which backend can serve which inputs ----------------------------------------------------------------
# Each reason takes (q, k, v, cu_seqlens_q, max_seqlen_q, max_seqlen_k, attn_mask, dropout_p, softcap,
# alibi_slopes); only the aot column reads the score modifiers, but every caller passes them, so none is dropped.

# Read once, at import: under torch.compile, Dynamo traces the choice but cannot trace the extension's import.
_CPU_OP_REASON = _backend.native_op_reason("attention_forward_cpu")
_AOT_OP_REASON = _backend.native_op_reason("attention_forward_aot")
_AOT_BACKWARD_OP_REASON = _backend.native_op_reason("attention_backward_aot") or _backend.native_op_reason(
    "attention_backward_into_aot"
)
_AOT_VARLEN_OP_REASON = _backend.native_op_reason("attention_varlen_forward_aot")
# What kernels/attention.py aot_kernels(shipped=True) lists (not read from there: that would import Triton).
_AOT_HEAD_DIMS = (64, 96, 128, 256)
_AOT_GROUPS = (1, 2, 4, 8)
_AOT_DROPOUT_HEAD_DIMS = (64, 128)  # SHIPPED_DROPOUT_HEAD_DIMS: dropout's cubins
# (arch, head dim) whose packed dropout backward ships no cubins (kernels/attention_backward.py _shipped): the plain
# dK/dV tile that takes dropout spills there (kernels/_attention_configs.py _SPILL_VARLEN_DROPOUT_DKDV).
_AOT_UNSHIPPED_VARLEN_DROPOUT = {(90, 128)}
# (arch, head dim) whose packed backward ships no cubins at all: its one dQ tile spills packed
# (kernels/_attention_configs.py _SPILL_VARLEN_DQ).
_AOT_UNSHIPPED_VARLEN = {(90, 256)}
_MASK = "an attn_mask is not implemented in the kernels"


def _varlen_backward_unshipped(q: Tensor, dropout_p: float) -> bool:
    """Whether no cubins ship for the packed backward of q's head dim on its device's arch (with dropout_p > 0)."""
    shipped = (_backend.aot_arch(q.device), q.shape[-1])
    return shipped in _AOT_UNSHIPPED_VARLEN or (dropout_p > 0.0 and shipped in _AOT_UNSHIPPED_VARLEN_DROPOUT)


def _unsupported(attn_mask: Tensor | None, dropout_p: float) -> str | None:
    """What no kernel implements."""
    return _MASK if attn_mask is not None else None


def _kernel_limit_reason(q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor | None, max_q: int, max_k: int) -> str | None:
    """What the kernels' launch cannot address. The grid is (query tiles, H, B): CUDA allows 65535 on its last two
    axes, and tiles of one head launch together (consecutive blocks share its K and V in L2). And they step through
    one sequence's rows with int32 offsets (int64 there cost registers and spills, kernels/attention_backward.py),
    counted in the given row stride or the contiguous one the backward may copy to."""
    n_seq = q.shape[0] if cu_q is None else cu_q.numel() - 1
    if n_seq > GRID_YZ_MAX:
        return f"{n_seq} sequences exceed the kernels' grid ({GRID_YZ_MAX} per launch, CUDA's limit)"
    if q.shape[-2] > GRID_YZ_MAX:
        return f"{q.shape[-2]} heads exceed the kernels' grid ({GRID_YZ_MAX} per launch, CUDA's limit)"
    for name, t, rows in (("q", q, max_q), ("k", k, max_k), ("v", v, max_k)):
        if rows * max(t.stride(-3), t.shape[-2] * t.shape[-1]) >= 2**31:
            return (
                f"{name}'s longest sequence ({rows} rows of {t.shape[-2]} x {t.shape[-1]}) spans 2**31 elements or "
                f"more, past the kernels' int32 row offsets"
            )
    return None


def _stride_reason(name: str, t: Tensor) -> str | None:
    """Why the aot ops cannot take t, or None: the cubins take int32 strides, and the ops pass t's own (rather than a
    contiguous copy's) when its layout is one the cubins were compiled for (unit stride along D, the others nonzero
    multiples of 16, an aligned start: csrc/attention_aot_common.h compiled_layout)."""
    strides = t.stride()
    if max(strides) < 2**31 or strides[-1] != 1 or t.storage_offset() % 8:
        return None  # fits, or copied contiguous (whose strides fit where _kernel_limit_reason lets the call through)
    if any(s == 0 or s % 16 for s in strides[:-1]):
        return None
    return f"{name}'s strides {tuple(strides)} reach 2**31, past the shipped attention cubins' int32 strides"


def _aot_reason(q, k, v, cu_q, max_q, max_k, attn_mask, dropout_p, softcap, alibi_slopes) -> str | None:
    """None for the calls whose forward ships (kernels/attention.py _shipped); else why the JIT serves them."""
    if (why := _backend.aot_reason(q.device)) is not None:
        return why
    if _AOT_OP_REASON is not None:
        return _AOT_OP_REASON
    if cu_q is not None and _AOT_VARLEN_OP_REASON is not None:
        return _AOT_VARLEN_OP_REASON
    if q.dtype not in _KERNEL_DTYPES_CUDA:
        return f"the shipped attention cubins take fp16 or bf16, got {q.dtype}"
    if q.shape[-1] not in _AOT_HEAD_DIMS:
        return f"the shipped attention cubins take head_dim {_AOT_HEAD_DIMS}, got {q.shape[-1]}"
    if dropout_p > 0.0 and q.shape[-1] not in _AOT_DROPOUT_HEAD_DIMS:
        return f"the shipped attention cubins take dropout at head_dim {_AOT_DROPOUT_HEAD_DIMS}, got {q.shape[-1]}"
    for name, given in (
        ("an attn_mask", attn_mask is not None),
        ("softcap", softcap > 0.0),
        ("alibi_slopes", alibi_slopes is not None),
    ):
        if given:
            return f"the shipped attention cubins do not take {name}"
    if q.shape[-2] % k.shape[-2] or q.shape[-2] // k.shape[-2] not in _AOT_GROUPS:
        return f"the shipped attention cubins take GQA groups {_AOT_GROUPS}, got {q.shape[-2]} / {k.shape[-2]} heads"
    if (why := _kernel_limit_reason(q, k, v, cu_q, max_q, max_k)) is not None:
        return why
    for name, t in (("q", q), ("k", k), ("v", v)):
        if (why := _stride_reason(name, t)) is not None:
            return why
    return None


def _triton_reason(q, k, v, cu_q, max_q, max_k, attn_mask, dropout_p, softcap, alibi_slopes) -> str | None:
    if (why := _unsupported(attn_mask, dropout_p) or _backend.triton_tensor_reason(q)) is not None:
        return why
    if q.device.type == "cuda" and q.dtype not in _KERNEL_DTYPES_CUDA:
        return f"the CUDA kernels take fp16/bf16, got {q.dtype}"
    if (why := _kernel_limit_reason(q, k, v, cu_q, max_q, max_k)) is not None:
        return why
    if q.shape[-1] not in HEAD_DIMS:
        return f"head_dim must be one of {HEAD_DIMS} for the kernels, got {q.shape[-1]}"
    return None


def _cpu_reason(q, k, v, cu_q, max_q, max_k, attn_mask, dropout_p, softcap, alibi_slopes) -> str | None:
    return _unsupported(attn_mask, dropout_p) or _backend.cpu_kernel_reason(q, _CPU_OP_REASON)


ATTENTION = _backend.Table(
    "attention",
    {
        "aot": _backend.Backend(_aot_reason, Aot, live=_backend.aot_live),
        "triton": _backend.Backend(_triton_reason, Triton, live=_backend.triton_live),
        "cpu": _backend.Backend(_cpu_reason, Cpu, live=lambda: _CPU_OP_REASON),
        "reference": _backend.Backend(_backend.always, Reference),
    },
)


# ---- the registered ops: one body for every backend, fake implementations, autograd --------------------------------


@custom_op("fasttrain::attention_forward", mutates_args=(), table=ATTENTION, reference=Reference.traced)
def _forward_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor | None,
    cu_seqlens_k: Tensor | None,
    max_seqlen_q: int,
    max_seqlen_k: int,
    scale: float,
    left: int,
    right: int,
    attn_mask: Tensor | None,
    dropout_p: float,
    dropout_seed: Tensor | None,
    softcap: float,
    alibi_slopes: Tensor | None,
    deterministic: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:
    # deterministic is the backward's (saved by _setup_context), as in flash-attn's autograd Function
    return ATTENTION[backend].forward(
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        scale,
        left,
        right,
        attn_mask,
        dropout_p,
        dropout_seed,
        softcap,
        alibi_slopes,
    )


@_forward_op.register_fake
def _(q, k, v, cu_seqlens_q, *args):
    H = q.shape[-2]
    lse_shape = (H, q.shape[0]) if cu_seqlens_q is not None else (q.shape[0], H, q.shape[1])
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(lse_shape, dtype=lse_dtype(q.dtype))


@custom_op("fasttrain::attention_backward", mutates_args=())
def _backward_op(
    do: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    dlse: Tensor | None,
    cu_seqlens_q: Tensor | None,
    cu_seqlens_k: Tensor | None,
    max_seqlen_q: int,
    max_seqlen_k: int,
    scale: float,
    left: int,
    right: int,
    attn_mask: Tensor | None,
    dropout_p: float,
    dropout_seed: Tensor | None,
    softcap: float,
    alibi_slopes: Tensor | None,
    deterministic: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    return ATTENTION[backend].backward(
        do,
        q,
        k,
        v,
        out,
        lse,
        dlse,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        scale,
        left,
        right,
        attn_mask,
        dropout_p,
        dropout_seed,
        softcap,
        alibi_slopes,
        deterministic,
        None,
    )


@_backward_op.register_fake
def _(do, q, k, v, *args):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


@custom_op("fasttrain::attention_backward_into", mutates_args=("dq", "dk", "dv"))
def _backward_into_op(
    dq: Tensor,
    dk: Tensor,
    dv: Tensor,
    do: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    dlse: Tensor | None,
    cu_seqlens_q: Tensor | None,
    cu_seqlens_k: Tensor | None,
    max_seqlen_q: int,
    max_seqlen_k: int,
    scale: float,
    left: int,
    right: int,
    dropout_p: float,
    dropout_seed: Tensor | None,
    softcap: float,
    alibi_slopes: Tensor | None,
    deterministic: bool,
    backend: str,
) -> None:
    """The backward written into dq, dk, dv (views of one packed gradient: the packed functions' backward)."""
    args = (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, left, right, None, dropout_p)
    extra = (dropout_seed, softcap, alibi_slopes, deterministic, (dq, dk, dv))
    ATTENTION[backend].backward(do, q, k, v, out, lse, dlse, *args, *extra)


@_backward_into_op.register_fake
def _(*args):
    return None


def _setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, scale, left, right, attn_mask, dropout_p, seed = inputs[:13]
    softcap, alibi_slopes, deterministic, backend = inputs[13:]
    ctx.save_for_backward(q, k, v, output[0], output[1], cu_q, cu_k, attn_mask, seed, alibi_slopes)
    ctx.args = (max_q, max_k, scale, left, right)
    ctx.softcap = softcap
    ctx.dropout_p, ctx.deterministic, ctx.backend = dropout_p, deterministic, backend
    ctx.set_materialize_grads(False)  # an lse nobody differentiates gives dlse None: no zeros made, read or launched


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_q, cu_k, attn_mask, seed, alibi_slopes = ctx.saved_tensors
    max_q, max_k, scale, left, right = ctx.args
    if torch.is_grad_enabled() or ctx.needs_input_grad[10]:
        # A double backward follows (see reference_gradients), or a float attn_mask takes a gradient: the
        # reference's autograd gives every one.
        def reference(q, k, v, mask):
            return attention_reference(
                q, k, v, scale, left, right, cu_q, cu_k, mask, ctx.dropout_p, seed, ctx.softcap, alibi_slopes
            )

        with torch.enable_grad():
            grads = reference_gradients(reference, (q, k, v, attn_mask), (dout, dlse))
        if not torch.is_grad_enabled():
            grads = tuple(None if g is None else g.detach() for g in grads)
        dq, dk, dv, dmask = grads
        return dq, dk, dv, *(None,) * 7, dmask, *(None,) * 6  # cu_seqlens_q .. right, attn_mask, dropout_p .. backend
    if dout is None:
        dout = torch.zeros_like(out)
    deterministic = ctx.deterministic or torch.are_deterministic_algorithms_enabled()
    dq, dk, dv = _backward_op(
        dout,
        q,
        k,
        v,
        out,
        lse,
        dlse,
        cu_q,
        cu_k,
        max_q,
        max_k,
        scale,
        left,
        right,
        attn_mask,
        ctx.dropout_p,
        seed,
        ctx.softcap,
        alibi_slopes,
        deterministic,
        ctx.backend,
    )
    return dq, dk, dv, *(None,) * 14  # the slopes take no gradient, as in flash-attn


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def _attend(
    q,
    k,
    v,
    cu_q,
    cu_k,
    max_q,
    max_k,
    scale,
    left,
    right,
    backend,
    dropout_p,
    attn_mask=None,
    deterministic=False,
    softcap=0.0,
    alibi_slopes=None,
):
    """(out, lse, the dropout seed or None) from the registered op, on the backend chosen for these inputs."""
    name = ATTENTION.choose(q, k, v, cu_q, max_q, max_k, attn_mask, dropout_p, softcap, alibi_slopes, backend=backend)
    # Every backend's dropout mask is a function of this seed (from torch's RNG on q's device), which the backward
    # reads again.
    seed = dropout_seed(q.device) if dropout_p > 0.0 else None
    if name != "reference" and (q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1):
        q, k, v = (t.contiguous() for t in (q, k, v))  # the kernels need unit stride along head_dim only
    out, lse = _forward_op(
        q,
        k,
        v,
        cu_q,
        cu_k,
        max_q,
        max_k,
        scale,
        left,
        right,
        attn_mask,
        float(dropout_p),
        seed,
        float(softcap),
        alibi_slopes,
        bool(deterministic),
        name,
    )
    return out, lse, seed


# ---- the short path: the commonest calls, straight to the aot ops ---------------------------------------------------

# forward and backward in one C++ op with its autograd in C++ (csrc/attention_aot_autograd.cpp)
_AOT_OP = (
    torch.ops.fasttrain.attention_aot.default
    if _AOT_OP_REASON is None and _AOT_BACKWARD_OP_REASON is None and _backend.native_op_reason("attention_aot") is None
    else None
)


def _aot_short(q, k, v, scale, left: int, right: int, deterministic: bool, dropout_p: float = 0.0) -> Tensor | None:
    """out from the aot ops for a call that the checks and choice of the general path (`_attend`) would send to the
    aot column unchanged (`_short_scale`), else None, and the general path checks, chooses and calls; it does nothing
    else this one skips, so both give the same launches (tests/test_attention_short_path.py). dropout_p > 0 draws its
    seed as `_attend` does, after the checks, so that both paths drop the same scores under one torch.manual_seed.
    Autocast changes neither path: the ops have no autocast kernel."""
    if _AOT_OP is None or (scale := _short_scale(q, k, v, scale)) is None:
        return None
    if not dropout_p:
        return _AOT_OP(q, k, v, scale, left, right, deterministic)
    if q.shape[-1] not in _AOT_DROPOUT_HEAD_DIMS:
        return None
    return _AOT_OP(q, k, v, scale, left, right, deterministic, float(dropout_p), dropout_seed(q.device))


def _short_scale(q, k, v, scale) -> float | None:
    """The scale for a call the short path may take, else None: no backend named or forced (the caller has ruled out
    a named one), plain tensors on one device, (B, T, H, D) with k and v alike and q's batch and head_dim, unit
    stride along head_dim, a float or no scale (None: head_dim ** -0.5), and what `_aot_reason` asks of them, checked
    inline as the norms' short path explains (the caller has ruled out dropout, softcap, ALiBi and a mask)."""
    if type(q) is not Tensor or type(k) is not Tensor or type(v) is not Tensor:
        return None
    if _backend.aot_reason(device := q.device) is not None:  # first: a CPU tensor leaves at once
        return None
    dtype = q.dtype
    if q.dim() != 4 or k.dim() != 4 or dtype not in _KERNEL_DTYPES_CUDA or k.dtype != dtype or v.dtype != dtype:
        return None
    (B, Tq, H, D), (Bk, Tk, Hkv, Dk) = q.shape, k.shape
    if k.shape != v.shape or Bk != B or Dk != D or D not in _AOT_HEAD_DIMS or Hkv == 0 or H % Hkv:
        return None
    if H // Hkv not in _AOT_GROUPS or k.device != device or v.device != device:
        return None
    # unit stride along D, and _kernel_limit_reason's: B and H within the grid, each sequence's rows within int32
    # offsets; strides of 2**31 or more go to the general path, which copies them or leaves them to Triton
    sq, sk, sv = q.stride(), k.stride(), v.stride()
    if sq[3] != 1 or sk[3] != 1 or sv[3] != 1 or B > GRID_YZ_MAX or H > GRID_YZ_MAX or Tq * max(sq[1], H * D) >= 2**31:
        return None
    if max(sq) >= 2**31 or max(sk) >= 2**31 or max(sv) >= 2**31:
        return None
    if Tk * max(sk[1], Hkv * D) >= 2**31 or Tk * max(sv[1], Hkv * D) >= 2**31:
        return None
    if scale is not None and type(scale) is not float:
        return None
    if _backend.forced():
        return None
    return D**-0.5 if scale is None else scale


# the same for packed sequences (flash_attn_varlen_func): csrc/attention_aot_autograd.cpp attention_aot_varlen
_AOT_VARLEN_OP = (
    torch.ops.fasttrain.attention_aot_varlen.default
    if _AOT_OP is not None
    and _AOT_VARLEN_OP_REASON is None
    and _backend.native_op_reason("attention_varlen_backward_aot") is None
    and _backend.native_op_reason("attention_aot_varlen") is None
    else None
)


def _short_varlen_scale(q, k, v, cu_q, cu_k, max_q, max_k, scale) -> float | None:
    """`_short_scale` for packed sequences: q (total_q, H, D), k and v (total_k, Hkv, D), int32 offsets cu_q and cu_k
    (B + 1, unit stride) on q's device and int max_q and max_k at least the longest sequences, as `_check_varlen`
    checks them, the offsets' values known without a device sync (`_known_longest`: offsets the general path checked
    and remembered, unchanged since; else None, and the general path reads them), and what `_aot_reason` asks of
    packed inputs. The offsets are read only after everything the general path checks before them has passed, so a
    bad value raises the general path's error."""
    if type(q) is not Tensor or type(k) is not Tensor or type(v) is not Tensor:
        return None
    if type(cu_q) is not Tensor or type(cu_k) is not Tensor or type(max_q) is not int or type(max_k) is not int:
        return None
    if _backend.aot_reason(device := q.device) is not None:  # first: a CPU tensor leaves at once
        return None
    dtype = q.dtype
    if q.dim() != 3 or k.dim() != 3 or dtype not in _KERNEL_DTYPES_CUDA or k.dtype != dtype or v.dtype != dtype:
        return None
    (total_q, H, D), (total_k, Hkv, Dk) = q.shape, k.shape
    if k.shape != v.shape or Dk != D or D not in _AOT_HEAD_DIMS or Hkv == 0 or H % Hkv:
        return None
    if H // Hkv not in _AOT_GROUPS or k.device != device or v.device != device:
        return None
    n = cu_q.numel()
    if cu_q.dtype != torch.int32 or cu_k.dtype != torch.int32 or cu_q.dim() != 1 or cu_k.dim() != 1:
        return None
    if n < 2 or cu_k.numel() != n or cu_q.stride(0) != 1 or cu_k.stride(0) != 1:
        return None
    if cu_q.device != device or cu_k.device != device:
        return None
    # as the dense short path: unit stride along D, the grid's sequences and heads, int32 row offsets and strides
    sq, sk, sv = q.stride(), k.stride(), v.stride()
    if sq[2] != 1 or sk[2] != 1 or sv[2] != 1 or n - 1 > GRID_YZ_MAX or H > GRID_YZ_MAX:
        return None
    if max(sq) >= 2**31 or max(sk) >= 2**31 or max(sv) >= 2**31 or max_q * max(sq[0], H * D) >= 2**31:
        return None
    if max_k * max(sk[0], Hkv * D) >= 2**31 or max_k * max(sv[0], Hkv * D) >= 2**31:
        return None
    if scale is not None and type(scale) is not float:
        return None
    if _backend.forced():
        return None
    longest_q = _known_longest("cu_seqlens_q", cu_q, total_q)
    if longest_q is None or max_q < longest_q:
        return None
    longest_k = _known_longest("cu_seqlens_k", cu_k, total_k)
    if longest_k is None or max_k < longest_k:
        return None
    return D**-0.5 if scale is None else scale


def _varlen_short(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, softmax_scale, causal, window_size, softcap,
                  alibi_slopes, deterministic):  # fmt: skip
    """out of flash_attn_varlen_func from one C++ op with its autograd in C++ (`_AOT_VARLEN_OP`), for a call that the
    general path would send to the aot column as it is (`_flash_args`, `_short_varlen_scale`; with dropout, where its
    backward cubins ship: `_varlen_backward_unshipped`), else None: the same launches forward and backward, the
    dropout seed drawn as `_aot_short` draws it (tests/test_attention_short_path.py)."""
    if _AOT_VARLEN_OP is None or (found := _flash_args(dropout_p, causal, window_size, softcap, alibi_slopes)) is None:
        return None
    if (scale := _short_varlen_scale(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale)) is None:
        return None
    left, right, p = found
    if _varlen_backward_unshipped(q, p) or (p and q.shape[-1] not in _AOT_DROPOUT_HEAD_DIMS):
        return None
    if not p:
        return _AOT_VARLEN_OP(q, k, v, cu_q, cu_k, max_q, max_k, scale, left, right, bool(deterministic))
    args = (scale, left, right, bool(deterministic), p, dropout_seed(q.device))
    return _AOT_VARLEN_OP(q, k, v, cu_q, cu_k, max_q, max_k, *args)


def _flash_short(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic):
    """`_aot_short` for flash_attn_func's arguments (`_flash_args`)."""
    found = _flash_args(dropout_p, causal, window_size, softcap, alibi_slopes)
    return None if found is None else _aot_short(q, k, v, softmax_scale, *found[:2], bool(deterministic), found[2])


def _flash_args(dropout_p, causal, window_size, softcap, alibi_slopes) -> tuple[int, int, float] | None:
    """(left, right, dropout_p) for flash-attn's arguments that the short paths take: a float or int dropout_p in
    [0, 1) (`_check_dropout` passes), no softcap or ALiBi, a (left, right) tuple of ints >= -1 for window_size,
    translated as `_window` translates it; else None."""
    if alibi_slopes is not None or type(dropout_p) not in (float, int) or type(softcap) not in (float, int):
        return None
    if not 0 <= dropout_p < 1 or softcap != 0 or type(window_size) is not tuple or len(window_size) != 2:
        return None
    w_left, w_right = window_size
    if type(w_left) is not int or type(w_right) is not int or w_left < -1 or w_right < -1:
        return None
    return _window_side(w_left), 0 if causal else _window_side(w_right), float(dropout_p)


def _flash_band(dropout_p, causal, window_size, softcap, alibi_slopes) -> tuple[int, int] | None:
    """`_flash_args`' (left, right) for a call without dropout (the packed functions' short paths, whose C++ autograd
    op takes no dropout: a packed call with dropout takes the general path), else None."""
    found = _flash_args(dropout_p, causal, window_size, softcap, alibi_slopes)
    return None if found is None or found[2] else found[:2]


def _sdpa_short(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    """`_aot_short` for scaled_dot_product_attention's arguments: dropout_p a float or int in [0, 1), Hkv < H only
    with enable_gqa, the top-left causal band as the general path gives it, or a mask that `kernel_plan` reads as a
    band (causal, sliding-window: its (left, right), as the general path takes it; padding and packed documents,
    whose launches gather rows, take the general path)."""
    if type(query) is not Tensor or type(key) is not Tensor or type(value) is not Tensor:
        return None
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4 or type(dropout_p) not in (float, int):
        return None
    if not 0 <= dropout_p < 1:
        return None
    if key.shape[1] != query.shape[1] and not enable_gqa:
        return None
    B, Tq, Tk = query.shape[0], query.shape[2], key.shape[2]
    left, right = UNBOUNDED, (Tq - Tk if is_causal else UNBOUNDED)
    if attn_mask is not None:
        # read only where the aot column can serve q (a CPU tensor leaves at once) and the general path's checks
        # would pass the mask to kernel_plan too; kernel_plan keeps its answer, so where _aot_short then declines,
        # the general path's call reads no value again
        if is_causal or type(attn_mask) is not Tensor or _backend.aot_reason(query.device) is not None:
            return None
        if attn_mask.dtype not in (torch.bool, torch.float32, query.dtype):
            return None
        if not _mask_fits(attn_mask, query.shape[:-1] + key.shape[-2:-1]):
            return None
        plan = kernel_plan(attn_mask, B, Tq, Tk, query.device)
        if type(plan) is not tuple:
            return None
        left, right = plan
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)  # (B, H, T, D) -> (B, T, H, D)
    out = _aot_short(q, k, v, scale, left, right, False, dropout_p)
    return None if out is None else out.transpose(1, 2)  # (B, Tq, H, D) -> (B, H, Tq, D)


def attn_probs(q, k, seed, dropout_p, scale, left, right, cu_q=None, cu_k=None, max_q=0, max_k=0, softcap=0.0,
               alibi_slopes=None) -> Tensor:  # fmt: skip
    """flash-attn's third value with return_attn_probs: S_dmask (attention_reference.s_dmask, computed from the
    forward's dropout seed only when asked) with dropout, else the empty tensor flash-attn returns."""
    if dropout_p == 0.0:
        return q.new_empty((0,))
    with torch.no_grad():
        return s_dmask(q, k, seed, dropout_p, scale, left, right, cu_q, cu_k, max_q, max_k, softcap, alibi_slopes)


def _flash_causal(alibi_slopes: Tensor | None, left: int, right: int, max_k: int) -> bool:
    """Whether flash-attn runs its causal kernel with ALiBi here: a window unbounded on the left (or reaching past
    max_k, which it clamps) and right = 0."""
    return alibi_slopes is not None and right == 0 and left >= max_k


class _IgnoredGrad(torch.autograd.Function):
    """flash-attn's softmax_lse as its autograd Functions return it: an output whose gradient the backward ignores
    (theirs takes `dout, *args`), so a loss from lse alone gives dq = dk = dv = 0 and no dlse reaches the kernels."""

    @staticmethod
    def forward(ctx, lse):
        return lse.view_as(lse)

    @staticmethod
    def backward(ctx, dlse):
        return None


def _check_lse_grad(lse_grad) -> bool:
    if not isinstance(lse_grad, bool):
        raise ArgumentTypeError(f"lse_grad must be a bool, got {type(lse_grad).__name__}")
    return lse_grad


def returned_lse(lse: Tensor, lse_grad: bool) -> Tensor:
    """The softmax_lse a flash-attn function returns: its gradient ignored, as flash-attn ignores it, unless
    fasttrain's lse_grad=True asks for the exact one (the backward kernels then read dlse)."""
    return lse if lse_grad or not lse.requires_grad else _IgnoredGrad.apply(lse)


def flash_lse(lse: Tensor, alibi_slopes: Tensor | None, left: int, right: int, max_k: int, shift: Tensor) -> Tensor:
    """The logsumexp (B, H, Tq) flash-attn returns. Its causal kernel adds slope * j to key j's score instead of
    ALiBi's -slope * (i + Tk - Tq - j): the same softmax, outputs and gradients, an lse higher by
    slope * (i + Tk - Tq). shift (B or 1, Tq): i + Tk - Tq for each query row; slopes (H,) or (B, H)."""
    if not _flash_causal(alibi_slopes, left, right, max_k):
        return lse
    return lse + alibi_slopes.view(-1, lse.shape[1], 1) * shift[:, None, :]  # slopes (B or 1, H, 1)


def _varlen_flash_lse(lse, alibi_slopes, left, right, max_k, cu_q, cu_k) -> Tensor:
    """flash_lse for a packed lse (H, total_q), each row shifted by i + Tk_b - Tq_b of its sequence b."""
    if not _flash_causal(alibi_slopes, left, right, max_k):
        return lse
    total_q = lse.shape[1]
    len_q, len_k = cu_q.diff().long(), cu_k.diff().long()
    seq = torch.repeat_interleave(torch.arange(len_q.numel(), device=lse.device), len_q, output_size=total_q)
    shift = torch.arange(total_q, device=lse.device) - cu_q.long()[:-1][seq] + (len_k - len_q)[seq]  # (total_q,)
    slopes = alibi_slopes[:, None] if alibi_slopes.dim() == 1 else alibi_slopes[seq].t()  # (H, 1) or (H, total_q)
    return lse + slopes * shift


# ---- public functions ----------------------------------------------------------------------------------------------


def flash_attn_func(
    q: Tensor,
    k: Tensor,
    v: Tensor,
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
    """flash-attn's `flash_attn_func`: softmax(q k^T * scale) v over (B, T, H, D) tensors.

    q: (B, Tq, H, D); k, v: (B, Tk, Hkv, D) with Hkv dividing H (GQA/MQA; K and V are never repeated).
    causal: query i sees keys j <= i + Tk - Tq (aligned bottom-right, as flash-attn). window_size (left, right):
    query i sees keys in [i + Tk - Tq - left, i + Tk - Tq + right]; -1 leaves a side unbounded.
    softmax_scale defaults to D**-0.5. head_dim 32, 64, 96, 128 or 256 runs the GPU kernels (fp16/bf16); on the
    CPU the C++ kernel takes any head_dim in fp32, bf16 or fp16.
    dropout_p drops attention probabilities inside the kernels (every backend draws the same mask from a fresh
    seed on q's device, which the backward reads again; fasttrain/ops/attention_dropout.py). softcap > 0 caps the
    scaled scores at softcap * tanh(s / softcap) (Gemma 2), before the mask and the ALiBi bias (<= 0 or NaN: no
    capping, as in flash-attn). alibi_slopes: float32 (H,) or (B, H); adds -slope * |i + Tk - Tq - j| to the score
    of query i and key j (not scaled by softmax_scale; no gradient reaches the slopes, as in flash-attn).
    deterministic: the backward computes dQ by its own kernel (also under torch.use_deterministic_algorithms(True)),
    bit-identical from run to run in a process, and across processes whose autotuners pick the same tiles
    (TRITON_CACHE_AUTOTUNING=1 keeps the picks on disk). Otherwise, on a GPU, dQ may come by float32 atomics from the
    dK/dV kernel where that times faster for the shape (fewer matmuls, a transient float32 buffer of 2x dQ's bytes;
    dQ's last bits vary from run to run, as in flash-attn).
    Returns out (B, Tq, H, D); with return_attn_probs, (out, softmax_lse (B, H, Tq) float32, S_dmask): with
    dropout, flash-attn's S_dmask (B, H, Tq and Tk rounded up to 128) in q's dtype, in flash-attn's encoding
    (attention_reference.s_dmask: P unnormalized per key block, dropped entries negated), computed from the seed
    only when asked (the kernels never write it); without dropout an empty tensor, as flash-attn returns. Query
    rows that see no key give 0 and lse = +inf. As in flash-attn, the backward ignores softmax_lse's gradient (a
    loss from lse alone gives dq = dk = dv = 0).
    backend: "auto" (default), "triton", "cpu" or "reference"; FASTTRAIN_BACKEND overrides auto.
    lse_grad (fasttrain's own, keyword-only): True differentiates through the returned softmax_lse too, exactly
    (the backward kernels read its gradient); False (default, flash-attn's semantics) costs nothing.
    """
    if backend is None and not return_attn_probs and type(lse_grad) is bool:
        out = _flash_short(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic)
        if out is not None:
            return out
    _check_qkv(q, k, v, 4, "(B, T, H, D)")
    lse_grad = _check_lse_grad(lse_grad)
    softcap, alibi_slopes = _check_softcap(softcap), _check_alibi(alibi_slopes, q.shape[0], q.shape[2], q.device)
    scale, (left, right) = _scale(softmax_scale, q.shape[-1]), _window(causal, window_size)
    dropout_p = _check_dropout(dropout_p)
    out, lse, seed = _attend(
        q,
        k,
        v,
        None,
        None,
        q.shape[1],
        k.shape[1],
        scale,
        left,
        right,
        backend,
        dropout_p,
        deterministic=deterministic,
        softcap=softcap,
        alibi_slopes=alibi_slopes,
    )
    if not return_attn_probs:
        return out
    probs = attn_probs(q, k, seed, dropout_p, scale, left, right, softcap=softcap, alibi_slopes=alibi_slopes)
    shift = torch.arange(q.shape[1], device=q.device)[None] + (k.shape[1] - q.shape[1])  # (1, Tq)
    return out, returned_lse(flash_lse(lse, alibi_slopes, left, right, k.shape[1], shift), lse_grad), probs


def flash_attn_varlen_func(
    q: Tensor,
    k: Tensor,
    v: Tensor,
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
    block_table: Tensor | None = None,
    *,
    backend: str | None = None,
    lse_grad: bool = False,
):
    """flash-attn's `flash_attn_varlen_func`: B sequences packed along the first axis.

    q: (total_q, H, D); k, v: (total_k, Hkv, D); cu_seqlens_q/k: (B + 1,) int32 offsets from 0 to total_q/total_k;
    max_seqlen_q/k: the longest sequence (a bound; it sizes the launch grid). The offsets are checked once per tensor
    and in-place version (one host sync), not while a CUDA graph is captured or torch.compile traces. Sequence b's
    queries attend only to sequence b's keys, masked as in `flash_attn_func` with that sequence's Tq_b and Tk_b.
    Returns out (total_q, H, D), or (out, softmax_lse (H, total_q) float32, S_dmask) with return_attn_probs
    (S_dmask (B, H, max_seqlen_q and max_seqlen_k rounded up to 128), sequence b at [b, :, :Tq_b, :Tk_b]; see
    `flash_attn_func`).
    block_table: (B, max_blocks) int32, or None: k and v are then a paged cache (num_blocks, page_block_size,
    Hkv, D), sequence b's key t in page block_table[b, t // page_block_size] (cu_seqlens_k still gives the lengths);
    each sequence's keys are gathered out of their pages (differentiable into the cache) before the kernels run.
    deterministic, softcap and alibi_slopes ((H,) or (B, H), B the number of sequences; each sequence's own Tq_b and
    Tk_b place the bias), and lse_grad (softmax_lse's gradient ignored unless lse_grad=True) as in
    `flash_attn_func`.
    """
    if backend is None and not return_attn_probs and block_table is None and type(lse_grad) is bool:
        args = (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal, window_size)
        out = _varlen_short(q, k, v, *args, softcap, alibi_slopes, deterministic)
        if out is not None:
            return out
    if block_table is not None:
        k, v = _keys_from_pages(q, k, v, block_table, cu_seqlens_k)
    _check_qkv(q, k, v, 3, "(total, H, D)")
    lse_grad = _check_lse_grad(lse_grad)
    softcap = _check_softcap(softcap)
    cu_seqlens_q, cu_seqlens_k = _check_varlen(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    alibi_slopes = _check_alibi(alibi_slopes, cu_seqlens_q.numel() - 1, q.shape[1], q.device)
    scale, (left, right) = _scale(softmax_scale, q.shape[-1]), _window(causal, window_size)
    dropout_p = _check_dropout(dropout_p)
    out, lse, seed = _attend(
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        scale,
        left,
        right,
        backend,
        dropout_p,
        deterministic=deterministic,
        softcap=softcap,
        alibi_slopes=alibi_slopes,
    )
    if not return_attn_probs:
        return out
    probs = attn_probs(
        q, k, seed, dropout_p, scale, left, right, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softcap,
        alibi_slopes,
    )  # fmt: skip
    lse = _varlen_flash_lse(lse, alibi_slopes, left, right, max_seqlen_k, cu_seqlens_q, cu_seqlens_k)
    return out, returned_lse(lse, lse_grad), probs


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    *,
    scale: float | None = None,
    enable_gqa: bool = False,
    backend: str | None = None,
) -> Tensor:
    """torch's `scaled_dot_product_attention` over (B, H, T, D) tensors, or any rank >= 2 as torch takes them.

    query: (B, H, Tq, D); key, value: (B, Hkv, Tk, D), Hkv < H only with enable_gqa=True. Other ranks, as in torch
    ((..., H, T, D), (T, D)), run as the 4-D view (every axis before H folded into B), the mask broadcast against
    (..., H, Tq, Tk) first; the axes before (T, D) broadcast as in torch's math path (k and v of batch 1 or one head
    against q's, ranks of their own; with enable_gqa, rank >= 3, the axes before H, and key and value may have head
    counts of their own, each dividing H: both are then repeated to H, a copy). value may have its own head_dim
    Ev (torch's (..., Tk, Ev); MLA models): the narrower side is padded with zeros (the scores and outputs
    unchanged), the output is (..., Tq, Ev). scale and enable_gqa are keyword-only, as in torch. dropout_p = 1.0
    drops every probability: zeros, with zero gradients, as torch. is_causal masks as torch does, aligned top-left:
    query i sees keys j <= i. attn_mask: bool (True = attend) or additive, float32 or query's dtype, broadcastable
    to (B, H, Tq, Tk). A mask that is one for every head and lets each query row see one stretch of keys (0/-inf if
    additive) runs the kernels (fasttrain/ops/attention_masks.py: read once per mask tensor, one host sync on a
    GPU): a band (causal, sliding-window) as is; padding (key lengths per batch row, with or without causality) and
    document packing (block-diagonal) as varlen launches over gathered rows; dropout_p with them too. Any other mask
    runs the reference path. Returns (B, H, Tq, D). The backward is deterministic under
    torch.use_deterministic_algorithms(True) (see `flash_attn_func`).
    """
    if backend is None:
        out = _sdpa_short(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
        if out is not None:
            return out
    kw = dict(scale=scale, enable_gqa=enable_gqa, backend=backend)
    if type(dropout_p) in (float, int) and dropout_p == 1.0:  # torch drops every probability: zeros, zero gradients
        return scaled_dot_product_attention(query, key, value, attn_mask, 0.0, is_causal, **kw) * 0.0
    if all(isinstance(t, Tensor) for t in (query, key, value)):
        dims = [t.dim() for t in (query, key, value)]
        if enable_gqa and min(dims) == 2:  # torch reads the heads at dim -3: its IndexError (rank 1: the checks')
            raise IndexError(
                "enable_gqa=True needs query, key and value with a head axis (dim -3): rank >= 3, as in torch, got "
                f"shapes {tuple(query.shape)}, {tuple(key.shape)} and {tuple(value.shape)}"
            )
        # torch's math path broadcasts the axes before (T, D) as matmul does (k, v of batch 1 or of one head
        # against q's, ranks of their own), with enable_gqa those before the heads, which its repeat matches: views
        n = 3 if enable_gqa else 2
        lead = (query.shape[:-n], key.shape[:-n], value.shape[:-n])
        shape = _broadcast_or_none(*lead) if min(dims) >= n and not lead[0] == lead[1] == lead[2] else None
        if shape is not None:
            query, key, value = (t.expand(*shape, *t.shape[-n:]) for t in (query, key, value))
            return scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, **kw)
        if enable_gqa and min(dims) >= 3 and key.shape[-3] != value.shape[-3]:
            # torch repeats key and value to query's heads each by its own factor: so do we here (copies)
            H = query.shape[-3]
            if H % key.shape[-3] or H % value.shape[-3]:
                raise ArgumentError(
                    f"with enable_gqa, key's and value's head counts ({key.shape[-3]}, {value.shape[-3]}) must each "
                    f"divide query's ({H}), as in torch"
                )
            key, value = (t.repeat_interleave(H // t.shape[-3], dim=-3) for t in (key, value))
            return scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, **kw)
        if value.dim() == key.dim() and value.shape[-1] != key.shape[-1] and query.shape[-1] == key.shape[-1]:
            return _sdpa_value_dim(query, key, value, attn_mask, dropout_p, is_causal, kw)
        if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
            return _sdpa_any_rank(query, key, value, attn_mask, dropout_p, is_causal, kw)
    _check_qkv(query, key, value, 4, "(B, H, T, D)", head_axis=1, names=("query", "key", "value"))
    if key.shape[1] != query.shape[1] and not enable_gqa:
        raise ArgumentError(f"key has {key.shape[1]} heads and query {query.shape[1]}: pass enable_gqa=True for GQA")
    if attn_mask is not None and is_causal:
        raise ArgumentError("attn_mask and is_causal=True cannot both be set (as in torch)")
    if attn_mask is not None and not isinstance(attn_mask, Tensor):
        raise ArgumentTypeError(f"attn_mask must be a tensor or None, got {type(attn_mask).__name__}")
    if attn_mask is not None and attn_mask.dtype not in (torch.bool, torch.float32, query.dtype):
        # An int 0/1 mask (a tokenizer's attention_mask) added to the scores would mask nothing; torch refuses it,
        # and an additive mask of a float dtype other than float32 or query's.
        raise ArgumentTypeError(
            f"attn_mask must be bool (True = attend) or floating-point (added to the scores) of float32 or query's "
            f"dtype ({query.dtype}), got {attn_mask.dtype}"
        )
    if attn_mask is not None and not _mask_fits(attn_mask, query.shape[:-1] + key.shape[-2:-1]):
        raise ArgumentError(
            f"attn_mask of shape {tuple(attn_mask.shape)} must broadcast to (B, H, Tq, Tk) = "
            f"{tuple(query.shape[:-1] + key.shape[-2:-1])}, as in torch"
        )
    dropout_p = _check_dropout(dropout_p)
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # (B, H, T, D) -> (B, T, H, D) views
    Tq, Tk = q.shape[1], k.shape[1]
    # top-left causal is the bottom-right band shifted by Tq - Tk: j - i - (Tk - Tq) <= Tq - Tk
    left, right = UNBOUNDED, (Tq - Tk if is_causal else UNBOUNDED)
    scale = _scale(scale, q.shape[-1])
    if attn_mask is not None and backend != "reference":
        plan = kernel_plan(attn_mask, q.shape[0], Tq, Tk, q.device)
        if isinstance(plan, Segments):  # padding or packed documents: varlen launches over gathered rows
            return _segmented(q, k, v, plan, scale, backend, dropout_p).transpose(1, 2)
        if plan is not None:  # a causal or windowed mask: the kernels' band
            (left, right), attn_mask = plan, None
    out, _, _ = _attend(q, k, v, None, None, Tq, Tk, scale, left, right, backend, dropout_p, attn_mask)
    return out.transpose(1, 2)  # (B, Tq, H, D) -> (B, H, Tq, D)


def _mask_fits(attn_mask: Tensor, shape: torch.Size) -> bool:
    """Whether attn_mask broadcasts to `shape` (B, H, Tq, Tk) without widening it, as torch requires."""
    return attn_mask.dim() <= len(shape) and all(
        m in (1, n) for m, n in zip(reversed(attn_mask.shape), reversed(shape))
    )


def _broadcast_or_none(*shapes) -> torch.Size | None:
    """torch.broadcast_shapes(*shapes), or None where they do not broadcast (the checks that follow say why)."""
    try:
        return torch.broadcast_shapes(*shapes)
    except RuntimeError:
        return None


def _sdpa_value_dim(query, key, value, attn_mask, dropout_p, is_causal, kw) -> Tensor:
    """SDPA with value's head_dim Ev != query's and key's E: the kernels take one head_dim, so the narrower side
    is padded with zeros (zero columns add nothing to q k^T; v's zero columns give output columns sliced off)."""
    E, Ev = query.shape[-1], value.shape[-1]
    kw = dict(kw, scale=E**-0.5 if kw["scale"] is None else kw["scale"])  # the scale of the unpadded E
    if Ev < E:
        value = torch.nn.functional.pad(value, (0, E - Ev))  # (..., Tk, Ev) -> (..., Tk, E)
        return scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, **kw)[..., :Ev]
    query, key = (torch.nn.functional.pad(t, (0, Ev - E)) for t in (query, key))  # (..., T, E) -> (..., T, Ev)
    return scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, **kw)


def _sdpa_any_rank(query, key, value, attn_mask, dropout_p, is_causal, kw) -> Tensor:
    """SDPA over torch's (..., H, T, D) of any rank >= 2 as the 4-D (B, H, T, D) view, B every axis before H."""
    if not query.dim() == key.dim() == value.dim() >= 2:
        raise ArgumentError(
            f"query, key and value must have one rank >= 2, got shapes {tuple(query.shape)}, {tuple(key.shape)} "
            f"and {tuple(value.shape)}"
        )
    if query.dim() > 4 and not query.shape[:-3] == key.shape[:-3] == value.shape[:-3]:
        raise ArgumentError(
            f"query, key and value must agree in every axis before the heads, got shapes {tuple(query.shape)}, "
            f"{tuple(key.shape)} and {tuple(value.shape)}"
        )

    def as_4d(t: Tensor) -> Tensor:
        if t.dim() < 4:  # (T, D) -> (1, 1, T, D); (H, T, D) -> (1, H, T, D)
            return t.reshape((1,) * (4 - t.dim()) + tuple(t.shape))
        return t.reshape(math.prod(t.shape[:-3]), *t.shape[-3:])  # (N, ..., H, T, D) -> (N * .., H, T, D)

    if isinstance(attn_mask, Tensor):  # broadcast as torch does: against (..., H, Tq, Tk)
        attn_mask = as_4d(attn_mask.broadcast_to(*query.shape[:-1], key.shape[-2]))
    out = scaled_dot_product_attention(as_4d(query), as_4d(key), as_4d(value), attn_mask, dropout_p, is_causal, **kw)
    return out.reshape(*query.shape[:-1], value.shape[-1])  # (B, H, Tq, Ev) -> (..., H, Tq, Ev)


def _segmented(q, k, v, plan: Segments, scale: float, backend, dropout_p: float) -> Tensor:
    """Attention of q (B, Tq, H, D) over k, v (B, Tk, Hkv, D) as the mask's packed launches: each gathers its query
    and key rows, runs the varlen kernel and scatters its rows into the output; rows in no launch stay 0."""
    B, Tq, H, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    q_rows = q.reshape(B * Tq, H, D)  # (B, Tq, H, D) -> (B * Tq, H, D)
    k_rows, v_rows = k.reshape(B * Tk, Hkv, D), v.reshape(B * Tk, Hkv, D)  # (B * Tk, Hkv, D)
    out = q.new_zeros(B * Tq, H, D)
    for p in plan.launches:
        part, _, _ = _attend(
            q_rows.index_select(0, p.q_rows),
            k_rows.index_select(0, p.k_rows),
            v_rows.index_select(0, p.k_rows),
            p.cu_seqlens_q,
            p.cu_seqlens_k,
            p.max_seqlen_q,
            p.max_seqlen_k,
            scale,
            UNBOUNDED,
            p.right,
            backend,
            dropout_p,
        )
        out = out.index_copy(0, p.q_rows, part)
    return out.view(B, Tq, H, D)
