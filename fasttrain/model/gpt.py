"""A decoder-only GPT built on fasttrain.ops: pre-norm blocks of causal GQA attention and an MLP.

The residual stream is carried beside the last branch's output rather than summed at the end of each block, so that
each add lands inside the norm that follows it (fasttrain.ops.add_layer_norm: one pass instead of an add and a norm,
as flash-attn's and Liger's fused add + norm): block i maps (branch, stream) to (branch, stream), and the final norm
takes the last pair. The sums are the ones `x = x + branch` makes, in the same order.

Generation plugs in through `cache` (see `GPT.forward`); nothing about caches lives here beyond that hand-off.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from fasttrain.model.config import GPTConfig
from fasttrain.model.norms import LayerNorm, RMSNorm
from fasttrain.model.rotary import rotary_tables
from fasttrain.ops import (
    apply_rotary_emb,
    cross_entropy,
    flash_attn_func,
    flash_attn_varlen_func,
    gelu,
    linear_cross_entropy,
)


def _norm(cfg: GPTConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    return LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim, bias=cfg.qkv_bias)
        self.proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.d_model, bias=cfg.bias)
        self.proj.residual_out = True  # scaled by 1/sqrt(2 n_layer) under the gpt2 init
        self.dropout = cfg.dropout
        # flash-attn's (left, right): a window of w keys is the query and the w - 1 before it.
        window = cfg.window(layer_idx)
        self.window_size = (-1, -1) if window is None else (window - 1, 0)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None, cache=None, segments=None
    ) -> torch.Tensor:
        B, T, _ = x.shape
        qkv = self.qkv(x).view(B, T, self.n_head + 2 * self.n_kv_head, self.head_dim)  # (B, T, H + 2 Hkv, D)
        q, k, v = qkv.split([self.n_head, self.n_kv_head, self.n_kv_head], dim=2)  # (B, T, H|Hkv, D)
        if cos is not None:
            q, k = apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)
        if segments is not None:
            cu_seqlens, max_len = segments
            y = flash_attn_varlen_func(
                q.reshape(B * T, self.n_head, self.head_dim),  # (B*T, H, D): the rows' segments end to end
                k.reshape(B * T, self.n_kv_head, self.head_dim),
                v.reshape(B * T, self.n_kv_head, self.head_dim),
                cu_seqlens,
                cu_seqlens,
                max_len,
                max_len,
                dropout_p=self.dropout if self.training else 0.0,
                causal=True,
                window_size=self.window_size,
            )
        elif cache is not None:
            # Only a windowed layer passes window_size, so a cache for full attention needs no such argument.
            window = {} if self.window_size == (-1, -1) else {"window_size": self.window_size}
            y = cache.attend(self.layer_idx, q, k, v, **window)  # (B, T, H, D)
        else:
            y = flash_attn_func(
                q, k, v, dropout_p=self.dropout if self.training else 0.0, causal=True, window_size=self.window_size
            )
        return self.proj(y.reshape(B, T, self.n_head * self.head_dim))  # (B, T, C)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.gated = cfg.activation == "swiglu"
        # One matrix for gate and up when gated: a single (C, 2F) matmul instead of two (C, F) ones.
        self.up = nn.Linear(cfg.d_model, (2 if self.gated else 1) * cfg.d_ff, bias=cfg.bias)
        self.down = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)
        self.down.residual_out = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)  # (B, T, F) or (B, T, 2F)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)  # (B, T, F) each
            h = F.silu(gate) * up
        else:
            h = gelu(h, approximate="tanh")
        return self.down(h)


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, layer_idx: int):
        super().__init__()
        self.norm1, self.norm2 = _norm(cfg), _norm(cfg)
        self.attn = CausalSelfAttention(cfg, layer_idx)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, residual, cos, sin, cache=None, segments=None):
        """x: the previous block's MLP output (the embeddings in the first block), residual: the stream it adds to
        (None in the first block) -> this block's MLP output and the stream it adds to, both (B, T, C)."""
        h, residual = add_norm(self.norm1, x, residual)
        h, residual = self.norm2(self.drop(self.attn(h, cos, sin, cache, segments)), residual)
        return self.drop(self.mlp(h)), residual


def add_norm(norm: nn.Module, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(x + residual), x + residual), or (norm(x), x) for the first block, where the stream begins at x."""
    if residual is None:
        return norm(x), x
    return norm(x, residual)


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        if not isinstance(config, GPTConfig):
            raise TypeError(f"config must be a GPTConfig, got {type(config).__name__}")
        if config.vocab_size is None:
            raise ValueError("config.vocab_size must be set (the trainer takes it from the tokenizer)")
        self.config = cfg = config
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.positions == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm_f = _norm(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        if cfg.positions == "rotary":
            cos, sin = _rotary_tables(cfg)
            # Not saved in checkpoints: rebuilt from the config, and kept fp32 through `.to(dtype)` (see _apply).
            self.register_buffer("rope_cos", cos, persistent=False)  # (max_seq_len, D/2)
            self.register_buffer("rope_sin", sin, persistent=False)
        else:
            self.rope_cos = self.rope_sin = None
        self.register_load_state_dict_pre_hook(GPT._before_load)
        self.register_load_state_dict_post_hook(GPT._after_load)
        self.reset_parameters()

    def _rebuild_rope_tables(self, device) -> None:
        self.rope_cos, self.rope_sin = _rotary_tables(self.config, device)

    def _apply(self, fn, recurse=True):
        # to_empty() off the meta device gives each module a Parameter of its own, untying a tied head.
        tied = self.lm_head.weight is self.wte.weight
        super()._apply(fn, recurse)
        if tied and self.lm_head.weight is not self.wte.weight:
            self.lm_head.weight = self.wte.weight
        # nn.Module.to(dtype) / .half() cast every floating buffer too; bf16 tables are off by up to 4e-3 (one bf16
        # ulp of values near 1), so rebuild them in fp32 on their new device from the config instead.
        if self.rope_cos is not None and self.rope_cos.dtype != torch.float32:
            self._rebuild_rope_tables(self.rope_cos.device)
        return self

    @staticmethod
    def _before_load(self, *args) -> None:
        self._tied_before_load = self.lm_head.weight is self.wte.weight

    @staticmethod
    def _after_load(self, incompatible_keys) -> None:
        # A model built on the meta device and loaded with assign=True (FSDP2's and big models' way) gets each
        # state-dict tensor as its own Parameter, untying a tied head from the embedding; a head the user untied
        # stays untied. The rope tables are not in the state dict: after to_empty() (or on meta) they hold nothing,
        # so they are rebuilt from the config on the weights' device (a few KB).
        if self._tied_before_load and self.lm_head.weight is not self.wte.weight:
            self.lm_head.weight = self.wte.weight
        if self.rope_cos is not None:
            self._rebuild_rope_tables(self.wte.weight.device)

    def reset_parameters(self) -> None:
        """Initialise every weight by `config.init`; biases to zero, norm weights to one; the rope tables rebuilt
        (after `to_empty()` from the meta device they hold whatever the memory held)."""
        cfg = self.config
        if self.rope_cos is not None:
            self._rebuild_rope_tables(self.rope_cos.device)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                if module is self.lm_head and cfg.tie_embeddings:
                    continue
                _init_matrix(module.weight, cfg, getattr(module, "residual_out", False))
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                # Embeddings are lookups, not fan-in products, so every scheme draws them at GPT-2's 0.02; tied
                # embeddings keep that scale as the output head too.
                nn.init.normal_(module.weight, std=0.02)
            elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
                module.reset_parameters()

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        cache=None,
        positions: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        return_logits: bool | None = None,
    ):
        """idx (B, T) long -> (logits (B, T, V) or None, mean cross-entropy against targets (B, T) or None).

        With targets, the lm_head and the loss run fused (fasttrain.ops.linear_cross_entropy: the (B, T, V) logits are
        never held) and the logits returned are None, unless return_logits=True asks for them (then the loss is taken
        from them); without targets the logits are returned. Targets equal to -100 are ignored by the loss.

        Packed examples: with cu_seqlens ((N + 1,) int32 offsets into the B*T tokens laid end to end, no example
        crossing a row) each example attends only to itself, and positions (B, T) long give each token its place in
        its example (rotary angles, learned positions), as flash-attn's varlen interface takes them.

        With a cache, token t of sequence b sits at position `cache.positions(T)[b, t]` and attention layer i uses
        `cache.attend(i, q, k, v)` (q (B, T, H, D), k/v (B, T, Hkv, D) after rotary) instead of its own; a layer with
        a sliding window also passes window_size=(left, 0) as flash-attn's.
        """
        if idx.dim() != 2 or idx.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"idx must be a (B, T) integer tensor, got {tuple(idx.shape)} {idx.dtype}")
        B, T = idx.shape
        if cache is None and self.config.max_seq_len < T:
            raise ValueError(f"sequence length {T} exceeds max_seq_len {self.config.max_seq_len}")
        if (positions is None) != (cu_seqlens is None) or (cu_seqlens is not None and cache is not None):
            raise ValueError("positions and cu_seqlens go together, and not with a cache")
        if positions is not None and positions.shape != idx.shape:
            raise ValueError(f"positions must be (B, T) = {tuple(idx.shape)}, got {tuple(positions.shape)}")
        pos = cache.positions(T) if cache is not None else positions  # (B, T) long, or None: 0..T-1 for every row
        # The longest example bounds the varlen launch; read once here, not in every layer.
        segments = None if cu_seqlens is None else (cu_seqlens, int((cu_seqlens[1:] - cu_seqlens[:-1]).max()))
        x = self.wte(idx)  # (B, T, C)
        if self.wpe is not None:
            x = x + self.wpe(pos if pos is not None else torch.arange(T, device=idx.device))
        cos = sin = None
        if self.rope_cos is not None:
            cos, sin = (
                (self.rope_cos[pos], self.rope_sin[pos]) if pos is not None else (self.rope_cos[:T], self.rope_sin[:T])
            )
        x, residual = self.drop(x), None
        for block in self.blocks:
            x, residual = block(x, residual, cos, sin, cache, segments)
        x = add_norm(self.norm_f, x, residual)[0]  # (B, T, C)
        # Fused only for a plain nn.Linear head: a wrapped one (LoRA on lm_head) computes more than x @ W.T.
        if targets is not None and not return_logits and type(self.lm_head) is nn.Linear:
            # (B*T, C) and the head (V, C) against (B*T,): the loss is fp32 whatever the autocast dtype.
            loss = linear_cross_entropy(x.reshape(B * T, -1), self.lm_head.weight, targets.reshape(B * T))
            return None, loss
        logits = self.lm_head(x)  # (B, T, V)
        if targets is None:
            return logits, None
        # (B*T, V) against (B*T,); the loss and the softmax inside it are fp32 whatever the autocast dtype.
        loss = cross_entropy(logits.view(B * T, -1), targets.reshape(B * T), ignore_index=-100)
        return logits, loss

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters counted once (tied weights once); non_embedding leaves out the token and position tables."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.wte.weight.numel() + (self.wpe.weight.numel() if self.wpe is not None else 0)
        return n


def _rotary_tables(cfg: GPTConfig, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    llama3 = None
    if cfg.rope_scaling == "llama3":
        llama3 = (cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor, cfg.rope_original_max_seq_len)
    return rotary_tables(cfg.max_seq_len, cfg.head_dim, cfg.rope_theta, device=device, llama3=llama3)


def _init_matrix(weight: torch.Tensor, cfg: GPTConfig, residual_out: bool) -> None:
    if cfg.init == "gpt2":
        # Each block adds two branches to the residual stream; 1/sqrt(2 L) keeps its variance flat in depth.
        std = 0.02 / math.sqrt(2 * cfg.n_layer) if residual_out else 0.02
        nn.init.normal_(weight, std=std)
    elif cfg.init == "xavier":
        nn.init.xavier_normal_(weight)
    else:
        nn.init.kaiming_normal_(weight, mode="fan_in", nonlinearity="relu")
