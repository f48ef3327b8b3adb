"""flash-attn's `flash_attn.utils`: only `generation`'s `InferenceParams` is mirrored."""
