"""scaled_dot_product_attention's attn_mask: causal and sliding-window masks (bool, or additive 0/-inf; 2-D or 4-D;
broadcast over batch and heads) run the kernels with torch's own result and gradients; a mask that is almost a band,
differs per batch row or head, or adds other values keeps the reference; the answer is read once per mask tensor."""

import pytest
import torch
import torch.nn.functional as F

from fasttrain._backend import BackendError
from fasttrain.ops import attention_masks, scaled_dot_product_attention
from fasttrain.ops.attention_masks import kernel_band
from fasttrain.ops.attention_reference import UNBOUNDED

from helpers import TOL_FP32

TOL = dict(atol=TOL_FP32["attention"], rtol=TOL_FP32["attention"])


def _band_mask(Tq, Tk, L, R):
    """Top-left band: query i sees keys i - L .. i + R (None = unbounded)."""
    d = torch.arange(Tk)[None, :] - torch.arange(Tq)[:, None]  # (Tq, Tk): j - i
    keep = torch.ones(Tq, Tk, dtype=torch.bool)
    if L is not None:
        keep &= d >= -L
    if R is not None:
        keep &= d <= R
    return keep


def _qkv(B, H, Tq, Tk, D=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, T, D, generator=g).requires_grad_() for T in (Tq, Tk, Tk)]


BANDS = {
    "causal": (17, 17, None, 0),
    "causal-Tq<Tk": (5, 40, None, 0),  # torch's top-left causal
    "causal-Tq>Tk": (40, 9, None, 0),
    "sliding-window": (97, 97, 16, 0),
    "two-sided": (33, 33, 4, 7),
    "rows-without-keys": (12, 12, None, -3),  # rows 0-2 see nothing: 0 in torch and in the kernels
}


@pytest.mark.parametrize("kind", ["bool", "additive", "2d", "batch-broadcast"])
@pytest.mark.parametrize("name", BANDS)
def test_band_masks_run_the_kernel_with_torchs_result(name, kind):
    Tq, Tk, L, R = BANDS[name]
    q, k, v = _qkv(2, 2, Tq, Tk)
    keep = _band_mask(Tq, Tk, L, R)
    if kind == "additive":
        mask = torch.zeros(Tq, Tk).masked_fill(~keep, float("-inf"))[None, None]
    elif kind == "batch-broadcast":
        mask = keep.expand(2, 1, Tq, Tk).clone()
    else:
        mask = keep if kind == "2d" else keep[None, None]
    out = scaled_dot_product_attention(q, k, v, attn_mask=mask, backend="cpu")  # a mask left would raise here
    want = F.scaled_dot_product_attention(*(t.detach().requires_grad_() for t in (q, k, v)), attn_mask=mask)
    torch.testing.assert_close(out, want, **TOL)
    do = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), do)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    expected = torch.autograd.grad(F.scaled_dot_product_attention(*leaves, attn_mask=mask), leaves, do)
    for name_, a, b in zip("qkv", got, expected):
        torch.testing.assert_close(a, b, **TOL, msg=lambda m, n=name_: f"d{n}: {m}")


def _not_a_band():
    causal = _band_mask(8, 8, None, 0)
    holed = causal.clone()
    holed[5, 2] = False  # almost causal
    extra = causal.clone()
    extra[2, 3] = True  # one key past the diagonal
    per_batch = torch.stack((causal, _band_mask(8, 8, 2, 0)))[:, None]
    per_head = torch.stack((causal, _band_mask(8, 8, 2, 0)))[None]
    scaled = torch.zeros(8, 8).masked_fill(~causal, float("-inf"))
    scaled[3, 1] = -2.0  # a bias, not a mask
    padded = causal.clone()
    padded[:, :2] = False  # left padding: a per-row start that is not i - L
    return {
        "almost-causal": holed,
        "past-the-diagonal": extra,
        "per-batch-row": per_batch,
        "per-head": per_head,
        "additive-bias": scaled,
        "left-padding": padded,
    }


@pytest.mark.parametrize("name", list(_not_a_band()))
def test_other_masks_keep_the_reference(name):
    mask = _not_a_band()[name]
    assert kernel_band(mask, 2, 8, 8) is None
    q, k, v = _qkv(2, 2, 8, 8)
    with pytest.raises(BackendError, match="attn_mask"):
        scaled_dot_product_attention(q, k, v, attn_mask=mask, backend="cpu")
    out = scaled_dot_product_attention(q, k, v, attn_mask=mask, backend="reference")
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), **TOL)


def test_the_band_in_kernel_coordinates():
    assert kernel_band(_band_mask(6, 6, None, 0), 1, 6, 6) == (UNBOUNDED, 0)
    assert kernel_band(_band_mask(4, 10, None, 0), 1, 4, 10) == (UNBOUNDED, -6)  # top-left causal, Tk - Tq = 6
    assert kernel_band(_band_mask(10, 10, 3, 2), 1, 10, 10) == (3, 2)
    assert kernel_band(torch.ones(5, 7, dtype=torch.bool), 1, 5, 7) == (UNBOUNDED, UNBOUNDED)
    assert kernel_band(_band_mask(6, 6, None, 0).float(), 1, 6, 6) is None  # 1.0 where kept: a bias, not 0/-inf


def test_the_answer_is_read_once_per_mask_and_again_after_a_change(monkeypatch):
    calls = []
    read = attention_masks._kernel_band
    monkeypatch.setattr(attention_masks, "_kernel_band", lambda *a: calls.append(1) or read(*a))
    mask = _band_mask(8, 8, None, 0)
    for _ in range(3):  # three layers, one mask
        assert kernel_band(mask, 2, 8, 8) == (UNBOUNDED, 0)
    assert len(calls) == 1
    mask[5, 2] = False  # in place: a hole, no longer a band
    assert kernel_band(mask, 2, 8, 8) is None and len(calls) == 2


def test_a_gradient_mask_keeps_the_reference_and_dropout_the_band():
    mask = torch.zeros(8, 8).masked_fill(~_band_mask(8, 8, None, 0), float("-inf")).requires_grad_()
    assert kernel_band(mask, 1, 8, 8) is None  # its gradient is the reference's
    q, k, v = _qkv(1, 2, 8, 8)
    outs = []
    for kw in (dict(attn_mask=_band_mask(8, 8, None, 0), backend="cpu"), dict(is_causal=True, backend="reference")):
        torch.manual_seed(3)  # the same dropout seed: the kernels' mask on the band, the reference's on is_causal
        outs.append(scaled_dot_product_attention(q, k, v, dropout_p=0.3, **kw))
    torch.testing.assert_close(*outs)
