"""GELU with torch's signature, `gelu(input, approximate)`, over a C++ CPU kernel for approximate="tanh"
(csrc/activation_cpu.cpp, GPT-2's activation and the model's), where torch 2.13's own CPU kernel took 3.7x its erf
GELU's time (benchmarks/NOTES.md). The reference is torch's F.gelu itself: on a GPU (where torch's kernel runs at
memory speed and torch.compile fuses it into its neighbours) and for approximate="none" it is the intended path.

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

OP = "gelu"


@custom_op("fasttrain::gelu_tanh", mutates_args=())
def _gelu_tanh_op(x: Tensor) -> Tensor:
    return torch.ops.fasttrain.gelu_tanh_cpu(x)


@_gelu_tanh_op.register_fake
def _(x):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@custom_op("fasttrain::gelu_tanh_backward", mutates_args=())
def _gelu_tanh_backward_op(grad: Tensor, x: Tensor) -> Tensor:
    return torch.ops.fasttrain.gelu_tanh_backward_cpu(grad, x)


@_gelu_tanh_backward_op.register_fake
def _(grad, x):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _backward(ctx, grad):
    (x,) = ctx.saved_tensors
    if torch.is_grad_enabled():  # a double backward follows (see reference_gradients)
        return reference_gradients(lambda x: F.gelu(x, approximate="tanh"), (x,), (grad,))
    return _gelu_tanh_backward_op(grad.contiguous(), x)


_gelu_tanh_op.register_autograd(_backward, setup_context=_setup_context)

# Read once, at import (Dynamo cannot trace the extension's import; see ops/attention.py).
_CPU_OP_REASON = _backend.native_op_reason("gelu_tanh_cpu")
_backend.register(OP, lambda: {"cpu": _CPU_OP_REASON, "reference": None})


_ERF_GELU = _backend.NotForDevice("approximate='none' is torch's erf GELU, which the reference runs")


def _cpu_reason(x: Tensor, approximate: str) -> str | None:
    if approximate != "tanh":
        return _ERF_GELU
    return _backend.cpu_kernel_reason(x, _CPU_OP_REASON)


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
    if approximate not in ("none", "tanh"):
        raise ValueError(f"gelu: approximate must be 'none' or 'tanh', got {approximate!r}")
    if _backend.choose(OP, {"cpu": _cpu_reason(input, approximate), "reference": None}, backend) == "reference":
        return F.gelu(input, approximate=approximate)
    return _gelu_tanh_op(input.contiguous())
