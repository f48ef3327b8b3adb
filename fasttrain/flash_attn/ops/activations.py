"""flash-attn's `flash_attn.ops.activations`: `swiglu` (fasttrain.ops.swiglu's kernels under flash-attn's argument
names: silu(x) * y computed in fp32, x and y of one shape and dtype) and the tanh GELU's `fast_gelu_impl`,
`gelu_fwd`, `gelu_bwd` (fasttrain.ops.activation's). Its `bias_gelu*`, `GeLUFunction`, the ReLU variants
(`relu_bwd`, `sqrelu_*`) and the autograd classes are not mirrored."""

from torch import Tensor

from fasttrain.ops.activation import fast_gelu_impl, gelu_bwd, gelu_fwd
from fasttrain.ops.swiglu import _gated

__all__ = ["fast_gelu_impl", "gelu_bwd", "gelu_fwd", "swiglu"]


def swiglu(x: Tensor, y: Tensor) -> Tensor:
    """flash-attn's `swiglu(x, y)` (its SwiGLUFunction.apply, which takes x and y by keyword too): silu(x) * y with
    gradients of both; fasttrain.ops.swiglu(gate=x, up=y)."""
    return _gated("swiglu", x, y, False, None, names=("x", "y"))
