"""Attention dropout's keep mask in plain PyTorch, bit for bit the kernels' (kernels/_attention_dropout.py gives the
layout: Philox4x32-10 keyed by the seed, counter (j // 8, i, b * H + h, offset), a 16-bit value per score against
round(65536 * (1 - dropout_p))), and flash-attn's S_dmask built from it.

The seed is an int64 tensor (2,) on q's device, [seed, offset], drawn by `dropout_seed` from torch's RNG on that
device (graph-safe on CUDA: a replayed graph draws fresh values), read by every backend on the device.
"""

from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_ROUNDS = 10


def dropout_seed(device) -> torch.Tensor:
    """A fresh (seed, offset) pair, int64 (2,), from torch's RNG on `device`."""
    return torch.randint(0, 1 << 62, (2,), dtype=torch.int64, device=device)


def keep_threshold(dropout_p: float) -> int:
    """A score is kept when its 16-bit random value is below this: round(65536 * (1 - dropout_p)), at least 1."""
    return max(1, min(65536, int(65536.0 * (1.0 - dropout_p) + 0.5)))


def _mul32(a: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of the 64-bit product of the constant a and x (int64 tensors holding uint32 values),
    with x split into 16-bit limbs so that no partial product leaves int64."""
    x_lo, x_hi = x & 0xFFFF, x >> 16
    hi_part = a * x_hi  # < 2**48
    t = a * x_lo + ((hi_part & 0xFFFF) << 16)  # < 2**49
    return (hi_part >> 16) + (t >> 32), t & _M32


def philox(seed: torch.Tensor, c0, c1, c2, c3) -> tuple[torch.Tensor, ...]:
    """Philox4x32-10 of counters (c0, c1, c2, c3) (int64 tensors of uint32 values, broadcast together) under the key
    (seed & 0xffffffff, seed >> 32) of the int64 0-d tensor seed: four int64 tensors of uint32 words, as
    triton.language.random.philox returns them."""
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    c0, c1, c2, c3 = torch.broadcast_tensors(c0, c1, c2, c3)
    for _ in range(_ROUNDS):
        hi_b, lo_b = _mul32(_ROUND_B, c2)
        hi_a, lo_a = _mul32(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & _M32, (k1 + _KEY_B) & _M32
    return c0, c1, c2, c3


def dense_keep(seed, dropout_p: float, B: int, H: int, Tq: int, Tk: int, first_sequence: int = 0) -> torch.Tensor:
    """(B, H, Tq, Tk) bool, True where score (sequence first_sequence + b, head h, query i, key j) is kept; seed:
    int64 (2,). One Philox call per eight keys, as in the kernels."""
    device = seed.device
    b = torch.arange(first_sequence, first_sequence + B, device=device)[:, None, None, None]
    h = torch.arange(H, device=device)[None, :, None, None]
    i = torch.arange(Tq, device=device)[None, None, :, None]
    g = torch.arange((Tk + 7) // 8, device=device)[None, None, None, :]
    words = torch.stack(philox(seed[0], g, i, b * H + h, seed[1] & _M32), -1)  # (B, H, Tq, G, 4)
    halves = torch.stack((words & 0xFFFF, words >> 16), -2)  # (B, H, Tq, G, 2, 4): key 8g + 4 * half + word
    values = halves.flatten(-3)[..., :Tk]  # (B, H, Tq, G * 8) -> (B, H, Tq, Tk)
    return values < keep_threshold(dropout_p)
