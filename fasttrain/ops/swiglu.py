"""The gated MLP's activation: `swiglu(gate, up) = silu(gate) * up` (Llama, Mistral, Qwen2) and
`geglu(gate, up) = gelu_tanh(gate) * up` (Gemma), Liger Kernel's LigerSiLUMulFunction / LigerGELUMulFunction.

One op, `fasttrain::swiglu`, with a flag for the activation. Backends: `triton` (kernels/swiglu.py), `cpu`
(csrc/swiglu_cpu.cpp), `reference` (torch's F.silu / F.gelu times up, the gradients in closed form). The kernels read
gate and up once and write the product, and the backward writes both gradients from one read of grad, gate and up:
no intermediate act(gate) is kept for the backward, which recomputes it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fasttrain import _backend
from fasttrain.ops._op import custom_op, reference_gradients

# ---- the backends: what each computes -------------------------------------------------------------------------------


def _act(gate: Tensor, gelu: bool) -> Tensor:
    return F.gelu(gate, approximate="tanh") if gelu else F.silu(gate)


class Reference:
    """torch's own activation times up; the gradients from aten's activation backward."""

    @staticmethod
    def forward(gate: Tensor, up: Tensor, gelu: bool) -> Tensor:
        return _act(gate, gelu) * up

    @staticmethod
    def backward(grad: Tensor, gate: Tensor, up: Tensor, gelu: bool) -> tuple[Tensor, Tensor]:
        g = grad * up
        if gelu:
            dgate = torch.ops.aten.gelu_backward(g, gate, approximate="tanh")
        else:
            dgate = torch.ops.aten.silu_backward(g, gate)
        return dgate, grad * _act(gate, gelu)


class Triton:
    @staticmethod
    def forward(gate: Tensor, up: Tensor, gelu: bool) -> Tensor:
        return _backend.kernels("swiglu").swiglu_forward(gate, up, gelu)

    @staticmethod
    def backward(grad: Tensor, gate: Tensor, up: Tensor, gelu: bool) -> tuple[Tensor, Tensor]:
        return _backend.kernels("swiglu").swiglu_backward(grad, gate, up, gelu)


class Cpu:
    """csrc/swiglu_cpu.cpp: fp32, bf16 and fp16 computed in fp32, contiguous tensors."""

    @staticmethod
    def forward(gate: Tensor, up: Tensor, gelu: bool) -> Tensor:
        return torch.ops.fasttrain.swiglu_cpu(gate, up, gelu)

    @staticmethod
    def backward(grad: Tensor, gate: Tensor, up: Tensor, gelu: bool) -> tuple[Tensor, Tensor]:
        return torch.ops.fasttrain.swiglu_backward_cpu(grad, gate, up, gelu)


# ---- the table: which backend can serve which inputs ----------------------------------------------------------------

_CPU_OP_REASON = _backend.native_op_reason("swiglu_cpu")

SWIGLU = _backend.Table(
    "swiglu",
    {
        "triton": _backend.Backend(
            lambda gate, gelu: _backend.triton_tensor_reason(gate), Triton, live=_backend.triton_live
        ),
        "cpu": _backend.Backend(
            lambda gate, gelu: _backend.cpu_kernel_reason(gate, _CPU_OP_REASON), Cpu, live=lambda: _CPU_OP_REASON
        ),
        "reference": _backend.Backend(_backend.always, Reference),
    },
)


# ---- the registered op: one body for every backend, fake implementations, autograd ---------------------------------


@custom_op("fasttrain::swiglu", mutates_args=(), table=SWIGLU, reference=Reference.forward)
def _swiglu_op(gate: Tensor, up: Tensor, gelu: bool, backend: str) -> Tensor:
    return SWIGLU[backend].forward(gate, up, gelu)


@_swiglu_op.register_fake
def _(gate, up, gelu, backend):
    return torch.empty_like(gate, memory_format=torch.contiguous_format)


@custom_op("fasttrain::swiglu_backward", mutates_args=())
def _swiglu_backward_op(grad: Tensor, gate: Tensor, up: Tensor, gelu: bool, backend: str) -> tuple[Tensor, Tensor]:
    return SWIGLU[backend].backward(grad, gate, up, gelu)


@_swiglu_backward_op.register_fake
def _(grad, gate, up, gelu, backend):
    return (
        torch.empty_like(gate, memory_format=torch.contiguous_format),
        torch.empty_like(up, memory_format=torch.contiguous_format),
    )


def _setup_context(ctx, inputs, output):
    gate, up, ctx.gelu, ctx.backend = inputs
    ctx.save_for_backward(gate, up)


def _backward(ctx, grad):
    gate, up = ctx.saved_tensors
    if torch.is_grad_enabled():  # a double backward follows (see reference_gradients)
        return *reference_gradients(lambda g, u: Reference.forward(g, u, ctx.gelu), (gate, up), (grad,)), None, None
    grad = grad if ctx.backend == "reference" else grad.contiguous()
    dgate, dup = _swiglu_backward_op(grad, gate, up, ctx.gelu, ctx.backend)
    return dgate, dup, None, None


_swiglu_op.register_autograd(_backward, setup_context=_setup_context)


# ---- the public functions: check the arguments, choose, call -------------------------------------------------------


def _gated(
    name: str, gate: Tensor, up: Tensor, gelu: bool, backend: str | None, names: tuple[str, str] = ("gate", "up")
) -> Tensor:
    """names: what the caller's signature calls gate and up, for the errors (flash-attn's swiglu takes x and y)."""
    g, u = names
    for arg, t in ((g, gate), (u, up)):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(
                f"{name}: {arg} must be a floating-point tensor, got {getattr(t, 'dtype', type(t).__name__)}"
            )
    if up.dtype != gate.dtype:
        raise TypeError(f"{name}: {u} must have {g}'s dtype ({gate.dtype}), got {up.dtype}")
    if up.shape != gate.shape:
        raise ValueError(f"{name}: {u} must have {g}'s shape {tuple(gate.shape)}, got {tuple(up.shape)}")
    if up.device != gate.device:
        raise ValueError(f"{name}: {u} must be on {g}'s device ({gate.device}), got {up.device}")
    choice = SWIGLU.choose(gate, gelu, backend=backend)
    if choice != "reference":
        gate, up = gate.contiguous(), up.contiguous()
    return _swiglu_op(gate, up, gelu, choice)


def swiglu(gate: Tensor, up: Tensor, *, backend: str | None = None) -> Tensor:
    """silu(gate) * up, the SwiGLU MLP's activation (`down_proj(swiglu(gate_proj(x), up_proj(x)))`), as Liger Kernel's
    LigerSiLUMulFunction: gate and up of one shape, dtype and device; the result in that dtype, computed in fp32 on the
    kernels. Gradients of gate and up. backend: "auto" (default), "triton" (CUDA; CPU tensors under
    TRITON_INTERPRET=1), "cpu" (csrc/swiglu_cpu.cpp: fp32, bf16, fp16 CPU tensors) or "reference"."""
    return _gated("swiglu", gate, up, False, backend)


def geglu(gate: Tensor, up: Tensor, *, backend: str | None = None) -> Tensor:
    """gelu(gate, approximate="tanh") * up, the GeGLU MLP's activation (Gemma's), as Liger Kernel's
    LigerGELUMulFunction; arguments, result and backends as `swiglu`."""
    return _gated("geglu", gate, up, True, backend)
