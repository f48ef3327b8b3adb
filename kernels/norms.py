"""LayerNorm and RMSNorm over the last dimension, forward and backward, one kernel pair for both, with the
pre-norm residual add optionally fused in.

Launched by fasttrain/ops/norms.py (which holds the PyTorch reference) on rows of a (M, N) view:

1. `_norm_forward_kernel`, one program per row (per block of rows in the interpreter): the whole row in registers
   (BLOCK_N = next power of two >= N), mean (LayerNorm only) and 1/sqrt(var + eps) in fp32, y = (x - mean) * rstd *
   w + b written in the output dtype, which may differ from x's (under autocast the op writes bf16 straight from an
   fp32 residual stream, where eager LayerNorm writes fp32 and the next Linear reads it again to cast). Saves mean
   and rstd, 8 bytes per row. With a residual, the row normalized is s = x + residual, written once as the new
   residual stream (RO), as flash-attn's layer_norm_fn(residual=..., prenorm=True) does.
2. `_norm_backward_kernel`, one program per block of rows: dx per row from the saved statistics, and the weight and
   bias gradients summed over the program's rows in fp32 registers, written as one partial row per program; the
   host sums the (programs, N) partials, which is small next to M x N. With the residual add fused, the gradient
   arriving at the residual stream (DRES) is added to dx, which is then the gradient of both x and residual: one
   store per dtype they come in (DX, and DX2 when the two differ, e.g. a bf16 branch onto an fp32 stream).

Bytes per element: forward reads x and writes y; backward reads x and dy and writes dx. Eager PyTorch's native
layer_norm moves the same bytes per kernel, but its weight-gradient reduction is a second pass over x and dy. The
fused add saves a pass each way: in eager the add reads x and residual and writes s, which the norm reads again,
and in backward the norm's dx and the stream's gradient are summed (and cast for the branch) in separate kernels.
Pure device code: nothing here imports fasttrain.
"""

import torch
import triton
import triton.language as tl

from ._launch import cdiv, multiprocessor_count, next_power_of_2

# Rows stay in registers. The backward holds x, dy, w and the dw/db partial sums per element: AOT sm_90 (bf16,
# LayerNorm with bias) at 4096 wide and 16 warps takes 110 registers, no spill; 8192 spilled 88 B at 16 warps and
# 80 B at 32 (64 registers each). Wider rows take the reference (fasttrain/ops/norms.py says why).
MAX_N = 4096


def block_and_warps(n_cols: int, backward: bool) -> tuple[int, int]:
    """(BLOCK_N, num_warps) for rows of n_cols: 8 elements per thread forward, 4 backward (at 8, 1024 wide and 4
    warps, the backward kept 96 registers and 8 B of stack), up to 16 warps."""
    block = next_power_of_2(n_cols)
    return block, min(max(block // (128 if backward else 256), 1), 16)


@triton.jit
def _norm_forward_kernel(
    X,
    R,
    W,
    B,
    Y,
    RO,
    Mean,
    Rstd,
    x_row_stride,
    r_row_stride,
    out_row_stride,
    n_rows,
    n_cols,
    eps,
    IS_RMS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # Y and RO are fresh (M, N) tensors: one row stride serves both.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    col_ok = cols < n_cols
    mask = row_ok[:, None] & col_ok[None, :]
    x = tl.load(X + rows[:, None] * x_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        x += tl.load(R + rows[:, None] * r_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        s = x.to(RO.dtype.element_ty)
        tl.store(RO + rows[:, None] * out_row_stride + cols[None, :], s, mask=mask)
        # Normalize the stream as stored (a no-op for fp32): `s = x + r; norm(s)` in torch, and what backward reads.
        x = s.to(tl.float32)
    if IS_RMS:
        xc = x
    else:
        mean = tl.sum(x, 1) / n_cols
        xc = tl.where(mask, x - mean[:, None], 0.0)
        tl.store(Mean + rows, mean, mask=row_ok)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, 1) / n_cols + eps)
    tl.store(Rstd + rows, rstd, mask=row_ok)
    y = xc * rstd[:, None]
    if HAS_WEIGHT:
        y = y * tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y = y + tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rows[:, None] * out_row_stride + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _norm_backward_kernel(
    DY,
    X,
    W,
    Mean,
    Rstd,
    DRES,
    DX,
    DX2,
    DW,
    DB,
    dy_row_stride,
    x_row_stride,
    dres_row_stride,
    dx_row_stride,
    n_rows,
    n_cols,
    rows_per_program,
    IS_RMS: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_DRES: tl.constexpr,
    HAS_DX2: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # With xhat = (x - mean) * rstd and g = dy * w:  dx = rstd * (g - xhat * mean(g * xhat) - mean(g)), where the
    # mean(g) term is LayerNorm's only (RMSNorm does not subtract a mean); dw = sum_rows dy * xhat, db = sum_rows dy.
    # DX and DX2 are fresh (M, N) tensors: one row stride serves both.
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    dw = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    db = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    first = pid.to(tl.int64) * rows_per_program  # int64 bounds make the loop's rows int64 too
    last = tl.minimum(first + rows_per_program, n_rows)
    for start in range(first, last, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < last
        mask = row_ok[:, None] & col_ok[None, :]
        x = tl.load(X + rows[:, None] * x_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows[:, None] * dy_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(Rstd + rows, mask=row_ok, other=0.0)[:, None]
        if IS_RMS:
            xhat = x * rstd
        else:
            xhat = tl.where(mask, (x - tl.load(Mean + rows, mask=row_ok, other=0.0)[:, None]) * rstd, 0.0)
        if HAS_WEIGHT:
            g = dy * w
        else:
            g = dy
        c1 = tl.sum(g * xhat, 1)[:, None] / n_cols
        if IS_RMS:
            dx = (g - xhat * c1) * rstd
        else:
            dx = (g - xhat * c1 - tl.sum(g, 1)[:, None] / n_cols) * rstd
        if HAS_DRES:
            dx += tl.load(DRES + rows[:, None] * dres_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + rows[:, None] * dx_row_stride + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        if HAS_DX2:
            tl.store(DX2 + rows[:, None] * dx_row_stride + cols[None, :], dx.to(DX2.dtype.element_ty), mask=mask)
        if HAS_WEIGHT:
            dw += dy * xhat
        if HAS_BIAS:
            db += dy
    if HAS_WEIGHT:
        tl.store(DW + pid * n_cols + cols, tl.sum(dw, 0), mask=col_ok)
    if HAS_BIAS:
        tl.store(DB + pid * n_cols + cols, tl.sum(db, 0), mask=col_ok)


def rows_per_block(x: torch.Tensor, block_n: int) -> int:
    """Rows per tile: 1 on a GPU (a row fills the warps: the AOT numbers are for this); ~16k elements per tile in
    the interpreter, whose cost is per program and per op, not per element."""
    return 1 if x.is_cuda else max(1, 16384 // block_n)


def norm_forward(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    is_rms: bool,
    out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y (M, N) in out_dtype, s = x + residual (M, N) in their promoted dtype (empty without a residual), mean (M,)
    fp32 (empty for RMSNorm), rstd (M,) fp32): the norm of s, or of x alone, for x and residual (M, N) with unit
    column stride and N <= MAX_N."""
    M, N = x.shape
    y = torch.empty((M, N), dtype=out_dtype, device=x.device)
    if residual is not None:
        s = torch.empty((M, N), dtype=torch.promote_types(x.dtype, residual.dtype), device=x.device)
    else:
        s = torch.empty(0, dtype=x.dtype, device=x.device)
    mean = torch.empty(0 if is_rms else M, dtype=torch.float32, device=x.device)
    rstd = torch.empty(M, dtype=torch.float32, device=x.device)
    if M:
        block, warps = block_and_warps(N, backward=False)
        block_m = rows_per_block(x, block)
        _norm_forward_kernel[(cdiv(M, block_m),)](
            x,
            residual,
            weight,
            bias,
            y,
            s,
            mean,
            rstd,
            x.stride(0),
            residual.stride(0) if residual is not None else 0,
            y.stride(0),
            M,
            N,
            eps,
            IS_RMS=is_rms,
            HAS_RESIDUAL=residual is not None,
            HAS_WEIGHT=weight is not None,
            HAS_BIAS=bias is not None,
            BLOCK_M=block_m,
            BLOCK_N=block,
            num_warps=warps,
        )
    return y, s, mean, rstd


def _programs(device: torch.device, n_rows: int) -> int:
    # Enough programs to fill every SM a few times over; each writes one partial row of dw/db, so not one per row.
    # The interpreter runs programs one after another, so there a few suffice.
    if device.type == "cuda":
        return max(1, min(n_rows, 4 * multiprocessor_count(device)))
    return max(1, min(n_rows, 4))


def norm_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    is_rms: bool,
    has_bias: bool,
    dres: torch.Tensor | None = None,
    dx2_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(dx (M, N) in x's dtype, plus dres when given; the same values in dx2_dtype, or None; dw (N,) and db (N,) in
    the weight's dtype, or None) for dy, x (the normalized rows) and dres (M, N), unit column stride."""
    M, N = x.shape
    dx = torch.empty((M, N), dtype=x.dtype, device=x.device)
    dx2 = torch.empty((M, N), dtype=dx2_dtype, device=x.device) if dx2_dtype is not None else None
    programs = _programs(x.device, M)
    rows_per_program = cdiv(M, programs) if M else 0
    has_weight = weight is not None
    # Every program stores its partial row (zeros when it has no rows), so no memset is needed.
    dw = torch.empty((programs, N) if has_weight else (0,), dtype=torch.float32, device=x.device)
    db = torch.empty((programs, N) if has_bias else (0,), dtype=torch.float32, device=x.device)
    if M:
        block, warps = block_and_warps(N, backward=True)
        _norm_backward_kernel[(programs,)](
            dy,
            x,
            weight,
            mean,
            rstd,
            dres,
            dx,
            dx2,
            dw,
            db,
            dy.stride(0),
            x.stride(0),
            dres.stride(0) if dres is not None else 0,
            dx.stride(0),
            M,
            N,
            rows_per_program,
            IS_RMS=is_rms,
            HAS_WEIGHT=has_weight,
            HAS_BIAS=has_bias,
            HAS_DRES=dres is not None,
            HAS_DX2=dx2 is not None,
            BLOCK_M=rows_per_block(x, block),
            BLOCK_N=block,
            num_warps=warps,
        )
    else:  # no rows, so no program ran: the (1, N) partials must read as zeros
        dw.zero_()
        db.zero_()
    param_dtype = weight.dtype if has_weight else x.dtype
    return (dx, dx2, dw.sum(0).to(param_dtype) if has_weight else None, db.sum(0).to(param_dtype) if has_bias else None)


# ---- ahead-of-time compile (tools/aot.py) --------------------------------------------------------------------------


def _pointer_types(dtype: str, profile: str) -> dict:
    """Triton types of the norm kernels' pointers for one dtype profile of the C++ launch path (csrc/norms_aot.cpp
    keys a call the same way; an absent tensor counts as the dtype noted):
    - same: every tensor in dtype;
    - autocast: the rows (x, residual, the stream RO, weight, bias) fp32, the output y in dtype, and so dy (autocast's
      norm on an fp32 residual stream);
    - branch: x in dtype added onto an fp32 residual, so the stream, weight, bias fp32 and y in dtype; backward, dx in
      the stream's fp32 and DX2 in the branch's dtype (a pre-norm block's add under autocast)."""
    rows = dtype if profile == "same" else "fp32"
    fwd = {"X": f"*{dtype if profile != 'autocast' else 'fp32'}", "R": f"*{rows}", "W": f"*{rows}", "B": f"*{rows}"}
    fwd.update(Y=f"*{dtype}", RO=f"*{rows}")
    bwd = {"DY": f"*{dtype}", "X": f"*{rows}", "W": f"*{rows}", "DRES": f"*{rows}", "DX": f"*{rows}"}
    bwd["DX2"] = f"*{dtype if profile == 'branch' else rows}"
    return {"forward": fwd, "backward": bwd}


def aot_kernels(arch: int, dtype: str, shipped: bool = False) -> list[dict]:
    """The compiles of the norm kernels for tools/aot.py, one row per program (BLOCK_M = 1, as on a GPU); statistics
    and the dw/db partials fp32.

    shipped=False, CI's compile check: every tensor in dtype, LayerNorm with weight, bias and the residual add fused
    (the most live values; RMSNorm is the same code with the mean terms gone) at the BLOCK_N of GPT-2 small (768),
    GPT-2 XL (1600) and Llama-7B (4096). shipped=True, the cubins a CUDA build ships for the C++ launch path: each
    dtype profile of _pointer_types (only "same" for fp32) with every flag combination a call of that profile can
    take, at every BLOCK_N up to MAX_N, each with block_and_warps' warps."""
    scalars = {"Mean": "*fp32", "Rstd": "*fp32", "DW": "*fp32", "DB": "*fp32", "eps": "fp32"}
    if not shipped:
        flags = dict(IS_RMS=False, HAS_RESIDUAL=True, HAS_WEIGHT=True, HAS_BIAS=True, HAS_DRES=True, HAS_DX2=True)
        out = []
        for kernel in (_norm_forward_kernel, _norm_backward_kernel):
            cases = []
            for n in (1024, 2048, 4096):
                warps = block_and_warps(n, backward=kernel is _norm_backward_kernel)[1]
                constexprs = dict(BLOCK_M=1, BLOCK_N=n, **flags)
                cases.append(dict(label=f"n{n} w{warps}", constexprs=constexprs, num_warps=warps))
            out.append(dict(kernel=kernel, types=scalars, cases=cases))
        return out
    blocks = [1 << i for i in range(MAX_N.bit_length())]  # 1, 2, 4, ..., MAX_N
    out = []
    for profile in ("same",) if dtype == "fp32" else ("same", "autocast", "branch"):
        forward = [
            dict(IS_RMS=rms, HAS_RESIDUAL=res, HAS_WEIGHT=w, HAS_BIAS=b)
            for rms in (False, True)
            for res in ((True,) if profile == "branch" else (False, True))
            for w in (False, True)
            for b in ((False,) if rms else (False, True))
        ]
        backward = [
            dict(IS_RMS=rms, HAS_WEIGHT=w, HAS_BIAS=b, HAS_DRES=dres, HAS_DX2=profile == "branch")
            for rms in (False, True)
            for w in (False, True)
            for b in ((False,) if rms else (False, True))
            for dres in (False, True)
        ]
        types = _pointer_types(dtype, profile)
        for kernel, flag_sets, kind in (
            (_norm_forward_kernel, forward, "forward"),
            (_norm_backward_kernel, backward, "backward"),
        ):
            cases = []
            for flags in flag_sets:
                name = " ".join(k.lower() for k, v in flags.items() if v) or "plain"
                for n in blocks:
                    warps = block_and_warps(n, backward=kind == "backward")[1]
                    constexprs = dict(BLOCK_M=1, BLOCK_N=n, **flags)
                    label = f"n{n} w{warps} {profile}: {name}"
                    cases.append(dict(label=label, constexprs=constexprs, num_warps=warps))
            out.append(dict(kernel=kernel, types={**scalars, **types[kind]}, cases=cases))
    return out
