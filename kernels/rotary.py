"""Rotary position embedding (RoPE) on (B, T, H, D) in one pass, launched by fasttrain/ops/rotary.py (which holds
the PyTorch reference).

`_rotary_kernel`: one program per (token, block of heads) on a GPU. It loads the token's cos/sin row once (fp32 math
whatever the dtypes) and rotates every head of the block: pairs (i, i + R/2) (GPT-NeoX, flash-attn's
interleaved=False) or (2i, 2i + 1) (GPT-J), R = 2 * cos.shape[-1] <= D; the dims past R are copied through. x may be
any strided view with unit stride along D (the model passes q and k as slices of one qkv projection), so no copy
precedes the kernel.
CONJUGATE rotates by -angle: the backward is the same kernel on the upstream gradient.
Bytes: x read once, the output written once (the tables, one row per token, are 1/H of that or less). Eager PyTorch
(fp32 copy, two halves, four products, a cat, a cast back) moves ~5x as much.
A position outside the table (tensor offsets past it: checking them on the host would sync) reads cos 1 and sin 0, so
its row passes through unrotated, as flash-attn's kernel leaves it.

Pure device code: nothing here imports fasttrain.
"""

import torch
import triton
import triton.language as tl

from ._launch import cdiv, next_power_of_2

NUM_WARPS = 4


@triton.jit
def _rotary_kernel(
    X,
    Cos,
    Sin,
    Offsets,
    Out,
    n_tokens,
    seq_len,
    n_heads,
    n_pos,
    offset,
    half,
    n_pass,
    stride_xb,
    stride_xt,
    stride_xh,
    stride_ob,
    stride_ot,
    stride_oh,
    table_b_stride,
    table_t_stride,
    INTERLEAVED: tl.constexpr,
    CONJUGATE: tl.constexpr,
    PER_SEQUENCE: tl.constexpr,
    OFFSET_TENSOR: tl.constexpr,
    COPY_PASS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    # Tiles are (tokens, heads, pairs); BLOCK_T is 1 on a GPU, larger only in the interpreter (see tokens_per_block).
    tokens = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    token_ok = tokens < n_tokens
    b = tokens // seq_len
    t = tokens % seq_len
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    i = tl.arange(0, BLOCK_R)
    in_half = i < half
    if PER_SEQUENCE:
        row = b * table_b_stride + t * table_t_stride
        ok = token_ok
    else:
        pos = t + offset
        if OFFSET_TENSOR:
            pos += tl.load(Offsets + b, mask=token_ok, other=0)
        row = pos * table_t_stride
        ok = token_ok & (pos >= 0) & (pos < n_pos)
    table_mask = ok[:, None] & in_half[None, :]
    cos = tl.load(Cos + row[:, None] + i[None, :], mask=table_mask, other=1.0).to(tl.float32)  # past the table:
    sin = tl.load(Sin + row[:, None] + i[None, :], mask=table_mask, other=0.0).to(tl.float32)  # the identity
    if CONJUGATE:
        sin = -sin
    if INTERLEAVED:
        i1 = 2 * i
        i2 = 2 * i + 1
    else:
        i1 = i
        i2 = i + half
    h = heads[None, :, None].to(tl.int64)
    token_head_ok = token_ok[:, None, None] & (heads < n_heads)[None, :, None]
    mask = token_head_ok & in_half[None, None, :]
    x_head = X + (b * stride_xb + t * stride_xt)[:, None, None] + h * stride_xh  # (BLOCK_T, BLOCK_H, 1) pointers
    o_head = Out + (b * stride_ob + t * stride_ot)[:, None, None] + h * stride_oh
    x1 = tl.load(x_head + i1[None, None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_head + i2[None, None, :], mask=mask, other=0.0).to(tl.float32)
    c, s = cos[:, None, :], sin[:, None, :]
    tl.store(o_head + i1[None, None, :], (x1 * c - x2 * s).to(Out.dtype.element_ty), mask=mask)
    tl.store(o_head + i2[None, None, :], (x2 * c + x1 * s).to(Out.dtype.element_ty), mask=mask)
    if COPY_PASS:  # BLOCK_P dims at a time, so that the pass-through width is not one more compiled axis
        for p in range(0, n_pass, BLOCK_P):
            j = 2 * half + p + tl.arange(0, BLOCK_P)
            pass_mask = token_head_ok & (j < 2 * half + n_pass)[None, None, :]
            tl.store(o_head + j[None, None, :], tl.load(x_head + j[None, None, :], mask=pass_mask), mask=pass_mask)


def tokens_per_block(x: torch.Tensor, block_h: int, block_r: int) -> int:
    """Tokens per program: 1 on a GPU (the AOT numbers are for this); ~16k pairs per tile in the interpreter, whose
    cost is per program and per op, not per element."""
    return 1 if x.is_cuda else next_power_of_2(max(1, 16384 // (block_h * block_r)))


PASS_BLOCK = 64  # pass-through dims copied per step (BLOCK_P): one value, so no compiled axis of its own


def blocks(n_heads: int, half: int) -> tuple[int, int]:
    """(BLOCK_H, BLOCK_R): up to ~2048 rotated pairs per program, so a token's heads share one table row."""
    block_r = next_power_of_2(max(half, 1))
    block_h = min(next_power_of_2(n_heads), max(1, 2048 // block_r))
    return block_h, block_r


def rotary(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    offsets: torch.Tensor | None,
    offset: int,
    interleaved: bool,
    conjugate: bool,
    out: torch.Tensor,
) -> torch.Tensor:
    """Write the rotation of x (B, T, H, D), unit stride along D, into out (same shape; may be x itself).
    cos/sin: (T_ro, R/2) indexed by t + offset (+ offsets[b]), or (B, T, R/2) per sequence; unit last stride."""
    B, T, H, D = x.shape
    half = cos.shape[-1]
    n_pass = D - 2 * half
    per_sequence = cos.dim() == 3
    block_h, block_r = blocks(H, half)
    if B * T and H:
        block_t = tokens_per_block(x, block_h, block_r)
        grid = (cdiv(B * T, block_t), cdiv(H, block_h))
        _rotary_kernel[grid](
            x,
            cos,
            sin,
            offsets,
            out,
            B * T,
            T,
            H,
            cos.shape[-2],
            offset,
            half,
            n_pass,
            x.stride(0),
            x.stride(1),
            x.stride(2),
            out.stride(0),
            out.stride(1),
            out.stride(2),
            cos.stride(0) if per_sequence else 0,
            cos.stride(-2),
            INTERLEAVED=interleaved,
            CONJUGATE=conjugate,
            PER_SEQUENCE=per_sequence,
            OFFSET_TENSOR=offsets is not None,
            COPY_PASS=n_pass > 0 and out.data_ptr() != x.data_ptr(),
            BLOCK_T=block_t,
            BLOCK_H=block_h,
            BLOCK_R=block_r,
            BLOCK_P=PASS_BLOCK,
            num_warps=NUM_WARPS,
        )
    return out


# ---- ahead-of-time compile (tools/aot.py) --------------------------------------------------------------------------


# The shipped set's bounds (aot_kernels(shipped=True)); calls outside it take the JIT (fasttrain/ops/rotary.py).
MAX_HEADS = 128
MAX_HEAD_DIM = 256  # and a multiple of 16: the strides are compiled as multiples of 16
MIN_HALF = 5  # rotated pairs per head at least (BLOCK_R >= 8)


def aot_kernels(arch: int, dtype: str, shipped: bool = False) -> list[dict]:
    """The compiles of the rotary kernel for tools/aot.py, one token per program (BLOCK_T = 1, as on a GPU).

    shipped=False, CI's compile check: the model's case per head dim, a full-width half-split rotation of 16 heads
    with fp32 shared tables (GPT-2 small has 12 heads, Llama 32). shipped=True, the cubins a CUDA build ships for the
    C++ launch path (csrc/rotary_aot.cpp): half-split pairs (interleaved=False), tables in fp32 or x's dtype, every
    (BLOCK_H, BLOCK_R) of `blocks` for up to MAX_HEADS heads and MIN_HALF..MAX_HEAD_DIM / 2 rotated pairs; shared
    tables, per-sequence ones, or shared ones with an int32 or int64 offsets tensor (inference: no conjugate); with
    and without the pass-through copy and the conjugate (the backward). x and out are in dtype."""
    if not shipped:
        cases = []
        for d in (64, 128, 256):
            block_h, block_r = blocks(16, d // 2)
            flags = dict(INTERLEAVED=False, CONJUGATE=False, PER_SEQUENCE=False, OFFSET_TENSOR=False, COPY_PASS=False)
            constexprs = dict(BLOCK_T=1, BLOCK_H=block_h, BLOCK_R=block_r, BLOCK_P=PASS_BLOCK, **flags)
            cases.append(dict(label=f"d{d} w{NUM_WARPS}", constexprs=constexprs, num_warps=NUM_WARPS))
        return [dict(kernel=_rotary_kernel, types={"Cos": "*fp32", "Sin": "*fp32", "Offsets": "*i64"}, cases=cases)]
    tiles = [
        (block_h, block_r)
        for block_r in (8, 16, 32, 64, 128)  # next_power_of_2(half), MIN_HALF <= half <= MAX_HEAD_DIM / 2
        for block_h in sorted({blocks(1 << i, block_r)[0] for i in range(MAX_HEADS.bit_length())})
    ]
    out = []
    for tables in ("fp32",) if dtype == "fp32" else ("fp32", dtype):
        for mode, offsets in (
            ("shared", "i64"),
            ("per-sequence", "i64"),
            ("i32-offsets", "i32"),
            ("i64-offsets", "i64"),
        ):
            flag_sets = [
                dict(
                    INTERLEAVED=False,
                    CONJUGATE=conj,
                    PER_SEQUENCE=mode == "per-sequence",
                    OFFSET_TENSOR=mode.endswith("offsets"),
                    COPY_PASS=copy,
                )
                for conj in ((False,) if mode.endswith("offsets") else (False, True))
                for copy in (False, True)
            ]
            cases = []
            for flags in flag_sets:
                name = " ".join(k.lower() for k in ("CONJUGATE", "COPY_PASS") if flags[k]) or "plain"
                for block_h, block_r in tiles:
                    constexprs = dict(BLOCK_T=1, BLOCK_H=block_h, BLOCK_R=block_r, BLOCK_P=PASS_BLOCK, **flags)
                    label = f"r{block_r} h{block_h} {tables} tables {mode}: {name}"
                    cases.append(dict(label=label, constexprs=constexprs, num_warps=NUM_WARPS))
            types = {"Cos": f"*{tables}", "Sin": f"*{tables}", "Offsets": f"*{offsets}"}
            out.append(dict(kernel=_rotary_kernel, types=types, cases=cases))
    return out
