"""flash-attn's S_dmask (return_attn_probs with dropout) in flash-attn's encoding, read back as flash-attn's tests
read it (flash_attn_ref.decode_s_dmask): the probabilities of the reference softmax, the sign the kernels' dropout
mask, 0 where a key is hidden and past each sequence; dense, varlen, packed, GQA, causal, windows, ALiBi and
softcap; the key block (`_get_block_size_n`) and `USE_TRITON_ROCM` importable from the flash-attn mirror."""

import pytest
import torch

from fasttrain.flash_attn.flash_attn_interface import USE_TRITON_ROCM, _get_block_size_n
from fasttrain.ops import flash_attn_func, flash_attn_qkvpacked_func, flash_attn_varlen_func
from fasttrain.ops.attention_dropout import dense_keep, dropout_seed
from fasttrain.ops.attention_reference import s_dmask_block

from flash_attn_ref import alibi_bias, decode_s_dmask, local_mask


def _seeded(fn, *args, **kwargs):
    """fn under torch's RNG seeded alike, so that every call draws the same dropout seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        return fn(*args, **kwargs)


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _softmax(q, k, causal, window, softcap=0.0, bias=None):
    """The reference probabilities (B, H, Tq, Tk) float64; rows that see no key 0."""
    Tq, Tk = q.shape[1], k.shape[1]
    k = k.double().repeat_interleave(q.shape[2] // k.shape[2], dim=2)
    s = torch.einsum("bthd,bshd->bhts", q.double(), k) * q.shape[-1] ** -0.5
    if softcap > 0:
        s = torch.tanh(s / softcap) * softcap
    window = (window[0], 0) if causal else window
    s = s.masked_fill(local_mask(Tq, Tk, window, None, q.device), float("-inf"))
    if bias is not None:
        s = s + bias.double()
    return torch.softmax(s, dim=-1).nan_to_num(0.0)


def test_block_size_is_flash_attns_and_the_mirror_has_its_names():
    # flash-attn's forward kernels with dropout: kBlockN 128 up to d 32, 64 to d 96, 32 to d 128, 64 to d 256
    got = [_get_block_size_n("cpu", d, True, c) for d in (32, 40, 64, 80, 96, 111, 128, 160, 256) for c in (0, 1)]
    assert got == [x for x in (128, 64, 64, 64, 64, 32, 32, 64, 64) for _ in (0, 1)]
    assert _get_block_size_n("meta", 64, False, False) == 128 and _get_block_size_n(None, 128, False, True) == 64
    assert USE_TRITON_ROCM is False
    with pytest.raises(ValueError, match="head_dim"):
        _get_block_size_n("cpu", 257, True, False)
    assert [s_dmask_block(d) for d in (0, 256, 257, 512)] == [128, 64, 64, 64]  # S_dmask's, for any head dim


def test_s_dmask_past_flash_attns_head_dims_decodes_with_its_block():
    """A head dim flash-attn cannot run (320) still returns S_dmask, in blocks of s_dmask_block's 64 columns."""
    q, k, v = (_randn(1, 70, 2, 320, seed=i) for i in range(3))
    _, _, S = _seeded(flash_attn_func, q, k, v, dropout_p=0.25, causal=True, return_attn_probs=True)
    probs, _ = decode_s_dmask(S, q, k, s_dmask_block(320), True, (-1, -1))
    assert (probs - _softmax(q, k, True, (-1, -1))).abs().max().item() < 1e-5


# (B, Tq, Tk, H, Hkv, D, causal, window, softcap, alibi): several key blocks each (d 40: 64 columns, d 100: 32);
# Tq > Tk causal leaves rows that see no key
CASES = [
    (2, 33, 97, 4, 2, 40, True, (-1, -1), 0.0, False),
    (1, 97, 33, 2, 1, 100, True, (-1, -1), 0.0, False),
    (2, 50, 97, 2, 2, 100, False, (20, 7), 0.0, True),
    (1, 40, 130, 3, 1, 40, False, (-1, -1), 2.0, True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}-q{}-k{}-H{}/{}-d{}-c{}-w{}-cap{}-alibi{}".format(*c))
def test_s_dmask_decodes_to_the_reference_probabilities(case):
    B, Tq, Tk, H, Hkv, D, causal, window, softcap, alibi = case
    q, k, v = _randn(B, Tq, H, D, seed=0), _randn(B, Tk, Hkv, D, seed=1), _randn(B, Tk, Hkv, D, seed=2)
    slopes = torch.rand(B, H, generator=torch.Generator().manual_seed(3)) * 0.3 if alibi else None
    kw = dict(causal=causal, window_size=window, softcap=softcap, alibi_slopes=slopes, return_attn_probs=True)
    _, _, S = _seeded(flash_attn_func, q, k, v, dropout_p=0.25, backend="cpu", **kw)
    assert S.shape == (B, H, 128 * -(-Tq // 128), 128 * -(-Tk // 128)) and S.dtype == q.dtype
    bias = None if slopes is None else alibi_bias(slopes, Tq, Tk)
    probs, kept = decode_s_dmask(S, q, k, _get_block_size_n("cpu", D, True, causal), causal, window, softcap, bias)
    want = _softmax(q, k, causal, window, softcap, bias)
    assert (probs - want).abs().max().item() < 1e-5
    # read as normalized P, as before flash-attn's encoding, it is wrong by far more than rounding
    assert (S[:, :, :Tq, :Tk].abs().double() - want).abs().max().item() > 1e-2
    seen = want > 0
    keep = _seeded(dense_keep, _seeded(dropout_seed, "cpu"), 0.25, B, H, Tq, Tk)
    assert torch.equal(kept & seen, keep & seen) and torch.equal(kept | seen, torch.ones_like(kept))
    assert (S[:, :, Tq:] == 0).all() and (S[:, :, :, Tk:] == 0).all() and (S[:, :, :Tq, :Tk][~seen] == 0).all()


def test_varlen_and_packed_s_dmask_are_the_dense_ones():
    """Each packed sequence at [b, :, :Tq_b, :Tk_b], its blocks counted from its own first key, 0 past it; the
    qkvpacked form's S_dmask is flash_attn_func's."""
    lens_q, lens_k, H, D = (5, 40), (70, 33), 2, 64
    q = _randn(sum(lens_q), H, D, seed=4)
    k, v = _randn(sum(lens_k), 1, D, seed=5), _randn(sum(lens_k), 1, D, seed=6)
    cu_q = torch.tensor([0, 5, 45], dtype=torch.int32)
    cu_k = torch.tensor([0, 70, 103], dtype=torch.int32)
    kw = dict(dropout_p=0.2, causal=True, return_attn_probs=True, backend="cpu")
    _, _, S = _seeded(flash_attn_varlen_func, q, k, v, cu_q, cu_k, 40, 70, **kw)
    assert S.shape == (2, H, 128, 128)
    keep = _seeded(dense_keep, _seeded(dropout_seed, "cpu"), 0.2, 2, H, 40, 70)
    block = _get_block_size_n("cpu", D, True, True)
    for b in range(2):
        qb, kb = q[None, cu_q[b] : cu_q[b + 1]], k[None, cu_k[b] : cu_k[b + 1]]
        Tq, Tk = lens_q[b], lens_k[b]
        probs, kept = decode_s_dmask(S[b : b + 1], qb, kb, block, True, (-1, -1))
        want = _softmax(qb, kb, True, (-1, -1))
        assert (probs - want).abs().max().item() < 1e-5
        seen = want[0] > 0
        assert torch.equal(kept[0] & seen, keep[b, :, :Tq, :Tk] & seen)
        assert (S[b, :, Tq:] == 0).all() and (S[b, :, :, Tk:] == 0).all()
    qkv = _randn(2, 97, 3, H, D, seed=7)
    _, _, Sp = _seeded(flash_attn_qkvpacked_func, qkv, **kw)
    _, _, Sd = _seeded(flash_attn_func, *qkv.unbind(2), **kw)
    assert Sp.shape == (2, H, 128, 128) and torch.equal(Sp, Sd)


def test_s_dmask_dropout_fraction_and_sign():
    """The share of visible scores S_dmask marks negative is dropout_p (flash-attn's test allows 0.01); a dropped
    score is the negated kept value, not zeroed."""
    q, k, v = _randn(2, 128, 2, 32, seed=8), _randn(2, 128, 2, 32, seed=9), _randn(2, 128, 2, 32, seed=10)
    for p in (0.17, 0.5):
        _, _, S = _seeded(flash_attn_func, q, k, v, dropout_p=p, return_attn_probs=True, backend="cpu")
        assert abs((S < 0).double().mean().item() - p) < 0.01
        probs, _ = decode_s_dmask(S, q, k, _get_block_size_n("cpu", 32, True, False), False, (-1, -1))
        assert (probs - _softmax(q, k, False, (-1, -1))).abs().max().item() < 1e-5
