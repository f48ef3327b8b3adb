"""attn_implementation="fasttrain": transformers' attention-function and mask-function contracts on fasttrain's
flash-attn kernels, modelled on transformers' own flash-attention path.

The mask function (`fasttrain_mask`) hands the attention function the least it needs: no mask for inputs that are
only causal, the 2-D padding mask (B, Tk) otherwise, and transformers' full sdpa mask only where the model adds a
mask function of its own (an or/and overlay). The attention function (`fasttrain_attention_forward`) then picks a
kernel call:

- no mask: `flash_attn_func(causal=True)`, whose bottom-right alignment also serves decode steps (Tq < Tk); packed
  sequences (position_ids restarting inside a row, or cu_seq_lens_* from a flattening collator) go to
  `flash_attn_varlen_func` with offsets from them;
- a padding mask: `flash_attn_varlen_func` over the padded rows themselves, each row cut into three sequences
  (the pads before the first real token, the real tokens, the pads after the last): no gather, static shapes; the
  cuts are read on the host once per forward in eager mode and computed on the device while tracing; queries are the
  last Tq key positions (a static cache's unwritten rows past the mask are cut);
- a decode step (Tq < Tk, no gradients) of a left-padded batch: `flash_attn_with_kvcache` on transformers' cache in
  place, cache_leftpad skipping each row's pads;
- sliding windows: window_size=(sliding_window - 1, 0), as transformers' sliding mask (key j with i - W < j <= i);
- a 4-D mask of the user's own, or a padding mask with holes (a masked token between real ones): fasttrain's
  scaled_dot_product_attention with a mask, which runs the kernels where each query row sees one stretch of keys
  (causal, sliding-window, padding, packed documents) and the reference otherwise. Under
  torch.compile a hole cannot be seen without a host read in every layer: a device-side assert refuses it instead.

While tracing nothing is read on the host: a padding mask's cuts are computed on the device, and packed sequences
come as cu_seq_lens (restarting position_ids fail a device-side assert).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch import Tensor
from transformers.masking_utils import sdpa_mask

from fasttrain.ops import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache, scaled_dot_product_attention

UNSUPPORTED = ("softcap", "position_bias", "s_aux")
_PACKED_WHILE_TRACING = (
    "attn_implementation='fasttrain' under torch.compile takes packed sequences as cu_seq_lens_q/k and "
    "max_length_q/k (DataCollatorWithFlattening(return_flash_attn_kwargs=True)), not as restarting position_ids"
)


def _tracing(t: Tensor) -> bool:
    """Whether t's values cannot be read on the host now (torch.compile tracing, CUDA graph capture)."""
    return torch.compiler.is_compiling() or (t.is_cuda and torch.cuda.is_current_stream_capturing())


def fasttrain_mask(*args, **kwargs) -> Tensor | None:
    """transformers' mask-function contract (sdpa_mask's arguments) -> None where the inputs are only causal (no
    padding), else the 2-D boolean padding mask (B, Tk) cut to the last kv_length keys, as transformers'
    flash_attention_mask (an all-True one over the written keys of a static cache called without a mask);
    transformers' sdpa mask (B, 1, Tq, Tk) where the model overlays a mask function of its own (use_vmap), which
    only a full mask expresses. Packing and sliding windows reach the attention function through position_ids and
    sliding_window, as on the flash-attention path. An all-ones mask is read on the host (one read per forward)
    except while tracing, where it is returned and the varlen kernel serves it."""
    if kwargs.get("use_vmap", False):
        return sdpa_mask(*args, **kwargs)
    names = ("batch_size", "q_length", "kv_length", "q_offset", "kv_offset", "mask_function", "attention_mask")
    named = dict(zip(names, args)) | kwargs
    mask, kv_length = named.get("attention_mask"), named["kv_length"]
    if mask is None:
        return _unwritten_keys_mask(named, args, kwargs)
    mask = mask[:, -kv_length:]  # (B, Tk): a sliding layer's cache keeps only the last kv_length keys
    if mask.shape[1] == kv_length and not _tracing(mask) and bool(mask.all()):
        return None
    return mask


def _unwritten_keys_mask(named: dict, args, kwargs) -> Tensor | None:
    """No padding mask given: None where every key is written, else (a static cache: keys to its full length, written
    ones first) an all-True (B, written) mask, so that the attention function cuts the keys as for a padding mask;
    transformers' sdpa mask where that length cannot be read (tracing) or the cache does not start at key 0."""
    kv_length, kv_offset = named["kv_length"], named.get("kv_offset", 0)
    written = named.get("q_offset", 0) + named["q_length"] - kv_offset
    if isinstance(written, Tensor):  # a static cache keeps its length in a tensor
        if _tracing(written):
            return sdpa_mask(*args, **kwargs)
        written = int(written)
    if written == kv_length:
        return None
    if kv_offset != 0:
        return sdpa_mask(*args, **kwargs)
    device = named.get("device") or "cpu"
    return torch.ones(named["batch_size"], written, dtype=torch.bool, device=device)


# ---- offsets for the varlen kernel -----------------------------------------------------------------------------------

# The offsets last computed from each tensor, by identity and in-place version: a model hands the same mask (one per
# layer kind) and position_ids to every layer, so the offsets and the host read behind them come once per forward.
_memo: dict[tuple[str, int], tuple] = {}
_MEMO_SIZE = 8


def _once_per_tensor(name: str, t: Tensor, extra: tuple, compute: Callable[[], tuple]) -> tuple:
    version = None if t.is_inference() else t._version  # inference tensors keep no version: never remembered
    key = (name, id(t))
    seen = _memo.get(key)
    if seen is not None and version is not None and seen[0]() is t and seen[1] == (version, *extra):
        return seen[2]
    value = compute()
    if version is not None:
        if len(_memo) >= _MEMO_SIZE:
            _memo.clear()
        _memo[key] = (weakref.ref(t), (version, *extra), value)
    return value


def padding_offsets(mask: Tensor, Tq: int, causal: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """(B, Tk) bool key mask -> (cu_seqlens_q, cu_seqlens_k) (3B + 1,) int32 over the flattened rows, and whether any
    row has a hole. Row b's keys are cut at s (its first real key) and e (one past its last): [0, s), [s, e), [e, Tk).
    Causal: the queries are the last Tq key positions, cut at the same places (shifted by Tk - Tq, clamped to
    [0, Tq]), so each sequence keeps the bottom-right alignment; not causal: every query sees the real keys. A row
    without a real key is one sequence of pads."""
    B, Tk = mask.shape
    j = torch.arange(Tk, device=mask.device)
    s = torch.where(mask, j, Tk).amin(1)  # (B,)
    e = torch.maximum(torch.where(mask, j + 1, 0).amax(1), s)
    holes = (mask.sum(1) != e - s).any()
    ends_k = torch.stack((s, e, torch.full_like(s, Tk)), 1)  # (B, 3): where each row's three sequences end
    if causal:
        ends_q = (ends_k - (Tk - Tq)).clamp(0, Tq)
    else:
        ends_q = torch.tensor([0, Tq, Tq], device=mask.device).expand(B, 3)
    rows = torch.arange(B, device=mask.device)[:, None]
    zero = torch.zeros(1, dtype=torch.int32, device=mask.device)
    cu_q = torch.cat((zero, (ends_q + rows * Tq).flatten().int()))  # (3B + 1,)
    cu_k = torch.cat((zero, (ends_k + rows * Tk).flatten().int()))
    return cu_q, cu_k, holes


def padding_offsets_read(mask: Tensor, Tq: int, causal: bool = True) -> tuple[Tensor, Tensor, bool]:
    """padding_offsets with the cuts read on the host (one read of (B, 3) values) and the offsets built there: a
    handful of ops where the device computation takes some twenty, which a decode step notices."""
    B, Tk = mask.shape
    first = mask.int().argmax(1)  # (B,): the first True (0 where none)
    stats = torch.stack((first, Tk - mask.flip(1).int().argmax(1), mask.sum(1)), 1).tolist()  # (B, 3)
    cu_q, cu_k, holes = [0], [0], False
    for b, (s, e, n) in enumerate(stats):
        s, e = (s, e) if n else (Tk, Tk)
        holes |= n != e - s
        ends_q = [min(max(x - (Tk - Tq), 0), Tq) for x in (s, e, Tk)] if causal else [0, Tq, Tq]
        cu_k += [b * Tk + x for x in (s, e, Tk)]
        cu_q += [b * Tq + x for x in ends_q]
    new = (torch.tensor(cu, dtype=torch.int32).to(mask.device, non_blocking=True) for cu in (cu_q, cu_k))
    return *new, holes


def left_padding(mask: Tensor) -> tuple[Tensor, Tensor] | None:
    """(B, Tk) bool key mask -> (cache_leftpad, cache_seqlens) (B,) int32 for flash_attn_with_kvcache where every row
    is pads then real keys up to the end (one host read), else None."""
    B, Tk = mask.shape
    stats = torch.stack((mask.int().argmax(1), mask.sum(1)), 1).tolist()  # (B, 2): first real key, count
    if any(n == 0 or s + n != Tk for s, n in stats):  # s + n == Tk: every key from the first real one is real
        return None
    starts = torch.tensor([s for s, _ in stats], dtype=torch.int32)
    return starts.to(mask.device), torch.full((B,), Tk, dtype=torch.int32, device=mask.device)


def packed_offsets(position_ids: Tensor) -> tuple[Tensor, Tensor]:
    """(B, T) position ids -> (cu_seqlens (B*T + 1,) int32, whether any row restarts). A sequence starts at each row's
    first token and wherever a position is not its predecessor's plus one (transformers' packed-sequence rule). Static
    shape for tracing: offset t is the start of the sequence holding token t, so every sequence but the last of each
    run is empty."""
    B, T = position_ids.shape
    start = torch.ones(B, T, dtype=torch.bool, device=position_ids.device)
    start[:, 1:] = position_ids[:, 1:] - position_ids[:, :-1] != 1
    t = torch.arange(B * T, device=position_ids.device)
    cu = torch.cummax(torch.where(start.flatten(), t, 0), 0).values
    return torch.cat((cu, cu.new_full((1,), B * T))).int(), start[:, 1:].any()


def _exact_packed_offsets(position_ids: Tensor) -> tuple[Tensor, int] | None:
    """Eager: the packed offsets without empty sequences and the longest sequence (one host read), or None where no
    row restarts."""
    cu, restarts = packed_offsets(position_ids)
    if not bool(restarts):
        return None
    cu = torch.unique_consecutive(cu)  # the starts, then B*T
    return cu, int((cu[1:] - cu[:-1]).max())


# ---- the attention function ------------------------------------------------------------------------------------------


def _flat(t: Tensor) -> Tensor:
    return t.reshape(-1, *t.shape[2:])  # (B, T, H, D) -> (B*T, H, D)


def _varlen(q, k, v, cu_q, cu_k, max_q, max_k, **kw) -> Tensor:
    out = flash_attn_varlen_func(_flat(q), _flat(k), _flat(v), cu_q, cu_k, max_q, max_k, **kw)
    return out.view(q.shape)  # (B*Tq, H, D) -> (B, Tq, H, D)


def _dense(q, k, v, mask, causal, window, dropout_p, scale) -> Tensor:
    """The reference for a 2-D key mask the varlen cuts cannot express (holes): (B, Tq, Tk) visibility from the key
    mask, the causal diagonal aligned bottom-right and the window."""
    Tq, Tk = q.shape[1], k.shape[1]
    i = torch.arange(Tq, device=q.device)[:, None] + (Tk - Tq)  # (Tq, 1): each query's key position
    j = torch.arange(Tk, device=q.device)
    left, right = window[0], 0 if causal else window[1]
    band = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device)
    if left >= 0:
        band &= i - j <= left
    if right >= 0:
        band &= j - i <= right
    out = scaled_dot_product_attention(
        *(t.transpose(1, 2) for t in (q, k, v)),  # (B, T, H, D) -> (B, H, T, D)
        attn_mask=(mask[:, None, :] & band)[:, None],  # (B, 1, Tq, Tk)
        dropout_p=dropout_p,
        scale=scale,
        enable_gqa=k.shape[2] != q.shape[2],
    )
    return out.transpose(1, 2)  # (B, H, Tq, D) -> (B, Tq, H, D)


def _padded(q, k, v, mask, causal, window, dropout_p, scale) -> Tensor:
    Tq, Tk = q.shape[1], mask.shape[1]
    k, v = k[:, :Tk], v[:, :Tk]  # a static cache's rows past the mask are unwritten
    if not causal and window != (-1, -1):  # the cuts would move a bidirectional window off the tokens' positions
        return _dense(q, k, v, mask, causal, window, dropout_p, scale)
    kw = dict(dropout_p=dropout_p, softmax_scale=scale, causal=causal, window_size=window)
    if not _tracing(mask) and causal and Tq < Tk and dropout_p == 0.0 and not torch.is_grad_enabled():
        # A decode step of a left-padded batch: the KV-cache kernel reads the cache in place.
        cache = _once_per_tensor("left padding", mask, (), lambda: left_padding(mask))
        if cache is not None:
            leftpad, seqlens = cache
            return flash_attn_with_kvcache(
                q,
                k,
                v,
                cache_seqlens=seqlens,
                cache_leftpad=leftpad,
                softmax_scale=scale,
                causal=True,
                window_size=window,
                check_lengths=False,
            )
    if not _tracing(mask):
        cu_q, cu_k, holes = _once_per_tensor(
            "padding", mask, (Tq, causal), lambda: padding_offsets_read(mask, Tq, causal)
        )
        if holes:
            return _dense(q, k, v, mask, causal, window, dropout_p, scale)
        return _varlen(q, k, v, cu_q, cu_k, Tq, Tk, **kw)
    cu_q, cu_k, holes = padding_offsets(mask, Tq, causal)
    # Branching on holes would read them on the host in every layer; a device-side check costs no sync.
    torch._assert_async(~holes, "attn_implementation='fasttrain' under torch.compile takes padding masks without holes")
    return _varlen(q, k, v, cu_q, cu_k, Tq, Tk, **kw)


def _unpadded(q, k, v, position_ids, causal, window, dropout_p, scale, varlen_kwargs) -> Tensor:
    kw = dict(dropout_p=dropout_p, softmax_scale=scale, causal=causal, window_size=window)
    B, Tq = q.shape[:2]
    cu_q, cu_k = varlen_kwargs.get("cu_seq_lens_q"), varlen_kwargs.get("cu_seq_lens_k")
    if cu_q is not None and cu_k is not None:  # a flattening collator's offsets (batch 1)
        bounds = []
        for name, total in (("max_length_q", B * Tq), ("max_length_k", B * k.shape[1])):
            given = varlen_kwargs.get(name)
            bounds.append(total if given is None or _tracing(cu_q) else int(given))  # a bound where unreadable
        return _varlen(q, k, v, cu_q.int(), cu_k.int(), *bounds, **kw)
    packable = (
        causal and position_ids is not None and position_ids.dim() == 2 and Tq == k.shape[1] and Tq > 1
    )  # decode steps (Tq < Tk) and single tokens are one sequence
    if packable:
        pos = position_ids.expand(B, Tq)  # transformers passes (1, T) unexpanded
        if not _tracing(pos):
            packed = _once_per_tensor("packed", position_ids, (B,), lambda: _exact_packed_offsets(pos))
            if packed is not None:
                return _varlen(q, k, v, packed[0], packed[0], packed[1], packed[1], **kw)
        else:
            # Branching on a restart would read it on the host in every layer (and torch.cond refuses q, k and v
            # that are views of one tensor, as GPT-2's are): a device-side check refuses packing instead.
            torch._assert_async(~packed_offsets(pos)[1], _PACKED_WHILE_TRACING)
    return flash_attn_func(q, k, v, **kw)


def fasttrain_attention_forward(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    sliding_window: int | None = None,
    position_ids: Tensor | None = None,
    **kwargs,
) -> tuple[Tensor, None]:
    """transformers' attention-function contract: query (B, H, Tq, D), key/value (B, Hkv, Tk, D), attention_mask
    from fasttrain_mask -> ((B, Tq, H, D), no attention weights). dropout goes to the kernels' dropout_p."""
    for unsupported in UNSUPPORTED:
        if kwargs.get(unsupported) is not None:
            raise ValueError(f"attn_implementation='fasttrain' does not implement {unsupported}; use 'eager'")
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    if attention_mask is not None and attention_mask.dim() == 4:  # the user's own mask, or a model's overlay
        out = scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=attention_mask,
            dropout_p=dropout,
            scale=scaling,
            enable_gqa=key.shape[1] != query.shape[1],
        )
        return out.transpose(1, 2), None  # (B, H, Tq, D) -> (B, Tq, H, D)
    # transformers' sliding masks: causal keys i - W < j <= i; bidirectional |i - j| <= W
    W = sliding_window
    window = (-1, -1) if W is None else (W - 1, 0) if causal else (W, W)
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # (B, H, T, D) -> (B, T, H, D) views
    if attention_mask is not None:
        out = _padded(q, k, v, attention_mask.bool(), causal, window, dropout, scaling)
    else:
        out = _unpadded(q, k, v, position_ids, causal, window, dropout, scaling, kwargs)
    return out, None
