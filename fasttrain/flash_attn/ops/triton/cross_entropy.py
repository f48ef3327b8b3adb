"""flash-attn's `flash_attn.ops.triton.cross_entropy`: `cross_entropy_loss` (fasttrain.ops.cross_entropy_loss's). Its
autograd.Function (also named `CrossEntropyLoss` there) and Triton kernels are flash-attn's implementation and are not
mirrored."""

from fasttrain.ops.cross_entropy_loss import cross_entropy_loss

__all__ = ["cross_entropy_loss"]
