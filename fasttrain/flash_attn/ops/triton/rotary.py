"""flash-attn's `flash_attn.ops.triton.rotary`: `apply_rotary` (fasttrain.ops.rotary's), the function flash-attn's
rotary layers call. Its Triton kernel itself (`rotary_kernel`) is flash-attn's implementation and is not mirrored."""

from fasttrain.ops.rotary import apply_rotary

__all__ = ["apply_rotary"]
