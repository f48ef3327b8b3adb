"""fasttrain.ops._op.Op: eager calls run the Python implementation without the dispatcher (and its autograd formula
under a plain autograd.Function); fake, meta and traced calls take the registered torch.library op; a backend with
a direct op gets the whole call."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from fasttrain import _backend
from fasttrain._backend import Backend, Table, always
from fasttrain.ops._op import custom_op

calls = {"impl": 0, "fake": 0}


@custom_op("fasttrain_test::scaled_square", mutates_args=())
def scaled_square(x: torch.Tensor, scale: float) -> torch.Tensor:
    calls["impl"] += 1
    return x * x * scale


@scaled_square.register_fake
def _(x, scale):
    calls["fake"] += 1
    return torch.empty_like(x)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])
    ctx.scale = inputs[1]


def _backward(ctx, grad):
    (x,) = ctx.saved_tensors
    return grad * 2 * x * ctx.scale, None


scaled_square.register_autograd(_backward, setup_context=_setup)


@pytest.fixture(autouse=True)
def _reset():
    calls.update(impl=0, fake=0)


def test_eager_calls_skip_the_dispatcher_with_the_ops_gradient():
    x = torch.randn(5, requires_grad=True)
    y = scaled_square(x, 3.0)
    # Our Function's node; through the dispatcher it would be GeneratedBackwardFor_fasttrain_test_scaled_square_...
    assert type(y.grad_fn).__name__ == "fasttrain_test_scaled_square_eagerBackward"
    (g,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(g, 6 * x.detach())
    with torch.no_grad():
        assert scaled_square(x, 1.0).grad_fn is None
    assert calls == {"impl": 2, "fake": 0}


def test_fake_and_meta_tensors_take_the_registered_op():
    with FakeTensorMode():
        out = scaled_square(torch.empty(3, 4), 2.0)
    assert out.shape == (3, 4)
    assert scaled_square(torch.empty(2, device="meta"), 2.0).device.type == "meta"
    assert calls == {"impl": 0, "fake": 2}


def test_compiled_graph_holds_the_op_and_gradients_match():
    x = torch.randn(7, requires_grad=True)
    f = torch.compile(lambda t: scaled_square(t, 0.5).sum(), fullgraph=True, backend="aot_eager")
    (g,) = torch.autograd.grad(f(x), x)
    torch.testing.assert_close(g, x.detach())
    assert calls["fake"] >= 1  # traced through the registered op, whose fake implementation gave the shapes
    opcheck = torch.library.opcheck(scaled_square.op, (torch.randn(3, requires_grad=True), 2.0))
    assert all(v == "SUCCESS" for v in opcheck.values())


# ---- a backend whose own op serves the whole call (Backend.direct) ---------------------------------------------------
# The shape of a C++ op that launches precompiled kernels with its autograd in C++: here a torch.library op defined
# in Python with its own fake implementation and autograd formula, in a table's "cuda" column.

direct_calls = []


@torch.library.custom_op("fasttrain_test::cube_direct", mutates_args=())
def cube_direct(x: torch.Tensor) -> torch.Tensor:
    direct_calls.append(x.shape)
    return x * x * x


@cube_direct.register_fake
def _(x):
    return torch.empty_like(x)


def _cube_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


cube_direct.register_autograd(lambda ctx, grad: grad * 3 * ctx.saved_tensors[0] ** 2, setup_context=_cube_setup)


class _CubeReference:
    @staticmethod
    def forward(x):
        return x * x * x


CUBE = Table(
    "fasttrain_test_cube",
    {"cuda": Backend(always, direct=cube_direct), "reference": Backend(always, _CubeReference)},
)
del _backend._tables["fasttrain_test_cube"]  # not an op of fasttrain's: `fasttrain info` should not list it


@custom_op("fasttrain_test::cube", mutates_args=(), table=CUBE)
def cube(x: torch.Tensor, backend: str) -> torch.Tensor:
    calls["impl"] += 1
    return CUBE[backend].forward(x)


@cube.register_fake
def _(x, backend):
    return torch.empty_like(x)


cube.register_autograd(
    lambda ctx, grad: (grad * 3 * ctx.saved_tensors[0] ** 2, None),
    setup_context=lambda ctx, inputs, output: ctx.save_for_backward(inputs[0]),
)


def test_a_direct_backend_takes_the_whole_call_eager_and_traced():
    direct_calls.clear()
    x = torch.randn(6, requires_grad=True)
    y = cube(x, "cuda")
    assert direct_calls == [(6,)] and calls["impl"] == 0  # the direct op, not the Python body
    assert "cube_direct" in type(y.grad_fn).__name__  # and its own autograd
    (g,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(g, 3 * x.detach() ** 2)
    torch.testing.assert_close(cube(x, "reference"), y)
    assert calls["impl"] == 1 and len(direct_calls) == 1  # the other columns keep the registered op's body

    f = torch.compile(lambda t: cube(t, "cuda").sum(), fullgraph=True, backend="aot_eager")
    (g,) = torch.autograd.grad(f(x), x)
    torch.testing.assert_close(g, 3 * x.detach() ** 2)
    assert len(direct_calls) > 1 and calls["impl"] == 1  # traced straight to the direct op


def test_a_table_names_known_backends_and_ends_with_the_reference():
    with pytest.raises(ValueError, match="end with 'reference'"):
        Table("fasttrain_test_bad", {"reference": Backend(always), "cpu": Backend(always)})
    with pytest.raises(ValueError, match="must be among"):
        Table("fasttrain_test_bad", {"gpu": Backend(always), "reference": Backend(always)})
