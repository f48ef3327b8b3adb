"""Tile-level pieces shared by the attention kernels in kernels/attention.py and attention_backward.py: where a program
stands (its sequence, band and tile range), masked tile loads, the score mask and the online-softmax step.

Scores are in log2 units; see kernels/attention.py for the layouts and the band convention dlo <= j - i <= dhi.
"""

import triton
import triton.language as tl


@triton.jit
def load_tile(ptrs, row_ok, col_ok, CHECK_ROWS: tl.constexpr, CHECK_COLS: tl.constexpr, UPCAST: tl.constexpr):
    """A 2-D tile, zero outside row_ok/col_ok; masks only where the bounds can be crossed."""
    if CHECK_ROWS and CHECK_COLS:
        x = tl.load(ptrs, mask=row_ok & col_ok, other=0.0)
    elif CHECK_ROWS:
        x = tl.load(ptrs, mask=row_ok, other=0.0)
    elif CHECK_COLS:
        x = tl.load(ptrs, mask=col_ok, other=0.0)
    else:
        x = tl.load(ptrs)
    if UPCAST:  # the interpreter computes bf16 on raw bits (docs/platform.md): widen right after the load
        x = x.to(tl.float32)
    return x


@triton.jit
def tile_range(x0, x1, dlo, dhi, n_other, BLOCK: tl.constexpr):
    """Rows x0..x1 see columns y in [x + dlo, x + dhi] within [0, n_other). Returns (lo, a, b, hi): the columns
    to visit are [lo, hi) in BLOCK steps from lo, of which the tiles in [a, b) need no mask at all."""
    lo = (tl.maximum(x0 + dlo, 0) // BLOCK) * BLOCK
    hi = tl.minimum(x1 + dhi + 1, n_other)
    full_lo = tl.maximum(x1 + dlo, lo)
    full_hi = tl.minimum(x0 + dhi + 1, hi)
    a = lo + tl.cdiv(full_lo - lo, BLOCK) * BLOCK
    n_full = tl.maximum(full_hi - a, 0) // BLOCK
    b = a + n_full * BLOCK
    return lo, tl.where(n_full > 0, a, hi), tl.where(n_full > 0, b, hi), hi


@triton.jit
def tma_rows(seqlen):
    """Rows of a tensor descriptor over a sequence's seqlen rows. TMA takes no zero dimension (cuTensorMapEncodeTiled:
    every globalDim non-zero), so an empty sequence's descriptor holds one row, which tma_start keeps every tile off
    (its address, the next sequence's row or past the tensor, is never touched)."""
    return tl.maximum(seqlen, 1)


@triton.jit
def tma_start(seqlen, start):
    """The first row of a tile that starts at row start of a sequence's descriptor: past an empty sequence's one row,
    so that the tile reads zeros and writes nothing, as every tile past a sequence's end does."""
    return tl.where(seqlen == 0, 1, start)


@triton.jit
def seq_bounds(Cu, b, seqlen, VARLEN: tl.constexpr):
    """(start, length) of sequence b: from cu_seqlens when packed, else (0, the common length)."""
    if VARLEN:
        start = tl.load(Cu + b)
        return start, tl.load(Cu + b + 1) - start
    return b * 0, seqlen


@triton.jit
def sequence(CuQ, CuK, b, seqlen_q, seqlen_k, left, right, VARLEN: tl.constexpr):
    """(q_start, seqlen_q, k_start, seqlen_k, dlo, dhi) of sequence b: where its rows start, how many there are, and
    the diagonal band a query sees (dlo <= j - i <= dhi)."""
    q_start, seqlen_q = seq_bounds(CuQ, b, seqlen_q, VARLEN)
    k_start, seqlen_k = seq_bounds(CuK, b, seqlen_k, VARLEN)
    return q_start, seqlen_q, k_start, seqlen_k, seqlen_k - seqlen_q - left, seqlen_k - seqlen_q + right


@triton.jit
def one_key_rows(offs_m, seqlen_k, dlo, dhi):
    """Which query rows offs_m see exactly one key (j in [i + dlo, i + dhi] and [0, seqlen_k)): the softmax of one
    score is the constant 1, so the backward takes their p as exactly 1 and their dS as exactly the lse gradient."""
    return tl.maximum(offs_m + dlo, 0) == tl.minimum(offs_m + dhi, seqlen_k - 1)


@triton.jit
def q_program(
    CuQ,
    CuK,
    seqlen_q,
    seqlen_k,
    left,
    right,
    GROUP: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    VARLEN: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """Where a program of the forward or dQ grid (query block, head, sequence) stands: (b64, h64, kvh64, q_start,
    seqlen_q, k_start, seqlen_k, dlo, dhi, start_m, offs_m, offs_d). Batch and head indices are int64 for the pointer
    offsets. start_m >= seqlen_q is a block past a short packed sequence: the caller returns early, or (in a
    warp-specialized kernel, which cannot) visits no tile."""
    pid_m, h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q_start, seqlen_q, k_start, seqlen_k, dlo, dhi = sequence(CuQ, CuK, b, seqlen_q, seqlen_k, left, right, VARLEN)
    start_m = pid_m * BLOCK_M
    return (
        b.to(tl.int64),
        h.to(tl.int64),
        (h // GROUP).to(tl.int64),
        q_start,
        seqlen_q,
        k_start,
        seqlen_k,
        dlo,
        dhi,
        start_m,
        start_m + tl.arange(0, BLOCK_M),
        tl.arange(0, HEAD_DIM_PAD),
    )


@triton.jit
def kv_bases(K, V, b64, kvh64, k_start, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh):
    """Pointers to row 0 of sequence b's keys and values for K/V head kvh (int64: B * T * H * D may pass 2**31)."""
    k_start64 = k_start.to(tl.int64)
    return (
        K + b64 * stride_kb + kvh64 * stride_kh + k_start64 * stride_kt,
        V + b64 * stride_vb + kvh64 * stride_vh + k_start64 * stride_vt,
    )


@triton.jit
def masked_scores(s, offs_m, offs_n, seqlen_k, dlo, dhi):
    """-inf where key offs_n is past the sequence or outside query offs_m's band."""
    diag = offs_n[None, :] - offs_m[:, None]
    return tl.where((offs_n[None, :] < seqlen_k) & (diag >= dlo) & (diag <= dhi), s, float("-inf"))


@triton.jit
def online_softmax(acc, m_i, l_i, s, v, MASKED: tl.constexpr, keep=None, DROPOUT: tl.constexpr = False):
    """One key tile folded into (acc, m, l), with s its (BLOCK_M, BLOCK_N) scores in log2 units and v its values;
    with DROPOUT, only the kept scores (keep: bool like s) reach acc, l stays the undropped sum."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    if MASKED:  # a row with every key masked so far keeps m = -inf; shift it by 0 so that p = 0, not NaN
        m_new_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_new_safe = m_new
    p = tl.math.exp2(s - m_new_safe[:, None])
    alpha = tl.math.exp2(m_i - m_new_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    if DROPOUT:
        p = tl.where(keep, p, 0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, m_new, l_i


TWO_LOG2E = tl.constexpr(2.8853900817779268)  # 2 / ln 2; globals a kernel reads must be constexpr


@triton.jit
def tanh_and_slope(x):
    """(tanh x, 1 - tanh^2 x) from a = 1 - |tanh x| = 2 / (e^2|x| + 1), in (0, 1]: tanh = sign(x) (1 - a), and
    1 - tanh^2 = a (2 - a) with no cancellation where |tanh| nears 1 (1 - t * t would lose it). |x| stops at 30, where
    tanh is 1 in float32, so that the exp2 never overflows; libdevice's tanh has no interpreter implementation."""
    a = 2.0 / (tl.math.exp2(tl.minimum(tl.abs(x), 30.0) * TWO_LOG2E) + 1.0)
    t = 1.0 - a
    return tl.where(x < 0.0, -t, t), a * (2.0 - a)


@triton.jit
def modified_scores(s, q_pos, k_pos, softcap_log2, slope_log2, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr):
    """flash-attn's score modifiers on a tile of scores s in log2 units: with SOFTCAP, s holds x / softcap (the
    launch folds 1 / softcap into the scale) and becomes softcap * tanh(x / softcap) (softcap_log2 = softcap *
    log2 e); with ALIBI, -slope * |q_pos - k_pos| is added after it (slope_log2 = slope * log2 e; q_pos = i + Tk - Tq
    and k_pos = j, broadcastable to s). Returns (s, dcap): dcap = 1 - tanh^2, the cap's derivative that the backward
    multiplies dS by (1.0 without SOFTCAP; the forward leaves it unused)."""
    dcap = 1.0
    if SOFTCAP:
        t, dcap = tanh_and_slope(s)
        s = softcap_log2 * t
    if ALIBI:
        s = s - slope_log2 * tl.abs(q_pos - k_pos).to(tl.float32)
    return s, dcap


@triton.jit
def alibi_slope_log2(Alibi, b64, h64, stride_ab, ALIBI: tl.constexpr):
    """Sequence b's head h slope of the ALiBi slopes ((B, H), or (H,) with stride_ab 0) in log2 units; 0 without."""
    if ALIBI:
        return tl.load(Alibi + b64 * stride_ab + h64) * 1.4426950408889634
    return 0.0
