"""flash-attn's `flash_attn.ops.triton`: `rotary`'s `apply_rotary` and `cross_entropy`'s `cross_entropy_loss` are
mirrored."""
