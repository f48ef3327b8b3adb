"""HF Transformers: `attn_implementation="fasttrain"` runs a model's attention on fasttrain's kernels.

    import fasttrain.integrations.hf                      # registers "fasttrain" (needs `pip install fasttrain[hf]`)
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="fasttrain")

Transformers builds its masks for this name as it does for "sdpa": where the mask is only causal (no padding, no
packing, no sliding window shorter than the sequence) it passes none and the kernel masks causally; any other mask
goes to fasttrain's scaled_dot_product_attention as given, which runs its reference (PyTorch) path for it.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from fasttrain.ops import scaled_dot_product_attention

NAME = "fasttrain"


def fasttrain_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Transformers' attention-function contract: query (B, H, Tq, D), key/value (B, Hkv, Tk, D) -> ((B, Tq, H, D),
    no attention weights)."""
    for unsupported in ("softcap", "position_bias", "s_aux"):
        if kwargs.get(unsupported) is not None:
            raise ValueError(f"attn_implementation='fasttrain' does not implement {unsupported}; use 'eager'")
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    # One query token sees every cached key; with a mask, the mask says everything (as transformers' sdpa path).
    causal = bool(causal and attention_mask is None and query.shape[2] > 1)
    out = scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=attention_mask,
        dropout_p=dropout,
        is_causal=causal,
        scale=scaling,
        enable_gqa=key.shape[1] != query.shape[1],
    )
    return out.transpose(1, 2), None  # (B, H, Tq, D) -> (B, Tq, H, D)


AttentionInterface.register(NAME, fasttrain_attention_forward)
AttentionMaskInterface.register(NAME, sdpa_mask)
