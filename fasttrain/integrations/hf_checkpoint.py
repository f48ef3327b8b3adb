"""Hugging Face checkpoint folders <-> fasttrain's GPT: GPT-2, Llama, Mistral and Qwen2.

A folder holds config.json and model.safetensors (or model.safetensors.index.json with its shards). Reading maps the
config onto a GPTConfig (fasttrain.integrations.hf_families) and the tensors onto GPT's state dict: q, k and v
stacked into one `qkv` matrix (rows q, then k, then v), gate and up into one `up` matrix (rows gate, then up),
GPT-2's Conv1D weights (in, out) transposed to nn.Linear's (out, in). Writing does the inverse. Nothing here needs
transformers; safetensors is its dependency.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from fasttrain.integrations.hf_families import (
    CheckpointError,
    config_from_hf,
    config_to_hf,
    family_for,
    family_of,
)
from fasttrain.model import GPT, GPTConfig

HF_CONFIG = "hf_config.json"
"""The file of a run directory started from a checkpoint that holds the checkpoint's config.json."""

# Tensors some checkpoints store that are not weights: GPT-2's causal-mask buffers, old Llama's rotary frequencies.
_BUFFERS = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")


# ---------------------------------------------------------------------------------------------------------- config


def read_config(path: str | Path) -> dict:
    """config.json of checkpoint folder path, checked to be of a supported family."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"init.from: {str(path)!r} is not a folder")
    file = path / "config.json"
    if not file.is_file():
        raise CheckpointError(f"init.from: {str(path)!r} is not a Hugging Face checkpoint (no config.json)")
    try:
        hf = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"init.from: cannot read {file}: {e}") from None
    family_of(hf)
    return hf


# ---------------------------------------------------------------------------------------------------------- tensors


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of checkpoint folder path: model.safetensors, or the shards model.safetensors.index.json names."""
    from safetensors.torch import load_file

    path = Path(path)
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if single.is_file():
        return load_file(single)
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as e:
            raise CheckpointError(f"init.from: cannot read {index}: {e}") from None
        tensors = {}
        for shard in shards:
            if not (path / shard).is_file():
                raise CheckpointError(f"init.from: shard {shard!r} named in {index.name} is missing")
            tensors.update(load_file(path / shard))
        return tensors
    raise CheckpointError(
        f"init.from: {str(path)!r} has no model.safetensors or model.safetensors.index.json (only safetensors are read)"
    )


def _pairs(cfg: GPTConfig, family: str) -> list[tuple[str, list[str], bool]]:
    """(our key, the HF keys stacked into it along rows, transposed as Conv1D) for every tensor of GPT(cfg)."""
    pairs = []
    if family == "gpt2":
        pairs += [("wte.weight", ["wte.weight"], False), ("wpe.weight", ["wpe.weight"], False)]
        for i in range(cfg.n_layer):
            h, b = f"h.{i}.", f"blocks.{i}."
            for ours, theirs, conv in (
                ("norm1", "ln_1", False),
                ("attn.qkv", "attn.c_attn", True),
                ("attn.proj", "attn.c_proj", True),
                ("norm2", "ln_2", False),
                ("mlp.up", "mlp.c_fc", True),
                ("mlp.down", "mlp.c_proj", True),
            ):
                pairs += [(b + ours + ".weight", [h + theirs + ".weight"], conv)]
                pairs += [(b + ours + ".bias", [h + theirs + ".bias"], False)]
        pairs += [("norm_f.weight", ["ln_f.weight"], False), ("norm_f.bias", ["ln_f.bias"], False)]
    else:
        pairs += [("wte.weight", ["model.embed_tokens.weight"], False)]
        for i in range(cfg.n_layer):
            h, b = f"model.layers.{i}.", f"blocks.{i}."
            attn = [h + f"self_attn.{x}_proj" for x in "qkv"]
            pairs += [
                (b + "norm1.weight", [h + "input_layernorm.weight"], False),
                (b + "attn.qkv.weight", [a + ".weight" for a in attn], False),
                (b + "attn.proj.weight", [h + "self_attn.o_proj.weight"], False),
                (b + "norm2.weight", [h + "post_attention_layernorm.weight"], False),
                (b + "mlp.up.weight", [h + "mlp.gate_proj.weight", h + "mlp.up_proj.weight"], False),
                (b + "mlp.down.weight", [h + "mlp.down_proj.weight"], False),
            ]
            if cfg.qkv_bias:
                pairs += [(b + "attn.qkv.bias", [a + ".bias" for a in attn], False)]
            if cfg.bias:
                pairs += [
                    (b + "attn.proj.bias", [h + "self_attn.o_proj.bias"], False),
                    (b + "mlp.up.bias", [h + "mlp.gate_proj.bias", h + "mlp.up_proj.bias"], False),
                    (b + "mlp.down.bias", [h + "mlp.down_proj.bias"], False),
                ]
        pairs += [("norm_f.weight", ["model.norm.weight"], False)]
    if not cfg.tie_embeddings:
        pairs += [("lm_head.weight", ["lm_head.weight"], False)]
    return pairs


def hf_linears(cfg: GPTConfig) -> dict[str, list[tuple[str, int, int | None]]]:
    """Our Linear module name -> the transformers modules it holds, as (full module name, first row, end row or
    None for the last) of its weight, for the family GPT(cfg) maps to: `blocks.0.attn.qkv` -> the q_proj, k_proj,
    v_proj rows of Llama, or all rows of GPT-2's c_attn. The tied head is left out (it is the embedding)."""
    family = family_for(cfg)
    prefix = "transformer." if family == "gpt2" else ""
    out = {}
    for ours, theirs, _ in _pairs(cfg, family):
        if not ours.endswith(".weight") or ours.startswith(("wte", "wpe", "norm_f")) or ".norm" in ours:
            continue
        start, spans = 0, []
        for key in theirs:
            rows = _rows(cfg, family, key) if len(theirs) > 1 else None
            stop = start + rows if rows is not None else None
            module = key.removesuffix(".weight")
            spans.append((module if module == "lm_head" else prefix + module, start, stop))
            start = stop
        out[ours.removesuffix(".weight")] = spans
    return out


def state_dict_from_hf(tensors: dict[str, torch.Tensor], cfg: GPTConfig, family: str) -> dict[str, torch.Tensor]:
    """GPT(cfg)'s state dict from a family checkpoint's tensors; a missing or unexpected tensor is an error."""
    if family == "gpt2":
        # The original GPT-2 files name the GPT2Model's tensors bare; save_pretrained prefixes them "transformer.".
        tensors = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    if cfg.tie_embeddings:
        tensors = {k: v for k, v in tensors.items() if k != "lm_head.weight"}
    used, out = set(), {}
    for ours, theirs, conv in _pairs(cfg, family):
        missing = [k for k in theirs if k not in tensors]
        if missing:
            raise CheckpointError(f"init.from: the checkpoint has no tensor {missing[0]!r} ({family} layout)")
        parts = [tensors[k].t() if conv else tensors[k] for k in theirs]
        out[ours] = torch.cat(parts) if len(parts) > 1 else parts[0]
        used.update(theirs)
    if cfg.tie_embeddings:
        out["lm_head.weight"] = out["wte.weight"]
    extra = [k for k in tensors if k not in used and not k.endswith(_BUFFERS)]
    if extra:
        raise CheckpointError(f"init.from: unexpected tensor {extra[0]!r} for a {family} model of this config")
    return out


def state_dict_to_hf(state: dict[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """A transformers checkpoint's tensors (contiguous, unshared) from GPT(cfg)'s state dict."""
    family = family_for(cfg)
    prefix = "transformer." if family == "gpt2" else ""
    pairs = _pairs(cfg, family)
    known = {ours for ours, _, _ in pairs} | {"lm_head.weight"}
    extra = [k for k in state if k not in known]
    if extra:
        raise CheckpointError(f"export: {extra[0]!r} has no place in a {family} checkpoint (merge LoRA layers first)")
    out = {}
    for ours, theirs, conv in pairs:
        tensor = state[ours]
        parts = tensor.split([_rows(cfg, family, k) for k in theirs]) if len(theirs) > 1 else [tensor]
        for key, part in zip(theirs, parts):
            name = key if key == "lm_head.weight" else prefix + key
            out[name] = (part.t() if conv else part).detach().contiguous().clone()
    return out


def _rows(cfg: GPTConfig, family: str, key: str) -> int:
    if key.endswith(("q_proj.weight", "q_proj.bias")):
        return cfg.n_head * cfg.head_dim
    if key.endswith(("k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias")):
        return cfg.n_kv_head * cfg.head_dim
    return cfg.d_ff  # gate_proj / up_proj


# ---------------------------------------------------------------------------------------------------------- models


def checkpoint_config(path: str | Path) -> GPTConfig:
    """The GPTConfig of checkpoint folder path (its config.json read and mapped; the weights are not read)."""
    hf = read_config(path)
    try:
        return config_from_hf(hf)
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"init.from: config.json of {family_of(hf)} is incomplete or invalid: {e}") from None


def tokenizer_file(path: str | Path) -> Path:
    """tokenizer.json of checkpoint folder path, which must have one."""
    file = Path(path) / "tokenizer.json"
    if not file.is_file():
        raise CheckpointError(f"init.from: {str(path)!r} has no tokenizer.json (the data is tokenized with it)")
    return file


def load_weights(model: GPT, path: str | Path) -> GPT:
    """model with the weights of checkpoint folder path, in model's dtype and on its device; the checkpoint must be
    of model's config (shapes are checked, each mismatch named)."""
    state = state_dict_from_hf(read_tensors(path), model.config, family_of(read_config(path)))
    expected = model.state_dict()
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise CheckpointError(
                f"init.from: tensor for {key} has shape {tuple(tensor.shape)}, the config gives "
                f"{tuple(expected[key].shape)}"
            )
    ref = model.wte.weight
    model.load_state_dict({k: v.to(ref.dtype) for k, v in state.items()}, assign=ref.is_meta)
    return model


def load_model(path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[GPT, dict]:
    """(GPT with the checkpoint's weights in dtype, the checkpoint's config.json dict) from folder path."""
    with torch.device("meta"):
        model = GPT(checkpoint_config(path)).to(dtype)
    return load_weights(model, path), read_config(path)


def save_model(
    model: GPT,
    path: str | Path,
    *,
    base_config: dict | None = None,
    tokenizer_json: str | None = None,
    force: bool = False,
) -> Path:
    """Write model as a transformers checkpoint folder (config.json, model.safetensors, and tokenizer.json holding
    tokenizer_json when given), through write_folder."""
    from safetensors.torch import save_file

    hf = config_to_hf(model.config, base_config)
    hf["torch_dtype"] = hf["dtype"] = str(model.wte.weight.dtype).removeprefix("torch.")
    tensors = {k: v.cpu() for k, v in state_dict_to_hf(model.state_dict(), model.config).items()}

    def write(folder: Path) -> None:
        (folder / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer_json is not None:
            (folder / "tokenizer.json").write_text(tokenizer_json)

    return write_folder(path, write, force)


def write_folder(path: str | Path, write: Callable[[Path], None], force: bool = False) -> Path:
    """Fill folder path by write(folder): written into a temporary folder beside it and renamed into place, so an
    error leaves nothing; an existing non-empty path is refused unless force (then replaced whole)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"export: {str(path)!r} exists and is not a folder")
    if path.is_dir() and any(path.iterdir()) and not force:
        raise CheckpointError(f"export: {str(path)!r} is not empty (pass --force to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        write(tmp)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
