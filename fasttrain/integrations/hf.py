"""HF Transformers: `attn_implementation="fasttrain"` runs a model's attention on fasttrain's kernels.

    import fasttrain.integrations.hf                      # registers "fasttrain" (needs `pip install fasttrain[hf]`)
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="fasttrain")

The attention function and its mask function live in fasttrain.integrations.hf_attention (what runs on which kernel
is in its docstring and in docs/hf.md); importing this module registers them with transformers' AttentionInterface
and AttentionMaskInterface under the name "fasttrain".
"""

from __future__ import annotations

from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from fasttrain.integrations.hf_attention import fasttrain_attention_forward, fasttrain_mask

NAME = "fasttrain"
__all__ = ["NAME", "fasttrain_attention_forward", "fasttrain_mask"]

AttentionInterface.register(NAME, fasttrain_attention_forward)
AttentionMaskInterface.register(NAME, fasttrain_mask)

from fasttrain.integrations.hf_apply import *  # noqa: E402, F403  (apply, revert, apply_to_<family>)
from fasttrain.integrations.hf_apply import __all__ as _apply_names  # noqa: E402

__all__ += _apply_names
