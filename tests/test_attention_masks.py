"""scaled_dot_product_attention's attn_mask: causal and sliding-window masks (bool, or additive 0/-inf; 2-D or 4-D;
broadcast over batch and heads) run the kernels as a band, padding and document-packing masks as varlen launches,
each with torch's own result and gradients; a mask with a hole in a row, one per head, or other additive values
keeps the reference; the answer is read once per mask tensor."""

import pytest
import torch
import torch.nn.functional as F

from fasttrain._backend import BackendError
from fasttrain.ops import attention_masks, scaled_dot_product_attention
from fasttrain.ops.attention_masks import Segments, kernel_plan
from fasttrain.ops.attention_reference import UNBOUNDED

from helpers import TOL_FP32, assert_within_2x_torch, float64_leaves, randn

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


def _plan(mask, B, Tq, Tk):
    return kernel_plan(mask, B, Tq, Tk, torch.device("cpu"))


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


def _causal(T):
    return _band_mask(T, T, None, 0)


def _documents(T, bounds, causal=True):
    """(T, T) block-diagonal: each [s, e) of bounds a document, causal within it or not."""
    keep = torch.zeros(T, T, dtype=torch.bool)
    for s, e in bounds:
        keep[s:e, s:e] = _causal(e - s) if causal else True
    return keep


def _padding(lengths, T, left=False):
    """(B, T) bool: the first (or, left-padded, the last) lengths[b] positions are real."""
    pos = torch.arange(T)[None, :]
    n = torch.tensor(lengths)[:, None]
    return pos >= T - n if left else pos < n


def _segment_masks():
    """name -> (B, Tq, Tk, mask): padding and document packing, which the kernels serve as varlen launches."""
    pad = _padding([9, 4, 1], 9)
    left = _padding([9, 4, 1], 9, left=True)
    docs = _documents(12, [(0, 5), (5, 6), (6, 12)])
    holed = _causal(8).clone()
    holed[2, 3] = True  # one key past the diagonal: still one stretch per row
    return {
        "key-padding": (3, 9, 9, pad[:, None, None, :]),
        "key-padding-empty-row": (3, 9, 9, _padding([9, 0, 5], 9)[:, None, None, :]),
        "right-padded-causal": (3, 9, 9, (pad[:, None, :] & _causal(9))[:, None]),
        "left-padded-causal": (3, 9, 9, (left[:, None, :] & _causal(9))[:, None]),
        "left-padded-decode": (3, 2, 9, (left[:, None, :] & _band_mask(2, 9, None, 7))[:, None]),
        "documents": (2, 12, 12, docs),
        "documents-bidirectional": (2, 12, 12, _documents(12, [(0, 7), (7, 12)], causal=False)[None, None]),
        "documents-per-batch-row": (2, 8, 8, torch.stack((_documents(8, [(0, 3), (3, 8)]), _causal(8)))[:, None]),
        "past-the-diagonal": (2, 8, 8, holed),
    }


@pytest.mark.parametrize("kind", ["bool", "additive"])
@pytest.mark.parametrize("name", list(_segment_masks()))
def test_padding_and_document_masks_run_the_varlen_kernel_with_torchs_result(name, kind):
    B, Tq, Tk, keep = _segment_masks()[name]
    mask = keep if kind == "bool" else torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))
    assert isinstance(_plan(mask, B, Tq, Tk), Segments)
    q, k, v = _qkv(B, 2, Tq, Tk)
    out = scaled_dot_product_attention(q, k, v, attn_mask=mask, backend="cpu")  # a mask left would raise here
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    want = F.scaled_dot_product_attention(*leaves, attn_mask=mask)
    torch.testing.assert_close(out, want, **TOL)
    do = torch.randn_like(out)
    got, expected = torch.autograd.grad(out, (q, k, v), do), torch.autograd.grad(want, leaves, do)
    for name_, a, b in zip("qkv", got, expected):
        torch.testing.assert_close(a, b, **TOL, msg=lambda m, n=name_: f"d{n}: {m}")


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_segments_with_gqa_on_each_kernel(backend):
    mask = (_padding([7, 3], 7)[:, None, :] & _causal(7))[:, None]  # right-padded causal: a causal and a full launch
    q = torch.randn(2, 4, 7, 32, requires_grad=True)
    k, v = (torch.randn(2, 2, 7, 32, requires_grad=True) for _ in range(2))
    out = scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True, backend=backend)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(out, want, **TOL)
    do = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), do), torch.autograd.grad(want, (q, k, v), do)):
        torch.testing.assert_close(a, b, **TOL)


def test_the_launches_of_a_right_padded_causal_batch():
    """Real rows are causal over their own keys; pad rows after them see every real key (a full launch)."""
    mask = (_padding([5, 2], 5)[:, None, :] & _causal(5))[:, None]
    plan = _plan(mask, 2, 5, 5)
    causal, full = plan.launches
    assert (causal.right, full.right) == (0, UNBOUNDED)
    assert causal.cu_seqlens_q.tolist() == causal.cu_seqlens_k.tolist() == [0, 5, 7]
    assert causal.q_rows.tolist() == [0, 1, 2, 3, 4, 5, 6] and causal.k_rows.tolist() == [0, 1, 2, 3, 4, 5, 6]
    assert full.q_rows.tolist() == [7, 8, 9] and full.k_rows.tolist() == [5, 6]  # batch row 1's pad rows, its keys
    assert (full.cu_seqlens_q.tolist(), full.cu_seqlens_k.tolist(), full.max_seqlen_q) == ([0, 3], [0, 2], 3)


def _other_masks():
    causal = _causal(8)
    holed = causal.clone()
    holed[5, 2] = False  # a row seeing two stretches
    per_head = torch.stack((causal, _band_mask(8, 8, 2, 0)))[None]
    scaled = torch.zeros(8, 8).masked_fill(~causal, float("-inf"))
    scaled[3, 1] = -2.0  # a bias, not a mask
    # a sliding window inside each document: every row its own run, each with its own copy of its keys
    windows = _band_mask(16, 16, 2, 0) & _documents(16, [(0, 8), (8, 16)])
    return {
        "two-stretches": holed,
        "per-head": per_head,
        "additive-bias": scaled,
        "windows-in-documents": windows,
        "no-key-anywhere": torch.zeros(8, 8, dtype=torch.bool),
    }


@pytest.mark.parametrize("name", list(_other_masks()))
def test_other_masks_keep_the_reference(name):
    mask = _other_masks()[name]
    T = mask.shape[-1]
    assert _plan(mask, 2, T, T) is None
    q, k, v = _qkv(2, 2, T, T)
    with pytest.raises(BackendError, match="attn_mask"):
        scaled_dot_product_attention(q, k, v, attn_mask=mask, backend="cpu")
    out = scaled_dot_product_attention(q, k, v, attn_mask=mask, backend="reference")
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), **TOL)


def test_the_band_in_kernel_coordinates():
    assert _plan(_band_mask(6, 6, None, 0), 1, 6, 6) == (UNBOUNDED, 0)
    assert _plan(_band_mask(4, 10, None, 0), 1, 4, 10) == (UNBOUNDED, -6)  # top-left causal, Tk - Tq = 6
    assert _plan(_band_mask(10, 10, 3, 2), 1, 10, 10) == (3, 2)
    assert _plan(torch.ones(5, 7, dtype=torch.bool), 1, 5, 7) == (UNBOUNDED, UNBOUNDED)
    assert _plan(_band_mask(6, 6, None, 0).float(), 1, 6, 6) is None  # 1.0 where kept: a bias, not 0/-inf


def test_the_answer_is_read_once_per_mask_and_again_after_a_change(monkeypatch):
    calls = []
    read = attention_masks._kernel_plan
    monkeypatch.setattr(attention_masks, "_kernel_plan", lambda *a: calls.append(1) or read(*a))
    mask = _band_mask(8, 8, None, 0)
    for _ in range(3):  # three layers, one mask
        assert _plan(mask, 2, 8, 8) == (UNBOUNDED, 0)
    assert len(calls) == 1
    mask[5, 2] = False  # in place: a hole, no longer one stretch per row
    assert _plan(mask, 2, 8, 8) is None and len(calls) == 2


def test_a_gradient_mask_keeps_the_reference_and_dropout_the_band():
    mask = torch.zeros(8, 8).masked_fill(~_band_mask(8, 8, None, 0), float("-inf")).requires_grad_()
    assert _plan(mask, 1, 8, 8) is None  # its gradient is the reference's
    q, k, v = _qkv(1, 2, 8, 8)
    outs = []
    for kw in (dict(attn_mask=_band_mask(8, 8, None, 0), backend="cpu"), dict(is_causal=True, backend="reference")):
        torch.manual_seed(3)  # the same dropout seed: the kernels' mask on the band, the reference's on is_causal
        outs.append(scaled_dot_product_attention(q, k, v, dropout_p=0.3, **kw))
    torch.testing.assert_close(*outs)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["right-padded-causal", "documents", "key-padding"])
def test_gpu_segments_within_2x_torch(name):
    """bf16 at a model's size on the Triton kernels: output and gradients within 2x torch's own bf16 error."""
    B, H, T, D = 4, 8, 1024, 128
    lengths = torch.tensor([1024, 700, 333, 1])
    pad = torch.arange(T)[None] < lengths[:, None]
    keep = {
        "right-padded-causal": (pad[:, None, :] & _causal(T))[:, None],
        "documents": _documents(T, [(0, 300), (300, 301), (301, 800), (800, T)]),
        "key-padding": pad[:, None, None, :],
    }[name].cuda()
    q, k, v = (randn(B, H, T, D, dtype=torch.bfloat16, device="cuda", seed=s) for s in range(3))
    do = randn(B, H, T, D, dtype=torch.bfloat16, device="cuda", seed=3, grad=False)
    out = scaled_dot_product_attention(q, k, v, attn_mask=keep, backend="triton")
    mine = [t.detach().requires_grad_() for t in (q, k, v)]
    torch_out = F.scaled_dot_product_attention(*mine, attn_mask=keep)
    wide = float64_leaves(q, k, v)
    want = F.scaled_dot_product_attention(*wide, attn_mask=keep)
    assert_within_2x_torch(out, torch_out, want, what="out")
    ours = torch.autograd.grad(out, (q, k, v), do)
    theirs = torch.autograd.grad(torch_out, mine, do)
    exact = torch.autograd.grad(want, wide, do.double())
    for n, a, b, c in zip("qkv", ours, theirs, exact):
        assert_within_2x_torch(a, b, c, what=f"d{n}")


@pytest.mark.parametrize("seed", range(4))
def test_random_documents_and_padding_match_torch(seed):
    """Per batch row: random documents, each causal or not, then padding on a random side; every row one stretch."""
    g = torch.Generator().manual_seed(seed)
    B, T = 3, 24
    keep = torch.zeros(B, 1, T, T, dtype=torch.bool)
    for b in range(B):
        cuts = sorted(torch.randperm(T - 1, generator=g)[: int(torch.randint(0, 5, (), generator=g))].add(1).tolist())
        for s, e in zip([0, *cuts], [*cuts, T]):
            keep[b, 0, s:e, s:e] = _causal(e - s) if torch.rand((), generator=g) < 0.7 else True
        pad = int(torch.randint(0, T // 2, (), generator=g))
        if torch.rand((), generator=g) < 0.5:
            keep[b, 0, :, T - pad :] = False  # right padding: the last keys
        else:
            keep[b, 0, :, :pad] = False
    assert isinstance(_plan(keep, B, T, T), Segments)
    q, k, v = _qkv(B, 2, T, T, seed=seed)
    out = scaled_dot_product_attention(q, k, v, attn_mask=keep, backend="cpu")
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    want = F.scaled_dot_product_attention(*leaves, attn_mask=keep)
    torch.testing.assert_close(out, want, **TOL)
    do = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), do), torch.autograd.grad(want, leaves, do)):
        torch.testing.assert_close(a, b, **TOL)
