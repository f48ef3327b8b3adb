"""Fine-tuning a GPT: LoRA in PEFT's format (`apply_lora`, `merge_lora`, `save_adapter`) and freezing (`freeze`)."""

from fasttrain.finetune.freeze import freeze, memory
from fasttrain.finetune.lora import LoRALinear, LoRASpec, apply_lora, merge_lora, save_adapter

__all__ = ["LoRALinear", "LoRASpec", "apply_lora", "freeze", "memory", "merge_lora", "save_adapter"]
