"""Rotary position embedding (RoPE), half-split layout as in GPT-NeoX and flash-attn's `interleaved=False`.

The pair rotated together is (x[..., i], x[..., i + D/2]), so the tables have D/2 columns. Generation reuses these
helpers for the k/v it appends to its cache.
"""
from __future__ import annotations

import torch


def rotary_tables(max_seq_len: int, head_dim: int, theta: float = 10000.0,
                  device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, each (max_seq_len, head_dim // 2) fp32: angle[t, i] = t * theta^(-2i / head_dim)."""
    if head_dim % 2:
        raise ValueError(f"head_dim must be even for rotary embeddings, got {head_dim}")
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=device, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, device=device, dtype=torch.float64), inv_freq)  # (T, D/2)
    # Angles in fp64: at t ~ 1e4 fp32 angles lose ~1e-3 rad before cos/sin.
    return angles.cos().float(), angles.sin().float()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, T, H, D) by cos/sin of shape (T, D/2) (shared positions) or (B, T, D/2) (per sequence).

    Computed in fp32 and returned in x's dtype.
    """
    if x.shape[-1] != 2 * cos.shape[-1] or cos.shape != sin.shape:
        raise ValueError(f"cos/sin must be (..., {x.shape[-1] // 2}), got {tuple(cos.shape)} and {tuple(sin.shape)} "
                         f"for x {tuple(x.shape)}")
    half = x.shape[-1] // 2
    x1, x2 = x.float()[..., :half], x.float()[..., half:]  # (B, T, H, D/2) each
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # (..., T, 1, D/2): broadcast over heads
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)  # (B, T, H, D)
    return out.to(x.dtype)
