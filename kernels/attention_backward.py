"""FlashAttention-2's backward in Triton, which recomputes P from the forward's logsumexp: delta = rowsum(dO * O),
then dK/dV per key block, with dQ either added by float32 atomics from that same kernel (5 matmuls per query/key tile
pair; run-to-run nondeterministic in its last bits) or computed by its own kernel, which recomputes S and dP (7
matmuls, deterministic). Which one runs is the GPU's to time (PlanTuner); deterministic=True takes the second.

Layouts, masks and units as in kernels/attention.py. GQA: the dK/dV program of a K/V head loops over its GROUP query
heads, so dK/dV are reduced in registers, without atomics. Tested in tests/test_attention.py, compiled ahead of time
per config in tests/test_kernels_compile.py, timed in benchmarks/bench_attention.py.
"""

import torch
import triton
import triton.language as tl

from ._attention_configs import (
    DENSE_ONLY,
    DKDV_CONFIGS,
    DKDV_DQ_CONFIGS,
    DQ_CONFIGS,
    UNSHIPPED_VARLEN,
    UNSHIPPED_VARLEN_DROPOUT,
    head_dim_class,
    one_tile,
    takes_dropout,
)
from ._attention_dropout import dropout_args, keep_tile
from ._attention_launch import (
    AOT_HEAD_DIMS,
    AOT_TYPES,
    INTERPRETING,
    LOG2E,
    aot_cases,
    aot_launch,
    autotuned,
    bth_strides,
    ensure_scratch_allocator,
    full_tiles,
    launch_params,
    lse_strides,
    score_modifiers,
    this_machine,
    tma_aligned,
)
from ._attention_tiles import (
    alibi_slope_log2,
    kv_bases,
    load_tile,
    modified_scores,
    one_key_rows,
    q_program,
    sequence,
    tile_range,
    tma_rows,
    tma_start,
)
from ._launch import PlanTuner, cdiv, next_power_of_2


@triton.jit
def _attn_bwd_preprocess_kernel(
    Out,
    DOut,
    Delta,
    DLse,
    stride_ob,
    stride_ot,
    stride_oh,
    stride_db,
    stride_dt,
    stride_dh,
    stride_lb,
    stride_lh,
    CuQ,
    CuK,
    seqlen_q,
    seqlen_k,
    left,
    right,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    VARLEN: tl.constexpr,
    HAS_DLSE: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """delta = rowsum(dO * O) (minus dlse when the logsumexp has a gradient: d lse / d s = p). A row that sees one
    key takes rowsum 0, as the tiles take its dP (one_key_rows): its dS, p (dP - delta) with p = 1, is then exactly
    dlse, where dP - dO . O, two sums in different orders, would leave an ulp of dP."""
    pid_m, h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q_start, seqlen_q, _, seqlen_k, dlo, dhi = sequence(CuQ, CuK, b, seqlen_q, seqlen_k, left, right, VARLEN)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    mask = (offs_m[:, None] < seqlen_q) & (offs_d[None, :] < HEAD_DIM)
    rows = (q_start + offs_m).to(tl.int64)
    # int64 head index too: dO from an SDPA-layout view has stride_dh = T * D, and H * T * D may pass 2**31.
    b64, h64 = b.to(tl.int64), h.to(tl.int64)
    o = tl.load(
        Out + b64 * stride_ob + h64 * stride_oh + rows[:, None] * stride_ot + offs_d[None, :], mask=mask, other=0.0
    ).to(tl.float32)
    do = tl.load(
        DOut + b64 * stride_db + h64 * stride_dh + rows[:, None] * stride_dt + offs_d[None, :], mask=mask, other=0.0
    ).to(tl.float32)
    delta = tl.where(one_key_rows(offs_m, seqlen_k, dlo, dhi), 0.0, tl.sum(o * do, 1))
    l_offs = b64 * stride_lb + h64 * stride_lh + rows
    if HAS_DLSE:
        delta -= tl.load(DLse + l_offs, mask=offs_m < seqlen_q, other=0.0)
    tl.store(Delta + l_offs, delta, mask=offs_m < seqlen_q)


@triton.jit
def _dkdv_step(
    dk,
    dv,
    k,
    v,
    q_t,
    do,
    lse_row,
    delta_row,
    offs_n,
    offs_m,
    seqlen_q,
    seqlen_k,
    dlo,
    dhi,
    scale,
    scale_log2,
    MASKED: tl.constexpr,
    ATOMIC_DQ: tl.constexpr,
    seed,
    offset,
    bh,
    start_n,
    threshold,
    dropout_scale,
    DROPOUT: tl.constexpr,
    q_off,
    softcap_log2,
    slope_log2,
    SOFTCAP: tl.constexpr,
    ALIBI: tl.constexpr,
):
    """One query tile folded into the (BLOCK_N, D) dK and dV: q_t (D, BLOCK_M) its queries, do (BLOCK_M, D) their
    output gradients, lse_row / delta_row pointers to their logsumexp (natural units) and delta at row 0. Returns
    (dk, dv, dq): with ATOMIC_DQ, dq is this key block's share of the tile's dQ, dS K (BLOCK_M, D), for the caller
    to add to the others' (scaled, and then so is dK); otherwise 0. DROPOUT: the forward's mask Z of head row bh,
    regenerated: dV from P Z / p_keep, dP through Z too. A row that sees one key (one_key_rows) takes p = 1 and
    dP = 0, the preprocess's rowsum, so that dS = dlse exactly; such rows come only in MASKED tiles (an unmasked
    tile's rows see every key of the block, and the caller masks a block of one key throughout)."""
    if MASKED:
        lse = tl.load(lse_row + offs_m, mask=offs_m < seqlen_q, other=float("inf"))
        delta = tl.load(delta_row + offs_m, mask=offs_m < seqlen_q, other=0.0)
    else:
        lse = tl.load(lse_row + offs_m)
        delta = tl.load(delta_row + offs_m)
    s_t = tl.dot(k, q_t) * scale_log2  # (BLOCK_N, BLOCK_M)
    s_t, dcap = modified_scores(s_t, offs_m[None, :] + q_off, offs_n[:, None], softcap_log2, slope_log2, SOFTCAP, ALIBI)
    p_t = tl.math.exp2(s_t - lse[None, :] * LOG2E)
    if MASKED:
        diag = offs_n[:, None] - offs_m[None, :]
        keep = (offs_m[None, :] < seqlen_q) & (diag >= dlo) & (diag <= dhi)
        if ATOMIC_DQ:  # key rows past the sequence (k = 0) must add nothing to dQ: exp(-lse) may be inf, inf * 0 NaN
            keep = keep & (offs_n[:, None] < seqlen_k)
        one_key = one_key_rows(offs_m, seqlen_k, dlo, dhi)[None, :]
        p_t = tl.where(keep, tl.where(one_key, 1.0, p_t), 0.0)
    if DROPOUT:
        BLOCK_M: tl.constexpr = offs_m.shape[0]
        BLOCK_N: tl.constexpr = offs_n.shape[0]
        kept = tl.trans(keep_tile(seed, offset, bh, offs_m, start_n, threshold, BLOCK_M, BLOCK_N))  # (BLOCK_N, BLOCK_M)
        # The mask rides in p's sign across the dV product, so that no bool tile stays live beside the accumulators
        # (it cost 24 B of spills at d128 64 x 64 on sm_90); a dropped p of 0 reads as kept, and adds 0 either way.
        p_t = tl.where(kept, p_t, -p_t)
        dv += tl.dot((tl.maximum(p_t, 0.0) * dropout_scale).to(do.dtype), do)
        dp_scale = dropout_scale
        if MASKED:  # 0 for a one-key row's dP, in the scale (a select after it spilled 8 B at d128 32 x 128, sm_90)
            dp_scale = tl.where(one_key_rows(offs_m, seqlen_k, dlo, dhi), 0.0, dropout_scale)[None, :]
        dp_t = tl.where(p_t >= 0.0, tl.dot(v, tl.trans(do)) * dp_scale, 0.0)  # (BLOCK_N, BLOCK_M)
        p_t = tl.abs(p_t)
    else:
        dv += tl.dot(p_t.to(do.dtype), do)
        dp_t = tl.dot(v, tl.trans(do))
        if MASKED:
            dp_t = tl.where(one_key_rows(offs_m, seqlen_k, dlo, dhi)[None, :], 0.0, dp_t)
    ds_t = p_t * (dp_t - delta[None, :])  # (BLOCK_N, BLOCK_M)
    if SOFTCAP:  # through the cap: d(softcap * tanh(x / softcap)) / dx = 1 - tanh^2
        ds_t = ds_t * dcap
    dq = 0.0
    if ATOMIC_DQ:  # dQ's partial sums leave the program, so the scale goes in here, once for both
        ds_t = (ds_t * scale).to(q_t.dtype)
        if q_t.shape[1] < 64:  # as K^T dS (M = D) a 32-row tile's product runs on wgmma, whose M is 64, not mma.sync
            dq = tl.trans(tl.dot(tl.trans(k), ds_t))  # (BLOCK_M, HEAD_DIM_PAD)
        else:
            dq = tl.dot(tl.trans(ds_t), k)
    dk += tl.dot(ds_t.to(q_t.dtype), tl.trans(q_t))
    return dk, dv, dq


@triton.jit
def _dkdv_tiles(
    dk,
    dv,
    k,
    v,
    q_base,
    do_base,
    lse_base,
    delta_base,
    dq_base,
    stride_qt,
    stride_qh,
    stride_dt,
    stride_dh,
    stride_lh,
    stride_dqt,
    stride_dqh,
    offs_n,
    offs_d,
    lo,
    hi,
    seqlen_q,
    seqlen_k,
    dlo,
    dhi,
    scale,
    scale_log2,
    MASKED: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PAD_D: tl.constexpr,
    UPCAST: tl.constexpr,
    GROUP: tl.constexpr,
    ATOMIC_DQ: tl.constexpr,
    BLOCK_M: tl.constexpr,
    seed,
    offset,
    bh,
    start_n,
    threshold,
    dropout_scale,
    DROPOUT: tl.constexpr,
    q_off,
    softcap_log2,
    alibi_base,
    SOFTCAP: tl.constexpr,
    ALIBI: tl.constexpr,
):
    """Query tiles [lo, hi) of each of the GROUP query heads that share this K/V head, in one flat loop. A loop over
    heads around the tile loop spilled 88-248 B at d128 with GROUP 2 (AOT, sm_90, 64x64 and 64x128 tiles, 8 warps)
    where GROUP 1 did not; flat, the two compile alike."""
    n_tiles = tl.cdiv(hi - lo, BLOCK_M)
    for it in range(GROUP * n_tiles):
        g = it // n_tiles
        # int32 head offsets: attention_backward keeps (GROUP - 1) * stride_qh / stride_dh under 2**31 (int64 here
        # cost 13 registers and a 16 B spill at d128 64x64 under triton 3.6.0).
        q_g, do_g = q_base + g * stride_qh, do_base + g * stride_dh
        start_m = lo + (it - g * n_tiles) * BLOCK_M
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q_t = load_tile(
            q_g + offs_m[None, :] * stride_qt + offs_d[:, None],
            offs_m[None, :] < seqlen_q,
            offs_d[:, None] < HEAD_DIM,
            MASKED,
            PAD_D,
            UPCAST,
        )  # (HEAD_DIM_PAD, BLOCK_M)
        do = load_tile(
            do_g + offs_m[:, None] * stride_dt + offs_d[None, :],
            offs_m[:, None] < seqlen_q,
            offs_d[None, :] < HEAD_DIM,
            MASKED,
            PAD_D,
            UPCAST,
        )  # (BLOCK_M, HEAD_DIM_PAD)
        dk, dv, dq = _dkdv_step(
            dk,
            dv,
            k,
            v,
            q_t,
            do,
            lse_base + g * stride_lh,
            delta_base + g * stride_lh,
            offs_n,
            offs_m,
            seqlen_q,
            seqlen_k,
            dlo,
            dhi,
            scale,
            scale_log2,
            MASKED,
            ATOMIC_DQ,
            seed,
            offset,
            bh + g,
            start_n,
            threshold,
            dropout_scale,
            DROPOUT,
            q_off,
            softcap_log2,
            tl.load(alibi_base + g) * LOG2E if ALIBI else 0.0,
            SOFTCAP,
            ALIBI,
        )
        if ATOMIC_DQ:
            dq_ptrs = dq_base + g * stride_dqh + offs_m[:, None] * stride_dqt + offs_d[None, :]
            if MASKED or PAD_D:
                tl.atomic_add(
                    dq_ptrs, dq, mask=(offs_m[:, None] < seqlen_q) & (offs_d[None, :] < HEAD_DIM), sem="relaxed"
                )
            else:
                tl.atomic_add(dq_ptrs, dq, sem="relaxed")
    return dk, dv


@triton.jit
def _dkdv_specialized(
    dk,
    dv,
    k,
    v,
    q_base,
    do_base,
    lse_base,
    delta_base,
    stride_qt,
    stride_qh,
    stride_dt,
    stride_dh,
    stride_lh,
    offs_n,
    lo,
    hi,
    seqlen_q,
    seqlen_k,
    dlo,
    dhi,
    scale_log2,
    MASKED: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    UPCAST: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    q_off,
    softcap_log2,
    alibi_base,
    SOFTCAP: tl.constexpr,
    ALIBI: tl.constexpr,
):
    """_dkdv_tiles' flat (head, query tile) loop for a WARP_SPECIALIZE config: Q and dO tiles of the GROUP heads by
    TMA from (GROUP, seqlen_q, D) descriptors that end at the sequence (zero past it). lse and delta stay pointer
    loads: a descriptor's last-dimension offset must be a multiple of 16 bytes, and a packed sequence's rows of 4-byte
    values start anywhere."""
    rows_q = tma_rows(seqlen_q)  # no query tile is visited when seqlen_q is 0
    q_desc = tl.make_tensor_descriptor(
        q_base, shape=[GROUP, rows_q, HEAD_DIM], strides=[stride_qh, stride_qt, 1], block_shape=[1, BLOCK_M, HEAD_DIM]
    )
    do_desc = tl.make_tensor_descriptor(
        do_base, shape=[GROUP, rows_q, HEAD_DIM], strides=[stride_dh, stride_dt, 1], block_shape=[1, BLOCK_M, HEAD_DIM]
    )
    n_tiles = tl.cdiv(hi - lo, BLOCK_M)
    for it in tl.range(0, GROUP * n_tiles, warp_specialize=True):
        g = it // n_tiles
        start_m = lo + (it - g * n_tiles) * BLOCK_M
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = q_desc.load([g, start_m, 0]).reshape(BLOCK_M, HEAD_DIM)
        do = do_desc.load([g, start_m, 0]).reshape(BLOCK_M, HEAD_DIM)
        if UPCAST:
            q, do = q.to(tl.float32), do.to(tl.float32)
        dk, dv, _ = _dkdv_step(
            dk,
            dv,
            k,
            v,
            tl.trans(q),
            do,
            lse_base + g * stride_lh,
            delta_base + g * stride_lh,
            offs_n,
            offs_m,
            seqlen_q,
            seqlen_k,
            dlo,
            dhi,
            1.0,
            scale_log2,
            MASKED,
            False,
            0,
            0,
            0,
            0,
            0,
            1.0,
            False,
            q_off,
            softcap_log2,
            tl.load(alibi_base + g) * LOG2E if ALIBI else 0.0,
            SOFTCAP,
            ALIBI,
        )
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q,
    K,
    V,
    DOut,
    Lse,
    Delta,
    DK,
    DV,
    DQAcc,
    CuQ,
    CuK,
    stride_qb,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_db,
    stride_dt,
    stride_dh,
    stride_lb,
    stride_lh,
    stride_dkb,
    stride_dkt,
    stride_dkh,
    stride_dvb,
    stride_dvt,
    stride_dvh,
    stride_dqb,
    stride_dqt,
    stride_dqh,
    seqlen_q,
    seqlen_k,
    scale,
    scale_log2,
    left,
    right,
    tune_seqlen,
    tune_left,
    tune_right,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    VARLEN: tl.constexpr,
    UPCAST: tl.constexpr,
    TMA_ALIGNED: tl.constexpr,
    FULL_TILES: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr,
    ATOMIC_DQ: tl.constexpr,
    Seed=None,
    dropout_threshold=0,
    dropout_scale=1.0,
    DROPOUT: tl.constexpr = False,
    softcap_log2=0.0,
    Alibi=None,
    stride_ab=0,
    SOFTCAP: tl.constexpr = False,
    ALIBI: tl.constexpr = False,
):
    """dK and dV of one BLOCK_N-key block; with ATOMIC_DQ, dQ too, added tile by tile into the zeroed float32 DQAcc
    (FlashAttention-2's backward: 5 matmuls per tile pair, where this kernel and _attn_bwd_dq_kernel take 7).
    DROPOUT: the forward's mask, regenerated from Seed (kernels/_attention_dropout.py)."""
    pid_n, kvh, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q_start, seqlen_q, k_start, seqlen_k, dlo, dhi = sequence(CuQ, CuK, b, seqlen_q, seqlen_k, left, right, VARLEN)
    start_n = pid_n * BLOCK_N
    b64, kvh64 = b.to(tl.int64), kvh.to(tl.int64)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    PAD_D: tl.constexpr = HEAD_DIM != HEAD_DIM_PAD
    k_base, v_base = kv_bases(
        K, V, b64, kvh64, k_start, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh
    )
    h64 = kvh64 * GROUP  # the first of the GROUP query heads that share this K/V head: dK/dV reduced here, no atomics
    q_base = Q + b64 * stride_qb + h64 * stride_qh + q_start.to(tl.int64) * stride_qt
    do_base = DOut + b64 * stride_db + h64 * stride_dh + q_start.to(tl.int64) * stride_dt
    lse_base = Lse + b64 * stride_lb + h64 * stride_lh + q_start
    delta_base = Delta + b64 * stride_lb + h64 * stride_lh + q_start
    dq_base = DQAcc  # None unless ATOMIC_DQ
    if ATOMIC_DQ:
        dq_base = DQAcc + b64 * stride_dqb + h64 * stride_dqh + q_start.to(tl.int64) * stride_dqt
    dk_scale = 1.0 if ATOMIC_DQ else scale  # ATOMIC_DQ scales dS, so dK, in the loop
    alibi_base = Alibi  # None unless ALIBI: the slopes of the GROUP query heads from h64
    if ALIBI:
        alibi_base = Alibi + b64 * stride_ab + h64
    q_off = seqlen_k - seqlen_q  # ALiBi's query position is i + Tk - Tq
    dk = tl.zeros([BLOCK_N, HEAD_DIM_PAD], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM_PAD], tl.float32)
    if WARP_SPECIALIZE:  # no early return (see the forward): a block past a short packed sequence sees no query
        tl.static_assert(TMA_ALIGNED and not PAD_D, "WARP_SPECIALIZE needs TMA-aligned inputs, a power-of-2 head dim")
        # dQ's partial sums span both computing warpgroups' keys, which Triton's pass cannot split (an unreachable in
        # WSDataPartition: pointer atomics under 3.7.1, TMA reduce-add under 3.6.0 and 3.7.1; benchmarks/NOTES.md)
        tl.static_assert(not ATOMIC_DQ, "ATOMIC_DQ takes the pointer loop")
        tl.static_assert(not DROPOUT, "dropout takes the pointer loop")
        queries = tl.where(start_n < seqlen_k, seqlen_q, 0)
        lo, a, c, hi = tile_range(start_n, tl.minimum(start_n + BLOCK_N, seqlen_k) - 1, -dhi, -dlo, queries, BLOCK_M)
        rows_k, k_row = tma_rows(seqlen_k), tma_start(seqlen_k, start_n)
        k_desc = tl.make_tensor_descriptor(
            k_base, shape=[rows_k, HEAD_DIM], strides=[stride_kt, 1], block_shape=[BLOCK_N, HEAD_DIM]
        )
        v_desc = tl.make_tensor_descriptor(
            v_base, shape=[rows_k, HEAD_DIM], strides=[stride_vt, 1], block_shape=[BLOCK_N, HEAD_DIM]
        )
        k, v = k_desc.load([k_row, 0]), v_desc.load([k_row, 0])  # (BLOCK_N, HEAD_DIM), zero past seqlen_k
        if UPCAST:
            k, v = k.to(tl.float32), v.to(tl.float32)
        dk, dv = _dkdv_specialized(
            dk,
            dv,
            k,
            v,
            q_base,
            do_base,
            lse_base,
            delta_base,
            stride_qt,
            stride_qh,
            stride_dt,
            stride_dh,
            stride_lh,
            offs_n,
            lo,
            hi,
            seqlen_q,
            seqlen_k,
            dlo,
            dhi,
            scale_log2,
            not FULL_TILES,
            HEAD_DIM,
            UPCAST,
            GROUP,
            BLOCK_M,
            q_off,
            softcap_log2,
            alibi_base,
            SOFTCAP,
            ALIBI,
        )
        dk_desc = tl.make_tensor_descriptor(
            DK + b64 * stride_dkb + kvh64 * stride_dkh + k_start.to(tl.int64) * stride_dkt,
            shape=[rows_k, HEAD_DIM],
            strides=[stride_dkt, 1],
            block_shape=[BLOCK_N, HEAD_DIM],
        )
        dv_desc = tl.make_tensor_descriptor(
            DV + b64 * stride_dvb + kvh64 * stride_dvh + k_start.to(tl.int64) * stride_dvt,
            shape=[rows_k, HEAD_DIM],
            strides=[stride_dvt, 1],
            block_shape=[BLOCK_N, HEAD_DIM],
        )
        dk_desc.store([k_row, 0], (dk * scale).to(DK.dtype.element_ty))  # rows past seqlen_k are not written
        dv_desc.store([k_row, 0], dv.to(DV.dtype.element_ty))
        return
    if start_n >= seqlen_k:
        return
    seed, offset, bh = 0, 0, 0
    if DROPOUT:  # the mask's key and counter: bh + g = b * H + h for query head h = kvh * GROUP + g
        seed, offset = tl.load(Seed), tl.load(Seed + 1)
        bh = (b64 * tl.num_programs(1) * GROUP + h64).to(tl.int32)
    row_ok, col_ok = offs_n[:, None] < seqlen_k, offs_d[None, :] < HEAD_DIM
    k_rows = (k_start + offs_n).to(tl.int64)[:, None]
    k = load_tile(
        K + b64 * stride_kb + kvh64 * stride_kh + k_rows * stride_kt + offs_d[None, :],
        row_ok,
        col_ok,
        True,
        PAD_D,
        UPCAST,
    )  # (BLOCK_N, HEAD_DIM_PAD)
    v = load_tile(
        V + b64 * stride_vb + kvh64 * stride_vh + k_rows * stride_vt + offs_d[None, :],
        row_ok,
        col_ok,
        True,
        PAD_D,
        UPCAST,
    )
    # The queries that see keys start_n..: j - i in [dlo, dhi] means i - j in [-dhi, -dlo].
    lo, a, c, hi = tile_range(start_n, tl.minimum(start_n + BLOCK_N, seqlen_k) - 1, -dhi, -dlo, seqlen_q, BLOCK_M)
    # A block past the sequence's last key masks every tile with ATOMIC_DQ, so that its zero rows add nothing to dQ;
    # else a block of one key does, so that its queries that see no other key (one_key_rows) reach the masked step.
    masked = start_n + BLOCK_N > seqlen_k if ATOMIC_DQ else start_n + 1 == seqlen_k
    a = tl.where(masked, hi, a)
    c = tl.where(masked, hi, c)
    dk, dv = _dkdv_tiles(
        dk,
        dv,
        k,
        v,
        q_base,
        do_base,
        lse_base,
        delta_base,
        dq_base,
        stride_qt,
        stride_qh,
        stride_dt,
        stride_dh,
        stride_lh,
        stride_dqt,
        stride_dqh,
        offs_n,
        offs_d,
        lo,
        a,
        seqlen_q,
        seqlen_k,
        dlo,
        dhi,
        scale,
        scale_log2,
        True,
        HEAD_DIM,
        PAD_D,
        UPCAST,
        GROUP,
        ATOMIC_DQ,
        BLOCK_M,
        seed,
        offset,
        bh,
        start_n,
        dropout_threshold,
        dropout_scale,
        DROPOUT,
        q_off,
        softcap_log2,
        alibi_base,
        SOFTCAP,
        ALIBI,
    )
    dk, dv = _dkdv_tiles(
        dk,
        dv,
        k,
        v,
        q_base,
        do_base,
        lse_base,
        delta_base,
        dq_base,
        stride_qt,
        stride_qh,
        stride_dt,
        stride_dh,
        stride_lh,
        stride_dqt,
        stride_dqh,
        offs_n,
        offs_d,
        a,
        c,
        seqlen_q,
        seqlen_k,
        dlo,
        dhi,
        scale,
        scale_log2,
        False,
        HEAD_DIM,
        PAD_D,
        UPCAST,
        GROUP,
        ATOMIC_DQ,
        BLOCK_M,
        seed,
        offset,
        bh,
        start_n,
        dropout_threshold,
        dropout_scale,
        DROPOUT,
        q_off,
        softcap_log2,
        alibi_base,
        SOFTCAP,
        ALIBI,
    )
    dk, dv = _dkdv_tiles(
        dk,
        dv,
        k,
        v,
        q_base,
        do_base,
        lse_base,
        delta_base,
        dq_base,
        stride_qt,
        stride_qh,
        stride_dt,
        stride_dh,
        stride_lh,
        stride_dqt,
        stride_dqh,
        offs_n,
        offs_d,
        c,
        hi,
        seqlen_q,
        seqlen_k,
        dlo,
        dhi,
        scale,
        scale_log2,
        True,
        HEAD_DIM,
        PAD_D,
        UPCAST,
        GROUP,
        ATOMIC_DQ,
        BLOCK_M,
        seed,
        offset,
        bh,
        start_n,
        dropout_threshold,
        dropout_scale,
        DROPOUT,
        q_off,
        softcap_log2,
        alibi_base,
        SOFTCAP,
        ALIBI,
    )
    mask = row_ok & col_ok
    tl.store(
        DK + b64 * stride_dkb + kvh64 * stride_dkh + k_rows * stride_dkt + offs_d[None, :],
        (dk * dk_scale).to(DK.dtype.element_ty),
        mask=mask,
    )
    tl.store(
        DV + b64 * stride_dvb + kvh64 * stride_dvh + k_rows * stride_dvt + offs_d[None, :],
        dv.to(DV.dtype.element_ty),
        mask=mask,
    )


@triton.jit
def _dq_tiles(
    dq,
    q,
    do,
    lse,
    delta,
    k_base,
    v_base,
    stride_kt,
    stride_vt,
    offs_m,
    offs_d,
    lo,
    hi,
    seqlen_k,
    dlo,
    dhi,
    scale_log2,
    MASKED: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PAD_D: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr,
    seed,
    offset,
    bh,
    threshold,
    dropout_scale,
    DROPOUT: tl.constexpr,
    q_off,
    softcap_log2,
    slope_log2,
    SOFTCAP: tl.constexpr,
    ALIBI: tl.constexpr,
):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_t = load_tile(
            k_base + offs_n[None, :] * stride_kt + offs_d[:, None],
            offs_n[None, :] < seqlen_k,
            offs_d[:, None] < HEAD_DIM,
            MASKED,
            PAD_D,
            UPCAST,
        )  # (HEAD_DIM_PAD, BLOCK_N)
        v_t = load_tile(
            v_base + offs_n[None, :] * stride_vt + offs_d[:, None],
            offs_n[None, :] < seqlen_k,
            offs_d[:, None] < HEAD_DIM,
            MASKED,
            PAD_D,
            UPCAST,
        )
        s = tl.dot(q, k_t) * scale_log2  # (BLOCK_M, BLOCK_N)
        s, dcap = modified_scores(s, offs_m[:, None] + q_off, offs_n[None, :], softcap_log2, slope_log2, SOFTCAP, ALIBI)
        p = tl.math.exp2(s - lse[:, None])  # lse in log2 units
        if MASKED:
            diag = offs_n[None, :] - offs_m[:, None]
            one_key = one_key_rows(offs_m, seqlen_k, dlo, dhi)[:, None]
            p = tl.where((offs_n[None, :] < seqlen_k) & (diag >= dlo) & (diag <= dhi), tl.where(one_key, 1.0, p), 0.0)
        dp = tl.dot(do, v_t)  # (BLOCK_M, BLOCK_N)
        if DROPOUT:  # dP through the forward's mask Z / p_keep
            keep = keep_tile(seed, offset, bh, offs_m, start_n, threshold, offs_m.shape[0], BLOCK_N)
            dp = tl.where(keep, dp * dropout_scale, 0.0)
        if MASKED:  # a row that sees one key: p = 1 and dP = 0, as in _dkdv_step
            dp = tl.where(one_key_rows(offs_m, seqlen_k, dlo, dhi)[:, None], 0.0, dp)
        ds = p * (dp - delta[:, None])
        if SOFTCAP:  # through the cap, as in _dkdv_step
            ds = ds * dcap
        dq += tl.dot(ds.to(k_t.dtype), tl.trans(k_t))
    return dq


@triton.jit
def _attn_bwd_dq_kernel(
    Q,
    K,
    V,
    DOut,
    Lse,
    Delta,
    DQ,
    CuQ,
    CuK,
    stride_qb,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_db,
    stride_dt,
    stride_dh,
    stride_lb,
    stride_lh,
    stride_dqb,
    stride_dqt,
    stride_dqh,
    seqlen_q,
    seqlen_k,
    scale,
    scale_log2,
    left,
    right,
    tune_seqlen,
    tune_left,
    tune_right,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    VARLEN: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    Seed=None,
    dropout_threshold=0,
    dropout_scale=1.0,
    DROPOUT: tl.constexpr = False,
    softcap_log2=0.0,
    Alibi=None,
    stride_ab=0,
    SOFTCAP: tl.constexpr = False,
    ALIBI: tl.constexpr = False,
):
    b64, h64, kvh64, q_start, seqlen_q, k_start, seqlen_k, dlo, dhi, start_m, offs_m, offs_d = q_program(
        CuQ, CuK, seqlen_q, seqlen_k, left, right, GROUP, HEAD_DIM_PAD, VARLEN, BLOCK_M
    )
    if start_m >= seqlen_q:
        return
    seed, offset, bh = 0, 0, 0
    if DROPOUT:  # the mask's key and counter (kernels/_attention_dropout.py): b * H + h, H the grid's second axis
        seed, offset, bh = tl.load(Seed), tl.load(Seed + 1), (b64 * tl.num_programs(1) + h64).to(tl.int32)
    row_ok, col_ok = offs_m[:, None] < seqlen_q, offs_d[None, :] < HEAD_DIM
    q_rows = (q_start + offs_m).to(tl.int64)[:, None]
    PAD_D: tl.constexpr = HEAD_DIM != HEAD_DIM_PAD
    q = load_tile(
        Q + b64 * stride_qb + h64 * stride_qh + q_rows * stride_qt + offs_d[None, :],
        row_ok,
        col_ok,
        True,
        PAD_D,
        UPCAST,
    )  # (BLOCK_M, HEAD_DIM_PAD)
    do = load_tile(
        DOut + b64 * stride_db + h64 * stride_dh + q_rows * stride_dt + offs_d[None, :],
        row_ok,
        col_ok,
        True,
        PAD_D,
        UPCAST,
    )
    l_offs = b64 * stride_lb + h64 * stride_lh + q_start + offs_m
    lse = tl.load(Lse + l_offs, mask=offs_m < seqlen_q, other=float("inf")) * LOG2E
    delta = tl.load(Delta + l_offs, mask=offs_m < seqlen_q, other=0.0)
    k_base, v_base = kv_bases(
        K, V, b64, kvh64, k_start, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh
    )
    lo, a, c, hi = tile_range(start_m, tl.minimum(start_m + BLOCK_M, seqlen_q) - 1, dlo, dhi, seqlen_k, BLOCK_N)
    dq = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)
    slope_log2 = alibi_slope_log2(Alibi, b64, h64, stride_ab, ALIBI)
    dq = _dq_tiles(
        dq,
        q,
        do,
        lse,
        delta,
        k_base,
        v_base,
        stride_kt,
        stride_vt,
        offs_m,
        offs_d,
        lo,
        a,
        seqlen_k,
        dlo,
        dhi,
        scale_log2,
        True,
        HEAD_DIM,
        PAD_D,
        UPCAST,
        BLOCK_N,
        seed,
        offset,
        bh,
        dropout_threshold,
        dropout_scale,
        DROPOUT,
        seqlen_k - seqlen_q,
        softcap_log2,
        slope_log2,
        SOFTCAP,
        ALIBI,
    )
    dq = _dq_tiles(
        dq,
        q,
        do,
        lse,
        delta,
        k_base,
        v_base,
        stride_kt,
        stride_vt,
        offs_m,
        offs_d,
        a,
        c,
        seqlen_k,
        dlo,
        dhi,
        scale_log2,
        False,
        HEAD_DIM,
        PAD_D,
        UPCAST,
        BLOCK_N,
        seed,
        offset,
        bh,
        dropout_threshold,
        dropout_scale,
        DROPOUT,
        seqlen_k - seqlen_q,
        softcap_log2,
        slope_log2,
        SOFTCAP,
        ALIBI,
    )
    dq = _dq_tiles(
        dq,
        q,
        do,
        lse,
        delta,
        k_base,
        v_base,
        stride_kt,
        stride_vt,
        offs_m,
        offs_d,
        c,
        hi,
        seqlen_k,
        dlo,
        dhi,
        scale_log2,
        True,
        HEAD_DIM,
        PAD_D,
        UPCAST,
        BLOCK_N,
        seed,
        offset,
        bh,
        dropout_threshold,
        dropout_scale,
        DROPOUT,
        seqlen_k - seqlen_q,
        softcap_log2,
        slope_log2,
        SOFTCAP,
        ALIBI,
    )
    tl.store(
        DQ + b64 * stride_dqb + h64 * stride_dqh + q_rows * stride_dqt + offs_d[None, :],
        (dq * scale).to(DQ.dtype.element_ty),
        mask=row_ok & col_ok,
    )


_attn_bwd_dkdv = autotuned(_attn_bwd_dkdv_kernel, this_machine(DKDV_CONFIGS))
_attn_bwd_dkdv_dq = autotuned(_attn_bwd_dkdv_kernel, this_machine(DKDV_DQ_CONFIGS), reset_to_zero=["DQAcc"])
_attn_bwd_dq = autotuned(_attn_bwd_dq_kernel, this_machine(DQ_CONFIGS))
_PREPROCESS_BLOCK_M = 32  # at 64, d256 o and dO tiles (fp32, 4 warps) spilled 24 bytes on sm_90
# The backward's dQ, per shape class: by atomics from the dK/dV kernel (5 matmuls per tile pair, run-to-run
# nondeterministic in the last bits, a float32 buffer of 2x dQ's bytes) or by its own kernel (7, deterministic),
# whichever the GPU times faster. Where nothing can be timed: the shape's earlier choice, else (the interpreter) the
# atomic plan, flash-attn's default.
DQ_BY_ATOMICS, DQ_BY_KERNEL = "atomic dQ", "dQ kernel"
_backward_plans = PlanTuner(default=DQ_BY_ATOMICS)


def attention_backward(
    do,
    q,
    k,
    v,
    out,
    lse,
    dlse,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    scale,
    left,
    right,
    deterministic=False,
    into=None,
    dropout_p=0.0,
    seed=None,
    softcap=0.0,
    alibi_slopes=None,
):
    """(dq, dk, dv), each contiguous and shaped like its input, or written into `into` (three tensors shaped like q,
    k, v, any strides: views of one packed gradient). dlse (like lse) or None. deterministic: dQ by its own kernel,
    bit-identical from run to run for the same tiles; otherwise by whichever of that and atomics is faster here.
    dropout_p and seed: the forward's (attention_forward), whose mask every kernel here regenerates. softcap and
    alibi_slopes as in the forward."""
    varlen, B, H, Hkv, cx, tune = launch_params(q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k, left, right)
    dropout = dropout_args(dropout_p, seed)
    flags, modifiers = score_modifiers(softcap, alibi_slopes)
    cx.update(flags)
    if do.stride(-1) != 1:
        do = do.contiguous()
    if (H // Hkv - 1) * max(q.stride(-2), do.stride(-2)) >= 2**31:  # _dkdv_tiles offsets heads in int32
        q, do = q.contiguous(), do.contiguous()  # only SDPA-layout views of millions of tokens: head stride D
    lse = lse.contiguous()
    delta = torch.empty_like(lse)
    dkdv_cx = {
        **cx,
        "TMA_ALIGNED": tma_aligned(q, k, v, do) and not dropout["DROPOUT"],  # dropout takes the pointer loop
        "FULL_TILES": full_tiles(varlen, max_seqlen_q, max_seqlen_k, left, right),
    }
    if dkdv_cx["TMA_ALIGNED"] and q.is_cuda:
        ensure_scratch_allocator()
    _attn_bwd_preprocess_kernel[(cdiv(max_seqlen_q, _PREPROCESS_BLOCK_M), H, B)](
        out,
        do,
        delta,
        None if dlse is None else dlse.contiguous(),
        *bth_strides(out, varlen),
        *bth_strides(do, varlen),
        *lse_strides(lse, varlen),
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        left,
        right,
        HEAD_DIM=cx["HEAD_DIM"],
        HEAD_DIM_PAD=cx["HEAD_DIM_PAD"],
        VARLEN=varlen,
        HAS_DLSE=dlse is not None,
        BLOCK_M=_PREPROCESS_BLOCK_M,
    )
    if into is None:
        dq_out, dk, dv = None, *(torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (k, v))
    else:
        dq_out, dk, dv = into
    common = (
        *bth_strides(q, varlen),
        *bth_strides(k, varlen),
        *bth_strides(v, varlen),
        *bth_strides(do, varlen),
        *lse_strides(lse, varlen),
    )
    scale_log2 = scale / softcap if softcap > 0.0 else scale * LOG2E.value  # with softcap: tanh's argument
    tail = (max_seqlen_q, max_seqlen_k, scale, scale_log2, left, right, *tune)
    grid_kv = lambda meta: (cdiv(max_seqlen_k, meta["BLOCK_N"]), Hkv, B)  # noqa: E731
    grid_q = lambda meta: (cdiv(max_seqlen_q, meta["BLOCK_M"]), H, B)  # noqa: E731
    dkdv_args = (q, k, v, do, lse, delta, dk, dv)
    dkdv_strides = (*common, *bth_strides(dk, varlen), *bth_strides(dv, varlen))

    def atomic_dq():
        dq_acc = torch.zeros(q.shape, dtype=torch.float32, device=q.device)  # contiguous, whatever q's strides
        _attn_bwd_dkdv_dq[grid_kv](
            *dkdv_args,
            dq_acc,
            cu_seqlens_q,
            cu_seqlens_k,
            *dkdv_strides,
            *bth_strides(dq_acc, varlen),
            *tail,
            **dkdv_cx,
            **dropout,
            **modifiers,
        )
        return dq_acc.to(q.dtype) if dq_out is None else dq_out.copy_(dq_acc)  # the cast is the one copy

    def separate_dq():
        _attn_bwd_dkdv[grid_kv](
            *dkdv_args,
            None,
            cu_seqlens_q,
            cu_seqlens_k,
            *dkdv_strides,
            0,
            0,
            0,
            *tail,
            **dkdv_cx,
            **dropout,
            **modifiers,
        )
        dq = torch.empty(q.shape, dtype=q.dtype, device=q.device) if dq_out is None else dq_out
        _attn_bwd_dq[grid_q](
            q,
            k,
            v,
            do,
            lse,
            delta,
            dq,
            cu_seqlens_q,
            cu_seqlens_k,
            *common,
            *bth_strides(dq, varlen),
            *tail,
            **cx,
            **dropout,
            **modifiers,
        )
        return dq

    if deterministic:
        return separate_dq(), dk, dv
    plans = {DQ_BY_ATOMICS: atomic_dq, DQ_BY_KERNEL: separate_dq}
    if dropout["DROPOUT"] and not takes_dropout(this_machine(DKDV_DQ_CONFIGS), cx["HEAD_DIM"]):
        return separate_dq(), dk, dv  # no atomic-dQ tile of this head dim takes dropout without spilling
    # B * Hkv: the dK/dV grid's width, which decides how well the atomic plan's single kernel fills the GPU
    key = (str(q.dtype), *tune, next_power_of_2(B * Hkv), dropout["DROPOUT"], *sorted(dkdv_cx.items()))
    timeable = q.is_cuda and not INTERPRETING and not torch.cuda.is_current_stream_capturing()
    return plans[_backward_plans.choose(key, plans, timeable)](), dk, dv


# ---- ahead-of-time compile (tools/aot.py) --------------------------------------------------------------------------


def aot_kernels(arch: int, dtype: str, shipped: bool = False) -> list[dict]:
    """shipped=True: the cubins of the C++ launch path (csrc/attention_backward_aot.cpp; fp16 and bf16 only, see
    _shipped).

    shipped=False, CI's compile check: the preprocess per head-dim class (a fixed launch), dK/dV under each config of
    both its tables (dQ by atomics or not) and dQ under each of its configs, for arch
    (kernels/_attention_launch.aot_cases)."""
    if shipped:
        return _shipped(arch, dtype)
    preprocess = [
        dict(label=f"{cls} w4", constexprs={**aot_launch(d, dtype), "BLOCK_M": _PREPROCESS_BLOCK_M}, num_warps=4)
        for cls, d in AOT_HEAD_DIMS.items()
    ]
    both = dict(dropout=True, modified=True)
    dkdv = aot_cases(DKDV_CONFIGS[arch], dtype, **both) + aot_cases(DKDV_DQ_CONFIGS[arch], dtype, **both)
    dq = aot_cases(DQ_CONFIGS[arch], dtype, **both)
    return [
        dict(kernel=_attn_bwd_preprocess_kernel, types=AOT_TYPES, cases=preprocess),
        dict(kernel=_attn_bwd_dkdv_kernel, types=AOT_TYPES, cases=dkdv),
        dict(kernel=_attn_bwd_dq_kernel, types=AOT_TYPES, cases=dq),
    ]


SHIPPED_HEAD_DIMS = (64, 96, 128, 256)
SHIPPED_GROUPS = (1, 2, 4, 8)  # GQA's H / Hkv: a constexpr of both tiles (the dK/dV program loops over the group)
SHIPPED_DROPOUT_HEAD_DIMS = (64, 128)  # dropout's cubins: not at 96 and 256, the build's budget (as the forward's)


def shipped_tiles(table_for_arch: dict, cls: str, dropout: bool = False) -> list[triton.Config]:
    """The configs of a head-dim class that ship, in the table's order: the first of each set of constexprs (the C++
    registry keys a case by its constexprs, so configs that differ only in warps or stages cannot both be found).
    dropout: those the pruner keeps for a DROPOUT launch (no warp-specialized ones, none marked no_dropout)."""
    tiles = {}
    for c in table_for_arch[cls]:
        if dropout and (c.kwargs.get("WARP_SPECIALIZE", False) or getattr(c, "no_dropout", False)):
            continue
        tiles.setdefault(tuple(sorted(c.kwargs.items())), c)
    return list(tiles.values())


def _shipped(arch: int, dtype: str) -> list[dict]:
    """The common eager calls of the backward: fp16/bf16, dense (B, T, H, D) or packed (total, H, D) tensors, head dim
    SHIPPED_HEAD_DIMS, GQA groups SHIPPED_GROUPS, any window (causal or not), no softcap or ALiBi; inputs that TMA could
    read (TMA_ALIGNED at a power-of-2 head dim: the C++ op copies any other; 96, padded to 128, takes no
    warp-specialized tile; a head dim of _attention_configs.ONE_TILE ships one tile per launch). The preprocess; dK/dV
    under each shipped tile of both its tables (dQ by atomics or not; the warp-specialized sm_90 tiles make their TMA
    descriptors in global scratch, which the C++ launcher allocates), with FULL_TILES off, and on too for the dense
    warp-specialized tiles (the only ones that read it: the pipelined tiles compile to the same code either way, and the
    C++ op launches their FULL_TILES=False cubin; packed calls never have it); dQ under each shipped tile. The dense
    cases first, then the packed ones (VARLEN, but the tiles that spill then: _attention_configs.DENSE_ONLY), labelled
    " varlen". Then dK/dV and dQ again with dropout at SHIPPED_DROPOUT_HEAD_DIMS (DROPOUT, labelled " dropout"), as
    attention_backward launches them: TMA_ALIGNED and FULL_TILES off, under the tiles the pruner keeps for it
    (shipped_tiles(dropout=True); packed, but the ones that spill then: _attention_configs.UNSHIPPED_VARLEN_DROPOUT; the
    preprocess takes no dropout). A launch kind left with no plain dK/dV or no dQ tile ships nothing
    (_attention_configs.UNSHIPPED_VARLEN: sm_90's packed d256), as the C++ op needs both plans. Last, the preprocess
    again with lse's gradient (HAS_DLSE, labelled " dlse"), the one kernel that reads it."""
    if dtype not in ("fp16", "bf16"):
        return []
    preprocess, dkdv, dq = [], [], []
    for dropout in (False, True):
        for varlen in (False, True):
            off = dict(VARLEN=varlen, UPCAST=False, DROPOUT=dropout, SOFTCAP=False, ALIBI=False)
            tag = " varlen" * varlen + " dropout" * dropout
            for d in SHIPPED_DROPOUT_HEAD_DIMS if dropout else SHIPPED_HEAD_DIMS:
                cls, dims = head_dim_class(d), dict(HEAD_DIM=d, HEAD_DIM_PAD=next_power_of_2(d))
                tma = not dropout and d == dims["HEAD_DIM_PAD"]  # dropout takes the pointer loop; TMA reads 2**n
                tables = {}
                for name, table in (("dkdv", DKDV_CONFIGS[arch]), ("dkdv_dq", DKDV_DQ_CONFIGS[arch])):
                    kept = [
                        c
                        for c in shipped_tiles(table, cls, dropout)
                        if (tma or not c.kwargs["WARP_SPECIALIZE"])  # warp-specialized only where TMA reads
                        and not (varlen and id(c) in DENSE_ONLY)  # spills packed: the JIT's pruner drops it too
                        and not (varlen and dropout and id(c) in UNSHIPPED_VARLEN_DROPOUT)  # spills: not shipped
                    ]
                    tables[name] = one_tile(d, arch, name, kept)
                dq_tiles = [
                    c
                    for c in shipped_tiles(DQ_CONFIGS[arch], cls, dropout)
                    if not (varlen and id(c) in UNSHIPPED_VARLEN)
                ]
                dq_tiles = one_tile(d, arch, "dq", dq_tiles)
                if not (tables["dkdv"] and dq_tiles):
                    continue  # no plain dK/dV or no dQ tile (sm_90 packed: d256, or dropout at 96, 128): the JIT's
                if not dropout:
                    constexprs = dict(**dims, VARLEN=varlen, HAS_DLSE=False, BLOCK_M=_PREPROCESS_BLOCK_M)
                    preprocess.append(dict(label=f"d{d} w4{tag}", constexprs=constexprs, num_warps=4))
                for group in SHIPPED_GROUPS:
                    for kept in tables.values():
                        for full in (False, True):
                            for c in kept:
                                if full and (varlen or not c.kwargs["WARP_SPECIALIZE"]):
                                    continue  # the pointer loop ignores FULL_TILES: its False cubin is the same code
                                constexprs = dict(
                                    GROUP=group, **dims, **off, TMA_ALIGNED=tma, FULL_TILES=full, **c.kwargs
                                )
                                label = _label(d, group, c, full) + tag
                                dkdv.append(dict(label=label, constexprs=constexprs, **_options(c)))
                    for c in dq_tiles:
                        constexprs = dict(GROUP=group, **dims, **off, **c.kwargs)
                        dq.append(dict(label=_label(d, group, c) + tag, constexprs=constexprs, **_options(c)))
    # the preprocess again with lse's gradient (HAS_DLSE), its only reader
    dlse = [
        {**c, "label": c["label"] + " dlse", "constexprs": {**c["constexprs"], "HAS_DLSE": True}} for c in preprocess
    ]
    return [
        dict(kernel=_attn_bwd_preprocess_kernel, types=AOT_TYPES, cases=preprocess + dlse),
        dict(kernel=_attn_bwd_dkdv_kernel, types=AOT_TYPES, cases=dkdv),
        dict(kernel=_attn_bwd_dq_kernel, types=AOT_TYPES, cases=dq),
    ]


def _label(head_dim: int, group: int, c: triton.Config, full: bool = False) -> str:
    k = c.kwargs
    label = f"d{head_dim} g{group} m{k['BLOCK_M']} n{k['BLOCK_N']} w{c.num_warps} s{c.num_stages}"
    return label + " ws" * k.get("WARP_SPECIALIZE", False) + " atomic" * k.get("ATOMIC_DQ", False) + " full" * full


def _options(c: triton.Config) -> dict:
    return dict(num_warps=c.num_warps, num_stages=c.num_stages)
