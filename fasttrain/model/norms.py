"""nn.LayerNorm and nn.RMSNorm on fasttrain.ops: same constructor, parameters and state_dict keys as torch's, so
checkpoints load either way; `norm_fn` is the functional form they call (benchmarks swap in torch's to time the
same model without fasttrain's kernels, as they do each attention layer's attn_fn)."""
from __future__ import annotations

import torch
import torch.nn as nn

from fasttrain.ops import layer_norm, rms_norm


class LayerNorm(nn.LayerNorm):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.norm_fn = layer_norm  # (input, normalized_shape, weight, bias, eps)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.norm_fn(input, self.normalized_shape, self.weight, self.bias, self.eps)


class RMSNorm(nn.RMSNorm):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.norm_fn = rms_norm  # (input, normalized_shape, weight, eps)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.norm_fn(input, self.normalized_shape, self.weight, self.eps)
