"""flash-attn's `flash_attn.ops`: only `triton.rotary`'s `apply_rotary` is mirrored."""
