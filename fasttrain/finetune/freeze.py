"""Freezing: parameters that keep their values (requires_grad False), so they get no gradient and no optimizer
state."""

from __future__ import annotations

import fnmatch
import re

import torch.nn as nn

EMBEDDINGS = "embeddings"
"""The token and position tables (and the output head when it is tied to the token table)."""

_FIRST_BLOCKS = re.compile(r"blocks:(\d+)")


def freeze(model: nn.Module, patterns: list[str]) -> list[str]:
    """Freeze the parameters patterns name -> their names. Each pattern is 'embeddings', 'blocks:N' (the first N
    blocks) or an fnmatch pattern over parameter names ('blocks.0.*', '*.norm1.weight'); one that matches nothing is
    an error naming it."""
    named = dict(model.named_parameters())
    frozen: list[str] = []
    for pattern in patterns:
        first = _FIRST_BLOCKS.fullmatch(pattern)
        if pattern == EMBEDDINGS:
            hits = [n for n in named if n.split(".")[0] in ("wte", "wpe")]
        elif first:
            n_blocks = int(first.group(1))
            hits = [n for n in named if n.startswith("blocks.") and int(n.split(".")[1]) < n_blocks]
            if not 1 <= n_blocks <= len(getattr(model, "blocks", [])):
                raise ValueError(f"finetune.freeze {pattern!r}: N must be in 1..{len(model.blocks)} (the blocks)")
        else:
            hits = [n for n in named if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise ValueError(
                f"finetune.freeze {pattern!r} matches no parameter (give 'embeddings', 'blocks:N', or a pattern "
                f"over names such as {next(iter(named))!r})"
            )
        for n in hits:
            named[n].requires_grad_(False)
        frozen += [n for n in hits if n not in frozen]
    return frozen


def memory(model: nn.Module, optimizer_states: int = 2) -> dict[str, int]:
    """Bytes of the parameters, of their gradients and of AdamW's state (optimizer_states tensors per trainable
    parameter: exp_avg, exp_avg_sq), tied parameters counted once."""
    params = list(model.parameters())  # each shared Parameter once
    trainable = [p for p in params if p.requires_grad]
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    grad_bytes = sum(p.numel() * p.element_size() for p in trainable)
    return {
        "parameters": param_bytes,
        "trainable_parameters": sum(p.numel() for p in trainable),
        "all_parameters": sum(p.numel() for p in params),
        "gradients": grad_bytes,
        "optimizer_state": optimizer_states * sum(p.numel() * 4 if p.is_floating_point() else 0 for p in trainable),
    }
