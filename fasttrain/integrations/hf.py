"""HF Transformers: `attn_implementation="fasttrain"` runs a model's attention on fasttrain's kernels.

    import fasttrain.integrations.hf                      # registers "fasttrain" (needs `pip install fasttrain[hf]`)
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="fasttrain")

Masks come from fasttrain_mask: transformers' sdpa mask, or none where it is only causal (no padding, no packing, no
sliding window shorter than the sequence), and the kernel masks causally; any other mask goes to fasttrain's
scaled_dot_product_attention as given, which runs its reference (PyTorch) path for it. Under torch.compile the mask
cannot be read without a graph break, so a compiled model always runs that reference path.
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


def fasttrain_mask(*args, **kwargs) -> torch.Tensor | None:
    """The mask for attn_implementation="fasttrain": transformers' sdpa mask (same arguments), or None wherever that
    mask is only causal over a square (Tq == Tk) block, so the kernel masks causally instead. While tracing the
    mask's values are unknown (reading them would break the graph): it is returned as built."""
    mask = sdpa_mask(*args, **kwargs)
    if mask is None or mask.dtype != torch.bool or mask.dim() != 4 or torch.compiler.is_compiling():
        return mask
    T = mask.shape[-1]
    if mask.shape[-2] != T or T < 2:
        return mask
    causal = torch.ones(T, T, dtype=torch.bool, device=mask.device).tril()
    return None if bool((mask == causal).all()) else mask  # one host read per forward, as sdpa_mask's own check


AttentionInterface.register(NAME, fasttrain_attention_forward)
AttentionMaskInterface.register(NAME, fasttrain_mask)

from fasttrain.integrations.hf_apply import *  # noqa: E402, F403  (apply, revert, apply_to_<family>: hf_apply.__all__)
