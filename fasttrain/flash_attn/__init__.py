"""flash-attn's module layout over fasttrain's implementations: `flash_attn` -> `fasttrain.flash_attn` in a script's
imports is the whole switch, the other modules mirrored as flash-attn names them (`fasttrain.flash_attn.bert_padding`,
`.flash_attn_interface`, `.layers.rotary`, `.ops.triton.rotary`, `.ops.triton.layer_norm`). Every name is
fasttrain's own object re-exported (the same one `fasttrain.ops` gives), with flash-attn's signature and semantics; a
name flash-attn has and fasttrain does not implement is absent, so its import fails at once. No `__version__`:
fasttrain's release is not flash-attn's, and a check of one against the other would mean nothing.

    from fasttrain.flash_attn import flash_attn_func, flash_attn_varlen_func
    from fasttrain.flash_attn.bert_padding import pad_input, unpad_input
    from fasttrain.flash_attn.layers.rotary import RotaryEmbedding, apply_rotary_emb
    from fasttrain.flash_attn.ops.triton.layer_norm import RMSNorm, layer_norm_fn, rms_norm_fn
"""

from fasttrain.flash_attn.flash_attn_interface import (
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
    flash_attn_with_kvcache,
)

__all__ = [
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_with_kvcache",
]
