"""torch's scaled_dot_product_attention semantics that fasttrain's keeps: inputs of any rank >= 2 (masks broadcast
as torch broadcasts them), a value head_dim of its own, dropout_p = 1.0, and scale / enable_gqa keyword-only."""

import pytest
import torch
import torch.nn.functional as F

from fasttrain.ops import scaled_dot_product_attention

from helpers import assert_within_2x_torch, max_err


def _leaves(*shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g).requires_grad_() for s in shapes]


def _same_as_torch(shapes, backend="cpu", **kw):
    """fasttrain's outputs and gradients (the C++ kernel's by default) against torch's on the same random leaves."""
    ours, theirs = _leaves(*shapes), _leaves(*shapes)
    out = scaled_dot_product_attention(*ours, **kw, backend=backend)
    want = F.scaled_dot_product_attention(*theirs, **kw)
    assert out.shape == want.shape
    torch.testing.assert_close(out, want, atol=2e-5, rtol=2e-5)
    dout = torch.randn(want.shape, generator=torch.Generator().manual_seed(1))
    for got, ref in zip(torch.autograd.grad(out, ours, dout), torch.autograd.grad(want, theirs, dout)):
        torch.testing.assert_close(got, ref, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize(
    "shapes,kw",
    [
        (((5, 32), (7, 32), (7, 32)), {}),  # (L, E)
        (((1, 32), (9, 32), (9, 32)), dict(is_causal=True)),  # one query row
        (((4, 97, 32), (2, 33, 32), (2, 33, 32)), dict(enable_gqa=True)),  # (H, L, E), GQA
        (((2, 3, 2, 6, 32), (2, 3, 2, 6, 32), (2, 3, 2, 6, 32)), dict(is_causal=True)),  # (N, M, H, L, E)
        (((2, 3, 2, 6, 32), (2, 3, 1, 9, 32), (2, 3, 1, 9, 32)), dict(enable_gqa=True, scale=0.3)),
        # enable_gqa with ranks of their own: the axes before the heads broadcast
        (((1, 4, 5, 32), (2, 5, 32), (2, 5, 32)), dict(enable_gqa=True)),
        (((4, 5, 32), (3, 2, 1, 7, 32), (3, 2, 1, 7, 32)), dict(enable_gqa=True, is_causal=True)),
        (((3, 2, 4, 5, 32), (2, 2, 5, 32), (1, 2, 5, 32)), dict(enable_gqa=True)),
        (((2, 12, 5, 32), (2, 4, 7, 32), (2, 6, 7, 32)), dict(enable_gqa=True)),  # k and v of their own head counts
    ],
    ids=[
        "2d",
        "2d-causal-one-row",
        "3d-gqa",
        "5d-causal",
        "5d-gqa-scale",
        "4d-3d-gqa",
        "3d-5d-gqa",
        "5d-4d-gqa",
        "kv-heads",
    ],
)
def test_any_rank_as_torch(shapes, kw):
    _same_as_torch(shapes, **kw)


@pytest.mark.parametrize("mask_shape", [(6, 9), (3, 1, 6, 9), (2, 1, 1, 1, 9)], ids=["LS", "M1LS", "N111S"])
@pytest.mark.parametrize("dtype", [torch.bool, torch.float32])
def test_masks_broadcast_as_torch_over_5d(mask_shape, dtype):
    g = torch.Generator().manual_seed(2)
    mask = torch.rand(mask_shape, generator=g) > 0.3
    mask[..., 0] = True  # every row sees a key (torch's NaN rows are another matter)
    if dtype != torch.bool:
        mask = torch.randn(mask_shape, generator=g)
    _same_as_torch(((2, 3, 2, 6, 32), (2, 3, 2, 9, 32), (2, 3, 2, 9, 32)), backend=None, attn_mask=mask)


@pytest.mark.parametrize("Ev,causal", [(16, True), (64, False)])
def test_a_value_head_dim_of_its_own(Ev, causal):
    # torch takes value (..., S, Ev) with Ev != E (MLA); the output is (..., L, Ev)
    _same_as_torch(((2, 4, 7, 32), (2, 4, 7, 32), (2, 4, 7, Ev)), is_causal=causal)
    _same_as_torch(((3, 5, 32), (3, 1, 32), (3, 1, Ev)))


def test_dropout_one_gives_zeros_and_zero_gradients():
    q, k, v = _leaves((2, 4, 5, 32), (2, 4, 7, 32), (2, 4, 7, 32))
    out = scaled_dot_product_attention(q, k, v, dropout_p=1.0, backend="cpu")
    assert out.shape == (2, 4, 5, 32) and torch.count_nonzero(out) == 0
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v, dropout_p=1.0))
    for grad in torch.autograd.grad(out, (q, k, v), torch.randn_like(out)):
        assert grad.shape in ((2, 4, 5, 32), (2, 4, 7, 32)) and torch.count_nonzero(grad) == 0


def test_scale_and_enable_gqa_are_keyword_only():
    q, k, v = _leaves((1, 2, 5, 32), (1, 2, 5, 32), (1, 2, 5, 32))
    for f in (F.scaled_dot_product_attention, scaled_dot_product_attention):
        with pytest.raises(TypeError):
            f(q, k, v, None, 0.0, False, 0.5)
        with pytest.raises(TypeError):
            f(q, k, v, None, 0.0, False, None, True)


def test_heads_and_ranks_broadcast_as_torchs_math_path():
    # without enable_gqa torch's math path broadcasts every axis before (T, D) as matmul does: one K/V head
    # against q's, q's one head against K/V's, ranks of their own
    _same_as_torch(((2, 2, 5, 32), (2, 1, 7, 32), (2, 1, 7, 32)))
    _same_as_torch(((1, 5, 32), (2, 7, 32), (2, 7, 32)), is_causal=True)
    _same_as_torch(((2, 5, 32), (7, 32), (7, 32)))
    with pytest.raises(ValueError):  # 2 heads against 3 broadcast nowhere (torch: RuntimeError)
        scaled_dot_product_attention(torch.randn(2, 5, 32), torch.randn(3, 7, 32), torch.randn(3, 7, 32))


@pytest.mark.parametrize(
    "shapes", [((5, 32), (7, 32), (7, 32)), ((2, 5, 32), (7, 32), (7, 32)), ((5, 32), (2, 7, 32), (2, 7, 32))]
)
def test_enable_gqa_needs_a_head_axis(shapes):
    q, k, v = _leaves(*shapes)
    with pytest.raises(IndexError):  # torch reads size(-3)
        F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    with pytest.raises(IndexError, match="enable_gqa"):
        scaled_dot_product_attention(q, k, v, enable_gqa=True)


def test_mask_dtype_and_shape_as_torch():
    q, k, v = _leaves((2, 2, 5, 32), (2, 2, 7, 32), (2, 2, 7, 32))
    for mask in (torch.zeros(5, 7, dtype=torch.float16), torch.zeros(5, 7, dtype=torch.float64)):
        with pytest.raises(RuntimeError, match="attn_mask dtype"):  # neither float32 nor q's dtype
            F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        with pytest.raises(TypeError, match="attn_mask"):
            scaled_dot_product_attention(q, k, v, attn_mask=mask)
    # a float32 mask with q of any float dtype, as torch takes it
    mask = torch.randn(5, 7, generator=torch.Generator().manual_seed(2))
    q64, k64, v64 = (t.detach().double() for t in (q, k, v))
    want = F.scaled_dot_product_attention(q64, k64, v64, attn_mask=mask)
    torch.testing.assert_close(scaled_dot_product_attention(q64, k64, v64, attn_mask=mask), want)
    # a mask that would widen the scores (2 query rows against Tq = 1) broadcasts to no (B, H, Tq, Tk)
    q1 = q[:, :, :1]
    with pytest.raises(RuntimeError, match="broadcast"):
        F.scaled_dot_product_attention(q1, k, v, attn_mask=torch.zeros(2, 7, dtype=torch.bool))
    with pytest.raises(ValueError, match="attn_mask of shape"):
        scaled_dot_product_attention(q1, k, v, attn_mask=torch.zeros(2, 7, dtype=torch.bool))


@pytest.mark.parametrize("Ev", [2, 32])
def test_cpu_kernel_takes_axes_of_one_with_any_stride(Ev):
    # torch calls (B, H, 1, E) with the T axis's stride 1 contiguous, and a last axis of one may have any stride:
    # the C++ kernel's GEMMs take row strides as leading dimensions, which BLAS refuses below the row's width
    g = torch.Generator().manual_seed(3)
    cases = [
        (torch.randn(2, 3, 32, 1, generator=g).transpose(-1, -2), torch.randn(2, 3, 7, 32, generator=g), Ev),
        (torch.randn(2, 3, 5, 32, generator=g), torch.randn(2, 3, 32, 1, generator=g).transpose(-1, -2), Ev),
        (torch.randn(2, 3, 1, 5, generator=g).transpose(-1, -2), torch.randn(2, 3, 1, 7, generator=g).mT, 1),
    ]
    for q, k, E_v in cases:
        v = torch.randn(*k.shape[:-1], E_v, generator=g)
        ours, theirs = [[t.clone().requires_grad_() for t in (q, k, v)] for _ in range(2)]
        assert [t.stride() for t in ours] == [t.stride() for t in (q, k, v)]  # clone keeps the strides under test
        out = scaled_dot_product_attention(*ours, backend="cpu")
        want = F.scaled_dot_product_attention(*theirs)
        torch.testing.assert_close(out, want, atol=2e-5, rtol=2e-5)
        dout = torch.randn(want.shape, generator=g)
        for got, ref in zip(torch.autograd.grad(out, ours, dout), torch.autograd.grad(want, theirs, dout)):
            torch.testing.assert_close(got, ref, atol=2e-5, rtol=2e-5)


def test_batch_axes_broadcast_as_torchs_math_path():
    # torch's math path (its CPU default) broadcasts k and v of batch 1 against q's batch, gradients summed back;
    # the kernels read the expanded views (batch stride 0)
    _same_as_torch(((3, 2, 5, 32), (1, 2, 7, 32), (1, 2, 7, 32)), backend="cpu", is_causal=True)
    _same_as_torch(((2, 2, 3, 32), (1, 2, 4, 32), (1, 2, 4, 32)), backend="triton")
    _same_as_torch(((2, 1, 2, 5, 32), (1, 3, 2, 7, 32), (1, 3, 2, 7, 32)), backend="cpu")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_with_a_dense_mask_within_2x_torchs_error(dtype):
    # an arbitrary mask runs the reference, which computes in float32 as the kernels and torch's CPU kernel do
    shapes = ((2, 2, 33, 32), (2, 2, 97, 32), (2, 2, 97, 32))
    q, k, v = (t.detach() for t in _leaves(*shapes))
    mask = torch.randn(33, 97, generator=torch.Generator().manual_seed(5))
    dout = torch.randn(2, 2, 33, 32, generator=torch.Generator().manual_seed(6))
    runs = []
    for f, dt in (
        (scaled_dot_product_attention, dtype),
        (F.scaled_dot_product_attention, dtype),
        (None, torch.float64),
    ):
        leaves = [t.to(dt).requires_grad_() for t in (q, k, v)]
        if f is None:
            with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
                out = F.scaled_dot_product_attention(*leaves, attn_mask=mask.to(dt), scale=2.0)
        else:
            out = f(*leaves, attn_mask=mask.to(dt), scale=2.0)
        runs.append([out, *torch.autograd.grad(out, leaves, dout.to(dt))])
    for ours, theirs, want in zip(*runs):
        assert_within_2x_torch(ours, theirs, want, measure=max_err, slack=1e-3)


def test_enable_gqa_key_and_value_heads_must_each_divide_querys():
    q, k, v = _leaves((2, 6, 5, 8), (2, 4, 7, 8), (2, 2, 7, 8))
    with pytest.raises(RuntimeError):
        F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    with pytest.raises(ValueError, match="key's and value's head counts \\(4, 2\\) must each divide query's \\(6\\)"):
        scaled_dot_product_attention(q, k, v, enable_gqa=True)
