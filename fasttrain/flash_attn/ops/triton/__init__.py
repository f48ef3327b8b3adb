"""flash-attn's `flash_attn.ops.triton`: `rotary`'s `apply_rotary` and `layer_norm` (its fused dropout + residual +
norm functions, RMSNorm and the references) are mirrored."""
