"""The training step: forward and backward over train.grad_accum micro-batches, then the optimizer; eager, or
replayed as one CUDA graph (train.cuda_graph). And what a run's losses must be to go on."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from fasttrain.train.device import autocast_for
from fasttrain.train.graphed import GraphedStep
from fasttrain.train.run import Run


def forward_backward(model, micro_batches, device: torch.device, autocast, scaler, sync_grads=None) -> torch.Tensor:
    """Accumulate the gradient of the mean loss over equal-sized micro-batches; return that mean loss (detached).

    A micro-batch is (x, y), or (x, y, positions, cu_seqlens) of packed examples (fasttrain.data.examples): each
    micro-batch's loss is the mean over its learned tokens, and the step's loss the mean of those means.
    sync_grads(last) -> the context of one micro-batch's forward and backward (fasttrain.train.dist: the ranks'
    gradients are reduced on the last micro-batch only)."""
    total = torch.zeros((), device=device)
    for i, (x, y, *packed) in enumerate(micro_batches):
        with sync_grads(i == len(micro_batches) - 1) if sync_grads else contextlib.nullcontext():
            total += _forward_backward(model, x, y, packed, device, autocast, scaler, len(micro_batches))
    return total / len(micro_batches)


def _forward_backward(model, x, y, packed, device, autocast, scaler, n_micro) -> torch.Tensor:
    """One micro-batch: the loss's gradient / n_micro accumulated; its loss (detached)."""
    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    kwargs = {}
    if packed:
        positions, cu_seqlens = (t.to(device, non_blocking=True) for t in packed)
        kwargs = {"positions": positions, "cu_seqlens": cu_seqlens}
    with autocast():
        _, loss = model(x, y, **kwargs)
    scaler.scale(loss / n_micro).backward()
    return loss.detach()


class TrainStep:
    """`step(i) -> (lr, mean loss as a device tensor)`: optimizer step i on the run's next micro-batches.

    With train.cuda_graph the step is captured at construction (a few warm-up steps that leave the weights and the
    optimizer's state as they were), so make one only when there are steps to take."""

    def __init__(self, run: Run):
        self.run = run
        tc = run.cfg.train
        self.graphed = None
        if tc.cuda_graph:
            self.graphed = GraphedStep(
                run.model,
                run.optimizer,
                tc.grad_accum,
                tc.batch_size,
                tc.seq_len,
                run.device,
                autocast_for(run.precision, run.device, cache_enabled=False),
            )

    def __call__(self, step: int) -> tuple[float, torch.Tensor, torch.Tensor]:
        """(lr, mean loss, bad): bad is a device bool, True when the loss or the gradient norm was not finite; such a
        step is skipped on the device (eager steps; a graphed step is only flagged), with no host sync."""
        run = self.run
        micro = [run.train_batches.next() for _ in range(run.cfg.train.grad_accum)]
        if self.graphed is not None:  # the grads live in the graph's pool: never set to None here
            lr = run.schedule(step)
            loss = self.graphed.step(micro, lr)
            return lr, loss, ~torch.isfinite(loss)
        lr = run.schedule.apply(run.optimizer, step)
        model = run.step_model
        loss = forward_backward(
            model, micro, run.device, run.autocast, run.scaler, lambda last: run.job.sync_grads(model, last)
        )
        loss = run.job.mean(loss)  # every rank logs, and skips on, the job's loss
        bad = ~torch.isfinite(loss)
        optimizer = run.optimizer
        if run.scaler.is_enabled():
            run.scaler.step(optimizer)
            # The GradScaler's own inf/NaN check of the grads, read before update() clears it: a step it skipped.
            found = run.scaler._found_inf_per_device(optimizer).values()
            bad = bad | (sum(t.to(loss.device) for t in found) > 0)
            run.scaler.update()
        else:
            # AdamW skips the whole step on the device when found_inf > 0, as under a GradScaler.
            optimizer.found_inf = bad.float()
            try:
                optimizer.step()
            finally:
                del optimizer.found_inf
        norm = getattr(optimizer, "last_grad_norm", None)
        if norm is not None:  # this step's norm before clipping (max_grad_norm set)
            bad = bad | ~torch.isfinite(norm.to(loss.device))
        optimizer.zero_grad(set_to_none=True)
        return lr, loss, bad


def check_losses(run: Run, losses: list[tuple[int, float, bool]], write: Callable[[str], None]) -> None:
    """Count the skipped (non-finite) steps among (step, loss, bad); with train.on_nan 'stop', FloatingPointError
    once train.max_bad_steps of them come in a row. No checkpoint is written after that: latest and best stay on the
    last good one."""
    tc = run.cfg.train
    skipped = []
    for step, loss, bad in losses:
        if not bad:
            run.bad_streak = 0
            continue
        skipped.append(step)
        run.bad_streak += 1
        if tc.on_nan == "stop" and run.bad_streak >= tc.max_bad_steps:
            run.metrics.skipped_steps.extend(skipped)
            advice = "use train.precision 'bf16' or 'fp32', " if run.precision == "fp16" else ""
            raise FloatingPointError(
                f"training diverged: {run.bad_streak} steps in a row (up to step {step}) had a non-finite loss or "
                f"gradient norm (loss {loss}); the checkpoints were left as they were; {advice}lower optim.lr "
                f"(now {run.cfg.optim.lr}) or set optim.max_grad_norm, then --resume"
            )
    run.metrics.skipped_steps.extend(skipped)
    if skipped:
        write(
            f"step {losses[-1][0]}: {len(skipped)} step(s) skipped for a non-finite loss or gradient norm "
            f"({len(run.metrics.skipped_steps)} in all)"
        )
