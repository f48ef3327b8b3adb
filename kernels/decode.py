"""Split-KV flash-decoding: a few query tokens against a long, preallocated KV cache.

Three kernels, launched in this order by `decode` below (fasttrain/ops/decode.py holds the op and its pure-PyTorch
reference):

1. `_decode_append_kernel` writes the new k/v rows (B, Tnew, Hkv, D) into the cache at rows cache_seqlens[b] + t,
   rotating k (and q, into a fresh tensor) with the cos/sin tables on the way when rotary is fused. One program
   per (b, t, head).
2. `_decode_kernel` runs one program per (split, b * Hkv, block of query rows). The rows of a program are the Tq
   query tokens times the H / Hkv query heads of one GQA group, so each K/V tile is read from memory once per group,
   not once per query head. The visible keys of sequence b are cut into num_splits equal chunks (a whole number of
   BLOCK_N tiles each) so that batch 1 with a long cache still launches enough programs to fill the GPU. With one
   split it writes the final output; otherwise each split writes its normalized partial output and logsumexp.
3. `_decode_combine_kernel` merges the splits of one (b, t, head) row through their logsumexp.

Masking follows flash-attn's bottom-right alignment: with L_b visible keys, query token t sits at position
L_b - Tq + t; key j is visible when window_left >= qpos - j and j - qpos <= window_right (causal: window_right = 0;
no window: a sentinel of 2**30). A row with no visible key outputs zeros and a logsumexp of +inf (as flash-attn);
within the split partials it is -inf, so that the combine weighs such a split 0.

Pure device code: nothing here imports fasttrain. Under TRITON_INTERPRET=1 one fixed config serves (the autotuner's
benchmarker needs a GPU); on a GPU the decode kernel autotunes over a few tile sizes.
"""

import math

import torch
import triton
import triton.language as tl

from ._attention_tiles import modified_scores
from ._launch import INTERPRETING, cdiv, multiprocessor_count, next_power_of_2

LN2 = tl.constexpr(0.6931471805599453)  # globals a kernel reads must be constexpr (the compiler insists)

# Decode is bound by reading K and V: deeper pipelines and wider key tiles keep more bytes in flight, at the cost of
# shared memory (one K and one V tile per stage) and registers. Tuples are (BLOCK_N, num_warps, num_stages). All
# compile for sm_90 and sm_80 without spills (tests/test_kernels_compile.py; sm_90 bf16 d128 (64, 4, 3): 96 registers,
# 70 KB shared, cp.async pipelined); which one wins per shape is the autotuner's choice.
_CONFIGS = {
    90: {
        "d64": [(64, 4, 3), (128, 4, 3), (128, 8, 4)],
        "d128": [(64, 4, 3), (64, 4, 4), (128, 8, 3)],
        "d256": [(32, 4, 3), (64, 8, 2)],
    },
    80: {"d64": [(64, 4, 3), (128, 4, 3)], "d128": [(64, 4, 3), (128, 8, 2)], "d256": [(32, 4, 3), (64, 8, 2)]},
}
# The interpreter runs numpy per tile: fewer, larger tiles are faster.
_INTERPRETER = (64, 4, 1)


def _config(t):
    return triton.Config({"BLOCK_N": t[0]}, num_warps=t[1], num_stages=t[2])


DECODE_CONFIGS = {
    arch: {cls: [_config(t) for t in ts] for cls, ts in by_class.items()} for arch, by_class in _CONFIGS.items()
}
_ONE = _config(_INTERPRETER)  # one object for every class: an autotuner with a single config never benchmarks
DECODE_CONFIGS["interpreter"] = {cls: [_ONE] for cls in ("d64", "d128", "d256")}


def head_dim_class(block_d: int) -> str:
    return "d64" if block_d <= 64 else "d128" if block_d <= 128 else "d256"


def _arch_configs() -> dict:
    if INTERPRETING or not torch.cuda.is_available():
        return DECODE_CONFIGS["interpreter"]
    return DECODE_CONFIGS[90] if torch.cuda.get_device_capability()[0] >= 9 else DECODE_CONFIGS[80]


@triton.jit
def _copy_row(
    SRC,
    DST,
    cos,
    sin,
    ok,
    HEAD_DIM: tl.constexpr,
    ROT_HALF: tl.constexpr,
    ROTARY: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """Copy one head row of D elements from SRC to DST (only if ok: SRC may be out of range otherwise), rotating
    the first 2 * ROT_HALF of them."""
    if ROTARY:
        offs_r = tl.arange(0, BLOCK_R)
        mask_r = offs_r < ROT_HALF
        if INTERLEAVED:  # pairs (0, 1), (2, 3), ...
            i1 = 2 * offs_r
            i2 = i1 + 1
        else:  # pairs (i, i + ROT_HALF), GPT-NeoX style
            i1 = offs_r
            i2 = offs_r + ROT_HALF
        x1 = tl.load(SRC + i1, mask=mask_r & ok, other=0.0).to(tl.float32)
        x2 = tl.load(SRC + i2, mask=mask_r & ok, other=0.0).to(tl.float32)
        tl.store(DST + i1, (x1 * cos - x2 * sin).to(DST.dtype.element_ty), mask=mask_r & ok)
        tl.store(DST + i2, (x2 * cos + x1 * sin).to(DST.dtype.element_ty), mask=mask_r & ok)
        offs_p = 2 * ROT_HALF + tl.arange(0, BLOCK_D)
    else:
        offs_p = tl.arange(0, BLOCK_D)
    mask_p = offs_p < HEAD_DIM
    x = tl.load(SRC + offs_p, mask=mask_p & ok, other=0.0)
    tl.store(DST + offs_p, x.to(DST.dtype.element_ty), mask=mask_p & ok)


@triton.jit
def _decode_append_kernel(
    Q,
    K,
    V,
    KC,
    VC,
    QR,
    COS,
    SIN,
    SEQLENS,
    BATCH_IDX,
    BLOCK_TABLE,
    stride_qb,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_kcb,
    stride_kct,
    stride_kch,
    stride_vcb,
    stride_vct,
    stride_vch,
    stride_bt,
    stride_qrb,
    stride_qrt,
    stride_qrh,
    stride_rot,
    tq,
    t_new,
    t_rows,
    n_heads,
    n_kv_heads,
    t_cache,
    t_rot,
    HEAD_DIM: tl.constexpr,
    ROT_HALF: tl.constexpr,
    ROTARY: tl.constexpr,
    Q_PER_TOKEN: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    HAS_BATCH_IDX: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """Grid (B * t_rows, max(H, Hkv)) with t_rows = max(Tq, Tnew): append k/v row (b, t, h); rotate q row (b, t, h).
    PAGE > 0: the caches are pages of PAGE rows, sequence b's row p in page BLOCK_TABLE[b, p // PAGE] (stride_bt
    between sequences)."""
    pid_bt = tl.program_id(0)
    h = tl.program_id(1)
    b = pid_bt // t_rows
    t = pid_bt % t_rows
    seqlen = tl.load(SEQLENS + b).to(tl.int32)
    cache_b = b
    if HAS_BATCH_IDX:
        cache_b = tl.load(BATCH_IDX + b).to(tl.int32)
    offs_r = tl.arange(0, BLOCK_R)
    pos = seqlen + t
    cos = 1.0
    sin = 0.0
    if ROTARY:
        in_table = (offs_r < ROT_HALF) & (pos < t_rot)
        cos = tl.load(COS + pos * stride_rot + offs_r, mask=in_table, other=1.0).to(tl.float32)
        sin = tl.load(SIN + pos * stride_rot + offs_r, mask=in_table, other=0.0).to(tl.float32)
    # Rows past the cache end are never written; the launcher reports them before launching.
    ok = (t < t_new) & (h < n_kv_heads) & (pos < t_cache)
    row = pos
    if PAGE > 0:
        cache_b = tl.load(BLOCK_TABLE + b * stride_bt + pos // PAGE, mask=pos < t_cache, other=0).to(tl.int32)
        row = pos % PAGE
    _copy_row(
        K + b * stride_kb + t * stride_kt + h * stride_kh,
        KC + cache_b.to(tl.int64) * stride_kcb + row.to(tl.int64) * stride_kct + h * stride_kch,
        cos,
        sin,
        ok,
        HEAD_DIM,
        ROT_HALF,
        ROTARY,
        INTERLEAVED,
        BLOCK_D,
        BLOCK_R,
    )
    _copy_row(
        V + b * stride_vb + t * stride_vt + h * stride_vh,
        VC + cache_b.to(tl.int64) * stride_vcb + row.to(tl.int64) * stride_vct + h * stride_vch,
        cos,
        sin,
        ok,
        HEAD_DIM,
        ROT_HALF,
        False,
        INTERLEAVED,
        BLOCK_D,
        BLOCK_R,
    )
    if ROTARY:
        # flash-attn's positions: row t at cache_seqlens + t, or all at cache_seqlens when neither causal nor windowed
        qpos = seqlen
        if Q_PER_TOKEN:
            qpos = seqlen + t
        in_table = (offs_r < ROT_HALF) & (qpos < t_rot)
        qcos = tl.load(COS + qpos * stride_rot + offs_r, mask=in_table, other=1.0).to(tl.float32)
        qsin = tl.load(SIN + qpos * stride_rot + offs_r, mask=in_table, other=0.0).to(tl.float32)
        _copy_row(
            Q + b * stride_qb + t * stride_qt + h * stride_qh,
            QR + b * stride_qrb + t * stride_qrt + h * stride_qrh,
            qcos,
            qsin,
            (t < tq) & (h < n_heads),
            HEAD_DIM,
            ROT_HALF,
            True,
            INTERLEAVED,
            BLOCK_D,
            BLOCK_R,
        )


@triton.jit
def _decode_kernel(
    Q,
    KC,
    VC,
    SEQLENS,
    BATCH_IDX,
    LEFTPAD,
    BLOCK_TABLE,
    Out,
    LSE,
    stride_qb,
    stride_qt,
    stride_qh,
    stride_kcb,
    stride_kct,
    stride_kch,
    stride_vcb,
    stride_vct,
    stride_vch,
    stride_bt,
    stride_ob,
    stride_ot,
    stride_oh,
    stride_ls,
    stride_lb,
    stride_lt,
    stride_lh,
    stride_os,
    qk_scale,
    tq,
    group,
    n_kv_heads,
    seqlen_add,
    window_left,
    window_right,
    t_cache,
    t_cache_bucket,
    num_splits,
    HEAD_DIM: tl.constexpr,
    SPLIT: tl.constexpr,
    HAS_BATCH_IDX: tl.constexpr,
    HAS_LEFTPAD: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    softcap_log2,
    Alibi,
    stride_ab,
    SOFTCAP: tl.constexpr,
    ALIBI: tl.constexpr,
):
    """Grid (B * Hkv, num_splits, cdiv(Tq * G, BLOCK_M)); SPLIT is num_splits > 1 (one compile serves every count).

    Out is (B, Tq, H, D) in q's dtype with one split, else the fp32 partials (num_splits, B, Tq, H, D); LSE is fp32,
    natural log: (B, H, Tq) with one split, else (num_splits, B, Tq, H). qk_scale = softmax_scale * log2(e), or
    softmax_scale / softcap with SOFTCAP (softcap_log2 = softcap * log2 e); ALIBI: the float32 slopes (B, H), or (H,)
    with stride_ab 0 (kernels/_attention_tiles.modified_scores). ALiBi's distance is qpos - j in cache rows: a
    left-padded sequence's positions both count from its first real row, which cancels.
    """
    pid_bh = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_m = tl.program_id(2)
    b = pid_bh // n_kv_heads
    hkv = pid_bh % n_kv_heads
    cache_b = b
    if HAS_BATCH_IDX:
        cache_b = tl.load(BATCH_IDX + b).to(tl.int32)
    seqlen = tl.load(SEQLENS + b).to(tl.int32) + seqlen_add

    # Row r of the block is query token t = r // group of head hkv * group + r % group.
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    t = offs_m // group
    head = hkv * group + offs_m % group
    row_ok = offs_m < tq * group
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM  # a constexpr bound: all-true when HEAD_DIM == BLOCK_D, so loads stay vectorized
    q = tl.load(
        Q + b * stride_qb + t[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    )  # (BLOCK_M, BLOCK_D)
    qpos = seqlen - tq + t
    slope_log2 = 0.0
    if ALIBI:  # one slope per row: rows mix the heads of a GQA group
        slope_log2 = tl.load(Alibi + b * stride_ab + head, mask=row_ok, other=0.0)[:, None] * 1.4426950408889634

    # Keys any row of this sequence can see: [lo, hi). Split pid_s takes an equal share, whole tiles.
    # The last query token sits at seqlen - 1 and window_right >= 0. Keys stop at the cache end (t_cache rows) even
    # when a caller passed check_lengths=False with too long a length: past it lie the next sequence or unmapped memory.
    # Keys before LEFTPAD[b] are padding (flash-attn's cache_leftpad).
    first = 0
    if HAS_LEFTPAD:
        first = tl.load(LEFTPAD + b).to(tl.int32)
    lo = tl.maximum(seqlen - tq - window_left, first)
    if PAGE > 0:  # whole tiles, each inside one page (PAGE is a multiple of BLOCK_N); the mask drops keys below lo
        lo = lo // BLOCK_N * BLOCK_N
    hi = tl.maximum(tl.minimum(seqlen, t_cache), lo)
    chunk = tl.cdiv(tl.cdiv(hi - lo, num_splits), BLOCK_N) * BLOCK_N
    start = lo + pid_s * chunk
    end = tl.minimum(start + chunk, hi)

    kc_base = KC + cache_b.to(tl.int64) * stride_kcb + hkv * stride_kch
    vc_base = VC + cache_b.to(tl.int64) * stride_vcb + hkv * stride_vch
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < end
        kv_mask = n_ok[:, None] & d_ok[None, :]
        rows_n = offs_n
        if PAGE > 0:  # one table read per tile
            page = tl.load(BLOCK_TABLE + b * stride_bt + start_n // PAGE).to(tl.int64)
            kc_base = KC + page * stride_kcb + hkv * stride_kch
            vc_base = VC + page * stride_vcb + hkv * stride_vch
            rows_n = start_n % PAGE + tl.arange(0, BLOCK_N)
        k = tl.load(kc_base + rows_n[:, None].to(tl.int64) * stride_kct + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(vc_base + rows_n[:, None].to(tl.int64) * stride_vct + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k)) * qk_scale  # (BLOCK_M, BLOCK_N), log2 domain
        s, _ = modified_scores(s, qpos[:, None], offs_n[None, :], softcap_log2, slope_log2, SOFTCAP, ALIBI)
        visible = (
            n_ok[None, :]
            & (offs_n[None, :] >= first)
            & (offs_n[None, :] - qpos[:, None] <= window_right)
            & (qpos[:, None] - offs_n[None, :] <= window_left)
        )
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen no visible key keeps m = -inf; shift it by 0 so that exp2 gives 0, not NaN.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_shift)
        p = tl.exp2(s - m_shift[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * LN2
    if SPLIT:
        lse = tl.where(seen, lse, float("-inf"))
    else:
        lse = tl.where(seen, lse, float("inf"))
    o_ptrs = (
        Out + pid_s * stride_os + b * stride_ob + t[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :]
    )
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE + pid_s * stride_ls + b * stride_lb + t * stride_lt + head * stride_lh, lse, mask=row_ok)


@triton.jit
def _decode_combine_kernel(
    O_PART,
    LSE_PART,
    Out,
    LSE,
    stride_ps,
    stride_ls,
    stride_ob,
    stride_ot,
    stride_oh,
    stride_lb,
    stride_lh,
    stride_lt,
    tq,
    n_heads,
    num_splits,
    HEAD_DIM: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Grid (B * Tq * H,): out = sum_s exp(lse_s - lse) * out_s with lse = logsumexp_s lse_s.

    O_PART (num_splits, B, Tq, H, D) and LSE_PART (num_splits, B, Tq, H) are contiguous fp32;
    row = (b * Tq + t) * H + h.
    Out is (B, Tq, H, D) in q's dtype; LSE (B, H, Tq) fp32.
    """
    row = tl.program_id(0)
    b = row // (tq * n_heads)
    t = (row // n_heads) % tq
    h = row % n_heads
    offs_s = tl.arange(0, BLOCK_S)
    s_ok = offs_s < num_splits
    lse_s = tl.load(LSE_PART + offs_s * stride_ls + row, mask=s_ok, other=float("-inf"))
    m = tl.max(lse_s, 0)
    m_shift = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse_s - m_shift)  # empty splits (lse -inf) weigh 0
    total = tl.sum(w, 0)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    parts = tl.load(
        O_PART + offs_s[:, None] * stride_ps + row * HEAD_DIM + offs_d[None, :],
        mask=s_ok[:, None] & d_ok[None, :],
        other=0.0,
    )  # (BLOCK_S, BLOCK_D)
    out = tl.sum(parts * w[:, None], 0) / tl.where(total > 0.0, total, 1.0)
    tl.store(Out + b * stride_ob + t * stride_ot + h * stride_oh + offs_d, out.to(Out.dtype.element_ty), mask=d_ok)
    lse = tl.where(total > 0.0, m_shift + tl.log(tl.where(total > 0.0, total, 1.0)), float("inf"))
    tl.store(LSE + b * stride_lb + h * stride_lh + t * stride_lt, lse)


def combine_num_warps(block_s: int, block_d: int) -> int:
    """Warps for the combine: at most 64 partial-output values per thread. One warp for a (64, 128) tile spilled
    88 B (255 registers), a (128, 128) one 3024 B; 4 and 8 warps compile without spills (sm_90, triton 3.7.1)."""
    return max(1, min(8, block_s * block_d // 2048))


def _prune(configs, named_args, **kwargs):
    """early_config_prune: keep the configs of the call's head-dim class."""
    keep = _arch_configs()[head_dim_class({**named_args, **kwargs}["BLOCK_D"])]
    return [c for c in configs if any(c is k for k in keep)]


# t_cache_bucket is the cache's allocated length rounded up to a power of 2: short and long caches tune apart.
_decode = triton.autotune(
    configs=list({id(c): c for cs in _arch_configs().values() for c in cs}.values()),
    key=["BLOCK_M", "BLOCK_D", "num_splits", "t_cache_bucket"],
    prune_configs_by={"early_config_prune": _prune},
)(_decode_kernel)


# Keys per split at least: fewer would spend more on the split's setup and the combine than on reading K and V.
MIN_KEYS_PER_SPLIT = 128
MAX_SPLITS = 128


def num_splits_heuristic(batch_kv_heads: int, m_blocks: int, cache_len: int, num_sms: int) -> int:
    """How many chunks to cut each sequence's keys into so that the decode grid fills the GPU.

    batch_kv_heads * m_blocks programs run per split; aim for two per SM (one waits on memory while the other
    computes) but keep at least MIN_KEYS_PER_SPLIT keys per split. Depends on the cache's allocated length, not on
    cache_seqlens, so it needs no host sync and a captured CUDA graph stays valid as the sequences grow.
    """
    programs = batch_kv_heads * m_blocks
    if programs >= num_sms:
        return 1
    wanted = math.ceil(2 * num_sms / programs)
    by_length = max(1, cache_len // MIN_KEYS_PER_SPLIT)
    return max(1, min(wanted, by_length, MAX_SPLITS))


def _parallel_units(device: torch.device) -> int:
    if device.type == "cuda":
        return multiprocessor_count(device)
    # The interpreter runs programs one after another: splitting only adds work there.
    return torch.get_num_threads()


def decode(
    q,
    k_cache,
    v_cache,
    k,
    v,
    rotary_cos,
    rotary_sin,
    cache_seqlens,
    cache_batch_idx,
    cache_leftpad,
    block_table,
    softmax_scale: float,
    window_left: int,
    window_right: int,
    rotary_interleaved: bool,
    q_per_token: bool,
    num_splits: int,
    softcap: float = 0.0,
    alibi_slopes=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q (B, Tq, H, D) against the caches (B_cache, Tmax, Hkv, D) after appending k/v (B, Tnew, Hkv, D)
    at rows cache_seqlens[b].. (rotating k, and q into a fresh tensor, when cos/sin are given), keys before
    cache_leftpad[b] (if given) masked, through block_table's pages if given: the append (if k), the decode and (with
    several splits) the combine. Returns
    out (B, Tq, H, D) in q's dtype and lse (B, H, Tq) fp32. num_splits 0 picks the split count by
    num_splits_heuristic. softcap > 0 and alibi_slopes (float32 (H,) or (B, H)) modify the scores as flash-attn's.
    Inputs are checked by the caller."""
    B, Tq, H, D = q.shape
    Hkv = k_cache.shape[2]
    # a paged cache: (num_blocks, page, Hkv, D) read through block_table (B, max_blocks): Tmax rows per sequence
    page = 0 if block_table is None else k_cache.shape[1]
    Tmax = k_cache.shape[1] if block_table is None else block_table.shape[1] * page
    table = cache_seqlens[:, None] if block_table is None else block_table.contiguous()  # a placeholder if not paged
    G = H // Hkv
    block_d = max(16, next_power_of_2(D))
    # The kernels index these at unit stride (SEQLENS + b, COS + pos * stride_rot + i): a strided view, such as a
    # column of a (B, 2) tensor, would be read wrong. No-ops for the usual contiguous tensors.
    cache_seqlens = cache_seqlens.contiguous()
    cache_batch_idx = None if cache_batch_idx is None else cache_batch_idx.contiguous()
    cache_leftpad = None if cache_leftpad is None else cache_leftpad.contiguous()
    has_batch_idx = cache_batch_idx is not None
    batch_idx = cache_batch_idx if has_batch_idx else cache_seqlens  # a placeholder pointer, never read
    t_new = 0 if k is None else k.shape[1]
    if k is not None:
        rotary = rotary_cos is not None
        q_attn = torch.empty(q.shape, device=q.device, dtype=q.dtype) if rotary else q
        half = rotary_cos.shape[1] if rotary else 0
        # one row stride serves both tables; placeholders when not rotary
        cos, sin = (rotary_cos.contiguous(), rotary_sin.contiguous()) if rotary else (k_cache, k_cache)
        t_rows = max(Tq, t_new)
        _decode_append_kernel[(B * t_rows, max(H, Hkv))](
            q,
            k,
            v,
            k_cache,
            v_cache,
            q_attn,
            cos,
            sin,
            cache_seqlens,
            batch_idx,
            table,
            q.stride(0),
            q.stride(1),
            q.stride(2),
            k.stride(0),
            k.stride(1),
            k.stride(2),
            v.stride(0),
            v.stride(1),
            v.stride(2),
            k_cache.stride(0),
            k_cache.stride(1),
            k_cache.stride(2),
            v_cache.stride(0),
            v_cache.stride(1),
            v_cache.stride(2),
            table.stride(0),
            q_attn.stride(0),
            q_attn.stride(1),
            q_attn.stride(2),
            cos.stride(0) if rotary else 0,
            Tq,
            t_new,
            t_rows,
            H,
            Hkv,
            Tmax,
            cos.shape[0] if rotary else 0,
            HEAD_DIM=D,
            ROT_HALF=half,
            ROTARY=rotary,
            # read only when rotating: one compile serves every call without rotary
            Q_PER_TOKEN=q_per_token and rotary,
            INTERLEAVED=rotary_interleaved and rotary,
            HAS_BATCH_IDX=has_batch_idx,
            PAGE=page,
            BLOCK_D=block_d,
            BLOCK_R=max(1, next_power_of_2(half)),
            num_warps=append_num_warps(D),
        )
        q = q_attn

    rows = Tq * G
    block_m = min(64, max(16, next_power_of_2(rows)))
    m_blocks = cdiv(rows, block_m)
    splits = num_splits or num_splits_heuristic(B * Hkv, m_blocks, Tmax, _parallel_units(q.device))
    out = torch.empty(B, Tq, H, D, device=q.device, dtype=q.dtype)
    lse = torch.empty(B, H, Tq, device=q.device, dtype=torch.float32)
    if splits == 1:
        o_dst, l_dst = out, lse
        l_strides = (0, lse.stride(0), lse.stride(2), lse.stride(1))  # (split, b, t, h)
        os_stride = 0
    else:
        o_dst = torch.empty(splits, B, Tq, H, D, device=q.device, dtype=torch.float32)
        l_dst = torch.empty(splits, B, Tq, H, device=q.device, dtype=torch.float32)
        l_strides = l_dst.stride()
        os_stride = o_dst.stride(0)
    # B * Hkv on the grid's first axis: CUDA caps the other two at 65535 (B 2048 x 32 KV heads is 65536).
    _decode[(B * Hkv, splits, m_blocks)](
        q,
        k_cache,
        v_cache,
        cache_seqlens,
        batch_idx,
        cache_seqlens if cache_leftpad is None else cache_leftpad,  # a placeholder pointer when None, never read
        table,
        o_dst,
        l_dst,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        table.stride(0),
        o_dst.stride(-4),
        o_dst.stride(-3),
        o_dst.stride(-2),
        *l_strides,
        os_stride,
        softmax_scale / softcap if softcap > 0.0 else softmax_scale * math.log2(math.e),
        Tq,
        G,
        Hkv,
        t_new,
        window_left,
        window_right,
        Tmax,
        next_power_of_2(Tmax),
        splits,
        HEAD_DIM=D,
        SPLIT=splits > 1,
        HAS_BATCH_IDX=has_batch_idx,
        HAS_LEFTPAD=cache_leftpad is not None,
        PAGE=page,
        BLOCK_M=block_m,
        BLOCK_D=block_d,
        softcap_log2=softcap * math.log2(math.e),
        Alibi=alibi_slopes,
        stride_ab=alibi_slopes.stride(0) if alibi_slopes is not None and alibi_slopes.dim() == 2 else 0,
        SOFTCAP=softcap > 0.0,
        ALIBI=alibi_slopes is not None,
    )
    if splits > 1:
        block_s = next_power_of_2(splits)
        _decode_combine_kernel[(B * Tq * H,)](
            o_dst,
            l_dst,
            out,
            lse,
            o_dst.stride(0),
            l_dst.stride(0),
            out.stride(0),
            out.stride(1),
            out.stride(2),
            lse.stride(0),
            lse.stride(1),
            lse.stride(2),
            Tq,
            H,
            splits,
            HEAD_DIM=D,
            BLOCK_S=block_s,
            BLOCK_D=block_d,
            num_warps=combine_num_warps(block_s, block_d),
        )
    return out, lse


def append_num_warps(head_dim: int) -> int:
    """Warps for the append: one row of D elements per program, one warp up to d128."""
    return 1 if head_dim <= 128 else 2


# ---- ahead-of-time compile (tools/aot.py) --------------------------------------------------------------------------


def aot_kernels(arch: int, dtype: str, shipped: bool = False) -> list[dict]:
    """shipped=True: the cubins of the C++ launch path (csrc/decode_aot.cpp; fp16 and bf16 only, see _shipped).

    shipped=False, CI's compile check: per head dim, GQA 32/8 with one query token (a 16-row block) and several
    splits: the append with rotary fused over the whole head, the decode kernel under each of arch's configs, each of
    these again on a paged cache of 256-row pages (the decode kernel under the class's first config, which also
    compiles with softcap and ALiBi), the combine at its widest (BLOCK_S = 128, the launcher's most splits). Pointers
    not listed here are in the cache's dtype."""
    if shipped:
        return _shipped(arch, dtype)
    types = {"SEQLENS": "*i32", "BATCH_IDX": "*i32", "LEFTPAD": "*i32", "BLOCK_TABLE": "*i32", "COS": "*fp32"}
    types.update({"SIN": "*fp32", "LSE": "*fp32"})
    types.update({"O_PART": "*fp32", "LSE_PART": "*fp32", "qk_scale": "fp32", "softcap_log2": "fp32", "Alibi": "*fp32"})
    append, decode, combine = [], [], []
    for cls, configs in DECODE_CONFIGS[arch].items():
        d = {"d64": 64, "d128": 128, "d256": 256}[cls]
        warps = append_num_warps(d)
        rotary = dict(ROTARY=True, Q_PER_TOKEN=True, INTERLEAVED=False, HAS_BATCH_IDX=True, ROT_HALF=d // 2)
        for page in (0, 256):
            append.append(
                dict(
                    label=f"{cls} w{warps}" + (f" paged {page}" if page else ""),
                    constexprs=dict(HEAD_DIM=d, BLOCK_D=d, BLOCK_R=d // 2, **rotary, PAGE=page),
                    num_warps=warps,
                )
            )
        for c, page, mods in [(c, 0, False) for c in configs] + [(configs[0], 256, False), (configs[0], 0, True)]:
            decode.append(
                dict(
                    label=f"{cls} BLOCK_N={c.kwargs['BLOCK_N']} w{c.num_warps} s{c.num_stages}"
                    + (f" paged {page}" if page else "")
                    + (" softcap+alibi" if mods else ""),
                    constexprs=dict(
                        HEAD_DIM=d,
                        SPLIT=True,
                        HAS_BATCH_IDX=not page,
                        HAS_LEFTPAD=True,
                        PAGE=page,
                        BLOCK_M=16,
                        BLOCK_D=d,
                        SOFTCAP=mods,
                        ALIBI=mods,
                        **c.kwargs,
                    ),
                    num_warps=c.num_warps,
                    num_stages=c.num_stages,
                )
            )
        warps = combine_num_warps(128, d)
        combine.append(
            dict(label=f"{cls} w{warps}", constexprs=dict(HEAD_DIM=d, BLOCK_S=128, BLOCK_D=d), num_warps=warps)
        )
    return [
        dict(kernel=_decode_append_kernel, types=types, cases=append),
        dict(kernel=_decode_kernel, types={**types, "Out": "*fp32"}, cases=decode),  # Out: the splits' partials
        dict(kernel=_decode_combine_kernel, types=types, cases=combine),
    ]


SHIPPED_HEAD_DIMS = (64, 128, 256)
SHIPPED_BLOCK_M = (16, 32, 64)  # every block_m of `decode`: min(64, max(16, next_power_of_2(Tq * group)))


def shipped_tiles(arch: int, cls: str) -> list[triton.Config]:
    """The configs of a head-dim class that ship: the first of each BLOCK_N (the C++ registry keys a case by its
    constexprs, so two configs that differ only in warps or stages cannot both be found)."""
    tiles = {}
    for c in DECODE_CONFIGS[arch][cls]:
        tiles.setdefault(c.kwargs["BLOCK_N"], c)
    return list(tiles.values())


def _shipped(arch: int, dtype: str) -> list[dict]:
    """The common eager call: fp16/bf16, head dim 64, 128 or 256, no rotary, no cache_batch_idx, no block_table, no
    softcap or ALiBi; cache_leftpad optional; k/v appended or not; any Tq, group, window and split count (up to
    MAX_SPLITS). The append without rotary (COS and SIN are then the k_cache placeholder); the decode kernel for
    SPLIT on and off, with and without LEFTPAD, every BLOCK_M and shipped tile; the combine at every BLOCK_S. The
    placeholders BATCH_IDX, LEFTPAD and BLOCK_TABLE are cache_seqlens (int32), the last as a (B, 1) view whose
    stride_bt of 1 the JIT makes a constexpr: the cubins take it as an argument not assumed divisible by 16."""
    if dtype not in ("fp16", "bf16"):
        return []
    ints = {"SEQLENS": "*i32", "BATCH_IDX": "*i32", "LEFTPAD": "*i32", "BLOCK_TABLE": "*i32"}
    scalars = {"qk_scale": "fp32", "softcap_log2": "fp32", "Alibi": "*fp32", "LSE": "*fp32"}
    append, decode = [], {False: [], True: []}
    combine = []
    for d in SHIPPED_HEAD_DIMS:
        cls = head_dim_class(d)
        warps = append_num_warps(d)
        flags = dict(ROTARY=False, Q_PER_TOKEN=False, INTERLEAVED=False, HAS_BATCH_IDX=False, PAGE=0)
        append.append(
            dict(
                label=f"{cls} w{warps}",
                constexprs=dict(HEAD_DIM=d, ROT_HALF=0, BLOCK_D=d, BLOCK_R=1, **flags),
                num_warps=warps,
            )
        )
        for split in (False, True):
            for leftpad in (False, True):
                for block_m in SHIPPED_BLOCK_M:
                    for c in shipped_tiles(arch, cls):
                        constexprs = dict(HEAD_DIM=d, SPLIT=split, HAS_BATCH_IDX=False, HAS_LEFTPAD=leftpad, PAGE=0)
                        constexprs.update(BLOCK_M=block_m, BLOCK_D=d, SOFTCAP=False, ALIBI=False, **c.kwargs)
                        label = f"{cls} m{block_m} BLOCK_N={c.kwargs['BLOCK_N']} w{c.num_warps} s{c.num_stages}"
                        label += (" split" if split else "") + (" leftpad" if leftpad else "")
                        decode[split].append(
                            dict(label=label, constexprs=constexprs, num_warps=c.num_warps, num_stages=c.num_stages)
                        )
        for block_s in (1 << i for i in range(1, MAX_SPLITS.bit_length())):  # 2, 4, ..., MAX_SPLITS
            warps = combine_num_warps(block_s, d)
            constexprs = dict(HEAD_DIM=d, BLOCK_S=block_s, BLOCK_D=d)
            combine.append(dict(label=f"{cls} s{block_s} w{warps}", constexprs=constexprs, num_warps=warps))
    same = {"COS": f"*{dtype}", "SIN": f"*{dtype}"}  # the k_cache placeholder
    append_divisible = _divisible(_decode_append_kernel, append[0]["constexprs"])
    decode_divisible = _divisible(_decode_kernel, decode[False][0]["constexprs"])
    return [
        dict(kernel=_decode_append_kernel, types={**ints, **same}, divisible=append_divisible, cases=append),
        dict(kernel=_decode_kernel, types=ints | scalars, divisible=decode_divisible, cases=decode[False]),
        # Out: the splits' fp32 partials
        dict(
            kernel=_decode_kernel,
            types={**ints, **scalars, "Out": "*fp32"},
            divisible=decode_divisible,
            cases=decode[True],
        ),
        dict(
            kernel=_decode_combine_kernel, types={"O_PART": "*fp32", "LSE_PART": "*fp32", "LSE": "*fp32"}, cases=combine
        ),
    ]


def _divisible(kernel, constexprs: dict) -> list[str]:
    """tools/aot.py's default (every pointer and every stride_* but the logsumexp's, stride_l*) less stride_bt."""
    return [
        n
        for n in kernel.arg_names
        if n not in constexprs
        and n != "stride_bt"
        and (n[0].isupper() or (n.startswith("stride_") and not n.startswith("stride_l")))
    ]
