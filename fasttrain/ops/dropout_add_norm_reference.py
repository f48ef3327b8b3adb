"""flash-attn's references for its fused dropout + residual + norm (`layer_norm_ref`, `rms_norm_ref` of
flash_attn.ops.triton.layer_norm), in plain PyTorch with flash-attn's arguments and rounding: the branch (times
rowscale, through dropout, plus x1) added to the residual and rounded to the branch's dtype, normalized in the dtype
that the rows and the weight promote to, the output in x's dtype. upcast=True computes all of it in fp32.

These are the test oracle of fasttrain.ops.dropout_add_norm, not its implementation: that one computes the pre-add in
fp32 and normalizes with fasttrain.ops.norms' op.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def layer_norm_ref(
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
    zero_centered_weight=False,
    dropout_mask=None,
    dropout_mask1=None,
    upcast=False,
):
    """LayerNorm of (x * rowscale, dropped out) + (x1, dropped out) + residual: out, or (out, out1) with weight1; with
    prenorm the rows normalized come last. dropout_mask / dropout_mask1 (bool, x's shape, True = kept) replay a mask;
    without one F.dropout draws it."""
    return _reference(
        False, x, weight, bias, residual, x1, weight1, bias1, eps, dropout_p, rowscale, prenorm,
        zero_centered_weight, dropout_mask, dropout_mask1, upcast,
    )  # fmt: skip


def rms_norm_ref(
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
    zero_centered_weight=False,
    dropout_mask=None,
    dropout_mask1=None,
    upcast=False,
):
    """layer_norm_ref with RMSNorm: x / sqrt(mean(x^2) + eps) * weight (+ bias), in the rows' and weight's promoted
    dtype."""
    return _reference(
        True, x, weight, bias, residual, x1, weight1, bias1, eps, dropout_p, rowscale, prenorm,
        zero_centered_weight, dropout_mask, dropout_mask1, upcast,
    )  # fmt: skip


def _reference(
    is_rms, x, weight, bias, residual, x1, weight1, bias1, eps, dropout_p, rowscale, prenorm, zero_centered_weight,
    mask, mask1, upcast,
):  # fmt: skip
    out_dtype = x.dtype
    if upcast:
        x, weight, bias, residual, x1, weight1, bias1 = (
            None if t is None else t.float() for t in (x, weight, bias, residual, x1, weight1, bias1)
        )
    if zero_centered_weight:  # the weight is stored as its offset from 1
        weight = weight + 1.0
        weight1 = None if weight1 is None else weight1 + 1.0
    if x1 is not None and rowscale is not None:
        raise ValueError("rowscale must be None when x1 (the parallel branch) is given, as in flash-attn")
    if rowscale is not None:
        x = x * rowscale[..., None]  # one factor per row
    if dropout_p > 0.0:
        x = _dropout(x, dropout_p, mask)
        x1 = None if x1 is None else _dropout(x1, dropout_p, mask1)
    if x1 is not None:
        x = x + x1
    if residual is not None:
        x = (x + residual).to(x.dtype)
    if is_rms:
        rstd = 1 / torch.sqrt(x.square().mean(-1, keepdim=True) + eps)  # (..., 1)

        def norm(w: Tensor, b: Tensor | None) -> Tensor:
            y = x * rstd * w
            return (y if b is None else y + b).to(out_dtype)
    else:

        def norm(w: Tensor, b: Tensor | None) -> Tensor:
            return F.layer_norm(x.to(w.dtype), x.shape[-1:], w, b, eps).to(out_dtype)

    outs = (norm(weight, bias),) + (() if weight1 is None else (norm(weight1, bias1),)) + ((x,) if prenorm else ())
    return outs[0] if len(outs) == 1 else outs


def _dropout(x: Tensor, p: float, keep: Tensor | None) -> Tensor:
    if keep is None:
        return F.dropout(x, p)
    return x.masked_fill(~keep, 0.0) / (1.0 - p)
