"""flash-attn's `flash_attn.ops.triton`: only `rotary`'s `apply_rotary` is mirrored."""
