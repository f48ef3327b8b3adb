"""flash-attn's `flash_attn.ops`: `activations` (`swiglu` and the tanh GELU's functions), `triton.rotary`'s
`apply_rotary`, `triton.cross_entropy`'s `cross_entropy_loss` and `triton.layer_norm`'s functions are mirrored."""
