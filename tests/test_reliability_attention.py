"""Attention's right answers at the edges: a NaN in q, k or v reaches exactly the outputs and gradients that depend
on it, on every backend, as the reference (softmax(q k^T * scale) v in plain torch) gives; head_dim 0 gives torch's
empty result."""

import warnings

import pytest
import torch

from fasttrain.ops import flash_attn_func, flash_attn_with_kvcache, scaled_dot_product_attention

B, H, T, D = 1, 2, 5, 32  # head_dim 32: one the Triton kernels take
NAN_ROW = 2


def nan_rows(q, k, v, which, causal, backend):
    """For each of out, dq, dk, dv: whether each (head 0) row holds a NaN, with a NaN at row NAN_ROW of `which`."""
    q, k, v = (t.detach().clone() for t in (q, k, v))
    {"q": q, "k": k, "v": v}[which][0, 0, NAN_ROW, 3] = float("nan")
    for t in (q, k, v):
        t.requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = scaled_dot_product_attention(q, k, v, is_causal=causal, backend=backend)
    out.backward(torch.randn_like(out))
    return [t[0, 0].isnan().any(-1).tolist() for t in (out, q.grad, k.grad, v.grad)]


CASES = [(b, w, c) for b in ("cpu", "triton") for w in "qkv" for c in (False, True)]  # Triton: the interpreter


@pytest.mark.parametrize("backend, which, causal", CASES)
def test_a_nan_in_q_k_or_v_propagates_as_in_the_reference(backend, which, causal, monkeypatch):
    if backend == "triton":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    else:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, T, D) for _ in range(3))
    got = nan_rows(q, k, v, which, causal, backend)
    want = nan_rows(q, k, v, which, causal, "reference")
    if which == "q" and causal:
        # The reference's softmax makes a NaN row NaN at the keys the mask hides too, so its dv is NaN at keys
        # NAN_ROW + 1.. that no output depends on; the kernels skip masked keys, as the math says.
        want[3] = [j <= NAN_ROW for j in range(T)]
    if backend == "triton" and which == "v" and causal:
        # Row 0 sees one key: the Triton backward takes its dS as exactly dlse without reading dP (one_key_rows in
        # kernels/_attention_tiles.py), where the reference's 0 * NaN at the hidden key NAN_ROW makes its dq row NaN.
        want[1][0] = False
    assert got == want
    if which == "q":  # the NaN row and no other
        assert got[0] == [t == NAN_ROW for t in range(T)]


@pytest.mark.parametrize("backend", ["cpu", "triton", "reference"])
def test_a_nan_in_the_kv_cache_or_the_query_propagates_in_decode(backend, monkeypatch):
    if backend == "triton":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    else:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    torch.manual_seed(0)
    q = torch.randn(2, 1, 4, 32)
    k_cache, v_cache = torch.randn(2, 300, 2, 32), torch.randn(2, 300, 2, 32)
    lens = torch.tensor([300, 120], dtype=torch.int32)
    k_cache[0, 7, 1, 5] = float("nan")  # batch 0, K/V head 1: query heads 2, 3
    q[1, 0, 0, 9] = float("nan")  # batch 1, query head 0
    v_cache[1, 200, 0, 0] = float("nan")  # beyond batch 1's length: never read (as torch.empty's garbage)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens, backend=backend)
    assert out.isnan().any(-1)[:, 0].tolist() == [[False, False, True, True], [True, False, False, False]]


@pytest.mark.parametrize("causal", [False, True])
def test_head_dim_0_gives_torchs_empty_result(causal, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q = torch.randn(2, 3, 4, 0, requires_grad=True)
    want = torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=causal)
    out = scaled_dot_product_attention(q, q, q, is_causal=causal)
    assert out.shape == want.shape == (2, 3, 4, 0)
    out.sum().backward()
    assert q.grad.shape == q.shape
    qt = q.detach().transpose(1, 2)  # (B, T, H, 0)
    assert flash_attn_func(qt, qt, qt, causal=causal).shape == (2, 4, 3, 0)
    cache = torch.randn(2, 8, 3, 0)
    lens = torch.tensor([8, 3], dtype=torch.int32)
    assert flash_attn_with_kvcache(qt[:, :1], cache, cache, cache_seqlens=lens).shape == (2, 1, 3, 0)
