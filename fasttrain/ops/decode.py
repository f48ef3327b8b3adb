"""KV-cache decoding: `flash_attn_with_kvcache`, flash-attn's signature.

Backends: `aot` (the same kernels compiled ahead of time and launched from C++, csrc/decode_aot.cpp, for the common
eager call: fp16/bf16, head_dim 64, 128 or 256, no rotary, cache_batch_idx, block_table, softcap or ALiBi; CUDA, with
the cubins of a CUDA build), `triton` (the split-KV kernels, kernels/decode.py), `cpu` (the reference's append, then
the C++ decode kernel of csrc/attention_cpu.cpp, which reads each sequence's cache row in place) and `reference`
(plain PyTorch, fp32 math).

Inference only: no gradients flow through it. The op appends the new k/v rows into the caches in place (it does not
advance cache_seqlens: the caller owns the lengths, as in flash-attn).
"""

from __future__ import annotations

import torch

from fasttrain import _backend, _extension
from fasttrain._backend import ArgumentError, ArgumentTypeError
from fasttrain.ops._op import custom_op
from fasttrain.ops.attention import flash_lse
from fasttrain.ops.attention_checks import (
    _check_alibi,
    _check_block_table,
    _check_like_q,
    _check_softcap,
    _scale,
    _window,
)
from fasttrain.ops.attention_reference import UNBOUNDED
from fasttrain.ops.rotary import apply_rotary_emb_reference

MAX_HEAD_DIM = 256  # the Triton kernels' widest head


# ---- the backends: what each computes -------------------------------------------------------------------------------


def _append(
    q,
    k_cache,
    v_cache,
    k,
    v,
    rotary_cos,
    rotary_sin,
    cache_seqlens,
    rows,
    block_table,
    rotary_interleaved: bool,
    q_per_token: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Write k/v (rotated, with q, when rotary tables are given) at rows cache_seqlens.. of the caches, in place.
    Returns q as attention sees it and the lengths (B,) int64 after the append. rows: (B,) cache row per sequence;
    block_table: (B, max_blocks) pages of a paged cache, or None."""
    B, Tq = q.shape[:2]
    seqlens = cache_seqlens.long()
    if k is None:
        return q, seqlens
    t_new = k.shape[1]
    pos = seqlens[:, None] + torch.arange(t_new, device=q.device)  # (B, Tnew)
    if rotary_cos is not None:
        k = apply_rotary_emb_reference(k, rotary_cos[pos], rotary_sin[pos], rotary_interleaved)  # (B, Tnew, rd/2) rows
        # flash-attn's positions: row t at cache_seqlens + t, or every row at cache_seqlens when neither causal nor
        # windowed
        qpos = seqlens[:, None] + torch.arange(Tq, device=q.device) if q_per_token else seqlens[:, None].expand(B, Tq)
        q = apply_rotary_emb_reference(q, rotary_cos[qpos], rotary_sin[qpos], rotary_interleaved)
    if block_table is None:
        where = (rows[:, None], pos)
    else:  # sequence b's row p: row p % page of page block_table[b, p // page]
        page = k_cache.shape[1]
        where = (block_table.long().gather(1, pos // page), pos % page)
    k_cache[where] = k
    v_cache[where] = v
    return q, seqlens + t_new


def _paged(cache: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
    """(B, max_blocks * page, Hkv, D): each sequence's pages in order, copied out of the paged cache."""
    return cache[block_table.long()].flatten(1, 2)  # (B, max_blocks, page, Hkv, D) -> (B, max_blocks * page, ...)


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
    cache_leftpad,
    block_table,
    softmax_scale: float,
    window_left: int,
    window_right: int,
    rotary_interleaved: bool,
    q_per_token: bool,
    num_splits: int = 0,
    softcap: float = 0.0,
    alibi_slopes=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch, fp32 math: appends k/v in place like the kernels, returns out (B, Tq, H, D) and lse (B, H, Tq).

    Takes the registered op's arguments (see flash_attn_with_kvcache): cache_seqlens a (B,) tensor, window sides as
    from fasttrain.ops.attention._window; num_splits is the Triton launch's and changes nothing here. A query row
    that sees no key gives 0 and lse = +inf, as the attention op (and flash-attn).
    """
    B, Tq, H, D = q.shape
    Hkv = k_cache.shape[2]
    rows = _cache_rows(q, cache_batch_idx)
    q, lengths = _append(
        q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, rows, block_table, rotary_interleaved,
        q_per_token,
    )  # fmt: skip
    if block_table is not None:
        k_cache, v_cache, rows = _paged(k_cache, block_table), _paged(v_cache, block_table), torch.arange(B)
    Tmax = k_cache.shape[1]
    kc = k_cache[rows].float().repeat_interleave(H // Hkv, dim=2)  # (B, Tmax, H, D)
    vc = v_cache[rows].float().repeat_interleave(H // Hkv, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q.float(), kc) * softmax_scale  # (B, H, Tq, Tmax)
    j = torch.arange(Tmax, device=q.device)
    qpos = lengths[:, None] - Tq + torch.arange(Tq, device=q.device)  # (B, Tq)
    if softcap > 0.0:
        scores = torch.tanh(scores / softcap) * softcap
    if alibi_slopes is not None:  # -slope * |qpos - j|: a left pad shifts both positions alike (flash-attn's)
        slopes = alibi_slopes.float().reshape(-1, H)[:, :, None, None]  # (B or 1, H, 1, 1)
        scores = scores - slopes * (qpos[:, None, :, None] - j).abs().float()  # (B, H, Tq, Tmax)
    visible = (
        (j < lengths[:, None, None]) & (j - qpos[..., None] <= window_right) & (qpos[..., None] - j <= window_left)
    )  # (B, Tq, Tmax)
    if cache_leftpad is not None:
        visible &= j >= cache_leftpad.long()[:, None, None]  # the sequence's padding rows
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # (B, H, Tq); -inf where no key is visible
    empty = torch.isinf(lse)
    probs = torch.exp(scores - torch.where(empty, 0.0, lse)[..., None])
    # Cache rows at or past a sequence's length are never read, as in the kernels: a NaN there (torch.empty's
    # garbage) must not reach the output through a 0 probability.
    vc = vc.masked_fill((j >= lengths[:, None])[:, :, None, None], 0.0)  # (B, Tmax, H, D)
    out = torch.einsum("bhts,bshd->bthd", probs, vc)
    return out.to(q.dtype).contiguous(), torch.where(empty, float("inf"), lse)


class Reference:
    forward = staticmethod(reference_kvcache)


class Cpu:
    """The reference's append, then the C++ kernel, which reads each sequence's cache row in place (no copy of the
    cache, no repeat of K/V over a GQA group); a paged cache's pages are copied out per sequence first."""

    @staticmethod
    def forward(
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
        rows = _cache_rows(q, cache_batch_idx)
        q, lengths = _append(
            q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, rows, block_table, rotary_interleaved,
            q_per_token,
        )  # fmt: skip
        if block_table is not None:  # the C++ kernel reads contiguous rows: each sequence's pages copied out
            k_cache, v_cache = _paged(k_cache, block_table), _paged(v_cache, block_table)
        args = (cache_batch_idx, cache_leftpad, softmax_scale, window_left, window_right, softcap, alibi_slopes)
        return torch.ops.fasttrain.attention_kvcache_cpu(q, k_cache, v_cache, lengths, *args)


class Aot:
    """csrc/decode_aot.cpp: kernels/decode.py's launches from C++, for the calls _aot_reason lets through."""

    @staticmethod
    def forward(
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
        args = (cache_seqlens, cache_leftpad, softmax_scale, window_left, window_right, num_splits)
        return torch.ops.fasttrain.decode_aot(q, k_cache, v_cache, k, v, *args)


class Triton:
    """kernels/decode.py: append (rotary fused), split-KV decode, combine."""

    @staticmethod
    def forward(*args) -> tuple[torch.Tensor, torch.Tensor]:  # the registered op's arguments, less the backend
        return _backend.kernels("decode").decode(*args)


# ---- the table: which backend can serve which inputs ----------------------------------------------------------------

# Read once, at import: Dynamo cannot trace the extension's import.
_CPU_OP_REASON = _backend.native_op_reason("attention_kvcache_cpu")
_AOT_OP_REASON = _backend.native_op_reason("decode_aot")

# What kernels/decode.py aot_kernels(shipped=True) lists (not read from there: that would import Triton).
_AOT_DTYPES = (torch.float16, torch.bfloat16)
_AOT_HEAD_DIMS = (64, 128, 256)
_AOT_MAX_SPLITS = 128


def _aot_reason(q, k_cache, v_cache, rotary_cos, cache_batch_idx, block_table, softcap, alibi_slopes, num_splits):
    """None for the calls whose kernels ship (kernels/decode.py _shipped); else why the JIT serves them."""
    if (why := _backend.aot_reason(q.device)) is not None:
        return why
    if _AOT_OP_REASON is not None:
        return _AOT_OP_REASON
    if q.dtype not in _AOT_DTYPES:
        return f"the shipped decode cubins take fp16 or bf16, got {q.dtype}"
    if q.shape[-1] not in _AOT_HEAD_DIMS:
        return f"the shipped decode cubins take head_dim 64, 128 or 256, got {q.shape[-1]}"
    for name, given in (
        ("rotary fused into the append", rotary_cos is not None),
        ("cache_batch_idx", cache_batch_idx is not None),
        ("a paged cache (block_table)", block_table is not None),
        ("softcap", softcap > 0.0),
        ("alibi_slopes", alibi_slopes is not None),
    ):
        if given:
            return f"the shipped decode cubins do not take {name}"
    if num_splits > _AOT_MAX_SPLITS:
        return f"the shipped combine takes at most {_AOT_MAX_SPLITS} splits, got num_splits={num_splits}"
    for cache in (k_cache, v_cache):  # updated in place, so never copied: the JIT compiles for other layouts
        # Dynamo cannot trace storage_offset: a traced call with a misaligned cache meets the C++ op's error instead
        offset = 0 if torch.compiler.is_compiling() else cache.storage_offset() * cache.element_size()
        if any(s % 16 for s in cache.stride()[:3]) or offset % 16:
            return "the shipped decode cubins take caches with 16-byte aligned rows (strides multiples of 16)"
    return None


def _triton_reason(q: torch.Tensor, *_) -> str | None:
    if (why := _backend.triton_reason(q.device)) is not None:
        return why
    if q.device.type == "cuda" and q.dtype not in (torch.float16, torch.bfloat16):
        return f"the decode kernel takes fp16/bf16 on CUDA, got {q.dtype}"
    if q.device.type == "cpu" and q.dtype != torch.float32:
        return f"the Triton interpreter runs the decode kernel in fp32 only (bf16 is broken there), got {q.dtype}"
    if q.shape[-1] > MAX_HEAD_DIM:
        return f"head_dim {q.shape[-1]} > {MAX_HEAD_DIM}"
    return None


DECODE = _backend.Table(
    "flash_attn_with_kvcache",
    {
        "aot": _backend.Backend(_aot_reason, Aot, live=_backend.aot_live),
        "triton": _backend.Backend(_triton_reason, Triton, live=_backend.triton_live),
        "cpu": _backend.Backend(
            lambda q, *_: _backend.cpu_kernel_reason(q, _CPU_OP_REASON), Cpu, live=lambda: _CPU_OP_REASON
        ),
        "reference": _backend.Backend(_backend.always, Reference),
    },
)


# ---- the registered op: one body for every backend, its fake implementation -----------------------------------------


@custom_op(
    "fasttrain::flash_attn_with_kvcache",
    mutates_args=("k_cache", "v_cache"),
    table=DECODE,
    reference=Reference.forward,
)
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
    cache_leftpad: torch.Tensor | None,
    block_table: torch.Tensor | None,
    softmax_scale: float,
    window_left: int,
    window_right: int,
    rotary_interleaved: bool,
    q_per_token: bool,
    num_splits: int,
    softcap: float,
    alibi_slopes: torch.Tensor | None,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    return DECODE[backend].forward(
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
        softmax_scale,
        window_left,
        window_right,
        rotary_interleaved,
        q_per_token,
        num_splits,
        softcap,
        alibi_slopes,
    )


@_kvcache_op.register_fake
def _(q, *args):
    B, Tq, H, _ = q.shape
    return q.new_empty(q.shape), q.new_empty(B, H, Tq, dtype=torch.float32)


# ---- the public function: check the arguments, choose, call --------------------------------------------------------


def _check(
    q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx, cache_leftpad, paged: bool
) -> None:
    """Shapes, dtypes and devices; raises ValueError/TypeError naming the argument."""
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, torch.Tensor):
            raise ArgumentTypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ArgumentError(f"{name} must be 4-D, got shape {tuple(t.shape)}")
    if not q.is_floating_point():
        raise ArgumentTypeError(f"q must be a floating-point tensor, got {q.dtype}")
    B, Tq, H, D = q.shape
    Bc, Tmax, Hkv, Dc = k_cache.shape
    if v_cache.shape != k_cache.shape:
        raise ArgumentError(f"v_cache must have k_cache's shape {tuple(k_cache.shape)}, got {tuple(v_cache.shape)}")
    if Dc != D:
        raise ArgumentError(f"k_cache head_dim {Dc} does not match q's head_dim {D}")
    if Hkv == 0 or H % Hkv:
        raise ArgumentError(f"q's heads ({H}) must be a multiple of k_cache's heads ({Hkv})")
    _check_like_q(q, (("k_cache", k_cache), ("v_cache", v_cache)))
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.stride(-1) != 1:
            raise ArgumentError(f"{name} must be contiguous in its last dimension (it is updated in place)")
    if (k is None) != (v is None):
        raise ArgumentError("k and v must be given together")
    if k is not None:
        for name, t in (("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor):
                raise ArgumentTypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
            if t.dtype != k_cache.dtype:
                raise ArgumentTypeError(f"{name} must have k_cache's dtype {k_cache.dtype}, got {t.dtype}")
            if t.dim() != 4 or t.shape[0] != B or t.shape[2:] != (Hkv, D):
                raise ArgumentError(f"{name} must be (B={B}, Tnew, Hkv={Hkv}, D={D}), got {tuple(t.shape)}")
            if t.device != q.device:
                raise ArgumentError(f"{name} must be on q's device {q.device}, got {t.device}")
        if v.shape[1] != k.shape[1]:
            raise ArgumentError(f"k and v must have the same number of new tokens, got {k.shape[1]} and {v.shape[1]}")
    if (rotary_cos is None) != (rotary_sin is None):
        raise ArgumentError("rotary_cos and rotary_sin must be given together")
    if rotary_cos is not None:
        for name, t in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin)):
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                got = getattr(t, "dtype", type(t).__name__)
                raise ArgumentTypeError(f"{name} must be a floating-point tensor, got {got}")
        if k is None:
            raise ArgumentError("rotary_cos/rotary_sin rotate the appended k: pass k and v with them")
        if rotary_cos.dim() != 2 or rotary_cos.shape != rotary_sin.shape or not 0 < 2 * rotary_cos.shape[1] <= D:
            raise ArgumentError(
                f"rotary_cos and rotary_sin must both be (seqlen_ro, rotary_dim / 2) with rotary_dim <= "
                f"head_dim {D}, got {tuple(rotary_cos.shape)} and {tuple(rotary_sin.shape)}"
            )
        if rotary_cos.device != q.device or rotary_sin.device != q.device:
            raise ArgumentError(f"rotary_cos and rotary_sin must be on q's device {q.device}")
    if cache_seqlens is None and k is not None:
        raise ArgumentError("cache_seqlens is required when k and v are appended (it says where they go)")
    for name, t in (
        ("cache_seqlens", cache_seqlens),
        ("cache_batch_idx", cache_batch_idx),
        ("cache_leftpad", cache_leftpad),
    ):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or t.dtype not in (torch.int32, torch.int64):
            raise ArgumentTypeError(
                f"{name} must be an int32/int64 tensor of shape ({B},), got {getattr(t, 'dtype', type(t).__name__)}"
            )
        if t.shape != (B,):
            raise ArgumentError(f"{name} must be an int32/int64 tensor of shape ({B},), got shape {tuple(t.shape)}")
        if t.device != q.device:
            raise ArgumentError(f"{name} is on {t.device}, q on {q.device}")
    if cache_batch_idx is None and Bc != B and not paged:
        raise ArgumentError(f"k_cache's batch {Bc} must equal q's batch {B} (or pass cache_batch_idx)")


PAGE_MULTIPLE = 128  # the Triton decode kernel's widest key tile: each tile then lies in one page


def _check_paged(q, k_cache, block_table, cache_batch_idx) -> None:
    """A paged cache: k_cache (num_blocks, page_block_size, Hkv, D), block_table (B, max_blocks) int32."""
    _check_block_table(block_table, q.shape[0], q.device)
    if k_cache.shape[1] % PAGE_MULTIPLE:
        raise ArgumentError(
            f"page_block_size (k_cache.shape[1] with a block_table) must be a multiple of {PAGE_MULTIPLE}, "
            f"got {k_cache.shape[1]}"
        )
    if cache_batch_idx is not None:
        raise ArgumentError("cache_batch_idx must be None with a block_table (a paged cache picks pages, not rows)")


def _check_values(cache_seqlens, index, cache_leftpad, t_new: int, Tmax: int, rotary_rows, rotary_span: int) -> None:
    """Lengths against the cache and the rotary table, whose rows cache_seqlens .. cache_seqlens + rotary_span - 1
    are read, and index = (name, tensor, bound) (cache_batch_idx's rows or block_table's pages) within [0, bound).
    One host sync; skipped while a CUDA graph is being captured."""
    if cache_seqlens.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    parts = [cache_seqlens.min(), cache_seqlens.max()]
    if cache_leftpad is not None:  # padding within the filled rows: 0 <= cache_leftpad <= cache_seqlens
        parts += [cache_leftpad.min(), (cache_leftpad.long() - cache_seqlens.long()).max()]
    if index is not None:
        parts += [index[1].min(), index[1].max()]
    lo, hi, *rest = torch.stack([p.long() for p in parts]).tolist()
    if cache_leftpad is not None:
        (pad_lo, past), rest = rest[:2], rest[2:]
        if pad_lo < 0 or past > 0:
            raise ArgumentError("cache_leftpad must lie in [0, cache_seqlens] for every sequence")
    idx = rest
    if lo < 0:
        raise ArgumentError(f"cache_seqlens must be >= 0, got a minimum of {lo}")
    if hi + t_new > Tmax:
        paged = index is not None and index[0] == "block_table"
        room = f"block_table's pages hold {Tmax} per sequence" if paged else f"k_cache has {Tmax}"
        raise ArgumentError(
            f"cache too short: a sequence needs {hi + t_new} rows (cache_seqlens {hi} + {t_new} new), {room}"
        )
    if idx and (idx[0] < 0 or idx[1] >= index[2]):
        raise ArgumentError(f"{index[0]} must lie in [0, {index[2]}), got values in [{idx[0]}, {idx[1]}]")
    if rotary_rows is not None and hi + rotary_span > rotary_rows:
        raise ArgumentError(f"rotary_cos has {rotary_rows} rows, positions up to {hi + rotary_span - 1} are needed")


# ---- the short path: the generation loops' call, straight to the aot op ---------------------------------------------

_AOT_OP = torch.ops.fasttrain.decode_aot.default if _AOT_OP_REASON is None else None  # None: no short path
_SHORT = _extension.load()[0].decode_short if _AOT_OP is not None else None


def _aot_short(q, k_cache, v_cache, k, v, cache_seqlens, cache_leftpad, softmax_scale, causal, window_size, num_splits):
    """out from the aot op for a call that the checks and choice of the general path would send there unchanged, the
    call of a generation loop (fasttrain.generate, the Hugging Face integration's decode step): plain tensors of one
    shipped dtype on one device, caches of q's batch with 16-byte aligned rows, k/v appended or not, cache_seqlens and
    cache_leftpad int32/int64 (B,) tensors, a float or no softmax_scale, a bool causal, a tuple of two ints window,
    num_splits 0..128, not traced; the caller has ruled out rotary, cache_batch_idx, block_table, softcap, ALiBi, the
    lse, check_lengths and a named backend. Else None, and the general path checks, chooses and calls. The checks on
    the arguments and the op call run in C++ (csrc/aot_short.cpp)."""
    if _AOT_OP is None or type(q) is not torch.Tensor:
        return None
    if _backend.aot_reason(q.device) is not None or _backend.forced() or _backend.intercepted():
        return None  # the device first: a CPU tensor leaves at once
    args = (cache_seqlens, cache_leftpad, softmax_scale, causal, window_size, num_splits)
    return _SHORT(q, k_cache, v_cache, k, v, *args)


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
    causal=False,
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
            cache positions (cache_seqlens + t) and of q: row t at cache_seqlens + t when causal or windowed (a
            window side >= the cache's length counting as -1), every row at cache_seqlens otherwise, as
            flash-attn. seqlen_ro >= the cache's length (Tmax; max_blocks * page_block_size when paged), as
            flash-attn requires, and where Tq > Tnew it must cover cache_seqlens + Tq too. rotary_interleaved picks
            pairs (0, 1), (2, 3).. over (i, i + rotary_dim / 2).
        cache_seqlens: int or (B,) int32/int64 tensor: rows already in the cache. Attention covers
            cache_seqlens + Tnew keys. None: the whole cache (Tmax), only without k/v. Not advanced here.
        cache_batch_idx: (B,) int tensor or None: the cache row of each sequence.
        cache_leftpad: (B,) int32/int64 tensor or None: sequence b's first cache_leftpad[b] rows are padding, never
            attended (flash-attn's left-padded cache); positions (the masks', rotary's, the append's) stay the
            rows' own indices, as flash-attn's.
        softmax_scale: default 1 / sqrt(D).
        causal: mask aligned bottom-right, as flash-attn: query row t sees keys up to cache_seqlens + Tnew - Tq + t.
            Default False, as flash-attn; decoding a causal model with Tq > 1 needs True.
        window_size: (left, right), -1 for unbounded (a tuple, list or 2-element integer tensor): row t sees keys in
            [p - left, p + right] with p = cache_seqlens + Tnew - Tq + t.
        num_splits: 0 picks the split-KV factor from B * Hkv and Tmax; > 1 forces it.
        return_softmax_lse: also return the logsumexp (B, H, Tq), fp32; +inf for a row that sees no key (its out
            is 0), as fasttrain's flash_attn_func.
        check_lengths: check cache_seqlens (and cache_batch_idx, and the rotary table) against the cache, at the
            cost of one host sync; skipped anyway while a CUDA graph is captured. A caller that tracks the lengths
            itself (fasttrain.generate) passes False. Rows past the cache end are never written either way.
        backend: "auto" (default), "triton", "cpu" (the C++ kernel: CPU tensors in fp32, bf16 or fp16, any
            head_dim; num_splits does not apply) or "reference"; see fasttrain._backend.
        block_table: (B, max_blocks) int32 or None: a paged cache. k_cache and v_cache are then (num_blocks,
            page_block_size, Hkv, D) pages, sequence b's row p in page block_table[b, p // page_block_size];
            page_block_size a multiple of 128 (flash-attn's kernels take multiples of 256). Not with cache_batch_idx.
            The CPU kernel and the reference copy each sequence's pages out; the Triton kernels read them in place.
        softcap: > 0 caps the scaled scores at softcap * tanh(s / softcap) (Gemma 2); 0.0 = off.
        alibi_slopes: float32 (H,) or (B, H) or None: adds -slope * |p - j| to query row t's score of key j, p its
            position as in window_size (with cache_leftpad, both counted from the first real row: the same distance).
        num_splits < 0 raises ValueError.

    Returns:
        out (B, Tq, H, D) in q's dtype, and lse when return_softmax_lse.
    """
    if (
        rotary_cos is None
        and rotary_sin is None
        and cache_batch_idx is None
        and block_table is None
        and alibi_slopes is None
        and type(softcap) is float
        and softcap == 0.0
        and not return_softmax_lse
        and check_lengths is False
        and backend is None
    ):
        args = (cache_seqlens, cache_leftpad, softmax_scale, causal, window_size, num_splits)
        if (out := _aot_short(q, k_cache, v_cache, k, v, *args)) is not None:
            return out
    softcap = _check_softcap(softcap)
    if isinstance(cache_seqlens, int) and isinstance(q, torch.Tensor):
        cache_seqlens = torch.full((q.shape[0],), cache_seqlens, dtype=torch.int32, device=q.device)
    paged = block_table is not None
    _check(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx, cache_leftpad, paged)
    if paged:
        _check_paged(q, k_cache, block_table, cache_batch_idx)
    left, right = _window(causal, window_size)
    if not isinstance(num_splits, int) or isinstance(num_splits, bool):
        raise ArgumentTypeError(f"num_splits must be an int >= 0, got {type(num_splits).__name__}")
    if num_splits < 0:
        raise ArgumentError(f"num_splits must be an int >= 0, got {num_splits!r}")
    B, Tq, H, D = q.shape
    Bc, Tmax = k_cache.shape[:2]
    if paged:  # Bc pages of Tmax rows; a sequence spans max_blocks of them
        Tmax *= block_table.shape[1]
    if rotary_cos is not None and rotary_cos.shape[0] < Tmax:  # flash-attn's shape bound, whatever the lengths
        raise ArgumentError(
            f"rotary_cos and rotary_sin have {rotary_cos.shape[0]} rows, fewer than the cache's {Tmax} (seqlen_ro "
            "must be at least the cache's length, as in flash-attn)"
        )
    if cache_seqlens is None:
        cache_seqlens = torch.full((B,), Tmax, dtype=torch.int32, device=q.device)
    t_new = 0 if k is None else k.shape[1]
    # flash-attn reads a window side reaching the cache's length as unbounded (-1), then picks causal, local or
    # plain; q's rotary rows go per token only in the causal and local kernels
    left, right = (UNBOUNDED if w >= Tmax else w for w in (left, right))
    q_per_token = (left, right) != (UNBOUNDED, UNBOUNDED)
    if check_lengths:
        rotary_rows = None if rotary_cos is None else rotary_cos.shape[0]
        span = max(t_new, Tq if q_per_token else 1)  # k rows, and q's rows when they turn per token
        index = ("block_table", block_table, Bc) if paged else None
        if cache_batch_idx is not None:
            index = ("cache_batch_idx", cache_batch_idx, Bc)
        _check_values(cache_seqlens, index, cache_leftpad, t_new, Tmax, rotary_rows, span)
    scale = _scale(softmax_scale, D)
    alibi_slopes = _check_alibi(alibi_slopes, B, H, q.device)
    name = DECODE.choose(
        q,
        k_cache,
        v_cache,
        rotary_cos,
        cache_batch_idx,
        block_table,
        softcap,
        alibi_slopes,
        num_splits,
        backend=backend,
    )
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
        cache_leftpad,
        block_table,
        scale,
        left,
        right,
        bool(rotary_interleaved),
        q_per_token,
        num_splits,
        softcap,
        alibi_slopes,
        name,
    )
    if not return_softmax_lse:
        return out
    # each sequence's keys: its cache, its new rows, less its left padding
    Tk = cache_seqlens.long() + t_new - (0 if cache_leftpad is None else cache_leftpad.long())  # (B,)
    shift = torch.arange(Tq, device=q.device)[None] + (Tk - Tq)[:, None]  # (B, Tq)
    return out, flash_lse(lse, alibi_slopes, left, right, Tmax, shift)
