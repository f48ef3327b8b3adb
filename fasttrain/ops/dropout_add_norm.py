"""flash-attn's fused dropout + residual + norm (flash_attn.ops.triton.layer_norm): `layer_norm_fn`, `rms_norm_fn`,
the `RMSNorm` module and `layer_norm_linear_fn`, with flash-attn's arguments, defaults, dtypes and return structure.

The branch x (times rowscale, through dropout, plus a second branch x1 through its own dropout) is added to the
residual and normalized by weight and bias, and by weight1 and bias1 too when a second, parallel norm is asked for.
What runs: the residual add and the norm are fasttrain.ops.norms' op (its aot, triton or reference backend, chosen as
for add_layer_norm); without dropout, rowscale, x1 and weight1 (the common pre-norm block) that op is the whole
forward, x and residual going straight into its fused add + norm. With any of them, x (times rowscale, dropped out,
plus x1) is formed first in PyTorch, in fp32 as flash-attn's kernel computes it, and the op adds the residual and
normalizes; weight1 is a second call of the op on the residual stream. Gradients: x, residual, x1, weight, bias,
weight1, bias1 (rowscale gets none, as in flash-attn).

Where this differs from flash-attn (docs/backends.md): the dropout masks come from torch's generator (seeded by
torch.manual_seed), not flash-attn's Philox, so the masks differ while their law is the same, and the mask returned
with return_dropout_mask is the one applied; residual_out= is written and returned (flash-attn's wrapper drops it and
returns x); bias1 without weight1 raises (flash-attn ignores it); out= and residual_out= receive a copy.
"""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fasttrain.ops import norms


def layer_norm_fn(
    x,
    weight,
    bias,
    residual=None,
    x1=None,
    weight1=None,
    bias1=None,
    eps=1e-6,
    dropout_p=0.0,
    rowscale=None,
    prenorm=False,
    residual_in_fp32=False,
    zero_centered_weight=False,
    is_rms_norm=False,
    return_dropout_mask=False,
    out_dtype=None,
    out=None,
    residual_out=None,
):
    """flash-attn's layer_norm_fn. x, residual, x1 (..., N); weight, bias, weight1, bias1 (N,); rowscale one factor
    per row (x.shape[:-1] elements). Returns out, then out1 (with weight1), then the residual stream (with prenorm),
    then the two dropout masks (with return_dropout_mask: bool, x's shape, True = kept; None without dropout, the
    second None without x1); one tensor alone is returned bare, several as a tuple. out is in out_dtype (default x's;
    autocast does not change it); the residual stream in residual's dtype, else fp32 with residual_in_fp32, else x's
    (x itself when nothing is added)."""
    name = "rms_norm_fn" if is_rms_norm else "layer_norm_fn"
    _check(name, x, weight, bias, residual, x1, weight1, bias1, eps, dropout_p, rowscale, out_dtype)
    N = x.shape[-1]
    for arg, t in (("out", out), ("residual_out", residual_out)):
        if t is not None:
            _check_destination(name, arg, t, x)
    stream_dtype = residual.dtype if residual is not None else torch.float32 if residual_in_fp32 else x.dtype
    y_dtype = out.dtype if out is not None else out_dtype or x.dtype
    weight, weight1 = (_centered(w) if zero_centered_weight else w for w in (weight, weight1))

    def rows(t: Tensor) -> Tensor:
        return t.reshape(-1, N)  # (..., N) -> (M, N)

    with torch.autocast(x.device.type, enabled=False):  # flash-attn's dtypes are the arguments', whatever autocast
        if dropout_p == 0 and rowscale is None and x1 is None and weight1 is None:
            branch, masks = rows(x), (None, None)
        else:
            branch, masks = _pre_add(rows(x), rows(x1) if x1 is not None else None, rowscale, dropout_p)
        res = rows(residual) if residual is not None else None
        y, stream = _normalize(branch, res, N, weight, bias, eps, is_rms_norm, y_dtype)
        stream = branch if res is None else stream  # (M, N)
        y1 = None
        if weight1 is not None:
            y1 = _normalize(stream, None, N, weight1, bias1, eps, is_rms_norm, y_dtype)[0]
    if prenorm or residual_out is not None:  # written when given, returned only with prenorm
        stream = stream.to(residual_out.dtype if residual_out is not None else stream_dtype)
        stream = _into(residual_out, stream, x.shape)
    outs = [_into(out, y, x.shape)]
    if y1 is not None:
        outs.append(y1.view(x.shape))
    if prenorm:
        outs.append(stream)
    if return_dropout_mask:
        outs.extend(None if m is None else m.view(x.shape) for m in masks)
    return outs[0] if len(outs) == 1 else tuple(outs)


def rms_norm_fn(
    x,
    weight,
    bias,
    residual=None,
    x1=None,
    weight1=None,
    bias1=None,
    eps=1e-6,
    dropout_p=0.0,
    rowscale=None,
    prenorm=False,
    residual_in_fp32=False,
    zero_centered_weight=False,
    return_dropout_mask=False,
    out_dtype=None,
    out=None,
    residual_out=None,
):
    """layer_norm_fn with is_rms_norm=True (bias, when given, is added after the scaling)."""
    return layer_norm_fn(
        x, weight, bias, residual, x1, weight1, bias1, eps, dropout_p, rowscale, prenorm, residual_in_fp32,
        zero_centered_weight, True, return_dropout_mask, out_dtype, out, residual_out,
    )  # fmt: skip


class RMSNorm(nn.Module):
    """flash-attn's RMSNorm module over rms_norm_fn: a weight of hidden_size (ones, or zeros with
    zero_centered_weight, where the scale is 1 + weight), no bias; dropout of the branch only in training."""

    def __init__(self, hidden_size, eps=1e-5, dropout_p=0.0, zero_centered_weight=False, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.drop = nn.Dropout(dropout_p) if dropout_p > 0.0 else None
        self.zero_centered_weight = zero_centered_weight
        self.weight = nn.Parameter(torch.empty(hidden_size, device=device, dtype=dtype))
        self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self):
        (nn.init.zeros_ if self.zero_centered_weight else nn.init.ones_)(self.weight)

    def forward(self, x, residual=None, prenorm=False, residual_in_fp32=False):
        return rms_norm_fn(
            x,
            self.weight,
            self.bias,
            residual=residual,
            eps=self.eps,
            dropout_p=self.drop.p if self.drop is not None and self.training else 0.0,
            prenorm=prenorm,
            residual_in_fp32=residual_in_fp32,
            zero_centered_weight=self.zero_centered_weight,
        )


def layer_norm_linear_fn(
    x,
    norm_weight,
    norm_bias,
    linear_weight,
    linear_bias,
    residual=None,
    eps=1e-6,
    prenorm=False,
    residual_in_fp32=False,
    is_rms_norm=False,
):
    """flash-attn's layer_norm_linear_fn: the norm of layer_norm_fn (residual, prenorm, residual_in_fp32 as there)
    then F.linear by linear_weight (K, N) and linear_bias (K,). Under autocast the norm's output and the linear are
    in the autocast dtype, else in x's (the linear's parameters cast to it)."""
    name = "layer_norm_linear_fn"
    if not isinstance(x, Tensor) or x.dim() == 0:
        raise TypeError(f"{name}: x must be a floating-point tensor of at least 1 dim, got {_what(x)}")
    if norm_weight is None or linear_weight is None:
        raise TypeError(f"{name}: norm_weight and linear_weight must be tensors, got None")
    _check_parameter(name, "norm_weight", norm_weight, x, x.shape[-1:])
    _check_parameter(name, "norm_bias", norm_bias, x, x.shape[-1:])
    _check_parameter(name, "linear_weight", linear_weight, x, None)
    if linear_weight.dim() != 2 or linear_weight.shape[1] != x.shape[-1]:
        raise ValueError(f"{name}: linear_weight must be (K, {x.shape[-1]}), got {tuple(linear_weight.shape)}")
    _check_parameter(name, "linear_bias", linear_bias, x, linear_weight.shape[:1])
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    y, stream = layer_norm_fn(
        x, norm_weight, norm_bias, residual, eps=eps, prenorm=True, residual_in_fp32=residual_in_fp32,
        is_rms_norm=is_rms_norm, out_dtype=dtype,
    )  # fmt: skip
    dtype = dtype or y.dtype
    bias = linear_bias.to(dtype) if linear_bias is not None else None
    out = F.linear(y, linear_weight.to(dtype), bias)
    return (out, stream) if prenorm else out


# ---- the pieces -------------------------------------------------------------------------------------------------


def _pre_add(x: Tensor, x1: Tensor | None, rowscale: Tensor | None, p: float):
    """(x * rowscale through dropout, plus x1 through its own dropout, in fp32 or wider (M, N); the two keep masks
    or None). rowscale is detached: flash-attn gives it no gradient. In fp32 the gradients arriving from the two
    norms (weight1) and the stream add up before x's single rounding, as in flash-attn's kernel."""
    wide = torch.promote_types(x.dtype, torch.float32)
    h = x.to(wide)
    if rowscale is not None:
        h = h * rowscale.detach().reshape(-1, 1).to(wide)  # (M, 1): one factor per row
    h, keep = _dropout(h, p)
    keep1 = None
    if x1 is not None:
        h1, keep1 = _dropout(x1.to(wide), p)
        h = h + h1
    return h, (keep, keep1)


def _normalize(rows, residual, N, weight, bias, eps, is_rms, out_dtype) -> tuple[Tensor, Tensor]:
    """(norm, stream) from the norms' op (norms._norm); an RMSNorm bias, which the op does not take (its shipped
    cubins have none), is added after it, before the output's rounding."""
    if not (is_rms and bias is not None):
        return norms._norm(rows, residual, N, weight, bias, eps, is_rms, None, out_dtype)
    wide = torch.promote_types(out_dtype, torch.float32)
    y, stream = norms._norm(rows, residual, N, weight, None, eps, True, None, wide)
    return (y + bias).to(out_dtype), stream


def _dropout(h: Tensor, p: float) -> tuple[Tensor, Tensor | None]:
    if p == 0:
        return h, None
    keep = torch.rand_like(h) >= p  # kept with probability 1 - p
    # a dropped element is 0 whatever it held (inf or NaN too), as flash-attn's kernel selects it rather than scale
    return torch.where(keep, h * (1.0 / (1.0 - p) if p < 1 else 0.0), 0.0), keep


def _centered(w: Tensor | None) -> Tensor | None:
    # The scale is 1 + weight, added in fp32 (as flash-attn's kernel): a bf16 weight plus 1 would lose its low bits.
    return None if w is None else w.to(torch.promote_types(w.dtype, torch.float32)) + 1.0


def _into(dest: Tensor | None, value: Tensor, shape: torch.Size) -> Tensor:
    """value (M, N) in x's shape, copied into dest (out=, residual_out=) when one was given."""
    if dest is None:
        return value.view(shape)
    dest.view(value.shape).copy_(value)
    return dest.view(shape)


def _check(name, x, weight, bias, residual, x1, weight1, bias1, eps, dropout_p, rowscale, out_dtype) -> None:
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() == 0:
        raise TypeError(f"{name}: x must be a floating-point tensor of at least 1 dim, got {_what(x)}")
    if weight is None:
        raise TypeError(f"{name}: weight must be a tensor of shape ({x.shape[-1]},), got None")
    for arg, t in (("weight", weight), ("bias", bias), ("weight1", weight1), ("bias1", bias1)):
        _check_parameter(name, arg, t, x, x.shape[-1:])
    for arg, t in (("residual", residual), ("x1", x1)):
        _check_parameter(name, arg, t, x, x.shape)
    if bias1 is not None and weight1 is None:
        raise ValueError(f"{name}: bias1 is the parallel norm's bias, and needs weight1")
    if rowscale is not None:
        if x1 is not None:
            raise ValueError(f"{name}: rowscale must be None when x1 is given (as in flash-attn)")
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        if not isinstance(rowscale, Tensor) or rowscale.numel() != rows or rowscale.device != x.device:
            raise ValueError(f"{name}: rowscale must be a tensor of one factor per row ({rows} on {x.device}), "
                             f"got {_what(rowscale)}")  # fmt: skip
    norms._check_eps(name, eps)
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real) or not 0 <= dropout_p <= 1:
        raise ValueError(f"{name}: dropout_p must be a float in [0, 1], got {dropout_p!r}")
    if out_dtype is not None and (not isinstance(out_dtype, torch.dtype) or not out_dtype.is_floating_point):
        raise TypeError(f"{name}: out_dtype must be None or a floating torch.dtype, got {out_dtype!r}")


def _check_parameter(name: str, arg: str, t, x: Tensor, shape) -> None:
    """t None, or a floating tensor on x's device of this shape (None: any)."""
    if t is None:
        return
    if not isinstance(t, Tensor) or not t.is_floating_point():
        raise TypeError(f"{name}: {arg} must be a floating-point tensor, got {_what(t)}")
    if shape is not None and t.shape != shape:
        raise ValueError(f"{name}: {arg} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.device != x.device:
        raise ValueError(f"{name}: {arg} must be on x's device ({x.device}), got {t.device}")


def _check_destination(name: str, arg: str, t, x: Tensor) -> None:
    """out= / residual_out=: a floating tensor on x's device that views as x's rows (M, N), as flash-attn writes it."""
    _check_parameter(name, arg, t, x, None)
    N = x.shape[-1]
    if t.dim() == 0 or t.shape[-1] != N or t.numel() != x.numel():
        raise ValueError(f"{name}: {arg} must hold x's rows ({x.numel() // max(N, 1)}, {N}), got {tuple(t.shape)}")
    try:
        unit = t.view(-1, N).stride(-1) == 1 or N == 1
    except RuntimeError:
        unit = False
    if not unit:
        raise ValueError(f"{name}: {arg} must be viewable as rows (M, N) of unit column stride, got {t.stride()}")


def _what(t) -> str:
    return f"{t.dtype} {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
