"""Parameter count and FLOPs per token from a GPTConfig, for MFU."""

from __future__ import annotations

from fasttrain.model.config import GPTConfig


def _block_matmul_weights(cfg: GPTConfig) -> int:
    C, F = cfg.d_model, cfg.d_ff
    up_out = 2 * F if cfg.activation == "swiglu" else F
    return C * (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim + cfg.n_head * cfg.head_dim * C + C * up_out + F * C


def _vocab(cfg: GPTConfig) -> int:
    if cfg.vocab_size is None:
        raise ValueError("cfg.vocab_size must be set to count parameters or FLOPs")
    return cfg.vocab_size


def param_count(cfg: GPTConfig, non_embedding: bool = False) -> int:
    """Parameters of GPT(cfg), tied weights counted once; equals `GPT(cfg).num_params(non_embedding)`."""
    C, F, V = cfg.d_model, cfg.d_ff, _vocab(cfg)
    per_block = _block_matmul_weights(cfg)
    if cfg.qkv_bias:
        per_block += (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim
    if cfg.bias:
        up_out = 2 * F if cfg.activation == "swiglu" else F
        per_block += C + up_out + C
    norm = C * (2 if cfg.norm == "layernorm" and cfg.bias else 1)  # weight, plus bias for a biased LayerNorm
    n = cfg.n_layer * (per_block + 2 * norm) + norm + (0 if cfg.tie_embeddings else V * C)
    if not non_embedding:
        n += V * C + (cfg.max_seq_len * C if cfg.positions == "learned" else 0)
    return n


def flops_per_token(cfg: GPTConfig, seq_len: int, training: bool = True) -> float:
    """Matmul FLOPs per token: 2 per weight of every matmul (blocks and output head) plus causal attention.

    Attention scores and weighted values cost 4 * T * H * D per token per layer, halved because causal attention
    only computes the lower triangle (the convention of docs/benchmarks.md). Training counts forward + backward as
    3x forward. Embedding lookups, norms and softmax are not counted.
    """
    matmul_weights = cfg.n_layer * _block_matmul_weights(cfg) + cfg.d_model * _vocab(cfg)
    attention = cfg.n_layer * 2 * seq_len * cfg.n_head * cfg.head_dim
    forward = 2 * matmul_weights + attention
    return float(3 * forward if training else forward)
