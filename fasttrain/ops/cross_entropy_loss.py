"""flash-attn's cross-entropy: `cross_entropy_loss` (flash_attn.ops.triton.cross_entropy) and the `CrossEntropyLoss`
module (flash_attn.losses.cross_entropy), with flash-attn's semantics: per-row float32 losses with label smoothing, a
logit scale, the z-loss lse_square_scale * lse^2, a precomputed logsumexp, the gradient written over the logits
(inplace_backward) and the vocabulary split across a process group (tensor parallel).

A call with none of the extras (no smoothing, logit_scale 1, no z-loss, no precomputed logsumexp, no inplace_backward,
no process group) on a device with kernels (aot, triton) runs fasttrain.ops.cross_entropy's op. Every other call runs
the composition below in PyTorch, over chunks of rows so that at most _CHUNK float32 elements of the logits exist at
once, never a float32 copy of all of them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from fasttrain.ops.cross_entropy import CROSS_ENTROPY, REDUCTIONS, cross_entropy

_CHUNK = 2**24  # float32 elements of the logits alive at once in the composition (64 MiB)


def _chunks(n_rows: int, n_cols: int) -> list[slice]:
    step = max(1, _CHUNK // n_cols)
    return [slice(i, min(i + step, n_rows)) for i in range(0, n_rows, step)]


def _scaled(logits: Tensor, logit_scale: float, writable: bool) -> Tensor:
    """`logits` in float32 times logit_scale; writable: a new tensor the caller may write into, even for float32
    logits at scale 1 (else those are returned as they are)."""
    x = logits.to(torch.float32, copy=writable)
    if logit_scale == 1.0:
        return x
    return x * logit_scale if x is logits else x.mul_(logit_scale)


def _local_losses(logits, labels, lse, smoothing, logit_scale, total_classes, class_start, split):
    """Each row's loss before the z-loss and the ignore mask, as flash-attn's forward kernel: lse - x[label] (the
    logits scaled), or with smoothing lse - smoothing * sum(x) / total_classes - (1 - smoothing) * x[label]. A label
    outside this rank's columns adds 0 (smoothing * (lse - sum(x) / total_classes) with smoothing). Split, the lse
    term is left out: the caller adds the global one after the all-reduce. Also the rows' logsumexp if lse is None."""
    n_rows, n_cols = logits.shape
    loss = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    row_lse = torch.empty_like(loss) if lse is None else lse
    local = labels - class_start
    hit = (local >= 0) & (local < n_cols)  # (N,): the label is one of this rank's columns
    col = torch.where(hit, local, 0).long()[:, None]  # (N, 1)
    for rows in _chunks(n_rows, n_cols):
        x = _scaled(logits[rows], logit_scale, writable=False)  # (n, V) float32
        if lse is None:
            row_lse[rows] = torch.logsumexp(x, dim=-1)
        base = 0.0 if split else row_lse[rows]
        picked = x.gather(1, col[rows]).squeeze(1)  # (n,)
        if smoothing > 0.0:
            mean = x.sum(-1) / total_classes  # (n,)
            inside = base - smoothing * mean - (1.0 - smoothing) * picked
            loss[rows] = torch.where(hit[rows], inside, smoothing * (base - mean))
        else:
            loss[rows] = torch.where(hit[rows], base - picked, 0.0)
    return loss, row_lse


class _CrossEntropyLoss(torch.autograd.Function):
    """The composition: losses and logsumexp from _local_losses (reduced across the group when split), the
    gradient in the backward from the saved logits and logsumexp, chunk by chunk."""

    @staticmethod
    def forward(ctx, logits, labels, lse, smoothing, logit_scale, lse_square_scale, ignore_index, inplace, group):
        world = 1 if group is None else dist.get_world_size(group)
        rank = 0 if group is None else dist.get_rank(group)
        total_classes, class_start = world * logits.shape[1], rank * logits.shape[1]
        loss, lse = _local_losses(logits, labels, lse, smoothing, logit_scale, total_classes, class_start, world > 1)
        if world > 1:
            gathered = lse.new_empty(world, lse.shape[0])  # (world, N): each rank's logsumexp over its columns
            dist.all_gather(list(gathered.unbind(0)), lse.contiguous(), group=group)
            dist.all_reduce(loss, op=dist.ReduceOp.SUM, group=group)
            lse = torch.logsumexp(gathered, dim=0)
            loss += lse
        ignored = labels == ignore_index
        if world == 1 or lse_square_scale != 0.0:
            z_loss = (lse_square_scale * lse * lse).masked_fill_(ignored, 0.0)
        else:
            z_loss = torch.zeros_like(loss)
        loss = (loss + z_loss).masked_fill_(ignored, 0.0)
        ctx.save_for_backward(logits, lse, labels)
        ctx.mark_non_differentiable(z_loss)
        ctx.args = smoothing, logit_scale, lse_square_scale, ignore_index, inplace, total_classes, class_start
        return loss, z_loss

    @staticmethod
    def backward(ctx, grad_loss, grad_z_loss):  # grad_z_loss: the z-loss is returned for logging only
        logits, lse, labels = ctx.saved_tensors
        smoothing, logit_scale, lse_square_scale, ignore_index, inplace, total_classes, class_start = ctx.args
        grad = logits if inplace else torch.empty_like(logits)
        # d loss / d x = logit_scale * g * (softmax * (1 + 2 lse_square_scale lse) - target distribution)
        g = torch.where(labels == ignore_index, 0.0, grad_loss.float()) * logit_scale  # (N,)
        local = labels - class_start
        hit = (local >= 0) & (local < logits.shape[1])
        col = torch.where(hit, local, 0).long()[:, None]  # (N, 1)
        on_label = torch.where(hit, -(1.0 - smoothing) if smoothing > 0.0 else -1.0, 0.0)[:, None]  # (N, 1)
        for rows in _chunks(*logits.shape):
            p = _scaled(logits[rows], logit_scale, writable=True).sub_(lse[rows, None]).exp_()  # (n, V) softmax
            p.mul_(1.0 + 2.0 * lse_square_scale * lse[rows, None])
            p.scatter_add_(1, col[rows], on_label[rows])
            if smoothing > 0.0:
                p.sub_(smoothing / total_classes)
            grad[rows] = p.mul_(g[rows, None])
        return grad, None, None, None, None, None, None, None, None


class _ZeroRows(torch.autograd.Function):
    """loss with the masked rows set to 0, the gradient passed through unchanged: flash-attn gives a label outside
    [0, V) a loss of 0 yet the softmax as its gradient, which the kernels compute for it (their loss there is NaN)."""

    @staticmethod
    def forward(ctx, loss, mask):
        return loss.masked_fill(mask, 0.0)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _check(logits, labels, precomputed_lse, logit_scale, ignore_index, use_lse) -> None:
    if not isinstance(logits, Tensor) or not logits.is_floating_point():
        got = getattr(logits, "dtype", type(logits).__name__)
        raise TypeError(f"logits must be a floating-point tensor, got {got}")
    if logits.dim() != 2 or logits.shape[1] == 0:
        raise ValueError(f"logits must be a 2-D tensor (batch, vocab_size), vocab_size >= 1, got {tuple(logits.shape)}")
    integer = isinstance(labels, Tensor) and not (labels.is_floating_point() or labels.is_complex())
    if not integer or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor of class indices, got {getattr(labels, 'dtype', labels)}")
    if labels.shape != logits.shape[:1] or labels.device != logits.device:
        raise ValueError(
            f"labels must have shape ({logits.shape[0]},) on {logits.device}, "
            f"got {tuple(labels.shape)} on {labels.device}"
        )
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if not logit_scale > 0.0:
        raise ValueError(f"logit_scale must be > 0, got {logit_scale}")
    if use_lse and (not isinstance(precomputed_lse, Tensor) or precomputed_lse.shape != logits.shape[:1]):
        got = tuple(precomputed_lse.shape) if isinstance(precomputed_lse, Tensor) else type(precomputed_lse).__name__
        raise ValueError(f"precomputed_lse must be a tensor of shape ({logits.shape[0]},), got {got}")


def cross_entropy_loss(
    logits: Tensor,
    labels: Tensor,
    precomputed_lse: Tensor | None = None,
    label_smoothing: float = 0.0,
    logit_scale: float = 1.0,
    lse_square_scale: float = 0.0,
    ignore_index=-100,
    inplace_backward: bool = False,
    process_group=None,
) -> tuple[Tensor, Tensor]:
    """flash-attn's `cross_entropy_loss`: (losses (N,), z_losses (N,)), both float32 whatever the logits dtype.

    logits (N, V), the scores of this rank's V columns when process_group splits the vocabulary (rank r holding
    columns [r V, (r + 1) V) of world_size * V); labels (N,) integer class indices into the whole vocabulary.
    A row's loss is the cross-entropy of logit_scale * logits, label-smoothed over the whole vocabulary when
    label_smoothing > 0, plus its z-loss lse_square_scale * lse^2 (lse: the row's logsumexp). Rows labelled
    ignore_index get 0 and zero gradient. Without a process group, a label outside [0, V) gets loss z-loss alone
    (plus label_smoothing * (lse - mean logit)) yet the softmax term of the gradient, as in flash-attn. z_losses is
    for logging: no gradient flows from it. precomputed_lse (N,) replaces the computed logsumexp, also in the
    backward, only when logit_scale == 1 and label_smoothing == 0 (otherwise ignored, as in flash-attn).
    inplace_backward=True writes the gradient over the logits' storage (a contiguous copy of them if their last
    dimension is strided). The losses are identical on every rank of the process group, each rank's gradient is its
    own columns'.
    """
    use_lse = precomputed_lse is not None and logit_scale == 1.0 and label_smoothing == 0.0
    _check(logits, labels, precomputed_lse, logit_scale, ignore_index, use_lse)
    extras = label_smoothing > 0.0 or logit_scale != 1.0 or lse_square_scale != 0.0 or use_lse
    if not (extras or inplace_backward or process_group is not None):
        name = CROSS_ENTROPY.choose(logits, ignore_index)
        if name != "reference":  # the reference raises on labels outside [0, V): the composition serves those calls
            loss = cross_entropy(logits, labels, ignore_index, "none", backend=name)
            outside = (labels != ignore_index) & ((labels < 0) | (labels >= logits.shape[1]))
            return _ZeroRows.apply(loss, outside), torch.zeros_like(loss)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    lse = precomputed_lse.to(torch.float32).contiguous() if use_lse else None
    args = label_smoothing, logit_scale, lse_square_scale, ignore_index, inplace_backward, process_group
    return _CrossEntropyLoss.apply(logits, labels, lse, *args)


class CrossEntropyLoss(nn.Module):
    """flash-attn's `CrossEntropyLoss` module over `cross_entropy_loss` (its arguments there). forward(input (N, V),
    target (N,), precomputed_lse=None) returns the loss, and (loss, z_loss) when return_z_loss: (N,) with
    reduction="none", else 0-dim; "mean" divides by the rows not ignored (NaN when every row is). All float32."""

    def __init__(
        self,
        ignore_index=-100,
        reduction="mean",
        label_smoothing=0.0,
        logit_scale=1.0,
        lse_square_scale=0.0,
        inplace_backward=False,
        process_group=None,
        return_z_loss=False,
    ):
        super().__init__()
        if reduction not in REDUCTIONS:
            raise NotImplementedError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.logit_scale = logit_scale
        self.lse_square_scale = lse_square_scale
        self.inplace_backward = inplace_backward
        self.process_group = process_group
        self.return_z_loss = return_z_loss

    def forward(self, input, target, precomputed_lse=None):
        loss, z_loss = cross_entropy_loss(
            input,
            target,
            precomputed_lse=precomputed_lse,
            label_smoothing=self.label_smoothing,
            logit_scale=self.logit_scale,
            lse_square_scale=self.lse_square_scale,
            ignore_index=self.ignore_index,
            inplace_backward=self.inplace_backward,
            process_group=self.process_group,
        )
        loss = self._reduce(loss, target)
        return (loss, self._reduce(z_loss, target)) if self.return_z_loss else loss

    def _reduce(self, rows: Tensor, target: Tensor) -> Tensor:
        if self.reduction == "mean":
            return rows.sum() / (target != self.ignore_index).sum()
        return rows.sum() if self.reduction == "sum" else rows
