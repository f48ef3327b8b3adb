"""flash-attn's `flash_attn.bert_padding`: moving between padded batches (B, T, ...) and the packed token rows
(total, ...) that `flash_attn_varlen_func` takes, with the same names, arguments and returns (flash-attn 2.8), so that
`from fasttrain.ops.bert_padding import unpad_input, pad_input` replaces flash-attn's import.

    x_unpad, indices, cu_seqlens, max_seqlen, seqused = unpad_input(x, attention_mask)  # x (B, T, ...)
    out_unpad = flash_attn_varlen_func(q_unpad, k_unpad, v_unpad, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen)
    out = pad_input(out_unpad, indices, B, T)  # (B, T, ...), zeros where attention_mask is 0

Every function is differentiable through its gathered or scattered rows. `max_seqlen_in_batch` is a Python int, read
on the host (one sync on a GPU), as flash-attn's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _check_rows(name: str, t: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() < 2:
        raise ValueError(f"{name} must have at least 2 dims (rows first), got shape {tuple(t.shape)}")


def _check_indices(indices: Tensor) -> None:
    if not isinstance(indices, Tensor) or indices.dtype not in (torch.int32, torch.int64) or indices.dim() != 1:
        got = f"{indices.dtype} of shape {tuple(indices.shape)}" if isinstance(indices, Tensor) else type(indices)
        raise TypeError(f"indices must be a 1-D int64 (or int32) tensor of row numbers, got {got}")


def _check_mask(name: str, mask: Tensor, hidden_states: Tensor) -> None:
    if not isinstance(mask, Tensor) or mask.dim() != 2:
        got = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"{name} must be a (batch, seqlen) tensor, got {got}")
    if mask.is_complex():
        raise TypeError(f"{name} must be bool, integer or floating-point (nonzero = valid), got {mask.dtype}")
    if mask.shape != hidden_states.shape[:2]:
        raise ValueError(
            f"{name} {tuple(mask.shape)} must match hidden_states' (batch, seqlen) {tuple(hidden_states.shape[:2])}"
        )


class IndexFirstAxis(torch.autograd.Function):
    """`IndexFirstAxis.apply(input, indices)`: input[indices] along the first axis, (first_axis_dim, ...) ->
    (len(indices), ...); the gradient is scattered back into zeros. flash-attn's class of this name, which some
    models call directly; `index_first_axis` checks its arguments first."""

    @staticmethod
    def forward(ctx, input, indices):
        ctx.save_for_backward(indices)
        ctx.first_axis_dim = input.shape[0]
        return input.index_select(0, indices)

    @staticmethod
    def backward(ctx, grad_output):
        (indices,) = ctx.saved_tensors
        grad = grad_output.new_zeros(ctx.first_axis_dim, *grad_output.shape[1:])
        return grad.index_copy(0, indices, grad_output), None


class IndexPutFirstAxis(torch.autograd.Function):
    """`IndexPutFirstAxis.apply(values, indices, first_axis_dim)`: a (first_axis_dim, ...) tensor of zeros with
    values' rows at indices; the gradient is gathered back. flash-attn's class of this name."""

    @staticmethod
    def forward(ctx, values, indices, first_axis_dim):
        ctx.save_for_backward(indices)
        return values.new_zeros(first_axis_dim, *values.shape[1:]).index_copy(0, indices, values)

    @staticmethod
    def backward(ctx, grad_output):
        (indices,) = ctx.saved_tensors
        return grad_output.index_select(0, indices), None, None


class IndexFirstAxisResidual(torch.autograd.Function):
    """`IndexFirstAxisResidual.apply(input, indices)` -> (input[indices], input detached): the picked rows and the
    whole input as a residual, whose gradient is the input's, plus the picked rows' added at indices (flash-attn's
    BERT keeps the residual stream of the tokens it does not pick). flash-attn's class of this name."""

    @staticmethod
    def forward(ctx, input, indices):
        ctx.save_for_backward(indices)
        return input[indices], input.detach()

    @staticmethod
    def backward(ctx, grad_output, grad_residual):
        (indices,) = ctx.saved_tensors
        return grad_residual.index_add(0, indices, grad_output), None


def index_first_axis(input: Tensor, indices: Tensor) -> Tensor:
    """input[indices] along the first axis: (first_axis_dim, ...) -> (len(indices), ...)."""
    _check_rows("input", input)
    _check_indices(indices)
    return IndexFirstAxis.apply(input, indices)


def index_first_axis_residual(input: Tensor, indices: Tensor) -> tuple[Tensor, Tensor]:
    """(input[indices], input detached), the gradient of the second flowing to input with the first's added at
    indices: (first_axis_dim, ...) -> ((len(indices), ...), (first_axis_dim, ...))."""
    _check_rows("input", input)
    _check_indices(indices)
    return IndexFirstAxisResidual.apply(input, indices)


def index_put_first_axis(values: Tensor, indices: Tensor, first_axis_dim: int) -> Tensor:
    """A (first_axis_dim, ...) tensor of zeros with values' rows at indices (the inverse of index_first_axis)."""
    _check_rows("values", values)
    _check_indices(indices)
    if indices.numel() != values.shape[0]:
        raise ValueError(f"indices has {indices.numel()} rows, values {values.shape[0]}")
    return IndexPutFirstAxis.apply(values, indices, first_axis_dim)


def _packed(hidden_states: Tensor, indices: Tensor) -> Tensor:
    rows = hidden_states.reshape(-1, *hidden_states.shape[2:])  # (B, T, ...) -> (B * T, ...)
    return IndexFirstAxis.apply(rows, indices)


def unpad_input(hidden_states: Tensor, attention_mask: Tensor, unused_mask: Tensor | None = None):
    """hidden_states (batch, seqlen, ...) and attention_mask (batch, seqlen), bool, int or float, nonzero = valid
    (each sequence's length is the mask's row summed as int32, as flash-attn's) ->
    (hidden_states (total_nnz, ...) of the selected tokens in order, indices (total_nnz,) int64 into the flattened
    (batch * seqlen) rows, cu_seqlens (batch + 1,) int32, max_seqlen_in_batch int, seqused (batch,) int32).

    unused_mask (batch, seqlen), or None: tokens allocated but not used; they are selected too (counted in
    cu_seqlens), while seqused counts only attention_mask's."""
    _check_rows("hidden_states", hidden_states)
    _check_mask("attention_mask", attention_mask, hidden_states)
    selected = attention_mask
    if unused_mask is not None:
        _check_mask("unused_mask", unused_mask, hidden_states)
        selected = attention_mask + unused_mask
    seqlens = selected.sum(dim=-1, dtype=torch.int32)  # (batch,)
    seqused = attention_mask.sum(dim=-1, dtype=torch.int32)
    indices = torch.nonzero(selected.flatten(), as_tuple=False).flatten()
    cu_seqlens = F.pad(torch.cumsum(seqlens, dim=0, dtype=torch.int32), (1, 0))
    return _packed(hidden_states, indices), indices, cu_seqlens, int(seqlens.max()), seqused


def unpad_input_for_concatenated_sequences(hidden_states: Tensor, attention_mask_in_length: Tensor):
    """Several samples packed in each row: attention_mask_in_length (batch, seqlen) holds, from its first column on,
    each packed sample's length (0 after the last), e.g. [[2, 3, 0, 0, 0, 0], [6, 0, 0, 0, 0, 0]]: row 0 holds a
    sample of 2 tokens then one of 3, and one padding token. Returns (hidden_states (total_nnz, ...), indices,
    cu_seqlens with one sequence per sample, max_seqlen_in_batch), as unpad_input less seqused."""
    _check_rows("hidden_states", hidden_states)
    _check_mask("attention_mask_in_length", attention_mask_in_length, hidden_states)
    lengths = attention_mask_in_length.flatten()
    seqlens = lengths[torch.nonzero(lengths, as_tuple=False).flatten()]  # (samples,): every sample's length
    seqlen = attention_mask_in_length.shape[1]
    used = attention_mask_in_length.sum(dim=-1)  # (batch,): tokens in each row, from its start
    valid = torch.arange(seqlen, device=used.device) < used[:, None]  # (batch, seqlen)
    indices = torch.nonzero(valid.flatten(), as_tuple=False).flatten()
    cu_seqlens = F.pad(torch.cumsum(seqlens, dim=0, dtype=torch.int32), (1, 0))
    return _packed(hidden_states, indices), indices, cu_seqlens, int(seqlens.max())


def pad_input(hidden_states: Tensor, indices: Tensor, batch: int, seqlen: int) -> Tensor:
    """The packed rows hidden_states (total_nnz, ...) back at indices of a (batch, seqlen, ...) tensor of zeros."""
    out = index_put_first_axis(hidden_states, indices, batch * seqlen)  # (batch * seqlen, ...)
    return out.view(batch, seqlen, *hidden_states.shape[1:])
