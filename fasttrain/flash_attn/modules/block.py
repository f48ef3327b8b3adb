"""flash-attn's `flash_attn.modules.block`: `Block`, a transformer layer of a mixer (MHA by default) and an MLP with
dropout, stochastic depth and LayerNorm/RMSNorm around them, prenorm or postnorm, the dropout + add + norm optionally
fused through fasttrain's layer_norm_fn. Its submodule names are flash-attn's (mixer, mlp, norm1, norm2), so its
state_dicts load; `ParallelBlock`, GPT-J's layer of the mixer and the MLP side by side, likewise. Tensor parallelism
(sequence_parallel, mark_shared_params) is absent."""

from functools import partial

import torch
from torch import Tensor, nn

from fasttrain._backend import ArgumentError
from fasttrain.flash_attn.modules.mha import MHA
from fasttrain.flash_attn.modules.mlp import Mlp
from fasttrain.ops.dropout_add_norm import RMSNorm, layer_norm_fn

__all__ = ["Block", "ParallelBlock"]


class _StochasticDepth(nn.Module):
    """torchvision's StochasticDepth(p, mode="row"), which flash-attn's Block uses: in training, each row (index of
    the first dim) is zeroed with probability p and the kept rows scaled by 1 / (1 - p); the identity otherwise."""

    def __init__(self, p: float):
        super().__init__()
        self.p = float(p)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        survival = 1.0 - self.p
        noise = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(survival)
        return x * (noise / survival if survival > 0.0 else noise)

    def extra_repr(self) -> str:
        return f"p={self.p}, mode=row"


def _check_not_tensor_parallel(cls: str, sequence_parallel, mark_shared_params) -> None:
    for arg, v in (("sequence_parallel", sequence_parallel), ("mark_shared_params", mark_shared_params)):
        if v:
            raise ArgumentError(f"{cls}: {arg}=True marks the norms for tensor parallelism, which fasttrain lacks")


def _check_fusable(cls: str, norm1: nn.Module, norm2: nn.Module | None, dropout1: nn.Module) -> None:
    """fused_dropout_add_ln hands the norms' weights and the dropout's p to layer_norm_fn."""
    for norm in (norm1, norm2):
        if norm is not None and not isinstance(norm, (nn.LayerNorm, RMSNorm)):
            raise ArgumentError(
                f"{cls}: fused_dropout_add_ln=True needs norm_cls to give nn.LayerNorm or RMSNorm, "
                f"got {type(norm).__name__}"
            )
    if not isinstance(dropout1, nn.Dropout):
        raise ArgumentError(
            f"{cls}: fused_dropout_add_ln=True needs dropout_cls to give nn.Dropout, got {type(dropout1).__name__}"
        )


class Block(nn.Module):
    """flash-attn's `Block`.

    prenorm=True: forward(hidden_states, residual) computes residual = drop(hidden_states) + residual (residual None:
    the first block), hidden_states = mlp(norm2(residual2)) with residual2 = drop(mixer(norm1(residual))) + residual,
    and returns (hidden_states, residual2): the add and norm come before each sub-layer, so they can be fused.
    prenorm=False: the usual postnorm layer, norm2(drop(mlp(h)) + h) with h = norm1(drop(mixer(x)) + x), returning
    one tensor. drop is dropout_cls(resid_dropout) then row-wise stochastic depth (drop_path). mlp_cls returning
    nn.Identity leaves out the MLP and norm2. return_residual: the mixer and mlp return (out, input) (postnorm).
    residual_in_fp32 (prenorm only) keeps the residual stream in float32. fused_dropout_add_ln runs each
    dropout + add + norm through layer_norm_fn (norms nn.LayerNorm or RMSNorm, dropouts nn.Dropout)."""

    def __init__(
        self,
        dim,
        mixer_cls=None,
        mlp_cls=None,
        norm_cls=nn.LayerNorm,
        dropout_cls=nn.Dropout,
        prenorm=True,
        resid_dropout1=0.0,
        resid_dropout2=0.0,
        drop_path1=0.0,
        drop_path2=0.0,
        fused_dropout_add_ln=False,
        return_residual=False,
        residual_in_fp32=False,
        sequence_parallel=False,
        mark_shared_params=False,
    ):
        super().__init__()
        if residual_in_fp32 and not prenorm:
            raise ArgumentError("Block: residual_in_fp32=True needs prenorm=True (postnorm has no residual stream)")
        _check_not_tensor_parallel("Block", sequence_parallel, mark_shared_params)
        for arg, p in (("drop_path1", drop_path1), ("drop_path2", drop_path2)):
            if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
                raise ArgumentError(f"Block: {arg} must be a probability in [0, 1], got {p!r}")
        self.prenorm = prenorm
        self.fused_dropout_add_ln = fused_dropout_add_ln
        self.return_residual = return_residual
        self.residual_in_fp32 = residual_in_fp32
        if mixer_cls is None:
            mixer_cls = partial(MHA, num_heads=dim // 64)
        if mlp_cls is None:
            mlp_cls = partial(Mlp, hidden_features=4 * dim)
        self.mixer = mixer_cls(dim)
        self.dropout1 = dropout_cls(resid_dropout1)
        self.drop_path1 = _StochasticDepth(drop_path1)
        self.norm1 = norm_cls(dim)
        self.mlp = mlp_cls(dim)
        if not isinstance(self.mlp, nn.Identity):
            self.dropout2 = dropout_cls(resid_dropout2)
            self.drop_path2 = _StochasticDepth(drop_path2)
            self.norm2 = norm_cls(dim)
        if fused_dropout_add_ln:
            _check_fusable("Block", self.norm1, getattr(self, "norm2", None), self.dropout1)

    def allocate_inference_cache(self, batch_size, max_seqlen, dtype=None, **kwargs):
        return self.mixer.allocate_inference_cache(batch_size, max_seqlen, dtype=dtype, **kwargs)

    def _add_norm(self, i: int, x: Tensor, residual: Tensor | None, prenorm: bool):
        """norm_i(drop_path_i(dropout_i(x)) + residual), and with prenorm the sum too (the residual stream)."""
        dropout, drop_path, norm = (getattr(self, f"{n}{i}") for n in ("dropout", "drop_path", "norm"))
        if not self.fused_dropout_add_ln:
            dropped = drop_path(dropout(x))
            summed = dropped if residual is None else dropped + residual
            out = norm(summed.to(dtype=norm.weight.dtype))
            if not prenorm:
                return out
            return out, summed.to(torch.float32) if self.residual_in_fp32 else summed
        rowscale = None
        if self.training and drop_path.p > 0.0:
            # the same row-wise keep/scale factors, as layer_norm_fn's one factor per row of x
            rowscale = drop_path(torch.ones(x.shape[:-1], device=x.device, dtype=x.dtype))
        return layer_norm_fn(
            x,
            norm.weight,
            norm.bias,
            residual=residual,
            eps=norm.eps,
            dropout_p=dropout.p if self.training else 0.0,
            rowscale=rowscale,
            prenorm=prenorm,
            residual_in_fp32=self.residual_in_fp32,
            is_rms_norm=isinstance(norm, RMSNorm),
        )

    def forward(self, hidden_states: Tensor, residual: Tensor | None = None, mixer_subset=None, mixer_kwargs=None):
        """hidden_states (B, T, dim). prenorm: residual (B, T, dim) or None (the first block); returns
        (hidden_states, residual). postnorm: residual must be None; returns hidden_states. mixer_subset (cross
        attention only) selects the rows of T the mixer's queries (and the returned residual) keep; mixer_kwargs go
        to the mixer's forward."""
        mixer_kwargs = {} if mixer_kwargs is None else dict(mixer_kwargs)
        has_mlp = not isinstance(self.mlp, nn.Identity)
        if self.prenorm:
            hidden_states, residual = self._add_norm(1, hidden_states, residual, prenorm=True)
            if mixer_subset is not None:
                mixer_kwargs["mixer_subset"] = mixer_subset
            hidden_states = self.mixer(hidden_states, **mixer_kwargs)
            if mixer_subset is not None:
                residual = residual[:, mixer_subset]
            if has_mlp:
                hidden_states, residual = self._add_norm(2, hidden_states, residual, prenorm=True)
                hidden_states = self.mlp(hidden_states)
            return hidden_states, residual
        if residual is not None:
            raise ArgumentError("Block: residual must be None with prenorm=False (postnorm adds the block's input)")
        mixer_out = self.mixer(hidden_states, **mixer_kwargs)
        if self.return_residual:
            mixer_out, hidden_states = mixer_out
        hidden_states = self._add_norm(1, mixer_out, hidden_states, prenorm=False)
        if has_mlp:
            mlp_out = self.mlp(hidden_states)
            if self.return_residual:
                mlp_out, hidden_states = mlp_out
            hidden_states = self._add_norm(2, mlp_out, hidden_states, prenorm=False)
        return hidden_states


class ParallelBlock(nn.Module):
    """flash-attn's `ParallelBlock` (GPT-J, GPT-NeoX, PaLM): the mixer and the MLP side by side on one residual stream.

    forward(hidden_states1, hidden_states2, residual) adds dropout1(hidden_states1) and dropout2(hidden_states2)
    (the previous block's mixer and MLP outputs; hidden_states2 None in the first block) to residual (None: the first
    block), normalizes the sum by norm1 for the mixer and by norm2 for the MLP (norm1 for both with tied_norm), and
    returns (mixer_out, mlp_out, residual). residual_in_fp32 keeps the stream in float32. fused_dropout_add_ln runs
    the adds and both norms as one layer_norm_fn, whose one dropout_p (dropout1's) then drops both branches."""

    def __init__(
        self,
        dim,
        mixer_cls=None,
        mlp_cls=None,
        norm_cls=nn.LayerNorm,
        dropout_cls=nn.Dropout,
        resid_dropout1=0.0,
        resid_dropout2=0.0,
        tied_norm=False,
        fused_dropout_add_ln=False,
        residual_in_fp32=False,
        sequence_parallel=False,
        mark_shared_params=False,
    ):
        super().__init__()
        _check_not_tensor_parallel("ParallelBlock", sequence_parallel, mark_shared_params)
        self.tied_norm = tied_norm
        self.fused_dropout_add_ln = fused_dropout_add_ln
        self.residual_in_fp32 = residual_in_fp32
        if mixer_cls is None:
            mixer_cls = partial(MHA, num_heads=dim // 64)
        if mlp_cls is None:
            mlp_cls = partial(Mlp, hidden_features=4 * dim)
        self.mixer = mixer_cls(dim)
        self.dropout1 = dropout_cls(resid_dropout1)
        self.norm1 = norm_cls(dim)
        self.mlp = mlp_cls(dim)
        self.dropout2 = dropout_cls(resid_dropout2)
        if not tied_norm:
            self.norm2 = norm_cls(dim)
        if fused_dropout_add_ln:
            _check_fusable("ParallelBlock", self.norm1, getattr(self, "norm2", None), self.dropout1)

    def allocate_inference_cache(self, batch_size, max_seqlen, dtype=None, **kwargs):
        return self.mixer.allocate_inference_cache(batch_size, max_seqlen, dtype=dtype, **kwargs)

    def forward(
        self,
        hidden_states1: Tensor,
        hidden_states2: Tensor | None = None,
        residual: Tensor | None = None,
        mixer_kwargs=None,
    ):
        """hidden_states1, hidden_states2, residual (B, T, dim); returns (mixer_out, mlp_out, residual)."""
        if not self.fused_dropout_add_ln:
            # added in flash-attn's order, (residual + dropped1) + dropped2, so half precision rounds as its does
            dropped1 = self.dropout1(hidden_states1)
            residual = dropped1 if residual is None else residual + dropped1
            if hidden_states2 is not None:  # the first block's single input is dropped once, not twice
                residual = residual + self.dropout2(hidden_states2)
            hidden_states1 = self.norm1(residual.to(dtype=self.norm1.weight.dtype))
            if self.tied_norm:
                hidden_states2 = hidden_states1
            else:
                hidden_states2 = self.norm2(residual.to(dtype=self.norm2.weight.dtype))
            if self.residual_in_fp32:
                residual = residual.to(torch.float32)
        else:
            norm2 = None if self.tied_norm else self.norm2
            hidden_states1, *rest, residual = layer_norm_fn(
                hidden_states1,
                self.norm1.weight,
                self.norm1.bias,
                residual=residual,
                x1=hidden_states2,
                weight1=None if norm2 is None else norm2.weight,
                bias1=None if norm2 is None else norm2.bias,
                eps=self.norm1.eps,
                dropout_p=self.dropout1.p if self.training else 0.0,
                prenorm=True,
                residual_in_fp32=self.residual_in_fp32,
                is_rms_norm=isinstance(self.norm1, RMSNorm),
            )
            hidden_states2 = hidden_states1 if self.tied_norm else rest[0]
        mixer_out = self.mixer(hidden_states1, **({} if mixer_kwargs is None else mixer_kwargs))
        return mixer_out, self.mlp(hidden_states2), residual
