"""LoRA (Hu et al. 2021) on GPT's Linear layers, with PEFT's semantics and adapter format.

Targets name transformers modules, as PEFT's `target_modules` list does (a module matches a name it equals or ends
with after a dot): `q_proj`, `v_proj` on Llama, `c_attn` on GPT-2. GPT fuses some of those into one Linear (q, k, v
into `qkv`; gate and up into `up`), so a LoRALinear adapts row spans of its weight, one (A, B) pair per transformers
module, and `save_adapter` writes them under PEFT's names so `PeftModel.from_pretrained` on the transformers model
loads them.

The branch costs two skinny matmuls: x (T, K) @ A^T (K, n r) for every adapted span at once, then that (T, n r) @ B^T
(n r, N) accumulated into the base output by addmm (beta 1, alpha = lora_alpha / r), so the adds and the scaling
ride on the matmul rather than on passes over the (T, N) output. The frozen base weight gets no gradient, which saves
the base layer's weight-gradient matmul in backward (benchmarks/bench_lora.py measures both).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from fasttrain.integrations.hf_checkpoint import CheckpointError, family_for, hf_linears, write_folder
from fasttrain.model import GPT

PEFT_DEFAULT_TARGETS = {"gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"]}
PEFT_DEFAULT_TARGETS["qwen2"] = PEFT_DEFAULT_TARGETS["llama"]
"""PEFT's target_modules when none are given, per model type (peft.utils.constants)."""

ALL_LINEAR = "all-linear"
"""PEFT's shorthand for every linear layer but the output head."""


class LoRALinear(nn.Linear):
    """nn.Linear (same weight, bias and state-dict keys) plus low-rank updates on row spans of its weight:
    rows [start_i, stop_i) of the output gain scaling * B_i A_i dropout(x), with A_i (r, K), B_i (stop_i - start_i, r).
    """

    def __init__(self, base: nn.Linear, spans: list[tuple[int, int]], rank: int, alpha: float, dropout: float):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.spans, self.rank, self.scaling = spans, rank, alpha / rank
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.ParameterList(nn.Parameter(torch.empty(rank, self.in_features, **kw)) for _ in spans)
        self.lora_B = nn.ParameterList(nn.Parameter(torch.empty(stop - start, rank, **kw)) for start, stop in spans)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """PEFT's default init: A as nn.Linear's (Kaiming uniform, a = sqrt(5)), B zero, so training starts at the
        base model."""
        for a, b in zip(self.lora_A, self.lora_B):
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            nn.init.zeros_(b)

    def _a(self) -> torch.Tensor:
        """Every span's A stacked: (n r, K)."""
        return self.lora_A[0] if len(self.lora_A) == 1 else torch.cat(list(self.lora_A))

    def _b(self) -> torch.Tensor:
        """(N, n r): B_i in rows span_i and columns i r .. (i + 1) r, zero elsewhere."""
        n, r = len(self.spans), self.rank
        if n == 1 and self.spans[0] == (0, self.out_features):
            return self.lora_B[0]
        blocks, row = [], 0
        for i, ((start, stop), b) in enumerate(zip(self.spans, self.lora_B)):
            if start > row:
                blocks.append(b.new_zeros(start - row, n * r))
            blocks.append(F.pad(b, (i * r, (n - 1 - i) * r)))
            row = stop
        if row < self.out_features:
            blocks.append(self.lora_B[0].new_zeros(self.out_features - row, n * r))
        return torch.cat(blocks)

    def delta_weight(self) -> torch.Tensor:
        """scaling * B A: what merging adds to the weight, (N, K)."""
        return self.scaling * (self._b() @ self._a())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)  # (..., N)
        xa = F.linear(self.lora_dropout(x), self._a())  # (..., n r)
        out = torch.addmm(
            y.reshape(-1, self.out_features), xa.reshape(-1, xa.shape[-1]), self._b().t(), alpha=self.scaling
        )
        return out.view(y.shape)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, spans={self.spans}, scaling={self.scaling:g}"


@dataclass
class LoRASpec:
    """What apply_lora did, as PEFT's LoraConfig says it."""

    rank: int
    alpha: float
    dropout: float
    targets: list[str]
    family: str
    modules: dict[str, list[str]]
    """Our module name -> the transformers modules adapted in it, in span order."""


def _matches(name: str, targets: list[str]) -> bool:
    """PEFT's rule for a target_modules list: the name itself, or ending in '.' + a target."""
    return any(name == t or name.endswith("." + t) for t in targets)


def apply_lora(model: GPT, rank: int, alpha: float = 8.0, dropout: float = 0.0, targets: list[str] | None = None):
    """Freeze every parameter of model and give the Linear layers whose transformers modules match targets
    (PEFT's default for the family when None or empty; 'all-linear' for every one but the output head) a LoRA
    update; -> LoRASpec. A target list that matches nothing is an error listing the modules there are."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"finetune.lora_rank must be a positive int, got {rank!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"finetune.lora_dropout must be in [0, 1), got {dropout}")
    try:
        family = family_for(model.config)
    except CheckpointError as e:
        raise ValueError(f"LoRA names its targets as a transformers family does; {e}") from None
    targets = list(targets or PEFT_DEFAULT_TARGETS[family])
    linears = hf_linears(model.config)
    chosen: dict[str, list[tuple[str, int, int]]] = {}
    for ours, spans in linears.items():
        module = model.get_submodule(ours)
        for hf_name, start, stop in spans:
            hit = hf_name != "lm_head" if targets == [ALL_LINEAR] else _matches(hf_name, targets)
            if hit:
                chosen.setdefault(ours, []).append((hf_name, start, module.out_features if stop is None else stop))
    if not chosen:
        names = sorted({name.rsplit(".", 1)[-1] for spans in linears.values() for name, _, _ in spans})
        raise ValueError(
            f"finetune.lora_targets {targets} match no module of this {family} model (its linear modules: "
            f"{', '.join(names)}; or {ALL_LINEAR})"
        )
    for p in model.parameters():
        p.requires_grad_(False)
    for ours, spans in chosen.items():
        parent_name, _, child = ours.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, child)
        lora = LoRALinear(base, [(a, b) for _, a, b in spans], rank, alpha, dropout)
        if hasattr(base, "residual_out"):
            lora.residual_out = base.residual_out
        setattr(parent, child, lora)
    return LoRASpec(rank, alpha, dropout, targets, family, {k: [n for n, _, _ in v] for k, v in chosen.items()})


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


@torch.no_grad()
def merge_lora(model: GPT) -> GPT:
    """model with every LoRALinear replaced by a plain nn.Linear whose weight holds W + scaling B A (in place)."""
    for name, lora in lora_modules(model).items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        merged = nn.Linear(lora.in_features, lora.out_features, bias=lora.bias is not None, device="meta")
        merged.weight = nn.Parameter(lora.weight + lora.delta_weight().to(lora.weight.dtype))
        if lora.bias is not None:
            merged.bias = lora.bias
        if hasattr(lora, "residual_out"):
            merged.residual_out = lora.residual_out
        setattr(parent, child, merged)
    return model


def adapter_tensors(model: GPT, spec: LoRASpec) -> dict[str, torch.Tensor]:
    """PEFT's adapter_model.safetensors keys and tensors: base_model.model.<module>.lora_{A,B}.weight."""
    out = {}
    for ours, lora in lora_modules(model).items():
        for hf_name, a, b in zip(spec.modules[ours], lora.lora_A, lora.lora_B):
            out[f"base_model.model.{hf_name}.lora_A.weight"] = a.detach().contiguous().clone().cpu()
            out[f"base_model.model.{hf_name}.lora_B.weight"] = b.detach().contiguous().clone().cpu()
    return out


def adapter_config(spec: LoRASpec, base_model: str | None = None) -> dict:
    """PEFT's adapter_config.json for spec (LoraConfig's fields; the rest at PEFT's defaults)."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout,
        "target_modules": ALL_LINEAR if spec.targets == [ALL_LINEAR] else spec.targets,
        "bias": "none",
        # GPT-2's Conv1D stores (in, out): PEFT's flag for that layout (the adapter tensors are the same).
        "fan_in_fan_out": spec.family == "gpt2",
        "init_lora_weights": True,
        "use_rslora": False,
        "inference_mode": True,
        "base_model_name_or_path": base_model,
    }


def save_adapter(model: GPT, spec: LoRASpec, path: str | Path, base_model: str | None = None, force: bool = False):
    """Write adapter_config.json and adapter_model.safetensors to folder path, through write_folder (an error
    leaves nothing; a non-empty path is refused unless force)."""
    from safetensors.torch import save_file

    config, tensors = adapter_config(spec, base_model), adapter_tensors(model, spec)

    def write(folder: Path) -> None:
        (folder / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})

    return write_folder(path, write, force)
