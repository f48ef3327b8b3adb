"""flash-attn's `flash_attn.ops`: `activations` (`swiglu` and the tanh GELU's functions), `triton.rotary`'s
`apply_rotary` and `triton.cross_entropy`'s `cross_entropy_loss` are mirrored."""
