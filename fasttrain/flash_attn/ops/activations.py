"""flash-attn's `flash_attn.ops.activations`: `swiglu` (fasttrain.ops.swiglu's: silu(x) * y computed in fp32 on the
kernels, x and y of one shape and dtype) and the tanh GELU's `fast_gelu_impl`, `gelu_fwd`, `gelu_bwd`
(fasttrain.ops.activation's). Its `bias_gelu*`, `GeLUFunction`, the ReLU variants (`relu_bwd`, `sqrelu_*`) and the
autograd classes are not mirrored."""

from fasttrain.ops.activation import fast_gelu_impl, gelu_bwd, gelu_fwd
from fasttrain.ops.swiglu import swiglu

__all__ = ["fast_gelu_impl", "gelu_bwd", "gelu_fwd", "swiglu"]
