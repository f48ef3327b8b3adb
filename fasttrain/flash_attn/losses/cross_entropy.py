"""flash-attn's `flash_attn.losses.cross_entropy`: `CrossEntropyLoss` (fasttrain.ops.cross_entropy_loss's), on the CPU
too (flash-attn's asserts CUDA tensors)."""

from fasttrain.ops.cross_entropy_loss import CrossEntropyLoss

__all__ = ["CrossEntropyLoss"]
