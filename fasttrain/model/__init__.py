"""A decoder-only GPT from scratch on fasttrain.ops: `from fasttrain.model import GPT, GPTConfig`."""

from fasttrain.model.config import GPTConfig
from fasttrain.model.flops import flops_per_token, param_count
from fasttrain.model.gpt import GPT

__all__ = ["GPT", "GPTConfig", "flops_per_token", "param_count"]
