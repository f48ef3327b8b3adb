"""flash-attn's `flash_attn.losses`: only `cross_entropy`'s `CrossEntropyLoss` is mirrored."""
