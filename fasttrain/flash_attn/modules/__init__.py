"""flash-attn's `flash_attn.modules`: only `mha` is mirrored (its `mlp`, `block` and `embedding` are absent)."""
