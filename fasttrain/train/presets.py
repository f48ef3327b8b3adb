"""Presets are functions returning a RunConfig; `fasttrain train --preset NAME`, then overrides on top."""

from __future__ import annotations

import torch

from fasttrain.data import DataConfig
from fasttrain.model import GPTConfig
from fasttrain.train.config import OptimConfig, RunConfig, TrainConfig


def tiny() -> RunConfig:
    """CPU-sized: byte-level GPT on a few MB of the Python standard library; loss falls within minutes on 2 cores."""
    return RunConfig(
        model=GPTConfig(n_layer=4, n_head=4, d_model=128, max_seq_len=128),
        optim=OptimConfig(lr=2e-3, warmup_steps=30),
        train=TrainConfig(
            steps=400,
            batch_size=16,
            seq_len=128,
            eval_interval=50,
            eval_batches=8,
            checkpoint_interval=200,
            log_interval=10,
            precision="fp32",
        ),
        data=DataConfig(max_bytes=4 << 20),
    )


def gpt2_small() -> RunConfig:
    """GPT-2 small's shape (12 x 768, 12 heads, T 1024) in bf16 on a GPU: 491,520 tokens per step."""
    return RunConfig(
        model=GPTConfig(n_layer=12, n_head=12, d_model=768, max_seq_len=1024),
        optim=OptimConfig(lr=6e-4, warmup_steps=200),
        train=TrainConfig(
            steps=5000,
            batch_size=32,
            grad_accum=15,
            seq_len=1024,
            eval_interval=250,
            eval_batches=20,
            checkpoint_interval=1000,
            precision="bf16",
        ),
        data=DataConfig(),
    )


def gpu_default() -> RunConfig:
    """The no-argument run on a GPU: GPT-2 small's shape in bf16 over the whole standard library, T 512."""
    cfg = gpt2_small()
    cfg.optim.warmup_steps = 100
    cfg.train = TrainConfig(
        steps=1500,
        batch_size=32,
        seq_len=512,
        eval_interval=250,
        eval_batches=20,
        checkpoint_interval=500,
        log_interval=20,
        precision="bf16",
    )
    return cfg


def default() -> RunConfig:
    """What `fasttrain train` runs with no arguments: gpu_default on a CUDA machine, tiny elsewhere."""
    return gpu_default() if torch.cuda.is_available() else tiny()


PRESETS = {"default": default, "tiny": tiny, "gpt2-small": gpt2_small, "gpu-default": gpu_default}
