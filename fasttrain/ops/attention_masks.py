"""Which `attn_mask` of scaled_dot_product_attention the kernels can serve, and how.

A boolean mask (or an additive one of 0 and -inf only), one for every head, whose every query row lets through one
interval of keys (or none) is served by the kernels in one of two ways:

- a band: the same for every batch row, row i seeing exactly the keys i - L .. i + R (clipped to the keys that exist;
  L, R fixed or unbounded): causal, sliding-window. It becomes the kernels' (left, right) and nothing is copied.
- segments: padding (per batch row, a run of real keys, left or right padded, with or without causality) and
  document packing (block-diagonal, causal or not within each document). Each batch row's query rows are cut into
  runs that share their first key and whose last key either stays put (a "full" run: every row sees the same keys)
  or moves one key per row (a "causal" run, flash-attn's bottom-right causality over the run's own keys). The runs
  of each kind are one packed launch of the varlen kernel; rows that see no key give 0, as torch's.

Anything else stays a mask, which the reference serves: a row seeing two separate stretches of keys, a mask per
head, other additive values, a mask that takes a gradient, or segments whose gathered keys would exceed twice the
keys there are (sliding windows within documents: many short runs, each with its own copy of its keys).

Reading a mask's values costs a few reductions over it and, on a GPU, one host sync. A model hands the same mask to
every layer, so the answer for the last mask seen is kept (by identity, shape, device and in-place version) and a
layer after the first pays nothing. Not while torch.compile traces or a CUDA graph is captured: the values cannot be
read there.
"""

from __future__ import annotations

import dataclasses
import weakref

import torch
from torch import Tensor

from fasttrain.ops.attention_reference import UNBOUNDED

_last: list = [None]  # (weakref to the mask, its version, B, Tq, Tk, device, answer)


@dataclasses.dataclass(frozen=True)
class Packed:
    """One varlen launch: rows of q (B * Tq, H, D) and of k, v (B * Tk, Hkv, D) gathered into packed sequences."""

    right: int  # 0: causal within each sequence; UNBOUNDED: every row sees all of its sequence's keys
    q_rows: Tensor  # (total_q,) int64
    k_rows: Tensor  # (total_k,) int64
    cu_seqlens_q: Tensor  # (n + 1,) int32
    cu_seqlens_k: Tensor  # (n + 1,) int32
    max_seqlen_q: int
    max_seqlen_k: int


@dataclasses.dataclass(frozen=True)
class Segments:
    """The mask as packed launches over disjoint query rows (at most one causal and one full)."""

    launches: tuple[Packed, ...]


def _broadcast_4d(mask: Tensor, B: int, Tq: int, Tk: int) -> Tensor | None:
    """mask as (B or 1, 1, Tq, Tk) without copying, or None if it differs per head or does not broadcast."""
    if mask.dim() > 4:
        return None
    mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))  # (b, h, tq, tk), each of size 1 or full
    b, h, tq, tk = mask.shape
    if h != 1 or b not in (1, B) or tq not in (1, Tq) or tk not in (1, Tk):
        return None
    return mask.expand(b, 1, Tq, Tk)


def _intervals(visible: Tensor, *conditions: Tensor) -> tuple[Tensor, Tensor, bool] | None:
    """(lo, hi, same) for visible (b, Tq, Tk): each row's first and last visible key (Tk and -1 where it sees none),
    and whether every batch row is the same; None unless every row is one interval and every condition (0-d bool
    tensors) holds. One transfer to the host."""
    b, Tq, Tk = visible.shape
    j = torch.arange(Tk, device=visible.device)
    # Byte-wide passes: the first and the last visible key of each row, then the row against that interval.
    v8 = visible.contiguous().view(torch.uint8)
    seen = visible.any(-1)  # (b, Tq)
    lo = torch.where(seen, v8.argmax(-1), Tk)
    hi = torch.where(seen, (Tk - 1) - v8.flip(-1).argmax(-1), -1)
    contiguous = ~(visible ^ ((j >= lo[..., None]) & (j <= hi[..., None]))).any()
    same = ((lo == lo[:1]) & (hi == hi[:1])).all()
    flags = torch.stack((contiguous, same, *conditions)).long()
    stats = torch.cat((lo.flatten(), hi.flatten(), flags)).cpu()
    n = b * Tq
    if not bool(stats[2 * n] and stats[2 * n + 2 :].all()):
        return None
    return stats[:n].view(b, Tq), stats[n : 2 * n].view(b, Tq), bool(stats[2 * n + 1])


def _band(lo: Tensor, hi: Tensor, Tk: int) -> tuple[int, int] | None:
    """(L, R) with row i seeing exactly the keys max(0, i - L) .. min(Tk - 1, i + R) (UNBOUNDED where no row is cut
    on that side), from the host rows lo, hi (Tq,); None if the rows are no such band."""
    i = torch.arange(lo.shape[0])
    seen = lo <= hi
    cut_right, cut_left = seen & (hi < Tk - 1), seen & (lo > 0)
    R = int((hi - i)[cut_right][0]) if cut_right.any() else UNBOUNDED
    L = int((i - lo)[cut_left][0]) if cut_left.any() else UNBOUNDED
    want_lo, want_hi = (i - L).clamp(min=0), (i + R).clamp(max=Tk - 1)
    empty = want_lo > want_hi
    if not bool(((seen == ~empty) & (~seen | ((lo == want_lo) & (hi == want_hi)))).all()):
        return None
    return L, R


def _runs(lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Cut the query rows of host lo, hi (b, Tq) into runs that share their first key and whose last key stays put
    (full) or moves by one per row (causal). Returns (rows, starts, causal): the flattened row numbers of the rows
    that see a key, in order; where each run starts among them (bool); whether each run is causal."""
    seen = lo <= hi
    first_col = torch.zeros_like(seen)
    first_col[:, 0] = True
    d = hi - hi.roll(1, dims=1)  # the last key's step from the row before
    # continues: this row and the one before see keys, from the same first key, the last one a step of 0 or 1 on
    continues = seen & ~first_col & seen.roll(1, dims=1) & (lo == lo.roll(1, dims=1)) & ((d == 0) | (d == 1))
    # ... and at the step the run has taken, once it has one (a run's second row sets it)
    starts = seen & ~(continues & (~continues.roll(1, dims=1) | (d == d.roll(1, dims=1))))
    rows = seen.flatten().nonzero().flatten()
    starts = starts.flatten()[rows]
    second = torch.cat((starts[1:], torch.ones(1, dtype=torch.bool))).logical_not() & starts  # runs of 2+ rows
    causal = (d.flatten()[rows].roll(-1) == 1)[second.nonzero().flatten()]
    is_causal = torch.zeros(len(rows), dtype=torch.bool)
    is_causal[second.nonzero().flatten()] = causal
    return rows, starts, is_causal[starts]


def _segments(lo: Tensor, hi: Tensor, B: int, Tq: int, Tk: int, device) -> Segments | None:
    """The packed launches for host rows lo, hi (B, Tq); None where the gathered keys would exceed 2 * B * Tk."""
    rows, starts, causal = _runs(lo, hi)
    run = starts.cumsum(0) - 1  # (rows,): each row's run
    n_runs = int(starts.sum())
    first = rows[starts]  # (runs,): each run's first row, flattened as b * Tq + i
    last = torch.zeros(n_runs, dtype=torch.long).scatter_reduce(0, run, rows, "amax")
    batch = first // Tq
    k0 = batch * Tk + lo.flatten()[first]  # (runs,): first key, flattened as b * Tk + j
    k1 = batch * Tk + hi.flatten()[last] + 1
    launches = []
    for kind in (True, False):
        pick = causal == kind
        if not pick.any():
            continue
        len_q, len_k = (last - first + 1)[pick], (k1 - k0)[pick]
        k_start = torch.repeat_interleave(k0[pick] - torch.cumsum(len_k, 0) + len_k, len_k)
        k_rows = k_start + torch.arange(int(len_k.sum()))  # each run's keys k0 .. k1 - 1, runs in order
        zero = torch.zeros(1, dtype=torch.int32)
        launches.append(
            Packed(
                right=0 if kind else UNBOUNDED,
                q_rows=rows[pick[run]].to(device),
                k_rows=k_rows.to(device),
                cu_seqlens_q=torch.cat((zero, len_q.cumsum(0).int())).to(device),
                cu_seqlens_k=torch.cat((zero, len_k.cumsum(0).int())).to(device),
                max_seqlen_q=int(len_q.max()),
                max_seqlen_k=int(len_k.max()),
            )
        )
    if not launches or sum(p.k_rows.numel() for p in launches) > 2 * B * Tk:
        return None  # no row sees a key (the reference keeps the gradients' graph), or keys copied over and over
    return Segments(tuple(launches))


def kernel_plan(mask: Tensor, B: int, Tq: int, Tk: int, device) -> tuple[int, int] | Segments | None:
    """How the kernels serve SDPA's `mask` over (B, H, Tq, Tk) scores: a band's (left, right) in flash-attn's
    bottom-right coordinates (query i sees keys j with -left <= j - i - (Tk - Tq) <= right), Segments (gather
    indices on `device`), or None where the mask is neither, takes a gradient, or cannot be read now."""
    if torch.compiler.is_compiling() or (mask.is_cuda and torch.cuda.is_current_stream_capturing()):
        return None
    if mask.requires_grad or (mask.dtype != torch.bool and not mask.is_floating_point()):
        return None
    seen = _last[0]
    if seen is not None and seen[0]() is mask and seen[1:6] == (mask._version, B, Tq, Tk, device):
        return seen[6]
    answer = _kernel_plan(mask, B, Tq, Tk, device)
    if not mask.is_inference():  # inference tensors keep no version: an in-place change would go unseen
        _last[0] = (weakref.ref(mask), mask._version, B, Tq, Tk, device, answer)
    return answer


def _kernel_plan(mask: Tensor, B: int, Tq: int, Tk: int, device) -> tuple[int, int] | Segments | None:
    mask4 = _broadcast_4d(mask, B, Tq, Tk)
    if mask4 is None or Tq == 0 or Tk == 0:
        return None
    conditions = []
    if mask4.dtype == torch.bool:
        visible = mask4[:, 0]  # (b, Tq, Tk)
    else:
        visible = mask4[:, 0] == 0
        conditions.append((visible | (mask4[:, 0] == float("-inf"))).all())  # other values add to the scores
    rows = _intervals(visible, *conditions)
    if rows is None:
        return None
    lo, hi, same = rows
    band = _band(lo[0], hi[0], Tk) if same else None
    if band is not None:
        L, R = band  # top-left offsets: -L <= j - i <= R
        shift = Tk - Tq
        left, right = (UNBOUNDED if L == UNBOUNDED else L + shift), (UNBOUNDED if R == UNBOUNDED else R - shift)
        if left >= 0:  # else a window ending before the bottom-right diagonal: segments serve it
            return left, right
    return _segments(lo.expand(B, Tq), hi.expand(B, Tq), B, Tq, Tk, device)
