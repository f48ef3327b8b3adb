"""The module-level swaps of fasttrain.integrations.hf_apply: RMSNorm/LayerNorm, the gated MLP and GELU-tanh
activations, and the modeling files' rotary function, each confirmed by a probe before it is made; and the Patch that
records them (hf_apply's module docstring says what each part finds and runs)."""

from __future__ import annotations

import functools
import sys
import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fasttrain.ops import apply_rotary_emb, geglu, gelu, layer_norm, rms_norm, swiglu

HANDLE = "_fasttrain_hf_patch"  # the model's attribute holding its Patch (a plain attribute: not in state_dict)


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
        if self.model.__dict__.get(HANDLE) is self:
            delattr(self.model, HANDLE)


def left_unpatched(patch: Patch, strict: bool, what: str) -> None:
    """strict: undo the patch so far and raise ValueError naming `what`; else record it and warn."""
    if strict:
        patch.revert()
        raise ValueError(f"fasttrain apply: cannot patch {what} (strict=False leaves it as it is, with a warning)")
    patch.skipped.append(what)
    warnings.warn(f"fasttrain apply: left unpatched: {what}", RuntimeWarning, stacklevel=4)


# ---- instance-level swaps -------------------------------------------------------------------------------------------


def _swap_part(patch: Patch, strict: bool, part: str, name: str, module: nn.Module, forward, why: str) -> bool:
    """Swap module's forward for `forward` and record it under `part`; forward None: leave the module as it is
    (`why` says what it is not) and say so. Whether it was swapped."""
    if forward is None:
        left_unpatched(patch, strict, f"{name} ({type(module).__name__}): {why}")
        return False
    swap_forward(patch, module, forward)
    patch.patched.setdefault(part, []).append(name)
    return True


def swap_forward(patch: Patch, module: nn.Module, forward: Callable) -> None:
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


def patch_norms(patch: Patch, model: nn.Module, strict: bool) -> None:
    for name, module in model.named_modules():
        if type(module) is nn.LayerNorm or (
            isinstance(module, nn.LayerNorm) and type(module).forward is nn.LayerNorm.forward
        ):
            _swap_part(patch, strict, "norms", name, module, _layer_norm_forward, "")
        elif "RMSNorm" in type(module).__name__ or isinstance(module, nn.RMSNorm):
            why = "not an RMSNorm the probe recognizes"
            _swap_part(patch, strict, "norms", name, module, _rms_norm_plan(module), why)


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


def patch_mlps(patch: Patch, model: nn.Module, strict: bool) -> None:
    gated_mlps = []  # their act_fn modules are no longer called
    for name, module in model.named_modules():
        if any(name.startswith(f"{m}.") for m in gated_mlps):
            continue
        if _is_gelu_tanh(module):  # a plain MLP's activation (GPT-2's): fasttrain's GELU-tanh
            _swap_part(patch, strict, "mlp", name, module, _gelu_tanh_forward, "")
            continue
        parts = [getattr(module, p, None) for p in ("gate_proj", "up_proj", "down_proj")]
        if not all(isinstance(p, nn.Linear) for p in parts) or not hasattr(module, "act_fn"):
            continue
        why = "activation is not SiLU or GELU-tanh"
        if _swap_part(patch, strict, "mlp", name, module, _mlp_plan(module), why):
            gated_mlps.append(name)


# ---- rotary: the modeling file's function, swapped once for all its models ------------------------------------------

ROTARY_SWAPS: dict[str, list] = {}  # modeling module name -> [its original apply_rotary_pos_emb, models using ours]


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


def patch_rotary(patch: Patch, model: nn.Module, strict: bool) -> None:
    seen = set()
    for module in model.modules():
        modeling = sys.modules.get(type(module).__module__)
        if modeling is None or modeling.__name__ in seen or not hasattr(modeling, "apply_rotary_pos_emb"):
            continue
        head_dim = getattr(module, "head_dim", None)
        if not isinstance(head_dim, int):  # an attention module says its head dim; other classes of the file don't
            continue
        seen.add(modeling.__name__)
        entry = ROTARY_SWAPS.get(modeling.__name__)
        if entry is None:
            original = modeling.apply_rotary_pos_emb
            ours = _rotary_function(original)
            if not _rotary_matches(original, ours, head_dim, next(model.parameters()).device):
                left_unpatched(patch, strict, f"{modeling.__name__}.apply_rotary_pos_emb: not rotate_half's rotation")
                continue
            entry = ROTARY_SWAPS[modeling.__name__] = [original, 0]
            modeling.apply_rotary_pos_emb = ours
        entry[1] += 1
        patch._undo.append(functools.partial(_release_rotary, modeling))
        patch.patched.setdefault("rotary", []).append(modeling.__name__)


def _release_rotary(modeling: types.ModuleType) -> None:
    entry = ROTARY_SWAPS[modeling.__name__]
    entry[1] -= 1
    if entry[1] == 0:
        modeling.apply_rotary_pos_emb = entry[0]
        del ROTARY_SWAPS[modeling.__name__]
