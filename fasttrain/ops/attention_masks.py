"""Which `attn_mask` of scaled_dot_product_attention the kernels can serve: a boolean mask (or an additive one of
0 and -inf only) that is the same for every batch row and head and, in every query row i, lets through exactly the
keys i - L .. i + R (clipped to the keys that exist; L, R fixed or unbounded) is the kernels' (left, right) band:
causal, sliding-window, or any such window. Anything else stays a mask, which the reference serves.

Reading a mask's values costs a few reductions over it and, on a GPU, one host sync. A model hands the same mask to
every layer, so the answer for the last mask seen is kept (by identity, shape and in-place version) and a layer after
the first pays nothing. Not while torch.compile traces or a CUDA graph is captured: the values cannot be read there.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor

from fasttrain.ops.attention_reference import UNBOUNDED

_last: list = [None]  # (weakref to the mask, its version, B, Tq, Tk, answer)


def _broadcast_4d(mask: Tensor, B: int, Tq: int, Tk: int) -> Tensor | None:
    """mask as (B or 1, 1, Tq, Tk) without copying, or None if it differs per head or does not broadcast."""
    if mask.dim() > 4:
        return None
    mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))  # (b, h, tq, tk), each of size 1 or full
    b, h, tq, tk = mask.shape
    if h != 1 or b not in (1, B) or tq not in (1, Tq) or tk not in (1, Tk):
        return None
    return mask.expand(b, 1, Tq, Tk)


def _band(visible: Tensor, Tk: int, *conditions: Tensor) -> tuple[int, int] | None:
    """(L, R) with row i of visible (Tq, Tk) exactly the keys max(0, i - L) .. min(Tk - 1, i + R); UNBOUNDED where no
    row is cut on that side; None unless every condition (0-d bool tensors) holds too. One transfer to the host."""
    Tq = visible.shape[0]
    j = torch.arange(Tk, device=visible.device)
    # Byte-wide passes: the first and the last visible key of each row, then the row against that interval.
    v8 = visible.contiguous().view(torch.uint8)
    seen = visible.any(-1)
    lo = torch.where(seen, v8.argmax(-1), Tk)  # (Tq,): Tk where a row sees nothing
    hi = torch.where(seen, (Tk - 1) - v8.flip(-1).argmax(-1), -1)  # (Tq,): -1 there
    contiguous = ~(visible ^ ((j >= lo[:, None]) & (j <= hi[:, None]))).any()
    flags = torch.stack((contiguous, *conditions)).long()
    stats = torch.cat((lo, hi, flags)).cpu()
    if not bool(stats[2 * Tq :].all()):
        return None
    lo, hi, i = stats[:Tq], stats[Tq : 2 * Tq], torch.arange(Tq)
    seen = lo <= hi
    cut_right, cut_left = seen & (hi < Tk - 1), seen & (lo > 0)
    R = int((hi - i)[cut_right][0]) if cut_right.any() else UNBOUNDED
    L = int((i - lo)[cut_left][0]) if cut_left.any() else UNBOUNDED
    want_lo, want_hi = (i - L).clamp(min=0), (i + R).clamp(max=Tk - 1)
    empty = want_lo > want_hi
    if not bool(((seen == ~empty) & (~seen | ((lo == want_lo) & (hi == want_hi)))).all()):
        return None
    return L, R


def kernel_band(mask: Tensor, B: int, Tq: int, Tk: int) -> tuple[int, int] | None:
    """The kernels' (left, right) for SDPA's `mask` over (B, H, Tq, Tk) scores, in flash-attn's bottom-right
    coordinates (query i sees keys j with -left <= j - i - (Tk - Tq) <= right), or None where the mask is not a band,
    takes a gradient, or cannot be read now."""
    if torch.compiler.is_compiling() or (mask.is_cuda and torch.cuda.is_current_stream_capturing()):
        return None
    if mask.requires_grad or (mask.dtype != torch.bool and not mask.is_floating_point()):
        return None
    seen = _last[0]
    if seen is not None and seen[0]() is mask and seen[1:5] == (mask._version, B, Tq, Tk):
        return seen[5]
    answer = _kernel_band(mask, B, Tq, Tk)
    if not mask.is_inference():  # inference tensors keep no version: an in-place change would go unseen
        _last[0] = (weakref.ref(mask), mask._version, B, Tq, Tk, answer)
    return answer


def _kernel_band(mask: Tensor, B: int, Tq: int, Tk: int) -> tuple[int, int] | None:
    mask4 = _broadcast_4d(mask, B, Tq, Tk)
    if mask4 is None or Tq == 0 or Tk == 0:
        return None
    conditions = []
    if mask4.dtype == torch.bool:
        visible = mask4[:, 0]  # (b, Tq, Tk)
    else:
        visible = mask4[:, 0] == 0
        conditions.append((visible | (mask4[:, 0] == float("-inf"))).all())  # other values add to the scores
    if visible.shape[0] > 1:
        conditions.append((visible == visible[:1]).all())  # one mask for every batch row
    band = _band(visible[0], Tk, *conditions)
    if band is None:
        return None
    L, R = band  # top-left offsets: -L <= j - i <= R
    shift = Tk - Tq
    left, right = (UNBOUNDED if L == UNBOUNDED else L + shift), (UNBOUNDED if R == UNBOUNDED else R - shift)
    return None if left < 0 else (left, right)  # a window ending before the bottom-right diagonal: the reference
