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
            cos, sin = _rows(cos, sin, positions)  # (B, T, R/2)
        else:
            cos, sin = cos[seqlen_offsets : seqlen_offsets + T], sin[seqlen_offsets : seqlen_offsets + T]  # (T, R/2)
    compute = torch.promote_types(x.dtype, torch.float32)
    cos, sin = cos.to(compute).unsqueeze(-2), sin.to(compute).unsqueeze(-2)  # (..., T, 1, R/2): over heads
    xr = x[..., :rot].to(compute)
    x1, x2 = (xr[..., 0::2], xr[..., 1::2]) if interleaved else (xr[..., : rot // 2], xr[..., rot // 2 :])
    o1, o2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin  # (B, T, H, R/2) each
    out = torch.stack((o1, o2), dim=-1).flatten(-2) if interleaved else torch.cat((o1, o2), dim=-1)
    return torch.cat((out.to(x.dtype), x[..., rot:]), dim=-1)  # (B, T, H, D)


def _rows(cos: Tensor, sin: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
    """The table rows at integer positions (any shape), with cos 1 and sin 0 (the identity) for a position outside
    the table, as flash-attn's kernel reads them: (..., R/2) each."""
    n_pos = cos.shape[0]
    inside = (positions >= 0) & (positions < n_pos)
    rows = torch.where(inside, positions, n_pos)  # row n_pos: the identity row appended below
    cos = torch.cat((cos, cos.new_ones(1, cos.shape[1])))  # (n_pos + 1, R/2)
    sin = torch.cat((sin, sin.new_zeros(1, sin.shape[1])))
    return cos[rows], sin[rows]


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
    elif cos.shape[0] < T:  # flash-attn asserts this with offsets per sequence too
        raise ValueError(
            f"apply_rotary_emb: cos/sin have {cos.shape[0]} positions, fewer than the sequence length T = {T}"
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
    cu_seqlens: Tensor | None = None,
    max_seqlen: int | None = None,
    *,
    backend: str | None = None,
) -> Tensor:
    """Rotate x (B, T, H, D) by the angles whose cos/sin are given, as flash-attn's `apply_rotary_emb`.

    cos, sin: (T_ro, R/2), row t + seqlen_offsets used for token t, or (B, T, R/2) per sequence (seqlen_offsets 0),
    or (1, T, R/2) shared by every sequence (seqlen_offsets 0; as Hugging Face's rotary embeddings return them).
    R = 2 * cos.shape[-1] <= D: the first R dims of each head are rotated, the rest pass through. interleaved=False
    pairs dim i with i + R/2 (GPT-NeoX), True pairs 2i with 2i + 1 (GPT-J). seqlen_offsets: an int, or a (B,) integer
    tensor of per-sequence start positions (KV-cache decoding; a row whose position falls outside the table passes
    through unrotated, as on flash-attn's kernel). cu_seqlens (batch + 1,) integer tensor, with max_seqlen an int:
    x is the packed rows (total, H, D) of `flash_attn_varlen_func`, sequence b the rows cu_seqlens[b] to
    cu_seqlens[b + 1], each rotated from its own position 0 (+ seqlen_offsets or seqlen_offsets[b]), cos/sin
    (T_ro, R/2); rows outside every sequence, and the rows of a sequence past its first max_seqlen (rounded up to
    flash-attn's row tile: 8 rows, 4 past 128 rotary dims), pass through.
    Math in fp32; the result is in x's dtype, a new contiguous tensor, or x itself when inplace=True (gradients then
    flow through x's new value, as on flash-attn; a leaf requiring grad is rotated in place too, as flash-attn's,
    and an alias of it carrying the gradient returned). Gradients flow to x only: cos/sin are detached on every
    backend (the model's tables are fixed buffers; flash-attn gives them no gradient either).
    backend: "auto" (default), "aot" (CUDA, the shipped cubins: kernels/rotary.py aot_kernels), "triton" (CUDA; CPU
    tensors under TRITON_INTERPRET=1), "cpu" (csrc/rotary_cpu.cpp: fp32, bf16, fp16 CPU tensors) or "reference".
    """
    if cu_seqlens is not None:
        return _apply_varlen(x, cos, sin, interleaved, inplace, seqlen_offsets, cu_seqlens, max_seqlen, backend)
    if (out := _aot_short(x, cos, sin, interleaved, inplace, seqlen_offsets, backend)) is not None:
        return out
    _check(x, cos, sin, seqlen_offsets)
    for name, flag in (("interleaved", interleaved), ("inplace", inplace)):
        if not isinstance(flag, numbers.Integral):  # flash-attn reads both by truth: an int 0 or 1 too
            raise TypeError(f"apply_rotary_emb: {name} must be a bool, got {type(flag).__name__}")
    interleaved, inplace = bool(interleaved), bool(inplace)
    cos, sin = cos.detach(), sin.detach()
    if cos.dim() == 3 and cos.shape[0] == 1:
        cos, sin = cos[0], sin[0]  # (1, T, R/2) -> (T, R/2): one table for every sequence (HF's rotary tables)
    if inplace and x.requires_grad and torch.is_grad_enabled():
        # As flash-attn's: x rotated in place, the gradient rotated back (a leaf too: see _rotate_in_place).
        return _rotate_in_place(x, lambda t: [t], [(cos, sin)], interleaved, seqlen_offsets, backend)
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


def apply_rotary(
    x: Tensor,
    cos: Tensor,
    sin: Tensor,
    seqlen_offsets: int | Tensor = 0,
    cu_seqlens: Tensor | None = None,
    max_seqlen: int | None = None,
    interleaved: bool = False,
    inplace: bool = False,
    conjugate: bool = False,
) -> Tensor:
    """flash-attn's `flash_attn.ops.triton.rotary.apply_rotary`: its argument order, and like flash-attn's kernel
    call outside autograd (the result carries no gradient; inplace=True rotates x's storage even where x requires
    grad). conjugate=True rotates by the opposite angles (the inverse rotation: flash-attn's backward). The rest as
    `apply_rotary_emb`, on the same kernels."""
    if not isinstance(conjugate, bool):
        raise TypeError(f"apply_rotary: conjugate must be a bool, got {type(conjugate).__name__}")
    with torch.no_grad():
        sin = -sin if conjugate else sin  # the rotation by the opposite angle
        return apply_rotary_emb(x, cos, sin, interleaved, inplace, seqlen_offsets, cu_seqlens, max_seqlen)


def _apply_varlen(x, cos, sin, interleaved, inplace, seqlen_offsets, cu_seqlens, max_seqlen, backend) -> Tensor:
    """apply_rotary_emb over packed sequences: each token's own table row (its position in its sequence plus the
    offset, or the identity outside the table, every sequence or a sequence's first rows up to max_seqlen rounded up
    to flash-attn's row tile) gathered into
    a (total, R/2) table, then the same op on x viewed as one sequence of `total` tokens. The cost past the
    rotation: the gathered cos/sin, each 1/H of x's elements at full rotation or less, and a handful of small index
    ops; no host sync."""
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"apply_rotary_emb: x must be a floating-point tensor, got {_kind(x)}")
    if x.dim() != 3:
        raise ValueError(
            f"apply_rotary_emb: x must be a (total, H, D) tensor with cu_seqlens, got shape {tuple(x.shape)}"
        )
    if not isinstance(cu_seqlens, Tensor) or cu_seqlens.is_floating_point() or cu_seqlens.dtype == torch.bool:
        raise TypeError(f"apply_rotary_emb: cu_seqlens must be an integer tensor, got {_kind(cu_seqlens)}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(
            f"apply_rotary_emb: cu_seqlens must be a (batch + 1,) tensor, got shape {tuple(cu_seqlens.shape)}"
        )
    if cu_seqlens.device != x.device:
        raise ValueError(f"apply_rotary_emb: cu_seqlens must be on x's device ({x.device}), got {cu_seqlens.device}")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, numbers.Integral):
        raise TypeError(f"apply_rotary_emb: max_seqlen must be an int with cu_seqlens, got {type(max_seqlen).__name__}")
    for name, t in (("cos", cos), ("sin", sin)):
        if isinstance(t, Tensor) and t.dim() != 2:
            raise ValueError(
                f"apply_rotary_emb: {name} must be a (T_ro, R/2) tensor with cu_seqlens, got shape {tuple(t.shape)}"
            )
    batch = cu_seqlens.numel() - 1
    # The general checks, on x as one sequence of max_seqlen tokens per sequence: table shapes, dtypes, devices, an
    # int offset + max_seqlen within the table (flash-attn's bound), tensor offsets of shape (batch,).
    _check(x.new_empty(()).expand(batch, max(int(max_seqlen), 0), *x.shape[1:]), cos, sin, seqlen_offsets)
    total = x.shape[0]
    tokens = torch.arange(total, device=x.device)  # (total,)
    if batch == 0:
        positions = torch.full_like(tokens, -1)  # no sequence: every row passes through
    else:
        ends = cu_seqlens[1:].long()
        seq = torch.searchsorted(ends, tokens, right=True)  # (total,): the sequence of each row, batch past the last
        seq_row = seq.clamp(max=batch - 1)
        shift = seqlen_offsets.long()[seq_row] if isinstance(seqlen_offsets, Tensor) else int(seqlen_offsets)
        t = tokens - cu_seqlens.long()[seq_row]  # (total,): each row's index in its sequence
        # flash-attn's grid covers max_seqlen rows per sequence rounded up to its row tile (8 rows, 4 past 128
        # rotary dims): the rows of a longer sequence past that stay as they are
        tile = 8 if 2 * cos.shape[-1] <= 128 else 4
        covered = -(-int(max_seqlen) // tile) * tile
        positions = torch.where((seq < batch) & (t < covered), t + shift, -1)
    cos, sin = _rows(cos.detach(), sin.detach(), positions)  # (total, R/2) each
    out = apply_rotary_emb(x[None], cos, sin, interleaved, inplace, 0, backend=backend)  # x: (1, total, H, D)
    # in place: x, or the alias carrying the gradient when x is a leaf requiring grad (see _rotate_in_place)
    return x if inplace and (out.grad_fn is None or not x.is_leaf) else out[0]


# ---- the rest of flash-attn's `flash_attn.layers.rotary`, over apply_rotary_emb ------------------------------------

apply_rotary_emb_func = apply_rotary_emb  # flash-attn's older name for the same function


def rotate_half(x: Tensor, interleaved: bool = False) -> Tensor:
    """x's pairs turned a quarter: (x1, x2) -> (-x2, x1), pairs (i, i + D/2) or, interleaved, (2i, 2i + 1)."""
    if not interleaved:
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)  # (..., D/2, 2) -> (..., D)


def apply_rotary_emb_torch(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool = False) -> Tensor:
    """flash-attn's PyTorch rotation: x (B, T, H, D), cos/sin (T, R/2) or (B, T, R/2), computed in the dtype torch
    promotes x and the tables to (not fp32 as apply_rotary_emb_reference)."""
    rot = 2 * cos.shape[-1]
    if rot > x.shape[-1]:
        raise ValueError(f"apply_rotary_emb_torch: rotary_dim {rot} must be <= head_dim {x.shape[-1]}")

    def widen(t):  # (..., R/2) -> (..., 1, R): one row per head, each angle on both members of its pair
        t = t.repeat_interleave(2, dim=-1) if interleaved else torch.cat((t, t), dim=-1)
        return t.unsqueeze(-2)

    xr = x[..., :rot]
    return torch.cat((xr * widen(cos) + rotate_half(xr, interleaved) * widen(sin), x[..., rot:]), dim=-1)


class _RotateInPlace(torch.autograd.Function):
    """Rotate views of t in place (select(t) gives them, (B, T, H, D) each, tables[i] the (cos, sin) of the i-th),
    with autograd: the gradient is the upstream gradient's same views rotated back (-sin), the rest passed through.
    flash-attn's in-place functions keep gradients flowing the same way."""

    @staticmethod
    def forward(ctx, t, select, tables, interleaved, seqlen_offsets, backend, dirty):
        for view, (cos, sin) in zip(select(t), tables):
            apply_rotary_emb(view, cos, sin, interleaved, True, seqlen_offsets, backend=backend)
        if dirty:  # else (a leaf, or a view of one) the output is an alias of t carrying the gradient
            ctx.mark_dirty(t)
        ctx.select, ctx.tables, ctx.interleaved, ctx.offsets = select, tables, interleaved, seqlen_offsets
        ctx.backend = backend
        return t

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone(memory_format=torch.contiguous_format)  # ours to rotate in place, the views' shapes kept
        for view, (cos, sin) in zip(ctx.select(grad), ctx.tables):
            apply_rotary_emb(view, cos, -sin, ctx.interleaved, True, ctx.offsets, backend=ctx.backend)
        return grad, None, None, None, None, None, None


def _rotate_in_place(t, select, tables, interleaved, seqlen_offsets, backend=None) -> Tensor:
    tables = [(cos.detach(), sin.detach()) for cos, sin in tables]
    if t.requires_grad and torch.is_grad_enabled():
        # torch refuses to mark a leaf requiring grad (or a view of one) modified; flash-attn rotates it all the
        # same, returning an alias that carries the gradient back to it: so do we
        dirty = not (t.is_leaf or (t._base is not None and t._base.is_leaf))
        return _RotateInPlace.apply(t, select, tables, interleaved, seqlen_offsets, backend, dirty)
    for view, (cos, sin) in zip(select(t), tables):
        apply_rotary_emb(view, cos, sin, interleaved, True, seqlen_offsets, backend=backend)
    return t


def apply_rotary_emb_qkv_(
    qkv: Tensor,
    cos: Tensor,
    sin: Tensor,
    cos_k: Tensor | None = None,
    sin_k: Tensor | None = None,
    interleaved: bool = False,
    seqlen_offsets: int | Tensor = 0,
    num_heads_q: int | None = None,
) -> Tensor:
    """Rotate q and k inside qkv in place, as flash-attn's `apply_rotary_emb_qkv_`, and return qkv.

    qkv: (B, T, 3, H, D), or (B, T, Hq + 2 * Hk, D) with num_heads_q = Hq (GQA). k takes cos_k/sin_k when given
    (XPos), else cos/sin. Tables and seqlen_offsets as apply_rotary_emb's; v is untouched. Gradients flow to qkv."""
    if not isinstance(qkv, Tensor):
        raise TypeError(f"apply_rotary_emb_qkv_: qkv must be a tensor, got {type(qkv).__name__}")
    if (cos_k is None) != (sin_k is None):
        raise ValueError("apply_rotary_emb_qkv_: cos_k and sin_k must be given together")
    if qkv.dim() == 5:
        if qkv.shape[2] != 3:
            raise ValueError(f"apply_rotary_emb_qkv_: qkv must be (B, T, 3, H, D), got shape {tuple(qkv.shape)}")
        B, T, _, H, D = qkv.shape
        if cos_k is None and qkv.stride(2) == H * qkv.stride(3):
            select = lambda t: [t[:, :, :2].view(B, T, 2 * H, D)]  # noqa: E731  q and k as one (B, T, 2H, D) view
        else:
            select = lambda t: [t[:, :, 0], t[:, :, 1]]  # noqa: E731
    elif qkv.dim() == 4:
        if isinstance(num_heads_q, bool) or not isinstance(num_heads_q, numbers.Integral):
            raise TypeError(
                "apply_rotary_emb_qkv_: num_heads_q must be an int with a (B, T, Hq + 2 * Hk, D) qkv, "
                f"got {type(num_heads_q).__name__}"
            )
        hq = int(num_heads_q)
        hk = (qkv.shape[2] - hq) // 2
        if hq < 1 or hk < 1 or qkv.shape[2] != hq + 2 * hk:
            raise ValueError(
                f"apply_rotary_emb_qkv_: qkv's {qkv.shape[2]} heads must be num_heads_q ({num_heads_q}) + 2 * Hk"
            )
        if cos_k is None:
            select = lambda t: [t[:, :, : hq + hk]]  # noqa: E731
        else:
            select = lambda t: [t[:, :, :hq], t[:, :, hq : hq + hk]]  # noqa: E731
    else:
        raise ValueError(
            "apply_rotary_emb_qkv_: qkv must be (B, T, 3, H, D) or (B, T, Hq + 2 * Hk, D), "
            f"got shape {tuple(qkv.shape)}"
        )
    tables = [(cos, sin)] if cos_k is None else [(cos, sin), (cos_k, sin_k)]
    if cos_k is None and len(select(qkv)) == 2:
        tables = tables * 2
    return _rotate_in_place(qkv, select, tables, interleaved, seqlen_offsets)


def apply_rotary_emb_kv_(
    kv: Tensor, cos: Tensor, sin: Tensor, interleaved: bool = False, seqlen_offsets: int | Tensor = 0
) -> Tensor:
    """Rotate k inside kv (B, T, 2, H, D) in place, as flash-attn's `apply_rotary_emb_kv_`, and return kv (v is
    untouched; gradients flow to kv)."""
    if not isinstance(kv, Tensor) or kv.dim() != 5 or kv.shape[2] != 2:
        got = tuple(kv.shape) if isinstance(kv, Tensor) else type(kv).__name__
        raise ValueError(f"apply_rotary_emb_kv_: kv must be a (B, T, 2, H, D) tensor, got {got}")
    return _rotate_in_place(kv, lambda t: [t[:, :, 0]], [(cos, sin)], interleaved, seqlen_offsets)


class RotaryEmbedding(torch.nn.Module):
    """flash-attn's `RotaryEmbedding` module: rotary embeddings (RoFormer) applied in place to qkv or to (q, kv),
    with a cos/sin cache grown on demand, and XPos when scale_base is given.

    dim: the rotary dims per head (R); base: the frequency base; interleaved: GPT-J pairs; device: for the buffers.
    Buffers (not saved in the state dict): inv_freq (R/2,), and scale (R/2,) for XPos. The cache holds cos/sin
    (seqlen, R/2) in the input's dtype, computed in fp32, rebuilt when a longer sequence, another device or dtype, or
    training after inference mode needs it; with XPos, q's tables are scaled by scale ** ((t - seqlen // 2) /
    scale_base) and k's divided by it."""

    def __init__(self, dim: int, base=10000.0, interleaved=False, scale_base=None, device=None):
        super().__init__()
        self.dim = dim
        self.base = float(base)
        self.register_buffer("inv_freq", self._compute_inv_freq(device), persistent=False)
        self.interleaved = interleaved
        self.scale_base = scale_base
        scale = None
        if scale_base is not None:
            scale = (torch.arange(0, dim, 2, device=device, dtype=torch.float32) + 0.4 * dim) / (1.4 * dim)
        self.register_buffer("scale", scale, persistent=False)
        self._seq_len_cached = 0
        self._cos_cached = self._sin_cached = self._cos_k_cached = self._sin_k_cached = None
        # whether the cache was made under inference mode (so holds inference tensors): a flag, since torch.compile
        # cannot trace tensor.is_inference() and would break the graph at every training call
        self._cached_in_inference = False

    def _compute_inv_freq(self, device=None) -> Tensor:
        return 1.0 / (self.base ** (torch.arange(0, self.dim, 2, device=device, dtype=torch.float32) / self.dim))

    def _update_cos_sin_cache(self, seqlen, device=None, dtype=None) -> None:
        cached = self._cos_cached
        if not (
            seqlen > self._seq_len_cached
            or cached is None
            or cached.device != device
            or cached.dtype != dtype
            or (self.training and self._cached_in_inference)
        ):
            return
        self._seq_len_cached = seqlen
        self._cached_in_inference = torch.is_inference_mode_enabled()
        # Angles in fp32 whatever the model's dtype: positions times frequencies lose too much in bf16.
        inv_freq = self.inv_freq if self.inv_freq.dtype == torch.float32 else self._compute_inv_freq(device)
        freqs = torch.outer(torch.arange(seqlen, device=device, dtype=torch.float32), inv_freq)  # (seqlen, R/2)
        if self.scale is None:
            self._cos_cached, self._sin_cached = torch.cos(freqs).to(dtype), torch.sin(freqs).to(dtype)
            return
        power = (torch.arange(seqlen, dtype=self.scale.dtype, device=self.scale.device) - seqlen // 2) / self.scale_base
        scale = self.scale.to(device=power.device) ** power[:, None]  # (seqlen, R/2)
        cos, sin = torch.cos(freqs), torch.sin(freqs)
        self._cos_cached, self._sin_cached = (cos * scale).to(dtype), (sin * scale).to(dtype)
        self._cos_k_cached, self._sin_k_cached = (cos / scale).to(dtype), (sin / scale).to(dtype)

    def forward(
        self,
        qkv: Tensor,
        kv: Tensor | None = None,
        seqlen_offset: int | Tensor = 0,
        max_seqlen: int | None = None,
        num_heads_q: int | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """qkv: (B, T, 3, H, D) or (B, T, Hq + 2 * Hk, D) with num_heads_q, or q (B, T, H, D) when kv
        (B, T, 2, H, D) is given. seqlen_offset: an int or a (B,) tensor of start positions; with a tensor, pass
        max_seqlen to grow the cache that far. Rotates in place; returns qkv, or (q, kv)."""
        seqlen = qkv.shape[1]
        if max_seqlen is not None:
            self._update_cos_sin_cache(max_seqlen, device=qkv.device, dtype=qkv.dtype)
        elif isinstance(seqlen_offset, int):
            self._update_cos_sin_cache(seqlen + seqlen_offset, device=qkv.device, dtype=qkv.dtype)
        xpos = self.scale is not None
        if kv is None:
            return apply_rotary_emb_qkv_(
                qkv,
                self._cos_cached,
                self._sin_cached,
                self._cos_k_cached if xpos else None,
                self._sin_k_cached if xpos else None,
                interleaved=self.interleaved,
                seqlen_offsets=seqlen_offset,
                num_heads_q=num_heads_q,
            )
        q = apply_rotary_emb(
            qkv, self._cos_cached, self._sin_cached, self.interleaved, inplace=True, seqlen_offsets=seqlen_offset
        )
        kv = apply_rotary_emb_kv_(
            kv,
            self._cos_k_cached if xpos else self._cos_cached,
            self._sin_k_cached if xpos else self._sin_cached,
            interleaved=self.interleaved,
            seqlen_offsets=seqlen_offset,
        )
        return q, kv
