"""Rotary position embedding (RoPE), half-split layout as in GPT-NeoX and flash-attn's `interleaved=False`.

The pair rotated together is (x[..., i], x[..., i + D/2]), so the tables have D/2 columns; the rotation itself is
fasttrain.ops.apply_rotary_emb.
"""

from __future__ import annotations

import math

import torch


def rotary_tables(
    max_seq_len: int,
    head_dim: int,
    theta: float = 10000.0,
    device: torch.device | str | None = None,
    llama3: tuple[float, float, float, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, each (max_seq_len, head_dim // 2) fp32: angle[t, i] = t * theta^(-2i / head_dim), the
    frequencies rescaled as Llama 3.1 does when llama3 = (factor, low_freq_factor, high_freq_factor,
    original_max_seq_len) is given."""
    if head_dim % 2:
        raise ValueError(f"head_dim must be even for rotary embeddings, got {head_dim}")
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=device, dtype=torch.float64) / head_dim)
    if llama3 is not None:
        inv_freq = llama3_inv_freq(inv_freq, *llama3)
    angles = torch.outer(torch.arange(max_seq_len, device=device, dtype=torch.float64), inv_freq)  # (T, D/2)
    # Angles in fp64: at t ~ 1e4 fp32 angles lose ~1e-3 rad before cos/sin.
    return angles.cos().float(), angles.sin().float()


def llama3_inv_freq(inv_freq: torch.Tensor, factor: float, low: float, high: float, original: int) -> torch.Tensor:
    """Llama 3.1's rescaled frequencies (transformers' `_compute_llama3_parameters`): wavelengths longer than
    original/low are stretched by factor, shorter than original/high kept, and blended linearly in original/wavelen
    between the two."""
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= original / high) & (wavelen <= original / low)
    return torch.where(medium, smoothed, scaled)
