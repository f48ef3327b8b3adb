"""flash-attn's `flash_attn.layers`: only `rotary` is mirrored."""
