"""nn.LayerNorm and nn.RMSNorm on fasttrain.ops: same constructor, parameters and state_dict keys as torch's, so
checkpoints load either way. `forward(input)` is torch's; `forward(input, residual)` is a pre-norm block's residual
add fused into the norm and returns (normed, input + residual), as flash-attn's norm modules do with prenorm=True.
`norm_fn` and `add_norm_fn` are the functional forms they call (benchmarks swap in torch's to time the same model
without fasttrain's kernels, as they do each attention layer's attn_fn)."""

from __future__ import annotations

import torch
import torch.nn as nn

from fasttrain.ops import add_layer_norm, add_rms_norm, layer_norm, rms_norm


class LayerNorm(nn.LayerNorm):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.norm_fn = layer_norm  # (input, normalized_shape, weight, bias, eps)
        self.add_norm_fn = add_layer_norm  # (input, residual, normalized_shape, weight, bias, eps) -> (y, s)

    def forward(self, input: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is None:
            return self.norm_fn(input, self.normalized_shape, self.weight, self.bias, self.eps)
        return self.add_norm_fn(input, residual, self.normalized_shape, self.weight, self.bias, self.eps)


class RMSNorm(nn.RMSNorm):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.norm_fn = rms_norm  # (input, normalized_shape, weight, eps)
        self.add_norm_fn = add_rms_norm  # (input, residual, normalized_shape, weight, eps) -> (y, s)

    def forward(self, input: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is None:
            return self.norm_fn(input, self.normalized_shape, self.weight, self.eps)
        return self.add_norm_fn(input, residual, self.normalized_shape, self.weight, self.eps)
