"""flash-attn's test references, written for fasttrain from flash-attn's documented semantics: attention with key
padding, bottom-right causal and sliding-window masks, score soft-capping, ALiBi biases, and rotary embeddings at
per-sequence offsets. The error rule that goes with them: a kernel's error against the upcast reference is at most
`mult` times that of PyTorch computing the same in the input dtype with its operations reordered, plus a small
floor."""

import torch


def local_mask(Tq: int, Tk: int, window: tuple[int, int], key_lengths: torch.Tensor | None, device) -> torch.Tensor:
    """True where query i may NOT see key j: keys outside [i + sk - Tq - left, min(i + sk - Tq + right, sk)], with
    sk the sequence's key count (bottom-right alignment); -1 leaves a side unbounded. (B or 1, 1, Tq, Tk)."""
    i = torch.arange(Tq, device=device)[:, None]  # (Tq, 1)
    j = torch.arange(Tk, device=device)  # (Tk,)
    sk = torch.full((1,), Tk, device=device) if key_lengths is None else key_lengths.to(device)
    sk = sk[:, None, None, None]  # (B, 1, 1, 1)
    left, right = window
    hidden = torch.zeros(sk.shape[0], 1, Tq, Tk, dtype=torch.bool, device=device)
    if right >= 0:
        hidden |= j > torch.minimum(i + sk - Tq + right, sk)
    if left >= 0:
        hidden |= j < i + sk - Tq - left
    return hidden


def alibi_bias(slopes, Tq: int, Tk: int, causal: bool = False, key_lengths=None, key_leftpad=None) -> torch.Tensor:
    """flash-attn's test bias from ALiBi slopes (B, H): -slope * |i + sk - Tq - j| with sk the sequence's key count
    (key_lengths (B,), else Tk) and j counted from its first real key (after key_leftpad); when causal, flash-attn's
    test takes slope * (j - Tk + 1) instead, which differs by a constant per row (the same softmax). (B, H, Tq, Tk)."""
    slopes = slopes[:, :, None, None]  # (B, H, 1, 1)
    if causal:
        return torch.arange(-Tk + 1, 1, device=slopes.device, dtype=torch.float32) * slopes
    i = torch.arange(Tq, device=slopes.device)[:, None]  # (Tq, 1)
    j = torch.arange(Tk, device=slopes.device).expand(slopes.shape[0], 1, 1, Tk)  # (B, 1, 1, Tk)
    if key_leftpad is not None:
        pad = key_leftpad.long()[:, None, None, None]
        j = torch.where(j >= pad, j - pad, 2**32)
    sk = Tk if key_lengths is None else key_lengths.long()[:, None, None, None]
    return -slopes * (i + sk - Tq - j).abs().to(torch.float32)


def attention_ref(
    q,
    k,
    v,
    key_padding_mask=None,
    causal=False,
    window=(-1, -1),
    upcast=True,
    reorder=False,
    key_leftpad=None,
    dropout_p=0.0,
    dropout_mask=None,
    softcap=0.0,
    attn_bias=None,
):
    """softmax(q k^T / sqrt(D)) v over (B, T, H, D) tensors, K/V heads repeated over their GQA groups. upcast: in
    fp32 or wider (else in the input dtype); reorder: scale k instead of q. Rows that see no key give 0. key_leftpad
    (B,): the padding rows that open each sequence's keys (also masked by key_padding_mask); the masks' positions
    stay the rows' own indices. dropout_mask (B, H, Tq, Tk) bool, True = kept: the probabilities dropped where False
    and the rest scaled by 1 / (1 - dropout_p), as flash-attn's reference applies a kernel's mask. softcap > 0:
    scores -> softcap * tanh(scores / softcap) before the masks; attn_bias (broadcastable to (B, H, Tq, Tk)) is added
    after them, as flash-attn's reference orders them."""
    if causal:
        window = (window[0], 0)
    dtype = q.dtype
    if upcast:  # fp32, or float64 kept (the float64 oracle of fp32 kernels)
        q, k, v = (t.to(torch.promote_types(t.dtype, torch.float32)) for t in (q, k, v))
    g = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(g, dim=2), v.repeat_interleave(g, dim=2)
    scale = q.shape[-1] ** -0.5
    if reorder:
        scores = torch.einsum("bthd,bshd->bhts", q, k * scale)
    else:
        scores = torch.einsum("bthd,bshd->bhts", q * scale, k)
    if softcap > 0:
        scores = torch.tanh(scores / softcap) * softcap
    Tq, Tk = q.shape[1], k.shape[1]
    hidden = torch.zeros(1, 1, Tq, Tk, dtype=torch.bool, device=q.device)
    if key_padding_mask is not None:
        hidden = hidden | ~key_padding_mask[:, None, None, :]
    if window != (-1, -1):
        lengths = None if key_padding_mask is None else key_padding_mask.sum(-1)
        if key_leftpad is not None:  # the sequence ends at its padding plus its real keys
            lengths = lengths + key_leftpad
        hidden = hidden | local_mask(Tq, Tk, window, lengths, q.device)
    scores = scores.masked_fill(hidden, float("-inf"))
    if attn_bias is not None:
        scores = scores + attn_bias.to(scores.dtype)
    probs = torch.softmax(scores, dim=-1).masked_fill(hidden.all(-1, keepdim=True), 0.0).to(v.dtype)
    if dropout_mask is not None:
        probs = probs.masked_fill(~dropout_mask, 0.0) / (1 - dropout_p)
    return torch.einsum("bhts,bshd->bthd", probs, v).to(dtype)


def dropout_fraction(S_dmask, Tq: int, Tk: int, causal: bool, window) -> float:
    """flash-attn's get_dropout_fraction: the share of the visible scores that S_dmask (its top-left (Tq, Tk)
    block; negative = dropped) marks dropped."""
    S = S_dmask[..., :Tq, :Tk]
    visible = ~local_mask(Tq, Tk, (window[0], 0) if causal else window, None, S.device)[0, 0]
    return ((S < 0) & visible).sum().item() / (visible.sum().item() * S.shape[0] * S.shape[1])


def rotate(x, cos, sin, offsets, interleaved: bool):
    """x (B, T, H, D) with its first 2 * cos.shape[1] dims turned by the table rows offsets[b] + t (in fp32, or in
    fp64 for fp64 inputs)."""
    B, T = x.shape[:2]
    half = cos.shape[1]
    pos = offsets.long()[:, None] + torch.arange(T, device=x.device)  # (B, T)
    wide = torch.promote_types(x.dtype, torch.float32)
    c, s = cos[pos].to(wide)[:, :, None], sin[pos].to(wide)[:, :, None]  # (B, T, 1, half)
    xr, rest = x[..., : 2 * half].to(wide), x[..., 2 * half :]
    if interleaved:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        turned = torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2)
    else:
        x1, x2 = xr[..., :half], xr[..., half:]
        turned = torch.cat((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1)
    return torch.cat((turned.to(x.dtype), rest), dim=-1)


def assert_within(out, ref, pt, mult: float, floor: float = 1e-5) -> None:
    """flash-attn's rule: max |out - ref| <= mult * max |pt - ref| + floor."""
    err, pt_err = (out.float() - ref.float()).abs().max().item(), (pt.float() - ref.float()).abs().max().item()
    assert err <= mult * pt_err + floor, f"error {err:.3g} > {mult} x PyTorch's {pt_err:.3g} + {floor}"


def run_grid(check, cases, name, **kwargs) -> None:
    """check(*case, **kwargs) for every case, in one test (a grid of thousands would cost seconds to collect in every
    run); fails naming each case that failed, by name(case)."""
    failed = []
    for case in cases:
        try:
            check(*case, **kwargs)
        except AssertionError as e:
            failed.append(f"{name(case)}: {e}")
    assert not failed, f"{len(failed)} cases failed:\n" + "\n".join(failed)


def decode_s_dmask(S, q, k, block_n: int, causal: bool, window, softcap: float = 0.0, attn_bias=None):
    """flash-attn's documented reading of S_dmask (dense (B, H, >= Tq, >= Tk), q (B, Tq, H, D), k (B, Tk, Hkv, D)):
    its entries are the forward's exp(s - m) per key block of block_n columns, m the running row max as the kernel
    visits the blocks from the last to the first; times exp(m - lse) each block gives the probabilities.
    -> (probabilities (B, H, Tq, Tk) float64, kept (B, H, Tq, Tk) bool: S >= 0)."""
    Tq, Tk = q.shape[1], k.shape[1]
    q, k = q.double(), k.double().repeat_interleave(q.shape[2] // k.shape[2], dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q, k) * q.shape[-1] ** -0.5
    if softcap > 0:
        scores = torch.tanh(scores / softcap) * softcap
    if causal:
        window = (window[0], 0)
    if window != (-1, -1):
        scores = scores.masked_fill(local_mask(Tq, Tk, window, None, q.device), float("-inf"))
    if attn_bias is not None:
        scores = scores + attn_bias.double()
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)  # (B, H, Tq, 1)
    lse = lse.masked_fill(lse == float("-inf"), float("inf"))  # rows that see no key: probabilities 0
    S = S[:, :, :Tq, :Tk].double()
    probs = torch.zeros_like(S)
    running = torch.full_like(lse, float("-inf"))
    for start in reversed(range(0, Tk, block_n)):  # the kernel's order: the last block first
        cols = slice(start, min(start + block_n, Tk))
        running = torch.maximum(running, scores[..., cols].amax(dim=-1, keepdim=True))
        probs[..., cols] = S[..., cols].abs() * torch.exp(running - lse)
    return probs, S >= 0
