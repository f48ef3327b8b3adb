"""nn.LayerNorm and nn.RMSNorm on fasttrain.ops: same constructor, parameters and state_dict keys as torch's, so
checkpoints load either way. `forward(input)` is torch's; `forward(input, residual)` is a pre-norm block's residual
add fused into the norm and returns (normed, input + residual), as flash-attn's norm modules do with prenorm=True."""

from __future__ import annotations

import torch
import torch.nn as nn

from fasttrain.ops import add_layer_norm, add_rms_norm, layer_norm, rms_norm


class LayerNorm(nn.LayerNorm):
    def forward(self, input: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is None:
            return layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)
        return add_layer_norm(input, residual, self.normalized_shape, self.weight, self.bias, self.eps)


class RMSNorm(nn.RMSNorm):
    def forward(self, input: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is None:
            return rms_norm(input, self.normalized_shape, self.weight, self.eps)
        return add_rms_norm(input, residual, self.normalized_shape, self.weight, self.eps)
