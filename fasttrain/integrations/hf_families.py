"""Hugging Face model configs <-> GPTConfig for the families fasttrain reads and writes: GPT-2, Llama, Mistral and
Qwen2 (config.json's keys, transformers 4's and 5's spellings of the rope parameters both read)."""

from __future__ import annotations

from fasttrain.model import GPTConfig

FAMILIES = {
    "gpt2": "GPT2LMHeadModel",
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}
"""model_type -> the transformers class a folder of that family loads as."""


class CheckpointError(ValueError):
    """A folder that is not a checkpoint fasttrain can read, or a model that cannot be written as one."""


def family_of(hf: dict) -> str:
    """The model_type of HF config dict hf, one of FAMILIES, else CheckpointError naming it."""
    model_type = hf.get("model_type")
    supported = ", ".join(f"{k} ({v})" for k, v in FAMILIES.items())
    if model_type not in FAMILIES:
        arch = ", ".join(hf.get("architectures") or []) or "none given"
        raise CheckpointError(
            f"unsupported architecture: model_type {model_type!r} (architectures: {arch}); supported: {supported}"
        )
    return model_type


def config_from_hf(hf: dict) -> GPTConfig:
    """The GPTConfig of a GPT that computes what transformers' model of HF config dict hf computes."""
    family = family_of(hf)
    if family == "gpt2":
        return _gpt2_config(hf)
    return _llama_config(hf, family)


def _gpt2_config(hf: dict) -> GPTConfig:
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise CheckpointError(f"gpt2: activation_function {act!r} is not supported (gelu_new, gelu_pytorch_tanh)")
    if not hf.get("scale_attn_weights", True) or hf.get("scale_attn_by_inverse_layer_idx", False):
        raise CheckpointError("gpt2: only scale_attn_weights=true, scale_attn_by_inverse_layer_idx=false is supported")
    if hf.get("add_cross_attention", False):
        raise CheckpointError("gpt2: add_cross_attention is not supported (decoder-only models)")
    return GPTConfig(
        n_layer=hf["n_layer"],
        n_head=hf["n_head"],
        d_model=hf["n_embd"],
        d_ff=hf.get("n_inner") or None,
        vocab_size=hf["vocab_size"],
        max_seq_len=hf["n_positions"],
        dropout=float(hf.get("resid_pdrop", 0.0)),
        norm="layernorm",
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        positions="learned",
        activation="gelu",
        bias=True,
        tie_embeddings=hf.get("tie_word_embeddings", True),
    )


def _rope(hf: dict, family: str) -> dict:
    """rope_theta and the llama3 scaling fields from transformers 5's rope_parameters or 4's rope_theta/rope_scaling."""
    params = dict(hf.get("rope_scaling") or {})
    params.update(hf.get("rope_parameters") or {})
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    if params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
        raise CheckpointError(f"{family}: partial_rotary_factor other than 1 is not supported")
    out = {"rope_theta": float(theta)}
    if kind == "llama3":
        out.update(
            rope_scaling="llama3",
            rope_factor=float(params["factor"]),
            rope_low_freq_factor=float(params["low_freq_factor"]),
            rope_high_freq_factor=float(params["high_freq_factor"]),
            rope_original_max_seq_len=int(
                params.get("original_max_position_embeddings", hf["max_position_embeddings"])
            ),
        )
    elif kind != "default":
        raise CheckpointError(f"{family}: rope type {kind!r} is not supported (default, llama3)")
    return out


def _llama_config(hf: dict, family: str) -> GPTConfig:
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise CheckpointError(f"{family}: hidden_act {act!r} is not supported (silu)")
    attention_bias, mlp_bias = bool(hf.get("attention_bias", False)), bool(hf.get("mlp_bias", False))
    qkv_bias = family == "qwen2"
    if family == "llama" and attention_bias != mlp_bias:
        raise CheckpointError("llama: attention_bias and mlp_bias must be equal (fasttrain's bias covers both)")
    window, full_layers = None, 0
    n_layer = hf["num_hidden_layers"]
    if family == "mistral":
        window = hf.get("sliding_window")
    elif family == "qwen2" and hf.get("use_sliding_window", False) and hf.get("sliding_window") is not None:
        kinds = hf.get("layer_types") or [
            "sliding_attention" if i >= hf.get("max_window_layers", n_layer) else "full_attention"
            for i in range(n_layer)
        ]
        full_layers = kinds.index("sliding_attention") if "sliding_attention" in kinds else n_layer
        if any(k != "sliding_attention" for k in kinds[full_layers:]):
            raise CheckpointError("qwen2: layer_types must be full_attention layers followed by sliding_attention ones")
        window = hf["sliding_window"] if full_layers < n_layer else None
    return GPTConfig(
        n_layer=n_layer,
        n_head=hf["num_attention_heads"],
        n_kv_head=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        d_model=hf["hidden_size"],
        head_dim=hf.get("head_dim") or None,
        d_ff=hf["intermediate_size"],
        vocab_size=hf["vocab_size"],
        max_seq_len=hf["max_position_embeddings"],
        dropout=float(hf.get("attention_dropout", 0.0)),
        norm="rmsnorm",
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        positions="rotary",
        activation="swiglu",
        bias=attention_bias and family == "llama",
        qkv_bias=qkv_bias or (attention_bias and family == "llama"),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        sliding_window=window,
        full_attention_layers=full_layers if window is not None else 0,
        **_rope(hf, family),
    )


def family_for(cfg: GPTConfig) -> str:
    """The HF family whose model computes what GPT(cfg) computes, else CheckpointError saying which option has none."""
    if cfg.positions == "learned":
        if cfg.norm != "layernorm" or cfg.activation != "gelu" or not cfg.bias or cfg.sliding_window:
            raise CheckpointError(
                "export: learned positions map to gpt2, which needs norm 'layernorm', activation 'gelu', bias true "
                "and no sliding_window"
            )
        return "gpt2"
    if cfg.norm != "rmsnorm" or cfg.activation != "swiglu":
        raise CheckpointError("export: rotary positions map to llama/mistral/qwen2, which need rmsnorm and swiglu")
    if cfg.qkv_bias and not cfg.bias:
        return "qwen2"
    if cfg.qkv_bias != cfg.bias:
        raise CheckpointError("export: qkv_bias without bias on the other projections has no HF family but qwen2")
    if cfg.sliding_window is not None:
        if cfg.full_attention_layers or cfg.bias:
            raise CheckpointError("export: a sliding window maps to mistral (no biases, full_attention_layers 0)")
        return "mistral"
    return "llama"


def config_to_hf(cfg: GPTConfig, base: dict | None = None) -> dict:
    """The HF config dict of GPT(cfg): base (the checkpoint's own config.json, for its token ids and other keys)
    with every field that sets the computation replaced."""
    family = family_for(cfg)
    hf = dict(base or {}) if (base or {}).get("model_type") == family else {}
    hf.update(model_type=family, architectures=[FAMILIES[family]], vocab_size=cfg.vocab_size)
    hf["tie_word_embeddings"] = cfg.tie_embeddings
    if family == "gpt2":
        hf.update(
            n_layer=cfg.n_layer,
            n_head=cfg.n_head,
            n_embd=cfg.d_model,
            n_inner=cfg.d_ff,
            n_positions=cfg.max_seq_len,
            layer_norm_epsilon=cfg.norm_eps,
            activation_function=hf.get("activation_function", "gelu_new"),
        )
        return hf
    for key in ("rope_scaling", "rope_theta"):
        hf.pop(key, None)
    rope = {"rope_type": cfg.rope_scaling or "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling == "llama3":
        rope.update(
            factor=cfg.rope_factor,
            low_freq_factor=cfg.rope_low_freq_factor,
            high_freq_factor=cfg.rope_high_freq_factor,
            original_max_position_embeddings=cfg.rope_original_max_seq_len,
        )
    hf.update(
        num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.n_kv_head,
        hidden_size=cfg.d_model,
        head_dim=cfg.head_dim,
        intermediate_size=cfg.d_ff,
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps,
        hidden_act="silu",
        rope_parameters=rope,
    )
    if family == "llama":
        hf.update(attention_bias=cfg.bias, mlp_bias=cfg.bias)
    elif family == "mistral":
        hf["sliding_window"] = cfg.sliding_window
    else:
        windowed = cfg.sliding_window is not None
        hf.update(
            use_sliding_window=windowed,
            sliding_window=cfg.sliding_window,
            max_window_layers=cfg.full_attention_layers if windowed else cfg.n_layer,
        )
        hf.pop("layer_types", None)
    return hf
