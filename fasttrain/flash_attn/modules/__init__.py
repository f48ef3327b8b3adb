"""flash-attn's `flash_attn.modules`: `mha`, `mlp`, `block` and `embedding` are mirrored (their tensor-parallel and
fused classes are absent)."""
