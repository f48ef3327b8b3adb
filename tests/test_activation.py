"""fasttrain.ops.gelu: the C++ CPU kernel for approximate="tanh" against float64 and torch's F.gelu, forward and
backward, on awkward sizes (1 element, a block's tail, several threads' chunks), half precision, non-finite and
strided inputs, the double backward, the torch.compile registration, the backend choice and input errors."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from fasttrain import _backend
from fasttrain.ops import activation, gelu


def _float64_gelu_tanh(x):
    """The function in float64, as x * sigmoid(2u) (no cancellation), and its derivative."""
    x = x.double()
    u = math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)
    s = torch.sigmoid(2 * u)
    du = math.sqrt(2 / math.pi) * (1 + 3 * 0.044715 * x**2)
    return x * s, s + 2 * x * s * (1 - s) * du


@pytest.mark.parametrize(
    "shape",
    [(1,), (97,), (3, 1025), (16 * 1024 + 7,), (4, 64, 1100)],
    ids=["one", "97", "3x1025", "chunk-tail", "several-chunks"],
)
def test_matches_float64_and_torch(shape):
    g = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(shape, generator=g)).requires_grad_()
    y = gelu(x, approximate="tanh", backend="cpu")
    dy = torch.randn(shape, generator=g)
    (dx,) = torch.autograd.grad(y, x, dy)
    want, slope = _float64_gelu_tanh(x.detach())
    # Measured on 200k points of [-12, 12]: 5.2e-7 absolute forward, 1.9e-7 for the derivative.
    torch.testing.assert_close(y.double(), want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(dx.double(), dy.double() * slope, atol=2e-6, rtol=1e-6)
    x2 = x.detach().requires_grad_()
    ref = F.gelu(x2, approximate="tanh")
    torch.testing.assert_close(y, ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(dx, torch.autograd.grad(ref, x2, dy)[0], atol=1e-5, rtol=1e-5)


def test_negative_tail_keeps_its_digits():
    # x / 2 * (1 + tanh(u)) in fp32 (torch's formula) gives 0 once tanh(u) rounds to -1 (x < -5.3); the kernel's
    # x * sigmoid(2u) keeps fp32's relative precision down to x = -9.5 (gelu(x) ~ 1e-35); below ~ -9.9 exp's clamp
    # at 88 holds it near x / e^88, under 2e-38 |x|, where the true value is 0 in fp32.
    x = torch.linspace(-9.5, -4.0, 5501)
    want, _ = _float64_gelu_tanh(x)
    got = gelu(x, approximate="tanh", backend="cpu").double()
    assert ((got - want).abs() / want.abs()).max() < 1e-4
    assert (F.gelu(x, approximate="tanh")[:10] == 0).all()  # torch's own value there: what the kernel improves
    x = torch.linspace(-1000.0, -10.0, 991)
    deep = gelu(x, approximate="tanh", backend="cpu")
    assert (deep <= 0).all() and (deep.abs() <= 2e-38 * x.abs()).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_rounds_once(dtype):
    g = torch.Generator().manual_seed(1)
    x = (3 * torch.randn(5000, generator=g)).to(dtype).requires_grad_()
    y = gelu(x, approximate="tanh", backend="cpu")
    dy = torch.randn(5000, generator=g).to(dtype)
    (dx,) = torch.autograd.grad(y, x, dy)
    assert y.dtype == dtype and dx.dtype == dtype
    want, slope = _float64_gelu_tanh(x.detach())
    ulp = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10  # one unit in the last place, relative
    torch.testing.assert_close(y.double(), want, atol=1e-6, rtol=ulp)
    torch.testing.assert_close(dx.double(), dy.double() * slope, atol=1e-3, rtol=ulp)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_converts_as_torch(dtype):
    """Every bit pattern of the dtype (and a tail past the 8-wide conversions): the kernel's widening (F16C for fp16)
    and rounding back (to nearest even) give torch's .float() and .to(dtype) bit for bit, NaNs staying NaN. The
    backward's products of every pattern and slopes of 1.02-1.13 reach the overflow to inf and the subnormals."""
    bits = torch.cat([torch.arange(-32768, 32768, dtype=torch.int32), torch.tensor([0x3C01, 0x0001, -1, 5, 7])])
    every = bits.to(torch.int16).view(dtype)  # (65541,)
    x = (0.8 + 1.5 * torch.rand(every.shape, generator=torch.Generator().manual_seed(2))).to(dtype)
    ops = torch.ops.fasttrain
    for got, want in (
        (ops.gelu_tanh_cpu(every), ops.gelu_tanh_cpu(every.float()).to(dtype)),
        (ops.gelu_tanh_backward_cpu(every, x), ops.gelu_tanh_backward_cpu(every.float(), x.float()).to(dtype)),
    ):
        nan = want.isnan()
        assert torch.equal(got.isnan(), nan)
        assert torch.equal(got[~nan].view(torch.int16), want[~nan].view(torch.int16))


def test_non_finite_inputs_as_torch():
    x = torch.tensor([float("inf"), float("-inf"), float("nan"), 0.0], requires_grad=True)
    y = gelu(x, approximate="tanh", backend="cpu")
    (dx,) = torch.autograd.grad(y, x, torch.ones(4))
    x2 = x.detach().requires_grad_()
    ref = F.gelu(x2, approximate="tanh")
    torch.testing.assert_close(y, ref, equal_nan=True)  # inf, nan (torch's -inf * 0), nan, 0
    torch.testing.assert_close(dx, torch.autograd.grad(ref, x2, torch.ones(4))[0], equal_nan=True)


def test_strided_input_and_double_backward():
    base = torch.randn(64, 48, dtype=torch.float32)
    x = base.t().requires_grad_()  # (48, 64), not contiguous
    y = gelu(x, approximate="tanh", backend="cpu")
    (dx,) = torch.autograd.grad(y.sum(), x, create_graph=True)  # a graph: the reference's, for the second order
    (ddx,) = torch.autograd.grad(dx.sum(), x)
    x2 = base.t().clone().requires_grad_()
    ref = F.gelu(x2, approximate="tanh")
    (rdx,) = torch.autograd.grad(ref.sum(), x2, create_graph=True)
    (rddx,) = torch.autograd.grad(rdx.sum(), x2)
    torch.testing.assert_close(y, ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ddx, rddx, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("approximate,backend", [("tanh", "cpu"), ("tanh", "reference"), ("none", "reference")])
def test_registered_ops_trace_and_compile(approximate, backend):
    x = torch.randn(8, 33)
    utils = ("test_schema", "test_faketensor")
    torch.library.opcheck(activation._gelu_op.op, (x, approximate, backend), test_utils=utils)
    torch.library.opcheck(
        activation._gelu_backward_op.op, (torch.randn(8, 33), x, approximate, backend), test_utils=utils
    )
    x = x.requires_grad_()
    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return gm

    def f(t):
        return gelu(t, approximate=approximate, backend=backend).square().sum()

    (got,) = torch.autograd.grad(torch.compile(f, fullgraph=True, backend=keep)(x), x)
    (want,) = torch.autograd.grad(F.gelu(x, approximate=approximate).square().sum(), x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # The reference is traced inline as torch's own op (Inductor fuses it); a kernel is the registered op.
    code = graphs[0].code
    assert ("fasttrain.gelu" in code) == (backend == "cpu"), code


def test_backend_choice(monkeypatch):
    x = torch.randn(4, 8)
    assert activation.GELU.choose(x, "tanh") == "cpu"
    assert activation.GELU.reasons(x, "none") == {"cpu": activation._ERF_GELU, "reference": None}
    with warnings.catch_warnings():  # exact GELU is torch's own: the intended path, no fallback warning
        warnings.simplefilter("error")
        torch.testing.assert_close(gelu(x), F.gelu(x))
    with pytest.raises(_backend.BackendError, match="approximate='none'"):
        gelu(x, backend="cpu")
    with pytest.warns(RuntimeWarning, match="the CPU kernel takes fp32, bf16 or fp16, got torch.float64"):
        gelu(x.double(), approximate="tanh")
    monkeypatch.setattr(activation, "_CPU_OP_REASON", "no extension here")
    with pytest.raises(_backend.BackendError, match="no extension here"):
        gelu(x, approximate="tanh", backend="cpu")


@pytest.mark.parametrize(
    "args,error,match",
    [
        ((torch.arange(4),), TypeError, "floating-point"),
        (([1.0, 2.0],), TypeError, "floating-point"),
        ((torch.randn(4), "erf"), ValueError, "approximate must be 'none' or 'tanh'"),
    ],
)
def test_bad_inputs_raise(args, error, match):
    with pytest.raises(error, match=match):
        gelu(*args)


def test_the_model_uses_it(monkeypatch):
    import fasttrain.model.gpt as gpt_module
    from fasttrain.model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, d_model=64, vocab_size=128, max_seq_len=32))
    idx = torch.randint(0, 128, (2, 16))
    calls = []
    monkeypatch.setattr(gpt_module, "gelu", lambda *args, **kwargs: calls.append(kwargs) or gelu(*args, **kwargs))
    _, loss = model(idx, idx)
    assert calls == [{"approximate": "tanh"}] * 2  # fasttrain's gelu, once per block
    monkeypatch.setattr(gpt_module, "gelu", F.gelu)
    _, ref = model(idx, idx)
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
