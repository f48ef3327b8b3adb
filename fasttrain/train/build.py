"""A run's model and optimizer, built from its config: for training (fasttrain.train.run) and for reading a trained
run back (load_for_inference, which `fasttrain eval` and `fasttrain generate` use)."""

from __future__ import annotations

from pathlib import Path

import torch

from fasttrain.config import from_dict
from fasttrain.data import tokenizer_from_config
from fasttrain.finetune import LoRASpec, apply_lora, freeze
from fasttrain.model import GPT, GPTConfig
from fasttrain.optim import AdamW
from fasttrain.train import checkpoint, sharded
from fasttrain.train.config import FinetuneConfig, OptimConfig, RunConfig


def build_model(cfg: GPTConfig) -> GPT:
    """The model a run trains and a checkpoint's weights load into (initialised from the torch RNG)."""
    return GPT(cfg)


def apply_finetune(model: GPT, fc: FinetuneConfig) -> LoRASpec | None:
    """LoRA layers (all else frozen) and the frozen parameters fc asks for, in place -> the LoRA spec or None."""
    spec = apply_lora(model, fc.lora_rank, fc.lora_alpha, fc.lora_dropout, fc.lora_targets) if fc.lora_rank else None
    if fc.freeze:
        freeze(model, fc.freeze)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("finetune.freeze leaves no parameter to train")
    return spec


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices and embeddings; leave norm weights and biases alone (they set scales, not features). Frozen
    parameters are left out, so they get no optimizer state."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.dim() >= 2]
    no_decay = [p for p in trainable if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, oc: OptimConfig) -> AdamW:
    return AdamW(
        param_groups(model, oc.weight_decay),
        lr=oc.lr,
        betas=(oc.beta1, oc.beta2),
        eps=oc.eps,
        weight_decay=oc.weight_decay,
        max_grad_norm=oc.max_grad_norm,
        backend=oc.backend,
    )


def load_for_inference(run_dir: str | Path, which: str = "best", device: str | torch.device = "cpu"):
    """(model in eval mode on device, tokenizer, RunConfig) from a run directory or checkpoint file.

    which='best' falls back to 'latest' when the run never evaluated.
    """
    model, tokenizer, config, _ = load_run(run_dir, which)
    return model.to(device).eval(), tokenizer, config


def load_run(run_dir: str | Path, which: str = "best"):
    """(model on the CPU with its LoRA layers, tokenizer, RunConfig, LoRASpec or None) from a run directory or
    checkpoint file, or an FSDP run's sharded checkpoint folder (consolidated here, at any world size it was
    written with); which='best' falls back to 'latest' when the run never evaluated."""
    run_dir = Path(run_dir)
    if which == "best" and run_dir.is_dir() and not (checkpoint.checkpoint_dir(run_dir) / "best").is_file():
        which = "latest"
    folder = run_dir if sharded.is_sharded(run_dir) else sharded.latest(run_dir, which) if run_dir.is_dir() else None
    if folder is not None:  # an FSDP run's checkpoint, read whole by this one process
        state = sharded.load_trainer_state(folder, require=("config", "tokenizer"))
        file = folder
    else:
        state = checkpoint.load(run_dir, which, map_location="cpu", require=("config", "model", "tokenizer"))
        file = checkpoint.resolve(run_dir, which)
    config = from_dict(RunConfig, state["config"])
    model = build_model(config.model)
    spec = apply_finetune(model, config.finetune)
    if folder is not None:
        sharded.load_model(folder, model)
        weights = model.state_dict()
    else:
        checkpoint.check_model_state(model, state["model"], file)
        weights = state["model"]
    bad = checkpoint.first_non_finite(weights)
    if bad is not None:
        raise checkpoint.CheckpointError(f"checkpoint {str(file)!r} holds a NaN or inf in {bad} (its run diverged)")
    model.load_state_dict(weights)
    return model, tokenizer_from_config(state["tokenizer"]), config, spec
