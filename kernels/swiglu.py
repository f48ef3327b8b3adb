"""The gated MLP's activation, out = act(gate) * up, forward and backward, launched by fasttrain/ops/swiglu.py (which
holds the PyTorch reference). act is SiLU (SwiGLU: Llama, Mistral, Qwen2) or GELU's tanh approximation (GeGLU: Gemma).

One program per BLOCK elements of the flattened, contiguous tensors; math in fp32 whatever the dtype. Both
activations are x * sigmoid(z) with z = x (SiLU) or z = 2 sqrt(2 / pi) (x + 0.044715 x^3) (GELU tanh, so written its
negative tail loses no digits to 1 + tanh's cancellation).
Bytes: forward reads gate and up and writes out (3 tensors); backward reads grad, gate and up and writes both
gradients (5). Eager PyTorch (act, then the product; backward: four products and the activation's gradient) moves
about twice as much.

Pure device code: nothing here imports fasttrain.
"""

import torch
import triton
import triton.language as tl

from ._launch import cdiv

BLOCK = 1024
NUM_WARPS = 4


@triton.jit
def _sigmoid_z(x, GELU: tl.constexpr):
    """(sigmoid(z), dz/dx) for the activation x * sigmoid(z)."""
    if GELU:
        z = 1.5957691216057308 * (x + 0.044715 * x * x * x)  # 2 sqrt(2 / pi) (x + 0.044715 x^3)
        dz = 1.5957691216057308 * (1.0 + 3.0 * 0.044715 * x * x)
    else:
        z = x
        dz = tl.full(x.shape, 1.0, tl.float32)
    return 1.0 / (1.0 + tl.exp(-z)), dz


@triton.jit
def _swiglu_forward_kernel(Gate, Up, Out, n, GELU: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(Gate + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(Up + offs, mask=mask, other=0.0).to(tl.float32)
    s, _ = _sigmoid_z(g, GELU)
    tl.store(Out + offs, (g * s * u).to(Out.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_backward_kernel(Grad, Gate, Up, DGate, DUp, n, GELU: tl.constexpr, BLOCK: tl.constexpr):
    # d act / dx = s + x s (1 - s) dz/dx
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dy = tl.load(Grad + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(Gate + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(Up + offs, mask=mask, other=0.0).to(tl.float32)
    s, dz = _sigmoid_z(g, GELU)
    tl.store(DGate + offs, (dy * u * (s + g * s * (1.0 - s) * dz)).to(DGate.dtype.element_ty), mask=mask)
    tl.store(DUp + offs, (dy * g * s).to(DUp.dtype.element_ty), mask=mask)


def swiglu_forward(gate: torch.Tensor, up: torch.Tensor, gelu: bool) -> torch.Tensor:
    """act(gate) * up for contiguous gate and up of one shape and dtype; a new tensor of that shape."""
    if gate.shape != up.shape or gate.dtype != up.dtype or not (gate.is_contiguous() and up.is_contiguous()):
        raise ValueError("swiglu_forward: gate and up must be contiguous tensors of one shape and dtype")
    out = torch.empty_like(gate)
    n = gate.numel()
    if n:
        _swiglu_forward_kernel[(cdiv(n, BLOCK),)](gate, up, out, n, GELU=gelu, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return out


def swiglu_backward(
    grad: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, gelu: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad of gate, grad of up) for contiguous tensors of one shape and dtype."""
    if not (grad.shape == gate.shape == up.shape and grad.dtype == gate.dtype == up.dtype):
        raise ValueError("swiglu_backward: grad, gate and up must be tensors of one shape and dtype")
    if not (grad.is_contiguous() and gate.is_contiguous() and up.is_contiguous()):
        raise ValueError("swiglu_backward: grad, gate and up must be contiguous")
    dgate, dup = torch.empty_like(gate), torch.empty_like(up)
    n = gate.numel()
    if n:
        _swiglu_backward_kernel[(cdiv(n, BLOCK),)](
            grad, gate, up, dgate, dup, n, GELU=gelu, BLOCK=BLOCK, num_warps=NUM_WARPS
        )
    return dgate, dup


def aot_kernels(arch: int, dtype: str) -> list[dict]:
    """Both activations at the one block size; every pointer in the model's dtype."""
    return [
        dict(
            kernel=kernel,
            types={},
            cases=[
                dict(label=f"{name} w{NUM_WARPS}", constexprs=dict(GELU=gelu, BLOCK=BLOCK), num_warps=NUM_WARPS)
                for name, gelu in (("silu", False), ("gelu", True))
            ],
        )
        for kernel in (_swiglu_forward_kernel, _swiglu_backward_kernel)
    ]
