"""flash-attn's `flash_attn.ops.triton`: `rotary`'s `apply_rotary`, `cross_entropy`'s `cross_entropy_loss` and
`layer_norm` (its fused dropout + residual + norm functions, RMSNorm and the references) are mirrored."""
