"""FlashAttention-2's forward in Triton; the backward is kernels/attention_backward.py.

Layout (B, T, H, D) with any strides except a unit stride along D; packed variable-length batches are (total, H, D)
with int32 cu_seqlens. Query i of a sequence sees key j when dlo <= j - i <= dhi, dlo = Tk - Tq - left and
dhi = Tk - Tq + right (flash-attn's bottom-right alignment; causal is right = 0, "unbounded" a large int). GQA: query
head h reads K/V head h // GROUP; K and V are never repeated.

Scores live in log2 units (s * scale * log2 e) so the online softmax uses exp2. The logsumexp is stored in natural
units, float32: (B, H, Tq), or (H, total_q) when packed. A row that sees no key gives 0 and lse = +inf.
No (Tq, Tk) matrix is ever stored. Tested in tests/test_attention.py, compiled ahead of time per config in
tests/test_kernels_compile.py, timed in benchmarks/bench_attention.py.
DROPOUT (dropout_p > 0): out = (P * Z / (1 - dropout_p)) V with the logsumexp undropped, Z the keep mask of the
launch's seed tensor, a pure function of (seed, offset, sequence, head, query row, key column) that the backward
regenerates (kernels/_attention_dropout.py documents it).
"""

import torch
import triton
import triton.language as tl

from ._attention_configs import FWD_CONFIGS, head_dim_class, one_tile
from ._attention_dropout import dropout_args, keep_tile
from ._attention_launch import (
    AOT_TYPES,
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
    masked_scores,
    modified_scores,
    online_softmax,
    q_program,
    tile_range,
    tma_rows,
    tma_start,
)
from ._launch import cdiv

LN2 = tl.constexpr(0.6931471805599453)  # globals a kernel reads must be constexpr (the compiler insists)


@triton.jit
def _fwd_tiles(
    acc,
    m_i,
    l_i,
    q,
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
        s = tl.dot(q, k_t) * scale_log2  # (BLOCK_M, BLOCK_N), log2 units
        s, _ = modified_scores(s, offs_m[:, None] + q_off, offs_n[None, :], softcap_log2, slope_log2, SOFTCAP, ALIBI)
        if MASKED:
            s = masked_scores(s, offs_m, offs_n, seqlen_k, dlo, dhi)
        v = load_tile(
            v_base + offs_n[:, None] * stride_vt + offs_d[None, :],
            offs_n[:, None] < seqlen_k,
            offs_d[None, :] < HEAD_DIM,
            MASKED,
            PAD_D,
            UPCAST,
        )  # (BLOCK_N, HEAD_DIM_PAD)
        keep = None
        if DROPOUT:
            keep = keep_tile(seed, offset, bh, offs_m, start_n, threshold, offs_m.shape[0], BLOCK_N)
        acc, m_i, l_i = online_softmax(acc, m_i, l_i, s, v, MASKED, keep, DROPOUT)
    return acc, m_i, l_i


@triton.jit
def _fwd_specialized(
    acc,
    m_i,
    l_i,
    q_base,
    k_base,
    v_base,
    stride_qt,
    stride_kt,
    stride_vt,
    start_m,
    offs_m,
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
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    softcap_log2,
    slope_log2,
    SOFTCAP: tl.constexpr,
    ALIBI: tl.constexpr,
):
    """The forward's loop in a WARP_SPECIALIZE config: Q, K and V tiles by TMA (zero past the sequence), every key
    tile masked unless no tile needs it (one loop is all Triton's Hopper pass specializes, and its loads must be
    TMA's; see _attention_configs)."""
    rows_q, rows_k = tma_rows(seqlen_q), tma_rows(seqlen_k)  # no key tile is visited when seqlen_k is 0
    q_desc = tl.make_tensor_descriptor(
        q_base, shape=[rows_q, HEAD_DIM], strides=[stride_qt, 1], block_shape=[BLOCK_M, HEAD_DIM]
    )
    k_desc = tl.make_tensor_descriptor(
        k_base, shape=[rows_k, HEAD_DIM], strides=[stride_kt, 1], block_shape=[BLOCK_N, HEAD_DIM]
    )
    v_desc = tl.make_tensor_descriptor(
        v_base, shape=[rows_k, HEAD_DIM], strides=[stride_vt, 1], block_shape=[BLOCK_N, HEAD_DIM]
    )
    q = q_desc.load([tma_start(seqlen_q, start_m), 0])  # (BLOCK_M, HEAD_DIM)
    if UPCAST:
        q = q.to(tl.float32)
    for start_n in tl.range(lo, hi, BLOCK_N, warp_specialize=True):
        k = k_desc.load([start_n, 0])  # (BLOCK_N, HEAD_DIM)
        v = v_desc.load([start_n, 0])
        if UPCAST:
            k, v = k.to(tl.float32), v.to(tl.float32)
        s = tl.dot(q, tl.trans(k)) * scale_log2  # (BLOCK_M, BLOCK_N), log2 units
        offs_n = start_n + tl.arange(0, BLOCK_N)
        q_pos = offs_m[:, None] + (seqlen_k - seqlen_q)
        s, _ = modified_scores(s, q_pos, offs_n[None, :], softcap_log2, slope_log2, SOFTCAP, ALIBI)
        if MASKED:
            s = masked_scores(s, offs_m, offs_n, seqlen_k, dlo, dhi)
        acc, m_i, l_i = online_softmax(acc, m_i, l_i, s, v, MASKED)
    return acc, m_i, l_i


@triton.jit
def _attn_fwd_kernel(
    Q,
    K,
    V,
    Out,
    Lse,
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
    stride_ob,
    stride_ot,
    stride_oh,
    stride_lb,
    stride_lh,
    seqlen_q,
    seqlen_k,
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
    """With SOFTCAP, scale_log2 is scale / softcap (tanh's argument) and softcap_log2 softcap * log2 e; with ALIBI,
    Alibi holds the float32 slopes, (B, H) or (H,) with stride_ab 0 (kernels/_attention_tiles.modified_scores)."""
    b64, h64, kvh64, q_start, seqlen_q, k_start, seqlen_k, dlo, dhi, start_m, offs_m, offs_d = q_program(
        CuQ, CuK, seqlen_q, seqlen_k, left, right, GROUP, HEAD_DIM_PAD, VARLEN, BLOCK_M
    )
    q_base = Q + b64 * stride_qb + h64 * stride_qh + q_start.to(tl.int64) * stride_qt
    k_base, v_base = kv_bases(
        K, V, b64, kvh64, k_start, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh
    )
    PAD_D: tl.constexpr = HEAD_DIM != HEAD_DIM_PAD
    if WARP_SPECIALIZE:  # no early return: Triton's Hopper pass asserts on one (TaskIdPropagation, 3.6.0 and 3.7.1)
        keys = tl.where(start_m < seqlen_q, seqlen_k, 0)  # a block past a short packed sequence visits no key
    else:
        if start_m >= seqlen_q:
            return
        keys = seqlen_k
    lo, a, c, hi = tile_range(start_m, tl.minimum(start_m + BLOCK_M, seqlen_q) - 1, dlo, dhi, keys, BLOCK_N)
    slope_log2 = alibi_slope_log2(Alibi, b64, h64, stride_ab, ALIBI)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)
    seed, offset, bh = 0, 0, 0
    if DROPOUT:  # the mask's key and counter (kernels/_attention_dropout.py): b * H + h, H the grid's second axis
        seed, offset, bh = tl.load(Seed), tl.load(Seed + 1), (b64 * tl.num_programs(1) + h64).to(tl.int32)
    if WARP_SPECIALIZE:
        tl.static_assert(TMA_ALIGNED and not PAD_D, "WARP_SPECIALIZE needs TMA-aligned Q/K/V, a power-of-2 head dim")
        tl.static_assert(not DROPOUT, "dropout takes the pointer loop")
        acc, m_i, l_i = _fwd_specialized(
            acc,
            m_i,
            l_i,
            q_base,
            k_base,
            v_base,
            stride_qt,
            stride_kt,
            stride_vt,
            start_m,
            offs_m,
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
            BLOCK_M,
            BLOCK_N,
            softcap_log2,
            slope_log2,
            SOFTCAP,
            ALIBI,
        )
    else:  # masks cost only on the window's edges: [lo, a) and [c, hi) are masked, [a, c) is not
        q = load_tile(
            q_base + offs_m[:, None] * stride_qt + offs_d[None, :],
            offs_m[:, None] < seqlen_q,
            offs_d[None, :] < HEAD_DIM,
            True,
            PAD_D,
            UPCAST,
        )  # (BLOCK_M, HEAD_DIM_PAD)
        acc, m_i, l_i = _fwd_tiles(
            acc,
            m_i,
            l_i,
            q,
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
            DROPOUT,
            seqlen_k - seqlen_q,
            softcap_log2,
            slope_log2,
            SOFTCAP,
            ALIBI,
        )
        acc, m_i, l_i = _fwd_tiles(
            acc,
            m_i,
            l_i,
            q,
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
            DROPOUT,
            seqlen_k - seqlen_q,
            softcap_log2,
            slope_log2,
            SOFTCAP,
            ALIBI,
        )
        acc, m_i, l_i = _fwd_tiles(
            acc,
            m_i,
            l_i,
            q,
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
            DROPOUT,
            seqlen_k - seqlen_q,
            softcap_log2,
            slope_log2,
            SOFTCAP,
            ALIBI,
        )
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    if DROPOUT:
        out = out * dropout_scale
    lse = tl.where(empty, float("inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * LN2)
    o_base = Out + b64 * stride_ob + h64 * stride_oh + q_start.to(tl.int64) * stride_ot
    row_ok = offs_m < seqlen_q
    tl.store(
        o_base + offs_m[:, None] * stride_ot + offs_d[None, :],
        out.to(Out.dtype.element_ty),
        mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM),
    )
    tl.store(Lse + b64 * stride_lb + h64 * stride_lh + q_start + offs_m, lse, mask=row_ok)


_attn_fwd = autotuned(_attn_fwd_kernel, this_machine(FWD_CONFIGS))


def attention_forward(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    scale,
    left,
    right,
    dropout_p=0.0,
    seed=None,
    softcap=0.0,
    alibi_slopes=None,
):
    """out (like q, contiguous), lse float32 (B, H, Tq) or (H, total_q). dropout_p > 0: seed is the int64 (2,)
    (seed, offset) tensor on q's device that the mask is drawn from (kernels/_attention_dropout.py). softcap > 0 caps
    the scores, alibi_slopes (float32 (H,) or (B, H), contiguous) adds ALiBi's bias (flash-attn's)."""
    varlen, B, H, Hkv, cx, tune = launch_params(q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k, left, right)
    dropout = dropout_args(dropout_p, seed)
    flags, modifiers = score_modifiers(softcap, alibi_slopes)
    cx.update(flags)
    cx["TMA_ALIGNED"] = tma_aligned(q, k, v) and not dropout["DROPOUT"]  # dropout takes the pointer loop
    cx["FULL_TILES"] = full_tiles(varlen, max_seqlen_q, max_seqlen_k, left, right)
    if cx["TMA_ALIGNED"] and q.is_cuda:
        ensure_scratch_allocator()
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse_shape = (H, q.shape[0]) if varlen else (B, H, q.shape[1])
    lse = torch.empty(lse_shape, dtype=torch.float32, device=q.device)
    grid = lambda meta: (cdiv(max_seqlen_q, meta["BLOCK_M"]), H, B)  # noqa: E731
    _attn_fwd[grid](
        q,
        k,
        v,
        out,
        lse,
        cu_seqlens_q,
        cu_seqlens_k,
        *bth_strides(q, varlen),
        *bth_strides(k, varlen),
        *bth_strides(v, varlen),
        *bth_strides(out, varlen),
        *lse_strides(lse, varlen),
        max_seqlen_q,
        max_seqlen_k,
        scale / softcap if softcap > 0.0 else scale * LOG2E.value,
        left,
        right,
        *tune,
        **cx,
        **dropout,
        **modifiers,
    )
    return out, lse


# ---- ahead-of-time compile (tools/aot.py) --------------------------------------------------------------------------


SHIPPED_HEAD_DIMS = (64, 96, 128, 256)  # fasttrain/ops/attention.py's aot column: the head dims whose cubins ship
SHIPPED_GROUPS = (1, 2, 4, 8)  # and the GQA groups (GROUP is a constexpr: one cubin per group)
# and those whose dropout cubins ship: the build's budget (benchmarks/NOTES.md "Build switch") leaves 96 and 256 out
SHIPPED_DROPOUT_HEAD_DIMS = (64, 128)


def _shipped(arch: int, dtype: str) -> list[dict]:
    """The forward as csrc/attention_aot.cpp launches it: flash_attn_func's and flash_attn_varlen_func's common eager
    calls (dense or packed, fp16/bf16, head dim SHIPPED_HEAD_DIMS, no softcap or ALiBi; any window, causal or not) on
    the inputs TMA could read (the op copies others), under every config of arch's table for the head dim's class, per
    GQA group, with FULL_TILES off, and on too for the dense warp-specialized configs (the only ones that read it: the
    pipelined tiles compile to the same code either way, and the C++ op launches their FULL_TILES=False cubin; packed
    calls never have it). HEAD_DIM is a constexpr, so each head dim compiles its own; one that is not a power of 2 (96:
    HEAD_DIM_PAD 128, masked) is never TMA_ALIGNED, so its warp-specialized configs, which the pruner then leaves out,
    do not ship; a head dim of _attention_configs.ONE_TILE ships one config per launch. Then the same at
    SHIPPED_DROPOUT_HEAD_DIMS with dropout (DROPOUT, labelled " dropout"), as attention_forward launches it: TMA_ALIGNED
    off (dropout takes the pointer loop), under the configs the pruner keeps for it (no warp-specialized ones, none
    marked no_dropout). The registry keys a case by its constexprs, so of two configs differing only in num_warps or
    num_stages the first ships (none does today). Packed cases are labelled " varlen"; a case's label starts with its
    head dim (d96 for the d128 class's 96)."""
    if dtype not in ("fp16", "bf16"):
        return []
    cases, seen = [], set()
    for dropout in (False, True):
        for varlen in (False, True):
            for d in SHIPPED_DROPOUT_HEAD_DIMS if dropout else SHIPPED_HEAD_DIMS:
                launch = aot_launch(d, dtype)  # HEAD_DIM_PAD, and TMA_ALIGNED where d is a power of 2
                kept = [  # what the pruner keeps: warp-specialized configs only where TMA reads, none with dropout
                    c
                    for c in FWD_CONFIGS[arch][head_dim_class(d)]
                    if not (c.kwargs.get("WARP_SPECIALIZE", False) and (dropout or not launch["TMA_ALIGNED"]))
                    and not (dropout and getattr(c, "no_dropout", False))
                ]
                for group in SHIPPED_GROUPS:
                    for c in one_tile(d, arch, "fwd", kept):
                        ws = c.kwargs.get("WARP_SPECIALIZE", False)
                        for full in (False, True):
                            if full and (varlen or not ws):
                                continue  # the pipelined loop ignores FULL_TILES: its False cubin is the same code
                            constexprs = {**launch, **c.kwargs, "GROUP": group, "FULL_TILES": full}
                            constexprs.update(VARLEN=varlen, DROPOUT=dropout)
                            if dropout:
                                constexprs["TMA_ALIGNED"] = False
                            constexprs.setdefault("WARP_SPECIALIZE", False)
                            key = tuple(sorted(constexprs.items()))
                            if key in seen:
                                continue
                            seen.add(key)
                            tile = " ".join(f"{k}={v}" for k, v in c.kwargs.items())
                            label = f"d{d} G{group} {tile} w{c.num_warps} s{c.num_stages}" + " full" * full
                            cases.append(
                                dict(
                                    label=label + " varlen" * varlen + " dropout" * dropout,
                                    constexprs=constexprs,
                                    num_warps=c.num_warps,
                                    num_stages=c.num_stages,
                                )
                            )
    return [dict(kernel=_attn_fwd_kernel, types=AOT_TYPES, cases=cases)]


def aot_kernels(arch: int, dtype: str, shipped: bool = False) -> list[dict]:
    """shipped=True: the cubins of the C++ launch path (_shipped). shipped=False, CI's compile check: the forward under
    each of arch's configs (kernels/_attention_launch.aot_cases)."""
    if shipped:
        return _shipped(arch, dtype)
    cases = aot_cases(FWD_CONFIGS[arch], dtype, dropout=True, modified=True)
    return [dict(kernel=_attn_fwd_kernel, types=AOT_TYPES, cases=cases)]
