"""fasttrain.ops.bert_padding: flash-attn's padding helpers (2.8), their returns, dtypes and gradients, and the
round trip through flash_attn_varlen_func against a padded batch."""

import pytest
import torch

from fasttrain.ops import flash_attn_func, flash_attn_varlen_func
from fasttrain.ops.bert_padding import (
    IndexFirstAxis,
    IndexPutFirstAxis,
    index_first_axis,
    index_first_axis_residual,
    index_put_first_axis,
    pad_input,
    unpad_input,
    unpad_input_for_concatenated_sequences,
)

from helpers import TOL_FP32


@pytest.mark.parametrize("dtype", [torch.bool, torch.int64, torch.int32, torch.float32, torch.float16])
def test_unpad_input_selects_the_valid_tokens_in_order(dtype):
    x = torch.randn(3, 5, 2, 4, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1], [0, 0, 0, 0, 0]]).to(dtype)  # right, left, all padding
    rows, indices, cu_seqlens, max_seqlen, seqused = unpad_input(x, mask)
    assert indices.tolist() == [0, 1, 2, 6, 7, 8, 9] and indices.dtype == torch.int64
    assert cu_seqlens.tolist() == [0, 3, 7, 7] and cu_seqlens.dtype == torch.int32
    assert max_seqlen == 4 and type(max_seqlen) is int
    assert seqused.tolist() == [3, 4, 0] and seqused.dtype == torch.int32
    torch.testing.assert_close(rows, x.reshape(15, 2, 4)[indices], atol=0, rtol=0)
    g = torch.randn_like(rows)
    (dx,) = torch.autograd.grad(rows, x, g)
    assert dx.reshape(15, 2, 4)[indices].equal(g) and not dx[mask.bool().logical_not()].any()


def test_unused_tokens_are_packed_but_not_counted_as_used():
    x = torch.randn(2, 4, 3)
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    unused = torch.tensor([[0, 0, 1, 0], [0, 1, 1, 0]], dtype=torch.bool)
    rows, indices, cu_seqlens, max_seqlen, seqused = unpad_input(x, mask, unused)
    assert indices.tolist() == [0, 1, 2, 4, 5, 6] and cu_seqlens.tolist() == [0, 3, 6]
    assert (max_seqlen, seqused.tolist()) == (3, [2, 1])
    assert rows.shape == (6, 3)


def test_pad_input_inverts_unpad_input_with_zeros_at_the_padding():
    x = torch.randn(2, 6, 8)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    rows, indices, *_ = unpad_input(x, mask)
    rows = rows.detach().requires_grad_()
    back = pad_input(rows, indices, 2, 6)
    assert back.shape == (2, 6, 8)
    torch.testing.assert_close(back, x * mask[..., None], atol=0, rtol=0)
    g = torch.randn_like(back)
    (drows,) = torch.autograd.grad(back, rows, g)
    assert drows.equal(g.reshape(12, 8)[indices])


def test_concatenated_sequences_give_one_sequence_per_sample():
    x = torch.randn(3, 6, 2)
    lengths = torch.tensor([[2, 3, 0, 0, 0, 0], [3, 2, 0, 0, 0, 0], [6, 0, 0, 0, 0, 0]])
    rows, indices, cu_seqlens, max_seqlen = unpad_input_for_concatenated_sequences(x, lengths)
    assert indices.tolist() == [0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 12, 13, 14, 15, 16, 17]
    assert cu_seqlens.tolist() == [0, 2, 5, 8, 10, 16] and max_seqlen == 6
    torch.testing.assert_close(rows, x.reshape(18, 2)[indices], atol=0, rtol=0)


def test_index_first_axis_and_its_inverse():
    x = torch.randn(7, 3, 2, requires_grad=True)
    idx = torch.tensor([6, 0, 3])
    picked = index_first_axis(x, idx)
    torch.testing.assert_close(picked, x[idx], atol=0, rtol=0)
    put = index_put_first_axis(picked, idx, 7)
    assert put.shape == (7, 3, 2) and not put[[1, 2, 4, 5]].any() and put[idx].equal(x[idx])
    (dx,) = torch.autograd.grad(put.sum(), x)
    assert dx[idx].eq(1).all() and not dx[[1, 2, 4, 5]].any()


def test_the_autograd_classes_and_the_residual_form():
    # IndexFirstAxis.apply / IndexPutFirstAxis.apply, as models call flash-attn's classes; the residual form returns
    # the picked rows and the whole input, whose gradients add up at the picked rows.
    x = torch.randn(6, 2, 3, requires_grad=True)
    idx = torch.tensor([4, 1])
    assert IndexFirstAxis.apply(x, idx).equal(x[idx])
    put = IndexPutFirstAxis.apply(x[idx], idx, 6)
    assert put[idx].equal(x[idx]) and not put[[0, 2, 3, 5]].any()
    picked, residual = index_first_axis_residual(x, idx)
    assert picked.equal(x[idx]) and residual.equal(x)
    g_picked, g_residual = torch.randn_like(picked), torch.randn_like(residual)
    (dx,) = torch.autograd.grad((picked, residual), x, (g_picked, g_residual))
    want = g_residual.clone()
    want[idx] += g_picked
    torch.testing.assert_close(dx, want, atol=0, rtol=0)


def test_the_varlen_round_trip_equals_the_padded_batch():
    """unpad -> flash_attn_varlen_func -> pad gives, on the valid rows, a right-padded batch's attention over its
    own keys: each sequence alone through flash_attn_func."""
    torch.manual_seed(0)
    B, T, H, D = 3, 9, 2, 16
    q, k, v = (torch.randn(B, T, H, D) for _ in range(3))
    lengths = [9, 4, 1]
    mask = torch.arange(T)[None] < torch.tensor(lengths)[:, None]
    (q_u, idx, cu, max_len, _), (k_u, *_), (v_u, *_) = (unpad_input(t, mask) for t in (q, k, v))
    out = pad_input(flash_attn_varlen_func(q_u, k_u, v_u, cu, cu, max_len, max_len, causal=True), idx, B, T)
    for b, n in enumerate(lengths):
        want = flash_attn_func(q[b : b + 1, :n], k[b : b + 1, :n], v[b : b + 1, :n], causal=True)[0]
        tol = TOL_FP32["attention"]
        torch.testing.assert_close(out[b, :n], want, atol=tol, rtol=tol)
        assert not out[b, n:].any()


def test_bad_arguments_name_themselves():
    x = torch.randn(2, 4, 3)
    with pytest.raises(ValueError, match=r"attention_mask must be a \(batch, seqlen\) tensor"):
        unpad_input(x, torch.ones(8, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"attention_mask \(2, 5\) must match hidden_states' \(batch, seqlen\)"):
        unpad_input(x, torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="attention_mask must be bool, integer or floating-point"):
        unpad_input(x, torch.ones(2, 4, dtype=torch.complex64))
    with pytest.raises(ValueError, match="hidden_states must have at least 2 dims"):
        unpad_input(torch.randn(4), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="indices must be a 1-D int64"):
        pad_input(torch.randn(3, 2), torch.tensor([0.0, 1.0, 2.0]), 1, 4)
    with pytest.raises(ValueError, match="indices has 2 rows, values 3"):
        index_put_first_axis(torch.randn(3, 2), torch.tensor([0, 1]), 4)
