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


def alibi_bias(slopes, Tq: int, Tk: int, device) -> torch.Tensor:
    """ALiBi's bias -slope * |i + Tk - Tq - j| (flash-attn's, aligned bottom-right; not scaled by the softmax scale):
    (B, H, Tq, Tk) float32 for (B, H) slopes, (1, H, Tq, Tk) for (H,) ones."""
    i = torch.arange(Tq, device=device)[:, None]
    j = torch.arange(Tk, device=device)[None, :]
    distance = (i + Tk - Tq - j).abs().float()  # (Tq, Tk)
    slopes = slopes.float().reshape(-1, slopes.shape[-1])  # (H,) -> (1, H); (B, H) stays
    return -slopes[:, :, None, None] * distance


def _modified_scores(s, Tq, Tk, softcap: float, alibi_slopes):
    """The scaled scores s (B, H, Tq, Tk) soft-capped (softcap * tanh(s / softcap)) and then given ALiBi's bias, as
    flash-attn orders them; also d(capped)/ds = 1 - tanh^2 (None without softcap)."""
    dcap = None
    if softcap > 0.0:
        x = s / softcap
        # 1 - tanh^2 as cosh^-2: no cancellation where |tanh| nears 1 (cosh's overflow gives the limit, 0)
        s, dcap = torch.tanh(x) * softcap, torch.cosh(x.detach()).pow(-2)
    if alibi_slopes is not None:
        s = s + alibi_bias(alibi_slopes, Tq, Tk, s.device).to(s.dtype)
    return s, dcap


def _masked_scores(s, Tq, Tk, left, right, attn_mask):
    """The scores s (B, H, Tq, Tk) with the window and attn_mask applied: -inf where a key is not seen."""
    s = s.masked_fill(~window_mask(Tq, Tk, left, right, s.device), float("-inf"))
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else s + attn_mask
    return s


def _dense(
    q, k, v, scale, left, right, attn_mask=None, dropout_p=0.0, seed=None, first_sequence=0, softcap=0.0,
    alibi_slopes=None,
):  # fmt: skip
    """q (B, Tq, H, D), k/v (B, Tk, Hkv, D) -> out (B, Tq, H, D) in q's dtype, lse (B, H, Tq) float32-or-wider;
    computed in float32 (float64 stays float64), as the kernels and _dense_backward, whose P must match lse."""
    B, Tq, H, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    out_dtype, wide = q.dtype, torch.promote_types(q.dtype, torch.float32)
    q, k, v = (t.to(wide) for t in (q, k, v))
    k = k.repeat_interleave(H // Hkv, dim=2)  # (B, Tk, H, D): the oracle may repeat; the kernel never does
    v = v.repeat_interleave(H // Hkv, dim=2)
    s, _ = _modified_scores(torch.einsum("bqhd,bkhd->bhqk", q, k) * scale, Tq, Tk, softcap, alibi_slopes)
    s = _masked_scores(s, Tq, Tk, left, right, attn_mask)  # (B, H, Tq, Tk)
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
    out = torch.einsum("bhqk,bkhd->bqhd", p, v).to(out_dtype)  # (B, Tq, H, D)
    return out, lse


def _sequence_slopes(alibi_slopes, b: int):
    """Packed sequence b's slopes: (H,) ones for every sequence, or row b of (B, H) ones."""
    return alibi_slopes if alibi_slopes is None or alibi_slopes.dim() == 1 else alibi_slopes[b]


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
    softcap: float = 0.0,
    alibi_slopes=None,
):
    """Differentiable attention: out in q's dtype and lse, (B, H, Tq) or (H, total_q) when packed, in lse_dtype.

    attn_mask (bool: True = keep, or additive float) broadcasts to (B, H, Tq, Tk); dense inputs only. dropout_p
    drops probabilities after the softmax (lse is the undropped one) by the kernels' mask of `seed` (int64 (2,):
    seed and offset) or, when None, by torch's RNG. softcap > 0 caps the scaled scores at softcap * tanh(s /
    softcap); alibi_slopes ((H,) or (B, H) float32) adds ALiBi's bias after it (alibi_bias), per sequence when packed.
    """
    if cu_seqlens_q is None:
        out, lse = _dense(q, k, v, scale, left, right, attn_mask, dropout_p, seed, 0, softcap, alibi_slopes)
        return out, lse.to(lse_dtype(q.dtype))
    outs, lses = [], []
    for b, (qs, qe, ks, ke) in enumerate(_sequences(cu_seqlens_q, cu_seqlens_k)):
        slopes = _sequence_slopes(alibi_slopes, b)
        o, lse = _dense(
            q[None, qs:qe], k[None, ks:ke], v[None, ks:ke], scale, left, right, None, dropout_p, seed, b, softcap,
            slopes,
        )  # fmt: skip
        outs.append(o[0])  # (Tq_b, H, D)
        lses.append(lse[0])  # (H, Tq_b)
    return torch.cat(outs, dim=0), torch.cat(lses, dim=1).to(lse_dtype(q.dtype))


def _dense_backward(
    do, q, k, v, out, lse, dlse, scale, left, right, attn_mask=None, dropout_p=0.0, seed=None, first_sequence=0,
    softcap=0.0, alibi_slopes=None,
):  # fmt: skip
    """Gradients by the FlashAttention-2 recurrence, in float32 (float64 stays float64). Shapes as in _dense; the
    dropout mask is drawn again from `seed` as _dense drew it."""
    wide = torch.promote_types(q.dtype, torch.float32)
    do, q, k, v, out = (t.to(wide) for t in (do, q, k, v, out))
    B, Tq, H, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    G = H // Hkv
    kr = k.repeat_interleave(G, dim=2)  # (B, Tk, H, D)
    vr = v.repeat_interleave(G, dim=2)
    s, dcap = _modified_scores(torch.einsum("bqhd,bkhd->bhqk", q, kr) * scale, Tq, Tk, softcap, alibi_slopes)
    s = _masked_scores(s, Tq, Tk, left, right, attn_mask)  # (B, H, Tq, Tk)
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
    if dcap is not None:  # through the cap: d(softcap * tanh(s / softcap)) / ds = 1 - tanh^2
        ds = ds * dcap
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
    softcap: float = 0.0,
    alibi_slopes=None,
):
    """(dq, dk, dv) in the dtypes of q, k, v, recomputing P from lse as the kernels do; attn_mask, dropout_p and the
    forward's seed, softcap and alibi_slopes as for attention_reference (no slope gradient)."""
    if cu_seqlens_q is None:
        dq, dk, dv = _dense_backward(
            do, q, k, v, out, lse, dlse, scale, left, right, attn_mask, dropout_p, seed, 0, softcap, alibi_slopes
        )
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
                    softcap,
                    _sequence_slopes(alibi_slopes, b),
                )
            )
        dq, dk, dv = (torch.cat([p[i][0] for p in parts], dim=0) for i in range(3))
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _round128(n: int) -> int:
    return (n + 127) // 128 * 128


def _get_block_size_n(device, head_dim: int, is_dropout: bool, is_causal: bool) -> int:
    """flash-attn's key block (kBlockN) for head_dim, with flash-attn's name and arguments and its range (head_dim up
    to 256, as flash-attn asserts): `s_dmask_block`. The dropout rows, the only ones S_dmask is written with, are the
    same on every GPU, and the others are sm80's and sm90's, so `device` is not queried and any device works."""
    del device, is_causal  # on flash-attn's sm86/sm89 they change the rows without dropout only
    if not 0 < head_dim <= 256:
        raise ValueError(f"head_dim must be in [1, 256], got {head_dim}")
    return s_dmask_block(head_dim, is_dropout)


def s_dmask_block(head_dim: int, is_dropout: bool = True) -> int:
    """The key block S_dmask's P is normalized per, for any head dim: flash-attn's forward kernels' table
    (flash_fwd_launch_template.h) up to 256, and past it (where flash-attn runs nothing) its largest class's, 64."""
    if head_dim <= 32:
        return 128
    if head_dim <= 64:
        return 64 if is_dropout else 128
    if head_dim <= 96:
        return 64
    if head_dim <= 128:
        return 32 if is_dropout else 64
    return 64


def _blockwise_p(s, block_n: int):
    """exp(s - m) for the masked scores s (..., Tk), m the row max over key block n and every block after it (of
    block_n columns): the P flash-attn's forward holds at block n, visiting the blocks from the last to the first
    with a running max. Where that max is -inf (no key seen yet) the kernel subtracts 0, so masked entries are 0."""
    Tk = s.shape[-1]
    nb = -(-Tk // block_n)
    blocks = F.pad(s, (0, nb * block_n - Tk), value=float("-inf")).unflatten(-1, (nb, block_n))  # (..., nb, block_n)
    m = blocks.amax(dim=-1).flip(-1).cummax(dim=-1).values.flip(-1)  # (..., nb): max over blocks n..nb-1
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    return torch.exp(blocks - m[..., None]).flatten(-2)[..., :Tk]  # (..., nb * block_n) -> (..., Tk)


def s_dmask(q, k, seed, dropout_p: float, scale: float, left: int, right: int, cu_q=None, cu_k=None, max_q=0,
            max_k=0, softcap: float = 0.0, alibi_slopes=None):  # fmt: skip
    """flash-attn's S_dmask, computed after the fact from q, k and the forward's dropout seed (the mask is a pure
    function of the seed, so the kernels never write it): (B, H, round128(Tq), round128(Tk)) in q's dtype, in
    flash-attn's encoding: the forward's unnormalized P = exp(s - m) (_blockwise_p, blocks of s_dmask_block
    columns; s capped by softcap and with ALiBi's bias as the forward's), not scaled by 1 / (1 - dropout_p), negated
    where dropout drops it; 0 (or -0) where the mask hides a key and past each sequence's (Tq, Tk). Packed sequences
    at [b, :, :Tq_b, :Tk_b] of (B, H, round128(max_seqlen_q), round128(max_seqlen_k)), their blocks counted from
    their own first key. exp(m - lse) times a block's entries gives the probabilities."""
    wide = torch.promote_types(q.dtype, torch.float32)
    H, D = q.shape[-2], q.shape[-1]
    block_n = s_dmask_block(D)

    def probs(qb, kb, slopes, first_sequence):
        """qb (b, Tq, H, D), kb (b, Tk, Hkv, D) -> signed P (b, H, Tq, Tk)."""
        b, Tq, Tk = qb.shape[0], qb.shape[1], kb.shape[1]
        kr = kb.to(wide).repeat_interleave(H // kb.shape[2], dim=2)  # (b, Tk, H, D)
        s = torch.einsum("bqhd,bkhd->bhqk", qb.to(wide), kr) * scale  # (b, H, Tq, Tk)
        s, _ = _modified_scores(s, Tq, Tk, softcap, slopes)
        p = _blockwise_p(_masked_scores(s, Tq, Tk, left, right, None), block_n)
        keep = dense_keep(seed, dropout_p, b, H, Tq, Tk, first_sequence)
        return torch.where(keep, p, -p).to(q.dtype)

    if cu_q is None:
        B, max_q, max_k = q.shape[0], q.shape[1], k.shape[1]
        S = q.new_zeros(B, H, _round128(max_q), _round128(max_k))
        S[:, :, :max_q, :max_k] = probs(q, k, alibi_slopes, 0)
        return S
    S = q.new_zeros(cu_q.numel() - 1, H, _round128(max_q), _round128(max_k))
    for b, (qs, qe, ks, ke) in enumerate(_sequences(cu_q, cu_k)):
        S[b, :, : qe - qs, : ke - ks] = probs(q[None, qs:qe], k[None, ks:ke], _sequence_slopes(alibi_slopes, b), b)[0]
    return S
