"""flash-attn's `flash_attn.ops`: `triton.rotary`'s `apply_rotary` and `triton.layer_norm`'s functions are
mirrored."""
