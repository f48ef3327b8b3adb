"""The attention modules inside flash-attn's `MHA` (`flash_attn.modules.mha` exports them): FlashSelfAttention and
FlashCrossAttention over fasttrain.ops' packed functions, SelfAttention and CrossAttention as flash-attn's plain
PyTorch path (scores masked by adding -10000, softmax in v's dtype, torch dropout on the probabilities), and
`get_alibi_slopes`. fasttrain's functions take fp32 as well as fp16/bf16, on the CPU as on CUDA, so the Flash modules
do too (flash-attn's assert half CUDA tensors)."""

import math
import operator

import torch
from torch import Tensor, nn

from fasttrain._backend import ArgumentError, ArgumentTypeError
from fasttrain.ops import (
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
)

# flash-attn's mask value, finite: added to (or, for CrossAttention's causal mask, put in place of) a masked score, so
# a row with every key masked still attends rather than giving NaN.
MASKED = -10000.0


def get_alibi_slopes(nheads: int) -> list[float]:
    """ALiBi's head slopes (Press et al.), as flash-attn's: for a power of two n, start ** (i + 1) with
    start = 2 ** (-8 / n); otherwise those of the power of two below n, then every other slope of the one above."""
    if not hasattr(nheads, "__index__") or operator.index(nheads) < 1:
        raise ArgumentError(f"nheads must be a positive int, got {nheads!r}")

    def power_of_two(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]  # flash-attn's products, so the floats match it bit for bit

    if math.log2(nheads).is_integer():
        return power_of_two(nheads)
    below = 2 ** math.floor(math.log2(nheads))
    return power_of_two(below) + get_alibi_slopes(2 * below)[0::2][: nheads - below]


def _check_varlen(cu_seqlens, max_seqlen, cu_name: str, max_name: str) -> None:
    """flash-attn's module asserts: packed rows need their int32 offsets and an int bound together."""
    if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dtype != torch.int32:
        got = getattr(cu_seqlens, "dtype", type(cu_seqlens).__name__)
        raise ArgumentTypeError(f"{cu_name} must be an int32 tensor (B + 1,), got {got}")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int):
        raise ArgumentTypeError(f"{max_name} must be an int with {cu_name}, got {type(max_seqlen).__name__}")


class _Flash(nn.Module):
    """What FlashSelfAttention and FlashCrossAttention share: their attributes and the flash functions' options."""

    def _setup(self, causal, softmax_scale, attention_dropout, window_size, alibi_slopes, deterministic) -> None:
        self.causal = causal
        self.softmax_scale = softmax_scale
        self.drop = nn.Dropout(attention_dropout)
        self.register_buffer("alibi_slopes", alibi_slopes, persistent=False)
        self.window_size = window_size
        self.deterministic = deterministic

    def _options(self, causal) -> dict:
        if self.alibi_slopes is not None:
            # Back to float32 after a model.to(half), as flash-attn's modules do (its kernels take float32 slopes).
            self.alibi_slopes = self.alibi_slopes.to(torch.float32)
        return {
            "dropout_p": self.drop.p if self.training else 0.0,
            "softmax_scale": self.softmax_scale,
            "causal": self.causal if causal is None else causal,
            "window_size": self.window_size,
            "alibi_slopes": self.alibi_slopes,
            "deterministic": self.deterministic,
        }


class FlashSelfAttention(_Flash):
    """flash-attn's `FlashSelfAttention`: softmax attention of packed qkv through fasttrain's flash functions.

    causal, softmax_scale (None: 1 / sqrt(D)), window_size, alibi_slopes (H,) or (B, H) and deterministic as in
    flash_attn_qkvpacked_func; attention_dropout applies in training mode only."""

    def __init__(
        self,
        causal=False,
        softmax_scale=None,
        attention_dropout=0.0,
        window_size=(-1, -1),
        alibi_slopes=None,
        deterministic=False,
    ):
        super().__init__()
        self._setup(causal, softmax_scale, attention_dropout, window_size, alibi_slopes, deterministic)

    def forward(self, qkv: Tensor, causal=None, cu_seqlens=None, max_seqlen=None) -> Tensor:
        """qkv (B, T, 3, H, D) -> (B, T, H, D); with cu_seqlens (B + 1,) int32 and max_seqlen an int, qkv
        (total, 3, H, D) -> (total, H, D). causal, when given, overrides the module's."""
        options = self._options(causal)
        if cu_seqlens is None:
            return flash_attn_qkvpacked_func(qkv, **options)
        _check_varlen(cu_seqlens, max_seqlen, "cu_seqlens", "max_seqlen")
        return flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, **options)


class FlashCrossAttention(_Flash):
    """flash-attn's `FlashCrossAttention`: softmax attention of q over packed kv (Hkv dividing H) through fasttrain's
    flash functions; arguments as FlashSelfAttention's (in flash-attn's order, alibi_slopes before window_size)."""

    def __init__(
        self,
        causal=False,
        softmax_scale=None,
        attention_dropout=0.0,
        alibi_slopes=None,
        window_size=(-1, -1),
        deterministic=False,
    ):
        super().__init__()
        self._setup(causal, softmax_scale, attention_dropout, window_size, alibi_slopes, deterministic)

    def forward(
        self, q: Tensor, kv: Tensor, causal=None, cu_seqlens=None, max_seqlen=None, cu_seqlens_k=None, max_seqlen_k=None
    ) -> Tensor:
        """q (B, Tq, H, D), kv (B, Tk, 2, Hkv, D) -> (B, Tq, H, D); with cu_seqlens/max_seqlen for q and
        cu_seqlens_k/max_seqlen_k for kv, q (total_q, H, D), kv (total_k, 2, Hkv, D) -> (total_q, H, D)."""
        options = self._options(causal)
        if cu_seqlens is None:
            if kv.dim() != 5 or q.dim() != 4 or kv.shape[0] != q.shape[0] or kv.shape[4] != q.shape[3]:
                raise ArgumentError(
                    f"kv must be (B, Tk, 2, Hkv, D) with q's (B, Tq, H, D) batch and head_dim, got q "
                    f"{tuple(q.shape)} and kv {tuple(kv.shape)}"
                )
            return flash_attn_kvpacked_func(q, kv, **options)
        _check_varlen(cu_seqlens, max_seqlen, "cu_seqlens", "max_seqlen")
        _check_varlen(cu_seqlens_k, max_seqlen_k, "cu_seqlens_k", "max_seqlen_k")
        return flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens, cu_seqlens_k, max_seqlen, max_seqlen_k, **options)


def _scores(q: Tensor, k: Tensor, softmax_scale, key_padding_mask) -> Tensor:
    """q (B, Tq, H, D), k (B, Tk, H, D) -> scaled scores (B, H, Tq, Tk), padded keys pushed down by 10000."""
    if key_padding_mask is not None:
        B, Tk = k.shape[:2]
        if not isinstance(key_padding_mask, Tensor) or key_padding_mask.dtype != torch.bool:
            got = getattr(key_padding_mask, "dtype", type(key_padding_mask).__name__)
            raise ArgumentTypeError(f"key_padding_mask must be a bool tensor (B, Tk), True to keep, got {got}")
        if key_padding_mask.shape != (B, Tk):
            raise ArgumentError(f"key_padding_mask must be (B={B}, Tk={Tk}), got {tuple(key_padding_mask.shape)}")
    scale = softmax_scale or 1.0 / math.sqrt(q.shape[-1])  # flash-attn's `or`: a scale of 0 also means the default
    scores = torch.einsum("bthd,bshd->bhts", q, k * scale)
    if key_padding_mask is None:
        return scores
    shift = torch.full(key_padding_mask.shape, MASKED, dtype=scores.dtype, device=scores.device)
    return scores + shift.masked_fill_(key_padding_mask, 0.0)[:, None, None, :]  # (B, 1, 1, Tk)


def _mix(scores: Tensor, v: Tensor, drop: nn.Dropout) -> Tensor:
    """scores (B, H, Tq, Tk), v (B, Tk, H, D) -> (B, Tq, H, D)."""
    return torch.einsum("bhts,bshd->bthd", drop(torch.softmax(scores, dim=-1, dtype=v.dtype)), v)


class SelfAttention(nn.Module):
    """flash-attn's `SelfAttention`: softmax attention of packed qkv in plain PyTorch, with a key_padding_mask.
    softmax_scale None (or 0): 1 / sqrt(D); attention_dropout applies in training mode only (nn.Dropout)."""

    def __init__(self, causal=False, softmax_scale=None, attention_dropout=0.0):
        super().__init__()
        self.causal = causal
        self.softmax_scale = softmax_scale
        self.drop = nn.Dropout(attention_dropout)

    def forward(self, qkv: Tensor, causal=None, key_padding_mask=None) -> Tensor:
        """qkv (B, T, 3, H, D) -> (B, T, H, D). key_padding_mask (B, T) bool, True keeps a key. causal, when
        given, overrides the module's."""
        if not isinstance(qkv, Tensor) or qkv.dim() != 5 or qkv.shape[2] != 3:
            raise ArgumentError(f"qkv must be (B, T, 3, H, D), got {getattr(qkv, 'shape', type(qkv).__name__)}")
        q, k, v = qkv.unbind(dim=2)
        scores = _scores(q, k, self.softmax_scale, key_padding_mask)
        if self.causal if causal is None else causal:
            T = qkv.shape[1]
            # Built in fp32 and cast, as flash-attn (triu has no bf16 kernel on some devices).
            above = torch.triu(torch.full((T, T), MASKED, device=scores.device), 1)  # (T, T)
            scores = scores + above.to(scores.dtype)
        return _mix(scores, v, self.drop)


class CrossAttention(nn.Module):
    """flash-attn's `CrossAttention`: softmax attention of q over packed kv (Hkv dividing H) in plain PyTorch, with
    a key_padding_mask; arguments as SelfAttention's. Causal aligns the last query with the last kept key."""

    def __init__(self, causal=False, softmax_scale=None, attention_dropout=0.0):
        super().__init__()
        self.causal = causal
        self.softmax_scale = softmax_scale
        self.drop = nn.Dropout(attention_dropout)

    def forward(self, q: Tensor, kv: Tensor, causal=None, key_padding_mask=None) -> Tensor:
        """q (B, Tq, H, D), kv (B, Tk, 2, Hkv, D) -> (B, Tq, H, D). key_padding_mask (B, Tk) bool, True keeps."""
        if kv.dim() != 5 or q.dim() != 4 or kv.shape[0] != q.shape[0] or kv.shape[4] != q.shape[3]:
            raise ArgumentError(
                f"kv must be (B, Tk, 2, Hkv, D) with q's (B, Tq, H, D) batch and head_dim, got q {tuple(q.shape)} "
                f"and kv {tuple(kv.shape)}"
            )
        H, Hkv = q.shape[2], kv.shape[3]
        if H % Hkv:
            raise ArgumentError(f"kv's heads ({Hkv}) must divide q's heads ({H})")
        if Hkv != H:  # GQA: query head h reads key head h // (H / Hkv)
            kv = kv.repeat_interleave(H // Hkv, dim=3)  # (B, Tk, 2, H, D)
        k, v = kv.unbind(dim=2)
        scores = _scores(q, k, self.softmax_scale, key_padding_mask)
        if self.causal if causal is None else causal:
            Tq, Tk = q.shape[1], kv.shape[1]
            rows = torch.arange(Tq, device=q.device)[:, None]  # (Tq, 1)
            cols = torch.arange(Tk, device=kv.device)  # (Tk,)
            kept = Tk if key_padding_mask is None else key_padding_mask.sum(-1)[:, None, None, None]  # (B, 1, 1, 1)
            scores = scores.masked_fill(cols > rows + kept - Tq, MASKED)
        return _mix(scores, v, self.drop)
