"""GELU with torch's signature, `gelu(input, approximate)`: the smallest op, and the template of every other one
(docs/adding-an-op.md).

Backends: `cpu`, a C++ kernel for approximate="tanh" (csrc/activation_cpu.cpp, GPT-2's activation and the model's),
where torch's own CPU kernel is several times slower than its erf GELU (benchmarks/NOTES.md); `reference`, torch's
F.gelu itself, which on a GPU runs at memory speed and which torch.compile fuses into its neighbours.

The kernel computes x * sigmoid(2u), u = sqrt(2 / pi) (x + 0.044715 x^3), the same function as torch's
x / 2 * (1 + tanh(u)) without its cancellation in the negative tail (torch gives 0 below x ~ -5.3, the kernel the
small value itself); elsewhere within 5e-7 of float64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fasttrain import _backend
from fasttrain.ops._op import custom_op, reference_gradients

APPROXIMATIONS = ("none", "tanh")


# ---- the backends: what each computes -------------------------------------------------------------------------------


class Reference:
    """torch's own GELU and its gradient."""

    @staticmethod
    def forward(x: Tensor, approximate: str) -> Tensor:
        return F.gelu(x, approximate=approximate)

    @staticmethod
    def backward(grad: Tensor, x: Tensor, approximate: str) -> Tensor:
        return torch.ops.aten.gelu_backward(grad, x, approximate=approximate)


class Cpu:
    """csrc/activation_cpu.cpp: fp32, bf16 and fp16 computed in fp32, contiguous tensors."""

    @staticmethod
    def forward(x: Tensor, approximate: str) -> Tensor:
        return torch.ops.fasttrain.gelu_tanh_cpu(x)

    @staticmethod
    def backward(grad: Tensor, x: Tensor, approximate: str) -> Tensor:
        return torch.ops.fasttrain.gelu_tanh_backward_cpu(grad, x)


# ---- the table: which backend can serve which inputs ----------------------------------------------------------------

_CPU_OP_REASON = _backend.native_op_reason("gelu_tanh_cpu")
_ERF_GELU = _backend.NotForDevice("approximate='none' is torch's erf GELU, which the reference runs")


def _cpu_reason(x: Tensor, approximate: str) -> str | None:
    if approximate != "tanh":
        return _ERF_GELU
    return _backend.cpu_kernel_reason(x, _CPU_OP_REASON)


GELU = _backend.Table(
    "gelu",
    {
        "cpu": _backend.Backend(_cpu_reason, Cpu, live=lambda: _CPU_OP_REASON),
        "reference": _backend.Backend(_backend.always, Reference),
    },
)


# ---- the registered op: one body for every backend, fake implementations, autograd ---------------------------------


@custom_op("fasttrain::gelu", mutates_args=(), table=GELU, reference=Reference.forward)
def _gelu_op(x: Tensor, approximate: str, backend: str) -> Tensor:
    return GELU[backend].forward(x, approximate)


@_gelu_op.register_fake
def _(x, approximate, backend):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@custom_op("fasttrain::gelu_backward", mutates_args=())
def _gelu_backward_op(grad: Tensor, x: Tensor, approximate: str, backend: str) -> Tensor:
    return GELU[backend].backward(grad, x, approximate)


@_gelu_backward_op.register_fake
def _(grad, x, approximate, backend):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    x, ctx.approximate, ctx.backend = inputs
    ctx.save_for_backward(x)


def _backward(ctx, grad):
    (x,) = ctx.saved_tensors
    if torch.is_grad_enabled():  # a double backward follows (see reference_gradients)
        return *reference_gradients(lambda x: Reference.forward(x, ctx.approximate), (x,), (grad,)), None, None
    return _gelu_backward_op(grad.contiguous(), x, ctx.approximate, ctx.backend), None, None


_gelu_op.register_autograd(_backward, setup_context=_setup_context)


# ---- the public function: check the arguments, choose, call --------------------------------------------------------


def gelu(input: Tensor, approximate: str = "none", *, backend: str | None = None) -> Tensor:
    """torch.nn.functional.gelu: input * Phi(input), or with approximate="tanh" GPT-2's
    input / 2 * (1 + tanh(sqrt(2 / pi) * (input + 0.044715 input^3))).

    approximate="tanh" on CPU tensors (fp32, bf16, fp16, computed in fp32) runs the C++ kernel, forward and
    backward; everything else runs torch's F.gelu. Returns a tensor of input's shape and dtype (contiguous from the
    kernel). backend: "auto" (default), "cpu" or "reference".
    """
    if not isinstance(input, Tensor) or not input.is_floating_point():
        raise TypeError(
            f"gelu: input must be a floating-point tensor, got {getattr(input, 'dtype', type(input).__name__)}"
        )
    if approximate not in APPROXIMATIONS:
        raise ValueError(f"gelu: approximate must be 'none' or 'tanh', got {approximate!r}")
    name = GELU.choose(input, approximate, backend=backend)
    return _gelu_op(input if name == "reference" else input.contiguous(), approximate, name)


# ---- flash-attn's names for the tanh GELU (flash_attn.ops.activations, mirrored by fasttrain.flash_attn) -----------


def fast_gelu_impl(input: Tensor) -> Tensor:
    """flash-attn's `fast_gelu_impl` and `gelu_fwd` (one function): `gelu(input, approximate="tanh")` with its
    gradient, in input's dtype (computed in fp32 and rounded once on the CPU kernel; flash-attn's TorchScript rounds
    after each op in half precision)."""
    return gelu(input, "tanh")


gelu_fwd = fast_gelu_impl


def gelu_bwd(g: Tensor, x: Tensor) -> Tensor:
    """flash-attn's `gelu_bwd`: g times the tanh GELU's derivative at x, in x's dtype; g of x's shape."""
    for arg, t in (("g", g), ("x", x)):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(f"gelu_bwd: {arg} must be a floating-point tensor, got {getattr(t, 'dtype', type(t))}")
    if g.shape != x.shape or g.device != x.device:
        raise ValueError(
            f"gelu_bwd: g must have x's shape {tuple(x.shape)} on {x.device}, got {tuple(g.shape)} on {g.device}"
        )
    if torch.is_grad_enabled() and (g.requires_grad or x.requires_grad):
        # flash-attn's gelu_bwd is torch ops, so differentiable: aten's gelu_backward has that derivative (half
        # precision computed in fp32 and rounded once, as on the kernels)
        wide = torch.promote_types(x.dtype, torch.float32)
        return Reference.backward(g.to(wide), x.to(wide), "tanh").to(x.dtype)
    name = GELU.choose(x, "tanh")
    if name != "reference":
        x = x.contiguous()
    return _gelu_backward_op(g.to(x.dtype).contiguous(), x, "tanh", name)
