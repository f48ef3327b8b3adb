"""One exception type per kind of mistake, across every public op and AdamW: TypeError for a wrong type or dtype (a
non-tensor, an integer tensor where a float one is needed), ValueError for a wrong value or shape."""

import pytest
import torch

from fasttrain._backend import ArgumentError, ArgumentTypeError
from fasttrain.ops import (
    add_layer_norm,
    add_rms_norm,
    apply_rotary_emb,
    cross_entropy,
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
    flash_attn_with_kvcache,
    geglu,
    gelu,
    layer_norm,
    linear_cross_entropy,
    rms_norm,
    scaled_dot_product_attention,
    swiglu,
)
from fasttrain.ops.rotary import apply_rotary_emb_qkv_
from fasttrain.optim import AdamW


def _x(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


def _cos_sin(T=4, half=4):
    return _x(T, half), _x(T, half)


def _varlen(q, k=None):
    cu = torch.tensor([0, 3, 4], dtype=torch.int32)
    k = q if k is None else k
    return flash_attn_varlen_func(q, k, k, cu, cu, 3, 3)


def _varlen_kv(q, cu_k=None):
    cu = torch.tensor([0, 3, 4], dtype=torch.int32)
    return flash_attn_varlen_kvpacked_func(q, _x(4, 2, 2, 16), cu, cu if cu_k is None else cu_k, 3, 3)


def _kvcache(q, cache=None):
    cache = _x(2, 8, 2, 16) if cache is None else cache
    return flash_attn_with_kvcache(q, cache, cache.clone(), cache_seqlens=torch.tensor([3, 5], dtype=torch.int32))


def _is_exactly(raised, error) -> bool:
    """raised is `error` itself, not a subclass standing in for it, or (for the functions with flash-attn's or torch's
    signature) fasttrain's one subclass that is also the RuntimeError those projects raise."""
    return type(raised) is error or type(raised) is {ValueError: ArgumentError, TypeError: ArgumentTypeError}[error]


LONG = torch.long
# op -> (a wrong dtype, a non-tensor, a wrong shape or value): each a call that must raise
CASES = {
    "gelu": (
        lambda: gelu(torch.arange(4)),
        lambda: gelu([1.0, 2.0]),
        lambda: gelu(_x(4), approximate="erf"),
    ),
    "swiglu": (
        lambda: swiglu(_x(4, 8), _x(4, 8, dtype=torch.float64)),
        lambda: swiglu(_x(4, 8), [1.0] * 8),
        lambda: swiglu(_x(4, 8), _x(4, 7)),
    ),
    "geglu": (
        lambda: geglu(_x(4, 8, dtype=LONG), _x(4, 8, dtype=LONG)),
        lambda: geglu("gate", _x(4, 8)),
        lambda: geglu(_x(4, 8), _x(8, 4)),
    ),
    "layer_norm": (
        lambda: layer_norm(_x(4, 8, dtype=LONG), (8,)),
        lambda: layer_norm(_x(4, 8), (8,), weight=[1.0] * 8),
        lambda: layer_norm(_x(4, 8), (7,)),
    ),
    "rms_norm": (
        lambda: rms_norm(_x(4, 8), (8,), weight=_x(8, dtype=LONG)),
        lambda: rms_norm(_x(4, 8), "8"),
        lambda: rms_norm(_x(4, 8), (8,), weight=_x(4)),
    ),
    "add_layer_norm": (
        lambda: add_layer_norm(_x(4, 8), _x(4, 8, dtype=LONG), (8,)),
        lambda: add_layer_norm(_x(4, 8), None, (8,)),
        lambda: add_layer_norm(_x(4, 8), _x(4, 4), (8,)),
    ),
    "add_rms_norm": (
        lambda: add_rms_norm(_x(4, 8, dtype=LONG), _x(4, 8), (8,)),
        lambda: add_rms_norm(_x(4, 8), _x(4, 8), (8,), eps="1e-6"),
        lambda: add_rms_norm(_x(4, 8), _x(4, 8), (8,), eps=-1.0),
    ),
    "cross_entropy": (
        lambda: cross_entropy(_x(4, 10, dtype=LONG), torch.zeros(4, dtype=LONG)),
        lambda: cross_entropy(_x(4, 10), [0, 1, 2, 3]),
        lambda: cross_entropy(_x(4, 10), torch.zeros(3, dtype=LONG)),
    ),
    "linear_cross_entropy": (
        lambda: linear_cross_entropy(_x(4, 8), _x(10, 8, dtype=torch.float16), torch.zeros(4, dtype=LONG)),
        lambda: linear_cross_entropy(_x(4, 8), _x(10, 8), [0, 1, 2, 3]),
        lambda: linear_cross_entropy(_x(4, 8), _x(10, 8), torch.zeros(4, dtype=LONG), label_smoothing=-0.1),
    ),
    "apply_rotary_emb": (
        lambda: apply_rotary_emb(_x(1, 4, 2, 8, dtype=LONG), *_cos_sin()),
        lambda: apply_rotary_emb(_x(1, 4, 2, 8), *_cos_sin(), seqlen_offsets=1.5),
        lambda: apply_rotary_emb(_x(4, 2, 8), *_cos_sin()),
    ),
    "apply_rotary_emb with cu_seqlens": (
        lambda: apply_rotary_emb(_x(4, 2, 8), *_cos_sin(), cu_seqlens=torch.tensor([0.0, 4.0]), max_seqlen=4),
        lambda: apply_rotary_emb(_x(4, 2, 8), *_cos_sin(), cu_seqlens=[0, 4], max_seqlen=4),
        lambda: apply_rotary_emb(_x(1, 4, 2, 8), *_cos_sin(), cu_seqlens=torch.tensor([0, 4]), max_seqlen=4),
    ),
    "apply_rotary_emb_qkv_": (
        lambda: apply_rotary_emb_qkv_(_x(1, 4, 3, 2, 8, dtype=LONG), *_cos_sin()),
        lambda: apply_rotary_emb_qkv_("qkv", *_cos_sin()),
        lambda: apply_rotary_emb_qkv_(_x(1, 4, 2, 2, 8), *_cos_sin()),
    ),
    "flash_attn_func": (
        lambda: flash_attn_func(*(_x(1, 4, 2, 16, dtype=LONG),) * 3),
        lambda: flash_attn_func(_x(1, 4, 2, 16), _x(1, 4, 2, 16), None),
        lambda: flash_attn_func(*(_x(4, 2, 16),) * 3),
    ),
    "flash_attn_varlen_func": (
        lambda: _varlen(_x(4, 2, 16, dtype=LONG)),
        lambda: flash_attn_varlen_func(*(_x(4, 2, 16),) * 3, [0, 3, 4], [0, 3, 4], 3, 3),
        lambda: _varlen(_x(1, 4, 2, 16)),
    ),
    "flash_attn_qkvpacked_func": (
        lambda: flash_attn_qkvpacked_func(_x(1, 4, 3, 2, 16, dtype=LONG)),
        lambda: flash_attn_qkvpacked_func("qkv"),
        lambda: flash_attn_qkvpacked_func(_x(1, 4, 2, 2, 16)),
    ),
    "flash_attn_kvpacked_func": (
        lambda: flash_attn_kvpacked_func(_x(1, 4, 2, 16), _x(1, 4, 2, 2, 16, dtype=torch.float16)),
        lambda: flash_attn_kvpacked_func(None, _x(1, 4, 2, 2, 16)),
        lambda: flash_attn_kvpacked_func(_x(1, 4, 2, 16), _x(1, 4, 2, 2, 8)),
    ),
    "flash_attn_varlen_qkvpacked_func": (
        lambda: flash_attn_varlen_qkvpacked_func(_x(4, 3, 2, 16), torch.tensor([0, 3, 4]), 3),
        lambda: flash_attn_varlen_qkvpacked_func(_x(4, 3, 2, 16), [0, 3, 4], 3),
        lambda: flash_attn_varlen_qkvpacked_func(_x(4, 3, 2, 16), torch.tensor([0, 3, 4], dtype=torch.int32), 2),
    ),
    "flash_attn_varlen_kvpacked_func": (
        lambda: _varlen_kv(_x(4, 2, 16, dtype=LONG)),
        lambda: _varlen_kv(_x(4, 2, 16), [0, 3, 4]),
        lambda: _varlen_kv(_x(4, 2, 16), torch.tensor([0, 2, 5], dtype=torch.int32)),
    ),
    "scaled_dot_product_attention": (
        lambda: scaled_dot_product_attention(*(_x(1, 2, 4, 16, dtype=LONG),) * 3),
        lambda: scaled_dot_product_attention(*(_x(1, 2, 4, 16),) * 3, attn_mask=[[True]]),
        lambda: scaled_dot_product_attention(_x(1, 2, 4, 16), _x(1, 2, 4, 8), _x(1, 2, 4, 8)),
    ),
    "flash_attn_with_kvcache": (
        lambda: _kvcache(_x(2, 1, 4, 16, dtype=LONG)),
        lambda: _kvcache("q"),
        lambda: _kvcache(_x(2, 4, 16)),
    ),
    "AdamW": (
        lambda: AdamW([_x(3, dtype=LONG)]),
        lambda: AdamW([_x(3)], max_grad_norm="1"),
        lambda: AdamW([_x(3)], lr=-1.0),
    ),
}
MISTAKES = [("wrong dtype", TypeError), ("not a tensor", TypeError), ("wrong shape or value", ValueError)]


@pytest.mark.parametrize("mistake,error", MISTAKES, ids=[m for m, _ in MISTAKES])
@pytest.mark.parametrize("op", list(CASES))
def test_each_kind_of_mistake_raises_its_type(op, mistake, error):
    call = CASES[op][[m for m, _ in MISTAKES].index(mistake)]
    with pytest.raises(error) as raised:
        call()
    assert _is_exactly(raised.value, error)
    assert len(str(raised.value).splitlines()) == 1  # one line that names what was wrong


def _modified(call, softcap=0.0, alibi_slopes=None):
    """call's attention (B 2, H 4) with flash-attn's score modifiers."""
    q = _x(2, 4, 4, 16)
    kw = dict(softcap=softcap, alibi_slopes=alibi_slopes)
    if call == "func":
        return flash_attn_func(q, q, q, **kw)
    if call == "varlen":
        cu = torch.tensor([0, 3, 8], dtype=torch.int32)
        return flash_attn_varlen_func(q.flatten(0, 1), q.flatten(0, 1), q.flatten(0, 1), cu, cu, 5, 5, **kw)
    if call == "qkvpacked":
        return flash_attn_qkvpacked_func(torch.stack((q, q, q), 2), **kw)
    return flash_attn_with_kvcache(q[:, :1], q, q.clone(), cache_seqlens=torch.tensor([3, 4], dtype=torch.int32), **kw)


# (the argument's mistake, its error): softcap and alibi_slopes as flash-attn takes them
MODIFIER_MISTAKES = [
    (dict(softcap="1.0"), TypeError),
    (dict(softcap=True), TypeError),
    (dict(softcap=float("inf")), ValueError),
    (dict(alibi_slopes=[0.5] * 4), TypeError),
    (dict(alibi_slopes=torch.rand(4).double()), TypeError),
    (dict(alibi_slopes=torch.rand(3)), ValueError),
    (dict(alibi_slopes=torch.rand(3, 4)), ValueError),
    (dict(alibi_slopes=torch.rand(4, device="meta")), ValueError),
]


@pytest.mark.parametrize("call", ["func", "varlen", "qkvpacked", "kvcache"])
@pytest.mark.parametrize("kwargs,error", MODIFIER_MISTAKES, ids=[str(i) for i in range(len(MODIFIER_MISTAKES))])
def test_score_modifier_mistakes_name_the_argument(call, kwargs, error):
    with pytest.raises(error, match=next(iter(kwargs))) as raised:
        _modified(call, **kwargs)
    assert _is_exactly(raised.value, error)
    assert len(str(raised.value).splitlines()) == 1


@pytest.mark.parametrize("call", ["func", "varlen", "qkvpacked", "kvcache"])
def test_negative_softcap_is_no_capping(call):
    # flash-attn caps only when softcap > 0: any softcap <= 0, or NaN, runs plain attention, as 0.0 does
    out = {}
    for softcap in (-1.5, float("nan"), 0.0, 0.5):
        torch.manual_seed(0)
        out[str(softcap)] = _modified(call, softcap=softcap)
    torch.testing.assert_close(out["-1.5"], out["0.0"], atol=0, rtol=0)
    torch.testing.assert_close(out["nan"], out["0.0"], atol=0, rtol=0)
    assert (out["0.5"] - out["0.0"]).abs().max() > 1e-3
