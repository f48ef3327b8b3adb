"""fasttrain's GPT as a stock PyTorch script writes it: the baseline of bench_step's eager rows.

Same modules, parameter names and order as fasttrain.model.GPT, so it loads a GPT's state_dict and takes the same
optimizer groups; every op is torch's own: F.scaled_dot_product_attention, nn.LayerNorm / nn.RMSNorm after a plain
residual add, F.gelu, rotary by slicing in fp32, and F.cross_entropy on fp32 logits (what a careful script does under
autocast).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from fasttrain.model import GPTConfig
from fasttrain.model.rotary import rotary_tables


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, T, H, D) rotated by the half-split pairs (i, i + D/2) at angles with cos/sin (T, D/2), in fp32."""
    x1, x2 = x.float().chunk(2, dim=-1)  # (B, T, H, D/2) each
    cos, sin = cos[:, None], sin[:, None]  # (T, 1, D/2): broadcast over heads
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def _norm(cfg: GPTConfig) -> nn.Module:
    return nn.RMSNorm(cfg.d_model, eps=1e-6) if cfg.norm == "rmsnorm" else nn.LayerNorm(cfg.d_model, bias=cfg.bias)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig, math_attention: bool):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.dropout, self.math_attention = cfg.dropout, math_attention

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        qkv = self.qkv(x).view(B, T, self.n_head + 2 * self.n_kv_head, self.head_dim)  # (B, T, H + 2 Hkv, D)
        q, k, v = qkv.split([self.n_head, self.n_kv_head, self.n_kv_head], dim=2)  # (B, T, H|Hkv, D)
        if cos is not None:
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H|Hkv, T, D)
        with sdpa_kernel(SDPBackend.MATH) if self.math_attention else contextlib.nullcontext():
            y = F.scaled_dot_product_attention(
                q,
                k,
                v,
                dropout_p=self.dropout if self.training else 0.0,
                is_causal=True,
                enable_gqa=self.n_kv_head != self.n_head,
            )
        return self.proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))  # (B, T, C)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.gated = cfg.activation == "swiglu"
        self.up = nn.Linear(cfg.d_model, (2 if self.gated else 1) * cfg.d_ff, bias=cfg.bias)
        self.down = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)

    def forward(self, x):
        h = self.up(x)  # (B, T, F) or (B, T, 2F)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            return self.down(F.silu(gate) * up)
        return self.down(F.gelu(h, approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, math_attention: bool):
        super().__init__()
        self.norm1, self.norm2 = _norm(cfg), _norm(cfg)
        self.attn = CausalSelfAttention(cfg, math_attention)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, cos, sin):
        x = x + self.drop(self.attn(self.norm1(x), cos, sin))
        return x + self.drop(self.mlp(self.norm2(x)))


class EagerGPT(nn.Module):
    """math_attention: SDPA's math path (the score matrix materialized), else SDPA's default backend."""

    def __init__(self, cfg: GPTConfig, math_attention: bool = False):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.positions == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, math_attention) for _ in range(cfg.n_layer))
        self.norm_f = _norm(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        tables = rotary_tables(cfg.max_seq_len, cfg.head_dim, cfg.rope_theta) if cfg.positions == "rotary" else None
        self.register_buffer("rope_cos", None if tables is None else tables[0], persistent=False)  # (T, D/2)
        self.register_buffer("rope_sin", None if tables is None else tables[1], persistent=False)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        B, T = idx.shape
        x = self.wte(idx)  # (B, T, C)
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(T, device=idx.device))
        cos, sin = (self.rope_cos[:T], self.rope_sin[:T]) if self.rope_cos is not None else (None, None)
        x = self.drop(x)
        for block in self.blocks:
            x = block(x, cos, sin)
        logits = self.lm_head(self.norm_f(x))  # (B, T, V)
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.float().view(B * T, -1), targets.reshape(B * T), ignore_index=-100)
