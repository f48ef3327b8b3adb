"""FlashAttention-2 in Triton: forward, and a backward that recomputes P: delta, then dK/dV with dQ by atomics, or
dK/dV and a separate dQ pass.

Layout (B, T, H, D) with any strides except a unit stride along D; packed variable-length batches are (total, H, D)
with int32 cu_seqlens. Query i of a sequence sees key j when dlo <= j - i <= dhi, dlo = Tk - Tq - left and
dhi = Tk - Tq + right (flash-attn's bottom-right alignment; causal is right = 0, "unbounded" a large int). GQA: query
head h reads K/V head h // GROUP; K and V are never repeated, and the dK/dV program of a K/V head loops over its GROUP
query heads, so dK/dV are reduced in registers, without atomics. dQ is either added by float32 atomics from that same
program (5 matmuls per query/key tile pair; run-to-run nondeterministic in its last bits) or computed by its own
kernel, which recomputes P and dP (7 matmuls, deterministic); which one runs is the GPU's to time (PlanTuner).

Scores live in log2 units (s * scale * log2 e) so the online softmax uses exp2. The logsumexp is stored in natural
units, float32: (B, H, Tq), or (H, total_q) when packed. A row that sees no key gives 0 and lse = +inf.
No (Tq, Tk) matrix is ever stored. Tested in tests/test_attention.py, compiled ahead of time per config in
tests/test_kernels_compile.py, timed in benchmarks/bench_attention.py.
"""
import os

import torch
import triton
import triton.language as tl
from triton.runtime import _allocation

from ._aot import signature_from_params
from ._launch import PlanTuner, cdiv, next_power_of_2
from ._attention_configs import DKDV_CONFIGS, DKDV_DQ_CONFIGS, DQ_CONFIGS, FWD_CONFIGS, flat, pruner
from ._attention_tiles import (kv_bases, load_tile, masked_scores, online_softmax, q_program, seq_bounds, sequence,
                               tile_range)

LOG2E = tl.constexpr(1.4426950408889634)  # globals a kernel reads must be constexpr (the compiler insists)
LN2 = tl.constexpr(0.6931471805599453)
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
_HALF = (torch.float16, torch.bfloat16)
# left/right: causal and full attention mask different shares of their tiles (the warp-specialized loops mask all of
# them), so they tune apart. TMA_ALIGNED: the forward's and dK/dV's (dQ has no specialized config).
_TUNING_KEY = ("HEAD_DIM", "tune_seqlen", "GROUP", "VARLEN", "left", "right", "TMA_ALIGNED")


def _this_machine(table):
    """The configs of this machine's GPU arch, or the interpreter's one."""
    if INTERPRETING or not torch.cuda.is_available():
        return table["interpreter"]
    return table[90] if torch.cuda.get_device_capability()[0] >= 9 else table[80]


def _autotuned(kernel, by_class, **options):
    """The kernel under an autotuner over the configs of by_class ({head-dim class: [triton.Config]}); options go to
    triton.autotune (reset_to_zero for an output accumulated by atomics)."""
    # tune_seqlen is max_seqlen rounded up to a power of 2, so packed batches of varying length share tunings.
    key = [name for name in _TUNING_KEY if name in kernel.arg_names]
    return triton.autotune(configs=flat(by_class), key=key,
                           prune_configs_by={"early_config_prune": pruner(by_class)}, **options)(kernel)


# ---- forward ----------------------------------------------------------------------------------------------------

@triton.jit
def _fwd_tiles(acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d, lo, hi, seqlen_k, dlo, dhi,
               scale_log2, MASKED: tl.constexpr, HEAD_DIM: tl.constexpr, PAD_D: tl.constexpr, UPCAST: tl.constexpr,
               BLOCK_N: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_t = load_tile(k_base + offs_n[None, :] * stride_kt + offs_d[:, None], offs_n[None, :] < seqlen_k,
                        offs_d[:, None] < HEAD_DIM, MASKED, PAD_D, UPCAST)  # (HEAD_DIM_PAD, BLOCK_N)
        s = tl.dot(q, k_t) * scale_log2  # (BLOCK_M, BLOCK_N), log2 units
        if MASKED:
            s = masked_scores(s, offs_m, offs_n, seqlen_k, dlo, dhi)
        v = load_tile(v_base + offs_n[:, None] * stride_vt + offs_d[None, :], offs_n[:, None] < seqlen_k,
                      offs_d[None, :] < HEAD_DIM, MASKED, PAD_D, UPCAST)  # (BLOCK_N, HEAD_DIM_PAD)
        acc, m_i, l_i = online_softmax(acc, m_i, l_i, s, v, MASKED)
    return acc, m_i, l_i


@triton.jit
def _fwd_specialized(acc, m_i, l_i, q_base, k_base, v_base, stride_qt, stride_kt, stride_vt, start_m, offs_m, lo, hi,
                     seqlen_q, seqlen_k, dlo, dhi, scale_log2, MASKED: tl.constexpr, HEAD_DIM: tl.constexpr,
                     UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The forward's loop in a WARP_SPECIALIZE config: Q, K and V tiles by TMA (zero past the sequence), every key
    tile masked unless no tile needs it (one loop is all Triton's Hopper pass specializes, and its loads must be
    TMA's; see _attention_configs)."""
    q_desc = tl.make_tensor_descriptor(q_base, shape=[seqlen_q, HEAD_DIM], strides=[stride_qt, 1],
                                       block_shape=[BLOCK_M, HEAD_DIM])
    k_desc = tl.make_tensor_descriptor(k_base, shape=[seqlen_k, HEAD_DIM], strides=[stride_kt, 1],
                                       block_shape=[BLOCK_N, HEAD_DIM])
    v_desc = tl.make_tensor_descriptor(v_base, shape=[seqlen_k, HEAD_DIM], strides=[stride_vt, 1],
                                       block_shape=[BLOCK_N, HEAD_DIM])
    q = q_desc.load([start_m, 0])  # (BLOCK_M, HEAD_DIM)
    if UPCAST:
        q = q.to(tl.float32)
    for start_n in tl.range(lo, hi, BLOCK_N, warp_specialize=True):
        k = k_desc.load([start_n, 0])  # (BLOCK_N, HEAD_DIM)
        v = v_desc.load([start_n, 0])
        if UPCAST:
            k, v = k.to(tl.float32), v.to(tl.float32)
        s = tl.dot(q, tl.trans(k)) * scale_log2  # (BLOCK_M, BLOCK_N), log2 units
        if MASKED:
            s = masked_scores(s, offs_m, start_n + tl.arange(0, BLOCK_N), seqlen_k, dlo, dhi)
        acc, m_i, l_i = online_softmax(acc, m_i, l_i, s, v, MASKED)
    return acc, m_i, l_i


@triton.jit
def _attn_fwd_kernel(Q, K, V, Out, Lse, CuQ, CuK,
                     stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
                     stride_vb, stride_vt, stride_vh, stride_ob, stride_ot, stride_oh, stride_lb, stride_lh,
                     seqlen_q, seqlen_k, scale_log2, left, right, tune_seqlen,
                     GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
                     VARLEN: tl.constexpr, UPCAST: tl.constexpr, TMA_ALIGNED: tl.constexpr, FULL_TILES: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WARP_SPECIALIZE: tl.constexpr):
    b64, h64, kvh64, q_start, seqlen_q, k_start, seqlen_k, dlo, dhi, start_m, offs_m, offs_d = q_program(
        CuQ, CuK, seqlen_q, seqlen_k, left, right, GROUP, HEAD_DIM_PAD, VARLEN, BLOCK_M)
    q_base = Q + b64 * stride_qb + h64 * stride_qh + q_start.to(tl.int64) * stride_qt
    k_base, v_base = kv_bases(K, V, b64, kvh64, k_start, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt,
                              stride_vh)
    PAD_D: tl.constexpr = HEAD_DIM != HEAD_DIM_PAD
    if WARP_SPECIALIZE:  # no early return: Triton's Hopper pass asserts on one (TaskIdPropagation, 3.6.0 and 3.7.1)
        keys = tl.where(start_m < seqlen_q, seqlen_k, 0)  # a block past a short packed sequence visits no key
    else:
        if start_m >= seqlen_q:
            return
        keys = seqlen_k
    lo, a, c, hi = tile_range(start_m, tl.minimum(start_m + BLOCK_M, seqlen_q) - 1, dlo, dhi, keys, BLOCK_N)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)
    if WARP_SPECIALIZE:
        tl.static_assert(TMA_ALIGNED and not PAD_D, "WARP_SPECIALIZE needs TMA-aligned Q/K/V, a power-of-2 head dim")
        acc, m_i, l_i = _fwd_specialized(acc, m_i, l_i, q_base, k_base, v_base, stride_qt, stride_kt, stride_vt,
                                         start_m, offs_m, lo, hi, seqlen_q, seqlen_k, dlo, dhi, scale_log2,
                                         not FULL_TILES, HEAD_DIM, UPCAST, BLOCK_M, BLOCK_N)
    else:  # masks cost only on the window's edges: [lo, a) and [c, hi) are masked, [a, c) is not
        q = load_tile(q_base + offs_m[:, None] * stride_qt + offs_d[None, :], offs_m[:, None] < seqlen_q,
                      offs_d[None, :] < HEAD_DIM, True, PAD_D, UPCAST)  # (BLOCK_M, HEAD_DIM_PAD)
        acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d, lo, a,
                                   seqlen_k, dlo, dhi, scale_log2, True, HEAD_DIM, PAD_D, UPCAST, BLOCK_N)
        acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d, a, c,
                                   seqlen_k, dlo, dhi, scale_log2, False, HEAD_DIM, PAD_D, UPCAST, BLOCK_N)
        acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d, c, hi,
                                   seqlen_k, dlo, dhi, scale_log2, True, HEAD_DIM, PAD_D, UPCAST, BLOCK_N)
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * LN2)
    o_base = Out + b64 * stride_ob + h64 * stride_oh + q_start.to(tl.int64) * stride_ot
    row_ok = offs_m < seqlen_q
    tl.store(o_base + offs_m[:, None] * stride_ot + offs_d[None, :], out.to(Out.dtype.element_ty),
             mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))
    tl.store(Lse + b64 * stride_lb + h64 * stride_lh + q_start + offs_m, lse, mask=row_ok)


# ---- backward ---------------------------------------------------------------------------------------------------

@triton.jit
def _attn_bwd_preprocess_kernel(Out, DOut, Delta, DLse, stride_ob, stride_ot, stride_oh, stride_db, stride_dt,
                                stride_dh, stride_lb, stride_lh, CuQ, seqlen_q,
                                HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, VARLEN: tl.constexpr,
                                HAS_DLSE: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta = rowsum(dO * O) (minus dlse when the logsumexp has a gradient: d lse / d s = p)."""
    pid_m, h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q_start, seqlen_q = seq_bounds(CuQ, b, seqlen_q, VARLEN)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    mask = (offs_m[:, None] < seqlen_q) & (offs_d[None, :] < HEAD_DIM)
    rows = (q_start + offs_m).to(tl.int64)
    # int64 head index too: dO from an SDPA-layout view has stride_dh = T * D, and H * T * D may pass 2**31.
    b64, h64 = b.to(tl.int64), h.to(tl.int64)
    o = tl.load(Out + b64 * stride_ob + h64 * stride_oh + rows[:, None] * stride_ot + offs_d[None, :],
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DOut + b64 * stride_db + h64 * stride_dh + rows[:, None] * stride_dt + offs_d[None, :],
                 mask=mask, other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)
    l_offs = b64 * stride_lb + h64 * stride_lh + rows
    if HAS_DLSE:
        delta -= tl.load(DLse + l_offs, mask=offs_m < seqlen_q, other=0.0)
    tl.store(Delta + l_offs, delta, mask=offs_m < seqlen_q)


@triton.jit
def _dkdv_step(dk, dv, k, v, q_t, do, lse_row, delta_row, offs_n, offs_m, seqlen_q, dlo, dhi, scale, scale_log2,
               MASKED: tl.constexpr, ATOMIC_DQ: tl.constexpr):
    """One query tile folded into the (BLOCK_N, D) dK and dV: q_t (D, BLOCK_M) its queries, do (BLOCK_M, D) their
    output gradients, lse_row / delta_row pointers to their logsumexp (natural units) and delta at row 0. Returns
    (dk, dv, dq): with ATOMIC_DQ, dq is this key block's share of the tile's dQ, dS K (BLOCK_M, D), for the caller
    to add to the others' (scaled, and then so is dK); otherwise 0."""
    if MASKED:
        lse = tl.load(lse_row + offs_m, mask=offs_m < seqlen_q, other=float("inf"))
        delta = tl.load(delta_row + offs_m, mask=offs_m < seqlen_q, other=0.0)
    else:
        lse = tl.load(lse_row + offs_m)
        delta = tl.load(delta_row + offs_m)
    p_t = tl.math.exp2(tl.dot(k, q_t) * scale_log2 - lse[None, :] * LOG2E)  # (BLOCK_N, BLOCK_M)
    if MASKED:
        diag = offs_n[:, None] - offs_m[None, :]
        p_t = tl.where((offs_m[None, :] < seqlen_q) & (diag >= dlo) & (diag <= dhi), p_t, 0.0)
    dv += tl.dot(p_t.to(do.dtype), do)
    ds_t = p_t * (tl.dot(v, tl.trans(do)) - delta[None, :])  # (BLOCK_N, BLOCK_M)
    dq = 0.0
    if ATOMIC_DQ:  # dQ's partial sums leave the program, so the scale goes in here, once for both
        ds_t = (ds_t * scale).to(q_t.dtype)
        dq = tl.dot(tl.trans(ds_t), k)  # (BLOCK_M, HEAD_DIM_PAD)
    dk += tl.dot(ds_t.to(q_t.dtype), tl.trans(q_t))
    return dk, dv, dq


@triton.jit
def _dkdv_tiles(dk, dv, k, v, q_base, do_base, lse_base, delta_base, dq_base, stride_qt, stride_qh, stride_dt,
                stride_dh, stride_lh, stride_dqt, stride_dqh, offs_n, offs_d, lo, hi, seqlen_q, dlo, dhi, scale,
                scale_log2, MASKED: tl.constexpr, HEAD_DIM: tl.constexpr, PAD_D: tl.constexpr, UPCAST: tl.constexpr,
                GROUP: tl.constexpr, ATOMIC_DQ: tl.constexpr, BLOCK_M: tl.constexpr):
    """Query tiles [lo, hi) of each of the GROUP query heads that share this K/V head, in one flat loop. A loop over
    heads around the tile loop spilled 88-248 B at d128 with GROUP 2 (AOT, sm_90, 64x64 and 64x128 tiles, 8 warps)
    where GROUP 1 did not; flat, the two compile alike."""
    n_tiles = tl.cdiv(hi - lo, BLOCK_M)
    for it in range(0, GROUP * n_tiles):
        g = it // n_tiles
        # int32 head offsets: attention_backward keeps (GROUP - 1) * stride_qh / stride_dh under 2**31 (int64 here
        # cost 13 registers and a 16 B spill at d128 64x64 under triton 3.6.0).
        q_g, do_g = q_base + g * stride_qh, do_base + g * stride_dh
        start_m = lo + (it - g * n_tiles) * BLOCK_M
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q_t = load_tile(q_g + offs_m[None, :] * stride_qt + offs_d[:, None], offs_m[None, :] < seqlen_q,
                        offs_d[:, None] < HEAD_DIM, MASKED, PAD_D, UPCAST)  # (HEAD_DIM_PAD, BLOCK_M)
        do = load_tile(do_g + offs_m[:, None] * stride_dt + offs_d[None, :], offs_m[:, None] < seqlen_q,
                       offs_d[None, :] < HEAD_DIM, MASKED, PAD_D, UPCAST)  # (BLOCK_M, HEAD_DIM_PAD)
        dk, dv, dq = _dkdv_step(dk, dv, k, v, q_t, do, lse_base + g * stride_lh, delta_base + g * stride_lh, offs_n,
                                offs_m, seqlen_q, dlo, dhi, scale, scale_log2, MASKED, ATOMIC_DQ)
        if ATOMIC_DQ:
            dq_ptrs = dq_base + g * stride_dqh + offs_m[:, None] * stride_dqt + offs_d[None, :]
            if MASKED or PAD_D:
                tl.atomic_add(dq_ptrs, dq, mask=(offs_m[:, None] < seqlen_q) & (offs_d[None, :] < HEAD_DIM),
                              sem="relaxed")
            else:
                tl.atomic_add(dq_ptrs, dq, sem="relaxed")
    return dk, dv


@triton.jit
def _dkdv_specialized(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_qh, stride_dt, stride_dh,
                      stride_lh, offs_n, lo, hi, seqlen_q, dlo, dhi, scale_log2, MASKED: tl.constexpr,
                      HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr):
    """_dkdv_tiles' flat (head, query tile) loop for a WARP_SPECIALIZE config: Q and dO tiles of the GROUP heads by
    TMA from (GROUP, seqlen_q, D) descriptors that end at the sequence (zero past it). lse and delta stay pointer
    loads: a descriptor's last-dimension offset must be a multiple of 16 bytes, and a packed sequence's rows of 4-byte
    values start anywhere."""
    q_desc = tl.make_tensor_descriptor(q_base, shape=[GROUP, seqlen_q, HEAD_DIM], strides=[stride_qh, stride_qt, 1],
                                       block_shape=[1, BLOCK_M, HEAD_DIM])
    do_desc = tl.make_tensor_descriptor(do_base, shape=[GROUP, seqlen_q, HEAD_DIM], strides=[stride_dh, stride_dt, 1],
                                        block_shape=[1, BLOCK_M, HEAD_DIM])
    n_tiles = tl.cdiv(hi - lo, BLOCK_M)
    for it in tl.range(0, GROUP * n_tiles, warp_specialize=True):
        g = it // n_tiles
        start_m = lo + (it - g * n_tiles) * BLOCK_M
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = q_desc.load([g, start_m, 0]).reshape(BLOCK_M, HEAD_DIM)
        do = do_desc.load([g, start_m, 0]).reshape(BLOCK_M, HEAD_DIM)
        if UPCAST:
            q, do = q.to(tl.float32), do.to(tl.float32)
        dk, dv, _ = _dkdv_step(dk, dv, k, v, tl.trans(q), do, lse_base + g * stride_lh, delta_base + g * stride_lh,
                               offs_n, offs_m, seqlen_q, dlo, dhi, 1.0, scale_log2, MASKED, False)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(Q, K, V, DOut, Lse, Delta, DK, DV, DQAcc, CuQ, CuK,
                          stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
                          stride_vb, stride_vt, stride_vh, stride_db, stride_dt, stride_dh, stride_lb, stride_lh,
                          stride_dkb, stride_dkt, stride_dkh, stride_dvb, stride_dvt, stride_dvh,
                          stride_dqb, stride_dqt, stride_dqh, seqlen_q, seqlen_k, scale, scale_log2, left, right,
                          tune_seqlen, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
                          VARLEN: tl.constexpr, UPCAST: tl.constexpr, TMA_ALIGNED: tl.constexpr,
                          FULL_TILES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          WARP_SPECIALIZE: tl.constexpr, ATOMIC_DQ: tl.constexpr):
    """dK and dV of one BLOCK_N-key block; with ATOMIC_DQ, dQ too, added tile by tile into the zeroed float32 DQAcc
    (FlashAttention-2's backward: 5 matmuls per tile pair, where this kernel and _attn_bwd_dq_kernel take 7)."""
    pid_n, kvh, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q_start, seqlen_q, k_start, seqlen_k, dlo, dhi = sequence(CuQ, CuK, b, seqlen_q, seqlen_k, left, right, VARLEN)
    start_n = pid_n * BLOCK_N
    b64, kvh64 = b.to(tl.int64), kvh.to(tl.int64)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    PAD_D: tl.constexpr = HEAD_DIM != HEAD_DIM_PAD
    k_base, v_base = kv_bases(K, V, b64, kvh64, k_start, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt,
                              stride_vh)
    h64 = kvh64 * GROUP  # the first of the GROUP query heads that share this K/V head: dK/dV reduced here, no atomics
    q_base = Q + b64 * stride_qb + h64 * stride_qh + q_start.to(tl.int64) * stride_qt
    do_base = DOut + b64 * stride_db + h64 * stride_dh + q_start.to(tl.int64) * stride_dt
    lse_base = Lse + b64 * stride_lb + h64 * stride_lh + q_start
    delta_base = Delta + b64 * stride_lb + h64 * stride_lh + q_start
    dq_base = DQAcc  # None unless ATOMIC_DQ
    if ATOMIC_DQ:
        dq_base = DQAcc + b64 * stride_dqb + h64 * stride_dqh + q_start.to(tl.int64) * stride_dqt
    dk_scale = 1.0 if ATOMIC_DQ else scale  # ATOMIC_DQ scales dS, so dK, in the loop
    dk = tl.zeros([BLOCK_N, HEAD_DIM_PAD], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM_PAD], tl.float32)
    if WARP_SPECIALIZE:  # no early return (see the forward): a block past a short packed sequence sees no query
        tl.static_assert(TMA_ALIGNED and not PAD_D, "WARP_SPECIALIZE needs TMA-aligned inputs, a power-of-2 head dim")
        # dQ's partial sums span both computing warpgroups' keys, which Triton's pass cannot split (an unreachable in
        # WSDataPartition under 3.6.0 and 3.7.1, by pointer atomics or TMA reduce-add; benchmarks/NOTES.md)
        tl.static_assert(not ATOMIC_DQ, "ATOMIC_DQ takes the pointer loop")
        queries = tl.where(start_n < seqlen_k, seqlen_q, 0)
        lo, a, c, hi = tile_range(start_n, tl.minimum(start_n + BLOCK_N, seqlen_k) - 1, -dhi, -dlo, queries,
                                   BLOCK_M)
        k_desc = tl.make_tensor_descriptor(k_base, shape=[seqlen_k, HEAD_DIM], strides=[stride_kt, 1],
                                           block_shape=[BLOCK_N, HEAD_DIM])
        v_desc = tl.make_tensor_descriptor(v_base, shape=[seqlen_k, HEAD_DIM], strides=[stride_vt, 1],
                                           block_shape=[BLOCK_N, HEAD_DIM])
        k, v = k_desc.load([start_n, 0]), v_desc.load([start_n, 0])  # (BLOCK_N, HEAD_DIM), zero past seqlen_k
        if UPCAST:
            k, v = k.to(tl.float32), v.to(tl.float32)
        dk, dv = _dkdv_specialized(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_qh,
                                   stride_dt, stride_dh, stride_lh, offs_n, lo, hi, seqlen_q, dlo, dhi, scale_log2,
                                   not FULL_TILES, HEAD_DIM, UPCAST, GROUP, BLOCK_M)
        dk_desc = tl.make_tensor_descriptor(DK + b64 * stride_dkb + kvh64 * stride_dkh + k_start.to(tl.int64) *
                                            stride_dkt, shape=[seqlen_k, HEAD_DIM], strides=[stride_dkt, 1],
                                            block_shape=[BLOCK_N, HEAD_DIM])
        dv_desc = tl.make_tensor_descriptor(DV + b64 * stride_dvb + kvh64 * stride_dvh + k_start.to(tl.int64) *
                                            stride_dvt, shape=[seqlen_k, HEAD_DIM], strides=[stride_dvt, 1],
                                            block_shape=[BLOCK_N, HEAD_DIM])
        dk_desc.store([start_n, 0], (dk * scale).to(DK.dtype.element_ty))  # rows past seqlen_k are not written
        dv_desc.store([start_n, 0], dv.to(DV.dtype.element_ty))
        return
    if start_n >= seqlen_k:
        return
    row_ok, col_ok = offs_n[:, None] < seqlen_k, offs_d[None, :] < HEAD_DIM
    k_rows = (k_start + offs_n).to(tl.int64)[:, None]
    k = load_tile(K + b64 * stride_kb + kvh64 * stride_kh + k_rows * stride_kt + offs_d[None, :], row_ok, col_ok,
                  True, PAD_D, UPCAST)  # (BLOCK_N, HEAD_DIM_PAD)
    v = load_tile(V + b64 * stride_vb + kvh64 * stride_vh + k_rows * stride_vt + offs_d[None, :], row_ok, col_ok,
                  True, PAD_D, UPCAST)
    # The queries that see keys start_n..: j - i in [dlo, dhi] means i - j in [-dhi, -dlo].
    lo, a, c, hi = tile_range(start_n, tl.minimum(start_n + BLOCK_N, seqlen_k) - 1, -dhi, -dlo, seqlen_q, BLOCK_M)
    dk, dv = _dkdv_tiles(dk, dv, k, v, q_base, do_base, lse_base, delta_base, dq_base, stride_qt, stride_qh,
                         stride_dt, stride_dh, stride_lh, stride_dqt, stride_dqh, offs_n, offs_d, lo, a, seqlen_q, dlo,
                         dhi, scale, scale_log2, True, HEAD_DIM, PAD_D, UPCAST, GROUP, ATOMIC_DQ, BLOCK_M)
    dk, dv = _dkdv_tiles(dk, dv, k, v, q_base, do_base, lse_base, delta_base, dq_base, stride_qt, stride_qh,
                         stride_dt, stride_dh, stride_lh, stride_dqt, stride_dqh, offs_n, offs_d, a, c, seqlen_q, dlo,
                         dhi, scale, scale_log2, False, HEAD_DIM, PAD_D, UPCAST, GROUP, ATOMIC_DQ, BLOCK_M)
    dk, dv = _dkdv_tiles(dk, dv, k, v, q_base, do_base, lse_base, delta_base, dq_base, stride_qt, stride_qh,
                         stride_dt, stride_dh, stride_lh, stride_dqt, stride_dqh, offs_n, offs_d, c, hi, seqlen_q, dlo,
                         dhi, scale, scale_log2, True, HEAD_DIM, PAD_D, UPCAST, GROUP, ATOMIC_DQ, BLOCK_M)
    mask = row_ok & col_ok
    tl.store(DK + b64 * stride_dkb + kvh64 * stride_dkh + k_rows * stride_dkt + offs_d[None, :],
             (dk * dk_scale).to(DK.dtype.element_ty), mask=mask)
    tl.store(DV + b64 * stride_dvb + kvh64 * stride_dvh + k_rows * stride_dvt + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=mask)


@triton.jit
def _dq_tiles(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d, lo, hi, seqlen_k, dlo,
              dhi, scale_log2, MASKED: tl.constexpr, HEAD_DIM: tl.constexpr, PAD_D: tl.constexpr,
              UPCAST: tl.constexpr, BLOCK_N: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_t = load_tile(k_base + offs_n[None, :] * stride_kt + offs_d[:, None], offs_n[None, :] < seqlen_k,
                        offs_d[:, None] < HEAD_DIM, MASKED, PAD_D, UPCAST)  # (HEAD_DIM_PAD, BLOCK_N)
        v_t = load_tile(v_base + offs_n[None, :] * stride_vt + offs_d[:, None], offs_n[None, :] < seqlen_k,
                        offs_d[:, None] < HEAD_DIM, MASKED, PAD_D, UPCAST)
        p = tl.math.exp2(tl.dot(q, k_t) * scale_log2 - lse[:, None])  # (BLOCK_M, BLOCK_N); lse in log2 units
        if MASKED:
            diag = offs_n[None, :] - offs_m[:, None]
            p = tl.where((offs_n[None, :] < seqlen_k) & (diag >= dlo) & (diag <= dhi), p, 0.0)
        ds = p * (tl.dot(do, v_t) - delta[:, None])
        dq += tl.dot(ds.to(k_t.dtype), tl.trans(k_t))
    return dq


@triton.jit
def _attn_bwd_dq_kernel(Q, K, V, DOut, Lse, Delta, DQ, CuQ, CuK,
                        stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
                        stride_vb, stride_vt, stride_vh, stride_db, stride_dt, stride_dh, stride_lb, stride_lh,
                        stride_dqb, stride_dqt, stride_dqh, seqlen_q, seqlen_k, scale, scale_log2, left, right,
                        tune_seqlen, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
                        VARLEN: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    b64, h64, kvh64, q_start, seqlen_q, k_start, seqlen_k, dlo, dhi, start_m, offs_m, offs_d = q_program(
        CuQ, CuK, seqlen_q, seqlen_k, left, right, GROUP, HEAD_DIM_PAD, VARLEN, BLOCK_M)
    if start_m >= seqlen_q:
        return
    row_ok, col_ok = offs_m[:, None] < seqlen_q, offs_d[None, :] < HEAD_DIM
    q_rows = (q_start + offs_m).to(tl.int64)[:, None]
    PAD_D: tl.constexpr = HEAD_DIM != HEAD_DIM_PAD
    q = load_tile(Q + b64 * stride_qb + h64 * stride_qh + q_rows * stride_qt + offs_d[None, :], row_ok, col_ok, True,
                  PAD_D, UPCAST)  # (BLOCK_M, HEAD_DIM_PAD)
    do = load_tile(DOut + b64 * stride_db + h64 * stride_dh + q_rows * stride_dt + offs_d[None, :], row_ok, col_ok,
                   True, PAD_D, UPCAST)
    l_offs = b64 * stride_lb + h64 * stride_lh + q_start + offs_m
    lse = tl.load(Lse + l_offs, mask=offs_m < seqlen_q, other=float("inf")) * LOG2E
    delta = tl.load(Delta + l_offs, mask=offs_m < seqlen_q, other=0.0)
    k_base, v_base = kv_bases(K, V, b64, kvh64, k_start, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt,
                              stride_vh)
    lo, a, c, hi = tile_range(start_m, tl.minimum(start_m + BLOCK_M, seqlen_q) - 1, dlo, dhi, seqlen_k, BLOCK_N)
    dq = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)
    dq = _dq_tiles(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d, lo, a, seqlen_k,
                   dlo, dhi, scale_log2, True, HEAD_DIM, PAD_D, UPCAST, BLOCK_N)
    dq = _dq_tiles(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d, a, c, seqlen_k,
                   dlo, dhi, scale_log2, False, HEAD_DIM, PAD_D, UPCAST, BLOCK_N)
    dq = _dq_tiles(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d, c, hi, seqlen_k,
                   dlo, dhi, scale_log2, True, HEAD_DIM, PAD_D, UPCAST, BLOCK_N)
    tl.store(DQ + b64 * stride_dqb + h64 * stride_dqh + q_rows * stride_dqt + offs_d[None, :],
             (dq * scale).to(DQ.dtype.element_ty), mask=row_ok & col_ok)


_attn_fwd = _autotuned(_attn_fwd_kernel, _this_machine(FWD_CONFIGS))
_attn_bwd_dkdv = _autotuned(_attn_bwd_dkdv_kernel, _this_machine(DKDV_CONFIGS))
_attn_bwd_dkdv_dq = _autotuned(_attn_bwd_dkdv_kernel, _this_machine(DKDV_DQ_CONFIGS), reset_to_zero=["DQAcc"])
_attn_bwd_dq = _autotuned(_attn_bwd_dq_kernel, _this_machine(DQ_CONFIGS))
_PREPROCESS_BLOCK_M = 32  # at 64, d256 o and dO tiles (fp32, 4 warps) spilled 24 bytes on sm_90
# The backward's dQ, per shape class: by atomics from the dK/dV kernel (5 matmuls per tile pair, run-to-run
# nondeterministic in the last bits) or by its own kernel (7, deterministic), whichever the GPU times faster. Off
# the GPU nothing can be timed, so the atomic plan, flash-attn's default, runs there.
ATOMIC_DQ, SEPARATE_DQ = "atomic dQ", "dQ kernel"
_backward_plans = PlanTuner(default=ATOMIC_DQ)


# ---- launchers: inputs were checked by fasttrain.ops.attention; these allocate, pick strides and launch -----------

def _bth_strides(x, varlen):
    """(batch, token, head) element strides; a packed (total, H, D) tensor has batch stride 0."""
    return (0, x.stride(0), x.stride(1)) if varlen else (x.stride(0), x.stride(1), x.stride(2))


def _lse_strides(lse, varlen):
    return (0, lse.stride(0)) if varlen else (lse.stride(0), lse.stride(1))


def _common(q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k):
    varlen = cu_seqlens_q is not None
    B = cu_seqlens_q.numel() - 1 if varlen else q.shape[0]
    H, Hkv, D = q.shape[-2], k.shape[-2], q.shape[-1]
    constexprs = dict(GROUP=H // Hkv, HEAD_DIM=D, HEAD_DIM_PAD=next_power_of_2(D), VARLEN=varlen,
                      UPCAST=INTERPRETING and q.dtype != torch.float32)
    tune_seqlen = next_power_of_2(max(max_seqlen_q, max_seqlen_k))
    return varlen, B, H, Hkv, constexprs, tune_seqlen


def tma_aligned(*tensors) -> bool:
    """Whether every (.., T, H, D) tensor given can be read in (rows, D) tiles by TMA from any batch, head and row:
    half precision, D a power of 2, and the base and every stride but D's a multiple of 16 bytes (the copy engine's
    rule; a torch allocation or a whole-head view of one meets it). 2.4 us for three on the 2-vCPU CI machine."""
    for t in tensors:
        if t.dtype not in _HALF:
            return False
        head_dim = t.shape[-1]
        if head_dim & (head_dim - 1) or t.data_ptr() & 15:
            return False
        for stride in t.stride()[:-1]:
            if stride & 7:  # 8 two-byte elements = 16 bytes
                return False
    return True


def _full_tiles(varlen, max_seqlen_q, max_seqlen_k, left, right) -> bool:
    """Every query sees every key and both lengths are multiples of 128 (the widest tile a specialized config
    takes): no tile has a row or column to mask. A constexpr, so the pipelined kernels, which ignore it, also compile
    once per value (once per process and shape class: seconds, not per call)."""
    return (not varlen and max_seqlen_q % 128 == 0 and max_seqlen_k % 128 == 0 and left >= max_seqlen_k - 1
            and right >= max_seqlen_q - 1)


def _scratch(size: int, alignment: int, stream):
    """Global memory for the TMA descriptors a kernel makes on the device (triton.set_allocator's contract)."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_scratch_allocator():
    """Give Triton an allocator for device-made descriptors unless the caller (or torch) has set one already."""
    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_scratch)


def attention_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, left, right):
    """out (like q, contiguous), lse float32 (B, H, Tq) or (H, total_q)."""
    varlen, B, H, Hkv, cx, tune_seqlen = _common(q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k)
    cx["TMA_ALIGNED"] = tma_aligned(q, k, v)
    cx["FULL_TILES"] = _full_tiles(varlen, max_seqlen_q, max_seqlen_k, left, right)
    if cx["TMA_ALIGNED"] and q.is_cuda:
        _ensure_scratch_allocator()
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse_shape = (H, q.shape[0]) if varlen else (B, H, q.shape[1])
    lse = torch.empty(lse_shape, dtype=torch.float32, device=q.device)
    grid = lambda meta: (cdiv(max_seqlen_q, meta["BLOCK_M"]), H, B)  # noqa: E731
    _attn_fwd[grid](q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
                    *_bth_strides(q, varlen), *_bth_strides(k, varlen), *_bth_strides(v, varlen),
                    *_bth_strides(out, varlen), *_lse_strides(lse, varlen),
                    max_seqlen_q, max_seqlen_k, scale * LOG2E.value, left, right, tune_seqlen, **cx)
    return out, lse


def attention_backward(do, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                       scale, left, right, deterministic=False):
    """(dq, dk, dv), each contiguous and shaped like its input. dlse (like lse) or None. deterministic: dQ by its own
    kernel, bit-identical from run to run; otherwise by whichever of that and atomics is faster here."""
    varlen, B, H, Hkv, cx, tune_seqlen = _common(q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k)
    if do.stride(-1) != 1:
        do = do.contiguous()
    if (H // Hkv - 1) * max(q.stride(-2), do.stride(-2)) >= 2**31:  # _dkdv_tiles offsets heads in int32
        q, do = q.contiguous(), do.contiguous()  # only SDPA-layout views of millions of tokens: head stride D
    lse = lse.contiguous()
    delta = torch.empty_like(lse)
    dkdv_cx = {**cx, "TMA_ALIGNED": tma_aligned(q, k, v, do),
               "FULL_TILES": _full_tiles(varlen, max_seqlen_q, max_seqlen_k, left, right)}
    if dkdv_cx["TMA_ALIGNED"] and q.is_cuda:
        _ensure_scratch_allocator()
    _attn_bwd_preprocess_kernel[(cdiv(max_seqlen_q, _PREPROCESS_BLOCK_M), H, B)](
        out, do, delta, None if dlse is None else dlse.contiguous(), *_bth_strides(out, varlen),
        *_bth_strides(do, varlen), *_lse_strides(lse, varlen), cu_seqlens_q, max_seqlen_q,
        HEAD_DIM=cx["HEAD_DIM"], HEAD_DIM_PAD=cx["HEAD_DIM_PAD"], VARLEN=varlen, HAS_DLSE=dlse is not None,
        BLOCK_M=_PREPROCESS_BLOCK_M)
    dk, dv = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (k, v))
    common = (*_bth_strides(q, varlen), *_bth_strides(k, varlen), *_bth_strides(v, varlen),
              *_bth_strides(do, varlen), *_lse_strides(lse, varlen))
    tail = (max_seqlen_q, max_seqlen_k, scale, scale * LOG2E.value, left, right, tune_seqlen)
    grid_kv = lambda meta: (cdiv(max_seqlen_k, meta["BLOCK_N"]), Hkv, B)  # noqa: E731
    grid_q = lambda meta: (cdiv(max_seqlen_q, meta["BLOCK_M"]), H, B)  # noqa: E731
    dkdv_args = (q, k, v, do, lse, delta, dk, dv)
    dkdv_strides = (*common, *_bth_strides(dk, varlen), *_bth_strides(dv, varlen))

    def atomic_dq():
        dq_acc = torch.zeros(q.shape, dtype=torch.float32, device=q.device)  # contiguous, like q
        _attn_bwd_dkdv_dq[grid_kv](*dkdv_args, dq_acc, cu_seqlens_q, cu_seqlens_k, *dkdv_strides,
                                   *_bth_strides(dq_acc, varlen), *tail, **dkdv_cx)
        return dq_acc.to(q.dtype)

    def separate_dq():
        _attn_bwd_dkdv[grid_kv](*dkdv_args, None, cu_seqlens_q, cu_seqlens_k, *dkdv_strides, 0, 0, 0, *tail,
                                **dkdv_cx)
        dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        _attn_bwd_dq[grid_q](q, k, v, do, lse, delta, dq, cu_seqlens_q, cu_seqlens_k, *common,
                             *_bth_strides(dq, varlen), *tail, **cx)
        return dq

    plans = {ATOMIC_DQ: atomic_dq, SEPARATE_DQ: separate_dq}
    if deterministic:
        return separate_dq(), dk, dv
    key = (str(q.dtype), tune_seqlen, left, right, *sorted(dkdv_cx.items()))
    return plans[_backward_plans.choose(key, plans, q.is_cuda)](), dk, dv


def aot_variants(kernel, config: dict) -> dict:
    """A warp-specialized forward or dK/dV compiles twice: its loop masks every tile, or none (FULL_TILES)."""
    if config.get("WARP_SPECIALIZE"):
        return {"": {}, " full": {"FULL_TILES": True}}
    return {"": {}}


def aot_signature(kernel, dtype: str, head_dim: int) -> tuple[dict, dict]:
    """(signature, constexprs) of one kernel above for an ahead-of-time compile of a dense GQA launch (kernels/_aot.py);
    the config's kwargs (BLOCK_M/BLOCK_N, WARP_SPECIALIZE, ATOMIC_DQ) are added by the caller."""
    fixed = dict(GROUP=2, HEAD_DIM=head_dim, HEAD_DIM_PAD=next_power_of_2(head_dim), VARLEN=False,
                 UPCAST=False, HAS_DLSE=False, TMA_ALIGNED=head_dim == next_power_of_2(head_dim), FULL_TILES=False)
    if kernel is _attn_bwd_preprocess_kernel:
        fixed["BLOCK_M"] = _PREPROCESS_BLOCK_M

    def arg_type(name):
        if name in ("Lse", "Delta", "DLse", "DQAcc"):
            return "*fp32"
        if name in ("CuQ", "CuK"):
            return "*i32"
        if name[0].isupper():
            return f"*{dtype}"
        return "fp32" if name.startswith("scale") else "i32"
    return signature_from_params(kernel, arg_type, fixed)
