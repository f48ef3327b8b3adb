"""flash-attn's module layout over fasttrain's implementations: `flash_attn` -> `fasttrain.flash_attn` in a script's
imports is the whole switch, the other modules mirrored as flash-attn names them (`fasttrain.flash_attn.bert_padding`,
`.flash_attn_interface`, `.layers.rotary`, `.losses.cross_entropy`, `.modules.mha`, `.modules.mlp`, `.modules.block`,
`.modules.embedding`, `.ops.activations`, `.ops.triton.cross_entropy`, `.ops.triton.layer_norm`, `.ops.triton.rotary`,
`.utils.generation`). Every function is fasttrain's own object re-exported (the same one `fasttrain.ops` gives), with
flash-attn's signature and semantics; `.modules`' modules (MHA and its attention modules, Mlp, GatedMlp, Block,
ParallelBlock, the embeddings) are built here over those functions, and `.utils.generation` holds their
`InferenceParams`. A name flash-attn has and fasttrain does not implement is absent, so its import fails at once. No
`__version__`: fasttrain's release is not flash-attn's, and a check of one against the other would mean nothing.

    from fasttrain.flash_attn import flash_attn_func, flash_attn_varlen_func
    from fasttrain.flash_attn.bert_padding import pad_input, unpad_input
    from fasttrain.flash_attn.layers.rotary import RotaryEmbedding, apply_rotary_emb
    from fasttrain.flash_attn.losses.cross_entropy import CrossEntropyLoss
    from fasttrain.flash_attn.modules.block import Block
    from fasttrain.flash_attn.modules.mha import MHA
    from fasttrain.flash_attn.modules.mlp import GatedMlp, Mlp
    from fasttrain.flash_attn.utils.generation import InferenceParams
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
