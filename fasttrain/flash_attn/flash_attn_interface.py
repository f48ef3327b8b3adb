"""flash-attn's `flash_attn.flash_attn_interface`: its public functions, fasttrain's implementations
(fasttrain.ops), and the two module-level names flash-attn's own tests import: `_get_block_size_n` (the key block
S_dmask's encoding is normalized per, fasttrain.ops.attention_reference's) and `USE_TRITON_ROCM` (False: fasttrain is
not flash-attn's ROCm Triton backend)."""

from fasttrain.ops import (
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
    flash_attn_with_kvcache,
)
from fasttrain.ops.attention_reference import _get_block_size_n  # noqa: F401 (imported by name, as flash-attn's)

USE_TRITON_ROCM = False

__all__ = [  # flash-attn's public functions; the two names above are imported by name only
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_with_kvcache",
]
