"""Rotary position embedding (RoPE), half-split layout as in GPT-NeoX and flash-attn's `interleaved=False`.

The pair rotated together is (x[..., i], x[..., i + D/2]), so the tables have D/2 columns; the rotation itself is
fasttrain.ops.apply_rotary_emb.
"""

from __future__ import annotations

import torch


def rotary_tables(
    max_seq_len: int, head_dim: int, theta: float = 10000.0, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, each (max_seq_len, head_dim // 2) fp32: angle[t, i] = t * theta^(-2i / head_dim)."""
    if head_dim % 2:
        raise ValueError(f"head_dim must be even for rotary embeddings, got {head_dim}")
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=device, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, device=device, dtype=torch.float64), inv_freq)  # (T, D/2)
    # Angles in fp64: at t ~ 1e4 fp32 angles lose ~1e-3 rad before cos/sin.
    return angles.cos().float(), angles.sin().float()
