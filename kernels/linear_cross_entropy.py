"""The cross-entropy step of fused linear cross-entropy: one chunk of logits in, its losses out, and its gradient
written over the logits in place.

fasttrain/ops/linear_cross_entropy.py computes each chunk of rows' logits x_c @ W.T (+ b) with a torch matmul
(cuBLAS), calls `ce_chunk` on them, and multiplies the gradient left in the same buffer into dx and dW, so that at
most one chunk of logits is ever held. One program per row: a first pass streams the row in BLOCK_V pieces with an
online max and sum of exponentials (fp32 whatever the logits dtype), the optional Gemma-2 softcap z = cap tanh(z / cap)
applied on the fly; a second pass (WRITE_GRAD) writes

    d loss / d logits = scale * (softmax(z) - (1 - eps) onehot(target) - eps / V) * dz/dlogits

with dz/dlogits = 1 - (z / cap)^2 under the softcap, eps the label smoothing and scale the row's upstream gradient.
The row's loss is (1 - eps) (lse - z_target) + eps (lse - mean z): F.cross_entropy's label smoothing. Ignored rows
(target == ignore_index) get loss 0 and gradient 0; a target outside [0, V) gets a NaN loss rather than a read out of
bounds (checking targets on the host would cost a sync).

Pure device code: nothing here imports fasttrain.
"""

import torch
import triton
import triton.language as tl

# As kernels/cross_entropy.py: 16-byte bf16 loads by 8 warps, two in flight per thread at 4096.
BLOCK_V = 4096
NUM_WARPS = 8


@triton.jit
def _softcapped(z, softcap, SOFTCAP: tl.constexpr):
    if SOFTCAP:
        # tanh(y) = 1 - 2 / (exp(2y) + 1): exact at both tails (exp overflows to inf, or underflows to 0)
        z = softcap * (1.0 - 2.0 / (tl.exp(2.0 * z / softcap) + 1.0))
    return z


@triton.jit
def _lce_chunk_kernel(
    Logits,
    Target,
    Scale,
    Loss,
    Lse,
    row_stride,
    n_cols,
    ignore_index,
    label_smoothing,
    softcap,
    SOFTCAP: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = Logits + row * row_stride
    offs = tl.arange(0, BLOCK_V)
    # Per-lane running max, sum of exponentials and sum of z: one cross-lane reduction each at the end.
    m = tl.full([BLOCK_V], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_V], tl.float32)
    zsum = tl.zeros([BLOCK_V], tl.float32)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + offs
        ok = cols < n_cols
        z = _softcapped(tl.load(x_row + cols, mask=ok, other=0.0).to(tl.float32), softcap, SOFTCAP)
        zsum += tl.where(ok, z, 0.0)
        z = tl.where(ok, z, float("-inf"))
        m_new = tl.maximum(m, z)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # lanes that saw only padding keep s = 0, not NaN
        s = s * tl.exp(m - m_safe) + tl.exp(z - m_safe)
        m = m_new
    m_row = tl.max(m, 0)
    lse = m_row + tl.log(tl.sum(s * tl.exp(m - m_row), 0))
    target = tl.load(Target + row)
    in_range = (target >= 0) & (target < n_cols)
    z_target = _softcapped(tl.load(x_row + target, mask=in_range, other=0.0).to(tl.float32), softcap, SOFTCAP)
    z_mean = tl.sum(zsum, 0) / n_cols
    loss = lse - (1.0 - label_smoothing) * z_target - label_smoothing * z_mean
    loss = tl.where(in_range, loss, float("nan"))
    ignored = target == ignore_index
    tl.store(Loss + row, tl.where(ignored, 0.0, loss))
    tl.store(Lse + row, lse)
    if WRITE_GRAD:
        # An ignored row's gradient is 0: scale 0 (not a branch) keeps one code path and still writes every element.
        scale = tl.where(ignored, 0.0, tl.load(Scale + row))
        smooth = label_smoothing / n_cols
        for start in range(0, n_cols, BLOCK_V):
            cols = start + offs
            ok = cols < n_cols
            z = _softcapped(tl.load(x_row + cols, mask=ok, other=0.0).to(tl.float32), softcap, SOFTCAP)
            g = tl.exp(z - lse) - smooth - tl.where(cols == target, 1.0 - label_smoothing, 0.0)
            g = g * scale
            if SOFTCAP:
                t = z / softcap
                g = g * (1.0 - t * t)
            tl.store(x_row + cols, g.to(Logits.dtype.element_ty), mask=ok)


def ce_chunk(
    logits: torch.Tensor,
    target: torch.Tensor,
    scale: torch.Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    softcap: float,
):
    """(loss, lse), each (C,) float32, for logits (C, V) with unit column stride and target (C,) int64; with scale
    (C,) float32, the rows' upstream gradients, also d loss / d logits written over `logits`. softcap 0: none."""
    C, V = logits.shape
    loss = torch.empty(C, dtype=torch.float32, device=logits.device)
    lse = torch.empty(C, dtype=torch.float32, device=logits.device)
    if C:
        _lce_chunk_kernel[(C,)](
            logits,
            target,
            scale if scale is not None else loss,  # not read without WRITE_GRAD
            loss,
            lse,
            logits.stride(0),
            V,
            ignore_index,
            label_smoothing,
            softcap,
            SOFTCAP=softcap != 0.0,
            WRITE_GRAD=scale is not None,
            BLOCK_V=BLOCK_V,
            num_warps=NUM_WARPS,
        )
    return loss, lse


# ---- ahead-of-time compile (tools/aot.py) --------------------------------------------------------------------------


def aot_kernels(arch: int, dtype: str) -> list[dict]:
    """The kernel as launched: with and without the softcap, forward only and with the gradient."""
    types = {"Target": "*i64", "Scale": "*fp32", "Loss": "*fp32", "Lse": "*fp32", "label_smoothing": "fp32"}
    types["softcap"] = "fp32"
    cases = [
        dict(
            label=f"softcap={cap} grad={grad} w{NUM_WARPS}",
            constexprs={"SOFTCAP": cap, "WRITE_GRAD": grad, "BLOCK_V": BLOCK_V},
            num_warps=NUM_WARPS,
        )
        for cap in (False, True)
        for grad in (False, True)
    ]
    return [dict(kernel=_lce_chunk_kernel, types=types, cases=cases)]
