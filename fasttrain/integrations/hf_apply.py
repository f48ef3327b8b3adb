"""`apply(model)`: fasttrain's kernels patched into a Hugging Face causal LM, as Liger Kernel's apply functions do.

    from fasttrain.integrations.hf import apply
    model = AutoModelForCausalLM.from_pretrained(name)
    apply(model)             # attention, norms, rotary, gated MLP, loss; revert(model) undoes it

Every part is found by type and structure, not by model family (the module swaps live in hf_modules.py), and
swapped at the instance level (a module's own `forward`, the model's attention implementation), so that other models
in the process are untouched. The one exception is rotary, which transformers calls as a module-level function of the
modeling file: it is swapped there, counted across the models that use it and restored when the last is reverted, so
while one model of a family is patched every model of that family in the process rotates on fasttrain's kernel (the
same rotation, to rounding). transformers' own replacement hook for it (`use_kernel_forward_from_hub`) loads kernels
from the Hub through the `kernels` package, not a local function. Before a part is swapped, its original is run once
on a random probe and compared with the replacement's formula: what does not match stays as it is.

- attention: `model.set_attn_implementation("fasttrain")` (fasttrain.integrations.hf), Gemma 2's attention-logit
  softcapping included (the kernels' softcap).
- norms: RMSNorm-like leaf modules (a weight and `variance_epsilon` or `eps`; Gemma's `(1 + weight)` scale found by
  the probe) and `nn.LayerNorm` run fasttrain.ops.rms_norm / layer_norm. The residual add stays outside the norm:
  transformers writes it inside each family's decoder-layer forward, which only a per-family patch could change.
- rotary: the modeling file's `apply_rotary_pos_emb` (rotate_half layout: cos/sin tables of duplicated halves, as
  every transformers rotary embedding builds them) runs fasttrain.ops.apply_rotary_emb.
- mlp: modules with gate_proj, up_proj, down_proj and an act_fn of SiLU or GELU-tanh run
  `down_proj(swiglu(gate_proj(x), up_proj(x)))` (geglu for GELU-tanh); a plain MLP's GELU-tanh activation module
  (GPT-2's) runs fasttrain.ops.gelu.
- loss: the causal LM's forward, when it trains with labels (or skip_logits=True), runs the base model and then
  fasttrain.ops.linear_cross_entropy on the last hidden states, with transformers' ForCausalLMLoss semantics (labels
  shifted inside, ignore_index -100, `shift_labels`, `num_items_in_batch`: a sum divided by it) and the model's
  `final_logit_softcapping`; the (B, T, V) logits are never formed and `logits` is None. In eval mode, without
  labels or with skip_logits=False the original forward runs and returns its logits.

state_dict keys and values are unchanged by apply and revert (no module is added or replaced, only forwards).
"""

from __future__ import annotations

import functools
import inspect
import typing
import warnings
from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor, nn

from fasttrain.integrations.hf_modules import (
    HANDLE,
    Patch,
    left_unpatched,
    patch_mlps,
    patch_norms,
    patch_rotary,
    swap_forward,
)
from fasttrain.ops import linear_cross_entropy

__all__ = [
    "Patch",
    "apply",
    "revert",
    "apply_to_gpt2",
    "apply_to_llama",
    "apply_to_mistral",
    "apply_to_qwen2",
    "apply_to_gemma",
    "apply_to_gemma2",
    "apply_to_gemma3",
]

PARTS = ("attention", "norms", "rotary", "mlp", "loss")
# config.model_type -> the name users know; what apply() accepts with strict=True
SUPPORTED = {
    "gpt2": "GPT-2",
    "llama": "Llama",
    "mistral": "Mistral",
    "qwen2": "Qwen2",
    "gemma": "Gemma",
    "gemma2": "Gemma 2",
    "gemma3_text": "Gemma 3 (text)",
}


# ---- loss: the causal LM's forward without logits in training -------------------------------------------------------


def _output_class(original: Callable):
    from transformers.modeling_outputs import CausalLMOutputWithPast
    from transformers.utils import ModelOutput

    try:
        cls = typing.get_type_hints(original).get("return")
    except Exception:  # an annotation that does not resolve: the common class
        cls = None
    return cls if isinstance(cls, type) and issubclass(cls, ModelOutput) else CausalLMOutputWithPast


def _loss_forward(original: Callable, unbound: Callable) -> Callable:
    """The causal LM's forward: with labels and no logits wanted, base model + linear_cross_entropy (module
    docstring); otherwise `original` (the model's bound forward). `unbound`: its class's forward function."""
    params = inspect.signature(original).parameters
    positional = [n for n, p in params.items() if p.kind == p.POSITIONAL_OR_KEYWORD]
    output_class = _output_class(original)

    def forward(self, *args, skip_logits: bool | None = None, **kwargs):
        kwargs.update(zip(positional, args))
        labels = kwargs.get("labels")
        if skip_logits is None:
            skip_logits = self.training and labels is not None
        keep = kwargs.get("logits_to_keep", 0)  # an int, or a tensor of positions
        plain = isinstance(keep, int) and keep == 0 and kwargs.get("return_dict") is not False
        if labels is None or not skip_logits or not plain:
            return original(**kwargs)
        kwargs.pop("labels")
        kwargs.pop("logits_to_keep", None)
        outputs = self.base_model(**kwargs)
        hidden = outputs[0]  # (B, T, K): what the LM head would project
        head = self.get_output_embeddings()
        ignore_index = kwargs.get("ignore_index", -100)
        shift_labels = kwargs.get("shift_labels")
        if shift_labels is None:  # tokens < n predict n; the last position predicts nothing
            shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
        num_items = kwargs.get("num_items_in_batch")
        loss = linear_cross_entropy(
            hidden.reshape(-1, hidden.shape[-1]),  # (B * T, K)
            head.weight,
            shift_labels.reshape(-1).to(hidden.device),
            head.bias,
            ignore_index=ignore_index,
            reduction="sum" if num_items is not None else "mean",
            softcap=getattr(self.config, "final_logit_softcapping", None),
        )
        if num_items is not None:
            loss = loss / (num_items.to(loss.device) if isinstance(num_items, Tensor) else num_items)
        fields = {
            f: getattr(outputs, f, None) for f in output_class.__dataclass_fields__ if f not in ("loss", "logits")
        }
        return output_class(loss=loss, logits=None, **fields)

    # The class's forward as what inspect reports, so that the bound method has the original's signature (Trainer
    # reads it for the dataset columns to keep and for **kwargs, to pass num_items_in_batch).
    functools.update_wrapper(forward, unbound)
    return forward


def _patch_loss(patch: Patch, model: nn.Module, strict: bool) -> None:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    base = getattr(model, "base_model", model)
    if not isinstance(head, nn.Linear) or base is model:
        return  # not a causal LM with a head: nothing to fuse
    if (getattr(model, "loss_type", None) or "ForCausalLM") != "ForCausalLM":
        left_unpatched(patch, strict, f"{type(model).__name__}: loss {model.loss_type}, not ForCausalLM")
        return
    swap_forward(patch, model, _loss_forward(model.forward, type(model).forward))
    patch.patched["loss"] = [type(model).__name__]


# ---- attention ------------------------------------------------------------------------------------------------------


def _patch_attention(patch: Patch, model: nn.Module, strict: bool) -> None:
    import fasttrain.integrations.hf as hf  # registers attn_implementation="fasttrain"

    config = model.config
    before = config._attn_implementation
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(hf.NAME)
        patch._undo.append(lambda: model.set_attn_implementation(before))
    else:  # a transformers without it: the config is what the attention layers read
        config._attn_implementation = hf.NAME
        patch._undo.append(lambda: setattr(config, "_attn_implementation", before))
    patch.patched["attention"] = [hf.NAME]


# ---- the public functions -------------------------------------------------------------------------------------------


# ---- the public functions -------------------------------------------------------------------------------------------

_PATCHERS = {
    "attention": _patch_attention,
    "norms": patch_norms,
    "rotary": patch_rotary,
    "mlp": patch_mlps,
    "loss": _patch_loss,
}


def apply(
    model: nn.Module,
    *,
    attention: bool = True,
    norms: bool = True,
    rotary: bool = True,
    mlp: bool = True,
    loss: bool = True,
    strict: bool = True,
) -> Patch:
    """Patch fasttrain's kernels into a transformers causal LM (or its base model) in place, as the module docstring
    describes; returns the Patch (also kept on the model for `revert(model)`). Each flag turns one part on or off.

    strict=True: a model whose config.model_type is not one of SUPPORTED, or a module of a kind apply() patches that
    its probe does not confirm, raises ValueError (and nothing stays patched); strict=False patches what it can and
    warns once per module left as it is. A model already patched is left as it is, with a warning, and its Patch
    returned."""
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):  # a PEFT model's forward is not the causal LM's: patch what it wraps
        raise TypeError(
            f"apply: model must be a transformers PreTrainedModel (for a PEFT model, its get_base_model()), "
            f"got {type(model).__name__}"
        )
    for name, flag in (("attention", attention), ("norms", norms), ("rotary", rotary), ("mlp", mlp), ("loss", loss)):
        if not isinstance(flag, bool):
            raise TypeError(f"apply: {name} must be a bool, got {type(flag).__name__}")
    existing = model.__dict__.get(HANDLE)
    if existing is not None:
        warnings.warn("fasttrain apply: the model is already patched; left as it is", RuntimeWarning, stacklevel=2)
        return existing
    model_type = getattr(model.config, "model_type", None)
    if model_type not in SUPPORTED:
        supported = ", ".join(f"{v} ({k!r})" for k, v in SUPPORTED.items())
        if strict:
            raise ValueError(f"apply: model_type {model_type!r} is not supported; supported: {supported}")
        warnings.warn(
            f"fasttrain apply: model_type {model_type!r} is not among {supported}; patching what the probes confirm",
            RuntimeWarning,
            stacklevel=2,
        )
    patch = Patch(model)
    wanted = {"attention": attention, "norms": norms, "rotary": rotary, "mlp": mlp, "loss": loss}
    for part in PARTS:
        if wanted[part]:
            _PATCHERS[part](patch, model, strict)
    setattr(model, HANDLE, patch)
    return patch


def revert(model: nn.Module) -> None:
    """Undo apply(model): every forward, the rotary function (once no other patched model uses it) and the attention
    implementation back as they were. A model not patched is an error."""
    patch = model.__dict__.get(HANDLE) if isinstance(model, nn.Module) else None
    if patch is None:
        raise ValueError("revert: the model is not patched by fasttrain's apply()")
    patch.revert()


def _family_apply(model_type: str) -> Callable:
    def apply_to(model: nn.Module, **parts) -> Patch:
        found = getattr(getattr(model, "config", None), "model_type", None)
        if found != model_type:
            raise ValueError(f"apply_to_{model_type}: model must be a {SUPPORTED[model_type]} model, got {found!r}")
        return apply(model, **parts)

    apply_to.__name__ = apply_to.__qualname__ = f"apply_to_{model_type.removesuffix('_text')}"
    apply_to.__doc__ = (
        f"apply(model, ...) for a {SUPPORTED[model_type]} model (config.model_type {model_type!r}), as Liger Kernel's "
        f"apply_liger_kernel_to_* functions; the same keyword flags as apply()."
    )
    return apply_to


apply_to_gpt2 = _family_apply("gpt2")
apply_to_llama = _family_apply("llama")
apply_to_mistral = _family_apply("mistral")
apply_to_qwen2 = _family_apply("qwen2")
apply_to_gemma = _family_apply("gemma")
apply_to_gemma2 = _family_apply("gemma2")
apply_to_gemma3 = _family_apply("gemma3_text")
