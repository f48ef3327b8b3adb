"""Public ops: flash-attn- and torch-compatible signatures over the kernels, a pure-PyTorch reference beside each."""

from fasttrain.ops.activation import gelu
from fasttrain.ops.attention import flash_attn_func, flash_attn_varlen_func, scaled_dot_product_attention
from fasttrain.ops.attention_packed import (
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
)
from fasttrain.ops.cross_entropy import cross_entropy
from fasttrain.ops.cross_entropy_loss import cross_entropy_loss
from fasttrain.ops.decode import flash_attn_with_kvcache
from fasttrain.ops.linear_cross_entropy import linear_cross_entropy
from fasttrain.ops.norms import add_layer_norm, add_rms_norm, layer_norm, rms_norm
from fasttrain.ops.rotary import apply_rotary_emb
from fasttrain.ops.swiglu import geglu, swiglu

__all__ = [
    "flash_attn_func",
    "flash_attn_varlen_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_varlen_kvpacked_func",
    "scaled_dot_product_attention",
    "flash_attn_with_kvcache",
    "cross_entropy",
    "cross_entropy_loss",
    "linear_cross_entropy",
    "layer_norm",
    "rms_norm",
    "add_layer_norm",
    "add_rms_norm",
    "apply_rotary_emb",
    "gelu",
    "swiglu",
    "geglu",
]
