"""`apply(model)`: fasttrain's kernels patched into a Hugging Face causal LM, as Liger Kernel's apply functions do.

    from fasttrain.integrations.hf import apply
    model = AutoModelForCausalLM.from_pretrained(name)
    apply(model)             # attention, norms, rotary, gated MLP, loss; revert(model) undoes it

Every part is found by type and structure, not by model family, and swapped at the instance level (a module's own
`forward`, the model's attention implementation), so that other models in the process are untouched; the one
exception is rotary, which transformers calls as a module-level function of the modeling file: it is swapped there,
counted across the models that use it and restored when the last is reverted, so while one model of a family is
patched every model of that family in the process rotates on fasttrain's kernel (the same rotation, to rounding).
transformers' own replacement hook for it (`use_kernel_forward_from_hub`) loads kernels from the Hub through the
`kernels` package, not a local function. Before a part is swapped, its original is
run once on a random probe and compared with the replacement's formula: what does not match stays as it is.

- attention: `model.set_attn_implementation("fasttrain")` (fasttrain.integrations.hf); left as it is where the model
  softcaps attention logits (Gemma 2), which fasttrain's attention does not implement.
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
import sys
import types
import typing
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fasttrain.ops import apply_rotary_emb, geglu, gelu, layer_norm, linear_cross_entropy, rms_norm, swiglu

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
_HANDLE = "_fasttrain_hf_patch"  # the model's attribute holding its Patch (a plain attribute: not in state_dict)


@dataclass
class Patch:
    """What apply() did to one model, and how to undo it (`revert()`)."""

    model: nn.Module
    patched: dict[str, list[str]] = field(default_factory=dict)
    """part -> the names of the modules (or modeling files, for rotary) that now run fasttrain."""
    skipped: list[str] = field(default_factory=list)
    """What was found but left as it is, and why."""
    _undo: list[Callable[[], None]] = field(default_factory=list, repr=False)

    def revert(self) -> None:
        """Restores every forward, function and the attention implementation that apply() swapped."""
        while self._undo:
            self._undo.pop()()
        if self.model.__dict__.get(_HANDLE) is self:
            delattr(self.model, _HANDLE)


# ---- instance-level swaps -------------------------------------------------------------------------------------------


def _swap_forward(patch: Patch, module: nn.Module, forward: Callable) -> None:
    """module.forward = forward (bound to module), undone by restoring what the instance held before (if anything)."""
    had, before = "forward" in module.__dict__, module.__dict__.get("forward")
    module.forward = types.MethodType(forward, module)

    def undo():
        if had:
            module.forward = before
        else:
            del module.forward

    patch._undo.append(undo)


def _confirms(probe: Callable) -> Callable:
    """A probe that raises (a module of another shape than the one it looks for) confirms nothing: None."""

    @functools.wraps(probe)
    def run(*args):
        try:
            return probe(*args)
        except Exception:
            return None

    return run


def _probe(shape, device, dtype=torch.float32) -> Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device=device, dtype=dtype)


def _close(got: Tensor, want: Tensor) -> bool:
    """The probe's test: a formula that is the module's agrees to rounding (bf16 weights included); another misses
    by far more (a weight against 1 + weight, SiLU against GELU)."""
    got, want = got.double(), want.double()
    return got.shape == want.shape and bool(((got - want).abs() <= 2e-2 * want.abs().max() + 1e-5).all())


# ---- norms ----------------------------------------------------------------------------------------------------------


def _rms_eps(module: nn.Module):
    for name in ("variance_epsilon", "eps"):
        eps = getattr(module, name, None)
        if isinstance(eps, float) or (name == "eps" and isinstance(module, nn.RMSNorm)):
            return name
    return None


def _rms_norm_forward(eps_name: str, offset: float, keep_dtype: bool) -> Callable:
    """RMSNorm's forward on fasttrain.ops.rms_norm: weight (Llama) or offset + weight in fp32 (Gemma); the output in
    the input's dtype (keep_dtype: Gemma's type_as) or promoted with the weight's (Llama's `weight * x`), except
    under autocast, where rms_norm returns the autocast dtype."""

    def forward(self, hidden_states: Tensor) -> Tensor:
        weight = self.weight
        if weight is not None and offset:
            weight = weight.float() + offset
        y = rms_norm(hidden_states, (hidden_states.shape[-1],), weight, getattr(self, eps_name))
        if not keep_dtype and self.weight is not None and not torch.is_autocast_enabled(hidden_states.device.type):
            y = y.to(torch.promote_types(self.weight.dtype, hidden_states.dtype))
        return y

    return forward


def _layer_norm_forward(self, input: Tensor) -> Tensor:
    return layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


@_confirms
def _rms_norm_plan(module: nn.Module) -> Callable | None:
    """The replacement forward of an RMSNorm-like module, if the probe confirms one of the two scalings."""
    eps_name = _rms_eps(module)
    weight = getattr(module, "weight", None)
    if eps_name is None or list(module.children()) or getattr(module, "bias", None) is not None:
        return None
    if weight is not None and (not isinstance(weight, Tensor) or weight.dim() != 1):
        return None
    n = weight.shape[0] if weight is not None else getattr(module, "normalized_shape", (0,))[-1]
    x = _probe((3, n), weight.device if weight is not None else "cpu")
    with torch.no_grad():
        got = module(x)
        eps = getattr(module, eps_name)
        eps = torch.finfo(torch.float32).eps if eps is None else eps
        normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        w = weight.float() if weight is not None else torch.ones(n)
        for offset, keep_dtype in ((0.0, False), (1.0, True)):
            if _close(got, normed * (w + offset)):
                return _rms_norm_forward(eps_name, offset, keep_dtype)
    return None


def _patch_norms(patch: Patch, model: nn.Module, strict: bool) -> None:
    for name, module in model.named_modules():
        if type(module) is nn.LayerNorm or (
            isinstance(module, nn.LayerNorm) and type(module).forward is nn.LayerNorm.forward
        ):
            _swap_forward(patch, module, _layer_norm_forward)
            patch.patched.setdefault("norms", []).append(name)
        elif "RMSNorm" in type(module).__name__ or isinstance(module, nn.RMSNorm):
            forward = _rms_norm_plan(module)
            if forward is None:
                _left_unpatched(patch, strict, f"{name} ({type(module).__name__}): not an RMSNorm the probe recognizes")
                continue
            _swap_forward(patch, module, forward)
            patch.patched.setdefault("norms", []).append(name)


# ---- gated MLP ------------------------------------------------------------------------------------------------------


def _gated_mlp_forward(gated: Callable) -> Callable:
    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(gated(self.gate_proj(x), self.up_proj(x)))

    return forward


@_confirms
def _mlp_plan(module: nn.Module) -> Callable | None:
    """The replacement forward of a gate/up/down MLP whose activation and forward the probe confirms."""
    weight = module.gate_proj.weight
    x = _probe((2, weight.shape[1]), weight.device)
    with torch.no_grad():
        act = module.act_fn(x)
        for gated, reference in ((swiglu, F.silu), (geglu, functools.partial(F.gelu, approximate="tanh"))):
            if _close(act, reference(x)):
                x = x.to(weight.dtype)
                want = module.down_proj(reference(module.gate_proj(x)) * module.up_proj(x))
                return _gated_mlp_forward(gated) if _close(module(x), want) else None
    return None


def _gelu_tanh_forward(self, input: Tensor) -> Tensor:
    return gelu(input, approximate="tanh")


@_confirms
def _is_gelu_tanh(module: nn.Module) -> bool:
    """A leaf GELU module (transformers' NewGELUActivation, GELUTanh, ...) that the probe finds to be GELU-tanh."""
    if "GELU" not in type(module).__name__.upper() or list(module.children()) or list(module.parameters()):
        return False
    x = _probe((2, 64), "cpu")
    with torch.no_grad():
        return _close(module(x), F.gelu(x, approximate="tanh"))


def _patch_mlps(patch: Patch, model: nn.Module, strict: bool) -> None:
    gated_mlps = []  # their act_fn modules are no longer called
    for name, module in model.named_modules():
        if any(name.startswith(f"{m}.") for m in gated_mlps):
            continue
        if _is_gelu_tanh(module):  # a plain MLP's activation (GPT-2's): fasttrain's GELU-tanh
            _swap_forward(patch, module, _gelu_tanh_forward)
            patch.patched.setdefault("mlp", []).append(name)
            continue
        parts = [getattr(module, p, None) for p in ("gate_proj", "up_proj", "down_proj")]
        if not all(isinstance(p, nn.Linear) for p in parts) or not hasattr(module, "act_fn"):
            continue
        forward = _mlp_plan(module)
        if forward is None:
            _left_unpatched(patch, strict, f"{name} ({type(module).__name__}): activation is not SiLU or GELU-tanh")
            continue
        _swap_forward(patch, module, forward)
        patch.patched.setdefault("mlp", []).append(name)
        gated_mlps.append(name)


# ---- rotary: the modeling file's function, swapped once for all its models ------------------------------------------

_ROTARY_SWAPS: dict[str, list] = {}  # modeling module name -> [its original apply_rotary_pos_emb, models using ours]


def _rotary_function(original: Callable) -> Callable:
    """transformers' apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1) on fasttrain.ops.apply_rotary_emb: q
    (B, H, T, D) and k (B, Hkv, T, D) (or (B, T, H, D) with unsqueeze_dim=2), cos/sin (B or 1, T, R) whose two halves
    are equal (rotate_half's layout); any other call runs the original."""

    @functools.wraps(original)
    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        rot = cos.shape[-1]
        if unsqueeze_dim not in (1, 2) or cos.dim() != 3 or q.dim() != 4 or rot % 2 or rot > q.shape[-1]:
            return original(q, k, cos, sin, unsqueeze_dim)
        cos, sin = cos[..., : rot // 2], sin[..., : rot // 2]  # (B, T, R/2): one half of rotate_half's table
        if unsqueeze_dim == 2:
            return apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, H, T, D) -> (B, T, H, D)
        return apply_rotary_emb(q, cos, sin).transpose(1, 2), apply_rotary_emb(k, cos, sin).transpose(1, 2)

    return apply_rotary_pos_emb


@_confirms
def _rotary_matches(original: Callable, replacement: Callable, head_dim: int, device) -> bool:
    freqs = _probe((5, head_dim // 2), device)  # the angles of 5 positions
    cos, sin = (torch.cat((f, f), dim=-1)[None] for f in (freqs.cos(), freqs.sin()))  # (1, 5, D), as HF builds them
    q, k = _probe((2, 3, 5, head_dim), device), _probe((2, 1, 5, head_dim), device) * 2
    with torch.no_grad():
        return all(_close(a, b) for a, b in zip(replacement(q, k, cos, sin), original(q, k, cos, sin)))


def _patch_rotary(patch: Patch, model: nn.Module, strict: bool) -> None:
    seen = set()
    for module in model.modules():
        modeling = sys.modules.get(type(module).__module__)
        if modeling is None or modeling.__name__ in seen or not hasattr(modeling, "apply_rotary_pos_emb"):
            continue
        head_dim = getattr(module, "head_dim", None)
        if not isinstance(head_dim, int):  # an attention module says its head dim; other classes of the file don't
            continue
        seen.add(modeling.__name__)
        entry = _ROTARY_SWAPS.get(modeling.__name__)
        if entry is None:
            original = modeling.apply_rotary_pos_emb
            ours = _rotary_function(original)
            if not _rotary_matches(original, ours, head_dim, next(model.parameters()).device):
                _left_unpatched(patch, strict, f"{modeling.__name__}.apply_rotary_pos_emb: not rotate_half's rotation")
                continue
            entry = _ROTARY_SWAPS[modeling.__name__] = [original, 0]
            modeling.apply_rotary_pos_emb = ours
        entry[1] += 1
        patch._undo.append(functools.partial(_release_rotary, modeling))
        patch.patched.setdefault("rotary", []).append(modeling.__name__)


def _release_rotary(modeling: types.ModuleType) -> None:
    entry = _ROTARY_SWAPS[modeling.__name__]
    entry[1] -= 1
    if entry[1] == 0:
        modeling.apply_rotary_pos_emb = entry[0]
        del _ROTARY_SWAPS[modeling.__name__]


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
        _left_unpatched(patch, strict, f"{type(model).__name__}: loss {model.loss_type}, not ForCausalLM")
        return
    _swap_forward(patch, model, _loss_forward(model.forward, type(model).forward))
    patch.patched["loss"] = [type(model).__name__]


# ---- attention ------------------------------------------------------------------------------------------------------


def _patch_attention(patch: Patch, model: nn.Module, strict: bool) -> None:
    import fasttrain.integrations.hf as hf  # registers attn_implementation="fasttrain"

    config = model.config
    if getattr(config, "attn_logit_softcapping", None) is not None:
        message = f"attention left as {config._attn_implementation!r}: fasttrain's does not softcap attention logits"
        patch.skipped.append(message)
        warnings.warn(f"fasttrain apply: {message}", RuntimeWarning, stacklevel=4)
        return
    before = config._attn_implementation
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(hf.NAME)
        patch._undo.append(lambda: model.set_attn_implementation(before))
    else:  # a transformers without it: the config is what the attention layers read
        config._attn_implementation = hf.NAME
        patch._undo.append(lambda: setattr(config, "_attn_implementation", before))
    patch.patched["attention"] = [hf.NAME]


# ---- the public functions -------------------------------------------------------------------------------------------


def _left_unpatched(patch: Patch, strict: bool, what: str) -> None:
    if strict:
        patch.revert()
        raise ValueError(f"fasttrain apply: cannot patch {what} (strict=False leaves it as it is, with a warning)")
    patch.skipped.append(what)
    warnings.warn(f"fasttrain apply: left unpatched: {what}", RuntimeWarning, stacklevel=4)


_PATCHERS = {
    "attention": _patch_attention,
    "norms": _patch_norms,
    "rotary": _patch_rotary,
    "mlp": _patch_mlps,
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
    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise TypeError(f"apply: model must be a transformers PreTrainedModel, got {type(model).__name__}")
    for name, flag in (("attention", attention), ("norms", norms), ("rotary", rotary), ("mlp", mlp), ("loss", loss)):
        if not isinstance(flag, bool):
            raise TypeError(f"apply: {name} must be a bool, got {type(flag).__name__}")
    existing = model.__dict__.get(_HANDLE)
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
    setattr(model, _HANDLE, patch)
    return patch


def revert(model: nn.Module) -> None:
    """Undo apply(model): every forward, the rotary function (once no other patched model uses it) and the attention
    implementation back as they were. A model not patched is an error."""
    patch = model.__dict__.get(_HANDLE) if isinstance(model, nn.Module) else None
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
