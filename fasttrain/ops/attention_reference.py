"""Attention in plain PyTorch: the reference backend of fasttrain.ops.attention (the test oracle, and the fallback
for what the kernels do not serve: an attn_mask, other head dims and dtypes). Its dropout mask is the kernels'
(fasttrain/ops/attention_dropout.py), drawn from the same seed.

Layout is flash-attn's: q (B, Tq, H, D), k and v (B, Tk, Hkv, D), Hkv divides H; packed variable-length batches are
q (total_q, H, D) with int32 `cu_seqlens` offsets. Masking follows flash-attn: query i may see key j when
-left <= j - i - (Tk - Tq) <= right (the diagonal is aligned bottom-right), with UNBOUNDED standing for "no limit".
A query row that sees no key outputs zeros and has logsumexp +inf, so that exp(s - lse) is 0 in any backward.

This code materialises the (Tq, Tk) score matrix; the kernels in fasttrain.kernels.attention never do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fasttrain.ops.attention_dropout import dense_keep

# Stands for an unbounded window side. Large enough for any sequence, small enough that i + off + UNBOUNDED stays
# inside int32 in the kernels (2**30 + 2 * 2**29 < 2**31).
UNBOUNDED = 1 << 30


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """logsumexp is float32 for fp16/bf16/fp32 inputs (as in flash-attn), float64 for float64 ones."""
    return torch.promote_types(dtype, torch.float32)


def window_mask(Tq: int, Tk: int, left: int, right: int, device) -> torch.Tensor:
    """(Tq, Tk) bool, True where query i may attend to key j."""
    i = torch.arange(Tq, device=device)[:, None]
    j = torch.arange(Tk, device=device)[None, :]
    d = j - i - (Tk - Tq)
    return (d >= -left) & (d <= right)


def _dropout_scale(p, dropout_p: float, seed: torch.Tensor, first_sequence: int):
    """Dropout's factor for each entry of p (B, H, Tq, Tk): 0 where dropped, 1 / (1 - dropout_p) where kept, the
    kernels' mask of (seed, offset) (fasttrain/ops/attention_dropout.py), so that a backward draws it again."""
    B, H, Tq, Tk = p.shape
    keep = dense_keep(seed.to(p.device), dropout_p, B, H, Tq, Tk, first_sequence)
    return keep.to(p.dtype) / (1 - dropout_p)


def _masked_scores(s, Tq, Tk, left, right, attn_mask):
    """The scores s (B, H, Tq, Tk) with the window and attn_mask applied: -inf where a key is not seen."""
    s = s.masked_fill(~window_mask(Tq, Tk, left, right, s.device), float("-inf"))
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else s + attn_mask
    return s


def _dense(q, k, v, scale, left, right, attn_mask=None, dropout_p=0.0, seed=None, first_sequence=0):
    """q (B, Tq, H, D), k/v (B, Tk, Hkv, D) -> out (B, Tq, H, D), lse (B, H, Tq) float32-or-wider."""
    B, Tq, H, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    k = k.repeat_interleave(H // Hkv, dim=2)  # (B, Tk, H, D): the oracle may repeat; the kernel never does
    v = v.repeat_interleave(H // Hkv, dim=2)
    s = _masked_scores(torch.einsum("bqhd,bkhd->bhqk", q, k) * scale, Tq, Tk, left, right, attn_mask)  # (B, H, Tq, Tk)
    # Shift by the detached row max: softmax and d lse/ds = p are unchanged, and rows that see no key stay finite.
    m = s.amax(dim=-1, keepdim=True).detach() if Tk else s.new_zeros(B, H, Tq, 1)  # (B, H, Tq, 1); no keys: 0
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m)
    denom = e.sum(dim=-1, keepdim=True)  # (B, H, Tq, 1)
    empty = denom == 0
    denom_safe = torch.where(empty, torch.ones_like(denom), denom)
    p = e / denom_safe
    lse = torch.where(empty, torch.full_like(denom, float("inf")), m + torch.log(denom_safe)).squeeze(-1)  # (B, H, Tq)
    if dropout_p > 0.0:  # the seed's mask, drawn again by the backward; else torch's RNG, in autograd's keeping
        p = p * _dropout_scale(p, dropout_p, seed, first_sequence) if seed is not None else F.dropout(p, dropout_p)
    out = torch.einsum("bhqk,bkhd->bqhd", p.to(v.dtype), v)  # (B, Tq, H, D)
    return out, lse


def _sequences(cu_seqlens_q, cu_seqlens_k):
    """Yield (q_start, q_end, k_start, k_end) per packed sequence."""
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(cq) - 1):
        yield cq[b], cq[b + 1], ck[b], ck[b + 1]


def attention_reference(
    q,
    k,
    v,
    scale: float,
    left: int = UNBOUNDED,
    right: int = UNBOUNDED,
    cu_seqlens_q=None,
    cu_seqlens_k=None,
    attn_mask=None,
    dropout_p: float = 0.0,
    seed: torch.Tensor | None = None,
):
    """Differentiable attention: out in q's dtype and lse, (B, H, Tq) or (H, total_q) when packed, in lse_dtype.

    attn_mask (bool: True = keep, or additive float) broadcasts to (B, H, Tq, Tk); dense inputs only. dropout_p
    drops probabilities after the softmax (lse is the undropped one) by the kernels' mask of `seed` (int64 (2,):
    seed and offset) or, when None, by torch's RNG.
    """
    if cu_seqlens_q is None:
        out, lse = _dense(q, k, v, scale, left, right, attn_mask, dropout_p, seed)
        return out, lse.to(lse_dtype(q.dtype))
    outs, lses = [], []
    for b, (qs, qe, ks, ke) in enumerate(_sequences(cu_seqlens_q, cu_seqlens_k)):
        o, lse = _dense(q[None, qs:qe], k[None, ks:ke], v[None, ks:ke], scale, left, right, None, dropout_p, seed, b)
        outs.append(o[0])  # (Tq_b, H, D)
        lses.append(lse[0])  # (H, Tq_b)
    return torch.cat(outs, dim=0), torch.cat(lses, dim=1).to(lse_dtype(q.dtype))


def _dense_backward(
    do, q, k, v, out, lse, dlse, scale, left, right, attn_mask=None, dropout_p=0.0, seed=None, first_sequence=0
):
    """Gradients by the FlashAttention-2 recurrence, in float32 (float64 stays float64). Shapes as in _dense; the
    dropout mask is drawn again from `seed` as _dense drew it."""
    wide = torch.promote_types(q.dtype, torch.float32)
    do, q, k, v, out = (t.to(wide) for t in (do, q, k, v, out))
    B, Tq, H, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    G = H // Hkv
    kr = k.repeat_interleave(G, dim=2)  # (B, Tk, H, D)
    vr = v.repeat_interleave(G, dim=2)
    s = _masked_scores(torch.einsum("bqhd,bkhd->bhqk", q, kr) * scale, Tq, Tk, left, right, attn_mask)  # (B, H, Tq, Tk)
    p = torch.exp(s - lse.to(wide)[..., None])  # lse = +inf on empty rows makes them 0
    # With dropout, out = (p * z) v for the forward's factors z: dV and dP go through z, and delta = rowsum(dO * O)
    # still equals rowsum(p * dP), so FlashAttention-2's recurrence holds as is.
    z = _dropout_scale(p, dropout_p, seed, first_sequence) if dropout_p > 0.0 else None
    p_out = p if z is None else p * z
    delta = (do * out).sum(-1).transpose(1, 2)  # (B, Tq, H) -> (B, H, Tq)
    if dlse is not None:
        delta = delta - dlse.to(wide)  # d lse / d s = p, so an lse gradient only shifts delta
    dp = torch.einsum("bqhd,bkhd->bhqk", do, vr)  # (B, H, Tq, Tk)
    if z is not None:
        dp = dp * z
    ds = p * (dp - delta[..., None]) * scale
    dq = torch.einsum("bhqk,bkhd->bqhd", ds, kr)  # (B, Tq, H, D)
    dk = torch.einsum("bhqk,bqhd->bkhd", ds, q).reshape(B, Tk, Hkv, G, D).sum(3)  # (B, Tk, H, D) -> (B, Tk, Hkv, D)
    dv = torch.einsum("bhqk,bqhd->bkhd", p_out, do).reshape(B, Tk, Hkv, G, D).sum(3)  # (B, Tk, Hkv, D)
    return dq, dk, dv


def attention_reference_backward(
    do,
    q,
    k,
    v,
    out,
    lse,
    dlse,
    scale: float,
    left: int,
    right: int,
    cu_seqlens_q=None,
    cu_seqlens_k=None,
    attn_mask=None,
    dropout_p: float = 0.0,
    seed: torch.Tensor | None = None,
):
    """(dq, dk, dv) in the dtypes of q, k, v, recomputing P from lse as the kernels do; attn_mask, dropout_p and the
    forward's seed, as for attention_reference."""
    if cu_seqlens_q is None:
        dq, dk, dv = _dense_backward(do, q, k, v, out, lse, dlse, scale, left, right, attn_mask, dropout_p, seed)
    else:
        parts = []
        for b, (qs, qe, ks, ke) in enumerate(_sequences(cu_seqlens_q, cu_seqlens_k)):
            dl = None if dlse is None else dlse[None, :, qs:qe]  # (H, total_q) -> (1, H, Tq_b)
            parts.append(
                _dense_backward(
                    do[None, qs:qe],
                    q[None, qs:qe],
                    k[None, ks:ke],
                    v[None, ks:ke],
                    out[None, qs:qe],
                    lse[None, :, qs:qe],
                    dl,
                    scale,
                    left,
                    right,
                    None,
                    dropout_p,
                    seed,
                    b,
                )
            )
        dq, dk, dv = (torch.cat([p[i][0] for p in parts], dim=0) for i in range(3))
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _round128(n: int) -> int:
    return (n + 127) // 128 * 128


def s_dmask(q, k, lse, seed, dropout_p: float, scale: float, left: int, right: int, cu_q=None, cu_k=None, max_q=0,
            max_k=0):  # fmt: skip
    """flash-attn's S_dmask, computed after the fact from q, k, the forward's lse and its dropout seed (the mask is a
    pure function of the seed, so the kernels never write it): (B, H, round128(Tq), round128(Tk)) in q's dtype,
    P = exp(s - lse) where kept, -P where dropped, 0 past each sequence's (Tq, Tk); packed sequences at
    [b, :, :Tq_b, :Tk_b] of (B, H, round128(max_seqlen_q), round128(max_seqlen_k))."""
    wide = torch.promote_types(q.dtype, torch.float32)
    if cu_q is None:
        parts = [(b, q[b : b + 1], k[b : b + 1], lse[b : b + 1]) for b in range(q.shape[0])]
        max_q, max_k = q.shape[1], k.shape[1]
    else:
        parts = [
            (b, q[None, qs:qe], k[None, ks:ke], lse[None, :, qs:qe])
            for b, (qs, qe, ks, ke) in enumerate(_sequences(cu_q, cu_k))
        ]
    H = q.shape[-2]
    S = q.new_zeros(len(parts), H, _round128(max_q), _round128(max_k))
    for b, qb, kb, lb in parts:
        Tq, Tk = qb.shape[1], kb.shape[1]
        kr = kb.to(wide).repeat_interleave(H // kb.shape[2], dim=2)  # (1, Tk, H, D)
        s = _masked_scores(torch.einsum("bqhd,bkhd->bhqk", qb.to(wide), kr) * scale, Tq, Tk, left, right, None)
        p = torch.exp(s - lb.to(wide)[..., None])  # (1, H, Tq, Tk); lse = +inf on empty rows makes them 0
        keep = dense_keep(seed, dropout_p, 1, H, Tq, Tk, b)
        S[b, :, :Tq, :Tk] = torch.where(keep, p, -p)[0].to(q.dtype)
    return S
