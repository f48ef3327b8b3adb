"""fasttrain.flash_attn.ops.activations (flash-attn's `swiglu`, `fast_gelu_impl`, `gelu_fwd`, `gelu_bwd`) against
flash-attn's formulas in float64: values and gradients in fp32, fp16 and bf16, awkward sizes, input errors."""

import pytest
import torch
import torch.nn.functional as F

import fasttrain.flash_attn.ops.activations as mirror
from fasttrain.flash_attn.ops.activations import fast_gelu_impl, gelu_bwd, gelu_fwd, swiglu
from fasttrain.ops import activation
from fasttrain.ops import swiglu as fasttrain_swiglu

from helpers import randn

# One rounding to the dtype of a value computed in fp32 (or, for fp32, a few ulps of fp32 arithmetic).
TOL = {torch.float32: (1e-6, 1e-6), torch.float16: (1e-3, 1e-5), torch.bfloat16: (8e-3, 1e-5)}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1,), (97,), (3, 5, 64)]


def _gelu64(x):
    # flash-attn's gelu_fwd, with its constants, in float64
    return x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))


def _gelu_grad64(x):
    # flash-attn's gelu_bwd's ff in float64: d/dx of _gelu64
    t = torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x))
    return 0.5 * x * ((1 - t * t) * (0.79788456 + 0.1070322243 * x * x)) + 0.5 * (1 + t)


def _close(got, want, dtype):
    rtol, atol = TOL[dtype]
    assert got.dtype == dtype and got.shape == want.shape
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=atol)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_swiglu_is_silu_x_times_y(dtype, shape):
    x, y = randn(*shape, dtype=dtype, scale=3.0, seed=1), randn(*shape, dtype=dtype, seed=2)
    out = swiglu(x, y)
    x64, y64 = x.detach().double().requires_grad_(), y.detach().double().requires_grad_()
    want = F.silu(x64) * y64
    _close(out, want.detach(), dtype)
    g = randn(*shape, dtype=dtype, seed=3, grad=False)
    dx, dy = torch.autograd.grad(out, (x, y), g)
    want_dx, want_dy = torch.autograd.grad(want, (x64, y64), g.double())
    _close(dx, want_dx, dtype)
    _close(dy, want_dy, dtype)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_tanh_gelu_forward_and_backward_are_flash_attns(dtype, shape):
    assert gelu_fwd is fast_gelu_impl
    x = randn(*shape, dtype=dtype, scale=3.0, seed=4)
    out = fast_gelu_impl(x)
    x64 = x.detach().double()
    _close(out, _gelu64(x64), dtype)
    g = randn(*shape, dtype=dtype, seed=5, grad=False)
    want_dx = _gelu_grad64(x64) * g.double()
    (dx,) = torch.autograd.grad(out, x, g)
    _close(dx, want_dx, dtype)
    _close(gelu_bwd(g, x.detach()), want_dx, dtype)
    _close(gelu_bwd(g.float(), x.detach()), want_dx, dtype)  # the result in x's dtype whatever g's


def test_the_mirrored_names_are_fasttrains_own_objects():
    for name in ("fast_gelu_impl", "gelu_bwd", "gelu_fwd"):
        assert getattr(mirror, name) is getattr(activation, name), name
    assert sorted(mirror.__all__) == ["fast_gelu_impl", "gelu_bwd", "gelu_fwd", "swiglu"]
    # swiglu takes flash-attn's names (its SwiGLUFunction.apply takes them by keyword too) over fasttrain's op
    x, y = randn(3, 8, grad=False), randn(3, 8, seed=1, grad=False)
    assert torch.equal(swiglu(x=x, y=y), fasttrain_swiglu(x, y))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gelu_bwd_is_differentiable_as_flash_attns_torch_ops(dtype):
    x, g = randn(5, 16, dtype=dtype), randn(5, 16, dtype=dtype, seed=1)
    out = gelu_bwd(g, x)
    x64, g64 = (t.detach().double().requires_grad_() for t in (x, g))
    want = _gelu_grad64(x64) * g64
    upstream = randn(5, 16, seed=2, grad=False)
    dx, dg = torch.autograd.grad(out, (x, g), upstream.to(dtype))
    want_dx, want_dg = torch.autograd.grad(want, (x64, g64), upstream.double())
    _close(dx, want_dx, dtype)
    _close(dg, want_dg, dtype)


def test_bad_input_errors_name_the_argument():
    x = randn(4, 8)
    with pytest.raises(TypeError, match="g must"):
        gelu_bwd(x.long(), x)
    with pytest.raises(TypeError, match="x must"):
        gelu_bwd(x, x.long())
    with pytest.raises(ValueError, match="g must have x's shape"):
        gelu_bwd(randn(4, 1), x)
    with pytest.raises(ValueError, match="y must have x's shape"):
        swiglu(x, randn(4, 1))
