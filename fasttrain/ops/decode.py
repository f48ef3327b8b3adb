"""KV-cache decoding: `flash_attn_with_kvcache` (flash-attn's signature), its pure-PyTorch reference, the launcher
of the split-KV Triton kernels in fasttrain/kernels/decode.py, and the CPU path through the C++ attention kernel
(csrc/attention_cpu.cpp, op attention_kvcache_cpu).

Inference only: no gradients flow through it. The op appends the new k/v rows into the caches in place (it does not
advance cache_seqlens: the caller owns the lengths, as in flash-attn).
"""

from __future__ import annotations

import math

import torch

from fasttrain import _backend
from fasttrain.ops._op import custom_op
from fasttrain.ops.attention import _check_like_q, _refuse_unsupported, _scale, _window
from fasttrain.ops.rotary import apply_rotary_emb_reference

OP = "flash_attn_with_kvcache"
_MAX_HEAD_DIM = 256
# Keys per split at least: fewer would spend more on the split's setup and the combine than on reading K and V.
_MIN_KEYS_PER_SPLIT = 128
_MAX_SPLITS = 128


def num_splits_heuristic(batch_kv_heads: int, m_blocks: int, cache_len: int, num_sms: int) -> int:
    """How many chunks to cut each sequence's keys into so that the decode grid fills the GPU.

    batch_kv_heads * m_blocks programs run per split; aim for two per SM (one waits on memory while the other
    computes) but keep at least _MIN_KEYS_PER_SPLIT keys per split. Depends on the cache's allocated length, not on
    cache_seqlens, so it needs no host sync and a captured CUDA graph stays valid as the sequences grow.
    """
    programs = batch_kv_heads * m_blocks
    if programs >= num_sms:
        return 1
    wanted = math.ceil(2 * num_sms / programs)
    by_length = max(1, cache_len // _MIN_KEYS_PER_SPLIT)
    return max(1, min(wanted, by_length, _MAX_SPLITS))


def _parallel_units(device: torch.device) -> int:
    if device.type == "cuda":
        from fasttrain.kernels._launch import multiprocessor_count

        return multiprocessor_count(device)
    # The interpreter runs programs one after another: splitting only adds work there.
    return torch.get_num_threads()


# ----------------------------------------------------------------------------------------------------------- reference


def _append(
    q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, rows, rotary_interleaved: bool, q_per_token: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Write k/v (rotated, with q, when rotary tables are given) at rows cache_seqlens.. of the caches, in place.
    Returns q as attention sees it and the lengths (B,) int64 after the append. rows: (B,) cache row per sequence."""
    B, Tq = q.shape[:2]
    seqlens = cache_seqlens.long()
    if k is None:
        return q, seqlens
    t_new = k.shape[1]
    pos = seqlens[:, None] + torch.arange(t_new, device=q.device)  # (B, Tnew)
    if rotary_cos is not None:
        k = apply_rotary_emb_reference(k, rotary_cos[pos], rotary_sin[pos], rotary_interleaved)  # (B, Tnew, rd/2) rows
        qpos = (
            seqlens[:, None] + t_new - Tq + torch.arange(Tq, device=q.device)
            if q_per_token
            else seqlens[:, None].expand(B, Tq)
        )  # (B, Tq)
        q = apply_rotary_emb_reference(q, rotary_cos[qpos], rotary_sin[qpos], rotary_interleaved)
    k_cache[rows[:, None], pos] = k
    v_cache[rows[:, None], pos] = v
    return q, seqlens + t_new


def _cache_rows(q: torch.Tensor, cache_batch_idx: torch.Tensor | None) -> torch.Tensor:
    return cache_batch_idx.long() if cache_batch_idx is not None else torch.arange(q.shape[0], device=q.device)


def reference_kvcache(
    q,
    k_cache,
    v_cache,
    k,
    v,
    rotary_cos,
    rotary_sin,
    cache_seqlens,
    cache_batch_idx,
    softmax_scale: float,
    window_left: int,
    window_right: int,
    rotary_interleaved: bool,
    q_per_token: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch, fp32 math: appends k/v in place like the kernels, returns out (B, Tq, H, D) and lse (B, H, Tq).

    Takes the normalized arguments of the op (see flash_attn_with_kvcache): cache_seqlens a (B,) tensor, window
    sides as from fasttrain.ops.attention._window. A query row that sees no key gives 0 and lse = +inf, as the
    attention op (and flash-attn).
    """
    B, Tq, H, D = q.shape
    Tmax, Hkv = k_cache.shape[1], k_cache.shape[2]
    rows = _cache_rows(q, cache_batch_idx)
    q, lengths = _append(
        q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, rows, rotary_interleaved, q_per_token
    )
    kc = k_cache[rows].float().repeat_interleave(H // Hkv, dim=2)  # (B, Tmax, H, D)
    vc = v_cache[rows].float().repeat_interleave(H // Hkv, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q.float(), kc) * softmax_scale  # (B, H, Tq, Tmax)
    j = torch.arange(Tmax, device=q.device)
    qpos = lengths[:, None] - Tq + torch.arange(Tq, device=q.device)  # (B, Tq)
    visible = (
        (j < lengths[:, None, None]) & (j - qpos[..., None] <= window_right) & (qpos[..., None] - j <= window_left)
    )  # (B, Tq, Tmax)
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # (B, H, Tq); -inf where no key is visible
    empty = torch.isinf(lse)
    probs = torch.exp(scores - torch.where(empty, 0.0, lse)[..., None])
    out = torch.einsum("bhts,bshd->bthd", probs, vc)
    return out.to(q.dtype).contiguous(), torch.where(empty, float("inf"), lse)


def cpu_kvcache(
    q,
    k_cache,
    v_cache,
    k,
    v,
    rotary_cos,
    rotary_sin,
    cache_seqlens,
    cache_batch_idx,
    softmax_scale: float,
    window_left: int,
    window_right: int,
    rotary_interleaved: bool,
    q_per_token: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's append, then the C++ kernel, which reads each sequence's cache row in place (no copy of the
    cache, no repeat of K/V over a GQA group). Arguments as reference_kvcache."""
    q, lengths = _append(
        q,
        k_cache,
        v_cache,
        k,
        v,
        rotary_cos,
        rotary_sin,
        cache_seqlens,
        _cache_rows(q, cache_batch_idx),
        rotary_interleaved,
        q_per_token,
    )
    return torch.ops.fasttrain.attention_kvcache_cpu(
        q, k_cache, v_cache, lengths, cache_batch_idx, softmax_scale, window_left, window_right
    )


# ------------------------------------------------------------------------------------------------------------ launcher


def triton_kvcache(
    q,
    k_cache,
    v_cache,
    k,
    v,
    rotary_cos,
    rotary_sin,
    cache_seqlens,
    cache_batch_idx,
    softmax_scale: float,
    window_left: int,
    window_right: int,
    rotary_interleaved: bool,
    q_per_token: bool,
    num_splits: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch append (if k), decode and (with several splits) combine. Inputs are already checked."""
    from fasttrain.kernels import decode as kernels
    from fasttrain.kernels._launch import cdiv, next_power_of_2

    B, Tq, H, D = q.shape
    Tmax, Hkv = k_cache.shape[1], k_cache.shape[2]
    G = H // Hkv
    block_d = max(16, next_power_of_2(D))
    # The kernels index these at unit stride (SEQLENS + b, COS + pos * stride_rot + i): a strided view, such as a
    # column of a (B, 2) tensor, would be read wrong. No-ops for the usual contiguous tensors.
    cache_seqlens = cache_seqlens.contiguous()
    cache_batch_idx = None if cache_batch_idx is None else cache_batch_idx.contiguous()
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
        kernels._decode_append_kernel[(B * t_rows, max(H, Hkv))](
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
            Q_PER_TOKEN=q_per_token,
            INTERLEAVED=rotary_interleaved,
            HAS_BATCH_IDX=has_batch_idx,
            BLOCK_D=block_d,
            BLOCK_R=max(1, next_power_of_2(half)),
            num_warps=kernels.append_num_warps(D),
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
    kernels._decode[(B * Hkv, splits, m_blocks)](
        q,
        k_cache,
        v_cache,
        cache_seqlens,
        batch_idx,
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
        o_dst.stride(-4),
        o_dst.stride(-3),
        o_dst.stride(-2),
        *l_strides,
        os_stride,
        softmax_scale * math.log2(math.e),
        Tq,
        G,
        Hkv,
        t_new,
        window_left,
        window_right,
        Tmax,
        next_power_of_2(Tmax),
        HEAD_DIM=D,
        NUM_SPLITS=splits,
        HAS_BATCH_IDX=has_batch_idx,
        BLOCK_M=block_m,
        BLOCK_D=block_d,
    )
    if splits > 1:
        block_s = next_power_of_2(splits)
        kernels._decode_combine_kernel[(B * Tq * H,)](
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
            num_warps=kernels.combine_num_warps(block_s, block_d),
        )
    return out, lse


# ---------------------------------------------------------------------------------------------------- op registration


@custom_op("fasttrain::flash_attn_with_kvcache", mutates_args=("k_cache", "v_cache"))
def _kvcache_op(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor | None,
    v: torch.Tensor | None,
    rotary_cos: torch.Tensor | None,
    rotary_sin: torch.Tensor | None,
    cache_seqlens: torch.Tensor,
    cache_batch_idx: torch.Tensor | None,
    softmax_scale: float,
    window_left: int,
    window_right: int,
    rotary_interleaved: bool,
    q_per_token: bool,
    num_splits: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    args = (
        q,
        k_cache,
        v_cache,
        k,
        v,
        rotary_cos,
        rotary_sin,
        cache_seqlens,
        cache_batch_idx,
        softmax_scale,
        window_left,
        window_right,
        rotary_interleaved,
        q_per_token,
    )
    if backend == "triton":
        return triton_kvcache(*args, num_splits)
    if backend == "cpu":
        return cpu_kvcache(*args)
    return reference_kvcache(*args)


@_kvcache_op.register_fake
def _(
    q,
    k_cache,
    v_cache,
    k,
    v,
    rotary_cos,
    rotary_sin,
    cache_seqlens,
    cache_batch_idx,
    softmax_scale,
    window_left,
    window_right,
    rotary_interleaved,
    q_per_token,
    num_splits,
    backend,
):
    B, Tq, H, _ = q.shape
    return q.new_empty(q.shape), q.new_empty(B, H, Tq, dtype=torch.float32)


def _backend_reasons(q: torch.Tensor) -> dict[str, str | None]:
    triton_why = _backend.triton_reason(q.device)
    if triton_why is None:
        if q.device.type == "cuda" and q.dtype not in (torch.float16, torch.bfloat16):
            triton_why = f"the decode kernel takes fp16/bf16 on CUDA, got {q.dtype}"
        elif q.device.type == "cpu" and q.dtype != torch.float32:
            triton_why = (
                f"the Triton interpreter runs the decode kernel in fp32 only (bf16 is broken there), got {q.dtype}"
            )
        elif q.shape[-1] > _MAX_HEAD_DIM:
            triton_why = f"head_dim {q.shape[-1]} > {_MAX_HEAD_DIM}"
    return {"triton": triton_why, "cpu": _backend.cpu_kernel_reason(q, _CPU_OP_REASON), "reference": None}


# Read once, at import, as in fasttrain.ops.attention (Dynamo cannot trace the extension's import).
_CPU_OP_REASON = _backend.native_op_reason("attention_kvcache_cpu")
_backend.register(
    OP, lambda: {"triton": _backend.triton_reason(_backend.default_device()), "cpu": _CPU_OP_REASON, "reference": None}
)


# ---------------------------------------------------------------------------------------------------------- public API


def _check(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx) -> None:
    """Shapes, dtypes and devices; raises ValueError/TypeError naming the argument."""
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D, got shape {tuple(t.shape)}")
    if not q.is_floating_point():
        raise TypeError(f"q must be a floating-point tensor, got {q.dtype}")
    B, Tq, H, D = q.shape
    Bc, Tmax, Hkv, Dc = k_cache.shape
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache must have k_cache's shape {tuple(k_cache.shape)}, got {tuple(v_cache.shape)}")
    if Dc != D:
        raise ValueError(f"k_cache head_dim {Dc} does not match q's head_dim {D}")
    if Hkv == 0 or H % Hkv:
        raise ValueError(f"q's heads ({H}) must be a multiple of k_cache's heads ({Hkv})")
    _check_like_q(q, (("k_cache", k_cache), ("v_cache", v_cache)))
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension (it is updated in place)")
    if (k is None) != (v is None):
        raise ValueError("k and v must be given together")
    if k is not None:
        for name, t in (("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
            if t.dim() != 4 or t.shape[0] != B or t.shape[2:] != (Hkv, D):
                raise ValueError(f"{name} must be (B={B}, Tnew, Hkv={Hkv}, D={D}), got {tuple(t.shape)}")
            if t.dtype != k_cache.dtype or t.device != q.device:
                raise TypeError(f"{name} must be {k_cache.dtype} on {q.device}, got {t.dtype} on {t.device}")
        if v.shape[1] != k.shape[1]:
            raise ValueError(f"k and v must have the same number of new tokens, got {k.shape[1]} and {v.shape[1]}")
    if (rotary_cos is None) != (rotary_sin is None):
        raise ValueError("rotary_cos and rotary_sin must be given together")
    if rotary_cos is not None:
        if k is None:
            raise ValueError("rotary_cos/rotary_sin rotate the appended k: pass k and v with them")
        if rotary_cos.dim() != 2 or rotary_cos.shape != rotary_sin.shape or not 0 < 2 * rotary_cos.shape[1] <= D:
            raise ValueError(
                f"rotary_cos and rotary_sin must both be (seqlen_ro, rotary_dim / 2) with rotary_dim <= "
                f"head_dim {D}, got {tuple(rotary_cos.shape)} and {tuple(rotary_sin.shape)}"
            )
        if rotary_cos.device != q.device or rotary_sin.device != q.device:
            raise ValueError(f"rotary_cos and rotary_sin must be on q's device {q.device}")
    if cache_seqlens is None and k is not None:
        raise ValueError("cache_seqlens is required when k and v are appended (it says where they go)")
    for name, t in (("cache_seqlens", cache_seqlens), ("cache_batch_idx", cache_batch_idx)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or t.shape != (B,) or t.dtype not in (torch.int32, torch.int64):
            raise ValueError(
                f"{name} must be an int32/int64 tensor of shape ({B},), "
                f"got {getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}"
            )
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, q on {q.device}")
    if cache_batch_idx is None and Bc != B:
        raise ValueError(f"k_cache's batch {Bc} must equal q's batch {B} (or pass cache_batch_idx)")


def _check_values(cache_seqlens, cache_batch_idx, t_new: int, Tmax: int, Bc: int, rotary_rows: int | None) -> None:
    """Lengths against the cache and the rotary table. One host sync; skipped while a CUDA graph is being captured."""
    if cache_seqlens.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    parts = [cache_seqlens.min(), cache_seqlens.max()]
    if cache_batch_idx is not None:
        parts += [cache_batch_idx.min(), cache_batch_idx.max()]
    lo, hi, *idx = torch.stack([p.long() for p in parts]).tolist()
    if lo < 0:
        raise ValueError(f"cache_seqlens must be >= 0, got a minimum of {lo}")
    if hi + t_new > Tmax:
        raise ValueError(
            f"cache too short: a sequence needs {hi + t_new} rows (cache_seqlens {hi} + {t_new} new), "
            f"k_cache has {Tmax}"
        )
    if idx and (idx[0] < 0 or idx[1] >= Bc):
        raise ValueError(f"cache_batch_idx must lie in [0, {Bc}), got values in [{idx[0]}, {idx[1]}]")
    if rotary_rows is not None and hi + t_new > rotary_rows:
        raise ValueError(f"rotary_cos has {rotary_rows} rows, positions up to {hi + t_new - 1} are needed")


def flash_attn_with_kvcache(
    q,
    k_cache,
    v_cache,
    k=None,
    v=None,
    rotary_cos=None,
    rotary_sin=None,
    cache_seqlens=None,
    cache_batch_idx=None,
    cache_leftpad=None,
    block_table=None,
    softmax_scale=None,
    causal=True,
    window_size=(-1, -1),
    softcap=0.0,
    rotary_interleaved=True,
    alibi_slopes=None,
    num_splits=0,
    return_softmax_lse=False,
    *,
    check_lengths=True,
    backend=None,
):
    """Attention of a few new query tokens against a KV cache, appending their k/v in place (flash-attn's signature).

    Args:
        q: (B, Tq, H, D), Tq usually 1..16.
        k_cache, v_cache: (B_cache, Tmax, Hkv, D), Hkv divides H, q's dtype; updated in place when k/v are given.
        k, v: (B, Tnew, Hkv, D) or None: written at rows cache_seqlens[b] .. cache_seqlens[b] + Tnew - 1.
        rotary_cos, rotary_sin: (seqlen_ro, rotary_dim / 2) or None: rotate the first rotary_dim dims of k at its
            cache positions and of q (at its causal positions, or all at cache_seqlens when neither causal nor
            windowed). rotary_interleaved picks pairs (0, 1), (2, 3).. over (i, i + rotary_dim / 2). Where Tq !=
            Tnew, q row t turns by its position in the causal mask below (cache_seqlens + Tnew - Tq + t), where
            flash-attn turns it by cache_seqlens + t, off the position its own mask gives it; at Tq == Tnew, the
            decoding case, the two agree.
        cache_seqlens: int or (B,) int32/int64 tensor: rows already in the cache. Attention covers
            cache_seqlens + Tnew keys. None: the whole cache (Tmax), only without k/v. Not advanced here.
        cache_batch_idx: (B,) int tensor or None: the cache row of each sequence.
        softmax_scale: default 1 / sqrt(D).
        causal: query token t sits at key position cache_seqlens + Tnew - Tq + t and sees keys up to it.
            (flash-attn defaults to False; True is what decoding a causal model needs.)
        window_size: (left, right), -1 for unbounded: keys in [qpos - left, qpos + right].
        num_splits: 0 picks the split-KV factor from B * Hkv and Tmax; > 1 forces it.
        return_softmax_lse: also return the logsumexp (B, H, Tq), fp32; +inf for a row that sees no key (its out
            is 0), as fasttrain's flash_attn_func.
        check_lengths: check cache_seqlens (and cache_batch_idx, and the rotary table) against the cache, at the
            cost of one host sync; skipped anyway while a CUDA graph is captured. A caller that tracks the lengths
            itself (fasttrain.generate) passes False. Rows past the cache end are never written either way.
        backend: "auto" (default), "triton", "cpu" (the C++ kernel: CPU tensors in fp32, bf16 or fp16, any
            head_dim; num_splits does not apply) or "reference"; see fasttrain._backend.
        cache_leftpad, block_table (paged cache), alibi_slopes and softcap are flash-attn options that this op does
            not implement: anything but their defaults raises ValueError. So does num_splits < 0.

    Returns:
        out (B, Tq, H, D) in q's dtype, and lse when return_softmax_lse.
    """
    _refuse_unsupported(softcap, alibi_slopes)
    if cache_leftpad is not None or block_table is not None:
        raise ValueError("cache_leftpad and block_table (a paged cache) must be None: not implemented")
    if isinstance(cache_seqlens, int) and isinstance(q, torch.Tensor):
        cache_seqlens = torch.full((q.shape[0],), cache_seqlens, dtype=torch.int32, device=q.device)
    _check(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx)
    left, right = _window(causal, window_size)
    if not isinstance(num_splits, int) or num_splits < 0:
        raise ValueError(f"num_splits must be an int >= 0, got {num_splits!r}")
    B, Tq, H, D = q.shape
    Bc, Tmax = k_cache.shape[:2]
    if cache_seqlens is None:
        cache_seqlens = torch.full((B,), Tmax, dtype=torch.int32, device=q.device)
    t_new = 0 if k is None else k.shape[1]
    if check_lengths:
        _check_values(
            cache_seqlens, cache_batch_idx, t_new, Tmax, Bc, None if rotary_cos is None else rotary_cos.shape[0]
        )
    q_per_token = causal or tuple(window_size) != (-1, -1)
    scale = _scale(softmax_scale, D)
    name = _backend.choose(OP, _backend_reasons(q), backend)
    if k is not None:
        k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (k, v))
    q = q if q.stride(-1) == 1 else q.contiguous()
    out, lse = _kvcache_op(
        q,
        k_cache,
        v_cache,
        k,
        v,
        rotary_cos,
        rotary_sin,
        cache_seqlens,
        cache_batch_idx,
        scale,
        left,
        right,
        bool(rotary_interleaved),
        q_per_token,
        num_splits,
        name,
    )
    return (out, lse) if return_softmax_lse else out
