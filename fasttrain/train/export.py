"""`fasttrain export`: a trained run as a transformers checkpoint folder."""

from __future__ import annotations

import json
from pathlib import Path

from fasttrain.finetune import merge_lora, save_adapter
from fasttrain.integrations.hf_checkpoint import HF_CONFIG, save_model
from fasttrain.train.build import load_run


def export_run(
    run: str | Path, to: str | Path, which: str = "best", force: bool = False, adapters_only: bool = False
) -> Path:
    """Write run's checkpoint (best, else latest) to folder `to`: config.json (the original checkpoint's config
    with the model fields of the run, for a run started from one), model.safetensors with any LoRA merged, and
    tokenizer.json for a run that tokenized with one; or with adapters_only PEFT's adapter_config.json and
    adapter_model.safetensors alone. Nothing is written on any error."""
    run = Path(run)
    model, tokenizer, config, spec = load_run(run, which)
    if adapters_only:
        if spec is None:
            raise ValueError("--adapters-only needs a LoRA run (finetune.lora_rank > 0); this run trained no adapters")
        return save_adapter(model, spec, to, base_model=config.init.from_, force=force)
    merge_lora(model)
    base_file = (run if run.is_dir() else run.parent.parent) / HF_CONFIG
    base = json.loads(base_file.read_text()) if base_file.is_file() else None
    tokenizer_json = tokenizer.to_json() if hasattr(tokenizer, "to_json") else None
    return save_model(model, to, base_config=base, tokenizer_json=tokenizer_json, force=force)
