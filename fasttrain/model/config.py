"""GPTConfig: the shape and the choices of the decoder-only transformer."""

from __future__ import annotations

import math
from dataclasses import dataclass

NORMS = ("layernorm", "rmsnorm")
POSITIONS = ("learned", "rotary")
ACTIVATIONS = ("gelu", "swiglu")
INITS = ("gpt2", "xavier", "he")
ROPE_SCALINGS = (None, "llama3")


@dataclass
class GPTConfig:
    """The model's shape. n_kv_head, head_dim and d_ff given as None are resolved here, as HF configs resolve theirs,
    so `dataclasses.replace(cfg, n_head=...)` keeps the resolved values: pass n_kv_head=None (head_dim=None,
    d_ff=None) with it to derive them again (the trainer's config.build does)."""

    n_layer: int = 12
    """Number of transformer blocks."""
    n_head: int = 12
    """Query heads per attention layer; head_dim = d_model // n_head."""
    n_kv_head: int | None = None
    """Key/value heads (grouped-query attention); must divide n_head. None: n_head (multi-head attention)."""
    d_model: int = 768
    """Width of the residual stream."""
    head_dim: int | None = None
    """Width of one attention head. None: d_model // n_head (which must then divide evenly)."""
    d_ff: int | None = None
    """Hidden width of the MLP. None: 4 * d_model for gelu, 8/3 * d_model rounded up to a multiple of 64 for swiglu."""
    vocab_size: int | None = None
    """Vocabulary size. None: taken from the tokenizer by the trainer (rounded up to a multiple of 64)."""
    max_seq_len: int = 1024
    """Longest sequence the model accepts (size of the position table / rotary cache)."""
    dropout: float = 0.0
    """Dropout on attention probabilities, after the embeddings and on each residual branch."""
    norm: str = "layernorm"
    """'layernorm' or 'rmsnorm' (pre-norm in every block, plus one before the output head)."""
    positions: str = "rotary"
    """'learned' (an absolute position table added to the embeddings) or 'rotary' (RoPE on q and k)."""
    rope_theta: float = 10000.0
    """Base of the rotary frequencies."""
    rope_scaling: str | None = None
    """None, or 'llama3': Llama 3.1's frequency rescaling (wavelengths above original_max/low_freq_factor divided
    by rope_factor, below original_max/high_freq_factor kept, smoothly blended between)."""
    rope_factor: float = 8.0
    """llama3 rope scaling: the factor long wavelengths are stretched by."""
    rope_low_freq_factor: float = 1.0
    """llama3 rope scaling: low_freq_factor."""
    rope_high_freq_factor: float = 4.0
    """llama3 rope scaling: high_freq_factor."""
    rope_original_max_seq_len: int = 8192
    """llama3 rope scaling: the context length the model was pretrained at (original_max_position_embeddings)."""
    sliding_window: int | None = None
    """Attention window: a query sees the last sliding_window keys, itself included (Mistral's and Qwen2's
    semantics). None: the whole causal prefix."""
    full_attention_layers: int = 0
    """With a sliding_window, the first this many blocks still attend to the whole prefix (Qwen2's
    max_window_layers)."""
    activation: str = "gelu"
    """'gelu' (Linear-GELU-Linear) or 'swiglu' (gated: down(silu(gate(x)) * up(x)))."""
    bias: bool = False
    """Biases in the Linear layers and LayerNorms."""
    qkv_bias: bool | None = None
    """Biases on the query/key/value projection alone (Qwen2 has them, without the others). None: `bias`."""
    norm_eps: float | None = None
    """Epsilon of every norm. None: 1e-5 for layernorm, 1e-6 for rmsnorm."""
    tie_embeddings: bool = True
    """Share the token embedding matrix with the output head."""
    init: str = "gpt2"
    """'gpt2' (normal std 0.02, residual projections scaled by 1/sqrt(2 n_layer)), 'xavier' (Glorot normal), 'he'
    (Kaiming normal, fan-in)."""

    def __post_init__(self) -> None:
        for name in ("n_layer", "n_head", "d_model", "max_seq_len"):
            _positive_int(name, getattr(self, name))
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        _positive_int("n_kv_head", self.n_kv_head)
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_kv_head ({self.n_kv_head}) must divide n_head ({self.n_head})")
        if self.head_dim is None:
            if self.d_model % self.n_head:
                raise ValueError(f"n_head ({self.n_head}) must divide d_model ({self.d_model})")
            self.head_dim = self.d_model // self.n_head
        _positive_int("head_dim", self.head_dim)
        if self.qkv_bias is None:
            self.qkv_bias = self.bias
        if self.norm_eps is None:
            self.norm_eps = 1e-6 if self.norm == "rmsnorm" else 1e-5
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps must be > 0, got {self.norm_eps}")
        if self.d_ff is None:
            # SwiGLU has three matrices instead of two: 8/3 * d keeps the MLP's parameters at ~8 d^2 (Shazeer 2020).
            self.d_ff = 4 * self.d_model if self.activation == "gelu" else -(-8 * self.d_model // 3 // 64) * 64
        _positive_int("d_ff", self.d_ff)
        if self.vocab_size is not None:
            _positive_int("vocab_size", self.vocab_size)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        for name, allowed in (("norm", NORMS), ("positions", POSITIONS), ("activation", ACTIVATIONS), ("init", INITS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.positions == "rotary" and self.head_dim % 2:
            raise ValueError(f"rotary positions need an even head_dim, got d_model/n_head = {self.head_dim}")
        if not 0 < self.rope_theta < math.inf:
            raise ValueError(f"rope_theta must be finite and > 0, got {self.rope_theta}")
        if self.rope_scaling not in ROPE_SCALINGS:
            raise ValueError(f"rope_scaling must be one of {ROPE_SCALINGS}, got {self.rope_scaling!r}")
        if self.rope_scaling is not None:
            if self.positions != "rotary":
                raise ValueError(f"rope_scaling {self.rope_scaling!r} needs positions 'rotary'")
            if not (self.rope_factor > 0 and 0 < self.rope_low_freq_factor < self.rope_high_freq_factor):
                raise ValueError(
                    "llama3 rope scaling needs rope_factor > 0 and 0 < rope_low_freq_factor < rope_high_freq_factor, "
                    f"got {self.rope_factor}, {self.rope_low_freq_factor}, {self.rope_high_freq_factor}"
                )
            _positive_int("rope_original_max_seq_len", self.rope_original_max_seq_len)
        if self.sliding_window is not None:
            _positive_int("sliding_window", self.sliding_window)
        if isinstance(self.full_attention_layers, bool) or not isinstance(self.full_attention_layers, int):
            raise ValueError(f"full_attention_layers must be an int >= 0, got {self.full_attention_layers!r}")
        if self.full_attention_layers < 0:
            raise ValueError(f"full_attention_layers must be >= 0, got {self.full_attention_layers}")

    def window(self, layer_idx: int) -> int | None:
        """The attention window of block layer_idx: sliding_window, or None where the block attends fully."""
        return self.sliding_window if layer_idx >= self.full_attention_layers else None


def _positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
