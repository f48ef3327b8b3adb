"""Fused attention: flash-attn's `flash_attn_func` / `flash_attn_varlen_func` and torch's
`scaled_dot_product_attention` over one registered op.

Backends: `triton` (kernels/attention*.py: CUDA fp16/bf16; CPU tensors under TRITON_INTERPRET=1), `cpu`
(csrc/attention_cpu.cpp: CPU tensors in fp32, bf16 or fp16, computed in fp32) and `reference`
(fasttrain/ops/attention_reference.py: plain PyTorch, any device and dtype, and the only one with an `attn_mask`).
Attention dropout draws the same mask on every backend: a pure function of an int64 (2,) seed tensor on q's device
(fasttrain/ops/attention_dropout.py), which the backward reads again.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor

from fasttrain import _backend
from fasttrain.ops._op import custom_op, reference_gradients
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
#   dropout_seed) -> (out, lse); backward(do, q, k, v, out, lse, dlse, the forward's arguments from cu_seqlens_q,
#   deterministic, into) -> (dq, dk, dv), written into `into` (three tensors shaped like q, k, v: views of one packed
#   gradient) when it is given. The kernels serve no attn_mask (their reasons say so).


def _written(grads, into):
    """grads as they are, or copied into the given tensors (a backend that cannot write into views)."""
    if into is None:
        return tuple(g.contiguous() for g in grads)
    return tuple(dst.copy_(g) for dst, g in zip(into, grads))


class Reference:
    @staticmethod
    def forward(q, k, v, cu_q, cu_k, max_q, max_k, scale, left, right, attn_mask, dropout_p, seed):
        out, lse = attention_reference(q, k, v, scale, left, right, cu_q, cu_k, attn_mask, dropout_p, seed)
        return out.contiguous(), lse.contiguous()  # fresh tensors: a custom op may not return views of its inputs

    @staticmethod
    def backward(do, q, k, v, out, lse, dlse, cu_q, cu_k, max_q, max_k, scale, left, right, mask, p, seed, det, into):
        grads = attention_reference_backward(do, q, k, v, out, lse, dlse, scale, left, right, cu_q, cu_k, mask, p, seed)
        return _written(grads, into)

    @staticmethod
    def traced(q, k, v, cu_q, cu_k, max_q, max_k, scale, left, right, attn_mask, dropout_p, seed, deterministic):
        """What a torch.compile trace records for the reference backend: its plain torch ops, inline, dropout
        included (the seed's mask, as every backend draws it: plain tensor ops on the seed tensor, which autograd
        keeps for the backward); packed sequences, whose offsets it would read on the host, keep the registered op."""
        if cu_q is not None:
            args = (cu_q, cu_k, max_q, max_k, scale, left, right, attn_mask, dropout_p, seed, deterministic)
            return _forward_op.op(q, k, v, *args, "reference")
        return attention_reference(q, k, v, scale, left, right, None, None, attn_mask, dropout_p, seed)


class Triton:
    @staticmethod
    def forward(q, k, v, cu_q, cu_k, max_q, max_k, scale, left, right, attn_mask, dropout_p, seed):
        return _backend.kernels("attention").attention_forward(
            q, k, v, cu_q, cu_k, max_q, max_k, scale, left, right, dropout_p, seed
        )

    @staticmethod
    def backward(do, q, k, v, out, lse, dlse, cu_q, cu_k, max_q, max_k, scale, left, right, mask, p, seed, det, into):
        return _backend.kernels("attention_backward").attention_backward(
            do, q, k, v, out, lse, dlse, cu_q, cu_k, max_q, max_k, scale, left, right, det, into, p, seed
        )


class Cpu:
    @staticmethod
    def forward(q, k, v, cu_q, cu_k, max_q, max_k, scale, left, right, attn_mask, dropout_p, seed):
        return torch.ops.fasttrain.attention_forward_cpu(q, k, v, cu_q, cu_k, scale, left, right, dropout_p, seed)

    @staticmethod
    def backward(do, q, k, v, out, lse, dlse, cu_q, cu_k, max_q, max_k, scale, left, right, mask, p, seed, det, into):
        grads = torch.ops.fasttrain.attention_backward_cpu(
            do, q, k, v, out, lse, dlse, cu_q, cu_k, scale, left, right, p, seed
        )
        return _written(grads, into)


# ---- the table: which backend can serve which inputs ----------------------------------------------------------------
# Each reason takes (q, k, v, cu_seqlens_q, max_seqlen_q, max_seqlen_k, attn_mask, dropout_p).

# Read once, at import: under torch.compile, Dynamo traces the choice but cannot trace the extension's import.
_CPU_OP_REASON = _backend.native_op_reason("attention_forward_cpu")
_MASK = "an attn_mask is not implemented in the kernels"


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
    for name, t, rows in (("q", q, max_q), ("k", k, max_k), ("v", v, max_k)):
        if rows * max(t.stride(-3), t.shape[-2] * t.shape[-1]) >= 2**31:
            return (
                f"{name}'s longest sequence ({rows} rows of {t.shape[-2]} x {t.shape[-1]}) spans 2**31 elements or "
                f"more, past the kernels' int32 row offsets"
            )
    return None


def _triton_reason(q, k, v, cu_q, max_q, max_k, attn_mask, dropout_p) -> str | None:
    if (why := _unsupported(attn_mask, dropout_p) or _backend.triton_tensor_reason(q)) is not None:
        return why
    if q.device.type == "cuda" and q.dtype not in _KERNEL_DTYPES_CUDA:
        return f"the CUDA kernels take fp16/bf16, got {q.dtype}"
    if (why := _kernel_limit_reason(q, k, v, cu_q, max_q, max_k)) is not None:
        return why
    if q.shape[-1] not in HEAD_DIMS:
        return f"head_dim must be one of {HEAD_DIMS} for the kernels, got {q.shape[-1]}"
    return None


def _cpu_reason(q, k, v, cu_q, max_q, max_k, attn_mask, dropout_p) -> str | None:
    return _unsupported(attn_mask, dropout_p) or _backend.cpu_kernel_reason(q, _CPU_OP_REASON)


ATTENTION = _backend.Table(
    "attention",
    {
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
    deterministic: bool,
    backend: str,
) -> None:
    """The backward written into dq, dk, dv (views of one packed gradient: the packed functions' backward)."""
    args = (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, left, right, None, dropout_p)
    ATTENTION[backend].backward(do, q, k, v, out, lse, dlse, *args, dropout_seed, deterministic, (dq, dk, dv))


@_backward_into_op.register_fake
def _(*args):
    return None


def _setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, scale, left, right, attn_mask, dropout_p, seed, deterministic, backend = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], cu_q, cu_k, attn_mask, seed)
    ctx.args = (max_q, max_k, scale, left, right)
    ctx.dropout_p, ctx.deterministic, ctx.backend = dropout_p, deterministic, backend


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_q, cu_k, attn_mask, seed = ctx.saved_tensors
    max_q, max_k, scale, left, right = ctx.args
    if torch.is_grad_enabled() or ctx.needs_input_grad[10]:
        # A double backward follows (see reference_gradients), or a float attn_mask takes a gradient: the
        # reference's autograd gives every one.
        def reference(q, k, v, mask):
            return attention_reference(q, k, v, scale, left, right, cu_q, cu_k, mask, ctx.dropout_p, seed)

        with torch.enable_grad():
            grads = reference_gradients(reference, (q, k, v, attn_mask), (dout, dlse))
        if not torch.is_grad_enabled():
            grads = tuple(None if g is None else g.detach() for g in grads)
        dq, dk, dv, dmask = grads
        return dq, dk, dv, *(None,) * 7, dmask, *(None,) * 4  # cu_seqlens_q .. right, attn_mask, dropout_p .. backend
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
        deterministic,
        ctx.backend,
    )
    return dq, dk, dv, *(None,) * 12


_forward_op.register_autograd(_backward, setup_context=_setup_context)


# ---- argument checks -----------------------------------------------------------------------------------------------


def _check_like_q(q: Tensor, named, q_name: str = "q") -> None:
    """Each (name, tensor) of `named` has q's dtype and device."""
    for name, t in named:
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have {q_name}'s dtype {q.dtype}, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on {q_name}'s device ({q.device}), got {t.device}")


def _check_qkv(q, k, v, rank: int, layout: str, head_axis: int = -2, names=("q", "k", "v")) -> None:
    qn, kn, vn = names
    for name, t in zip(names, (q, k, v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != rank:
            raise ValueError(f"{name} must be {rank}-D {layout}, got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    _check_like_q(q, ((kn, k), (vn, v)), qn)
    if k.shape != v.shape:
        raise ValueError(f"{kn} and {vn} must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[:-3] != q.shape[:-3] or k.shape[-1] != q.shape[-1]:
        raise ValueError(f"{kn} {tuple(k.shape)} must match {qn} {tuple(q.shape)} in batch and head_dim ({layout})")
    H, Hkv = q.shape[head_axis], k.shape[head_axis]
    if Hkv == 0 or H % Hkv:
        raise ValueError(f"the number of {kn}/{vn} heads ({Hkv}) must divide the number of {qn} heads ({H})")


def _window(causal: bool, window_size) -> tuple[int, int]:
    """flash-attn's (causal, window_size) -> kernel (left, right) diagonal bounds; -1 means unbounded. window_size is
    any pair of integers flash-attn takes: a tuple, a list, or a 2-element integer tensor (read on the host)."""
    if isinstance(window_size, Tensor):
        if window_size.is_floating_point() or window_size.is_complex() or window_size.dtype == torch.bool:
            raise TypeError(f"window_size must hold integers (-1 = unbounded), got a {window_size.dtype} tensor")
        if window_size.shape != (2,):
            raise ValueError(f"window_size must be a pair of ints, got a tensor of shape {tuple(window_size.shape)}")
        window_size = tuple(window_size.tolist())
    if not isinstance(window_size, (tuple, list)) or not all(
        isinstance(w, int) and not isinstance(w, bool) for w in window_size
    ):
        raise TypeError(f"window_size must be a pair of ints (-1 = unbounded), got {window_size!r}")
    if len(window_size) != 2 or not all(w >= -1 for w in window_size):
        raise ValueError(f"window_size must be a pair of ints >= -1 (-1 = unbounded), got {window_size!r}")
    left, right = (UNBOUNDED if w == -1 else w for w in window_size)
    return left, (0 if causal else right)


def _scale(softmax_scale, head_dim: int) -> float:
    if softmax_scale is None:  # head_dim 0: every score is an empty sum, the outputs are empty (as torch's)
        return head_dim**-0.5 if head_dim > 0 else 1.0
    if not isinstance(softmax_scale, (int, float)) or isinstance(softmax_scale, bool):
        raise TypeError(f"softmax_scale must be a float or None, got {type(softmax_scale).__name__}")
    return float(softmax_scale)


def _refuse_unsupported(softcap, alibi_slopes) -> None:
    if softcap != 0.0:
        raise ValueError(f"softcap must be 0.0 (score soft-capping is not implemented), got {softcap!r}")
    if alibi_slopes is not None:
        raise ValueError("alibi_slopes must be None (ALiBi is not implemented)")


def _check_dropout(dropout_p) -> None:
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"dropout_p must be a float, got {type(dropout_p).__name__}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")


def _attend(
    q, k, v, cu_q, cu_k, max_q, max_k, scale, left, right, backend, dropout_p, attn_mask=None, deterministic=False
):
    """(out, lse, the dropout seed or None) from the registered op, on the backend chosen for these inputs."""
    name = ATTENTION.choose(q, k, v, cu_q, max_q, max_k, attn_mask, dropout_p, backend=backend)
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
        bool(deterministic),
        name,
    )
    return out, lse, seed


def attn_probs(q, k, lse, seed, dropout_p, scale, left, right, cu_q=None, cu_k=None, max_q=0, max_k=0) -> Tensor:
    """flash-attn's third value with return_attn_probs: S_dmask (attention_reference.s_dmask, computed from the
    forward's lse and dropout seed only when asked) with dropout, else the empty tensor flash-attn returns."""
    if dropout_p == 0.0:
        return q.new_empty((0,))
    with torch.no_grad():
        return s_dmask(q, k, lse, seed, dropout_p, scale, left, right, cu_q, cu_k, max_q, max_k)


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
):
    """flash-attn's `flash_attn_func`: softmax(q k^T * scale) v over (B, T, H, D) tensors.

    q: (B, Tq, H, D); k, v: (B, Tk, Hkv, D) with Hkv dividing H (GQA/MQA; K and V are never repeated).
    causal: query i sees keys j <= i + Tk - Tq (aligned bottom-right, as flash-attn). window_size (left, right):
    query i sees keys in [i + Tk - Tq - left, i + Tk - Tq + right]; -1 leaves a side unbounded.
    softmax_scale defaults to D**-0.5. head_dim 32, 64, 96, 128 or 256 runs the GPU kernels (fp16/bf16); on the
    CPU the C++ kernel takes any head_dim in fp32, bf16 or fp16.
    dropout_p drops attention probabilities inside the kernels (every backend draws the same mask from a fresh
    seed on q's device, which the backward reads again; fasttrain/ops/attention_dropout.py). softcap and
    alibi_slopes are not implemented (must stay at defaults).
    deterministic: the backward computes dQ by its own kernel (also under torch.use_deterministic_algorithms(True)),
    bit-identical from run to run in a process, and across processes whose autotuners pick the same tiles
    (TRITON_CACHE_AUTOTUNING=1 keeps the picks on disk). Otherwise, on a GPU, dQ may come by float32 atomics from the
    dK/dV kernel where that times faster for the shape (fewer matmuls, a transient float32 buffer of 2x dQ's bytes;
    dQ's last bits vary from run to run, as in flash-attn).
    Returns out (B, Tq, H, D); with return_attn_probs, (out, softmax_lse (B, H, Tq) float32, S_dmask): with
    dropout, flash-attn's S_dmask (B, H, Tq and Tk rounded up to 128) in q's dtype, the probabilities with dropped
    ones negated, computed from lse and the seed only when asked (the kernels never write it); without dropout an
    empty tensor, as flash-attn returns. Query rows that see no key give 0 and lse = +inf.
    backend: "auto" (default), "triton", "cpu" or "reference"; FASTTRAIN_BACKEND overrides auto.
    """
    _check_qkv(q, k, v, 4, "(B, T, H, D)")
    _refuse_unsupported(softcap, alibi_slopes)
    scale, (left, right) = _scale(softmax_scale, q.shape[-1]), _window(causal, window_size)
    _check_dropout(dropout_p)
    out, lse, seed = _attend(
        q, k, v, None, None, q.shape[1], k.shape[1], scale, left, right, backend, dropout_p, deterministic=deterministic
    )
    if not return_attn_probs:
        return out
    return out, lse, attn_probs(q, k, lse, seed, dropout_p, scale, left, right)


# The offsets checked last, per argument: a model hands the same cu_seqlens to every layer and reading them costs a
# host sync, so a tensor is read again only after an in-place change (its _version moves).
_checked_offsets: dict[str, tuple] = {}


def _longest_sequence(name: str, cu: Tensor, total: int) -> int | None:
    """The longest sequence of offsets `cu`, after checking that they rise from 0 to `total`; None where the values
    cannot be read (CUDA graph capture, torch.compile tracing). Only CUDA offsets are remembered between calls (by
    identity and in-place version), since reading them syncs; CPU offsets cost no sync and inference tensors keep no
    version, so those are read every call. A write that bypasses the version counter (through `.data`, or a NumPy or
    DLPack view) is not seen on a remembered tensor."""
    if torch.compiler.is_compiling() or (cu.is_cuda and torch.cuda.is_current_stream_capturing()):
        return None
    cacheable = cu.is_cuda and not cu.is_inference()
    seen = _checked_offsets.get(name) if cacheable else None
    if seen is not None and seen[0]() is cu and seen[1:3] == (cu._version, total):
        return seen[3]
    values = cu.tolist()
    if values[0] != 0 or values[-1] != total or any(b < a for a, b in zip(values, values[1:])):
        raise ValueError(f"{name} must rise from 0 to the packed length {total}, got {values}")
    longest = max(b - a for a, b in zip(values, values[1:]))
    if cacheable:
        _checked_offsets[name] = (weakref.ref(cu), cu._version, total, longest)
    return longest


def _check_cu_seqlens(name: str, cu: Tensor, total: int, batch: int | None, device) -> int | None:
    if not isinstance(cu, Tensor) or cu.dtype != torch.int32:
        raise TypeError(
            f"{name} must be an int32 tensor of B + 1 offsets, got "
            f"{cu.dtype if isinstance(cu, Tensor) else type(cu).__name__}"
        )
    if cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"{name} must be a 1-D tensor of B + 1 >= 2 offsets, got shape {tuple(cu.shape)}")
    if cu.device != device:
        raise ValueError(f"{name} must be on q's device ({device}), got {cu.device}")
    if batch is not None and cu.numel() != batch:
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must have the same length, got {batch} and {cu.numel()}")
    return _longest_sequence(name, cu, total)


def _check_varlen(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) -> tuple[Tensor, Tensor]:
    """The offsets and longest-sequence bounds of packed q (total_q, ...) and k (total_k, ...); returns the offsets
    contiguous (the kernels read Cu + b)."""
    real_q = _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], None, q.device)
    real_k = _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], cu_seqlens_q.numel(), q.device)
    for name, given, real in (("max_seqlen_q", max_seqlen_q, real_q), ("max_seqlen_k", max_seqlen_k, real_k)):
        if not isinstance(given, int) or isinstance(given, bool):
            raise TypeError(f"{name} must be an int, got {type(given).__name__}")
        if real is not None and given < real:
            raise ValueError(f"{name} must be an int >= the longest sequence ({real}), got {given!r}")
    return cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous()


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
    deterministic as in `flash_attn_func`.
    """
    if block_table is not None:
        k, v = _keys_from_pages(q, k, v, block_table, cu_seqlens_k)
    _check_qkv(q, k, v, 3, "(total, H, D)")
    _refuse_unsupported(softcap, alibi_slopes)
    cu_seqlens_q, cu_seqlens_k = _check_varlen(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    scale, (left, right) = _scale(softmax_scale, q.shape[-1]), _window(causal, window_size)
    _check_dropout(dropout_p)
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
    )
    if not return_attn_probs:
        return out
    probs = attn_probs(
        q, k, lse, seed, dropout_p, scale, left, right, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k
    )
    return out, lse, probs


def _keys_from_pages(q, k_cache, v_cache, block_table, cu_seqlens_k) -> tuple[Tensor, Tensor]:
    """Packed keys and values (total_k, Hkv, D) of a paged cache (num_blocks, page_block_size, Hkv, D): sequence b's
    key t from row t % page_block_size of page block_table[b, t // page_block_size]. The lengths and the pages used
    are read on the host (two reads) and checked against the table and the cache; refused while a CUDA graph is
    captured."""
    for name, t in (("k", k_cache), ("v", v_cache)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(
                f"{name} must be a paged cache (num_blocks, page_block_size, Hkv, D) with a block_table, got {got}"
            )
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if not isinstance(block_table, Tensor) or block_table.dtype != torch.int32:
        got = getattr(block_table, "dtype", type(block_table).__name__)
        raise TypeError(f"block_table must be an int32 tensor (B, max_blocks), got {got}")
    if not isinstance(cu_seqlens_k, Tensor) or cu_seqlens_k.dim() != 1 or cu_seqlens_k.numel() < 2:
        raise ValueError("cu_seqlens_k must be a 1-D tensor of B + 1 offsets")
    B = cu_seqlens_k.numel() - 1
    if block_table.dim() != 2 or block_table.shape[0] != B or block_table.shape[1] == 0:
        raise ValueError(f"block_table must be (B={B}, max_blocks >= 1), got shape {tuple(block_table.shape)}")
    if block_table.device != q.device:
        raise ValueError(f"block_table must be on q's device ({q.device}), got {block_table.device}")
    if q.is_cuda and torch.cuda.is_current_stream_capturing():
        raise ValueError(
            "block_table: the keys' pages are found from cu_seqlens_k on the host, not while a CUDA graph is captured"
        )
    num_blocks, page = k_cache.shape[:2]
    cu = cu_seqlens_k.long()
    lengths = cu.diff()  # (B,)
    total = int(cu[-1])
    seq = torch.repeat_interleave(torch.arange(B, device=q.device), lengths, output_size=total)  # (total_k,)
    t = torch.arange(total, device=q.device) - cu[:-1][seq]  # each key's position in its sequence
    slot = (t // page).clamp(max=block_table.shape[1] - 1)
    pages = block_table.long()[seq, slot]  # (total_k,)
    if total:
        longest, lo, hi = torch.stack((lengths.max(), pages.min(), pages.max())).tolist()
        if longest > block_table.shape[1] * page:
            raise ValueError(
                f"a sequence of {longest} keys needs more than block_table's {block_table.shape[1]} pages of {page}"
            )
        if lo < 0 or hi >= num_blocks:
            raise ValueError(f"block_table's pages must lie in [0, {num_blocks}), got values in [{lo}, {hi}]")
    rows = pages * page + t % page  # (total_k,) rows of the cache seen as (num_blocks * page, Hkv, D)
    return k_cache.flatten(0, 1).index_select(0, rows), v_cache.flatten(0, 1).index_select(0, rows)


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    backend: str | None = None,
) -> Tensor:
    """torch's `scaled_dot_product_attention` over (B, H, T, D) tensors (4-D only).

    query: (B, H, Tq, D); key, value: (B, Hkv, Tk, D), Hkv < H only with enable_gqa=True. is_causal masks as
    torch does, aligned top-left: query i sees keys j <= i. attn_mask: bool (True = attend) or additive float,
    broadcastable to (B, H, Tq, Tk). A mask that is one for every head and lets each query row see one stretch of
    keys (0/-inf if additive) runs the kernels (fasttrain/ops/attention_masks.py: read once per mask tensor, one host
    sync on a GPU): a band (causal, sliding-window) as is; padding (key lengths per batch row, with or without
    causality) and document packing (block-diagonal) as varlen launches over gathered rows; dropout_p with them too.
    Any other mask runs the reference path. Returns
    (B, H, Tq, D). The backward is deterministic under torch.use_deterministic_algorithms(True) (see
    `flash_attn_func`).
    """
    _check_qkv(query, key, value, 4, "(B, H, T, D)", head_axis=1, names=("query", "key", "value"))
    if key.shape[1] != query.shape[1] and not enable_gqa:
        raise ValueError(f"key has {key.shape[1]} heads and query {query.shape[1]}: pass enable_gqa=True for GQA")
    if attn_mask is not None and is_causal:
        raise ValueError("attn_mask and is_causal=True cannot both be set (as in torch)")
    if attn_mask is not None and not isinstance(attn_mask, Tensor):
        raise TypeError(f"attn_mask must be a tensor or None, got {type(attn_mask).__name__}")
    if attn_mask is not None and attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
        # An int 0/1 mask (a tokenizer's attention_mask) added to the scores would mask nothing; torch refuses it.
        raise TypeError(
            f"attn_mask must be bool (True = attend) or floating-point (added to the scores), got {attn_mask.dtype}"
        )
    _check_dropout(dropout_p)
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
