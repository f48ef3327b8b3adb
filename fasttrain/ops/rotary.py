"""Rotary position embedding with flash-attn's signature (`flash_attn.layers.rotary.apply_rotary_emb`), over two
registered ops: `fasttrain::rotary` (out of place, with autograd: the gradient is the upstream gradient rotated
back, the same op with conjugate=True) and `fasttrain::rotary_` (in place, no autograd).

Backends: `aot` (the Triton kernel compiled ahead of time and launched from C++, csrc/rotary_aot.cpp: the op, its
checks and its autograd in C++, so an eager call never enters Python past the backend choice, and the commonest call
skips the general checks and choice too, `_aot_short`; CUDA calls inside the shipped set, kernels/rotary.py
aot_kernels), `triton` (kernels/rotary.py) and `cpu` (csrc/rotary_cpu.cpp), each
reading x once and writing the result once, and `reference` (plain PyTorch in fp32).
"""

from __future__ import annotations

import numbers
import os

import torch
from torch import Tensor

from fasttrain import _backend
from fasttrain.ops._op import custom_op

# ---- the backends: what each computes -------------------------------------------------------------------------------
# forward(x, cos, sin, offsets, offset, interleaved, conjugate) -> the rotation of x (B, T, H, D) by the angles of
#   cos/sin at positions t + offset (+ offsets[b]), by their opposite when conjugate, as a new tensor;
# inplace(x, cos, sin, offsets, offset, interleaved) writes it into x.


def apply_rotary_emb_reference(
    x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool = False, seqlen_offsets: int | Tensor = 0
) -> Tensor:
    """The rotation in torch ops, in fp32 (float64 for float64 inputs), returned in x's dtype (arguments as for
    apply_rotary_emb)."""
    B, T = x.shape[:2]
    rot = 2 * cos.shape[-1]
    if cos.dim() == 2:
        if isinstance(seqlen_offsets, Tensor):
            positions = seqlen_offsets.long()[:, None] + torch.arange(T, device=x.device)  # (B, T)
            cos, sin = cos[positions], sin[positions]  # (B, T, R/2)
        else:
            cos, sin = cos[seqlen_offsets : seqlen_offsets + T], sin[seqlen_offsets : seqlen_offsets + T]  # (T, R/2)
    compute = torch.promote_types(x.dtype, torch.float32)
    cos, sin = cos.to(compute).unsqueeze(-2), sin.to(compute).unsqueeze(-2)  # (..., T, 1, R/2): over heads
    xr = x[..., :rot].to(compute)
    x1, x2 = (xr[..., 0::2], xr[..., 1::2]) if interleaved else (xr[..., : rot // 2], xr[..., rot // 2 :])
    o1, o2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin  # (B, T, H, R/2) each
    out = torch.stack((o1, o2), dim=-1).flatten(-2) if interleaved else torch.cat((o1, o2), dim=-1)
    return torch.cat((out.to(x.dtype), x[..., rot:]), dim=-1)  # (B, T, H, D)


class Reference:
    @staticmethod
    def forward(x, cos, sin, offsets, offset, interleaved, conjugate):
        sin = -sin if conjugate else sin  # the rotation by the opposite angle
        return apply_rotary_emb_reference(x, cos, sin, interleaved, offsets if offsets is not None else offset)

    @staticmethod
    def inplace(x, cos, sin, offsets, offset, interleaved):
        x.copy_(Reference.forward(x, cos, sin, offsets, offset, interleaved, False))


class Triton:
    @staticmethod
    def forward(x, cos, sin, offsets, offset, interleaved, conjugate):
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        return _backend.kernels("rotary").rotary(x, cos, sin, offsets, offset, interleaved, conjugate, out)

    @staticmethod
    def inplace(x, cos, sin, offsets, offset, interleaved):
        _backend.kernels("rotary").rotary(x, cos, sin, offsets, offset, interleaved, False, x)


class Aot:  # the out-of-place op is the column's direct op, fasttrain::rotary_aot (the table below)
    @staticmethod
    def inplace(x, cos, sin, offsets, offset, interleaved):
        torch.ops.fasttrain.rotary_aot_(x, cos, sin, offsets, offset, interleaved)


class Cpu:
    @staticmethod
    def forward(x, cos, sin, offsets, offset, interleaved, conjugate):
        return torch.ops.fasttrain.rotary_cpu(x, cos, sin, offsets, offset, interleaved, conjugate)

    @staticmethod
    def inplace(x, cos, sin, offsets, offset, interleaved):
        torch.ops.fasttrain.rotary_cpu_(x, cos, sin, offsets, offset, interleaved)


# ---- the table: which backend can serve which inputs ----------------------------------------------------------------

# Read once, at import (Dynamo cannot trace the extension's import).
_CPU_OP_REASON = _backend.native_op_reason("rotary_cpu")
_AOT_OP_REASON = _backend.native_op_reason("rotary_aot")

# What kernels/rotary.py aot_kernels(shipped=True) lists, not read from there: that would import Triton.
_AOT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_AOT_OFFSETS = (torch.int32, torch.int64)
_AOT_MAX_HEADS = 128
_AOT_MAX_HEAD_DIM = 256
_AOT_MIN_HALF = 5
_I32 = 2**31 - 1


def _aot_reason(x: Tensor, cos: Tensor, sin: Tensor, offsets: Tensor | None, interleaved: bool) -> str | None:
    """None for the calls kernels/rotary.py ships cubins for (the arguments checked by _check)."""
    if (why := _backend.aot_reason(x.device)) is not None:
        return why
    if _AOT_OP_REASON is not None:
        return _AOT_OP_REASON
    B, T, H, D = x.shape
    if x.dtype not in _AOT_DTYPES or cos.dtype not in (torch.float32, x.dtype) or sin.dtype != cos.dtype:
        return f"the shipped cubins take fp16, bf16 or fp32 x with fp32 or x-dtype tables, got {x.dtype}, {cos.dtype}"
    if interleaved:
        return "the shipped cubins rotate half-split pairs (interleaved=False)"
    if D % 16 or D > _AOT_MAX_HEAD_DIM or H > _AOT_MAX_HEADS or cos.shape[-1] < _AOT_MIN_HALF:
        return (
            f"the shipped cubins take head_dim a multiple of 16 up to {_AOT_MAX_HEAD_DIM}, up to {_AOT_MAX_HEADS} "
            f"heads and rotary_dim >= {2 * _AOT_MIN_HALF}, got {H} heads of {D} with rotary_dim {2 * cos.shape[-1]}"
        )
    if offsets is not None and (offsets.dtype not in _AOT_OFFSETS or (x.requires_grad and torch.is_grad_enabled())):
        return "the shipped cubins take int32 or int64 seqlen_offsets tensors, without a gradient"
    if x.numel() > _I32 or cos.numel() > _I32:
        return "tensors past 2**31 elements take the JIT's 64-bit indexing"
    return None


def _jit_reason(reason):
    return lambda x, *_: reason(x)


ROTARY = _backend.Table(
    "rotary",
    {
        "aot": _backend.Backend(
            _aot_reason,
            Aot,
            live=_backend.aot_live,
            direct=torch.ops.fasttrain.rotary_aot if _AOT_OP_REASON is None else None,
        ),
        "triton": _backend.Backend(_jit_reason(_backend.triton_tensor_reason), Triton, live=_backend.triton_live),
        "cpu": _backend.Backend(
            _jit_reason(lambda x: _backend.cpu_kernel_reason(x, _CPU_OP_REASON)), Cpu, live=lambda: _CPU_OP_REASON
        ),
        "reference": _backend.Backend(_backend.always, Reference),
    },
)


# ---- the registered ops: one body for every backend, fake implementations, autograd --------------------------------


@custom_op("fasttrain::rotary", mutates_args=(), table=ROTARY, reference=Reference.forward)
def _rotary_op(
    x: Tensor,
    cos: Tensor,
    sin: Tensor,
    offsets: Tensor | None,
    offset: int,
    interleaved: bool,
    conjugate: bool,
    backend: str,
) -> Tensor:
    return ROTARY[backend].forward(x, cos, sin, offsets, offset, interleaved, conjugate)


@_rotary_op.register_fake
def _(x, cos, sin, offsets, offset, interleaved, conjugate, backend):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _setup_context(ctx, inputs, output):
    _, cos, sin, offsets, offset, interleaved, conjugate, backend = inputs
    ctx.save_for_backward(cos, sin, offsets)
    ctx.offset, ctx.interleaved, ctx.conjugate, ctx.backend = offset, interleaved, conjugate, backend


def _backward(ctx, grad):
    cos, sin, offsets = ctx.saved_tensors
    # A rotation's transpose is the rotation by the opposite angle. The kernel needs unit stride along D (a sum's
    # upstream gradient arrives expanded, stride 0).
    if grad.stride(-1) != 1:
        grad = grad.contiguous()
    dx = _rotary_op(grad, cos, sin, offsets, ctx.offset, ctx.interleaved, not ctx.conjugate, ctx.backend)
    return dx, None, None, None, None, None, None, None


_rotary_op.register_autograd(_backward, setup_context=_setup_context)


@custom_op("fasttrain::rotary_", mutates_args=("x",), reference=Reference.inplace)
def _rotary_inplace_op(
    x: Tensor, cos: Tensor, sin: Tensor, offsets: Tensor | None, offset: int, interleaved: bool, backend: str
) -> None:
    ROTARY[backend].inplace(x, cos, sin, offsets, offset, interleaved)


@_rotary_inplace_op.register_fake
def _(x, cos, sin, offsets, offset, interleaved, backend):
    return None


# ---- the short path: the commonest call, straight to the aot op ----------------------------------------------------

_AOT_OP = ROTARY.direct["aot"].default if "aot" in ROTARY.direct else None


def _aot_short(x, cos, sin, interleaved, inplace, seqlen_offsets, backend) -> Tensor | None:
    """The aot op's rotation for a call that `_check` and the choice below would send there unchanged (the model's):
    no backend named or forced, out of place, half-split pairs, an int offset within the table, plain tensors on one
    device, x of a shipped dtype and size with unit stride along D, contiguous (T_ro, R/2) tables of one shipped dtype,
    the aot column live for the device. Else None, and the general path checks, chooses and calls; it does nothing
    else this one skips, so both give the same launch (tests/test_rotary_aot.py)."""
    if backend is not None or _AOT_OP is None or type(x) is not Tensor or interleaved is not False or inplace:
        return None
    if _backend.aot_reason(device := x.device) is not None:  # first: a CPU tensor leaves at once
        return None
    if type(cos) is not Tensor or type(sin) is not Tensor or type(seqlen_offsets) is not int or seqlen_offsets < 0:
        return None
    dtype = x.dtype
    if dtype not in _AOT_DTYPES or x.dim() != 4 or cos.dim() != 2 or sin.shape != cos.shape:
        return None
    if (
        cos.dtype not in (torch.float32, dtype)
        or sin.dtype != cos.dtype
        or cos.device != device
        or sin.device != device
    ):
        return None
    _, T, H, D = x.shape
    n_pos, half = cos.shape
    if D % 16 or D > _AOT_MAX_HEAD_DIM or H > _AOT_MAX_HEADS or not _AOT_MIN_HALF <= half <= D // 2:
        return None
    if seqlen_offsets + T > n_pos or x.stride(-1) != 1 or not (cos.is_contiguous() and sin.is_contiguous()):
        return None
    if x.numel() > _I32 or cos.numel() > _I32 or os.environ.get("FASTTRAIN_BACKEND", _backend.AUTO) != _backend.AUTO:
        return None
    return _AOT_OP(x, cos.detach(), sin.detach(), None, seqlen_offsets, False, False)


# ---- the public function: check the arguments, choose, call --------------------------------------------------------


def _check(x, cos, sin, seqlen_offsets) -> None:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"apply_rotary_emb: x must be a floating-point tensor, got {_kind(x)}")
    if x.dim() != 4:
        raise ValueError(f"apply_rotary_emb: x must be a (B, T, H, D) tensor, got shape {tuple(x.shape)}")
    B, T, _, D = x.shape
    for name, t in (("cos", cos), ("sin", sin)):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(f"apply_rotary_emb: {name} must be a floating-point tensor, got {_kind(t)}")
        if t.dim() not in (2, 3):
            raise ValueError(
                f"apply_rotary_emb: {name} must be a (T_ro, R/2) or (B, T, R/2) tensor, got shape {tuple(t.shape)}"
            )
        if t.device != x.device:
            raise ValueError(f"apply_rotary_emb: {name} must be on x's device ({x.device}), got {t.device}")
    if sin.shape != cos.shape:
        raise ValueError(f"apply_rotary_emb: sin must have cos's shape {tuple(cos.shape)}, got {tuple(sin.shape)}")
    if not 1 <= 2 * cos.shape[-1] <= D:
        raise ValueError(
            f"apply_rotary_emb: cos/sin must have 1..{D // 2} columns (rotary_dim / 2 <= head_dim / 2), "
            f"got {cos.shape[-1]}"
        )
    if isinstance(seqlen_offsets, Tensor):
        if seqlen_offsets.is_floating_point() or seqlen_offsets.is_complex() or seqlen_offsets.dtype == torch.bool:
            raise TypeError(
                f"apply_rotary_emb: seqlen_offsets must be an int or an integer tensor, got {seqlen_offsets.dtype}"
            )
        if seqlen_offsets.shape != (B,):
            raise ValueError(
                f"apply_rotary_emb: seqlen_offsets must be an integer tensor of shape ({B},), "
                f"got {tuple(seqlen_offsets.shape)}"
            )
        if seqlen_offsets.device != x.device:
            raise ValueError(f"apply_rotary_emb: seqlen_offsets must be on x's device ({x.device})")
    elif isinstance(seqlen_offsets, bool) or not isinstance(seqlen_offsets, numbers.Integral):
        raise TypeError(
            f"apply_rotary_emb: seqlen_offsets must be an int or an integer tensor, got {type(seqlen_offsets).__name__}"
        )
    elif seqlen_offsets < 0:
        raise ValueError(f"apply_rotary_emb: seqlen_offsets must be an int >= 0, got {seqlen_offsets}")
    if cos.dim() == 3:
        if cos.shape[1] != T or cos.shape[0] not in (1, B):
            raise ValueError(
                f"apply_rotary_emb: per-sequence cos/sin must be ({B}, {T}, R/2) or (1, {T}, R/2), "
                f"got {tuple(cos.shape)}"
            )
        if not (isinstance(seqlen_offsets, numbers.Integral) and seqlen_offsets == 0):
            raise ValueError("apply_rotary_emb: seqlen_offsets must be 0 with per-sequence (B, T, R/2) cos/sin")
    elif isinstance(seqlen_offsets, numbers.Integral) and seqlen_offsets + T > cos.shape[0]:
        raise ValueError(
            f"apply_rotary_emb: cos/sin have {cos.shape[0]} positions, fewer than seqlen_offsets + T = "
            f"{seqlen_offsets + T}"
        )


def _kind(t) -> str:
    """What a wrong argument is, for an error message: its dtype, or its type when not a tensor."""
    return str(t.dtype) if isinstance(t, Tensor) else type(t).__name__


def apply_rotary_emb(
    x: Tensor,
    cos: Tensor,
    sin: Tensor,
    interleaved: bool = False,
    inplace: bool = False,
    seqlen_offsets: int | Tensor = 0,
    *,
    backend: str | None = None,
) -> Tensor:
    """Rotate x (B, T, H, D) by the angles whose cos/sin are given, as flash-attn's `apply_rotary_emb`.

    cos, sin: (T_ro, R/2), row t + seqlen_offsets used for token t, or (B, T, R/2) per sequence (seqlen_offsets 0),
    or (1, T, R/2) shared by every sequence (seqlen_offsets 0; as Hugging Face's rotary embeddings return them).
    R = 2 * cos.shape[-1] <= D: the first R dims of each head are rotated, the rest pass through. interleaved=False
    pairs dim i with i + R/2 (GPT-NeoX), True pairs 2i with 2i + 1 (GPT-J). seqlen_offsets: an int, or a (B,) integer
    tensor of per-sequence start positions (KV-cache decoding; a position past the table is an error on the cpu
    backend, NaN on the triton backend, since checking it there would sync). Math in fp32; the result is in x's
    dtype, a new contiguous tensor, or x itself when inplace=True (which refuses x requiring grad). Gradients flow to
    x only: cos/sin are detached on every backend (the model's tables are fixed buffers; flash-attn gives them no
    gradient either).
    backend: "auto" (default), "aot" (CUDA, the shipped cubins: kernels/rotary.py aot_kernels), "triton" (CUDA; CPU
    tensors under TRITON_INTERPRET=1), "cpu" (csrc/rotary_cpu.cpp: fp32, bf16, fp16 CPU tensors) or "reference".
    """
    if (out := _aot_short(x, cos, sin, interleaved, inplace, seqlen_offsets, backend)) is not None:
        return out
    _check(x, cos, sin, seqlen_offsets)
    for name, flag in (("interleaved", interleaved), ("inplace", inplace)):
        if not isinstance(flag, bool):
            raise TypeError(f"apply_rotary_emb: {name} must be a bool, got {type(flag).__name__}")
    cos, sin = cos.detach(), sin.detach()
    if cos.dim() == 3 and cos.shape[0] == 1:
        cos, sin = cos[0], sin[0]  # (1, T, R/2) -> (T, R/2): one table for every sequence (HF's rotary tables)
    if inplace and x.requires_grad and torch.is_grad_enabled():
        raise ValueError("apply_rotary_emb: inplace=True needs x that does not require grad (or torch.no_grad())")
    if inplace and any(stride == 0 and size > 1 for stride, size in zip(x.stride(), x.shape)):
        # An expanded x: every alias would be rotated again (by racing programs or threads on the kernels).
        raise ValueError(
            f"apply_rotary_emb: inplace=True needs x whose elements do not share memory, got strides "
            f"{x.stride()} (an expanded tensor; pass .contiguous() or inplace=False)"
        )
    offsets, offset = (seqlen_offsets, 0) if isinstance(seqlen_offsets, Tensor) else (None, int(seqlen_offsets))
    name = ROTARY.choose(x, cos, sin, offsets, interleaved, backend=backend)
    if name != "reference":
        if x.stride(-1) != 1:
            if inplace:
                raise ValueError("apply_rotary_emb: inplace=True needs x with unit stride along D")
            x = x.contiguous()
        cos, sin = cos.contiguous(), sin.contiguous()  # tables: one row per position, small
    if inplace:
        _rotary_inplace_op(x, cos, sin, offsets, offset, interleaved, name)
        return x
    return _rotary_op(x, cos, sin, offsets, offset, interleaved, False, name)
