"""flash-attn's `flash_attn.modules.mlp`: `Mlp` (fc1 -> activation -> fc2) and `GatedMlp` (fc1 to twice the hidden
width, one half gating the other, -> fc2). Parameter names and shapes are flash-attn's, so its state_dicts load.
The tensor-parallel and fused classes (`ParallelMLP`, `ParallelGatedMlp`, `FusedMLP`) are absent."""

from functools import partial

import torch.nn.functional as F
from torch import Tensor, nn

from fasttrain._backend import ArgumentError
from fasttrain.ops import gelu, swiglu

__all__ = ["GatedMlp", "Mlp"]


def _activate(activation, y: Tensor) -> Tensor:
    """activation(y), F.gelu (exact or partial(F.gelu, approximate=...)) through fasttrain's gelu, the same math
    with the CPU kernel for the tanh form; any other callable as given."""
    if activation is F.gelu:
        return gelu(y)
    is_gelu = isinstance(activation, partial) and activation.func is F.gelu and not activation.args
    if is_gelu and set(activation.keywords) <= {"approximate"}:
        return gelu(y, **activation.keywords)
    return activation(y)


def _check_features(cls: str, in_features, hidden_features, out_features) -> None:
    for arg, v in (("in_features", in_features), ("hidden_features", hidden_features), ("out_features", out_features)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
            raise ArgumentError(f"{cls}: {arg} must be a positive int, got {v!r}")


class Mlp(nn.Module):
    """flash-attn's `Mlp`: fc2(activation(fc1(x))). hidden_features defaults to 4 * in_features, out_features to
    in_features; bias1/bias2 give fc1/fc2 biases. return_residual: forward returns (out, x)."""

    def __init__(
        self,
        in_features,
        hidden_features=None,
        out_features=None,
        activation=F.gelu,
        bias1=True,
        bias2=True,
        return_residual=False,
        device=None,
        dtype=None,
    ):
        super().__init__()
        _check_features("Mlp", in_features, hidden_features, out_features)
        factory_kwargs = {"device": device, "dtype": dtype}
        out_features = in_features if out_features is None else out_features
        hidden_features = 4 * in_features if hidden_features is None else hidden_features
        self.return_residual = return_residual
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias1, **factory_kwargs)
        self.activation = activation
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias2, **factory_kwargs)

    def forward(self, x: Tensor):
        y = self.fc2(_activate(self.activation, self.fc1(x)))
        return (y, x) if self.return_residual else y


class GatedMlp(nn.Module):
    """flash-attn's `GatedMlp`: fc1 gives (y, gate), each hidden_features wide; fc2(y * activation(gate)).
    hidden_features defaults to int(8 * in_features / 3), then rounds up to a multiple of multiple_of. The default
    activation F.sigmoid is GLU; F.silu is SwiGLU (fasttrain's swiglu kernels)."""

    def __init__(
        self,
        in_features,
        hidden_features=None,
        out_features=None,
        activation=F.sigmoid,
        bias1=True,
        bias2=True,
        multiple_of=128,
        return_residual=False,
        device=None,
        dtype=None,
    ):
        super().__init__()
        _check_features("GatedMlp", in_features, hidden_features, out_features)
        if isinstance(multiple_of, bool) or not isinstance(multiple_of, int) or multiple_of <= 0:
            raise ArgumentError(f"GatedMlp: multiple_of must be a positive int, got {multiple_of!r}")
        factory_kwargs = {"device": device, "dtype": dtype}
        out_features = in_features if out_features is None else out_features
        hidden_features = int(8 * in_features / 3) if hidden_features is None else hidden_features
        hidden_features = (hidden_features + multiple_of - 1) // multiple_of * multiple_of
        self.return_residual = return_residual
        self.fc1 = nn.Linear(in_features, 2 * hidden_features, bias=bias1, **factory_kwargs)
        self.activation = activation
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias2, **factory_kwargs)

    def forward(self, x: Tensor):
        h = self.fc1(x)  # (..., 2 * hidden)
        if self.activation is F.sigmoid:  # GLU through F.glu, as flash-attn: one rounding in half precision
            y = F.glu(h, dim=-1)
        else:
            y, gate = h.chunk(2, dim=-1)  # (..., 2 * hidden) -> two (..., hidden)
            y = swiglu(gate, y) if self.activation is F.silu else y * self.activation(gate)
        y = self.fc2(y)
        return (y, x) if self.return_residual else y
