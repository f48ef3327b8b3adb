"""`fasttrain export`: a trained run as a transformers checkpoint folder."""

from __future__ import annotations

import json
from pathlib import Path

from fasttrain.integrations.hf_checkpoint import HF_CONFIG, save_model
from fasttrain.train.build import load_for_inference


def export_run(run: str | Path, to: str | Path, which: str = "best", force: bool = False) -> Path:
    """Write run's checkpoint (best, else latest) to folder `to`: config.json (the original checkpoint's config
    with the model fields of the run, for a run started from one), model.safetensors, and tokenizer.json for a run
    that tokenized with one. Nothing is written on any error."""
    run = Path(run)
    model, tokenizer, _ = load_for_inference(run, which)
    base_file = (run if run.is_dir() else run.parent.parent) / HF_CONFIG
    base = json.loads(base_file.read_text()) if base_file.is_file() else None
    tokenizer_json = tokenizer.to_json() if hasattr(tokenizer, "to_json") else None
    return save_model(model, to, base_config=base, tokenizer_json=tokenizer_json, force=force)
