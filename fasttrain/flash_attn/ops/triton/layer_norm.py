"""flash-attn's `flash_attn.ops.triton.layer_norm`: fused dropout + residual + LayerNorm / RMSNorm
(fasttrain.ops.dropout_add_norm) and flash-attn's plain-PyTorch references for it
(fasttrain.ops.dropout_add_norm_reference). Its Triton kernels themselves (`_layer_norm_fwd`, ...) are flash-attn's
implementation and are not mirrored."""

from fasttrain.ops.dropout_add_norm import RMSNorm, layer_norm_fn, layer_norm_linear_fn, rms_norm_fn
from fasttrain.ops.dropout_add_norm_reference import layer_norm_ref, rms_norm_ref

__all__ = ["RMSNorm", "layer_norm_fn", "layer_norm_linear_fn", "layer_norm_ref", "rms_norm_fn", "rms_norm_ref"]
