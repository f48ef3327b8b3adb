"""fasttrain.ops.swiglu / geglu: the Triton kernel (interpreted on CPU), the C++ CPU kernel and the reference against
float64 for outputs and both gradients, on awkward sizes (1 element, a block's tail, several blocks), half precision,
strided inputs, the double backward, the torch.compile registration, the backend choice and input errors. GPU tests
(`pytest -m gpu`) hold bf16/fp16 to twice PyTorch's own error."""

import importlib

import pytest
import torch
import torch.nn.functional as F

from fasttrain import _backend
from fasttrain.ops import geglu, swiglu

from helpers import TOL_FP32, assert_within_2x_torch, err, float64_leaves, randn

swiglu_module = importlib.import_module("fasttrain.ops.swiglu")  # the module (the package exports the function)
TOL = TOL_FP32["swiglu"]
BACKENDS = ["triton", "cpu", "reference"]
OPS = {"swiglu": (swiglu, lambda g, u: F.silu(g) * u), "geglu": (geglu, lambda g, u: F.gelu(g, approximate="tanh") * u)}


def _inputs(shape, dtype=torch.float32, device="cpu", seed=0):
    return randn(*shape, dtype=dtype, device=device, seed=seed, scale=3.0), randn(
        *shape, dtype=dtype, device=device, seed=seed + 1
    )


def _check(op, gate, up, backend, tol=TOL):
    fn, torch_fn = OPS[op]
    y = fn(gate, up, backend=backend)
    g64, u64 = float64_leaves(gate, up)
    want = torch_fn(g64, u64)
    assert y.dtype == gate.dtype and y.shape == gate.shape and err(y, want) < tol
    upstream = torch.randn_like(want)
    dgate, dup = torch.autograd.grad(y, (gate, up), upstream.to(y.dtype))
    want_dgate, want_dup = torch.autograd.grad(want, (g64, u64), upstream)
    assert err(dgate, want_dgate) < tol and err(dup, want_dup) < tol


@pytest.mark.parametrize("shape", [(1,), (97,), (3, 1025), (2, 7, 4099)], ids=str)
@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_float64(shape, op, backend):
    _check(op, *_inputs(shape), backend)


@pytest.mark.parametrize("backend", ["triton", "cpu"])
def test_strided_inputs_are_made_contiguous(backend):
    # gate and up as the two halves of one fused projection (B, T, 2 * I), as a fused gate_up_proj gives them
    fused = randn(2, 5, 2 * 33, seed=3)
    gate, up = fused.chunk(2, dim=-1)
    _check("swiglu", gate, up, backend)


@pytest.mark.parametrize("backend", ["triton", "cpu"])
def test_empty_inputs(backend):
    gate, up = (torch.empty(0, 8, requires_grad=True) for _ in range(2))
    y = swiglu(gate, up, backend=backend)
    assert y.shape == (0, 8)
    y.sum().backward()
    assert gate.grad.shape == (0, 8) and up.grad.shape == (0, 8)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("op", list(OPS))
def test_cpu_kernel_half_precision_rounds_once(op, dtype):
    # fp32 math, one rounding of each result: within one unit in the last place of the fp32 kernel's value
    gate, up = _inputs((3, 1000), dtype=dtype, seed=5)
    fn = OPS[op][0]
    y = fn(gate, up, backend="cpu")
    y32 = fn(gate.detach().float(), up.detach().float(), backend="cpu")
    ulp = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), y32, atol=1e-6, rtol=ulp)


def test_double_backward_takes_the_reference():
    gate, up = _inputs((4, 9), seed=7)
    y = swiglu(gate, up, backend="cpu")
    dgate, dup = torch.autograd.grad(y.square().sum(), (gate, up), create_graph=True)
    second = torch.autograd.grad((dgate.sum() + dup.sum()), (gate, up))
    g2, u2 = (t.detach().clone().requires_grad_() for t in (gate, up))
    r = F.silu(g2) * u2
    rdg, rdu = torch.autograd.grad(r.square().sum(), (g2, u2), create_graph=True)
    want = torch.autograd.grad((rdg.sum() + rdu.sum()), (g2, u2))
    for a, b in zip(second, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_registered_ops_trace_and_compile(backend):
    gate, up = _inputs((8, 33), seed=9)
    utils = ("test_schema", "test_faketensor")
    args = (gate.detach(), up.detach(), False, backend)
    torch.library.opcheck(swiglu_module._swiglu_op.op, args, test_utils=utils)
    torch.library.opcheck(swiglu_module._swiglu_backward_op.op, (torch.randn(8, 33), *args), test_utils=utils)
    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return gm

    def f(g, u):
        return swiglu(g, u, backend=backend).square().sum()

    got = torch.autograd.grad(torch.compile(f, fullgraph=True, backend=keep)(gate, up), (gate, up))
    want = torch.autograd.grad((F.silu(gate) * up).square().sum(), (gate, up))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # The reference is traced inline as torch's own ops (Inductor fuses them); a kernel is the registered op.
    assert ("fasttrain.swiglu" in graphs[0].code) == (backend == "cpu"), graphs[0].code


def test_backend_choice():
    gate, _ = _inputs((4, 8))
    # under the interpreter (tests/conftest.py) Triton serves CPU tensors and comes first
    assert swiglu_module.SWIGLU.choose(gate, False) == "triton"
    assert swiglu_module.SWIGLU.reasons(gate.to(torch.float64), False)["cpu"] is not None
    with pytest.raises(_backend.BackendError, match="cpu"):
        swiglu(gate.double(), gate.double(), backend="cpu")


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda: swiglu(torch.ones(3), torch.ones(4)), ValueError, "up must have gate's shape"),
        (lambda: geglu(torch.ones(3), torch.ones(3, dtype=torch.float16)), TypeError, "up must have gate's dtype"),
        (lambda: swiglu(torch.arange(3), torch.arange(3)), TypeError, "gate must be a floating-point tensor"),
    ],
)
def test_bad_inputs_name_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("shape", [(1, 1), (8, 97, 1025), (4096, 14336)], ids=str)
def test_gpu_at_most_twice_torch_error(shape, op, dtype):
    fn, torch_fn = OPS[op]
    gate, up = _inputs(shape, dtype=dtype, device="cuda")
    y = fn(gate, up, backend="triton")
    ref = torch_fn(gate, up)
    g64, u64 = float64_leaves(gate, up)
    want = torch_fn(g64, u64)
    assert_within_2x_torch(y, ref, want, what="out")
    upstream = torch.randn_like(want)
    got = torch.autograd.grad(y, (gate, up), upstream.to(dtype))
    theirs = torch.autograd.grad(ref, (gate, up), upstream.to(dtype))
    wanted = torch.autograd.grad(want, (g64, u64), upstream)
    for name, a, b, w in zip(("dgate", "dup"), got, theirs, wanted):
        assert_within_2x_torch(a, b, w, what=name)
