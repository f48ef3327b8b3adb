"""LayerNorm and RMSNorm with torch's functional signatures, on a Triton body shared by both.

Three layers, as in ops/cross_entropy.py: the kernels in fasttrain.kernels.norms; the `torch.library` ops
`fasttrain::norm_forward` / `_backward` around them (output, mean, 1/std; then dx, dw, db from the saved statistics),
with fake implementations and a registered autograd formula; and `layer_norm` / `rms_norm` below, which check their
inputs, choose the backend and flatten the normalized dims into rows. The reference backend is torch's own
F.layer_norm / F.rms_norm.

One difference from torch, on every backend: under autocast the output is in the autocast dtype (torch computes the
norm in fp32 and returns fp32, and the Linear that follows casts it to bf16 in a separate pass; the kernel computes in
fp32 and writes bf16 once, the same rounding without the extra read and write).
"""
from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F
from torch import Tensor

from fasttrain import _backend
from fasttrain.ops._op import custom_op

OP = "norms"


def _kernels():
    # Imported on first use only (see ops/attention.py: importing the kernels turns the interpreter on for CPU runs).
    from fasttrain.kernels import norms
    return norms


# ---- the registered ops --------------------------------------------------------------------------------------------

@custom_op("fasttrain::norm_forward", mutates_args=())
def _forward_op(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, is_rms: bool,
                out_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    return _kernels().norm_forward(x, weight, bias, eps, is_rms, out_dtype)


@_forward_op.register_fake
def _(x, weight, bias, eps, is_rms, out_dtype):
    M = x.shape[0]
    return (x.new_empty(x.shape, dtype=out_dtype), x.new_empty(0 if is_rms else M, dtype=torch.float32),
            x.new_empty(M, dtype=torch.float32))


@custom_op("fasttrain::norm_backward", mutates_args=())
def _backward_op(dy: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, rstd: Tensor, is_rms: bool,
                 has_bias: bool) -> tuple[Tensor, Tensor, Tensor]:
    dx, dw, db = _kernels().norm_backward(dy, x, weight, mean, rstd, is_rms, has_bias)
    # The schema has no optional outputs: an absent parameter's gradient comes back empty (two distinct tensors: a
    # custom op's outputs may not alias).
    return dx, x.new_empty(0) if dw is None else dw, x.new_empty(0) if db is None else db


@_backward_op.register_fake
def _(dy, x, weight, mean, rstd, is_rms, has_bias):
    param = weight if weight is not None else x
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            param.new_empty(x.shape[1:] if weight is not None else 0),
            param.new_empty(x.shape[1:] if has_bias else 0))


def _setup_context(ctx, inputs, output):
    x, weight, bias, _, is_rms, _ = inputs
    ctx.save_for_backward(x, weight, output[1], output[2])
    ctx.is_rms, ctx.has_bias = is_rms, bias is not None


def _backward(ctx, dy, grad_mean, grad_rstd):  # mean and rstd never leave the op, so they have no gradient
    x, weight, mean, rstd = ctx.saved_tensors
    dx, dw, db = _backward_op(dy.contiguous(), x, weight, mean, rstd, ctx.is_rms, ctx.has_bias)
    return dx, (dw if weight is not None else None), (db if ctx.has_bias else None), None, None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


# ---- input checks, backend choice ----------------------------------------------------------------------------------

def _triton_reason(x: Tensor, n_cols: int) -> str | None:
    if (why := _backend.triton_tensor_reason(x)) is not None:
        return why
    if n_cols > _kernels().MAX_N:
        return f"normalized rows of {n_cols} elements exceed the kernels' {_kernels().MAX_N} (held in registers)"
    return None


_backend.register(OP, lambda: {"triton": _backend.triton_reason(_backend.default_device()), "reference": None})


def _normalized_size(name: str, input: Tensor, normalized_shape, weight: Tensor | None, bias: Tensor | None) -> int:
    """The number of elements per normalized row, after checking every argument against normalized_shape."""
    if not isinstance(input, Tensor) or not input.is_floating_point():
        raise ValueError(f"{name}: input must be a floating-point tensor, got "
                         f"{getattr(input, 'dtype', type(input).__name__)}")
    if isinstance(normalized_shape, numbers.Integral):
        normalized_shape = (normalized_shape,)
    shape = tuple(normalized_shape)
    if not shape or len(shape) > input.dim() or any(not isinstance(n, numbers.Integral) or n < 1 for n in shape) \
            or tuple(input.shape[input.dim() - len(shape):]) != shape:
        raise ValueError(f"{name}: normalized_shape must be the trailing dims of input {tuple(input.shape)}, got "
                         f"{tuple(normalized_shape)}")
    for arg, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if not isinstance(t, Tensor) or tuple(t.shape) != shape or not t.is_floating_point():
            raise ValueError(f"{name}: {arg} must be a floating-point tensor of shape {shape}, got "
                             f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
        if t.device != input.device:
            raise ValueError(f"{name}: {arg} must be on input's device ({input.device}), got {t.device}")
    n = 1
    for d in shape:
        n *= d
    return n


def _out_dtype(input: Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(input.device.type):
        return torch.get_autocast_dtype(input.device.type)
    return input.dtype


def _norm(input: Tensor, n_cols: int, weight: Tensor | None, bias: Tensor | None, eps: float, is_rms: bool) -> Tensor:
    x = input.reshape(-1, n_cols)  # (M, N): one row per normalized slice
    if x.stride(-1) != 1:
        x = x.contiguous()
    # (N,) unit-stride parameters; autograd takes their gradients back to the normalized shape.
    weight, bias = (t.reshape(-1).contiguous() if t is not None else None for t in (weight, bias))
    y, _, _ = _forward_op(x, weight, bias, float(eps), is_rms, _out_dtype(input))
    return y.view(input.shape)


def _check_eps(name: str, eps) -> None:
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not eps >= 0:
        raise ValueError(f"{name}: eps must be a float >= 0, got {eps!r}")


def layer_norm(input: Tensor, normalized_shape, weight: Tensor | None = None, bias: Tensor | None = None,
               eps: float = 1e-5, *, backend: str | None = None) -> Tensor:
    """torch's `F.layer_norm`: normalize over the trailing `normalized_shape` dims to zero mean and unit variance,
    then scale by weight and shift by bias. Statistics in fp32 whatever the dtype; under autocast the output is in the
    autocast dtype (module docstring). backend: "auto" (default), "triton" or "reference"."""
    n_cols = _normalized_size("layer_norm", input, normalized_shape, weight, bias)
    _check_eps("layer_norm", eps)
    if _backend.choose(OP, {"triton": _triton_reason(input, n_cols), "reference": None}, backend) == "reference":
        return F.layer_norm(input, normalized_shape, weight, bias, eps).to(_out_dtype(input))
    return _norm(input, n_cols, weight, bias, eps, is_rms=False)


def rms_norm(input: Tensor, normalized_shape, weight: Tensor | None = None, eps: float | None = None, *,
             backend: str | None = None) -> Tensor:
    """torch's `F.rms_norm`: x / sqrt(mean(x^2) + eps) over the trailing `normalized_shape` dims, times weight;
    eps None means torch.finfo(input.dtype).eps, as in torch. Statistics in fp32; under autocast the output is in the
    autocast dtype (module docstring). backend: "auto" (default), "triton" or "reference"."""
    n_cols = _normalized_size("rms_norm", input, normalized_shape, weight, None)
    if eps is None:
        eps = torch.finfo(input.dtype).eps
    _check_eps("rms_norm", eps)
    if _backend.choose(OP, {"triton": _triton_reason(input, n_cols), "reference": None}, backend) == "reference":
        return F.rms_norm(input, normalized_shape, weight, eps).to(_out_dtype(input))
    return _norm(input, n_cols, weight, None, eps, is_rms=True)
