"""Fused linear cross-entropy: `F.cross_entropy(F.linear(x, weight, bias), target, ...)` without ever holding the
(N, V) logits, as Liger Kernel's fused linear cross-entropy.

Rows go through in chunks: each chunk's logits x_c @ W.T (+ b) by a matmul, the chunk's losses and its gradient
d loss / d logits in one step over them, then dx_c = G_c @ W and dW += G_c.T @ x_c (fp32 accumulation) before the
next chunk reuses the memory. So at most one chunk of logits lives at a time, beside dx and dW.

When the gradients are computed. For reduction "mean" and "sum" every row's upstream gradient is the same scalar
(1 / count or 1, times the caller's), known up to that scalar in the forward: there the forward computes dx, dW and db
along with the loss (Liger's way) and the backward multiplies them by the upstream scalar: three matmuls in all, as
eager's linear forward and backward, where recomputing the logits in the backward would cost a fourth
(benchmarks/NOTES.md). For reduction "none" the rows' upstream gradients are known only in the backward, so the forward
computes the losses alone and the backward recomputes each chunk's logits.

Backends, each running the same chunk loop (`_chunked`) with its own step over a chunk's logits:
- `triton` (CUDA; CPU under TRITON_INTERPRET=1): kernels/linear_cross_entropy.py, which writes the chunk's gradient
  over its logits in place; chunks sized as Liger's, so a chunk of logits holds about as many elements as x.
- `cpu`: the same loop with the step in torch ops, in chunks of CPU_CHUNK_ELEMENTS logits.
- `reference`: the whole (N, V) logits as one chunk, the step in torch ops: the simplest statement of the op.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fasttrain import _backend
from fasttrain.ops._op import custom_op, reference_gradients

REDUCTIONS = ("mean", "sum", "none")
# Logits per chunk on the cpu backend (fp32: 32 MiB): large enough that a chunk's matmuls run at full speed on a CPU,
# small enough that the chunk stays a fraction of eager's (N, V) logits at N 4096, V 32k (benchmarks/NOTES.md).
CPU_CHUNK_ELEMENTS = 1 << 23


# ---- a chunk's loss and gradient, in torch ops (cpu and reference) --------------------------------------------------


def _ce_chunk_torch(logits, target, scale, ignore_index, label_smoothing, softcap):
    """(loss (C,), lse (C,), d loss / d logits (C, V) in the logits' dtype or None) for logits (C, V), as
    kernels/linear_cross_entropy.py's ce_chunk computes them; scale (C,) fp32: the rows' upstream gradients.
    Works over the chunk's own buffers in place: four passes over them for the gradient (max, exp, sum, scale)."""
    z = logits.float()  # (C, V); the logits buffer itself when they are fp32: the chunk's own, overwritten here
    t = None
    if softcap:
        t = torch.tanh(z / softcap)
        z = t * softcap
    ignored = target == ignore_index
    col = torch.where(ignored, 0, target)[:, None]  # (C, 1); an ignored row takes column 0, its loss is masked
    z_target = z.gather(1, col).squeeze(1)
    z_mean = z.mean(dim=-1) if label_smoothing else None
    m = z.amax(dim=-1, keepdim=True)  # (C, 1)
    p = z.sub_(m).exp_()  # exp(z - max), unnormalized
    total = p.sum(dim=-1, keepdim=True)  # (C, 1)
    lse = (m + total.log()).squeeze(1)  # (C,)
    loss = lse - z_target
    if label_smoothing:
        loss = (1.0 - label_smoothing) * loss + label_smoothing * (lse - z_mean)
    loss = torch.where(ignored, 0.0, loss)
    if scale is None:
        return loss, lse, None
    g = torch.where(ignored, 0.0, scale)[:, None]  # (C, 1)
    grad = p.mul_(g / total)  # softmax * g
    if label_smoothing:
        grad.sub_(g * (label_smoothing / grad.shape[1]))
    grad.scatter_add_(1, col, g * (label_smoothing - 1.0))  # - (1 - eps) onehot * g
    if t is not None:
        grad.mul_(t.mul_(t).neg_().add_(1.0))  # d(cap tanh(y / cap)) / dy = 1 - tanh^2
    return loss, lse, grad.to(logits.dtype)


def _accumulate(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc += a @ b, acc fp32 whatever a's and b's dtype."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    elif acc.is_cuda:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)  # cuBLAS: half inputs, fp32 sums, in place
    else:
        acc.add_(a @ b)


def _chunked(x, weight, bias, target, scale, weight_grad, chunk_rows, step):
    """The chunk loop of every backend: (loss (N,), lse (N,), dx, dW, db) with step(logits_c, target_c, scale_c)
    -> (loss_c, lse_c, gradient_c or None). Without scale, losses only (the gradients are empty tensors); without
    weight_grad (a frozen head), dx alone: a third fewer FLOPs and no fp32 accumulator."""
    N, K = x.shape
    V = weight.shape[0]
    loss = x.new_empty(N, dtype=torch.float32)
    lse = x.new_empty(N, dtype=torch.float32)
    dx, dw, db = (x.new_empty(0) for _ in range(3))  # three tensors: a registered op's outputs may not alias
    if scale is not None:
        dx = torch.empty_like(x)
    if scale is not None and weight_grad:
        dw = weight.new_zeros((V, K), dtype=torch.float32)
        db = bias.new_zeros(V, dtype=torch.float32) if bias is not None else db
    for start in range(0, N, chunk_rows):
        stop = min(start + chunk_rows, N)
        x_c = x[start:stop]  # (C, K)
        logits = F.linear(x_c, weight, bias)  # (C, V)
        s = scale[start:stop] if scale is not None else None
        loss[start:stop], lse[start:stop], grad = step(logits, target[start:stop], s)
        if grad is not None:
            torch.mm(grad, weight, out=dx[start:stop])
            if weight_grad:
                _accumulate(dw, grad.t(), x_c)
                if bias is not None:
                    db.add_(grad.sum(0, dtype=torch.float32))
    if scale is not None and weight_grad:
        dw = dw.to(weight.dtype)
        db = db.to(bias.dtype) if bias is not None else db
    return loss, lse, dx, dw, db


def _torch_step(ignore_index, label_smoothing, softcap):
    return lambda logits, target, scale: _ce_chunk_torch(logits, target, scale, ignore_index, label_smoothing, softcap)


# ---- the backends: what each computes -------------------------------------------------------------------------------
# forward(x, weight, bias, target, scale, weight_grad, ignore_index, label_smoothing, softcap) -> (loss (N,), lse (N,),
# dx, dW, db): scale (N,) fp32 the rows' upstream gradients, or None for the losses alone (then the gradients are empty
# tensors); weight_grad False: dW and db empty too (a frozen head).


class Reference:
    @staticmethod
    def forward(x, weight, bias, target, scale, weight_grad, ignore_index, label_smoothing, softcap):
        step = _torch_step(ignore_index, label_smoothing, softcap)
        return _chunked(x, weight, bias, target, scale, weight_grad, max(len(x), 1), step)


class Cpu:
    @staticmethod
    def forward(x, weight, bias, target, scale, weight_grad, ignore_index, label_smoothing, softcap):
        rows = max(1, CPU_CHUNK_ELEMENTS // weight.shape[0])
        step = _torch_step(ignore_index, label_smoothing, softcap)
        return _chunked(x, weight, bias, target, scale, weight_grad, rows, step)


class Triton:
    @staticmethod
    def forward(x, weight, bias, target, scale, weight_grad, ignore_index, label_smoothing, softcap):
        launch = _backend.kernels("linear_cross_entropy").ce_chunk

        def step(logits, target, scale):
            loss, lse = launch(logits, target, scale, ignore_index, label_smoothing, softcap)
            return loss, lse, logits if scale is not None else None  # the gradient, written over the logits

        N, K = x.shape
        V = weight.shape[0]
        # Liger's chunking: about as many logits per chunk as x has elements, in a power of two of rows.
        per_chunk = -(-N // -(-V // K))  # ceil(N / ceil(V / K))
        rows = 1 << max(per_chunk - 1, 0).bit_length()
        return _chunked(x, weight, bias, target, scale, weight_grad, rows, step)


# ---- the table: which backend can serve which inputs ----------------------------------------------------------------


def _triton_reason(x, *args):
    return _backend.triton_tensor_reason(x)


def _cpu_reason(x, *args):
    return None if x.device.type == "cpu" else _backend.CPU_TAKES_CPU


LINEAR_CROSS_ENTROPY = _backend.Table(
    "linear_cross_entropy",
    {
        "triton": _backend.Backend(_triton_reason, Triton, live=_backend.triton_live),
        "cpu": _backend.Backend(_cpu_reason, Cpu),
        "reference": _backend.Backend(_backend.always, Reference),
    },
)


# ---- the registered ops: one body for every backend, fake implementations, autograd --------------------------------
# The forward op takes the reduction: "none" computes the rows' losses alone; "sum" and "mean" return the reduced loss
# with dx, dW, db for it (db empty without a bias), which the backward scales by the upstream scalar.


def _uniform_scale(target: Tensor, ignore_index: int, reduction: str) -> Tensor:
    """(N,) fp32: every row's gradient weight in the reduced loss (1, or 1 / the rows not ignored), without a sync."""
    ones = torch.ones(target.shape, dtype=torch.float32, device=target.device)
    if reduction == "sum":
        return ones
    return ones / (target != ignore_index).sum()  # inf when every row is ignored: each such row's scale is masked


@custom_op("fasttrain::linear_cross_entropy", mutates_args=(), table=LINEAR_CROSS_ENTROPY)
def _forward_op(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target: Tensor,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    softcap: float,
    weight_grad: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    scale = None if reduction == "none" else _uniform_scale(target, ignore_index, reduction)
    impl = LINEAR_CROSS_ENTROPY[backend]
    rows, lse, dx, dw, db = impl.forward(
        x, weight, bias, target, scale, weight_grad, ignore_index, label_smoothing, softcap
    )
    if reduction == "none":
        return rows, lse, dx, dw, db
    loss = rows.sum() if reduction == "sum" else rows.sum() / (target != ignore_index).sum()
    return loss, lse, dx, dw, db


@_forward_op.register_fake
def _(x, weight, bias, target, ignore_index, reduction, label_smoothing, softcap, weight_grad, backend):
    N = x.shape[0]
    loss = x.new_empty((N,) if reduction == "none" else (), dtype=torch.float32)
    lse = x.new_empty((N,), dtype=torch.float32)
    if reduction == "none":
        return loss, lse, x.new_empty(0), x.new_empty(0), x.new_empty(0)
    if not weight_grad:
        return loss, lse, torch.empty_like(x), x.new_empty(0), x.new_empty(0)
    db = torch.empty_like(bias) if bias is not None else x.new_empty(0)
    return loss, lse, torch.empty_like(x), torch.empty_like(weight), db


@custom_op("fasttrain::linear_cross_entropy_backward", mutates_args=())
def _backward_op(
    grad_rows: Tensor,
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target: Tensor,
    ignore_index: int,
    label_smoothing: float,
    softcap: float,
    weight_grad: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    impl = LINEAR_CROSS_ENTROPY[backend]
    _, _, dx, dw, db = impl.forward(
        x, weight, bias, target, grad_rows, weight_grad, ignore_index, label_smoothing, softcap
    )
    return dx, dw, db


@_backward_op.register_fake
def _(grad_rows, x, weight, bias, target, ignore_index, label_smoothing, softcap, weight_grad, backend):
    if not weight_grad:
        return torch.empty_like(x), x.new_empty(0), x.new_empty(0)
    db = torch.empty_like(bias) if bias is not None else x.new_empty(0)
    return torch.empty_like(x), torch.empty_like(weight), db


def _torch_loss(x, weight, bias, target, ignore_index, reduction, label_smoothing, softcap):
    """torch's own composition, differentiable twice: the gradients of a double backward."""
    z = F.linear(x, weight, bias).float()
    if softcap:
        z = torch.tanh(z / softcap) * softcap
    return F.cross_entropy(z, target, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing)


def _setup_context(ctx, inputs, output):
    x, weight, bias, target, ctx.ignore_index, ctx.reduction, ctx.label_smoothing, ctx.softcap = inputs[:8]
    ctx.weight_grad, ctx.backend = inputs[8:]
    ctx.has_bias = bias is not None
    if ctx.reduction == "none":
        ctx.save_for_backward(x, weight, bias, target)
    else:
        ctx.save_for_backward(x, weight, bias, target, *output[2:])
    ctx.mark_non_differentiable(*output[1:])


def _backward(ctx, grad_loss, *unused):  # the lse and the stored gradients leave the op only through the loss
    x, weight, bias, target, *stored = ctx.saved_tensors
    if torch.is_grad_enabled():  # a double backward follows (see reference_gradients)
        args = (target, ctx.ignore_index, ctx.reduction, ctx.label_smoothing, ctx.softcap)
        dx, dw, db = reference_gradients(lambda x, w, b: _torch_loss(x, w, b, *args), (x, weight, bias), (grad_loss,))
    elif ctx.reduction == "none":
        grad_rows = grad_loss.float().contiguous()
        dx, dw, db = _backward_op(
            grad_rows,
            x,
            weight,
            bias,
            target,
            ctx.ignore_index,
            ctx.label_smoothing,
            ctx.softcap,
            ctx.weight_grad,
            ctx.backend,
        )
    else:
        dx, dw, db = stored
        g = grad_loss.float()
        dx = (dx * g).to(x.dtype)
        if ctx.weight_grad:
            dw = (dw * g).to(weight.dtype)
            db = (db * g).to(bias.dtype) if ctx.has_bias else db
    if not ctx.weight_grad:  # a frozen head: its gradients were never computed
        dw = db = None
    return dx, dw, db if ctx.has_bias else None, None, None, None, None, None, None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


# ---- the public function: check the arguments, choose, call --------------------------------------------------------


def _check(x, weight, target, bias, ignore_index, reduction, label_smoothing, softcap):
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if t is None and name == "bias":
            continue
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    if x.dim() != 2:
        raise ValueError(f"x must be a 2-D tensor (N, K), got shape {tuple(x.shape)}")
    if weight.dim() != 2 or weight.shape[1] != x.shape[1] or weight.shape[0] == 0:
        raise ValueError(f"weight must have shape (V, {x.shape[1]}) with V >= 1, got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    autocast = torch.is_autocast_enabled(x.device.type)  # then F.linear casts them to one dtype
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != x.dtype and not autocast:
            raise TypeError(f"{name} must have x's dtype ({x.dtype}), got {t.dtype}")
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} must be on x's device ({x.device}), got {t.device}")
    integer = isinstance(target, Tensor) and not (target.is_floating_point() or target.is_complex())
    if not integer or target.dtype == torch.bool:
        got = getattr(target, "dtype", type(target).__name__)
        raise TypeError(f"target must be an integer tensor of class indices, got {got}")
    if tuple(target.shape) != (x.shape[0],):
        raise ValueError(f"target must have shape ({x.shape[0]},), got {tuple(target.shape)}")
    if target.device != x.device:
        raise ValueError(f"target must be on x's device ({x.device}), got {target.device}")
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not isinstance(label_smoothing, (int, float)) or isinstance(label_smoothing, bool):
        raise TypeError(f"label_smoothing must be a float, got {type(label_smoothing).__name__}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if softcap is not None:
        if not isinstance(softcap, (int, float)) or isinstance(softcap, bool):
            raise TypeError(f"softcap must be a float or None, got {type(softcap).__name__}")
        if not softcap > 0:
            raise ValueError(f"softcap must be > 0 (or None), got {softcap}")


def linear_cross_entropy(
    x: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    softcap: float | None = None,
    *,
    backend: str | None = None,
) -> Tensor:
    """`F.cross_entropy(F.linear(x, weight, bias), target, ignore_index=..., reduction=..., label_smoothing=...)`,
    with Gemma 2's final logit softcapping (logits -> softcap * tanh(logits / softcap)) when softcap is given, without
    holding the (N, V) logits.

    x: (N, K); weight: (V, K), the output projection (an lm_head's weight); bias: (V,) or None, all of one floating
    dtype and device; target: (N,) integer class indices. Rows whose target equals ignore_index add nothing and get
    zero gradient; "mean" divides by the rows not ignored (NaN when all are, as torch). label_smoothing as
    F.cross_entropy defines it. The logits are computed in x's dtype (the autocast dtype under autocast, as F.linear)
    and the softmax and loss in float32: the loss is float32 whatever x's dtype (reduction "none": (N,)).
    Gradients of x, weight and bias; a double backward (create_graph=True) takes torch's own composition. On the
    triton backend a target outside [0, V) gives a NaN loss instead of a device assert.
    backend: "auto" (default), "triton", "cpu" or "reference".
    """
    _check(x, weight, target, bias, ignore_index, reduction, label_smoothing, softcap)
    if torch.is_autocast_enabled(x.device.type):  # F.linear's autocast: the matmuls in the autocast dtype
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight, bias = (t.to(dtype) if t is not None else None for t in (x, weight, bias))
    name = LINEAR_CROSS_ENTROPY.choose(x, weight, target, backend=backend)
    x, weight = x.contiguous(), weight.contiguous()
    bias = bias.contiguous() if bias is not None else None
    with torch.autocast(x.device.type, enabled=False):
        loss, *_ = _forward_op(
            x,
            weight,
            bias,
            target.long().contiguous(),
            ignore_index,
            reduction,
            float(label_smoothing),
            float(softcap or 0.0),
            weight.requires_grad or (bias is not None and bias.requires_grad),
            name,
        )
    return loss
