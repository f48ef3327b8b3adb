"""flash-attn's `flash_attn.layers.rotary` beyond apply_rotary_emb (fasttrain.ops.rotary): rotate_half,
apply_rotary_emb_torch, the in-place apply_rotary_emb_qkv_ / apply_rotary_emb_kv_ with their gradients, the
RotaryEmbedding module (its cache, seqlen_offset, GQA and XPos), and flash_attn.ops.triton.rotary's apply_rotary,
against rotations written out here."""

import pytest
import torch

from fasttrain.ops.rotary import (
    RotaryEmbedding,
    apply_rotary,
    apply_rotary_emb,
    apply_rotary_emb_func,
    apply_rotary_emb_kv_,
    apply_rotary_emb_qkv_,
    apply_rotary_emb_torch,
    rotate_half,
)

from helpers import TOL_FP32, err, randn

TOL = TOL_FP32["rotary"]


def _angles(n_pos, half, seed=1):
    theta = torch.rand(n_pos, half, generator=torch.Generator().manual_seed(seed)) * 6  # (n_pos, R/2)
    return theta.cos(), theta.sin()


def _rotated(x, cos, sin, interleaved=False):
    """x (B, T, H, D) rotated pair by pair, written out: the first 2 * cos.shape[-1] dims, the rest passed."""
    half = cos.shape[-1]
    c, s = cos[:, None], sin[:, None]  # (T, 1, R/2): over heads
    if interleaved:
        x1, x2 = x[..., 0 : 2 * half : 2], x[..., 1 : 2 * half : 2]
        out = torch.stack((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).flatten(-2)
    else:
        x1, x2 = x[..., :half], x[..., half : 2 * half]
        out = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
    return torch.cat((out, x[..., 2 * half :]), dim=-1)


@pytest.mark.parametrize("interleaved", [False, True])
def test_rotate_half_and_the_torch_rotation(interleaved):
    x = randn(2, 7, 3, 16, seed=0, grad=False)
    cos, sin = _angles(7, 6)
    assert apply_rotary_emb_func is apply_rotary_emb
    turned = rotate_half(x, interleaved)
    pairs = (x[..., 0::2], x[..., 1::2]) if interleaved else (x[..., :8], x[..., 8:])
    back = (turned[..., 1::2], -turned[..., 0::2]) if interleaved else (turned[..., 8:], -turned[..., :8])
    assert all(torch.equal(a, b) for a, b in zip(pairs, back))
    want = _rotated(x, cos, sin, interleaved)
    assert err(apply_rotary_emb_torch(x, cos, sin, interleaved), want) < TOL
    assert err(apply_rotary_emb_torch(x, cos[None].expand(2, 7, 6), sin[None].expand(2, 7, 6), interleaved), want) < TOL
    assert apply_rotary_emb_torch(x.to(torch.float16), cos, sin).dtype == torch.float32  # torch's promotion


@pytest.mark.parametrize("layout", ["packed 3", "packed 3, strided", "gqa", "xpos tables for k"])
def test_qkv_rotates_q_and_k_in_place_with_gradients(layout):
    B, T, H, D = 2, 5, 2, 16
    cos, sin = _angles(8, 8)
    cos_k, sin_k = _angles(8, 8, seed=2)
    with_k = layout == "xpos tables for k"
    leaf = randn(B, T, 3 * H + 2 if layout == "packed 3, strided" else 3 * H, D, seed=3).requires_grad_()
    if layout == "gqa":
        qkv = leaf[:, :, :4] * 1.0  # (B, T, Hq + 2 * Hk, D): 2 query heads, 1 key and 1 value head
        parts = [qkv[:, :, :2], qkv[:, :, 2:3], qkv[:, :, 3:]]
        kwargs = dict(num_heads_q=2)
    else:
        qkv = (leaf[:, :, : 3 * H] * 1.0).view(B, T, 3, H, D)
        if layout == "packed 3, strided":
            qkv = (leaf * 1.0)[:, :, : 3 * H].unflatten(2, (3, H))  # a view with stride gaps between tokens
        parts = [qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]]
        kwargs = dict(cos_k=cos_k, sin_k=sin_k) if with_k else {}
    q, k, v = (t.detach().clone() for t in parts)
    want = [
        _rotated(q, cos[2:7], sin[2:7]),
        _rotated(k, (cos_k if with_k else cos)[2:7], (sin_k if with_k else sin)[2:7]),
        v,
    ]
    out = apply_rotary_emb_qkv_(qkv, cos, sin, seqlen_offsets=2, **kwargs)
    assert out is qkv and all(err(p, w) < TOL for p, w in zip(parts, want))
    upstream = randn(*qkv.shape, seed=4, grad=False)
    (grad,) = torch.autograd.grad(qkv, leaf, upstream)
    ref_leaf = leaf.detach().clone().requires_grad_()
    ref = ref_leaf[:, :, :4] if layout == "gqa" else ref_leaf[:, :, : 3 * H].view(B, T, 3, H, D)
    heads = (slice(0, 2), slice(2, 3), slice(3, 4)) if layout == "gqa" else (0, 1, 2)
    ref_parts = [ref[:, :, h] for h in heads]
    ref_out = [
        _rotated(ref_parts[0], cos[2:7], sin[2:7]),
        _rotated(ref_parts[1], (cos_k if with_k else cos)[2:7], (sin_k if with_k else sin)[2:7]),
        ref_parts[2],
    ]
    ref_qkv = torch.cat(ref_out, dim=2) if layout == "gqa" else torch.stack(ref_out, dim=2)
    (want_grad,) = torch.autograd.grad(ref_qkv, ref_leaf, upstream)
    assert err(grad, want_grad) < TOL


def test_kv_rotates_k_in_place_and_bad_layouts_name_themselves():
    cos, sin = _angles(6, 4)
    kv = randn(1, 6, 2, 3, 8, seed=5, grad=False)
    k, v = kv[:, :, 0].clone(), kv[:, :, 1].clone()
    offsets = torch.tensor([0])
    assert apply_rotary_emb_kv_(kv, cos, sin, True, offsets) is kv
    assert err(kv[:, :, 0], _rotated(k, cos, sin, interleaved=True)) < TOL and torch.equal(kv[:, :, 1], v)
    with pytest.raises(ValueError, match=r"kv must be a \(B, T, 2, H, D\) tensor"):
        apply_rotary_emb_kv_(kv[:, :, 0], cos, sin)
    with pytest.raises(TypeError, match="num_heads_q must be an int"):
        apply_rotary_emb_qkv_(kv[:, :, 0], cos, sin)
    with pytest.raises(ValueError, match="must be num_heads_q"):
        apply_rotary_emb_qkv_(randn(1, 6, 4, 8, seed=6, grad=False), cos, sin, num_heads_q=1)
    with pytest.raises(ValueError, match=r"qkv must be \(B, T, 3, H, D\)"):
        apply_rotary_emb_qkv_(kv, cos, sin)


def _tables(dim, n_pos, base=10000.0):
    inv_freq = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)  # (dim/2,)
    freqs = torch.arange(n_pos, dtype=torch.float32)[:, None] * inv_freq  # (n_pos, dim/2)
    return freqs.cos(), freqs.sin()


def test_rotary_embedding_module_rotates_qkv_and_q_kv_from_its_cache():
    rope = RotaryEmbedding(8, base=500, interleaved=True)
    assert "inv_freq" not in rope.state_dict() and rope.inv_freq.shape == (4,)
    qkv = randn(2, 5, 3, 2, 16, seed=7, grad=False)
    q, k, v = (qkv[:, :, i].clone() for i in range(3))
    assert rope(qkv, seqlen_offset=3) is qkv
    assert rope._cos_cached.shape == (8, 4) and rope._seq_len_cached == 8
    cos, sin = _tables(8, 8, base=500)
    want_q, want_k = (_rotated(t, cos[3:], sin[3:], interleaved=True) for t in (q, k))
    assert err(qkv[:, :, 0], want_q) < TOL and err(qkv[:, :, 1], want_k) < TOL and torch.equal(qkv[:, :, 2], v)
    q, kv = randn(2, 5, 2, 16, seed=8, grad=False), randn(2, 5, 2, 2, 16, seed=9, grad=False)
    k = kv[:, :, 0].clone()
    offsets = torch.tensor([0, 2])
    out_q, out_kv = rope(q.clone(), kv, seqlen_offset=offsets, max_seqlen=12)
    assert out_kv is kv and rope._seq_len_cached == 12
    cos, sin = _tables(8, 12, base=500)
    for b, o in enumerate(offsets.tolist()):
        c, s = cos[o : o + 5], sin[o : o + 5]
        assert err(out_q[b : b + 1], _rotated(q[b : b + 1], c, s, True)) < TOL
        assert err(out_kv[b : b + 1, :, 0], _rotated(k[b : b + 1], c, s, True)) < TOL


def test_rotary_embedding_xpos_scales_q_up_and_k_down():
    rope = RotaryEmbedding(16, scale_base=64)
    qkv = randn(1, 6, 3, 1, 16, seed=10, grad=False)
    q, k = qkv[:, :, 0].clone(), qkv[:, :, 1].clone()
    rope(qkv)
    cos, sin = _tables(16, 6)
    scale = ((torch.arange(0, 16, 2) + 0.4 * 16) / (1.4 * 16)) ** ((torch.arange(6) - 3) / 64)[:, None]  # (6, 8)
    assert rope._cos_cached.dtype == torch.float32 and rope._cos_k_cached.shape == (6, 8)
    assert err(qkv[:, :, 0], _rotated(q, cos * scale, sin * scale)) < TOL
    assert err(qkv[:, :, 1], _rotated(k, cos / scale, sin / scale)) < TOL


def test_rotary_embedding_cache_from_inference_mode_is_rebuilt_for_training_and_compiles_whole():
    rope = RotaryEmbedding(8)
    qkv = randn(2, 5, 3, 2, 8, seed=11, grad=False)
    with torch.inference_mode():
        rope(qkv.clone())
    assert rope._cos_cached.is_inference()
    rope.eval()
    rope(qkv.clone())  # eval keeps the inference-mode cache, as flash-attn's
    assert rope._cos_cached.is_inference()
    rope.train()
    want = rope(qkv.clone())
    assert not rope._cos_cached.is_inference()
    # the cache filled, a training call traces without a graph break (no tensor.is_inference() in its path)
    compiled = torch.compile(lambda t: rope(t), backend="eager", fullgraph=True)
    assert torch.equal(compiled(qkv.clone()), want)


@pytest.mark.parametrize("interleaved", [False, True])
def test_apply_rotary_is_flash_attns_kernel_call(interleaved):
    """flash-attn's ops.triton.rotary.apply_rotary: its argument order, conjugate the inverse rotation, outside
    autograd (no gradient, in place even on x requiring grad), per-sequence offsets and packed sequences."""
    x = randn(2, 7, 3, 20, seed=2).requires_grad_()
    cos, sin = _angles(12, 8)
    out = apply_rotary(x, cos, sin, 2, interleaved=interleaved)
    assert not out.requires_grad and err(out, _rotated(x.detach(), cos[2:9], sin[2:9], interleaved)) < TOL
    back = apply_rotary(out, cos, sin, seqlen_offsets=2, interleaved=interleaved, conjugate=True)
    assert err(back, x.detach()) < TOL
    offsets = torch.tensor([0, 5], dtype=torch.int32)
    per_seq = apply_rotary(x, cos, sin, offsets, interleaved=interleaved)
    want = apply_rotary_emb(x.detach(), cos, sin, interleaved, seqlen_offsets=offsets)
    assert torch.equal(per_seq, want)
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    packed = apply_rotary(x.detach()[0], cos, sin, 0, cu, 4, interleaved, conjugate=True)
    pieces = [_rotated(x.detach()[0, a:b], cos[: b - a], -sin[: b - a], interleaved) for a, b in ((0, 3), (3, 7))]
    assert err(packed, torch.cat(pieces)) < TOL
    y = x.detach().clone().requires_grad_()
    assert apply_rotary(y, cos, sin, 2, interleaved=interleaved, inplace=True) is y
    assert torch.equal(y.detach(), out)
    with pytest.raises(TypeError, match="conjugate"):
        apply_rotary(x, cos, sin, conjugate=1)


def test_in_place_rotations_take_a_leaf_requiring_grad_as_flash_attn():
    """flash-attn's in-place rotations accept a leaf that requires grad: its storage is rotated and the returned
    alias carries the gradient (rotated back) to it. qkv_, kv_, apply_rotary_emb and its packed form alike."""
    cos, sin = _angles(9, 8)
    g = randn(2, 9, 3, 2, 16, seed=5, grad=False)
    qkv = randn(2, 9, 3, 2, 16, seed=4)
    qkv0 = qkv.detach().clone()
    out = apply_rotary_emb_qkv_(qkv, cos, sin)
    want = torch.stack([_rotated(qkv0[:, :, i], cos, sin) for i in (0, 1)] + [qkv0[:, :, 2]], dim=2)
    assert qkv.is_leaf and err(out, want) < TOL and torch.equal(qkv.detach(), out.detach())
    out.backward(g)
    grad_want = torch.stack([_rotated(g[:, :, i], cos, -sin) for i in (0, 1)] + [g[:, :, 2]], dim=2)
    assert err(qkv.grad, grad_want) < TOL
    kv = randn(2, 9, 2, 2, 16, seed=6)
    kv0 = kv.detach().clone()
    out = apply_rotary_emb_kv_(kv, cos, sin, interleaved=True)
    out.backward(g[:, :, :2])
    assert err(out, torch.stack((_rotated(kv0[:, :, 0], cos, sin, True), kv0[:, :, 1]), dim=2)) < TOL
    assert err(kv.grad, torch.stack((_rotated(g[:, :, 0], cos, -sin, True), g[:, :, 1]), dim=2)) < TOL
    x = randn(2, 9, 2, 16, seed=7)
    x0 = x.detach().clone()
    out = apply_rotary_emb(x, cos, sin, inplace=True)
    out.backward(g[:, :, 0])
    assert torch.equal(x.detach(), out.detach()) and err(out, _rotated(x0, cos, sin)) < TOL
    assert err(x.grad, _rotated(g[:, :, 0], cos, -sin)) < TOL
    packed = randn(9, 2, 16, seed=8)
    p0 = packed.detach().clone()
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    out = apply_rotary_emb(packed, cos, sin, inplace=True, cu_seqlens=cu, max_seqlen=5)
    out.backward(g[0, :, 0])
    pieces = [_rotated(p0[a:b], cos[: b - a], sin[: b - a]) for a, b in ((0, 4), (4, 9))]
    grads = [_rotated(g[0, a:b, 0], cos[: b - a], -sin[: b - a]) for a, b in ((0, 4), (4, 9))]
    assert torch.equal(packed.detach(), out.detach()) and err(out, torch.cat(pieces)) < TOL
    assert err(packed.grad, torch.cat(grads)) < TOL
