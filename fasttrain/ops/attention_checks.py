"""The argument checks of the flash-attn- and torch-signature attention functions (fasttrain/ops/attention.py,
attention_packed.py, decode.py): each mistake one error naming the argument, TypeError for a wrong type or dtype,
ValueError for a wrong value or shape; and the translation of flash-attn's arguments (causal and window_size,
softmax_scale, a paged cache's block_table) into what the kernels take."""

from __future__ import annotations

import numbers
import operator
import weakref

import torch
from torch import Tensor

from fasttrain._backend import ArgumentError, ArgumentTypeError
from fasttrain.ops.attention_reference import UNBOUNDED


def _check_like_q(q: Tensor, named, q_name: str = "q") -> None:
    """Each (name, tensor) of `named` has q's dtype and device."""
    for name, t in named:
        if t.dtype != q.dtype:
            raise ArgumentTypeError(f"{name} must have {q_name}'s dtype {q.dtype}, got {t.dtype}")
        if t.device != q.device:
            raise ArgumentError(f"{name} must be on {q_name}'s device ({q.device}), got {t.device}")


def _check_qkv(q, k, v, rank: int, layout: str, head_axis: int = -2, names=("q", "k", "v")) -> None:
    qn, kn, vn = names
    for name, t in zip(names, (q, k, v)):
        if not isinstance(t, Tensor):
            raise ArgumentTypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != rank:
            raise ArgumentError(f"{name} must be {rank}-D {layout}, got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ArgumentTypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    _check_like_q(q, ((kn, k), (vn, v)), qn)
    if k.shape != v.shape:
        raise ArgumentError(f"{kn} and {vn} must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[:-3] != q.shape[:-3] or k.shape[-1] != q.shape[-1]:
        raise ArgumentError(f"{kn} {tuple(k.shape)} must match {qn} {tuple(q.shape)} in batch and head_dim ({layout})")
    H, Hkv = q.shape[head_axis], k.shape[head_axis]
    if Hkv == 0 or H % Hkv:
        raise ArgumentError(f"the number of {kn}/{vn} heads ({Hkv}) must divide the number of {qn} heads ({H})")


def _window(causal: bool, window_size) -> tuple[int, int]:
    """flash-attn's (causal, window_size) -> kernel (left, right) diagonal bounds; a side < 0 (-1) means unbounded,
    as flash-attn's C++ reads it. window_size is any pair of integers flash-attn takes: a tuple or list of ints (or
    integer scalars: numpy's, 0-dim tensors), or a 2-element integer tensor (read on the host)."""
    if isinstance(window_size, Tensor):
        if window_size.is_floating_point() or window_size.is_complex() or window_size.dtype == torch.bool:
            raise ArgumentTypeError(
                f"window_size must hold integers (-1 = unbounded), got a {window_size.dtype} tensor"
            )
        if window_size.shape != (2,):
            raise ArgumentError(f"window_size must be a pair of ints, got a tensor of shape {tuple(window_size.shape)}")
        window_size = tuple(window_size.tolist())
    if not isinstance(window_size, (tuple, list)) or not all(_is_index(w) for w in window_size):
        raise ArgumentTypeError(f"window_size must be a pair of ints (-1 = unbounded), got {window_size!r}")
    if len(window_size) != 2:
        raise ArgumentError(f"window_size must be a pair of ints (-1 = unbounded), got {window_size!r}")
    left, right = (_window_side(operator.index(w)) for w in window_size)
    return left, (0 if causal else right)


def _is_index(w) -> bool:
    """An integer as flash-attn's C++ int arguments take one (an int or an object with __index__), not a bool."""
    if isinstance(w, bool):
        return False
    try:
        operator.index(w)
    except TypeError:
        return False
    return True


def _window_side(w: int) -> int:
    """One side of flash-attn's window_size as the kernels' bound: any negative side (-1), or any side past UNBOUNDED
    (which no sequence reaches, and which a side past int32 would overflow), is UNBOUNDED."""
    return UNBOUNDED if w < 0 else min(w, UNBOUNDED)


def _scale(softmax_scale, head_dim: int) -> float:
    if softmax_scale is None:  # head_dim 0: every score is an empty sum, the outputs are empty (as torch's)
        return head_dim**-0.5 if head_dim > 0 else 1.0
    if type(softmax_scale) is float:  # the common call, before the slower ABC check
        return softmax_scale
    if not isinstance(softmax_scale, numbers.Real) or isinstance(softmax_scale, bool):  # numpy's floats too
        raise ArgumentTypeError(f"softmax_scale must be a float or None, got {type(softmax_scale).__name__}")
    return float(softmax_scale)


def _check_softcap(softcap) -> float:
    """flash-attn's softcap: a float, any value that is not > 0 (NaN too) meaning no capping, as flash-attn's
    `softcap > 0` check reads it; +inf, which flash-attn turns into NaN scores, is refused."""
    if type(softcap) is float and 0.0 <= softcap < float("inf"):  # the common call, before the slower ABC check
        return softcap
    if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real):  # numpy's floats too, as flash-attn
        raise ArgumentTypeError(f"softcap must be a float (<= 0.0 = no capping), got {type(softcap).__name__}")
    if softcap == float("inf"):  # no finite cap to apply
        raise ArgumentError(f"softcap must be a finite float (<= 0.0 = no capping), got {softcap!r}")
    if not softcap > 0.0:
        return 0.0
    return float(softcap)


def _check_alibi(alibi_slopes, batch: int, heads: int, device) -> Tensor | None:
    """flash-attn's alibi_slopes: None, or float32 (H,) or (B, H) on q's device; returned with a unit last stride."""
    if alibi_slopes is None:
        return None
    if not isinstance(alibi_slopes, Tensor):
        raise ArgumentTypeError(f"alibi_slopes must be a float32 tensor or None, got {type(alibi_slopes).__name__}")
    if alibi_slopes.dtype != torch.float32:
        raise ArgumentTypeError(f"alibi_slopes must be float32 (as flash-attn requires), got {alibi_slopes.dtype}")
    if tuple(alibi_slopes.shape) not in ((heads,), (batch, heads)):
        raise ArgumentError(
            f"alibi_slopes must have shape ({heads},) or ({batch}, {heads}) (nheads or batch x nheads), got "
            f"{tuple(alibi_slopes.shape)}"
        )
    if alibi_slopes.device != device:
        raise ArgumentError(f"alibi_slopes must be on q's device ({device}), got {alibi_slopes.device}")
    return alibi_slopes.contiguous()


def _check_dropout(dropout_p) -> float:
    """dropout_p as a Python float: any real but a bool (numpy's floats too, as torch's and flash-attn's float
    arguments take them), in [0, 1)."""
    if type(dropout_p) is not float and (isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real)):
        raise ArgumentTypeError(f"dropout_p must be a float, got {type(dropout_p).__name__}")
    if not 0.0 <= dropout_p < 1.0:
        raise ArgumentError(f"dropout_p must be in [0, 1), got {dropout_p!r}")
    return float(dropout_p)


# The offsets checked last, per argument: a model hands the same cu_seqlens to every layer and reading them costs a
# host sync, so a tensor is read again only after an in-place change (its _version moves).
_checked_offsets: dict[str, tuple] = {}


def _longest_sequence(name: str, cu: Tensor, total: int) -> int | None:
    """The longest sequence of offsets `cu`, after checking that they rise from 0 to `total`; None where the values
    cannot be read (CUDA graph capture, torch.compile tracing). Only CUDA offsets are remembered between calls (by
    identity and in-place version), since reading them syncs; CPU offsets cost no sync and inference tensors keep no
    version, so those are read every call. A write that bypasses the version counter (through `.data`, or a NumPy or
    DLPack view) is not seen on a remembered tensor."""
    if torch.compiler.is_compiling() or (cu.is_cuda and torch.cuda.is_current_stream_capturing()):
        return None
    cacheable = cu.is_cuda and not cu.is_inference()
    seen = _checked_offsets.get(name) if cacheable else None
    if seen is not None and seen[0]() is cu and seen[1:3] == (cu._version, total):
        return seen[3]
    values = cu.tolist()
    if values[0] != 0 or values[-1] != total or any(b < a for a, b in zip(values, values[1:])):
        raise ArgumentError(f"{name} must rise from 0 to the packed length {total}, got {values}")
    longest = max(b - a for a, b in zip(values, values[1:]))
    if cacheable:
        _checked_offsets[name] = (weakref.ref(cu), cu._version, total, longest)
    return longest


def _known_longest(name: str, cu: Tensor, total: int) -> int | None:
    """`_longest_sequence`'s answer where it costs no device sync: CUDA offsets remembered under `name` and unchanged
    since (their values are not read), or CPU offsets read now (raising as it raises); else None, as while
    torch.compile traces: the general path reads and checks them. cu is an int32 1-D tensor (the caller checked)."""
    if torch.compiler.is_compiling():
        return None
    if cu.is_cuda:
        seen = _checked_offsets.get(name)
        if seen is not None and seen[0]() is cu and seen[1:3] == (cu._version, total):
            return seen[3]
        return None
    return _longest_sequence(name, cu, total)


def _check_cu_seqlens(name: str, cu: Tensor, total: int, batch: int | None, device) -> int | None:
    if not isinstance(cu, Tensor) or cu.dtype != torch.int32:
        raise ArgumentTypeError(
            f"{name} must be an int32 tensor of B + 1 offsets, got "
            f"{cu.dtype if isinstance(cu, Tensor) else type(cu).__name__}"
        )
    if cu.dim() != 1 or cu.numel() < 2:
        raise ArgumentError(f"{name} must be a 1-D tensor of B + 1 >= 2 offsets, got shape {tuple(cu.shape)}")
    if cu.device != device:
        raise ArgumentError(f"{name} must be on q's device ({device}), got {cu.device}")
    if batch is not None and cu.numel() != batch:
        raise ArgumentError(f"cu_seqlens_q and cu_seqlens_k must have the same length, got {batch} and {cu.numel()}")
    return _longest_sequence(name, cu, total)


def _check_varlen(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) -> tuple[Tensor, Tensor]:
    """The offsets and longest-sequence bounds of packed q (total_q, ...) and k (total_k, ...); returns the offsets
    contiguous (the kernels read Cu + b)."""
    real_q = _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], None, q.device)
    real_k = _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], cu_seqlens_q.numel(), q.device)
    for name, given, real in (("max_seqlen_q", max_seqlen_q, real_q), ("max_seqlen_k", max_seqlen_k, real_k)):
        if not isinstance(given, int) or isinstance(given, bool):
            raise ArgumentTypeError(f"{name} must be an int, got {type(given).__name__}")
        if real is not None and given < real:
            raise ArgumentError(f"{name} must be an int >= the longest sequence ({real}), got {given!r}")
    return cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous()


def _check_block_table(block_table, batch: int, device) -> None:
    """A paged cache's table: (batch, max_blocks >= 1) int32 on q's device."""
    if not isinstance(block_table, Tensor) or block_table.dtype != torch.int32:
        got = getattr(block_table, "dtype", type(block_table).__name__)
        raise ArgumentTypeError(f"block_table must be an int32 tensor (B, max_blocks), got {got}")
    if block_table.dim() != 2 or block_table.shape[0] != batch or block_table.shape[1] == 0:
        raise ArgumentError(f"block_table must be (B={batch}, max_blocks >= 1), got shape {tuple(block_table.shape)}")
    if block_table.device != device:
        raise ArgumentError(f"block_table must be on q's device ({device}), got {block_table.device}")


def _keys_from_pages(q, k_cache, v_cache, block_table, cu_seqlens_k) -> tuple[Tensor, Tensor]:
    """Packed keys and values (total_k, Hkv, D) of a paged cache (num_blocks, page_block_size, Hkv, D): sequence b's
    key t from row t % page_block_size of page block_table[b, t // page_block_size]. The lengths and the pages used
    are read on the host (two reads) and checked against the table and the cache; refused while a CUDA graph is
    captured."""
    for name, t in (("k", k_cache), ("v", v_cache)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ArgumentError(
                f"{name} must be a paged cache (num_blocks, page_block_size, Hkv, D) with a block_table, got {got}"
            )
    if k_cache.shape != v_cache.shape:
        raise ArgumentError(f"k and v must have the same shape, got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if not isinstance(cu_seqlens_k, Tensor) or cu_seqlens_k.dim() != 1 or cu_seqlens_k.numel() < 2:
        raise ArgumentError("cu_seqlens_k must be a 1-D tensor of B + 1 offsets")
    B = cu_seqlens_k.numel() - 1
    _check_block_table(block_table, B, q.device)
    if q.is_cuda and torch.cuda.is_current_stream_capturing():
        raise ArgumentError(
            "block_table: the keys' pages are found from cu_seqlens_k on the host, not while a CUDA graph is captured"
        )
    num_blocks, page = k_cache.shape[:2]
    cu = cu_seqlens_k.long()
    lengths = cu.diff()  # (B,)
    total = int(cu[-1])
    seq = torch.repeat_interleave(torch.arange(B, device=q.device), lengths, output_size=total)  # (total_k,)
    t = torch.arange(total, device=q.device) - cu[:-1][seq]  # each key's position in its sequence
    slot = (t // page).clamp(max=block_table.shape[1] - 1)
    pages = block_table.long()[seq, slot]  # (total_k,)
    if total:
        longest, lo, hi = torch.stack((lengths.max(), pages.min(), pages.max())).tolist()
        if longest > block_table.shape[1] * page:
            raise ArgumentError(
                f"a sequence of {longest} keys needs more than block_table's {block_table.shape[1]} pages of {page}"
            )
        if lo < 0 or hi >= num_blocks:
            raise ArgumentError(f"block_table's pages must lie in [0, {num_blocks}), got values in [{lo}, {hi}]")
    rows = pages * page + t % page  # (total_k,) rows of the cache seen as (num_blocks * page, Hkv, D)
    return k_cache.flatten(0, 1).index_select(0, rows), v_cache.flatten(0, 1).index_select(0, rows)
