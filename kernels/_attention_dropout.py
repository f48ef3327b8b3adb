"""Attention dropout's keep mask, a pure function of (seed, offset, sequence b, head h, query row i, key column j),
computed alike by the Triton kernels (here), the C++ CPU kernel (csrc/attention_cpu.cpp) and the PyTorch reference
(fasttrain/ops/attention_dropout.py), so that every backend drops the same scores and a backward regenerates its
forward's mask from the seed instead of storing it.

The generator is Philox4x32-10 (Salmon et al. 2011; Triton's tl.philox): key (seed & 0xffffffff, seed >> 32),
counter (j // 8, i, b * H + h, offset & 0xffffffff), with i and j positions within sequence b (so a packed batch
drops what the dense batch of the same sequences drops) and H the number of query heads. One call gives four 32-bit
words r0..r3, which serve the eight scores j = 8g .. 8g + 7: score j takes the 16-bit value
(r[j % 4] >> (16 * ((j % 8) // 4))) & 0xffff, and is kept when that value is below the threshold
round(65536 * (1 - dropout_p)) (at least 1). Kept scores are scaled by 1 / (1 - dropout_p). So the keep rate is
1 - dropout_p within 2**-17, and a score costs an eighth of a Philox call (flash-attn v2 draws sixteen 8-bit values
per call, whose keep rate is (floor(255 * (1 - p)) + 1) / 256).
"""

import triton
import triton.language as tl


@triton.jit
def _halves(r):
    """(low 16 bits, high 16 bits) of a uint32 tile, as int32."""
    return (r & 0xFFFF).to(tl.int32, bitcast=True), (r >> 16).to(tl.int32, bitcast=True)


@triton.jit
def keep_tile(seed, offset, bh, offs_m, start_n, threshold, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(BLOCK_M, BLOCK_N) bool: True where score (query offs_m, key start_n + n) of head row bh = b * H + h is kept.
    start_n is a multiple of 8 (tiles start at multiples of BLOCK_N); seed and offset are the int64 pair of the
    launch's seed tensor."""
    GROUPS: tl.constexpr = BLOCK_N // 8
    c0 = tl.zeros([BLOCK_M, GROUPS], tl.int32) + (start_n // 8 + tl.arange(0, GROUPS))[None, :]  # (BLOCK_M, GROUPS)
    c1 = tl.zeros([BLOCK_M, GROUPS], tl.int32) + offs_m[:, None]
    c2 = tl.zeros([BLOCK_M, GROUPS], tl.int32) + bh
    c3 = tl.zeros([BLOCK_M, GROUPS], tl.int32) + (offset & 0xFFFFFFFF).to(tl.uint32).to(tl.int32, bitcast=True)
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, c2, c3)
    lo0, hi0 = _halves(r0)
    lo1, hi1 = _halves(r1)
    lo2, hi2 = _halves(r2)
    lo3, hi3 = _halves(r3)
    # join appends a trailing axis of 2, so the last join picks bit 0 of j % 8: column 8g + 4 * half + word
    even = tl.join(tl.join(lo0, hi0), tl.join(lo2, hi2))  # (BLOCK_M, GROUPS, half, word // 2), word 0 or 2
    odd = tl.join(tl.join(lo1, hi1), tl.join(lo3, hi3))  # word 1 or 3
    values = tl.reshape(tl.join(even, odd), [BLOCK_M, BLOCK_N])  # (BLOCK_M, GROUPS, 2, 2, 2) -> (BLOCK_M, BLOCK_N)
    return values < threshold


def keep_threshold(dropout_p: float) -> int:
    """round(65536 * (1 - dropout_p)), at least 1: fasttrain/ops/attention_dropout.py's and the C++ kernel's too."""
    return max(1, min(65536, int(65536.0 * (1.0 - dropout_p) + 0.5)))


def dropout_args(dropout_p: float, seed) -> dict:
    """The dropout arguments every attention kernel takes last: Seed (the int64 (2,) seed and offset tensor),
    dropout_threshold, dropout_scale (1 / (1 - dropout_p)) and the DROPOUT constexpr, off when dropout_p is 0."""
    if dropout_p == 0.0:
        return dict(Seed=None, dropout_threshold=0, dropout_scale=1.0, DROPOUT=False)
    return dict(
        Seed=seed, dropout_threshold=keep_threshold(dropout_p), dropout_scale=1.0 / (1.0 - dropout_p), DROPOUT=True
    )
