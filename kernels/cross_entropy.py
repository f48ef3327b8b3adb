"""Cross-entropy over the vocabulary without materializing fp32 logits, softmax or log-probabilities.

Two kernels, one program per row of the (N, V) logits, launched by fasttrain/ops/cross_entropy.py (which holds the
PyTorch reference):

1. `_ce_forward_kernel` streams the row once in BLOCK_V chunks with an online max and sum of exponentials (fp32 in
   registers whatever the logits dtype) and writes the row's logsumexp and loss lse - x[target].
2. `_ce_backward_kernel` streams the row again and writes d loss / d logits = (softmax - onehot) * grad_row, using the
   saved logsumexp, straight in the logits dtype.

Bytes per row: forward reads V logits, backward reads V and writes V; eager PyTorch (`F.cross_entropy(x.float())`)
also writes and rereads an fp32 copy and fp32 log-probabilities, and keeps them for the backward.
Ignored rows (target == ignore_index) get loss 0 and gradient 0; a target outside [0, V) gets a NaN loss rather
than a read out of bounds (checking targets on the host would cost a sync).

Pure device code: nothing here imports fasttrain.
"""

import torch
import triton
import triton.language as tl

# 16-byte loads of bf16 need 8 elements per thread: 8 warps x 32 threads x 8 = 2048 per chunk, two loads in flight
# per thread at 4096 (AOT sm_90: forward 55 registers, backward 40, no spills). The interpreter runs numpy per chunk,
# so fewer, larger chunks are faster there too. Row strides are named *_stride, not stride_*, so that the AOT compile
# does not take them for multiples of 16 (tools/aot.py): a vocabulary such as GPT-2's 50257 is not one.
BLOCK_V = 4096
NUM_WARPS = 8


@triton.jit
def _ce_forward_kernel(Logits, Target, Loss, Lse, row_stride, n_cols, ignore_index, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = Logits + row * row_stride
    offs = tl.arange(0, BLOCK_V)
    # Per-lane running max and sum: one cross-lane reduction at the end instead of one per chunk.
    m = tl.full([BLOCK_V], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_V], tl.float32)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + offs
        x = tl.load(x_row + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, x)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # lanes that saw only padding keep s = 0, not NaN
        s = s * tl.exp(m - m_safe) + tl.exp(x - m_safe)
        m = m_new
    m_row = tl.max(m, 0)
    lse = m_row + tl.log(tl.sum(s * tl.exp(m - m_row), 0))
    target = tl.load(Target + row)
    in_range = (target >= 0) & (target < n_cols)
    x_target = tl.load(x_row + target, mask=in_range, other=0.0).to(tl.float32)
    loss = tl.where(in_range, lse - x_target, float("nan"))
    tl.store(Loss + row, tl.where(target == ignore_index, 0.0, loss))
    tl.store(Lse + row, lse)


@triton.jit
def _ce_backward_kernel(
    GradRow, Logits, Target, Lse, GradLogits, row_stride, grad_row_stride, n_cols, ignore_index, BLOCK_V: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    x_row = Logits + row * row_stride
    g_row = GradLogits + row * grad_row_stride
    target = tl.load(Target + row)
    # An ignored row's gradient is 0: scale 0 (not a branch) keeps one code path and still writes every element.
    scale = tl.where(target == ignore_index, 0.0, tl.load(GradRow + row))
    lse = tl.load(Lse + row)
    offs = tl.arange(0, BLOCK_V)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + offs
        ok = cols < n_cols
        x = tl.load(x_row + cols, mask=ok, other=0.0).to(tl.float32)
        p = tl.exp(x - lse) - tl.where(cols == target, 1.0, 0.0)
        tl.store(g_row + cols, (p * scale).to(GradLogits.dtype.element_ty), mask=ok)


def cross_entropy_forward(logits: torch.Tensor, target: torch.Tensor, ignore_index: int):
    """(loss, lse), each (N,) float32, for logits (N, V) with unit column stride and target (N,) int64."""
    N, V = logits.shape
    loss = torch.empty(N, dtype=torch.float32, device=logits.device)
    lse = torch.empty(N, dtype=torch.float32, device=logits.device)
    if N:
        _ce_forward_kernel[(N,)](
            logits, target, loss, lse, logits.stride(0), V, ignore_index, BLOCK_V=BLOCK_V, num_warps=NUM_WARPS
        )
    return loss, lse


def cross_entropy_backward(
    grad_row: torch.Tensor, logits: torch.Tensor, target: torch.Tensor, lse: torch.Tensor, ignore_index: int
) -> torch.Tensor:
    """d loss / d logits (N, V) in the logits dtype, from the per-row upstream gradient grad_row (N,) float32."""
    N, V = logits.shape
    grad = torch.empty((N, V), dtype=logits.dtype, device=logits.device)
    if N:
        _ce_backward_kernel[(N,)](
            grad_row,
            logits,
            target,
            lse,
            grad,
            logits.stride(0),
            grad.stride(0),
            V,
            ignore_index,
            BLOCK_V=BLOCK_V,
            num_warps=NUM_WARPS,
        )
    return grad


# ---- ahead-of-time compile (tools/aot.py) --------------------------------------------------------------------------


def aot_kernels(arch: int, dtype: str, shipped: bool = False) -> list[dict]:
    """Both kernels as cross_entropy_forward / cross_entropy_backward launch them, for tools/aot.py: one BLOCK_V and
    num_warps whatever the vocabulary (the row is streamed in chunks), so one case per kernel serves every V whose
    row stride, V and ignore_index fit the compiled i32 (the JIT compiles i64 variants past that; the op's aot column
    sends those calls there). Logits, and the backward's gradient, in dtype; targets int64 (the op converts any
    integer target); loss, logsumexp and the per-row upstream gradient fp32. shipped=True (the cubins a CUDA build
    ships for csrc/cross_entropy_aot.cpp) and CI's compile sample are the same two cases."""
    types = {"Target": "*i64", "Loss": "*fp32", "Lse": "*fp32", "GradRow": "*fp32"}
    case = dict(label=f"any w{NUM_WARPS}", constexprs={"BLOCK_V": BLOCK_V}, num_warps=NUM_WARPS)
    return [dict(kernel=k, types=types, cases=[case]) for k in (_ce_forward_kernel, _ce_backward_kernel)]
